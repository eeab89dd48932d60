//! Reconcile with Argyle: page through `GET /v2/accounts` and append, for every listed account the
//! log lacks or holds an older version of, an [`ACCOUNT_FETCHED`] event carrying Argyle's object
//! byte for byte (`fetched.reason = "reconcile"`). The projector folds it under the usual
//! newer-`updated_at` rule, so a webhook that arrives meanwhile is never overwritten by an older
//! listing. This is the backfill of a new installation and the repair after lost webhooks.
//!
//! # Guarantees
//! - **Idempotent.** A listed account is compared with what the *log* holds, not only the
//!   snapshots: the snapshot with every event after the projection's checkpoint folded onto it
//!   ([`store::reconcile::known`], then [`domain::step`]). A second run appends nothing, also when
//!   the projector has not yet folded what the first appended.
//! - **Resumable.** Each page commits in one transaction: its appends, the accounts it listed, and
//!   the run's cursor (Argyle's `next`) and counts. A run that was stopped is resumed by the next
//!   one (same API and scope, progress within [`ReconcileConfig::resume_within`]) from the page
//!   after its last committed one; what it had finished is not listed or appended again.
//! - **Streaming.** One page is in memory at a time; the accounts listed so far are rows of
//!   `reconcile_listed`, so finding the ones Argyle no longer lists needs no set in memory.
//! - **Paced.** At most [`ReconcileConfig::rate`] requests per second; 429 and 5xx are retried by
//!   the client, honouring `Retry-After`.
//! - **Nothing removed silently.** Accounts held as active that Argyle does not list are
//!   reported. With [`Request::confirm_removals`] each is fetched alone, and only a 404 appends an
//!   [`ACCOUNT_GONE`] event (folded as a removal). If more than
//!   [`ReconcileConfig::max_missing_share`] of the accounts held are missing — a key or URL of
//!   another environment looks exactly like that — removals are refused unless forced.
//!
//! One run at a time: a run holds [`Lock::Reconcile`] on its session.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use argyle::{ListedAccount, Url};
use chrono::{DateTime, SecondsFormat, Utc};
use domain::{ACCOUNT_FETCHED, ACCOUNT_GONE, AccountSnapshot, AccountStatus, Envelope, Resource};
use serde::Serialize;
use serde_json::value::RawValue;
use store::PgConnection;
use store::keys::Vault;
use store::locks::{self, Lock};
use store::log::Delivery;
use store::reconcile::{self as runs, Counts, Known, Outcome, Run, Scope};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Runs [`run`] every `config.reconcile_interval` (never if `None`) until `shutdown`, as the
/// enricher's leader. A run that was stopped (a restart) is resumed at once; after a failure the
/// schedule tries again after [`RETRY_AFTER_FAILURE`] (or the interval, if shorter), resuming
/// the run if Argyle's trouble was transient; the first run starts at once when none ever ran. Argyle's errors are
/// logged and retried; a database error ends this, and the leadership with it.
pub async fn on_schedule(
    pool: &store::PgPool,
    vault: &Vault,
    client: &argyle::Client,
    config: &crate::EnricherConfig,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    let Some(every) = config.reconcile_interval else {
        shutdown.cancelled().await;
        return Ok(());
    };
    tracing::info!(every = ?every, rate = config.reconcile.rate, "reconciling with Argyle on schedule");
    let client = client.clone().with_retry(RETRY);
    loop {
        let retry = RETRY_AFTER_FAILURE.min(every);
        let latest = {
            let mut conn = store::acquire(pool).await?;
            runs::latest(&mut conn, true).await?
        };
        let due = match &latest {
            None => Utc::now(),
            // Stopped (a restart, or Argyle failing for a while): resume it.
            Some(run) if run.state == "running" => Utc::now(),
            Some(run) if run.state == "failed" => run.finished_at.unwrap_or(run.updated_at) + retry,
            Some(run) => run.started_at + every,
        };
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        metrics::gauge!("reconcile_next_run_seconds").set(wait.as_secs_f64());
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
        let request = Request {
            started_by: "schedule",
            ..Request::default()
        };
        // A session of its own, closed after the run: its lock must not outlive the run in a pool.
        let mut conn = store::acquire(pool).await?.detach();
        // A long run's queries (the missing accounts of a large base) are not request queries.
        store::set_statement_timeout(&mut conn, Duration::ZERO).await?;
        let outcome = run(
            &mut conn,
            vault,
            &client,
            &config.reconcile,
            request,
            &Progress,
            shutdown,
        )
        .await;
        store::close(conn).await?;
        match outcome {
            Ok(_) => continue,
            Err(Error::Busy(holder)) => {
                tracing::info!(%holder, "a reconcile is already running; the schedule waits for it");
            }
            Err(error) => {
                tracing::error!(%error, retry_in = ?retry, "scheduled reconcile failed; it is tried again later");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(retry) => {}
        }
    }
}

/// A reconcile's patience with Argyle: a page is worth waiting for (429 and 5xx, honouring
/// `Retry-After` up to two minutes), since a run that gives up resumes only later.
pub const RETRY: argyle::Retry = argyle::Retry {
    attempts: 8,
    first_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(120),
};

/// How long the schedule waits before resuming a run that failed or was stopped.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(300);

/// Logs a scheduled run's progress, a line per 10 pages.
struct Progress;
impl Observer for Progress {
    fn page(&self, pages: i32, counts: &Counts) {
        if pages % 10 == 0 {
            tracing::info!(
                pages,
                listed = counts.listed,
                new = counts.new,
                newer_at_argyle = counts.newer_at_argyle,
                "reconcile progress"
            );
        }
    }
}

/// How reconcile paces and guards itself.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Requests per second to Argyle, at most (pages, and the fetches that confirm a removal).
    pub rate: f64,
    /// Removals are refused when more than this share of the accounts held as active is missing
    /// at Argyle, unless forced.
    pub max_missing_share: f64,
    /// A stopped run is resumed if it made progress this recently; older ones start over.
    pub resume_within: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            rate: 2.0,
            max_missing_share: 0.10,
            resume_within: Duration::from_secs(24 * 3600),
        }
    }
}

