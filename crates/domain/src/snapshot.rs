//! The account snapshot and the fold that produces it.
//!
//! Semantics (the contract's "Projection semantics"):
//! - one snapshot per `data.account`, carrying the `data.user` of the events folded into it;
//! - a `resource` replaces the snapshot's resource only if its `updated_at` is a later instant than the
//!   snapshot's; on a tie the snapshot stays; when either side has no parseable `updated_at`, the
//!   resource applies in log order;
//! - `accounts.removed` is terminal: later events count in `version` and `last_*`, nothing else;
//!   a removal that reconcile confirmed with Argyle's API ([`crate::ACCOUNT_GONE`]) is one too;
//! - an erasure ([`crate::ACCOUNT_ERASED`], appended by the service alone) is terminal over
//!   everything, a removal included: status `erased`, no resource, no connection status; the bodies
//!   of an erased account's events cannot be read any more, so [`step`] folds each of them by what
//!   the log's columns say (its name, ids and origin) as an event without a resource;
//! - `version` counts the distinct events folded (the log stores a redelivery as a delivery of the
//!   original event, never as an event, so it cannot reach the fold);
//! - an event the fold cannot apply (a `resource` that is not an object, an `updated_at` that is not a
//!   string) is refused with a [`FoldError`]; the caller leaves the snapshot as it was and the
//!   account's other events still apply;
//! - `connection_status` is the applied resource's `connection.status`; an event without a resource
//!   implies one by its name (added → connecting, connected → connected, failed → error). A resource
//!   that loses the `updated_at` comparison is stale and implies nothing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::envelope::{Envelope, EventKind};
use crate::resource::Resource;

/// One event as the log holds it: its position, when it was received, and what it said.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    /// Position in the log; the fold sees events in increasing position.
    pub position: i64,
    /// When the log received the event (the database's clock, never the fold's).
    pub received_at: DateTime<Utc>,
    /// The parsed body.
    pub envelope: Envelope,
}

/// Whether the account still exists at Argyle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    Active,
    Removed,
    /// The account's personal data was erased.
    Erased,
}

impl AccountStatus {
    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Removed => "removed",
            Self::Erased => "erased",
        }
    }

    /// Parses [`AccountStatus::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "removed" => Some(Self::Removed),
            "erased" => Some(Self::Erased),
            _ => None,
        }
    }
}

/// What the log says about one account, folded up to `last_position`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountSnapshot {
    pub account_id: Uuid,
    pub user_id: Uuid,
    pub status: AccountStatus,
    /// Last known `connection.status`; Argyle may add values, so it is kept as sent.
    pub connection_status: Option<String>,
    /// The newest account object seen, exactly as Argyle sent it.
    pub resource: Option<Resource>,
    /// Number of distinct events folded.
    pub version: i64,
    pub last_position: i64,
    pub last_event: String,
    pub first_seen_at: DateTime<Utc>,
    pub last_event_at: DateTime<Utc>,
    pub removed_at: Option<DateTime<Utc>>,
}

/// Why an event could not be folded. The event stays in the log; the snapshot is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    #[error("an {0} event has no data.account or data.user")]
    MissingIds(String),
    #[error("event for account {event} folded into the snapshot of account {snapshot}")]
    WrongAccount { snapshot: Uuid, event: Uuid },
    #[error("data.resource is not a JSON object")]
    ResourceNotObject,
    #[error("data.resource.updated_at is not a string")]
    UpdatedAtNotString,
    #[error("data.resource.updated_at is outside the years 0001 to 9999 once converted to UTC")]
    UpdatedAtOutOfRange,
    #[error("the stored body does not parse: {0}")]
    BodyUnparseable(String),
    #[error("the stored body cannot be read: {0}")]
    BodyUnreadable(String),
    #[error("the fold panicked: {0}")]
    Panicked(String),
}

