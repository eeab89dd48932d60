//! One handler per page; each page's template is in `templates/ui/`.

use std::sync::Arc;

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Extension, Form, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use domain::{AccountSnapshot, AccountStatus};
use serde::Deserialize;
use store::keys::Opened;
use store::log::Until;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::timeline::{self, Outcome};
use super::{
    SESSION_COOKIE, SIGN_IN_COOKIE, UiError, Visitor, csrf_for, from_another_site, page_cookie,
    random_secret, removal, render, safe_next, same_secret, set_cookie,
};
use crate::history::{Params, replay};
use crate::{ApiState, parse_id};

/// What every page's frame needs: whether to offer sign-out, and its CSRF value.
pub(crate) struct Chrome {
    signed_in: bool,
    csrf: String,
}

impl Chrome {
    fn of(visitor: &Visitor) -> Self {
        Self {
            signed_in: visitor.session.is_some(),
            csrf: visitor.csrf(),
        }
    }

    pub(crate) fn none() -> Self {
        Self {
            signed_in: false,
            csrf: String::new(),
        }
    }
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string()
}

fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn ok(page: &impl Template) -> Response {
    render(StatusCode::OK, page)
}

fn form_refused(rejection: FormRejection) -> UiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return UiError::TooLarge;
    }
    UiError::BadRequest(format!(
        "The form could not be read: {}.",
        rejection.body_text()
    ))
}

#[derive(Template)]
#[template(path = "ui/error.html")]
pub(crate) struct ErrorPage {
    pub(crate) chrome: Chrome,
    pub(crate) status: u16,
    pub(crate) heading: &'static str,
    pub(crate) message: String,
}

#[derive(Template)]
#[template(path = "ui/sign_in.html")]
struct SignIn {
    chrome: Chrome,
    csrf: String,
    next: String,
    notice: Option<&'static str>,
    error: Option<&'static str>,
}

#[derive(Deserialize)]
struct SignInQuery {
    #[serde(default)]
    next: String,
    #[serde(default)]
    notice: String,
}

/// The sign-in form, with a fresh CSRF value in a cookie and in the form.
pub(crate) async fn sign_in_form(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if state.tokens.is_empty() {
        return Redirect::to("/ui/").into_response();
    }
    let query: SignInQuery =
        serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or(SignInQuery {
            next: String::new(),
            notice: String::new(),
        });
    let notice = match query.notice.as_str() {
        "expired" => {
            Some("Your session has ended (it expired, or you signed out elsewhere). Sign in again.")
        }
        "signed_out" => Some("You are signed out."),
        _ => None,
    };
    sign_in_page(
        &headers,
        StatusCode::OK,
        safe_next(&query.next),
        notice,
        None,
    )
}

fn sign_in_page(
    headers: &HeaderMap,
    status: StatusCode,
    next: &str,
    notice: Option<&'static str>,
    error: Option<&'static str>,
) -> Response {
    let csrf = random_secret();
    let mut response = render(
        status,
        &SignIn {
            chrome: Chrome::none(),
            csrf: csrf.clone(),
            next: next.to_owned(),
            notice,
            error,
        },
    );
    set_cookie(
        &mut response,
        page_cookie(
            SIGN_IN_COOKIE,
            csrf,
            std::time::Duration::from_secs(3600),
            headers,
        ),
    );
    response
}

#[derive(Deserialize)]
pub(crate) struct SignInForm {
    token: String,
    csrf: String,
    #[serde(default)]
    next: String,
}

