//! Property tests of the parser and the fold: no input makes them panic, and the fold's invariants
//! hold for any sequence of events. The cargo-fuzz targets in `fuzz/` explore the same entry points
//! for longer.

use chrono::{TimeZone, Utc};
use domain::{AccountSnapshot, AccountStatus, Envelope, LoggedEvent, apply};
use proptest::prelude::*;
use serde_json::{Value, json};

const ACCOUNT: &str = "0187c66e-e7e5-811c-b006-2232f00f426a";
const USER: &str = "018051aa-f7a9-a0db-2f38-6cfa325e9d69";

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn updated_at() -> impl Strategy<Value = Value> {
    let offset = chrono::FixedOffset::east_opt(3600).unwrap();
    prop_oneof![
        (0i64..10_000).prop_map(|s| Value::from(
            Utc.timestamp_opt(1_772_000_000 + s, 0)
                .unwrap()
                .to_rfc3339()
        )),
        (0i64..10_000).prop_map(move |s| Value::from(
            Utc.timestamp_opt(1_772_000_000 + s, 123)
                .unwrap()
                .with_timezone(&offset)
                .to_rfc3339()
        )),
        Just(Value::from("not a date")),
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
    ]
}

fn resource() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (updated_at(), prop::option::of("[a-z]{3,10}"), json_value()).prop_map(|(at, status, extra)| {
            json!({"id": ACCOUNT, "updated_at": at, "connection": {"status": status}, "extra": extra})
        }),
        1 => json_value(),
    ]
}

fn event() -> impl Strategy<Value = Value> {
    let name = prop_oneof![
        Just("accounts.added"),
        Just("accounts.connected"),
        Just("accounts.failed"),
        Just("accounts.updated"),
        Just("accounts.removed"),
        Just("accounts.reticulated"),
        Just("paystubs.added"),
    ];
    (name, prop::option::of(resource())).prop_map(|(name, resource)| {
        let mut data = json!({"account": ACCOUNT, "user": USER});
        if let Some(resource) = resource {
            data["resource"] = resource;
        }
        json!({"event": name, "data": data})
    })
}

fn logged(position: usize, body: &Value) -> LoggedEvent {
    LoggedEvent {
        position: position as i64 + 1,
        received_at: Utc
            .timestamp_opt(1_800_000_000 + position as i64, 0)
            .unwrap(),
        envelope: Envelope::parse_logged(&serde_json::to_vec_pretty(body).unwrap()).unwrap(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsing_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::parse(&bytes);
        let _ = Envelope::parse_logged(&bytes);
    }

    #[test]
    fn parsing_arbitrary_json_never_panics(value in json_value()) {
        let _ = Envelope::parse(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn the_fold_keeps_its_invariants_for_any_sequence(events in prop::collection::vec(event(), 1..40)) {
        let logged: Vec<_> = events.iter().enumerate().map(|(i, e)| logged(i, e)).collect();
        let mut snapshot: Option<AccountSnapshot> = None;
        let mut folded = 0;
        let mut removed_at = None;
        for event in &logged {
            let Ok(next) = apply(snapshot.clone(), event) else { continue };
            if !event.envelope.kind().is_folded() {
                prop_assert_eq!(&next, &snapshot);
                continue;
            }
            folded += 1;
            let s = next.as_ref().unwrap();
            prop_assert_eq!(s.version, folded);
            prop_assert_eq!(s.last_position, event.position);
            let first_removal = removed_at.is_none() && event.envelope.event == "accounts.removed";
            if first_removal {
                removed_at = Some(event.received_at);
            }
            prop_assert_eq!(s.removed_at, removed_at);
            prop_assert_eq!(s.status == AccountStatus::Removed, removed_at.is_some());
            if let (Some(before), false) = (snapshot.as_ref(), first_removal) {
                if before.status == AccountStatus::Removed {
                    // Terminal: only the counters move.
                    prop_assert_eq!(&s.resource, &before.resource);
                    prop_assert_eq!(&s.connection_status, &before.connection_status);
                }
                if let (Some(old), Some(new)) = (before.resource_updated_at(), s.resource_updated_at()) {
                    // While both sides carry a parseable stamp, it never goes back.
                    prop_assert!(new >= old);
                }
            }
            snapshot = next;
        }
    }
}
