//! The audit routes: what Argyle told us, when, and what it changed.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use domain::AccountSnapshot;
use futures_util::TryStreamExt;
use serde::Serialize;
use serde_json::value::RawValue;
use store::PgConnection;
use store::keys::Opened;
use store::log::{EventRecord, Until};
use uuid::Uuid;

use crate::{ApiState, Problem, parse_id};

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

/// Paging parameters (documentation only: [`Params`] parses them).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct PageParams {
    /// Return events after this log position (exclusive); 0 starts at the beginning.
    #[param(minimum = 0, default = 0)]
    after: Option<i64>,
    /// Page size.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<i64>,
}

pub(crate) fn invalid_query(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid_query", detail)
}

/// Query-string parameters, parsed leniently (unknown ones are ignored) but checked strictly.
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    pub(crate) fn parse(query: Option<&str>) -> Result<Self, Problem> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|_| invalid_query("the query string is malformed"))?;
        let mut map = HashMap::new();
        for (key, value) in pairs {
            if map.insert(key.clone(), value).is_some() {
                return Err(invalid_query(format!("{key} is given more than once")));
            }
        }
        Ok(Self(map))
    }

    pub(crate) fn integer(
        &self,
        name: &str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<i64, Problem> {
        let Some(raw) = self.0.get(name) else {
            return Ok(default);
        };
        raw.parse::<i64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                invalid_query(format!(
                    "{name} must be an integer from {} to {}",
                    range.start(),
                    range.end()
                ))
            })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// `?wait=` (seconds, `30s`, `500ms`): zero when absent, and a longer wait than `max` waits
    /// `max` (a long poll's server caps the wait; it does not refuse it).
    pub(crate) fn wait(&self, max: std::time::Duration) -> Result<std::time::Duration, Problem> {
        let Some(raw) = self.0.get("wait") else {
            return Ok(std::time::Duration::ZERO);
        };
        web::wait::parse(raw).map(|w| w.min(max)).ok_or_else(|| {
            invalid_query(format!(
                "wait must be a duration such as 30s or 500ms (at most {}s is waited)",
                max.as_secs()
            ))
        })
    }

    /// `?as_of=<RFC 3339>` and/or `?at_position=<N>`, if either is given; with both, both apply.
    pub(crate) fn until(&self) -> Result<Option<Until>, Problem> {
        let received_at = match self.0.get("as_of") {
            None => None,
            Some(raw) => Some(
                DateTime::parse_from_rfc3339(raw)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        invalid_query(
                            "as_of must be an RFC 3339 date-time, e.g. 2026-03-03T10:00:00Z",
                        )
                    })?,
            ),
        };
        let position = match self.0.contains_key("at_position") {
            false => None,
            true => Some(self.integer("at_position", 0, 0..=i64::MAX)?),
        };
        Ok(
            (received_at.is_some() || position.is_some()).then_some(Until {
                position,
                received_at,
            }),
        )
    }

    fn page(&self) -> Result<(i64, i64), Problem> {
        Ok((
            self.integer("after", 0, 0..=i64::MAX)?,
            self.integer("limit", DEFAULT_LIMIT, 1..=MAX_LIMIT)?,
        ))
    }
}

/// Replays one account's events up to `until` with [`domain::apply`], exactly as the projector
/// folds them (an event the fold refuses leaves the snapshot as it was).
///
/// An erased account is shown erased as of any time ([`AccountSnapshot::erased`]): its events'
/// bodies cannot be read, and were they readable they would not be shown.
pub(crate) async fn replay(
    conn: &mut PgConnection,
    vault: &store::keys::Vault,
    account: Uuid,
    until: Until,
) -> Result<Option<AccountSnapshot>, store::Error> {
    let mut events = store::log::account_history(conn, vault, account, until);
    let mut snapshot = None;
    let mut erased = false;
    while let Some(stored) = events.try_next().await? {
        erased |= stored.body == Opened::Erased;
        snapshot = step(snapshot, &stored).0;
    }
    Ok(if erased {
        snapshot.map(AccountSnapshot::erased)
    } else {
        snapshot
    })
}