/// Exchanges an API token for a session.
pub(crate) async fn sign_in(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    form: Result<Form<SignInForm>, FormRejection>,
) -> Result<Response, UiError> {
    if state.tokens.is_empty() {
        return Ok(Redirect::to("/ui/").into_response());
    }
    let Form(form) = form.map_err(form_refused)?;
    let next = safe_next(&form.next);
    let expected = super::cookie(&headers, SIGN_IN_COOKIE).unwrap_or_default();
    if from_another_site(&headers) || !same_secret(&expected, &form.csrf) {
        return Ok(sign_in_page(
            &headers,
            StatusCode::FORBIDDEN,
            next,
            None,
            Some("This sign-in form had expired or did not come from this service. Try again."),
        ));
    }
    // Digests of equal length, every token compared, so timing tells neither which token
    // matched nor how long any is (as `/v1`'s bearer check).
    let presented = store::sessions::token_digest(form.token.as_bytes());
    let matched = state.tokens.iter().fold(None, |found, token| {
        let equal = bool::from(store::sessions::token_digest(token.as_bytes()).ct_eq(&presented));
        found.or(equal.then_some(token))
    });
    let Some(token) = matched.filter(|_| !form.token.is_empty()) else {
        tracing::info!("a sign-in to the pages was refused: the token is not accepted");
        return Ok(sign_in_page(
            &headers,
            StatusCode::UNAUTHORIZED,
            next,
            None,
            Some("That token is not accepted here."),
        ));
    };
    let session = random_secret();
    let mut conn = state
        .sessions
        .acquire()
        .await
        .map_err(crate::Problem::from)?;
    store::sessions::open(
        &mut conn,
        session.as_bytes(),
        token.as_bytes(),
        state.ui.session_ttl,
    )
    .await?;
    conn.release();
    tracing::info!("a session of the pages was opened");
    let mut response = Redirect::to(next).into_response();
    set_cookie(
        &mut response,
        page_cookie(SESSION_COOKIE, session, state.ui.session_ttl, &headers),
    );
    set_cookie(&mut response, removal(SIGN_IN_COOKIE, &headers));
    Ok(response)
}

#[derive(Deserialize)]
pub(crate) struct SignOutForm {
    csrf: String,
}

/// Ends the session: deleted where it is kept, so a copy of the cookie stops working too.
pub(crate) async fn sign_out(
    State(state): State<Arc<ApiState>>,
    Extension(visitor): Extension<Visitor>,
    headers: HeaderMap,
    form: Result<Form<SignOutForm>, FormRejection>,
) -> Result<Response, UiError> {
    let Some(session) = visitor.session.as_deref() else {
        return Ok(Redirect::to("/ui/").into_response());
    };
    let Form(form) = form.map_err(form_refused)?;
    if from_another_site(&headers) || !same_secret(&csrf_for(session), &form.csrf) {
        return Err(UiError::Forbidden(
            "This sign-out did not come from a page of this service.".into(),
        ));
    }
    let mut conn = state
        .sessions
        .acquire()
        .await
        .map_err(crate::Problem::from)?;
    store::sessions::close(&mut conn, session.as_bytes()).await?;
    conn.release();
    let mut response = Redirect::to("/ui/sign-in?notice=signed_out").into_response();
    set_cookie(&mut response, removal(SESSION_COOKIE, &headers));
    Ok(response)
}

#[derive(Template)]
#[template(path = "ui/home.html")]
struct Home {
    chrome: Chrome,
    query: String,
    error: Option<String>,
}

/// The search: an account id opens the account, a user id the user's accounts.
pub(crate) async fn home(
    State(state): State<Arc<ApiState>>,
    Extension(visitor): Extension<Visitor>,
    RawQuery(query): RawQuery,
) -> Result<Response, UiError> {
    let params = Params::parse(query.as_deref())?;
    let q = params.get("q").unwrap_or("").trim().to_owned();
    let page = |status, error: Option<String>, q: String| {
        render(
            status,
            &Home {
                chrome: Chrome::of(&visitor),
                query: q,
                error,
            },
        )
    };
    if q.is_empty() {
        return Ok(page(StatusCode::OK, None, q));
    }
    let Ok(id) = Uuid::try_parse(&q) else {
        return Ok(page(
            StatusCode::BAD_REQUEST,
            Some("An account id or a user id is a UUID, such as 0187c66e-e7e5-811c-b006-2232f00f426a.".into()),
            q,
        ));
    };
    if state.snapshots.get(id).await?.is_some() {
        return Ok(Redirect::to(&format!("/ui/accounts/{id}")).into_response());
    }
    let mut conn = state.db.acquire().await.map_err(crate::Problem::from)?;
    let of_user = store::snapshots::of_user(&mut conn, &state.vault, id).await?;
    let logged = {
        use futures_util::TryStreamExt;
        store::log::page(&mut conn, &state.vault, Some(id), 0, i64::MAX, 1)
            .try_next()
            .await?
            .is_some()
    };
    conn.release();
    if !of_user.is_empty() {
        return Ok(Redirect::to(&format!("/ui/users/{id}")).into_response());
    }
    if logged {
        return Ok(Redirect::to(&format!("/ui/accounts/{id}")).into_response());
    }
    Ok(page(
        StatusCode::NOT_FOUND,
        Some(format!(
            "Nothing is known about {id}: no account and no user with this id has sent an event."
        )),
        q,
    ))
}

