//! Argyle's API into the log. The enricher: when an `accounts.*` webhook arrives without `resource` (a subscription without
//! `include_resource`), it fetches `GET /v2/accounts/{id}` and appends the answer to the log as an
//! event of its own, [`domain::ACCOUNT_FETCHED`], which the projector folds under the same
//! newer-`updated_at` rule as a webhook. A rebuild therefore stays a pure fold of the log.
//!
//! # Layout
//! - [`run`]: the long-running loop. Like the projector, one enricher holds a session advisory lock
//!   and works; others stand by ([`store::leader::run_as_leader`]). It wakes on append notifications, on the next due fetch, or every
//!   poll interval.
//! - [`scan`]: reads the log after the enricher's checkpoint and records a request per account that
//!   needs fetching (`store::enrichment`), moving the checkpoint in the same transaction.
//! - [`fetch_due`]: fetches what is due, paced to `rate` per second, and for each answer appends
//!   the event and completes the request in one transaction.
//! - [`reconcile`]: compares Argyle's list of accounts with the log and appends what it lacks; the
//!   `reconcile` command, and the leader every `reconcile_interval` if set.
//!
//! # Guarantees
//! - No fetch lost: a request is recorded in the transaction that moves the scan checkpoint, and
//!   completed only in the transaction that appends the answer. A crash between the fetch and that
//!   commit means one repeated fetch, nothing more.
//! - Coalescing: a burst of resource-less events for one account asks once; events arriving after a
//!   fetch are served by one more fetch, no sooner than `window` after the previous one.
//! - A 404 is recorded as [`domain::ACCOUNT_NOT_FOUND`] (not folded) and not retried. Rate limiting
//!   and server errors are retried by the client, then again later with a growing delay.

#![forbid(unsafe_code)]

pub mod reconcile;

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use domain::{ACCOUNT_FETCHED, ACCOUNT_NOT_FOUND, Envelope, EventKind};
use serde::Serialize;
use serde_json::value::RawValue;
use store::checkpoints::{self, ENRICHER as CHECKPOINT};
use store::enrichment::{self, Request};
use store::keys::{Opened, Vault};
use store::leader::run_as_leader;
use store::locks::Lock;
use store::log::{AppendNotifications, Delivery, StoredEvent};
use store::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use reconcile::ReconcileConfig;

/// How the enricher paces itself.
#[derive(Debug, Clone)]
pub struct EnricherConfig {
    /// At most one fetch per account per window.
    pub window: Duration,
    /// Fetches per second, at most.
    pub rate: f64,
    /// Events scanned per transaction.
    pub batch_size: i64,
    /// Look for work at least this often even if no notification arrives.
    pub poll_interval: Duration,
    /// How often a standby retries the lock, and the pause after a database error.
    pub retry_interval: Duration,
    /// Delay before retrying an account whose fetch failed once; doubles with each failure.
    pub first_backoff: Duration,
    /// Longest delay between attempts for an account whose fetch keeps failing, and the pause
    /// after Argyle refused the key or the URL.
    pub max_backoff: Duration,
    /// Pause of every fetch after Argyle kept answering 429.
    pub rate_limit_pause: Duration,
    /// On shutdown, how long a fetch in flight may take to finish before it is abandoned (and
    /// done again after the restart).
    pub shutdown_grace: Duration,
    /// Reconcile with Argyle this often (`RECONCILE_INTERVAL`); `None`, the default: never.
    pub reconcile_interval: Option<Duration>,
    /// How a reconcile paces and guards itself (the scheduled one and the command's).
    pub reconcile: ReconcileConfig,
}

impl Default for EnricherConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(5),
            rate: 5.0,
            batch_size: 1000,
            poll_interval: Duration::from_secs(1),
            retry_interval: Duration::from_millis(500),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            rate_limit_pause: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            reconcile_interval: None,
            reconcile: ReconcileConfig::default(),
        }
    }
}

/// Runs the enricher until `shutdown` fires, surviving database outages.
pub async fn run(
    pool: PgPool,
    vault: Vault,
    client: argyle::Client,
    config: EnricherConfig,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match lead(&pool, &vault, &client, &config, &shutdown).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, "enricher lost its database connection; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(config.retry_interval) => {}
                }
            }
        }
    }
    tracing::info!("enricher stopped");
}