/// One fold step ([`domain::step`], as every fold of the log); also says whether the event was
/// folded.
fn step(
    snapshot: Option<AccountSnapshot>,
    stored: &store::log::StoredEvent,
) -> (Option<AccountSnapshot>, bool) {
    match domain::step(snapshot.clone(), stored.raw()) {
        Ok(next) => (next, true),
        Err(_) => (snapshot, false),
    }
}

/// An event as the API shows it; `payload` is the body exactly as received.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct EventView {
    position: i64,
    event: String,
    account_id: Option<Uuid>,
    user_id: Option<Uuid>,
    received_at: DateTime<Utc>,
    /// How many times Argyle delivered this exact body (1 + redeliveries).
    #[schema(minimum = 1)]
    deliveries: i64,
    /// The account's personal data was erased: `payload` is null for good.
    erased: bool,
    /// The webhook body exactly as received; null when erased or unreadable.
    #[schema(value_type = Option<Object>)]
    payload: Option<Box<RawValue>>,
    /// Why the stored body cannot be read (it was altered in the table); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    unreadable: Option<String>,
}

impl TryFrom<EventRecord> for EventView {
    type Error = Problem;

    fn try_from(record: EventRecord) -> Result<Self, Problem> {
        let (payload, erased, unreadable) = match record.body {
            // Ingest stored only bodies that parsed as JSON, so this holds unless the row was forged.
            Opened::Plain(body) => {
                let payload = String::from_utf8(body)
                    .ok()
                    .and_then(|body| RawValue::from_string(body).ok())
                    .ok_or_else(|| {
                        tracing::error!(position = record.position, "stored body is not JSON");
                        Problem::internal()
                    })?;
                (Some(payload), false, None)
            }
            Opened::Erased => (None, true, None),
            Opened::Unreadable(reason) => {
                tracing::error!(position = record.position, %reason, "a stored body cannot be read");
                (None, false, Some(reason))
            }
        };
        Ok(Self {
            position: record.position,
            event: record.event,
            account_id: record.account_id,
            user_id: record.user_id,
            received_at: record.received_at,
            deliveries: record.deliveries,
            erased,
            payload,
            unreadable,
        })
    }
}

/// One page of the log; pass `next_after` as `after` for the next page (null on the last).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct EventPage {
    events: Vec<EventView>,
    next_after: Option<i64>,
}

/// Rows were fetched one more than `limit`: that extra row says whether another page exists. Keeps
/// `limit` rows and returns the cursor of the next page (`None` on the last one).
fn cut_page<T>(
    mut rows: Vec<T>,
    limit: i64,
    position: impl Fn(&T) -> i64,
) -> (Vec<T>, Option<i64>) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_after = if more {
        rows.last().map(&position)
    } else {
        None
    };
    (rows, next_after)
}

/// A page of events ends once its bodies pass this many bytes (the event that passes it included),
/// so one page holds at most this plus one body, whatever `limit` asks.
pub(crate) const PAGE_BODY_BYTES: usize = 8 << 20;

async fn page(
    state: &ApiState,
    account: Option<Uuid>,
    query: Option<&str>,
) -> Result<Json<EventPage>, Problem> {
    let (after, limit) = Params::parse(query)?.page()?;
    let mut conn = state.db.acquire().await?;
    // Only settled positions, so a follower of `next_after` never skips an event that commits
    // late at a lower position (the store crate's docs).
    let up_to = store::log::horizon(&mut conn).await?;
    let mut records = Vec::new();
    let mut bytes = 0usize;
    let mut cut_short = false;
    {
        // Streamed, so the rows past the byte bound are never fetched into memory.
        let mut rows = store::log::page(&mut conn, &state.vault, account, after, up_to, limit + 1);
        while let Some(record) = rows.try_next().await? {
            if bytes >= PAGE_BODY_BYTES {
                cut_short = true;
                break;
            }
            if let Opened::Plain(body) = &record.body {
                bytes += body.len();
            }
            records.push(record);
        }
    }
    conn.release();
    let (records, next_after) = if cut_short {
        let next = records.last().map(|r| r.position);
        (records, next)
    } else {
        cut_page(records, limit, |r| r.position)
    };
    let events = records
        .into_iter()
        .map(EventView::try_from)
        .collect::<Result<_, _>>()?;
    Ok(Json(EventPage { events, next_after }))
}