/// An account as a line of a list, or the head of its page.
struct Summary {
    account_id: Uuid,
    user_id: Uuid,
    status: &'static str,
    connection: String,
    employer: String,
    version: i64,
    last_position: i64,
    last_event: String,
    last_event_at: String,
    last_event_iso: String,
    first_seen_at: String,
    resource_updated_at: Option<String>,
    removed_at: Option<String>,
}

impl From<&AccountSnapshot> for Summary {
    fn from(s: &AccountSnapshot) -> Self {
        let resource = s.resource.as_ref().map(|r| r.value());
        let employer = resource
            .as_ref()
            .and_then(|r| {
                let names: Vec<&str> = r
                    .get("employers")?
                    .as_array()?
                    .iter()
                    .filter_map(|e| e.as_str())
                    .collect();
                (!names.is_empty()).then(|| names.join(", "))
            })
            .or_else(|| {
                resource
                    .as_ref()
                    .and_then(|r| r.get("item")?.as_str().map(str::to_owned))
            })
            .unwrap_or_else(|| "—".into());
        Self {
            account_id: s.account_id,
            user_id: s.user_id,
            status: match s.status {
                AccountStatus::Active => "active",
                AccountStatus::Removed => "removed",
                AccountStatus::Erased => "erased",
            },
            connection: s.connection_status.clone().unwrap_or_else(|| "—".into()),
            employer,
            version: s.version,
            last_position: s.last_position,
            last_event: s.last_event.clone(),
            last_event_at: when(s.last_event_at),
            last_event_iso: iso(s.last_event_at),
            first_seen_at: when(s.first_seen_at),
            resource_updated_at: s.resource_updated_at().map(when),
            removed_at: s.removed_at.map(when),
        }
    }
}

#[derive(Template)]
#[template(path = "ui/user.html")]
struct UserPage {
    chrome: Chrome,
    user_id: Uuid,
    accounts: Vec<Summary>,
}

pub(crate) async fn user(
    State(state): State<Arc<ApiState>>,
    Extension(visitor): Extension<Visitor>,
    Path(raw): Path<String>,
) -> Result<Response, UiError> {
    let user_id = parse_id(&raw, "The user id")?;
    let mut conn = state.db.acquire().await.map_err(crate::Problem::from)?;
    let accounts = store::snapshots::of_user(&mut conn, &state.vault, user_id).await?;
    conn.release();
    if accounts.is_empty() {
        return Err(UiError::NotFound(format!(
            "No account of user {user_id} is known here."
        )));
    }
    Ok(ok(&UserPage {
        chrome: Chrome::of(&visitor),
        user_id,
        accounts: accounts.iter().map(Summary::from).collect(),
    }))
}

/// One event of the timeline as shown.
struct Row {
    position: i64,
    event: String,
    received_at: String,
    received_iso: String,
    deliveries: i64,
    /// `changed`, `unchanged`, `quarantined` or `erased` (also the badge's class).
    outcome: &'static str,
    /// Why it was quarantined.
    reason: Option<String>,
    changes: Vec<super::diff::FieldChange>,
    /// This is the event the page shows the view as of.
    selected: bool,
}

struct AsOf {
    position: i64,
    received_at: String,
}

#[derive(Template)]
#[template(path = "ui/account.html")]
struct AccountPage {
    chrome: Chrome,
    account_id: Uuid,
    view: Option<Summary>,
    as_of: Option<AsOf>,
    rows: Vec<Row>,
    total: usize,
    quarantined: usize,
    older: Option<String>,
    newer: Option<String>,
}

