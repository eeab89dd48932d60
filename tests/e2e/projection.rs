//! The projection as users see it through the API.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::*;

#[tokio::test]
async fn the_fixture_sequence_gives_the_contract_view_at_each_step() {
    let app = spawn_app().await;
    let sequence = fixture_sequence();
    // (connection_status, status, which fixture's resource) after each of 01..=08.
    let expected = [
        ("connecting", "active", 0),
        ("connected", "active", 1),
        ("connected", "active", 1), // 03 ties 02's updated_at: the snapshot stays
        ("connected", "active", 3),
        ("connected", "active", 4),
        ("error", "active", 5),
        ("error", "removed", 5),
        ("error", "removed", 5), // removal is terminal
    ];
    let mut first_seen_at = Value::Null;
    let mut removed_at = Value::Null;
    for (step, ((name, body), (connection, status, resource_from))) in
        sequence.iter().zip(expected).enumerate()
    {
        let (position, duplicate) = app.deliver(body).await;
        assert!(!duplicate);
        app.wait_for_projection().await;
        let view = app.account_view(ACCOUNT).await;
        let resource = resource_of(&sequence[resource_from].1);
        assert_eq!(view["account_id"], ACCOUNT, "{name}");
        assert_eq!(view["user_id"], USER, "{name}");
        assert_eq!(view["status"], status, "{name}");
        assert_eq!(view["connection_status"], connection, "{name}");
        assert_eq!(view["resource"], resource, "{name}");
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339(view["resource_updated_at"].as_str().unwrap())
                .unwrap(),
            chrono::DateTime::parse_from_rfc3339(resource["updated_at"].as_str().unwrap()).unwrap(),
            "{name}"
        );
        assert_eq!(view["version"], step + 1, "{name}");
        assert_eq!(view["last_position"], position, "{name}");
        let sent: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(view["last_event"], sent["event"], "{name}");
        if step == 0 {
            first_seen_at = view["first_seen_at"].clone();
            assert_eq!(view["last_event_at"], first_seen_at);
        }
        assert_eq!(view["first_seen_at"], first_seen_at, "{name}");
        if step == 6 {
            removed_at = view["last_event_at"].clone();
        }
        assert_eq!(view["removed_at"], removed_at, "{name}");
        let keys: Vec<&str> = view
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 12, "exactly the contract's fields: {keys:?}");
    }
    let listed: Value = app
        .get(&format!("/v1/users/{USER}/accounts"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["user_id"], USER);
    assert_eq!(
        listed["accounts"],
        Value::Array(vec![app.account_view(ACCOUNT).await])
    );
    app.stop().await;
}

#[tokio::test]
async fn each_real_delivery_flow_is_accepted_whole_and_ends_with_its_newest_resource() {
    let app = spawn_app().await;
    let root = fixtures_dir().join("real-deliveries");
    let mut newest: BTreeMap<String, Value> = BTreeMap::new();
    let mut flows = 0;
    for flow in [
        "2025-06-cbv-flow",
        "2026-01-cbv-flow",
        "2026-08-activity-flow",
    ] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(flow))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let body = std::fs::read(&file).unwrap();
            let (_, duplicate) = app.deliver(&body).await;
            assert!(!duplicate, "{}", file.display());
            let json: Value = serde_json::from_slice(&body).unwrap();
            if json["event"] == "accounts.updated" && json["data"]["resource"].is_object() {
                newest.insert(
                    json["data"]["account"].as_str().unwrap().into(),
                    json["data"]["resource"].clone(),
                );
            }
        }
        flows += 1;
    }
    assert_eq!(flows, 3);
    assert_eq!(
        app.event_count().await,
        (21, 0),
        "all 21 real deliveries are events"
    );
    app.wait_for_projection().await;
    assert_eq!(newest.len(), 3);
    for (account, resource) in newest {
        let view = app.account_view(&account).await;
        assert_eq!(view["resource"], resource, "{account}");
        assert_eq!(view["connection_status"], "connected");
    }
    app.stop().await;
}

#[tokio::test]
async fn any_arrival_order_with_redeliveries_ends_in_the_same_snapshot() {
    let app = spawn_app().await;
    let sequence = fixture_sequence();
    let refinements: Vec<&Vec<u8>> = sequence[1..=5].iter().map(|(_, b)| b).collect();
    let in_order = Uuid::new_v4();
    app.deliver(&for_account(&sequence[0].1, in_order)).await;
    for body in &refinements {
        app.deliver(&for_account(body, in_order)).await;
    }
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut accounts = vec![];
    let mut order: Vec<usize> = (0..5).collect();
    let mut permutations = vec![];
    permute(&mut order, 0, &mut permutations);
    assert_eq!(permutations.len(), 120);
    for permutation in permutations {
        let account = Uuid::new_v4();
        let mut bodies = vec![for_account(&sequence[0].1, account)];
        bodies.extend(
            permutation
                .iter()
                .map(|&i| for_account(refinements[i], account)),
        );
        let mut delivered: Vec<Vec<u8>> = vec![];
        for body in bodies {
            delivered.push(body.clone());
            app.deliver(&body).await;
            // Now and then, redeliver something already sent.
            if rng.random_bool(0.4) {
                let again = &delivered[rng.random_range(0..delivered.len())];
                assert!(app.deliver(again).await.1, "a redelivery is a duplicate");
            }
        }
        accounts.push(account);
    }
    app.wait_for_projection().await;
    let reference = app.account_view(in_order).await;
    let normalise = |view: &Value, account: Uuid| -> Value {
        let text = view.to_string().replace(&account.to_string(), ACCOUNT);
        let view: Value = serde_json::from_str(&text).unwrap();
        serde_json::json!([
            view["status"],
            view["connection_status"],
            view["resource"],
            view["resource_updated_at"],
            view["version"],
            view["user_id"]
        ])
    };
    let want = normalise(&reference, in_order);
    assert_eq!(reference["version"], 6);
    for account in accounts {
        assert_eq!(
            normalise(&app.account_view(account).await, account),
            want,
            "{account}"
        );
    }
    app.stop().await;
}