/// One reconcile asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request {
    pub scope: Scope,
    /// Compare and report; append nothing.
    pub dry_run: bool,
    /// Fetch each missing account alone and record a removal for each Argyle answers 404 for.
    pub confirm_removals: bool,
    /// Confirm removals even when the missing share is above the guard's.
    pub force: bool,
    /// `cli` or `schedule`, recorded with the run.
    pub started_by: &'static str,
}

/// Told as the run goes.
pub trait Observer: Send + Sync {
    /// A page was compared (and, unless a dry run, committed); `counts` are the run's so far.
    fn page(&self, _pages: i32, _counts: &Counts) {}
    /// An account held as active that Argyle does not list.
    fn missing(&self, _account: Uuid, _user: Uuid) {}
    /// A removal was confirmed by a 404 and appended (or would be, in a dry run).
    fn removed(&self, _account: Uuid) {}
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub run_id: i64,
    /// It went on from a stopped run (from page `pages_before + 1`).
    pub resumed_from_page: Option<i32>,
    pub dry_run: bool,
    pub pages: i32,
    pub counts: Counts,
    /// Accounts held as active (in scope, when the run started).
    pub held_active: i64,
    /// Held as active and not listed by Argyle.
    pub missing: i64,
    /// Removals confirmed (appended, or in a dry run: that would be checked).
    pub removals: i64,
    /// The missing share was above the guard's, and removals were asked for without `force`.
    pub refused: bool,
    /// Shutdown came first; the run stays resumable.
    pub interrupted: bool,
}

impl Report {
    /// `missing / held_active` (0 when nothing is held).
    pub fn missing_share(&self) -> f64 {
        if self.held_active == 0 {
            0.0
        } else {
            self.missing as f64 / self.held_active as f64
        }
    }
}

/// Why a run could not be done, as one sentence.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("another reconcile is running ({0}); wait for it to finish")]
    Busy(String),
    #[error(
        "the last reconcile listed {previous} and this one would list {now}: if this is the \
         environment whose webhooks this service receives, pass --force"
    )]
    OtherEnvironment { previous: String, now: String },
    #[error(transparent)]
    Argyle(#[from] argyle::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// How one listed account compares with what the log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// Unknown here: append.
    New,
    /// Argyle's `updated_at` is newer (or ours has none): append.
    NewerAtArgyle,
    Unchanged,
    NewerHere,
    /// Removed here; removal is terminal.
    RemovedHere,
    /// Argyle's object cannot be compared or folded (its `updated_at` is not an instant the
    /// store holds): reported, not appended, so that no run appends it again and again.
    Unreadable,
}

impl Comparison {
    fn appends(self) -> bool {
        matches!(self, Self::New | Self::NewerAtArgyle)
    }

    fn count(self, counts: &mut Counts) {
        counts.listed += 1;
        match self {
            Self::New => counts.new += 1,
            Self::NewerAtArgyle => counts.newer_at_argyle += 1,
            Self::Unchanged => counts.unchanged += 1,
            Self::NewerHere => counts.newer_here += 1,
            Self::RemovedHere => counts.removed_here += 1,
            Self::Unreadable => counts.unreadable += 1,
        }
    }
}

