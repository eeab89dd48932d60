//! Nothing signed is lost and nothing stalls: odd events are logged and either applied or
//! quarantined while every other account goes on; a refused snapshot write is isolated; a dead task
//! stops the process; every request's work is bounded.

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use sqlx::Connection;
use uuid::Uuid;

use crate::helpers::*;

/// An `accounts.updated` body for `account` whose resource is the JSON text `resource`, written by
/// hand so it can hold what `serde_json` would never write (unpaired surrogate escapes, huge
/// numbers).
fn raw_update(account: Uuid, user: Uuid, resource: &str) -> Vec<u8> {
    format!(
        "{{\n  \"event\": \"accounts.updated\",\n  \"name\": \"odd\",\n  \"data\": {{\n    \"account\": \"{account}\",\n    \"user\": \"{user}\",\n    \"resource\": {resource}\n  }}\n}}"
    )
    .into_bytes()
}

fn resource_with(account: Uuid, updated_at: &str, extra: &str) -> String {
    format!(
        r#"{{"id": "{account}", "updated_at": {updated_at}, "connection": {{"status": "connected"}}, "extra": {extra}}}"#
    )
}

/// The quarantined positions, with who refused each.
async fn quarantine(pool: &sqlx::PgPool) -> BTreeSet<(i64, String)> {
    let mut conn = pool.acquire().await.unwrap();
    store::quarantine::all(&mut conn, &test_support::vault())
        .await
        .unwrap()
        .into_iter()
        .map(|q| (q.position, q.refused_by))
        .collect()
}

/// The stored body of `position`, byte for byte.
async fn stored_body(pool: &sqlx::PgPool, position: i64) -> Vec<u8> {
    logged_body(pool, position).await
}

/// The raw JSON text of the account's resource as the API serves it.
async fn served_resource(app: &TestApp, account: Uuid) -> Option<String> {
    let response = app.get(&format!("/v1/accounts/{account}")).await;
    if response.status() != 200 {
        return None;
    }
    let text = response.text().await.unwrap();
    // The view is ours; only the resource inside it is Argyle's text, served as it was stored.
    let start = text.find("\"resource\":")? + "\"resource\":".len();
    let end = text.find(",\"resource_updated_at\"")?;
    Some(text[start..end].to_owned())
}

async fn assert_verify_agrees(pool: &sqlx::PgPool) {
    let differences = projector::rebuild::verify(
        pool,
        &test_support::vault(),
        None,
        None,
        &projector::rebuild::Silent,
    )
    .await
    .unwrap();
    assert!(differences.is_empty(), "verify: {differences:?}");
}

/// What the table below expects of an odd event.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Folded, its resource kept byte for byte.
    Applied,
    /// Quarantined by the fold, the account's snapshot unchanged.
    Quarantined,
}