/// The account: its view (now, or as of an event), and its timeline.
pub(crate) async fn account(
    State(state): State<Arc<ApiState>>,
    Extension(visitor): Extension<Visitor>,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, UiError> {
    let account_id = parse_id(&raw, "The account id")?;
    let params = Params::parse(query.as_deref())?;
    let at_position = params
        .has("at_position")
        .then(|| params.integer("at_position", 0, 1..=i64::MAX))
        .transpose()?;
    let before = params
        .has("before")
        .then(|| params.integer("before", 0, 1..=i64::MAX))
        .transpose()?;
    let mut conn = state.db.acquire().await.map_err(crate::Problem::from)?;
    let timeline = timeline::page(&mut conn, &state.vault, account_id, before).await?;
    if timeline.total == 0 {
        return Err(UiError::NotFound(format!(
            "No event of account {account_id} is in the log."
        )));
    }
    let view = match at_position {
        None => {
            conn.release();
            state.snapshots.get(account_id).await?
        }
        Some(position) => {
            let until = Until {
                position: Some(position),
                received_at: None,
            };
            let view = replay(&mut conn, &state.vault, account_id, until).await?;
            conn.release();
            view
        }
    };
    let as_of = match at_position {
        None => None,
        Some(position) => Some(AsOf {
            position,
            received_at: timeline
                .entries
                .iter()
                .find(|e| e.position == position)
                .map(|e| when(e.received_at))
                .unwrap_or_default(),
        }),
    };
    let keep_at = at_position
        .map(|p| format!("at_position={p}&"))
        .unwrap_or_default();
    let older = timeline
        .older
        .map(|b| format!("/ui/accounts/{account_id}?{keep_at}before={b}"));
    let newer = timeline.newer.then(|| match at_position {
        Some(p) => format!("/ui/accounts/{account_id}?at_position={p}"),
        None => format!("/ui/accounts/{account_id}"),
    });
    let quarantined = timeline
        .entries
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Quarantined(_)))
        .count();
    let rows = timeline
        .entries
        .into_iter()
        .map(|e| {
            let (outcome, reason) = match e.outcome {
                Outcome::Changed => ("changed", None),
                Outcome::Unchanged => ("unchanged", None),
                Outcome::Erased => ("erased", None),
                Outcome::Quarantined(reason) => (
                    "quarantined",
                    Some(
                        reason.unwrap_or_else(|| "(the reason was erased with the account)".into()),
                    ),
                ),
            };
            Row {
                selected: at_position == Some(e.position),
                position: e.position,
                event: e.event,
                received_iso: iso(e.received_at),
                received_at: when(e.received_at),
                deliveries: e.deliveries,
                outcome,
                reason,
                changes: e.changes,
            }
        })
        .collect();
    Ok(ok(&AccountPage {
        chrome: Chrome::of(&visitor),
        account_id,
        view: view.as_ref().map(Summary::from),
        as_of,
        rows,
        total: timeline.total,
        quarantined,
        older,
        newer,
    }))
}

#[derive(Template)]
#[template(path = "ui/event.html")]
struct EventPage {
    chrome: Chrome,
    account_id: Uuid,
    position: i64,
    event: String,
    received_at: String,
    deliveries: i64,
    sha256: String,
    signature: String,
    /// The body exactly as received; `None` when erased or unreadable (`note` says which).
    body: Option<String>,
    note: Option<String>,
}

/// One event's raw payload, exactly as received.
pub(crate) async fn event(
    State(state): State<Arc<ApiState>>,
    Extension(visitor): Extension<Visitor>,
    Path((raw_account, raw_position)): Path<(String, String)>,
) -> Result<Response, UiError> {
    let account_id = parse_id(&raw_account, "The account id")?;
    let position: i64 = raw_position
        .parse()
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| {
            UiError::BadRequest("An event's position is a whole number from 1.".into())
        })?;
    let mut conn = state.db.acquire().await.map_err(crate::Problem::from)?;
    let record = {
        use futures_util::TryStreamExt;
        let mut rows = store::log::page(
            &mut conn,
            &state.vault,
            Some(account_id),
            position - 1,
            i64::MAX,
            1,
        );
        rows.try_next().await?
    };
    conn.release();
    let Some(record) = record.filter(|r| r.position == position) else {
        return Err(UiError::NotFound(format!(
            "Account {account_id} has no event at position {position}."
        )));
    };
    let (body, note) = match record.body {
        Opened::Plain(bytes) => (Some(String::from_utf8_lossy(&bytes).into_owned()), None),
        Opened::Erased => (
            None,
            Some("The account's personal data was erased: this payload is gone for good. Its sha256 and signature remain.".to_owned()),
        ),
        Opened::Unreadable(reason) => (
            None,
            Some(format!("The stored payload cannot be read: {reason}.")),
        ),
    };
    Ok(ok(&EventPage {
        chrome: Chrome::of(&visitor),
        account_id,
        position,
        event: record.event,
        received_at: when(record.received_at),
        deliveries: record.deliveries,
        sha256: hex::encode(&record.body_sha256),
        signature: record.signature.unwrap_or_else(|| "—".into()),
        body,
        note,
    }))
}

