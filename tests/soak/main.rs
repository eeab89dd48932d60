//! Soak against an oracle: ≥100,000 signed deliveries over thousands of accounts, with redeliveries,
//! arrivals out of order, resource-less updates, removals and other families, sent concurrently
//! over HTTP. Every snapshot is then checked against a fold written separately here, from what the
//! generator sent and the positions the service acknowledged.
//!
//! `SOAK_DELIVERIES` sets the number of deliveries (default 100,000); `SOAK_SEED` the seed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::DateTime;
use futures_util::StreamExt;
use loadgen::{Delivery, Workload, generate};
use serde_json::Value;
use uuid::Uuid;

use test_support::*;

/// The expected snapshot facts of one account, folded from its acknowledged events in log order.
/// Written from the contract, independently of the service's fold.
#[derive(Debug, PartialEq)]
struct Expected {
    user: Uuid,
    status: &'static str,
    connection_status: Option<String>,
    resource: Option<Value>,
    version: i64,
    last_position: i64,
    last_event: String,
}

fn oracle(mut events: Vec<(i64, Delivery)>) -> Expected {
    events.sort_by_key(|(position, _)| *position);
    let stamp = |r: &Value| {
        r["updated_at"]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
    };
    let mut expected = Expected {
        user: events[0].1.user,
        status: "active",
        connection_status: None,
        resource: None,
        version: 0,
        last_position: 0,
        last_event: String::new(),
    };
    for (position, sent) in events {
        expected.version += 1;
        expected.last_position = position;
        expected.last_event = sent.event.to_string();
        if expected.status == "removed" {
            continue;
        }
        if sent.event == "accounts.removed" {
            expected.status = "removed";
            continue;
        }
        match &sent.resource {
            Some(new) => {
                let newer = match (expected.resource.as_ref().and_then(stamp), stamp(new)) {
                    (Some(old), Some(new)) => new > old,
                    _ => true,
                };
                if newer {
                    expected.connection_status =
                        new["connection"]["status"].as_str().map(String::from);
                    expected.resource = Some(new.clone());
                }
            }
            None => match sent.event {
                "accounts.added" => expected.connection_status = Some("connecting".into()),
                "accounts.connected" => expected.connection_status = Some("connected".into()),
                "accounts.failed" => expected.connection_status = Some("error".into()),
                _ => {}
            },
        }
    }
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_mixed_workload_matches_an_independent_oracle_exactly() {
    let target: usize = std::env::var("SOAK_DELIVERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261126);
    // Generate lives (with ~10% redeliveries and ~20% neighbours swapped) until the target is met.
    let mut workload = Workload {
        accounts: target / 25 + 1,
        seed,
        ..Workload::default()
    };
    let mut order = generate(&workload);
    while order.len() < target {
        workload.accounts += workload.accounts / 10 + 1;
        order = generate(&workload);
    }
    let deliveries = order.len();

    let mut settings = test_settings().await;
    settings.db.max_connections = 24;
    let app = Arc::new(spawn_app_with(settings).await);
    let started = Instant::now();
    let responses: Vec<(Delivery, i64, bool)> = futures_util::stream::iter(order)
        .map(|sent| {
            let app = app.clone();
            async move {
                let (position, duplicate) = app.deliver(&sent.body).await;
                (sent, position, duplicate)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let elapsed = started.elapsed();
    app.wait_for_projection().await;
    let projected = started.elapsed();

    // Ground truth: each distinct body is one event; exactly one of its deliveries is new.
    // For each distinct body: what was sent, and each delivery's (position, duplicate) answer.
    type Answers = Vec<(i64, bool)>;
    let mut by_body: HashMap<Vec<u8>, (Delivery, Answers)> = HashMap::new();
    for (sent, position, duplicate) in responses {
        by_body
            .entry(sent.body.clone())
            .or_insert_with(|| (sent, vec![]))
            .1
            .push((position, duplicate));
    }
    let mut per_account: BTreeMap<Uuid, Vec<(i64, Delivery)>> = BTreeMap::new();
    let mut redeliveries = 0;
    for (sent, answers) in by_body.into_values() {
        let position = answers[0].0;
        assert!(
            answers.iter().all(|(p, _)| *p == position),
            "all deliveries of a body name one position"
        );
        assert_eq!(
            answers.iter().filter(|(_, duplicate)| !duplicate).count(),
            1,
            "exactly one new event per body"
        );
        redeliveries += answers.len() - 1;
        if sent.event.starts_with("accounts.") {
            per_account
                .entry(sent.account)
                .or_default()
                .push((position, sent));
        }
    }
    let (events, logged_redeliveries) = app.event_count().await;
    assert_eq!(events as usize + redeliveries, deliveries);
    assert_eq!(logged_redeliveries as usize, redeliveries);

    let snapshots = stored_snapshots(&app.pool).await;
    assert_eq!(snapshots.len(), per_account.len());
    let mut differences = 0;
    for (account, events) in per_account {
        let want = oracle(events);
        let got = &snapshots[&account];
        let got = Expected {
            user: got.user_id,
            status: got.status.as_str(),
            connection_status: got.connection_status.clone(),
            resource: got.resource.as_ref().map(|r| r.value()),
            version: got.version,
            last_position: got.last_position,
            last_event: got.last_event.clone(),
        };
        if got != want {
            differences += 1;
            if differences <= 3 {
                eprintln!("account {account}:\n  want {want:?}\n  got  {got:?}");
            }
        }
    }
    eprintln!(
        "soak: {deliveries} deliveries ({redeliveries} redeliveries) over {} accounts, \
         {events} events; ingest {:.1} s ({:.0} deliveries/s, 16 connections); projected {:.1} s after start; \
         {differences} differences",
        snapshots.len(),
        elapsed.as_secs_f64(),
        deliveries as f64 / elapsed.as_secs_f64(),
        projected.as_secs_f64(),
    );
    assert_eq!(differences, 0);
    Arc::into_inner(app).unwrap().stop().await;
}
