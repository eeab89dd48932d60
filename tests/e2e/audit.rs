//! Audit and replay: history, time travel, field-level changes, rebuild with verify, export.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::helpers::*;

#[tokio::test]
async fn time_travel_at_every_step_equals_what_the_projector_showed_then() {
    let app = spawn_app().await;
    let mut seen = vec![];
    for (_, body) in fixture_sequence() {
        let (position, _) = app.deliver(&body).await;
        app.wait_for_projection().await;
        seen.push((position, app.account_view(ACCOUNT).await));
    }
    for (position, view) in &seen {
        let at_position = app
            .account_view(format!("{ACCOUNT}?at_position={position}"))
            .await;
        assert_eq!(&at_position, view, "at_position={position}");
        let as_of = view["last_event_at"].as_str().unwrap();
        let encoded = as_of.replace('+', "%2B");
        let at_time = app.account_view(format!("{ACCOUNT}?as_of={encoded}")).await;
        assert_eq!(&at_time, view, "as_of={as_of}");
    }
    let before = app
        .get(&format!(
            "/v1/accounts/{ACCOUNT}?as_of=2000-01-01T00:00:00Z"
        ))
        .await;
    assert_eq!(before.status(), 404);
    assert_eq!(
        app.get(&format!("/v1/accounts/{ACCOUNT}?at_position=0"))
            .await
            .status(),
        404
    );
    // A time zone offset names the same instant.
    let first = seen[0].1["last_event_at"].as_str().unwrap();
    let shifted = chrono::DateTime::parse_from_rfc3339(first)
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
        .replace('+', "%2B");
    assert_eq!(
        app.account_view(format!("{ACCOUNT}?as_of={shifted}")).await,
        seen[0].1
    );
    app.stop().await;
}