#[tokio::test]
async fn every_named_class_of_odd_event_is_logged_and_applied_or_quarantined_while_the_rest_go_on()
{
    let app = spawn_app().await;
    let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    let classes: Vec<(&str, String, Expect)> = vec![
        (
            "year 0000 (before year 1 in UTC)",
            r#""0000-01-01T00:00:00+01:00""#.into(),
            Expect::Quarantined,
        ),
        (
            "year 0001 that is year 0 in UTC",
            r#""0001-01-01T00:00:00+00:01""#.into(),
            Expect::Quarantined,
        ),
        (
            "year 9999 that is year 10000 in UTC",
            r#""9999-12-31T23:59:59-00:01""#.into(),
            Expect::Quarantined,
        ),
        (
            "leap second",
            r#""2016-12-31T23:59:60Z""#.into(),
            Expect::Applied,
        ),
        (
            "extreme positive offset",
            r#""2026-03-02T00:00:00+23:59""#.into(),
            Expect::Applied,
        ),
        (
            "extreme negative offset",
            r#""2026-03-02T00:00:00-23:59""#.into(),
            Expect::Applied,
        ),
        (
            "offset beyond a day",
            r#""2026-03-02T00:00:00+24:00""#.into(),
            Expect::Applied,
        ),
        (
            "impossible calendar date",
            r#""2026-02-30T00:00:00Z""#.into(),
            Expect::Applied,
        ),
        (
            "excess fractional digits",
            r#""2026-03-02T00:00:00.123456789123456Z""#.into(),
            Expect::Applied,
        ),
        (
            "updated_at not a string",
            "20260302".into(),
            Expect::Quarantined,
        ),
        (
            "updated_at with a NUL",
            r#""2026-03-02\u0000""#.into(),
            Expect::Applied,
        ),
    ];
    let extras: Vec<(&str, String, Expect)> = vec![
        ("escaped NUL", r#""a\u0000b""#.into(), Expect::Applied),
        (
            "unpaired high surrogate",
            r#""a\ud800b""#.into(),
            Expect::Applied,
        ),
        (
            "unpaired low surrogate",
            r#""\udc00""#.into(),
            Expect::Applied,
        ),
        ("number beyond numeric", "1e1000000".into(), Expect::Applied),
        ("number beyond f64", "123456789e400".into(), Expect::Applied),
        ("deep nesting within the body limit", deep, Expect::Applied),
        (
            "unicode keys and values",
            r#"{"ключ": "値", "🙂": "\u00e9"}"#.into(),
            Expect::Applied,
        ),
    ];
    let mut cases = vec![];
    for (name, updated_at, expect) in classes {
        cases.push((name, updated_at, "null".to_owned(), expect));
    }
    for (name, extra, expect) in extras {
        cases.push((name, r#""2026-03-02T15:04:11Z""#.to_owned(), extra, expect));
    }
    // A resource that is not an object, too.
    let mut ran = 0;
    for (name, updated_at, extra, expect) in &cases {
        let (odd, ordinary, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let resource = resource_with(odd, updated_at, extra);
        let body = raw_update(odd, user, &resource);
        let (position, _) = app.deliver(&body).await;
        assert_eq!(
            stored_body(&app.pool, position).await,
            body,
            "{name}: logged byte for byte"
        );
        app.deliver(&refinement(ordinary, user, 1)).await;
        app.wait_for_projection().await;
        assert!(
            served_resource(&app, ordinary).await.is_some(),
            "{name}: the ordinary account after it is projected"
        );
        let quarantined = quarantine(&app.pool).await;
        match expect {
            Expect::Applied => assert_eq!(
                served_resource(&app, odd).await.as_deref(),
                Some(resource.as_str()),
                "{name}: applied, byte for byte"
            ),
            Expect::Quarantined => {
                assert!(
                    quarantined.contains(&(position, "fold".to_owned())),
                    "{name}: quarantined"
                );
                assert!(
                    served_resource(&app, odd).await.is_none(),
                    "{name}: not applied"
                );
            }
        }
        ran += 1;
    }
    let not_object = raw_update(Uuid::new_v4(), Uuid::new_v4(), r#""a string""#);
    let (position, _) = app.deliver(&not_object).await;
    app.wait_for_projection().await;
    assert!(
        quarantine(&app.pool)
            .await
            .contains(&(position, "fold".to_owned()))
    );
    ran += 1;
    assert_eq!(ran, 19, "every named class ran");

    // A rebuild agrees with the live projector on every snapshot and on what is quarantined.
    assert_verify_agrees(&app.pool).await;
    let before = quarantine(&app.pool).await;
    projector::rebuild::rebuild_all(
        &app.pool,
        &test_support::vault(),
        None,
        &projector::rebuild::Silent,
    )
    .await
    .unwrap();
    assert_eq!(quarantine(&app.pool).await, before);
    assert_verify_agrees(&app.pool).await;
    app.stop().await;
}

/// An `updated_at`: RFC 3339-shaped with any digits (years, offsets, fractions out of range), or
/// any string at all.
fn updated_at() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,15})?(Z|[+-][0-9]{2}:[0-9]{2})",
        any::<String>(),
    ]
}

/// Any JSON value, strings and keys of any characters (NUL included).
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[tokio::test]
async fn arbitrary_updated_at_and_resources_never_stall_the_projector() {
    let app = spawn_app().await;
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 48,
        ..Default::default()
    });
    let strategy = (updated_at(), json(), prop::bool::ANY);
    let mut odd = vec![];
    let mut ordinary = vec![];
    for _ in 0..48 {
        let (stamp, extra, as_object) = strategy.new_tree(&mut runner).unwrap().current();
        let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
        let resource = if as_object {
            serde_json::json!({"id": account, "updated_at": stamp, "extra": extra})
        } else {
            extra
        };
        let body = serde_json::to_vec_pretty(&serde_json::json!({
            "event": "accounts.updated",
            "data": {"account": account, "user": user, "resource": resource}
        }))
        .unwrap();
        let (position, _) = app.deliver(&body).await;
        odd.push((position, account));
        let plain = Uuid::new_v4();
        app.deliver(&refinement(plain, user, 7)).await;
        ordinary.push(plain);
    }
    app.wait_for_projection().await;
    let snapshots = stored_snapshots(&app.pool).await;
    for account in &ordinary {
        assert_eq!(snapshots[account].version, 1, "ordinary account projected");
    }
    let quarantined = quarantine(&app.pool).await;
    for (position, account) in &odd {
        let applied = snapshots
            .get(account)
            .is_some_and(|s| s.last_position == *position);
        let refused = quarantined.iter().any(|(p, _)| p == position);
        assert!(
            applied != refused,
            "event {position}: applied or quarantined, exactly one"
        );
    }
    assert_eq!(odd.len(), 48);
    assert_verify_agrees(&app.pool).await;
    app.stop().await;
}

