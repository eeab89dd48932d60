//! Erasure: an account's personal data made unrecoverable (its key destroyed), the log kept.
//!
//! [`erase`] holds every append for the moment it takes (so it sees all of the account's events),
//! folds the account's history once more with the key still there to record which events changed
//! the resource (what `changes` shows of an erased account), and then, in the same transaction,
//! appends the erasure event and destroys the key (`store::erasure::erase`). The erasure event
//! holds when, why and by whom, and positions; nothing personal. The projector folds it like any
//! event: terminal over everything ([`domain::apply`]).
//!
//! [`on_schedule`] erases removed accounts `ERASE_REMOVED_AFTER` after their removal; the
//! projector's leader runs it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde::Serialize;
use store::keys::Vault;
use store::log::Until;
use store::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What erasing one account did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Erased now; the erasure event is at this position.
    Erased { position: i64 },
    /// Erased before, at this position: nothing changed.
    AlreadyErased { position: i64 },
}

/// Why an erasure did not happen.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    #[error("account {0} has no events in the log")]
    UnknownAccount(Uuid),
    #[error("the reason must not be empty")]
    EmptyReason,
    #[error("the reason is longer than {MAX_REASON} bytes")]
    ReasonTooLong,
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// The longest reason an erasure records.
pub const MAX_REASON: usize = 1000;

/// Who asked and why, recorded in the erasure event (not personal data: say "data subject
/// request #123", not a name).
#[derive(Debug, Clone)]
pub struct Request {
    pub reason: String,
    /// Who asked: an operator's name or a role (`ERASE_REMOVED_AFTER`).
    pub requested_by: String,
}

#[derive(Serialize)]
struct ErasureBody<'a> {
    event: &'static str,
    data: ErasureData,
    erasure: ErasureFacts<'a>,
}

#[derive(Serialize)]
struct ErasureData {
    account: Uuid,
    user: Uuid,
}

#[derive(Serialize)]
struct ErasureFacts<'a> {
    reason: &'a str,
    requested_by: &'a str,
    requested_at: DateTime<Utc>,
    /// The events that changed the resource, as `changes` listed them before the erasure.
    changed_positions: Vec<i64>,
}

/// Erases `account` (see the module docs).
pub async fn erase(
    pool: &PgPool,
    vault: &Vault,
    account: Uuid,
    request: &Request,
) -> Result<Outcome, EraseError> {
    let reason = request.reason.trim();
    if reason.is_empty() {
        return Err(EraseError::EmptyReason);
    }
    if reason.len() > MAX_REASON {
        return Err(EraseError::ReasonTooLong);
    }
    let mut conn = store::acquire(pool).await?;
    if let Some(position) = store::keys::erased_at(&mut conn, account).await? {
        return Ok(Outcome::AlreadyErased { position });
    }
    let mut tx = store::begin(&mut conn).await?;
    store::erasure::hold_appends(&mut tx).await?;
    let (user, changed_positions) = history(&mut tx, vault, account).await?;
    let Some(user) = user else {
        store::rollback(tx).await?;
        return Err(EraseError::UnknownAccount(account));
    };
    let body = serde_json::to_vec(&ErasureBody {
        event: domain::ACCOUNT_ERASED,
        data: ErasureData { account, user },
        erasure: ErasureFacts {
            reason,
            requested_by: &request.requested_by,
            requested_at: Utc::now(),
            changed_positions,
        },
    })
    .expect("the erasure body serializes");
    let erased = store::erasure::erase(&mut tx, account, user, &body).await?;
    store::commit(tx).await?;
    if !erased.already {
        store::log::announce(&mut conn).await?;
    }
    metrics::counter!("erasures_total").increment(u64::from(!erased.already));
    Ok(if erased.already {
        Outcome::AlreadyErased {
            position: erased.position,
        }
    } else {
        tracing::info!(%account, position = erased.position, requested_by = %request.requested_by,
            "account erased: its key is destroyed");
        Outcome::Erased {
            position: erased.position,
        }
    })
}

/// The account's user (of its last event) and the positions of the events that changed its
/// resource, folded as `changes` folds them.
async fn history(
    conn: &mut PgConnection,
    vault: &Vault,
    account: Uuid,
) -> store::Result<(Option<Uuid>, Vec<i64>)> {
    let mut events = store::log::account_history(conn, vault, account, Until::END);
    let mut snapshot = None;
    let mut user = None;
    let mut changed = vec![];
    while let Some(stored) = events.try_next().await? {
        user = stored.user_id.or(user);
        let before = snapshot
            .as_ref()
            .and_then(|s: &domain::AccountSnapshot| s.resource.clone());
        if let Ok(next) = domain::step(snapshot.clone(), stored.raw()) {
            snapshot = next;
            let after = snapshot.as_ref().and_then(|s| s.resource.as_ref());
            if domain::resource_changed(before.as_ref(), after) {
                changed.push(stored.position);
            }
        }
    }
    Ok((user, changed))
}

/// Erases every account the log holds for `user`, one at a time; the outcome of each.
pub async fn erase_user(
    pool: &PgPool,
    vault: &Vault,
    user: Uuid,
    request: &Request,
) -> Result<Vec<(Uuid, Outcome)>, EraseError> {
    let mut conn = store::acquire(pool).await?;
    let accounts = store::erasure::accounts_of_user(&mut conn, user).await?;
    drop(conn);
    let mut outcomes = Vec::with_capacity(accounts.len());
    for account in accounts {
        outcomes.push((account, erase(pool, vault, account, request).await?));
    }
    Ok(outcomes)
}

/// How often [`on_schedule`] looks for removed accounts due for erasure: a tenth of the delay,
/// from 1 s to 1 min.
pub fn schedule_interval(after: Duration) -> Duration {
    (after / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Erases accounts `after` their removal, checking every [`schedule_interval`], until
/// `shutdown`. Returns an error when the database fails (the caller retries).
pub async fn on_schedule(
    pool: &PgPool,
    vault: &Vault,
    after: Duration,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    let request = Request {
        reason: format!(
            "removed by Argyle more than {} ago (ERASE_REMOVED_AFTER)",
            humantime::format_duration(after)
        ),
        requested_by: "ERASE_REMOVED_AFTER".into(),
    };
    loop {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        loop {
            let mut conn = store::acquire(pool).await?;
            let due = store::erasure::removed_before(&mut conn, cutoff, 100).await?;
            drop(conn);
            if due.is_empty() {
                break;
            }
            for (account, _, removed_at) in due {
                match erase(pool, vault, account, &request).await {
                    Ok(_) => {
                        metrics::counter!("erasures_scheduled_total").increment(1);
                        tracing::info!(%account, %removed_at, "erased after its removal (ERASE_REMOVED_AFTER)");
                    }
                    Err(EraseError::Store(error)) => return Err(error),
                    Err(other) => {
                        tracing::error!(%account, error = %other, "scheduled erasure failed");
                    }
                }
                if shutdown.is_cancelled() {
                    return Ok(());
                }
            }
        }
        let mut conn = store::acquire(pool).await?;
        let (pending, _) = store::erasure::removed_pending(&mut conn).await?;
        drop(conn);
        metrics::gauge!("erasure_pending_accounts").set(pending as f64);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(schedule_interval(after)) => {}
        }
    }
}