impl AccountSnapshot {
    /// The instant of `resource.updated_at`, if the resource has a parseable one.
    pub fn resource_updated_at(&self) -> Option<DateTime<Utc>> {
        self.resource.as_ref().and_then(Resource::updated_at)
    }

    /// What every answer shows of an erased account: status `erased`, no resource and no
    /// connection status; ids, times and counts stay.
    pub fn erased(mut self) -> Self {
        self.status = AccountStatus::Erased;
        self.resource = None;
        self.connection_status = None;
        self
    }

    /// Names of the fields in which `other` differs from `self` (empty when equal).
    pub fn differing_fields(&self, other: &AccountSnapshot) -> Vec<&'static str> {
        let mut fields = vec![];
        let mut check = |name, same: bool| {
            if !same {
                fields.push(name);
            }
        };
        check("account_id", self.account_id == other.account_id);
        check("user_id", self.user_id == other.user_id);
        check("status", self.status == other.status);
        check(
            "connection_status",
            self.connection_status == other.connection_status,
        );
        check("resource", self.resource == other.resource);
        check("version", self.version == other.version);
        check("last_position", self.last_position == other.last_position);
        check("last_event", self.last_event == other.last_event);
        check("first_seen_at", self.first_seen_at == other.first_seen_at);
        check("last_event_at", self.last_event_at == other.last_event_at);
        check("removed_at", self.removed_at == other.removed_at);
        fields
    }
}

/// Folds one event into an account's snapshot (`None` before the account's first event).
///
/// Events that are not `accounts.*` leave the snapshot untouched. The caller feeds events of one
/// account in log order.
pub fn apply(
    snapshot: Option<AccountSnapshot>,
    event: &LoggedEvent,
) -> Result<Option<AccountSnapshot>, FoldError> {
    let envelope = &event.envelope;
    let kind = envelope.kind();
    if !kind.is_folded() {
        return Ok(snapshot);
    }
    let (Some(account_id), Some(user_id)) = (envelope.account, envelope.user) else {
        return Err(FoldError::MissingIds(envelope.event.clone()));
    };
    let resource = envelope.resource.as_ref();
    if resource.is_some_and(|r| !r.is_object()) {
        return Err(FoldError::ResourceNotObject);
    }
    if resource.is_some_and(Resource::updated_at_mistyped) {
        return Err(FoldError::UpdatedAtNotString);
    }
    // Range-checked here so that the fold only ever produces snapshots the store can write.
    if resource.is_some_and(Resource::updated_at_out_of_range) {
        return Err(FoldError::UpdatedAtOutOfRange);
    }
    let mut next = match snapshot {
        Some(s) if s.account_id != account_id => {
            return Err(FoldError::WrongAccount {
                snapshot: s.account_id,
                event: account_id,
            });
        }
        Some(s) => s,
        None => AccountSnapshot {
            account_id,
            user_id,
            status: AccountStatus::Active,
            connection_status: None,
            resource: None,
            version: 0,
            last_position: event.position,
            last_event: envelope.event.clone(),
            first_seen_at: event.received_at,
            last_event_at: event.received_at,
            removed_at: None,
        },
    };
    next.version += 1;
    next.last_position = event.position;
    next.last_event.clone_from(&envelope.event);
    next.last_event_at = event.received_at;
    if next.status == AccountStatus::Erased {
        return Ok(Some(next));
    }
    if kind.is_erasure() {
        return Ok(Some(next.erased()));
    }
    if next.status == AccountStatus::Removed {
        return Ok(Some(next));
    }
    next.user_id = user_id;
    if kind.is_removal() {
        next.status = AccountStatus::Removed;
        next.removed_at = Some(event.received_at);
        return Ok(Some(next));
    }
    match resource {
        Some(resource) => {
            if is_newer(resource, next.resource.as_ref()) {
                let status = resource.connection_status().map(str::to_owned);
                next.connection_status = status
                    .or_else(|| implied_status(kind))
                    .or(next.connection_status);
                next.resource = Some(resource.clone());
            }
        }
        None => {
            if let Some(status) = implied_status(kind) {
                next.connection_status = Some(status);
            }
        }
    }
    Ok(Some(next))
}