#[tokio::test]
async fn malformed_history_queries_are_400_invalid_query() {
    let app = spawn_app().await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    for query in [
        format!("/v1/accounts/{ACCOUNT}?as_of=yesterday"),
        format!("/v1/accounts/{ACCOUNT}?as_of=2026-03-02"),
        format!("/v1/accounts/{ACCOUNT}?at_position=-1"),
        format!("/v1/accounts/{ACCOUNT}?at_position=1.5"),
        format!("/v1/accounts/{ACCOUNT}?at_position=1&at_position=2"),
        format!("/v1/accounts/{ACCOUNT}/events?limit=0"),
        format!("/v1/accounts/{ACCOUNT}/events?limit=1001"),
        format!("/v1/accounts/{ACCOUNT}/events?after=-1"),
        "/v1/events?limit=abc".to_string(),
        "/v1/events?after=99999999999999999999".to_string(),
    ] {
        let response = app.get(&query).await;
        assert_eq!(response.status(), 400, "{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(
            response.json::<Value>().await.unwrap()["code"],
            "invalid_query",
            "{query}"
        );
    }
    assert_eq!(app.get("/v1/accounts/nope/events").await.status(), 400);
    assert_eq!(app.get("/v1/accounts/nope/changes").await.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn history_pages_through_the_log_in_order_with_bodies_as_received() {
    let app = spawn_app().await;
    let sequence = fixture_sequence();
    for (_, body) in &sequence {
        app.deliver(body).await;
    }
    app.deliver(&sequence[2].1).await; // a redelivery of position 3
    let other = std::fs::read(
        fixtures_dir().join("real-deliveries/2026-08-activity-flow/01_users.fully_synced.json"),
    )
    .unwrap();
    app.deliver(&other).await;

    let mut positions = vec![];
    let mut after = 0;
    loop {
        let response = app
            .get(&format!(
                "/v1/accounts/{ACCOUNT}/events?after={after}&limit=3"
            ))
            .await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let page: Value = serde_json::from_str(&text).unwrap();
        for event in page["events"].as_array().unwrap() {
            let position = event["position"].as_i64().unwrap();
            let body = &sequence[position as usize - 1].1;
            assert_eq!(event["account_id"], ACCOUNT);
            assert_eq!(event["user_id"], USER);
            assert_eq!(
                event["event"],
                serde_json::from_slice::<Value>(body).unwrap()["event"]
            );
            assert_eq!(event["deliveries"], if position == 3 { 2 } else { 1 });
            assert!(event["received_at"].is_string());
            assert!(
                text.contains(std::str::from_utf8(body).unwrap()),
                "payload {position} is byte-exact"
            );
            positions.push(position);
        }
        match page["next_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(positions, (1..=8).collect::<Vec<_>>());

    let all: Value = app.get("/v1/events?limit=1000").await.json().await.unwrap();
    let events = all["events"].as_array().unwrap();
    assert_eq!(events.len(), 9);
    assert_eq!(events[8]["event"], "users.fully_synced");
    assert_eq!(events[8]["account_id"], Value::Null);
    assert_eq!(all["next_after"], Value::Null);
    let last: Value = app.get("/v1/events?after=8").await.json().await.unwrap();
    assert_eq!(last["events"].as_array().unwrap().len(), 1);
    let none: Value = app
        .get(&format!("/v1/accounts/{}/events", Uuid::new_v4()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(none, serde_json::json!({"events": [], "next_after": null}));
    app.stop().await;
}

fn paths(patch: &Value) -> BTreeSet<String> {
    patch
        .as_array()
        .unwrap()
        .iter()
        .map(|op| {
            format!(
                "{} {}",
                op["op"].as_str().unwrap(),
                op["path"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn changes_list_exactly_the_fields_each_refinement_changed() {
    let app = spawn_app().await;
    let sequence = fixture_sequence();
    for (_, body) in &sequence[..6] {
        app.deliver(body).await;
    }
    // A late refinement older than what we hold changes nothing.
    let mut late: Value = serde_json::from_slice(&sequence[3].1).unwrap();
    late["data"]["resource"]["employers"] = serde_json::json!(["Stale Inc"]);
    app.deliver(&serde_json::to_vec_pretty(&late).unwrap())
        .await;

    let changes: Value = app
        .get(&format!("/v1/accounts/{ACCOUNT}/changes"))
        .await
        .json()
        .await
        .unwrap();
    let changes = changes["changes"].as_array().unwrap();
    let positions: Vec<i64> = changes
        .iter()
        .map(|c| c["position"].as_i64().unwrap())
        .collect();
    assert_eq!(
        positions,
        [1, 2, 4, 5, 6],
        "03 ties 02 and the late refinement is older: no change"
    );
    assert_eq!(changes[0]["event"], "accounts.added");
    assert!(changes[0]["received_at"].is_string());
    assert_eq!(
        paths(&changes[1]["patch"]),
        BTreeSet::from([
            "replace /updated_at".to_string(),
            "replace /connection/status".to_string(),
            "replace /connection/updated_at".to_string(),
        ])
    );
    assert_eq!(
        paths(&changes[4]["patch"]),
        BTreeSet::from([
            "replace /updated_at".to_string(),
            "replace /connection/status".to_string(),
            "replace /connection/error_code".to_string(),
            "replace /connection/error_message".to_string(),
            "replace /connection/updated_at".to_string(),
        ])
    );
    // Applying the patches in order rebuilds each resource exactly.
    let mut resource = Value::Null;
    for (change, fixture_index) in changes.iter().zip([0, 1, 3, 4, 5]) {
        let patch: json_patch::Patch = serde_json::from_value(change["patch"].clone()).unwrap();
        json_patch::patch(&mut resource, &patch).unwrap();
        assert_eq!(
            resource,
            resource_of(&sequence[fixture_index].1),
            "after position {}",
            change["position"]
        );
    }
    app.stop().await;
}

async fn seed(app: &TestApp) -> Vec<Uuid> {
    for (_, body) in fixture_sequence() {
        app.deliver(&body).await;
    }
    let mut accounts = vec![Uuid::parse_str(ACCOUNT).unwrap()];
    for (account, user) in (0..5).map(|_| (Uuid::new_v4(), Uuid::new_v4())) {
        for step in 0..10 {
            app.deliver(&refinement(account, user, step)).await;
        }
        accounts.push(account);
    }
    app.wait_for_projection().await;
    accounts
}

#[tokio::test]
async fn rebuild_verify_passes_when_consistent_and_names_a_tampered_account() {
    let app = spawn_app().await;
    let accounts = seed(&app).await;
    let url = &app.database_url;
    let (code, out, err) = run_binary(url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.is_empty());

    let tampered = accounts[2];
    sqlx::query("UPDATE account_snapshots SET version = 99, connection_status = 'error' WHERE account_id = $1")
        .bind(tampered)
        .execute(&app.pool)
        .await
        .unwrap();
    let removed = accounts[3];
    sqlx::query("DELETE FROM account_snapshots WHERE account_id = $1")
        .bind(removed)
        .execute(&app.pool)
        .await
        .unwrap();
    let forged = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO account_snapshots SELECT $1, user_id, status, connection_status, resource, resource_updated_at,
           version, last_position, last_event, first_seen_at, last_event_at, removed_at
         FROM account_snapshots WHERE account_id = $2",
    )
    .bind(forged)
    .bind(accounts[0])
    .execute(&app.pool)
    .await
    .unwrap();
    let before = stored_snapshots(&app.pool).await;

    let (code, out, _) = run_binary(url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 1);
    let lines: BTreeSet<&str> = out.lines().collect();
    assert_eq!(
        lines,
        BTreeSet::from([
            format!("{tampered} connection_status,version").as_str(),
            format!("{removed} missing").as_str(),
            format!("{forged} unexpected").as_str(),
        ])
    );
    assert_eq!(
        stored_snapshots(&app.pool).await,
        before,
        "--verify writes nothing"
    );

    let (code, out, _) = run_binary(
        url,
        &["rebuild", "--verify", "--account", &tampered.to_string()],
        &[],
    )
    .await;
    assert_eq!(
        (code, out.trim()),
        (1, format!("{tampered} connection_status,version").as_str())
    );
    let (code, _, _) = run_binary(
        url,
        &["rebuild", "--verify", "--account", &accounts[1].to_string()],
        &[],
    )
    .await;
    assert_eq!(code, 0, "other accounts are fine");

    let (code, _, err) =
        run_binary(url, &["rebuild", "--account", &tampered.to_string()], &[]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run_binary(url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 1);
    assert!(
        !out.contains(&tampered.to_string()),
        "the one account was repaired: {out}"
    );

    let (code, _, err) = run_binary(url, &["rebuild"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("rebuild"),
        "progress or summary on stderr: {err}"
    );
    let (code, out, err) = run_binary(url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        stored_snapshots(&app.pool).await,
        fresh_fold(&app.pool).await
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_under_concurrent_ingest_ends_consistent_with_the_log() {
    let app = Arc::new(spawn_app().await);
    let accounts: Vec<(Uuid, Uuid)> = (0..8).map(|_| (Uuid::new_v4(), Uuid::new_v4())).collect();
    for step in 0..200 {
        let (account, user) = accounts[step as usize % accounts.len()];
        app.deliver(&refinement(account, user, step)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ingest = tokio::spawn({
        let (app, stop, accounts) = (app.clone(), stop.clone(), accounts.clone());
        async move {
            let mut step = 200;
            while !stop.load(Ordering::Relaxed) {
                let (account, user) = accounts[step as usize % accounts.len()];
                app.deliver(&refinement(account, user, step)).await;
                step += 1;
            }
            step - 200
        }
    });
    for _ in 0..3 {
        let (code, _, err) = run_binary(&app.database_url, &["rebuild"], &[]).await;
        assert_eq!(code, 0, "{err}");
    }
    stop.store(true, Ordering::Relaxed);
    let delivered_during = ingest.await.unwrap();
    assert!(
        delivered_during > 0,
        "ingest kept accepting during the rebuilds"
    );
    app.wait_for_projection().await;
    let (code, out, err) = run_binary(&app.database_url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let snapshots = stored_snapshots(&app.pool).await;
    let total: i64 = snapshots.values().map(|s| s.version).sum();
    assert_eq!(
        total,
        200 + i64::from(delivered_during),
        "every event folded exactly once"
    );
    Arc::into_inner(app).unwrap().stop().await;
}

#[tokio::test]
async fn export_lines_check_out_byte_for_byte_and_filters_apply() {
    let app = spawn_app().await;
    let accounts = seed(&app).await;
    app.deliver(&fixture("01_accounts.added.json")).await; // a redelivery
    let other = std::fs::read(
        fixtures_dir().join("real-deliveries/2026-08-activity-flow/01_users.fully_synced.json"),
    )
    .unwrap();
    app.deliver(&other).await;
    let url = &app.database_url;
    let secret = [("ARGYLE_WEBHOOK_SECRETS", SECRET)];

    let (code, out, err) = run_binary(url, &["export"], &secret).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with('\n'));
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let (events, _) = app.event_count().await;
    assert_eq!(lines.len() as i64, events);
    let positions: Vec<i64> = lines
        .iter()
        .map(|l| l["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, (1..=events).collect::<Vec<_>>(), "log order");
    for line in &lines {
        let body = line["body"].as_str().unwrap().as_bytes();
        assert_eq!(line["body_sha256"], hex::encode(Sha256::digest(body)));
        assert_eq!(line["signature"], sign(body));
        assert_eq!(line["signature_valid"], true);
        for key in [
            "received_at",
            "event",
            "account_id",
            "user_id",
            "deliveries",
        ] {
            assert!(line.get(key).is_some(), "{key}");
        }
    }
    assert_eq!(
        lines[0]["body"].as_str().unwrap().as_bytes(),
        fixture("01_accounts.added.json")
    );
    assert_eq!(lines[0]["deliveries"], 2);

    let (_, out, _) = run_binary(
        url,
        &["export"],
        &[("ARGYLE_WEBHOOK_SECRETS", "another_secret")],
    )
    .await;
    assert!(
        out.lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["signature_valid"] == false)
    );
    let (_, out, _) = run_binary(url, &["export"], &[]).await;
    assert!(
        out.lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["signature_valid"].is_null())
    );

    let account = accounts[1].to_string();
    let (_, out, _) = run_binary(url, &["export", "--account", &account], &secret).await;
    assert_eq!(out.lines().count(), 10);
    assert!(
        out.lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["account_id"] == account.as_str())
    );
    let (_, out, _) = run_binary(url, &["export", "--user", USER], &secret).await;
    assert_eq!(out.lines().count(), 8);

    let since = lines[3]["received_at"].as_str().unwrap();
    let until = lines[6]["received_at"].as_str().unwrap();
    let (_, out, _) = run_binary(
        url,
        &["export", "--since", since, "--until", until],
        &secret,
    )
    .await;
    let window: Vec<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["position"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(window, [4, 5, 6], "since is inclusive, until exclusive");

    let (code, _, err) = run_binary(url, &["export", "--since", "last tuesday"], &[]).await;
    assert_eq!(code, 2, "clap rejects a bad instant");
    assert!(err.contains("RFC 3339"), "{err}");
    app.stop().await;
}