/// Compares Argyle's object with the account as the log holds it (`None`: no event of it folds).
/// Appending is asked for exactly when the fold would take Argyle's object, so that once it is
/// in the log the same listing compares as unchanged.
pub fn compare(listed: &Resource, known: Option<&AccountSnapshot>) -> Comparison {
    if !listed.is_object() || listed.updated_at_mistyped() || listed.updated_at_out_of_range() {
        return Comparison::Unreadable;
    }
    let Some(known) = known else {
        return Comparison::New;
    };
    if known.status != AccountStatus::Active {
        return Comparison::RemovedHere;
    }
    let ours = known.resource.as_ref();
    match (listed.updated_at(), ours.and_then(Resource::updated_at)) {
        (Some(theirs), Some(ours)) if theirs > ours => Comparison::NewerAtArgyle,
        (Some(theirs), Some(ours)) if theirs < ours => Comparison::NewerHere,
        (Some(_), Some(_)) => Comparison::Unchanged,
        // Ours has no instant to compare with: the fold takes theirs, and then it has one.
        (Some(_), None) => Comparison::NewerAtArgyle,
        // Theirs has none: the fold would take it every time, so only where we have nothing.
        (None, _) if ours.is_none() => Comparison::NewerAtArgyle,
        (None, _) if ours == Some(listed) => Comparison::Unchanged,
        (None, _) => Comparison::Unreadable,
    }
}

/// Runs one reconcile on `conn` (which holds [`Lock::Reconcile`] for the run's duration).
pub async fn run(
    conn: &mut PgConnection,
    vault: &Vault,
    client: &argyle::Client,
    config: &ReconcileConfig,
    request: Request,
    observer: &dyn Observer,
    shutdown: &CancellationToken,
) -> Result<Report, Error> {
    if !locks::try_lock(conn, Lock::Reconcile).await? {
        let holder = locks::holder(conn, Lock::Reconcile)
            .await?
            .map(|(name, _, pid)| format!("{name}, backend pid {pid}"))
            .unwrap_or_else(|| "it just ended".into());
        return Err(Error::Busy(holder));
    }
    let result = run_locked(conn, vault, client, config, request, observer, shutdown).await;
    // The session may be gone with the error; its lock is then gone too.
    let _ = locks::unlock(conn, Lock::Reconcile).await;
    result
}

