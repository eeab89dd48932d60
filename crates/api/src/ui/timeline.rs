//! An account's timeline: every event of the account, newest first, with what the fold did with
//! it. The fold is [`domain::step`] over [`store::log::account_history`], exactly as the projector,
//! `rebuild` and time travel fold, so "changed" here means what it means everywhere.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};
use domain::{AccountSnapshot, AccountStatus};
use futures_util::TryStreamExt;
use store::PgConnection;
use store::keys::{Opened, Vault};
use store::log::Until;
use uuid::Uuid;

use super::diff::{FieldChange, field_changes};

/// Entries on one page of a timeline.
pub(crate) const PAGE: usize = 50;

/// What the fold did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Folded, and the account's view changed (its status or its resource).
    Changed,
    /// Folded, and nothing a person sees changed (a redelivered or older refinement).
    Unchanged,
    /// Refused by the fold (or by the store): quarantined with this reason, when it can be read.
    Quarantined(Option<String>),
    /// The account's personal data was erased: what the event said is gone for good.
    Erased,
}

/// One event of the timeline.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) position: i64,
    pub(crate) event: String,
    pub(crate) received_at: DateTime<Utc>,
    /// 1 + redeliveries of the same body.
    pub(crate) deliveries: i64,
    pub(crate) outcome: Outcome,
    /// The fields it changed, old → new; empty unless [`Outcome::Changed`].
    pub(crate) changes: Vec<FieldChange>,
}

/// One page of a timeline, newest first.
#[derive(Debug)]
pub(crate) struct Timeline {
    pub(crate) entries: Vec<Entry>,
    /// Every event of the account in the log.
    pub(crate) total: usize,
    /// Pass as `before` for the next (older) page; `None` on the oldest.
    pub(crate) older: Option<i64>,
    /// Whether newer events than this page's exist.
    pub(crate) newer: bool,
}

/// An event folded, before its deliveries are known.
struct Folded {
    position: i64,
    event: String,
    /// `None` for an event the fold skipped: read with the deliveries.
    received_at: Option<DateTime<Utc>>,
    outcome: Outcome,
    before: Option<AccountSnapshot>,
    after: Option<AccountSnapshot>,
}

/// The page of `account`'s timeline that ends just before position `before` (the newest page
/// when `None`). Events are folded from the account's first, holding the page only. The
/// quarantine, the history and the deliveries are read in one snapshot, so an event recorded
/// between two of the reads can be neither lost nor half shown.
pub(crate) async fn page(
    conn: &mut PgConnection,
    vault: &Vault,
    account: Uuid,
    before: Option<i64>,
) -> Result<Timeline, store::Error> {
    let mut tx = store::begin_consistent_read(conn).await?;
    let timeline = read(&mut tx, vault, account, before).await?;
    tx.commit().await?;
    Ok(timeline)
}

async fn read(
    conn: &mut PgConnection,
    vault: &Vault,
    account: Uuid,
    before: Option<i64>,
) -> Result<Timeline, store::Error> {
    let refusals = store::quarantine::of_account(conn, vault, account).await?;
    let quarantined: HashMap<i64, Option<String>> = refusals
        .iter()
        .map(|q| (q.position, q.error.clone()))
        .collect();
    // Folds skip events the store refused, and every refused event once the account is erased;
    // the timeline lists them too, in their place, as quarantined.
    let mut skipped: Vec<(i64, String)> = refusals
        .into_iter()
        .rev()
        .map(|q| (q.position, q.event))
        .collect();
    let mut window = Window {
        before,
        kept: VecDeque::with_capacity(PAGE + 1),
        total: 0,
        dropped: false,
        newer: false,
    };
    {
        let mut events = store::log::account_history(conn, vault, account, Until::END);
        let mut snapshot: Option<AccountSnapshot> = None;
        while let Some(stored) = events.try_next().await? {
            window.refused_before(stored.position, &mut skipped, &quarantined, &snapshot);
            if skipped
                .last()
                .is_some_and(|(refused, _)| *refused == stored.position)
            {
                skipped.pop(); // refused by the fold, which reads it: listed below
            }
            let previous = snapshot.clone();
            let outcome = match domain::step(snapshot.clone(), stored.raw()) {
                Ok(next) => {
                    snapshot = next;
                    if stored.body == Opened::Erased {
                        Outcome::Erased
                    } else if visible_change(previous.as_ref(), snapshot.as_ref()) {
                        Outcome::Changed
                    } else {
                        Outcome::Unchanged
                    }
                }
                Err(error) => match (&stored.body, quarantined.get(&stored.position)) {
                    (Opened::Erased, _) => Outcome::Erased,
                    (_, Some(reason)) => Outcome::Quarantined(reason.clone()),
                    // Not recorded yet (the projector is behind): the fold's own reason.
                    (_, None) => Outcome::Quarantined(Some(error.to_string())),
                },
            };
            window.keep(Folded {
                position: stored.position,
                event: stored.event.clone(),
                received_at: Some(stored.received_at),
                outcome,
                before: previous,
                after: snapshot.clone(),
            });
        }
        window.refused_before(i64::MAX, &mut skipped, &quarantined, &snapshot);
    }
    let Window {
        kept,
        total,
        dropped,
        newer,
        ..
    } = window;
    let logged = logged(conn, vault, account, &kept).await?;
    let older = dropped.then(|| kept.front().map(|f| f.position)).flatten();
    let entries = kept
        .into_iter()
        .rev()
        .map(|f| {
            let (deliveries, received_at) = logged
                .get(&f.position)
                .copied()
                .unwrap_or((1, f.received_at.unwrap_or_default()));
            Entry {
                changes: match f.outcome {
                    Outcome::Changed => changes(f.before.as_ref(), f.after.as_ref()),
                    _ => vec![],
                },
                deliveries,
                received_at,
                position: f.position,
                event: f.event,
                outcome: f.outcome,
            }
        })
        .collect();
    Ok(Timeline {
        entries,
        total,
        older,
        newer,
    })
}