/// One event as the log stores it, before its body is parsed: what every fold of the log reads.
#[derive(Debug, Clone, Copy)]
pub struct RawEvent<'a> {
    pub position: i64,
    pub received_at: DateTime<Utc>,
    /// The log's columns: the event's name and ids, as its envelope said when it was appended.
    pub event: &'a str,
    pub account: Option<Uuid>,
    pub user: Option<Uuid>,
    pub body: RawBody<'a>,
    pub origin: Origin,
}

/// A logged body, as far as it can be read.
#[derive(Debug, Clone, Copy)]
pub enum RawBody<'a> {
    /// The body exactly as received.
    Plain(&'a [u8]),
    /// The account was erased: the body can never be read again.
    Erased,
    /// The body is sealed and fails to open (altered in the table): why.
    Unreadable(&'a str),
}

/// Where a logged event came from, as the log recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A webhook delivery.
    Webhook,
    /// An answer of Argyle's API, appended by the service itself (the enricher).
    ArgyleApi,
    /// An erasure, appended by `account-projector erase`.
    Erasure,
    /// Appended before the log recorded origins: the event's name says.
    Unrecorded,
}

/// The fold step every fold of the log takes (projector, rebuild, verify, time travel, history):
/// parses the stored body and [`apply`]s it. A body that does not parse, an event the fold
/// refuses, and a panic inside the fold (a bug) are all a [`FoldError`]: the caller keeps the
/// snapshot it had and goes on with the next event, so no single event can stop a fold.
pub fn step(
    snapshot: Option<AccountSnapshot>,
    event: RawEvent<'_>,
) -> Result<Option<AccountSnapshot>, FoldError> {
    let envelope = match event.body {
        RawBody::Plain(body) => {
            Envelope::parse_logged(body).map_err(|e| FoldError::BodyUnparseable(e.to_string()))?
        }
        RawBody::Unreadable(reason) => return Err(FoldError::BodyUnreadable(reason.to_owned())),
        // What the log's columns say, as an event without a resource.
        RawBody::Erased => Envelope {
            event: event.event.to_owned(),
            account: event.account,
            user: event.user,
            resource: None,
        },
    };
    // Only the service's erasure erases.
    if envelope.kind().is_erasure() && event.origin != Origin::Erasure {
        return Ok(snapshot);
    }
    // Only the service's own fetches speak for Argyle's API: a webhook that calls itself a fetch
    // is logged like any other unknown family, and not folded.
    if envelope.kind().speaks_for_argyle_api() && event.origin == Origin::Webhook {
        return Ok(snapshot);
    }
    // Removals confirmed with Argyle's API came with the log's origins (V13): one from before
    // could only have been a webhook.
    if envelope.kind() == EventKind::AccountGone && event.origin != Origin::ArgyleApi {
        return Ok(snapshot);
    }
    let logged = LoggedEvent {
        position: event.position,
        received_at: event.received_at,
        envelope,
    };
    // `apply` owns nothing outside its arguments, so a panic leaves nothing half-changed.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(snapshot, &logged)))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(FoldError::Panicked(message))
        })
}

/// Whether folding an event turned the resource `before` into a different `after`: what
/// `changes` lists. An event that leaves no resource (an erasure) is not a change of it.
pub fn resource_changed(before: Option<&Resource>, after: Option<&Resource>) -> bool {
    after.is_some() && before != after
}

fn is_newer(candidate: &Resource, current: Option<&Resource>) -> bool {
    match (
        current.and_then(Resource::updated_at),
        candidate.updated_at(),
    ) {
        (Some(current), Some(candidate)) => candidate > current,
        _ => true,
    }
}