async fn run_locked(
    conn: &mut PgConnection,
    vault: &Vault,
    client: &argyle::Client,
    config: &ReconcileConfig,
    request: Request,
    observer: &dyn Observer,
    shutdown: &CancellationToken,
) -> Result<Report, Error> {
    let api_url = client.base_url().to_owned();
    let resumed = if request.dry_run {
        None
    } else {
        runs::resumable(conn, &api_url, request.scope, config.resume_within).await?
    };
    if !request.dry_run {
        // Stopped runs not resumed now never will be (a dry run leaves them be).
        runs::abandon_others(
            conn,
            resumed.as_ref().map(|r| r.id),
            &api_url,
            request.scope,
            config.resume_within,
        )
        .await?;
    }
    let run = match resumed {
        Some(run) => {
            tracing::info!(
                run = run.id,
                pages_done = run.pages,
                listed = run.counts.listed,
                "resuming a reconcile that was stopped"
            );
            run
        }
        None => {
            runs::start(
                conn,
                &api_url,
                request.scope,
                request.dry_run,
                request.started_by,
            )
            .await?
        }
    };
    // A wrong URL must not pass for accounts that do not exist (a 404 would confirm removals).
    if let Err(error) = client.check().await {
        return Err(failed(conn, &run, request, error.into()).await);
    }
    // Another environment's key and URL would append that environment's accounts for good.
    if let Some(previous) = runs::last_finished_api_url(conn).await?
        && previous != api_url
        && !request.force
        && !request.dry_run
    {
        let outcome = Outcome {
            state: "refused",
            error: Some(format!("ARGYLE_API_URL changed from {previous}")),
            ..Outcome::default()
        };
        runs::finish(conn, run.id, &outcome).await?;
        return Err(Error::OtherEnvironment {
            previous,
            now: api_url,
        });
    }
    let resumed_from_page = (run.pages > 0 || run.listing_done).then_some(run.pages);
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate.max(0.001)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = Report {
        run_id: run.id,
        resumed_from_page,
        dry_run: request.dry_run,
        pages: run.pages,
        counts: run.counts,
        held_active: 0,
        missing: 0,
        removals: run.removals,
        refused: false,
        interrupted: false,
    };
    let listed = list(
        conn,
        vault,
        client,
        &run,
        request,
        &mut pace,
        observer,
        shutdown,
        &mut report,
    )
    .await;
    match listed {
        Ok(true) => {}
        Ok(false) => {
            report.interrupted = true;
            tracing::info!(
                run = run.id,
                pages = report.pages,
                "reconcile stopped; the next run resumes it"
            );
            if request.dry_run {
                runs::finish(
                    conn,
                    run.id,
                    &Outcome {
                        state: "abandoned",
                        ..Outcome::default()
                    },
                )
                .await?;
            }
            return Ok(report);
        }
        Err(error) => return Err(failed(conn, &run, request, error).await),
    }
    report.held_active = runs::held_active(conn, request.scope, run.started_at).await?;
    report.missing = report_missing(conn, vault, &run, request.scope, observer).await?;
    let over_guard = report.missing > 0 && report.missing_share() > config.max_missing_share;
    if report.missing > 0 && over_guard {
        tracing::warn!(
            missing = report.missing,
            held_active = report.held_active,
            "{:.0}% of the accounts held as active are not listed by Argyle at {}: if the API key \
             or ARGYLE_API_URL belong to another environment than the webhooks, fix them; nothing \
             is removed unless asked for, and then only with --force",
            report.missing_share() * 100.0,
            client.base_url()
        );
    }
    if request.confirm_removals && report.missing > 0 {
        if over_guard && !request.force {
            report.refused = true;
        } else if request.dry_run {
            report.removals = report.missing;
        } else {
            match confirm_removals(
                conn,
                vault,
                client,
                &run,
                request.scope,
                &mut pace,
                observer,
                shutdown,
                &mut report,
            )
            .await
            {
                Ok(true) => {}
                Ok(false) => {
                    report.interrupted = true;
                    return Ok(report);
                }
                Err(error) => return Err(failed(conn, &run, request, error).await),
            }
        }
    }
    let outcome = Outcome {
        state: if report.refused {
            "refused"
        } else {
            "finished"
        },
        missing: Some(report.missing),
        held_active: Some(report.held_active),
        removals: report.removals,
        error: None,
    };
    runs::finish(conn, run.id, &outcome).await?;
    record_metrics(&report, outcome.state);
    tracing::info!(
        run = run.id,
        dry_run = request.dry_run,
        pages = report.pages,
        listed = report.counts.listed,
        new = report.counts.new,
        newer_at_argyle = report.counts.newer_at_argyle,
        unchanged = report.counts.unchanged,
        newer_here = report.counts.newer_here,
        removed_here = report.counts.removed_here,
        unreadable = report.counts.unreadable,
        missing_at_argyle = report.missing,
        removals = report.removals,
        outcome = outcome.state,
        "reconcile finished"
    );
    Ok(report)
}

/// Records a run that failed, and returns its error. Argyle's transient trouble (429, 5xx,
/// unreachable) leaves it `running`, so the next run resumes after its last committed page;
/// anything else (a refused key, a cursor Argyle no longer takes, an answer that is not a page)
/// would meet the same error again, so the run is `failed` and the next one starts over,
/// appending nothing twice since it compares with the log.
async fn failed(conn: &mut PgConnection, run: &Run, request: Request, error: Error) -> Error {
    metrics::counter!("reconcile_runs_total", "outcome" => "failed").increment(1);
    let text = error.to_string();
    let transient = matches!(&error, Error::Argyle(e) if e.is_transient());
    let recorded = if transient && !request.dry_run {
        runs::note_error(conn, run.id, &text).await
    } else {
        let outcome = Outcome {
            state: "failed",
            error: Some(text),
            ..Outcome::default()
        };
        runs::finish(conn, run.id, &outcome).await
    };
    if let Err(store_error) = recorded {
        tracing::warn!(%store_error, "could not record the failed reconcile");
    }
    error
}

fn record_metrics(report: &Report, outcome: &'static str) {
    metrics::counter!("reconcile_runs_total", "outcome" => outcome).increment(1);
    if report.dry_run {
        return;
    }
    let c = &report.counts;
    for (kind, n) in [
        ("new", c.new),
        ("newer_at_argyle", c.newer_at_argyle),
        ("newer_here", c.newer_here),
        ("removed_here", c.removed_here),
        ("unreadable", c.unreadable),
        ("missing_at_argyle", report.missing),
    ] {
        metrics::counter!("reconcile_drift_total", "kind" => kind).increment(n.max(0) as u64);
    }
}

