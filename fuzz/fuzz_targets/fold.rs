//! Any sequence of bodies (separated by NUL bytes) folded into one account: never a panic, and the
//! fold's counters stay consistent.
#![no_main]

use chrono::{TimeZone, Utc};
use domain::{LoggedEvent, apply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let events: Vec<LoggedEvent> = data
        .split(|&b| b == 0)
        .filter_map(|chunk| domain::Envelope::parse_logged(chunk).ok())
        .enumerate()
        .map(|(i, envelope)| LoggedEvent {
            position: i as i64 + 1,
            received_at: Utc.timestamp_opt(1_800_000_000 + i as i64, 0).unwrap(),
            envelope,
        })
        .collect();
    let account = events.iter().find_map(|e| e.envelope.account);
    let mut snapshot = None;
    let mut folded = 0;
    for event in events.iter().filter(|e| e.envelope.account == account) {
        if let Ok(next) = apply(snapshot.clone(), event) {
            if event.envelope.kind().is_account_event() {
                folded += 1;
                let s = next.as_ref().expect("an account event yields a snapshot");
                assert_eq!(s.version, folded);
                assert_eq!(s.last_position, event.position);
            }
            snapshot = next;
        }
    }
});