fn implied_status(kind: EventKind) -> Option<String> {
    match kind {
        EventKind::AccountAdded => Some("connecting".into()),
        EventKind::AccountConnected => Some("connected".into()),
        EventKind::AccountFailed => Some("error".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ACCOUNT_FETCHED;
    use chrono::TimeZone;
    use proptest::prelude::*;

    /// Folds a sequence of one account's events from nothing, skipping events the fold refuses.
    fn fold<'a>(events: impl IntoIterator<Item = &'a LoggedEvent>) -> Option<AccountSnapshot> {
        events.into_iter().fold(None, |snapshot, event| {
            match apply(snapshot.clone(), event) {
                Ok(next) => next,
                Err(_) => snapshot,
            }
        })
    }

    use serde_json::Value;

    const FIXTURES: [&[u8]; 8] = [
        include_bytes!("../../../tests/fixtures/argyle/01_accounts.added.json"),
        include_bytes!("../../../tests/fixtures/argyle/02_accounts.connected.json"),
        include_bytes!("../../../tests/fixtures/argyle/03_accounts.updated.json"),
        include_bytes!("../../../tests/fixtures/argyle/04_accounts.updated.json"),
        include_bytes!("../../../tests/fixtures/argyle/05_accounts.updated.json"),
        include_bytes!("../../../tests/fixtures/argyle/06_accounts.updated.json"),
        include_bytes!("../../../tests/fixtures/argyle/07_accounts.removed.json"),
        include_bytes!("../../../tests/fixtures/argyle/08_accounts.updated.no_resource.json"),
    ];

    fn logged(position: i64, body: &[u8]) -> LoggedEvent {
        LoggedEvent {
            position,
            received_at: Utc.timestamp_opt(1_700_000_000 + position, 0).unwrap(),
            envelope: Envelope::parse(body).unwrap(),
        }
    }

    /// An event from a fixture edited as a JSON tree first.
    fn edited(position: i64, body: &[u8], edit: impl FnOnce(&mut Value)) -> LoggedEvent {
        let mut value: Value = serde_json::from_slice(body).unwrap();
        edit(&mut value);
        logged(position, &serde_json::to_vec_pretty(&value).unwrap())
    }

    fn resource_of(body: &[u8]) -> Resource {
        Envelope::parse(body).unwrap().resource.unwrap()
    }

    #[test]
    fn the_fixture_sequence_ends_removed_with_the_newest_resource() {
        let events: Vec<_> = FIXTURES
            .iter()
            .enumerate()
            .map(|(i, b)| logged(i as i64 + 1, b))
            .collect();
        let mut snapshot = None;
        let mut statuses = vec![];
        for event in &events {
            snapshot = apply(snapshot, event).unwrap();
            statuses.push(
                snapshot
                    .as_ref()
                    .unwrap()
                    .connection_status
                    .clone()
                    .unwrap(),
            );
        }
        assert_eq!(
            statuses,
            [
                "connecting",
                "connected",
                "connected",
                "connected",
                "connected",
                "error",
                "error",
                "error"
            ]
        );
        let s = snapshot.unwrap();
        assert_eq!(s.status, AccountStatus::Removed);
        assert_eq!(s.version, 8);
        assert_eq!(s.last_position, 8);
        assert_eq!(s.last_event, "accounts.updated");
        assert_eq!(s.removed_at, Some(events[6].received_at));
        assert_eq!(s.resource, Some(resource_of(FIXTURES[5])));
        assert_eq!(s.first_seen_at, events[0].received_at);
        assert_eq!(
            s.resource_updated_at().unwrap().to_rfc3339(),
            "2026-04-11T08:30:02.774190+00:00"
        );
    }

    #[test]
    fn an_older_refinement_arriving_late_does_not_overwrite() {
        let s = fold(&[logged(1, FIXTURES[4]), logged(2, FIXTURES[3])]).unwrap();
        assert_eq!(s.resource, Some(resource_of(FIXTURES[4])));
        assert_eq!(s.version, 2);
    }

    #[test]
    fn a_fetched_resource_folds_under_the_newer_rule() {
        let fetched = |position, fixture: &[u8]| {
            edited(position, fixture, |v| v["event"] = ACCOUNT_FETCHED.into())
        };
        // A resource-less update, then the fetched object: the snapshot gets the resource.
        let s = fold(&[logged(1, FIXTURES[7]), fetched(2, FIXTURES[4])]).unwrap();
        assert_eq!(s.resource, Some(resource_of(FIXTURES[4])));
        assert_eq!(s.connection_status.as_deref(), Some("connected"));
        assert_eq!((s.version, s.last_event.as_str()), (2, ACCOUNT_FETCHED));
        // A fetch answered before a newer webhook was folded never overwrites it.
        let s = fold(&[logged(1, FIXTURES[4]), fetched(2, FIXTURES[3])]).unwrap();
        assert_eq!(s.resource, Some(resource_of(FIXTURES[4])));
        // Removal stays terminal.
        let s = fold(&[logged(1, FIXTURES[6]), fetched(2, FIXTURES[5])]).unwrap();
        assert_eq!((s.status, s.resource), (AccountStatus::Removed, None));
    }

    #[test]
    fn a_tie_keeps_the_snapshot() {
        // 02 and 03 share updated_at; the first one received stays.
        let late = edited(2, FIXTURES[2], |v| {
            v["data"]["resource"]["marker"] = "late".into()
        });
        let s = fold(&[logged(1, FIXTURES[1]), late]).unwrap();
        assert_eq!(s.resource, Some(resource_of(FIXTURES[1])));
    }

    #[test]
    fn instants_compare_across_offsets_and_precision() {
        let at = |stamp: &'static str| {
            move |v: &mut Value| v["data"]["resource"]["updated_at"] = stamp.into()
        };
        // 10:00:00.0000001+02:00 is later than 08:00:00Z by 100 ns.
        let s = fold(&[
            edited(1, FIXTURES[3], at("2026-03-02T08:00:00Z")),
            edited(2, FIXTURES[4], at("2026-03-02T10:00:00.0000001+02:00")),
        ])
        .unwrap();
        assert_eq!(
            s.resource.unwrap().value()["updated_at"],
            "2026-03-02T10:00:00.0000001+02:00"
        );
        let s = fold(&[
            edited(1, FIXTURES[3], at("2026-03-02T08:00:00Z")),
            edited(2, FIXTURES[4], at("2026-03-02T10:00:00+02:00")),
        ])
        .unwrap();
        assert_eq!(
            s.resource.unwrap().value()["updated_at"],
            "2026-03-02T08:00:00Z",
            "the same instant is a tie"
        );
    }

    #[test]
    fn unparseable_updated_at_applies_in_log_order() {
        let odd = edited(2, FIXTURES[3], |v| {
            v["data"]["resource"]["updated_at"] = "not a date".into()
        });
        let s = fold(&[logged(1, FIXTURES[5]), odd.clone()]).unwrap();
        assert_eq!(
            s.resource.as_ref().unwrap().value()["updated_at"],
            "not a date"
        );
        let s = fold(&[odd, logged(3, FIXTURES[0])]).unwrap();
        assert_eq!(s.resource, Some(resource_of(FIXTURES[0])));
    }

    #[test]
    fn events_without_resource_imply_a_connection_status() {
        let strip = |body: &[u8], position| {
            edited(position, body, |v| {
                v["data"].as_object_mut().unwrap().remove("resource");
            })
        };
        let s = fold(&[strip(FIXTURES[0], 1), strip(FIXTURES[1], 2)]).unwrap();
        assert_eq!(s.connection_status.as_deref(), Some("connected"));
        assert_eq!(s.resource, None);
        let failed = edited(3, FIXTURES[1], |v| {
            v["data"].as_object_mut().unwrap().remove("resource");
            v["event"] = "accounts.failed".into();
        });
        let s = fold(&[strip(FIXTURES[0], 1), strip(FIXTURES[1], 2), failed]).unwrap();
        assert_eq!(s.connection_status.as_deref(), Some("error"));
    }

    #[test]
    fn removal_is_terminal() {
        let s = fold(&[
            logged(1, FIXTURES[6]),
            logged(2, FIXTURES[0]),
            logged(3, FIXTURES[5]),
        ])
        .unwrap();
        assert_eq!(s.status, AccountStatus::Removed);
        assert_eq!(s.resource, None);
        assert_eq!(s.connection_status, None);
        assert_eq!(s.version, 3);
        assert_eq!(s.last_position, 3);
        assert_eq!(s.removed_at, Some(logged(1, FIXTURES[6]).received_at));
    }

    #[test]
    fn other_families_are_not_folded_and_poison_is_refused() {
        let other = logged(1, br#"{"event":"paystubs.added","data":{"account":"0187c66e-e7e5-811c-b006-2232f00f426a","user":"018051aa-f7a9-a0db-2f38-6cfa325e9d69"}}"#);
        assert_eq!(apply(None, &other).unwrap(), None);
        let poison = edited(2, FIXTURES[3], |v| v["data"]["resource"] = "nope".into());
        assert_eq!(apply(None, &poison), Err(FoldError::ResourceNotObject));
        let mistyped = edited(3, FIXTURES[3], |v| {
            v["data"]["resource"]["updated_at"] = 12.into()
        });
        assert_eq!(apply(None, &mistyped), Err(FoldError::UpdatedAtNotString));
        let before = fold(&[logged(1, FIXTURES[0])]);
        assert_eq!(fold(&[logged(1, FIXTURES[0]), poison]), before);
    }

    #[test]
    fn differing_fields_are_named() {
        let a = fold(&[logged(1, FIXTURES[0])]).unwrap();
        let mut b = a.clone();
        assert!(a.differing_fields(&b).is_empty());
        b.version = 9;
        b.resource = Some(resource_of(FIXTURES[5]));
        assert_eq!(a.differing_fields(&b), ["resource", "version"]);
    }

    fn same_state(a: &AccountSnapshot, b: &AccountSnapshot) -> bool {
        a.resource == b.resource
            && a.status == b.status
            && a.connection_status == b.connection_status
            && a.version == b.version
            && a.user_id == b.user_id
    }

    #[test]
    fn every_permutation_of_the_refinements_ends_in_the_same_snapshot() {
        let in_order = fold(
            &(1..=5)
                .map(|i| logged(i as i64, FIXTURES[i]))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let mut order: Vec<usize> = (1..=5).collect();
        let mut count = 0;
        permute(&mut order, 0, &mut |perm| {
            let events: Vec<_> = perm
                .iter()
                .enumerate()
                .map(|(p, &i)| logged(p as i64 + 1, FIXTURES[i]))
                .collect();
            let s = fold(&events).unwrap();
            assert!(same_state(&s, &in_order), "order {perm:?} gave {s:?}");
            count += 1;
        });
        assert_eq!(count, 120);
    }

    fn permute(items: &mut Vec<usize>, k: usize, visit: &mut impl FnMut(&[usize])) {
        if k == items.len() {
            visit(items);
            return;
        }
        for i in k..items.len() {
            items.swap(k, i);
            permute(items, k + 1, visit);
            items.swap(k, i);
        }
    }

    proptest! {
        /// Any order of the refinements 02–06 after 01 gives the in-order resource and status.
        #[test]
        fn resource_and_status_do_not_depend_on_arrival_order(order in Just((1..=5usize).collect::<Vec<_>>()).prop_shuffle()) {
            let mut events = vec![logged(1, FIXTURES[0])];
            events.extend(order.iter().enumerate().map(|(p, &i)| logged(p as i64 + 2, FIXTURES[i])));
            let in_order: Vec<_> = (0..=5).map(|i| logged(i as i64 + 1, FIXTURES[i])).collect();
            prop_assert!(same_state(&fold(&events).unwrap(), &fold(&in_order).unwrap()));
        }
    }
}