/// Lists every page from where the run stands. True when the listing is complete, false when
/// shutdown came first.
#[allow(clippy::too_many_arguments)]
async fn list(
    conn: &mut PgConnection,
    vault: &Vault,
    client: &argyle::Client,
    run: &Run,
    request: Request,
    pace: &mut tokio::time::Interval,
    observer: &dyn Observer,
    shutdown: &CancellationToken,
    report: &mut Report,
) -> Result<bool, Error> {
    if run.listing_done {
        return Ok(true);
    }
    if let Some(account) = request.scope.account {
        return list_one(
            conn, vault, client, run, request, account, pace, observer, shutdown, report,
        )
        .await;
    }
    let mut url = match &run.next_url {
        Some(stored) => client.page_url(stored)?,
        None => client.accounts_url(request.scope.user),
    };
    // Pages that loop back are an error, not an endless run; hashes keep this small.
    let mut seen = HashSet::new();
    loop {
        if !seen.insert(hash_of(url.as_str())) {
            return Err(argyle::Error::UnexpectedAnswer {
                what: "GET /accounts".into(),
                reason: format!("its pages loop back to {url}"),
            }
            .into());
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            _ = pace.tick() => {}
        }
        let page = tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            page = client.list_accounts_page(&url) => page?,
        };
        for reason in &page.unreadable {
            tracing::warn!(page = %url, %reason, "Argyle listed an entry that is not an account; skipped");
        }
        let at = Utc::now();
        let request_line = format!("GET {}", path_and_query(&url));
        let unreadable = Counts {
            listed: page.unreadable.len() as i64,
            unreadable: page.unreadable.len() as i64,
            ..Counts::default()
        };
        let counts = commit_page(
            conn,
            vault,
            run,
            request.dry_run,
            page.accounts,
            &request_line,
            at,
            Some(page.next.as_ref().map(Url::as_str)),
            unreadable,
        )
        .await?;
        report.pages += 1;
        report.counts += counts;
        observer.page(report.pages, &report.counts);
        match page.next {
            None => return Ok(true),
            Some(next) => url = next,
        }
    }
}

/// `--account`: `GET /v2/accounts/{id}` alone stands for the listing.
#[allow(clippy::too_many_arguments)]
async fn list_one(
    conn: &mut PgConnection,
    vault: &Vault,
    client: &argyle::Client,
    run: &Run,
    request: Request,
    account: Uuid,
    pace: &mut tokio::time::Interval,
    observer: &dyn Observer,
    shutdown: &CancellationToken,
    report: &mut Report,
) -> Result<bool, Error> {
    tokio::select! {
        () = shutdown.cancelled() => return Ok(false),
        _ = pace.tick() => {}
    }
    let object = tokio::select! {
        () = shutdown.cancelled() => return Ok(false),
        object = client.get_account(account) => object?,
    };
    let mut accounts = vec![];
    let mut unreadable = Counts::default();
    if let Some(object) = object {
        match listed_account(object) {
            Some(listed) if listed.id == account => accounts.push(listed),
            _ => {
                tracing::warn!(%account, "Argyle's answer is not this account with a UUID user");
                unreadable.listed += 1;
                unreadable.unreadable += 1;
            }
        }
    }
    let request_line = format!("GET /v2/accounts/{account}");
    let counts = commit_page(
        conn,
        vault,
        run,
        request.dry_run,
        accounts,
        &request_line,
        Utc::now(),
        Some(None),
        unreadable,
    )
    .await?;
    report.pages += 1;
    report.counts += counts;
    observer.page(report.pages, &report.counts);
    Ok(true)
}

fn listed_account(object: Box<RawValue>) -> Option<ListedAccount> {
    #[derive(serde::Deserialize)]
    struct Ids {
        id: Uuid,
        user: Uuid,
    }
    let ids: Ids = serde_json::from_str(object.get()).ok()?;
    Some(ListedAccount {
        id: ids.id,
        user: ids.user,
        object,
    })
}