/// A test-only trigger makes the database refuse one account's snapshot, as it would refuse a
/// value it cannot hold.
async fn refuse_snapshots_of(pool: &sqlx::PgPool, table: &str, account: Uuid) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE OR REPLACE FUNCTION refuse_for_test() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.account_id = '{account}' THEN
                 RAISE EXCEPTION 'refused for the test';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_for_test BEFORE INSERT OR UPDATE ON {table}
             FOR EACH ROW EXECUTE FUNCTION refuse_for_test();"
    )))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_snapshot_the_database_refuses_mid_batch_quarantines_exactly_its_event() {
    let mut settings = test_settings().await;
    settings.role = account_projector::Role::Ingest;
    let app = spawn_app_with(settings).await;
    let refused = Uuid::new_v4();
    refuse_snapshots_of(&app.pool, "account_snapshots", refused).await;
    let user = Uuid::new_v4();
    let mut others = vec![];
    let mut refused_position = 0;
    for i in 0..40u32 {
        if i == 17 {
            refused_position = app.deliver(&refinement(refused, user, i)).await.0;
        }
        let account = Uuid::new_v4();
        app.deliver(&refinement(account, user, i)).await;
        others.push(account);
    }
    // One projector batch over all of it, on a connection of the test's own.
    let mut conn = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let head = head(&app.pool).await;
    let mut batches = 0;
    while checkpoint(&app.pool).await < head {
        projector::run_batch(
            &mut conn,
            &test_support::vault(),
            store::partitions::Part::WHOLE,
            1000,
        )
        .await
        .unwrap();
        batches += 1;
        assert!(batches < 40, "the projector keeps moving");
    }
    let quarantined: Vec<(i64, String, String)> = {
        let mut conn = app.pool.acquire().await.unwrap();
        store::quarantine::all(&mut conn, &test_support::vault())
            .await
            .unwrap()
            .into_iter()
            .map(|q| (q.position, q.refused_by, q.error.unwrap()))
            .collect()
    };
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].0, refused_position);
    assert_eq!(quarantined[0].1, "store");
    assert!(
        quarantined[0].2.contains("refused for the test"),
        "{}",
        quarantined[0].2
    );
    let snapshots = stored_snapshots(&app.pool).await;
    assert!(!snapshots.contains_key(&refused));
    for account in &others {
        assert!(
            snapshots.contains_key(account),
            "every other account is folded"
        );
    }
    // Verify and rebuild agree: the refused event is left out of every fold.
    assert_verify_agrees(&app.pool).await;
    projector::rebuild::rebuild_all(
        &app.pool,
        &test_support::vault(),
        None,
        &projector::rebuild::Silent,
    )
    .await
    .unwrap();
    assert_verify_agrees(&app.pool).await;
    assert_eq!(quarantine(&app.pool).await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_rebuild_isolates_a_snapshot_the_database_refuses_as_the_projector_does() {
    let mut settings = test_settings().await;
    settings.role = account_projector::Role::Ingest;
    let app = spawn_app_with(settings).await;
    let refused = Uuid::new_v4();
    refuse_snapshots_of(&app.pool, "account_snapshots_rebuild", refused).await;
    let user = Uuid::new_v4();
    let ok = app.deliver(&refinement(refused, user, 1)).await.0;
    let bad = app.deliver(&refinement(refused, user, 2)).await.0;
    let others: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for account in &others {
        app.deliver(&refinement(*account, user, 3)).await;
    }
    // The trigger refuses every write of the account: its first event is the one isolated, and
    // its second, refused as well, too.
    projector::rebuild::rebuild_all(
        &app.pool,
        &test_support::vault(),
        None,
        &projector::rebuild::Silent,
    )
    .await
    .unwrap();
    let quarantined = quarantine(&app.pool).await;
    assert_eq!(
        quarantined,
        BTreeSet::from([(ok, "store".to_owned()), (bad, "store".to_owned())])
    );
    let snapshots = stored_snapshots(&app.pool).await;
    assert_eq!(snapshots.len(), others.len());
    assert_verify_agrees(&app.pool).await;
    app.stop().await;
}

#[tokio::test]
async fn a_task_that_panics_stops_the_process_with_an_error_within_two_seconds() {
    let tasks = ["committer", "reader", "projector", "readiness", "enricher"];
    let mut ran = 0;
    for task in tasks {
        let mut settings = test_settings().await;
        settings.argyle = Some(account_projector::ArgyleApi {
            url: "http://127.0.0.1:9".into(),
            key_id: "id".into(),
            key_secret: "secret".into(),
        });
        let app = spawn_app_with(settings).await;
        poll_until("ready", || async {
            app.get("/readyz").await.status() == 200
        })
        .await;
        app.deliver(&fixture("01_accounts.added.json")).await;
        assert!(app.faults.panic(task), "{task} runs under the supervisor");
        let outcome = app
            .exit_within(Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("{task}: the process did not stop"));
        let error = outcome
            .expect_err("a dead task is an error exit")
            .to_string();
        assert!(
            error.contains(task) && error.contains("panicked"),
            "{task}: {error}"
        );
        ran += 1;
    }
    assert_eq!(ran, tasks.len());
}

#[tokio::test]
async fn readiness_is_answered_from_state_not_a_query_per_request() {
    let app = spawn_app().await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    // Hold a lock every readiness query would wait on: a per-request query would hang here.
    let mut blocker = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE refinery_schema_history IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        let mut statuses = vec![];
        for _ in 0..50 {
            statuses.push(app.get("/readyz").await.status().as_u16());
        }
        statuses
    })
    .await
    .expect("readiness answers while the database is stuck");
    assert!(
        answered.iter().all(|s| *s == 200 || *s == 503),
        "{answered:?}"
    );
    // The once-a-second check then times out and the answer turns 503 ...
    poll_until("not ready while stuck", || async {
        app.get("/readyz").await.status() == 503
    })
    .await;
    tx.rollback().await.unwrap();
    // ... and back to 200 once the database answers again.
    poll_until("ready again", || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn changes_are_paged_and_the_pages_add_up_to_the_whole_history() {
    let app = spawn_app().await;
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    for step in 0..25u32 {
        app.deliver(&refinement(account, user, step)).await;
    }
    let mut positions = vec![];
    let mut after = 0;
    let mut pages = 0;
    loop {
        let page: serde_json::Value = app
            .get(&format!(
                "/v1/accounts/{account}/changes?after={after}&limit=4"
            ))
            .await
            .json()
            .await
            .unwrap();
        let changes = page["changes"].as_array().unwrap();
        assert!(changes.len() <= 4);
        positions.extend(changes.iter().map(|c| c["position"].as_i64().unwrap()));
        pages += 1;
        match page["next_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(
        positions.len(),
        25,
        "each refinement changed the resource once"
    );
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(pages, 7);
    for bad in ["limit=0", "limit=1001", "after=-1"] {
        let status = app
            .get(&format!("/v1/accounts/{account}/changes?{bad}"))
            .await
            .status();
        assert_eq!(status, 400, "{bad}");
    }
    app.stop().await;
}

#[tokio::test]
async fn an_events_page_ends_once_its_bodies_pass_8_mib() {
    let app = spawn_app().await;
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    let padding = "x".repeat(900 * 1024);
    for step in 0..12u32 {
        let body = serde_json::to_vec(&serde_json::json!({
            "event": "accounts.updated",
            "data": {"account": account, "user": user, "resource": {"id": account, "pad": padding, "step": step}}
        }))
        .unwrap();
        append_direct(&app.pool, &body).await;
    }
    for path in [
        "/v1/events?limit=1000",
        &format!("/v1/accounts/{account}/events?limit=1000"),
    ] {
        let page: serde_json::Value = app.get(path).await.json().await.unwrap();
        let events = page["events"].as_array().unwrap();
        assert_eq!(
            events.len(),
            10,
            "{path}: nine bodies stay under 8 MiB, the tenth passes it"
        );
        assert_eq!(page["next_after"], events[9]["position"], "{path}");
        let rest: serde_json::Value = app
            .get(&format!("{path}&after={}", page["next_after"]))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(rest["events"].as_array().unwrap().len(), 2, "{path}");
        assert!(rest["next_after"].is_null());
    }
    app.stop().await;
}

#[tokio::test]
async fn as_of_and_at_position_together_apply_both_bounds() {
    let app = spawn_app().await;
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    let first = app.deliver(&refinement(account, user, 1)).await.0;
    app.wait_for_projection().await;
    let between = chrono::Utc::now();
    poll_until("the clock moves on", || async {
        chrono::Utc::now() > between
    })
    .await;
    app.deliver(&refinement(account, user, 2)).await;
    let third = app.deliver(&refinement(account, user, 3)).await.0;
    let at = between.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let at = at.replace('+', "%2B");
    // The time bound is the tighter one here ...
    let view = app
        .account_view(format!("{account}?as_of={at}&at_position={third}"))
        .await;
    assert_eq!(view["last_position"], first);
    // ... and the position bound there.
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let later = later.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let view = app
        .account_view(format!("{account}?as_of={later}&at_position={first}"))
        .await;
    assert_eq!(view["last_position"], first);
    let view = app
        .account_view(format!("{account}?as_of={later}&at_position={third}"))
        .await;
    assert_eq!(view["last_position"], third);
    app.stop().await;
}

#[tokio::test]
async fn secrets_and_tokens_are_trimmed_and_an_empty_entry_is_refused() {
    let mut settings = test_settings().await;
    settings.webhook_secrets = vec!["old".into(), format!(" {SECRET}")];
    settings.api_tokens = vec![" a-token-of-some-length ".into()];
    let app = spawn_app_with(settings).await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    let status = app
        .client
        .get(format!("{}/v1/events", app.address))
        .bearer_auth("a-token-of-some-length")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    app.stop().await;
    for (secrets, tokens) in [(vec!["a", " "], vec![]), (vec!["a"], vec!["", "b"])] {
        let mut settings = test_settings().await;
        settings.webhook_secrets = secrets.into_iter().map(String::from).collect();
        settings.api_tokens = tokens.into_iter().map(String::from).collect();
        let error = account_projector::Application::build(settings).await.err();
        assert!(error.unwrap().to_string().contains("empty entry"));
    }
}