/// Stands by until this process holds the enricher lock, then works. Every read and write runs
/// on the session that holds the lock: if that session dies, the work fails with it and a
/// standby takes over, so two enrichers never append for the same request.
async fn lead(
    pool: &PgPool,
    vault: &Vault,
    client: &argyle::Client,
    config: &EnricherConfig,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    let standing_by = || tracing::info!("another enricher is working; standing by");
    // The leader also reconciles on schedule, if asked to; both end with the leadership.
    let work = |conn| async move {
        tokio::select! {
            done = enrich(conn, vault, pool, client, config, shutdown) => done,
            // Only its error ends the leadership: at shutdown it stops and `enrich` finishes.
            Err(error) = reconcile::on_schedule(pool, vault, client, config, shutdown) => Err(error),
        }
    };
    run_as_leader(
        pool,
        Lock::Enricher,
        config.retry_interval,
        shutdown,
        standing_by,
        work,
    )
    .await
}

/// Scans and fetches as the one enricher, on the session that holds its lock, until `shutdown`.
async fn enrich(
    mut conn: PgConnection,
    vault: &Vault,
    pool: &PgPool,
    client: &argyle::Client,
    config: &EnricherConfig,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    tracing::info!(rate = config.rate, window = ?config.window, "enricher is working");
    let mut notifications = AppendNotifications::subscribe(pool).await?;
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate.max(0.001)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Fetching waits until Argyle has answered a check of the URL and key, and pauses after 429s.
    let mut api_checked = false;
    let mut paused_until = tokio::time::Instant::now();
    loop {
        while scan(&mut conn, vault, config.batch_size).await? > 0 {}
        if tokio::time::Instant::now() >= paused_until {
            if !api_checked {
                match client.check().await {
                    Ok(()) => api_checked = true,
                    Err(error) => {
                        tracing::error!(%error, pause = ?config.max_backoff, "cannot fetch accounts from Argyle");
                        paused_until = tokio::time::Instant::now() + config.max_backoff;
                    }
                }
            }
            if api_checked {
                let rate_limited =
                    fetch_due(&mut conn, vault, client, config, &mut pace, shutdown).await?;
                if rate_limited {
                    tracing::warn!(pause = ?config.rate_limit_pause, "Argyle is rate limiting; pausing fetches");
                    paused_until = tokio::time::Instant::now() + config.rate_limit_pause;
                }
            }
        }
        let (pending, next_due) = enrichment::backlog(&mut conn).await?;
        metrics::gauge!("enrichment_pending").set(pending as f64);
        let until_due = next_due.map(|at| (at - Utc::now()).to_std().unwrap_or_default());
        let until_unpaused = paused_until.saturating_duration_since(tokio::time::Instant::now());
        let pause = until_due
            .map_or(config.poll_interval, |d| d.min(config.poll_interval))
            .max(until_unpaused.min(config.poll_interval));
        tokio::select! {
            () = shutdown.cancelled() => return store::close(conn).await,
            notified = notifications.wait() => notified?,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Scans up to `batch_size` events after the enricher's checkpoint, records the fetches they ask
/// for (and drops those of removed accounts) and moves the checkpoint, in one transaction.
/// Returns how many events it scanned.
pub async fn scan(conn: &mut PgConnection, vault: &Vault, batch_size: i64) -> store::Result<usize> {
    // Before the transaction's reads: see the store crate's docs.
    let horizon = store::log::horizon(conn).await?;
    let mut tx = store::begin(conn).await?;
    let from = checkpoints::lock(&mut tx, CHECKPOINT).await?;
    let events = store::log::read_after(&mut tx, vault, from, horizon, batch_size).await?;
    let Some(last) = events.last() else {
        return Ok(0);
    };
    let mut asks = vec![];
    let mut removed = vec![];
    for stored in &events {
        match classify(stored) {
            Some(Scanned::Asks(account, user)) => asks.push((account, user, stored.position)),
            Some(Scanned::Removed(account)) => removed.push(account),
            None => {}
        }
    }
    if !asks.is_empty() {
        tracing::debug!(events = asks.len(), "resource-less events ask for fetches");
        enrichment::request(&mut tx, &asks).await?;
    }
    // After the requests: a removal is terminal, whatever came before it in the batch.
    enrichment::cancel(&mut tx, &removed).await?;
    checkpoints::advance(&mut tx, CHECKPOINT, from, last.position).await?;
    store::commit(tx).await?;
    Ok(events.len())
}

enum Scanned {
    /// An `accounts.*` webhook without `resource`: fetch this account.
    Asks(Uuid, Uuid),
    /// `accounts.removed`: Argyle deleted the account; nothing left to fetch.
    Removed(Uuid),
}

fn classify(stored: &StoredEvent) -> Option<Scanned> {
    // An erased account's events ask for nothing: its data never comes back.
    let Opened::Plain(body) = &stored.body else {
        return None;
    };
    let envelope = Envelope::parse_logged(body).ok()?;
    let account = envelope.account?;
    match envelope.kind() {
        EventKind::AccountAdded
        | EventKind::AccountConnected
        | EventKind::AccountFailed
        | EventKind::AccountUpdated
        | EventKind::OtherAccountEvent
            if envelope.resource.is_none() =>
        {
            Some(Scanned::Asks(account, envelope.user?))
        }
        // A webhook that calls itself an API answer is not folded, so it removes nothing either.
        kind if kind.is_removal()
            && !(kind.speaks_for_argyle_api()
                && stored.raw().origin == domain::Origin::Webhook) =>
        {
            Some(Scanned::Removed(account))
        }
        _ => None,
    }
}

/// Fetches every request that is due, paced by `pace`. True when it stopped because Argyle kept
/// answering 429: the caller pauses every fetch.
pub async fn fetch_due(
    conn: &mut PgConnection,
    vault: &Vault,
    client: &argyle::Client,
    config: &EnricherConfig,
    pace: &mut tokio::time::Interval,
    shutdown: &CancellationToken,
) -> store::Result<bool> {
    loop {
        let due = enrichment::due(conn, 32).await?;
        if due.is_empty() {
            return Ok(false);
        }
        for request in due {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(false),
                _ = pace.tick() => {}
            }
            match fetch_one(conn, vault, client, config, &request, shutdown).await? {
                Outcome::Completed | Outcome::Failed => {}
                Outcome::RateLimited => return Ok(true),
                Outcome::Abandoned => return Ok(false),
            }
        }
    }
}

enum Outcome {
    Completed,
    Failed,
    RateLimited,
    /// Shutdown came and the fetch did not finish within the grace period; still pending.
    Abandoned,
}

/// Fetches one account and records the outcome.
async fn fetch_one(
    conn: &mut PgConnection,
    vault: &Vault,
    client: &argyle::Client,
    config: &EnricherConfig,
    request: &Request,
    shutdown: &CancellationToken,
) -> store::Result<Outcome> {
    let account = request.account_id;
    // Erased since it was asked for: its data is never fetched back.
    if store::keys::erased_at(conn, account).await?.is_some() {
        enrichment::cancel(conn, &[account]).await?;
        tracing::info!(%account, "fetch dropped: the account is erased");
        return Ok(Outcome::Completed);
    }
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(config.shutdown_grace).await;
    };
    let answer = tokio::select! {
        answer = client.get_account(account) => answer,
        () = grace => {
            tracing::warn!(%account, "shutting down with a fetch in flight; it is done again after the restart");
            return Ok(Outcome::Abandoned);
        }
    };
    let fetched_at = Utc::now();
    let body = match &answer {
        Ok(resource) => fetched_event(request, resource.as_deref(), fetched_at),
        Err(error) => {
            let retry_in = backoff(request.attempts, error.is_transient(), config);
            tracing::warn!(%account, %error, ?retry_in, "could not fetch the account; will retry");
            metrics::counter!("enrichment_fetches_total", "outcome" => "failed").increment(1);
            enrichment::failed(conn, request, &error.to_string(), retry_in).await?;
            return Ok(if matches!(error, argyle::Error::RateLimited { .. }) {
                Outcome::RateLimited
            } else {
                Outcome::Failed
            });
        }
    };
    let envelope = match Envelope::parse(&body) {
        Ok(envelope) => envelope,
        Err(error) => {
            // Argyle answered JSON the log would not accept (too deep, NUL escapes, ...).
            tracing::warn!(%account, %error, "Argyle's account is not a storable resource");
            metrics::counter!("enrichment_fetches_total", "outcome" => "failed").increment(1);
            enrichment::failed(conn, request, &error.to_string(), config.max_backoff).await?;
            return Ok(Outcome::Failed);
        }
    };
    let mut tx = store::begin(conn).await?;
    let appended = store::log::append_fetched_in(
        &mut tx,
        vault,
        &[Delivery::new(&body, None, &envelope)],
        // The body carries the fetch time, so no two fetches are the same event.
        Duration::ZERO,
    )
    .await?;
    enrichment::complete(&mut tx, request, config.window).await?;
    store::commit(tx).await?;
    store::log::announce(conn).await?;
    let outcome = if answer.is_ok_and(|r| r.is_some()) {
        "fetched"
    } else {
        "not_found"
    };
    tracing::info!(%account, position = appended[0].position, outcome, "account fetched from Argyle");
    metrics::counter!("enrichment_fetches_total", "outcome" => outcome).increment(1);
    Ok(Outcome::Completed)
}

/// Pause before the next attempt after `attempts` earlier failures: doubling from
/// `first_backoff` for transient trouble, the longest pause at once for anything else (a bad API
/// key, say).
fn backoff(attempts: i32, transient: bool, config: &EnricherConfig) -> Duration {
    if !transient {
        return config.max_backoff;
    }
    config
        .first_backoff
        .saturating_mul(1 << attempts.clamp(0, 16))
        .min(config.max_backoff)
}

/// The body of the event that records a fetch: the webhook envelope's shape, so the fold reads it
/// like any other, with `fetched` saying where and when the resource came from.
fn fetched_event(request: &Request, resource: Option<&RawValue>, at: DateTime<Utc>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        event: &'static str,
        data: Data<'a>,
        fetched: Fetched,
    }
    #[derive(Serialize)]
    struct Data<'a> {
        account: Uuid,
        user: Uuid,
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<&'a RawValue>,
    }
    #[derive(Serialize)]
    struct Fetched {
        /// Why it was fetched: `enrichment` here, `reconcile` for [`reconcile`]'s.
        reason: &'static str,
        request: String,
        status: u16,
        at: String,
        /// The newest event that asked for this fetch.
        asked_by_position: i64,
    }
    let body = Body {
        event: if resource.is_some() {
            ACCOUNT_FETCHED
        } else {
            ACCOUNT_NOT_FOUND
        },
        data: Data {
            account: request.account_id,
            user: request.user_id,
            resource,
        },
        fetched: Fetched {
            reason: "enrichment",
            request: format!("GET /v2/accounts/{}", request.account_id),
            status: if resource.is_some() { 200 } else { 404 },
            at: at.to_rfc3339_opts(SecondsFormat::Micros, true),
            asked_by_position: request.requested_position,
        },
    };
    serde_json::to_vec_pretty(&body).expect("the fetched event serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            account_id: Uuid::from_u128(1),
            user_id: Uuid::from_u128(2),
            requested_position: 7,
            attempts: 0,
        }
    }

    #[test]
    fn a_fetched_event_is_an_envelope_the_fold_reads() {
        let resource = RawValue::from_string(
            r#"{"id":"00000000-0000-0000-0000-000000000001","updated_at":"2026-03-02T15:04:11Z","connection":{"status":"connected"}}"#.into(),
        )
        .unwrap();
        let body = fetched_event(&request(), Some(&resource), Utc::now());
        let envelope = Envelope::parse(&body).unwrap();
        assert_eq!(envelope.kind(), EventKind::AccountFetched);
        assert_eq!(envelope.account, Some(Uuid::from_u128(1)));
        assert_eq!(envelope.user, Some(Uuid::from_u128(2)));
        let resource = envelope.resource.unwrap();
        assert_eq!(resource.connection_status(), Some("connected"));

        let body = fetched_event(&request(), None, Utc::now());
        let envelope = Envelope::parse(&body).unwrap();
        assert_eq!(envelope.event, ACCOUNT_NOT_FOUND);
        assert_eq!(envelope.kind(), EventKind::NotAccountEvent);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["fetched"]["status"], 404);
        assert_eq!(value["fetched"]["asked_by_position"], 7);
    }

    #[test]
    fn backoff_grows_then_caps() {
        let config = EnricherConfig::default();
        let max = config.max_backoff;
        assert_eq!(backoff(0, true, &config), Duration::from_secs(1));
        assert_eq!(backoff(3, true, &config), Duration::from_secs(8));
        assert_eq!(backoff(20, true, &config), max);
        assert_eq!(backoff(0, false, &config), max);
    }
}