/// Compares one page's accounts with the log and, in one transaction, appends what the log lacks,
/// marks them listed and records the page (with `next`, where the listing goes on).
#[allow(clippy::too_many_arguments)]
async fn commit_page(
    conn: &mut PgConnection,
    vault: &Vault,
    run: &Run,
    dry_run: bool,
    accounts: Vec<ListedAccount>,
    request_line: &str,
    at: DateTime<Utc>,
    next: Option<Option<&str>>,
    extra: Counts,
) -> Result<Counts, Error> {
    // A page that lists an account twice: the newest object counts.
    let mut by_id: HashMap<Uuid, (ListedAccount, Resource)> =
        HashMap::with_capacity(accounts.len());
    let mut order = Vec::with_capacity(accounts.len());
    for account in accounts {
        let resource = Resource::from_raw(&account.object);
        match by_id.get(&account.id) {
            Some((_, kept)) if kept.updated_at() >= resource.updated_at() => {}
            Some(_) => {
                by_id.insert(account.id, (account, resource));
            }
            None => {
                order.push(account.id);
                by_id.insert(account.id, (account, resource));
            }
        }
    }
    let known = folded(conn, vault, &order).await?;
    let mut tx = store::begin(conn).await?;
    let first_time: HashSet<Uuid> = runs::mark_listed(&mut tx, run.id, &order)
        .await?
        .into_iter()
        .collect();
    // What the caller counted already (entries of the page that are not accounts).
    let mut counts = extra;
    let mut deliveries = vec![];
    for id in &order {
        if !first_time.contains(id) {
            // An earlier page of this run listed it already.
            continue;
        }
        let (account, resource) = &by_id[id];
        let mut comparison = compare(resource, known.get(id).and_then(Option::as_ref));
        if comparison.appends() && !dry_run {
            let body = fetched_body(account, request_line, at, run.id);
            match Envelope::parse(&body) {
                Ok(envelope) => deliveries.push(Delivery::new(&body, None, &envelope)),
                Err(error) => {
                    tracing::warn!(account = %id, %error, "Argyle's account is not a storable resource");
                    comparison = Comparison::Unreadable;
                }
            }
        }
        comparison.count(&mut counts);
    }
    if !deliveries.is_empty() {
        // The body carries the fetch time and run, so no two are the same event.
        store::log::append_fetched_in(&mut tx, vault, &deliveries, Duration::ZERO).await?;
    }
    runs::record(&mut tx, run.id, counts, next).await?;
    store::commit(tx).await?;
    if !deliveries.is_empty() {
        store::log::announce(conn).await?;
    }
    Ok(counts)
}

/// The accounts as the log holds them: each snapshot with every later event of it folded on
/// (`None`: no event of it folds).
async fn folded(
    conn: &mut PgConnection,
    vault: &Vault,
    accounts: &[Uuid],
) -> Result<HashMap<Uuid, Option<AccountSnapshot>>, Error> {
    let mut known: HashMap<Uuid, Option<AccountSnapshot>> = HashMap::with_capacity(accounts.len());
    runs::known(conn, vault, accounts, |item| match item {
        Known::Snapshot(snapshot) => {
            known.insert(snapshot.account_id, Some(snapshot));
        }
        Known::Event(event) => {
            let Some(account) = event.account_id else {
                return;
            };
            let slot = known.entry(account).or_insert(None);
            // The projector's own step: what it cannot fold it leaves out, and so do we.
            if let Ok(next) = domain::step(slot.clone(), event.raw()) {
                *slot = next;
            }
        }
    })
    .await?;
    Ok(known)
}

/// Of `candidates` (held as active by their snapshots), those the log still holds as active: a
/// removal the projector has not folded yet counts.
async fn still_active(
    conn: &mut PgConnection,
    vault: &Vault,
    candidates: Vec<(Uuid, Uuid)>,
) -> Result<Vec<(Uuid, Uuid)>, Error> {
    let ids: Vec<Uuid> = candidates.iter().map(|c| c.0).collect();
    let known = folded(conn, vault, &ids).await?;
    Ok(candidates
        .into_iter()
        .filter(|(id, _)| {
            known
                .get(id)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.status == AccountStatus::Active)
        })
        .collect())
}

/// How many missing accounts the log names one by one.
const LOGGED_MISSING: i64 = 100;

/// Reports (and counts) the accounts held as active, first seen before the run started, that the
/// run did not list.
async fn report_missing(
    conn: &mut PgConnection,
    vault: &Vault,
    run: &Run,
    scope: Scope,
    observer: &dyn Observer,
) -> Result<i64, Error> {
    let mut after = Uuid::nil();
    let mut missing = 0;
    loop {
        let page = runs::missing(conn, run.id, scope, run.started_at, after, 1000).await?;
        let Some(&(last, _)) = page.last() else {
            if missing > LOGGED_MISSING {
                tracing::warn!(
                    more = missing - LOGGED_MISSING,
                    "more accounts held as active are not listed by Argyle"
                );
            }
            return Ok(missing);
        };
        for &(account, user) in &still_active(conn, vault, page).await? {
            // Every id goes to the observer; the log names the first ones and counts the rest.
            if missing < LOGGED_MISSING {
                tracing::warn!(%account, %user, "held as active here, not listed by Argyle");
            }
            missing += 1;
            observer.missing(account, user);
        }
        after = last;
    }
}