fn permute(items: &mut Vec<usize>, k: usize, out: &mut Vec<Vec<usize>>) {
    if k == items.len() {
        out.push(items.clone());
        return;
    }
    for i in k..items.len() {
        items.swap(k, i);
        permute(items, k + 1, out);
        items.swap(k, i);
    }
}

#[tokio::test]
async fn a_burst_of_a_thousand_refinements_writes_the_snapshot_once() {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    // Count every row written to account_snapshots, whoever writes it.
    sqlx::raw_sql(
        "CREATE TABLE snapshot_writes (account_id uuid);
         CREATE FUNCTION count_snapshot_write() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO snapshot_writes VALUES (NEW.account_id); RETURN NEW; END $$;
         CREATE TRIGGER count_snapshot_writes AFTER INSERT OR UPDATE ON account_snapshots
           FOR EACH ROW EXECUTE FUNCTION count_snapshot_write();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    for step in 0..1000 {
        append_direct(&pool, &refinement(account, user, step)).await;
    }
    let mut conn = pool.acquire().await.unwrap();
    let outcome = projector::run_batch(
        &mut conn,
        &test_support::vault(),
        store::partitions::Part::WHOLE,
        1000,
    )
    .await
    .unwrap();
    assert_eq!(outcome.events, 1000);
    assert_eq!(outcome.snapshots_written, 1);
    assert_eq!(outcome.checkpoint, 1000);
    let writes: i64 = sqlx::query_scalar("SELECT count(*) FROM snapshot_writes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(writes, 1, "one row write for the whole burst");
    let snapshot = stored_snapshots(&pool).await.remove(&account).unwrap();
    assert_eq!(snapshot.version, 1000);
    assert_eq!(snapshot.resource.unwrap().value()["step"], 999);
    assert_eq!(
        projector::run_batch(
            &mut conn,
            &test_support::vault(),
            store::partitions::Part::WHOLE,
            1000
        )
        .await
        .unwrap()
        .events,
        0,
        "nothing left"
    );
}

#[tokio::test]
async fn the_projector_wakes_on_notification_without_waiting_for_its_poll() {
    let mut settings = test_settings().await;
    settings.projector.poll_interval = std::time::Duration::from_secs(3600);
    let app = spawn_app_with(settings).await;
    poll_until("the projector leads", || async {
        leader(&app.pool).await.is_some()
    })
    .await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    app.wait_for_projection().await;
    assert_eq!(app.account_view(ACCOUNT).await["version"], 1);
    app.stop().await;
}

/// The store's SQL filter of folded events (rebuild and verify read through it) and the Rust rule
/// the projector applies (`EventKind::is_folded`) pick the same events, name by name.
#[tokio::test]
async fn the_sql_filter_of_folded_events_is_the_rust_rule() {
    use futures_util::TryStreamExt;
    let pool = sqlx::PgPool::connect(&migrated_database().await)
        .await
        .unwrap();
    let names = [
        "accounts.added",
        "accounts.connected",
        "accounts.failed",
        "accounts.updated",
        "accounts.removed",
        "accounts.some_future_event",
        "accounts.",
        domain::ACCOUNT_FETCHED,
        domain::ACCOUNT_GONE,
        domain::ACCOUNT_NOT_FOUND,
        "paystubs.added",
        "users.fully_synced",
        "accounts",
        "accountsXupdated",
        "Accounts.updated",
        "argyle.account_fetched.v2",
    ];
    for name in names {
        let body = serde_json::json!({
            "event": name,
            "name": "rule-check",
            "data": {"account": Uuid::new_v4(), "user": Uuid::new_v4()},
        });
        append_direct(&pool, &serde_json::to_vec(&body).unwrap()).await;
    }
    let mut conn = pool.acquire().await.unwrap();
    let vault = test_support::vault();
    let head = store::log::head(&mut conn).await.unwrap();
    let by_sql: Vec<String> = store::log::account_events_by_account(
        &mut conn,
        &vault,
        head,
        None,
        store::partitions::Part::WHOLE,
    )
    .map_ok(|stored| stored.event)
    .try_collect()
    .await
    .unwrap();
    let mut by_sql = by_sql;
    by_sql.sort();
    let mut by_rust: Vec<String> = names
        .iter()
        .filter(|name| domain::EventKind::of(name).is_folded())
        .map(|name| (*name).to_owned())
        .collect();
    by_rust.sort();
    assert_eq!(by_sql, by_rust);
    assert_eq!(
        by_rust.len(),
        9,
        "both kinds of name are among the {} cases",
        names.len()
    );
}