/// One account's events in log order, redeliveries counted but not repeated.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/events",
    tag = "audit",
    params(("account_id" = Uuid, Path, description = "Argyle account id", example = "0187c66e-e7e5-811c-b006-2232f00f426a"), PageParams),
    responses(
        (status = 200, description = "A page of the account's events", body = EventPage),
        (status = 400, description = "`invalid_id`: not a UUID; `invalid_query`: bad `after` / `limit`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn account_events(
    State(state): State<Arc<ApiState>>,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<EventPage>, Problem> {
    let account = parse_id(&raw, "account_id")?;
    page(&state, Some(account), query.as_deref()).await
}

/// The whole log in order.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "audit",
    params(PageParams),
    responses(
        (status = 200, description = "A page of the log", body = EventPage),
        (status = 400, description = "`invalid_query`: bad `after` / `limit`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn all_events(
    State(state): State<Arc<ApiState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<EventPage>, Problem> {
    page(&state, None, query.as_deref()).await
}

/// An event that changed the account's resource.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Change {
    position: i64,
    event: String,
    received_at: DateTime<Utc>,
    /// RFC 6902 operations turning the previous resource into this event's; null once the
    /// account is erased.
    #[schema(value_type = Option<Vec<Object>>)]
    patch: Option<json_patch::Patch>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Changes {
    changes: Vec<Change>,
    /// Pass as `after` for the next page; null on the last.
    next_after: Option<i64>,
}

/// Field-level history: one entry per event that changed the resource, as an RFC 6902 patch,
/// paged like the events (`after` a position, `limit` entries).
#[utoipa::path(
    get,
    path = "/v1/accounts/{account_id}/changes",
    tag = "audit",
    params(("account_id" = Uuid, Path, description = "Argyle account id", example = "0187c66e-e7e5-811c-b006-2232f00f426a"), PageParams),
    responses(
        (status = 200, description = "A page of the account's resource changes in log order", body = Changes),
        (status = 400, description = "`invalid_id`: not a UUID; `invalid_query`: bad `after` / `limit`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn account_changes(
    State(state): State<Arc<ApiState>>,
    Path(raw): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Changes>, Problem> {
    let account = parse_id(&raw, "account_id")?;
    let (after, limit) = Params::parse(query.as_deref())?.page()?;
    let mut conn = state.db.acquire().await?;
    // Only settled positions: a follower of `next_after` never skips a change that commits late
    // at a lower position (the store crate's docs).
    let settled = Until {
        position: Some(store::log::horizon(&mut conn).await?),
        received_at: None,
    };
    if let Some(erasure) = store::keys::erased_at(&mut conn, account).await? {
        let changes = erased_changes(
            &mut conn,
            &state.vault,
            account,
            erasure,
            settled,
            after,
            limit,
        )
        .await?;
        conn.release();
        return Ok(Json(changes));
    }
    // The fold streams from the account's first event (the resource before `after` is needed for
    // the first patch), holding one snapshot; only this page's patches are built.
    let mut events = store::log::account_history(&mut conn, &state.vault, account, settled);
    let mut snapshot: Option<AccountSnapshot> = None;
    let mut changes = vec![];
    let mut next_after = None;
    while let Some(stored) = events.try_next().await? {
        let before = snapshot.as_ref().and_then(|s| s.resource.clone());
        let (next, folded) = step(snapshot, &stored);
        snapshot = next;
        let after_resource = snapshot.as_ref().and_then(|s| s.resource.as_ref());
        let changed = folded && domain::resource_changed(before.as_ref(), after_resource);
        if !changed || stored.position <= after {
            continue;
        }
        if changes.len() as i64 == limit {
            next_after = changes.last().map(|c: &Change| c.position);
            break;
        }
        let before = before.map(|r| r.value()).unwrap_or_default();
        let after_value = after_resource.map(|r| r.value()).unwrap_or_default();
        changes.push(Change {
            position: stored.position,
            event: stored.event.clone(),
            received_at: stored.received_at,
            patch: Some(json_patch::diff(&before, &after_value)),
        });
    }
    drop(events);
    conn.release();
    Ok(Json(Changes {
        changes,
        next_after,
    }))
}

/// The changes of an erased account: the events its erasure recorded as having changed the
/// resource (`erasure.changed_positions` of the erasure event at `erasure`), with no patch.
async fn erased_changes(
    conn: &mut PgConnection,
    vault: &store::keys::Vault,
    account: Uuid,
    erasure: i64,
    settled: Until,
    after: i64,
    limit: i64,
) -> Result<Changes, Problem> {
    #[derive(serde::Deserialize)]
    struct Body {
        erasure: Facts,
    }
    #[derive(serde::Deserialize)]
    struct Facts {
        changed_positions: Vec<i64>,
    }
    let record: Option<EventRecord> =
        store::log::page(conn, vault, Some(account), erasure - 1, i64::MAX, 1)
            .try_next()
            .await?;
    let changed: std::collections::BTreeSet<i64> = match record.map(|r| r.body) {
        Some(Opened::Plain(body)) => serde_json::from_slice::<Body>(&body)
            .map(|b| b.erasure.changed_positions.into_iter().collect())
            .unwrap_or_default(),
        _ => Default::default(),
    };
    let mut changes = vec![];
    let mut next_after = None;
    let mut events = store::log::account_history(conn, vault, account, settled);
    while let Some(stored) = events.try_next().await? {
        if stored.position <= after || !changed.contains(&stored.position) {
            continue;
        }
        if changes.len() as i64 == limit {
            next_after = changes.last().map(|c: &Change| c.position);
            break;
        }
        changes.push(Change {
            position: stored.position,
            event: stored.event,
            received_at: stored.received_at,
            patch: None,
        });
    }
    Ok(Changes {
        changes,
        next_after,
    })
}

/// An event the fold refused, with the reason.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct QuarantinedView {
    position: i64,
    event: String,
    account_id: Option<Uuid>,
    /// Why; null once the account is erased (the reason was sealed with its key).
    error: Option<String>,
    quarantined_at: DateTime<Utc>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct QuarantinePage {
    events: Vec<QuarantinedView>,
    next_after: Option<i64>,
}

/// Events the fold refused, in log order, with the reason.
#[utoipa::path(
    get,
    path = "/v1/quarantine",
    tag = "audit",
    params(PageParams),
    responses(
        (status = 200, description = "A page of quarantined events", body = QuarantinePage),
        (status = 400, description = "`invalid_query`: bad `after` / `limit`",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn quarantine(
    State(state): State<Arc<ApiState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<QuarantinePage>, Problem> {
    let (after, limit) = Params::parse(query.as_deref())?.page()?;
    let mut conn = state.db.acquire().await?;
    let rows = store::quarantine::page(&mut conn, &state.vault, after, limit + 1).await?;
    conn.release();
    let (rows, next_after) = cut_page(rows, limit, |r| r.position);
    let events = rows
        .into_iter()
        .map(|r| QuarantinedView {
            position: r.position,
            event: r.event,
            account_id: r.account_id,
            error: r.error,
            quarantined_at: r.quarantined_at,
        })
        .collect();
    Ok(Json(QuarantinePage { events, next_after }))
}