/// Fetches each missing account alone; a 404 confirms the removal, appended as [`ACCOUNT_GONE`];
/// an account Argyle does have after all is compared and appended like a listed one. True when
/// done, false when shutdown came first.
#[allow(clippy::too_many_arguments)]
async fn confirm_removals(
    conn: &mut PgConnection,
    vault: &Vault,
    client: &argyle::Client,
    run: &Run,
    scope: Scope,
    pace: &mut tokio::time::Interval,
    observer: &dyn Observer,
    shutdown: &CancellationToken,
    report: &mut Report,
) -> Result<bool, Error> {
    let mut after = Uuid::nil();
    loop {
        let page = runs::missing(conn, run.id, scope, run.started_at, after, 100).await?;
        let Some(&(last, _)) = page.last() else {
            return Ok(true);
        };
        // A removal appended by an earlier (stopped or repeated) run but not folded yet counts.
        for (account, user) in still_active(conn, vault, page).await? {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(false),
                _ = pace.tick() => {}
            }
            let request_line = format!("GET /v2/accounts/{account}");
            let answer = tokio::select! {
                () = shutdown.cancelled() => return Ok(false),
                answer = client.get_account(account) => answer?,
            };
            match answer {
                Some(object) => {
                    tracing::info!(%account, "not listed, but Argyle has it: compared as listed");
                    if let Some(listed) = listed_account(object).filter(|l| l.id == account) {
                        let counts = commit_page(
                            conn,
                            vault,
                            run,
                            false,
                            vec![listed],
                            &request_line,
                            Utc::now(),
                            None,
                            Counts::default(),
                        )
                        .await?;
                        report.counts += counts;
                    }
                }
                None => {
                    let body = gone_body(account, user, &request_line, Utc::now(), run.id);
                    let envelope = Envelope::parse(&body).expect("the removal body is an envelope");
                    let mut tx = store::begin(conn).await?;
                    store::log::append_fetched_in(
                        &mut tx,
                        vault,
                        &[Delivery::new(&body, None, &envelope)],
                        Duration::ZERO,
                    )
                    .await?;
                    runs::add_removal(&mut tx, run.id).await?;
                    store::commit(tx).await?;
                    store::log::announce(conn).await?;
                    tracing::info!(%account, "Argyle answers 404: removal recorded");
                    report.removals += 1;
                    observer.removed(account);
                }
            }
        }
        after = last;
    }
}

#[derive(Serialize)]
struct Fetched<'a> {
    reason: &'static str,
    request: &'a str,
    status: u16,
    at: String,
    run: i64,
}

/// The event for one listed account: the webhook envelope's shape, so the fold reads it like any
/// other, with Argyle's object as `data.resource`, byte for byte.
fn fetched_body(account: &ListedAccount, request: &str, at: DateTime<Utc>, run: i64) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        event: &'static str,
        data: Data<'a>,
        fetched: Fetched<'a>,
    }
    #[derive(Serialize)]
    struct Data<'a> {
        account: Uuid,
        user: Uuid,
        resource: &'a RawValue,
    }
    serde_json::to_vec_pretty(&Body {
        event: ACCOUNT_FETCHED,
        data: Data {
            account: account.id,
            user: account.user,
            resource: &account.object,
        },
        fetched: Fetched {
            reason: "reconcile",
            request,
            status: 200,
            at: at.to_rfc3339_opts(SecondsFormat::Micros, true),
            run,
        },
    })
    .expect("the fetched event serialises")
}

/// The event of a removal confirmed by a 404.
fn gone_body(account: Uuid, user: Uuid, request: &str, at: DateTime<Utc>, run: i64) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        event: &'static str,
        data: Data,
        fetched: Fetched<'a>,
    }
    #[derive(Serialize)]
    struct Data {
        account: Uuid,
        user: Uuid,
    }
    serde_json::to_vec_pretty(&Body {
        event: ACCOUNT_GONE,
        data: Data { account, user },
        fetched: Fetched {
            reason: "reconcile",
            request,
            status: 404,
            at: at.to_rfc3339_opts(SecondsFormat::Micros, true),
            run,
        },
    })
    .expect("the removal event serialises")
}

