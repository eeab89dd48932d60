//! Soak against an oracle: ≥100,000 signed deliveries over thousands of accounts, with redeliveries,
//! arrivals out of order, resource-less updates, removals and other families, sent concurrently
//! over HTTP. Every snapshot is then checked against a fold written separately here, from what the
//! generator sent and the positions the service acknowledged.
//!
//! `SOAK_DELIVERIES` sets the number of deliveries (default 100,000); `SOAK_SEED` the seed.

#[path = "../e2e/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration as Span, Utc};
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use uuid::Uuid;

use helpers::*;

/// What the generator meant by one event.
#[derive(Clone)]
struct Sent {
    account: Uuid,
    user: Uuid,
    event: &'static str,
    resource: Option<Value>,
    body: Vec<u8>,
}

fn resource(account: Uuid, user: Uuid, at: DateTime<Utc>, status: &str, step: u32) -> Value {
    json!({
        "id": account, "user": user, "employers": ["Soak Co"], "item": "item_000000001",
        "source": "argyle_sandbox", "created_at": "2026-03-02T15:04:11.120455Z",
        "updated_at": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "connection": {"status": status, "error_code": null, "error_message": null},
        "availability": {"paystubs": {"status": "in_progress", "available_count": step}},
        "step": step
    })
}

fn body(event: &str, account: Uuid, user: Uuid, resource: Option<&Value>) -> Vec<u8> {
    let mut data = json!({"account": account, "user": user});
    if let Some(resource) = resource {
        data["resource"] = resource.clone();
    }
    serde_json::to_vec_pretty(&json!({"event": event, "name": "soak", "data": data})).unwrap()
}

/// One account's life in true order: a first-connection burst, maybe a failure, re-scans,
/// resource-less updates, other families, maybe a removal.
fn life(rng: &mut StdRng, account: Uuid, user: Uuid) -> Vec<Sent> {
    let mut at: DateTime<Utc> = "2026-03-02T15:04:11Z".parse().unwrap();
    let mut events = vec![];
    let push = |events: &mut Vec<Sent>, event: &'static str, resource: Option<Value>| {
        let body = body(event, account, user, resource.as_ref());
        events.push(Sent {
            account,
            user,
            event,
            resource,
            body,
        });
    };
    let mut step = 0;
    let mut tick = |rng: &mut StdRng| {
        at += Span::milliseconds(rng.random_range(1..5000));
        step += 1;
        (at, step)
    };
    let (t, s) = tick(rng);
    push(
        &mut events,
        "accounts.added",
        Some(resource(account, user, t, "connecting", s)),
    );
    let (t, s) = tick(rng);
    push(
        &mut events,
        "accounts.connected",
        Some(resource(account, user, t, "connected", s)),
    );
    for _ in 0..rng.random_range(10..30) {
        let (t, s) = tick(rng);
        push(
            &mut events,
            "accounts.updated",
            Some(resource(account, user, t, "connected", s)),
        );
        if rng.random_bool(0.05) {
            push(&mut events, "accounts.updated", None);
        }
        if rng.random_bool(0.05) {
            let paystubs = serde_json::to_vec_pretty(
                &json!({"event": "paystubs.partially_synced", "name": "soak",
                "data": {"account": account, "user": user, "available_count": s}}),
            )
            .unwrap();
            events.push(Sent {
                account,
                user,
                event: "paystubs.partially_synced",
                resource: None,
                body: paystubs,
            });
        }
    }
    if rng.random_bool(0.1) {
        let (t, s) = tick(rng);
        push(
            &mut events,
            "accounts.failed",
            Some(resource(account, user, t, "error", s)),
        );
    }
    if rng.random_bool(0.1) {
        push(&mut events, "accounts.removed", None);
        if rng.random_bool(0.5) {
            let (t, s) = tick(rng);
            push(
                &mut events,
                "accounts.updated",
                Some(resource(account, user, t, "connected", s)),
            );
        }
    }
    events
}

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

fn oracle(mut events: Vec<(i64, Sent)>) -> Expected {
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
    let mut rng = StdRng::seed_from_u64(seed);

    // Generate lives until their events alone reach the target; redeliveries come on top.
    let mut queues: Vec<Vec<Sent>> = vec![];
    let mut planned = 0usize;
    while planned < target {
        let life = life(&mut rng, Uuid::new_v4(), Uuid::new_v4());
        planned += life.len();
        queues.push(life);
    }
    // ~20% out of order: swap neighbours within an account's life.
    let mut swapped = 0;
    for life in &mut queues {
        for i in 1..life.len() {
            if rng.random_bool(0.2) {
                life.swap(i - 1, i);
                swapped += 1;
            }
        }
    }
    // Interleave accounts, then add redeliveries of bodies already sent.
    let mut cursors: Vec<(usize, usize)> = (0..queues.len()).map(|i| (i, 0)).collect();
    let mut order: Vec<Sent> = Vec::with_capacity(target);
    while !cursors.is_empty() {
        let pick = rng.random_range(0..cursors.len().min(64));
        let (life, next) = cursors[pick];
        order.push(queues[life][next].clone());
        if next + 1 == queues[life].len() {
            cursors.swap_remove(pick);
        } else {
            cursors[pick].1 += 1;
        }
        if rng.random_bool(0.1) {
            let again =
                order[rng.random_range(order.len().saturating_sub(2000)..order.len())].clone();
            order.push(again);
        }
    }
    let deliveries = order.len();
    assert!(deliveries >= target, "{deliveries} deliveries planned");

    let mut settings = test_settings().await;
    settings.db.max_connections = 24;
    let app = Arc::new(spawn_app_with(settings).await);
    let started = Instant::now();
    let responses: Vec<(Sent, i64, bool)> = futures_util::stream::iter(order)
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
    let mut by_body: HashMap<Vec<u8>, (Sent, Answers)> = HashMap::new();
    for (sent, position, duplicate) in responses {
        by_body
            .entry(sent.body.clone())
            .or_insert_with(|| (sent, vec![]))
            .1
            .push((position, duplicate));
    }
    let mut per_account: BTreeMap<Uuid, Vec<(i64, Sent)>> = BTreeMap::new();
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
        "soak: {deliveries} deliveries ({redeliveries} redeliveries, {swapped} swapped neighbours) over {} accounts, \
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