struct QuarantineRow {
    position: i64,
    event: String,
    account_id: Option<Uuid>,
    error: String,
    quarantined_at: String,
}

struct SubscriberRow {
    url: String,
    state: String,
    pending: i64,
    last_error: Option<String>,
}

#[derive(Template)]
#[template(path = "ui/health.html")]
struct HealthPage {
    chrome: Chrome,
    head: i64,
    checkpoint: i64,
    lag: i64,
    leader: Option<String>,
    /// With `PROJECTOR_PARTITIONS` > 1: each partition, its checkpoint and its leader.
    partitions: Vec<PartitionRow>,
    quarantined: i64,
    quarantine: Vec<QuarantineRow>,
    enricher: Option<String>,
    enricher_scanned: i64,
    enrichments_pending: i64,
    notifier: Option<String>,
    subscribers: Vec<SubscriberRow>,
}

struct PartitionRow {
    index: u16,
    checkpoint: i64,
    leader: Option<String>,
}

/// The most quarantined events the health page lists.
const HEALTH_QUARANTINE: i64 = 50;

/// The projection's health: the log, the checkpoint, the leaders, the quarantine.
pub(crate) async fn health(
    State(state): State<Arc<ApiState>>,
    Extension(visitor): Extension<Visitor>,
) -> Result<Response, UiError> {
    use store::locks::{Lock, holder};
    let mut conn = state.db.acquire().await.map_err(crate::Problem::from)?;
    let head = store::log::head(&mut conn).await?;
    let checkpoint = store::checkpoints::get(&mut conn, store::checkpoints::PROJECTION).await?;
    let named = |h: Option<(String, Option<String>, i32)>| {
        h.map(|(name, address, pid)| {
            format!(
                "{} (backend pid {pid}{})",
                if name.is_empty() { "unnamed" } else { &name },
                address.map(|a| format!(", from {a}")).unwrap_or_default()
            )
        })
    };
    // Who leads is in the primary's locks (a replica has none of them).
    let mut primary = state
        .sessions
        .acquire()
        .await
        .map_err(crate::Problem::from)?;
    let leader = named(holder(&mut primary, Lock::Leader).await?);
    let layout = store::partitions::layout(&mut conn).await?;
    let mut partitions = vec![];
    if layout.partitions() > 1 {
        for (part, checkpoint) in layout.parts() {
            partitions.push(PartitionRow {
                index: part.index,
                checkpoint,
                leader: named(holder(&mut primary, part.lock()).await?),
            });
        }
    }
    let enricher = named(holder(&mut primary, Lock::Enricher).await?);
    let notifier = named(holder(&mut primary, Lock::Notifier).await?);
    primary.release();
    let quarantined = store::quarantine::count(&mut conn).await?;
    let quarantine = store::quarantine::page(&mut conn, &state.vault, 0, HEALTH_QUARANTINE).await?;
    let enricher_scanned = store::checkpoints::get(&mut conn, store::checkpoints::ENRICHER).await?;
    let enrichments_pending = store::enrichment::pending(&mut conn).await?;
    let subscribers = store::subscribers::list(&mut conn).await?;
    conn.release();
    Ok(ok(&HealthPage {
        chrome: Chrome::of(&visitor),
        head,
        checkpoint,
        lag: head - checkpoint,
        leader,
        partitions,
        quarantined,
        quarantine: quarantine
            .into_iter()
            .map(|q| QuarantineRow {
                position: q.position,
                event: q.event,
                account_id: q.account_id,
                error: q
                    .error
                    .unwrap_or_else(|| "(the reason was erased with the account)".into()),
                quarantined_at: when(q.quarantined_at),
            })
            .collect(),
        enricher,
        enricher_scanned,
        enrichments_pending,
        notifier,
        subscribers: subscribers
            .into_iter()
            .map(|s| SubscriberRow {
                url: s.url,
                state: s.state,
                pending: s.pending,
                last_error: s.last_error,
            })
            .collect(),
    }))
}

/// Any other path under `/ui/`.
pub(crate) async fn not_found() -> UiError {
    UiError::NotFound(
        "There is no such page. Search for an account or a user from the start page.".into(),
    )
}