fn path_and_query(url: &Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

fn hash_of(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{EventKind, LoggedEvent};

    fn resource(updated_at: &str) -> Resource {
        Resource::from_json(&format!(
            r#"{{"id":"00000000-0000-0000-0000-000000000001","updated_at":{updated_at},"connection":{{"status":"connected"}}}}"#
        ))
        .unwrap()
    }

    fn held(updated_at: Option<&str>, status: AccountStatus) -> AccountSnapshot {
        let body = match updated_at {
            Some(t) => format!(
                r#"{{"event":"accounts.updated","data":{{"account":"00000000-0000-0000-0000-000000000001","user":"00000000-0000-0000-0000-000000000002","resource":{{"updated_at":{t}}}}}}}"#
            ),
            None => r#"{"event":"accounts.updated","data":{"account":"00000000-0000-0000-0000-000000000001","user":"00000000-0000-0000-0000-000000000002"}}"#.into(),
        };
        let event = LoggedEvent {
            position: 1,
            received_at: Utc::now(),
            envelope: Envelope::parse(body.as_bytes()).unwrap(),
        };
        let mut snapshot = domain::apply(None, &event).unwrap().unwrap();
        snapshot.status = status;
        snapshot
    }

    #[test]
    fn a_listed_account_appends_exactly_when_the_fold_would_take_it() {
        let t1 = r#""2026-03-01T10:00:00Z""#;
        let t2 = r#""2026-03-01T11:00:00+01:00""#; // the same instant as t1
        let t3 = r#""2026-03-02T10:00:00Z""#;
        let cases = [
            (resource(t1), None, Comparison::New),
            (
                resource(t3),
                Some(held(Some(t1), AccountStatus::Active)),
                Comparison::NewerAtArgyle,
            ),
            (
                resource(t1),
                Some(held(Some(t3), AccountStatus::Active)),
                Comparison::NewerHere,
            ),
            (
                resource(t2),
                Some(held(Some(t1), AccountStatus::Active)),
                Comparison::Unchanged,
            ),
            (
                resource(t3),
                Some(held(Some(t1), AccountStatus::Removed)),
                Comparison::RemovedHere,
            ),
            (
                resource(t1),
                Some(held(None, AccountStatus::Active)),
                Comparison::NewerAtArgyle,
            ),
            (
                resource(t1),
                Some(held(Some(r#""not a time""#), AccountStatus::Active)),
                Comparison::NewerAtArgyle,
            ),
            (resource("null"), None, Comparison::New),
            (
                resource("null"),
                Some(held(None, AccountStatus::Active)),
                Comparison::NewerAtArgyle,
            ),
            (
                resource("null"),
                Some(held(Some(t1), AccountStatus::Active)),
                Comparison::Unreadable,
            ),
            (resource("12"), None, Comparison::Unreadable),
            (
                resource(r#""10000-01-01T00:00:00Z""#),
                None,
                Comparison::New,
            ),
            (
                resource(r#""0000-01-01T00:00:00Z""#),
                None,
                Comparison::Unreadable,
            ),
        ];
        let mut ran = 0;
        for (listed, known, expected) in &cases {
            assert_eq!(
                compare(listed, known.as_ref()),
                *expected,
                "{}",
                listed.raw()
            );
            // What is appended, folded, compares as unchanged (idempotence), unless removed.
            if expected.appends() {
                let body = fetched_body(
                    &ListedAccount {
                        id: Uuid::from_u128(1),
                        user: Uuid::from_u128(2),
                        object: RawValue::from_string(listed.raw().into()).unwrap(),
                    },
                    "GET /v2/accounts?limit=200",
                    Utc::now(),
                    1,
                );
                let event = LoggedEvent {
                    position: 2,
                    received_at: Utc::now(),
                    envelope: Envelope::parse(&body).unwrap(),
                };
                assert_eq!(event.envelope.kind(), EventKind::AccountFetched);
                let folded = domain::apply(known.clone(), &event).unwrap().unwrap();
                assert!(
                    !compare(listed, Some(&folded)).appends(),
                    "appended twice: {}",
                    listed.raw()
                );
            }
            ran += 1;
        }
        assert_eq!(ran, 13);
    }

    #[test]
    fn the_fetched_body_keeps_argyles_object_byte_for_byte() {
        let object = "{\n      \"id\": \"00000000-0000-0000-0000-000000000001\",\n      \"user\": \"00000000-0000-0000-0000-000000000002\",\n      \"updated_at\": \"2026-03-01T10:00:00.123456Z\"\n    }";
        let listed = ListedAccount {
            id: Uuid::from_u128(1),
            user: Uuid::from_u128(2),
            object: RawValue::from_string(object.into()).unwrap(),
        };
        let body = fetched_body(&listed, "GET /v2/accounts?limit=200", Utc::now(), 7);
        assert!(String::from_utf8_lossy(&body).contains(object));
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["fetched"]["reason"], "reconcile");
        assert_eq!(value["fetched"]["run"], 7);
        let gone = gone_body(
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            "GET /v2/accounts/x",
            Utc::now(),
            7,
        );
        assert_eq!(
            Envelope::parse(&gone).unwrap().kind(),
            EventKind::AccountGone
        );
    }
}