/// The page being gathered: the newest [`PAGE`] events before `before`.
struct Window {
    before: Option<i64>,
    kept: VecDeque<Folded>,
    total: usize,
    /// Older events than the kept ones exist.
    dropped: bool,
    /// Newer events than `before` exist.
    newer: bool,
}

impl Window {
    fn keep(&mut self, folded: Folded) {
        self.total += 1;
        if self.before.is_some_and(|b| folded.position >= b) {
            self.newer = true;
            return;
        }
        self.kept.push_back(folded);
        if self.kept.len() > PAGE {
            self.kept.pop_front();
            self.dropped = true;
        }
    }

    /// Keeps the refused events the fold skipped (`skipped`, last is lowest) below `position`.
    fn refused_before(
        &mut self,
        position: i64,
        skipped: &mut Vec<(i64, String)>,
        quarantined: &HashMap<i64, Option<String>>,
        snapshot: &Option<AccountSnapshot>,
    ) {
        while skipped
            .last()
            .is_some_and(|(refused, _)| *refused < position)
        {
            let Some((refused, event)) = skipped.pop() else {
                break;
            };
            self.keep(Folded {
                position: refused,
                event,
                received_at: None,
                outcome: Outcome::Quarantined(quarantined.get(&refused).cloned().flatten()),
                before: snapshot.clone(),
                after: snapshot.clone(),
            });
        }
    }
}

/// Whether a person would see a difference: the status, the connection status or the resource.
fn visible_change(before: Option<&AccountSnapshot>, after: Option<&AccountSnapshot>) -> bool {
    let status = |s: Option<&AccountSnapshot>| s.map(|s| (s.status, s.connection_status.clone()));
    status(before) != status(after)
        || domain::resource_changed(
            before.and_then(|s| s.resource.as_ref()),
            after.and_then(|s| s.resource.as_ref()),
        )
}

/// The status and the connection status first (they are the snapshot's own), then every field
/// of the resource.
fn changes(before: Option<&AccountSnapshot>, after: Option<&AccountSnapshot>) -> Vec<FieldChange> {
    let status = |s: Option<&AccountSnapshot>| {
        s.map(|s| match s.status {
            AccountStatus::Active => "active",
            AccountStatus::Removed => "removed",
            AccountStatus::Erased => "erased",
        })
    };
    let mut changes = vec![];
    if status(before) != status(after) {
        changes.push(FieldChange {
            field: "status".into(),
            old: status(before).map(Into::into),
            new: status(after).map(Into::into),
        });
    }
    let connection = |s: Option<&AccountSnapshot>| s.and_then(|s| s.connection_status.clone());
    if connection(before) != connection(after) {
        // Also set by an event without a resource (`accounts.connected`, `accounts.failed`).
        changes.push(FieldChange {
            field: "connection status".into(),
            old: connection(before),
            new: connection(after),
        });
    }
    let resource =
        |s: Option<&AccountSnapshot>| s.and_then(|s| s.resource.as_ref()).map(|r| r.value());
    changes.extend(field_changes(
        resource(before).as_ref(),
        resource(after).as_ref(),
    ));
    changes
}

/// How many times each kept event was delivered, and when it was received: the log's page of
/// the account from the first kept position (the kept events are consecutive in it).
async fn logged(
    conn: &mut PgConnection,
    vault: &Vault,
    account: Uuid,
    kept: &VecDeque<Folded>,
) -> Result<HashMap<i64, (i64, DateTime<Utc>)>, store::Error> {
    let Some(first) = kept.front() else {
        return Ok(HashMap::new());
    };
    let mut counts = HashMap::with_capacity(kept.len());
    let mut rows = store::log::page(
        conn,
        vault,
        Some(account),
        first.position - 1,
        i64::MAX,
        kept.len() as i64,
    );
    while let Some(record) = rows.try_next().await? {
        counts.insert(record.position, (record.deliveries, record.received_at));
    }
    Ok(counts)
}
