//! Reads from a real streaming replica (`READ_DATABASE_URL`): a second cluster made by
//! `.ci/replica` (pg_createcluster + pg_basebackup), or the one `TEST_REPLICA_URL` names.

use std::time::Duration;

use uuid::Uuid;

use crate::helpers::*;

/// The replica's server URL: `TEST_REPLICA_URL`, else the one `.ci/replica` makes (or finds).
fn replica_server() -> String {
    if let Ok(url) = std::env::var("TEST_REPLICA_URL") {
        return url;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.ci/replica");
    let output = std::process::Command::new(script)
        .output()
        .expect(".ci/replica runs");
    assert!(
        output.status.success(),
        ".ci/replica could not make a streaming replica (set TEST_REPLICA_URL to use another): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    stdout.lines().last().expect("a URL").trim().to_owned()
}

/// `server`'s URL (`postgres://host:port/any[?params]`) with the database of `database_url`.
fn same_database(server: &str, database_url: &str) -> String {
    let name = database_url.rsplit('/').next().unwrap();
    let (address, query) = server.split_once('?').unwrap_or((server, ""));
    let (host, _) = address
        .rsplit_once('/')
        .expect("a server URL with a database path");
    match query {
        "" => format!("{host}/{name}"),
        query => format!("{host}/{name}?{query}"),
    }
}

/// A `/v1` request with the test's token.
async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}{path}", app.address))
        .bearer_auth(crate::ui::TOKEN)
        .send()
        .await
        .unwrap()
}

async fn on_replica(url: &str, sql: &str) -> serde_json::Value {
    let mut conn = store::connect(&store::connect_options(url).unwrap())
        .await
        .unwrap();
    let value: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT to_jsonb(x) FROM ({sql}) x(v)"
    )))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    value["v"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_api_feed_and_pages_read_the_replica_and_wait_for_what_it_has_replayed() {
    // The pages need a token configured; /v1 stays open for the test's plain requests.
    let server = replica_server();
    // A run that stopped midway may have left replay paused.
    on_replica(&server, "SELECT pg_wal_replay_resume()::text").await;
    let mut settings = test_settings().await;
    let replica = same_database(&server, &settings.database_url);
    settings.read_database_url = Some(replica.clone());
    settings.api_tokens = vec![crate::ui::TOKEN.into()];
    let app = spawn_app_with(settings).await;
    poll_until("the new database is on the replica", || async {
        store::connect(&store::connect_options(&replica).unwrap())
            .await
            .is_ok()
    })
    .await;
    assert_eq!(
        on_replica(&replica, "SELECT pg_is_in_recovery()").await,
        serde_json::json!(true)
    );

    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    let (first, _) = app.deliver(&refinement(account, user, 1)).await;
    // Read-your-writes through the replica: it waits until the replica has replayed the fold.
    let response = get(
        &app,
        &format!("/v1/accounts/{account}?min_position={first}&wait=10s"),
    )
    .await;
    assert_eq!(response.status(), 200);
    let view: serde_json::Value = response.json().await.unwrap();
    assert_eq!(view["last_position"], first);

    // With replay paused, the primary folds the next event, the replica does not see it, and every
    // read shows the replica's view: the reads go there.
    on_replica(&server, "SELECT pg_wal_replay_pause()::text").await;
    let (second, _) = app.deliver(&refinement(account, user, 2)).await;
    app.wait_for_projection().await;
    assert!(checkpoint(&app.pool).await >= second);
    let response = get(
        &app,
        &format!("/v1/accounts/{account}?min_position={second}&wait=1s"),
    )
    .await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "not_yet_projected");
    let view: serde_json::Value = get(&app, &format!("/v1/accounts/{account}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["last_position"], first);
    let events: serde_json::Value = get(&app, &format!("/v1/accounts/{account}/events"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(events["events"].as_array().unwrap().len(), 1);

    // A feed follower long-polls past the first change; it hears of the second once the replica
    // replays it, and min_position is then served.
    let mut follower = tokio::spawn({
        let client = reqwest::Client::new();
        let url = format!("{}/v1/feed?after={first}&wait=20s", app.address);
        async move {
            let response = client.get(url).bearer_auth(crate::ui::TOKEN).send().await;
            let page: serde_json::Value = response.unwrap().json().await.unwrap();
            page
        }
    });
    // Nothing new on the replica yet: the follower's page does not come (an absence, so a bound).
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut follower)
            .await
            .is_err(),
        "the follower waits while the replica has nothing new"
    );
    on_replica(&server, "SELECT pg_wal_replay_resume()::text").await;
    let page = tokio::time::timeout(Duration::from_secs(15), follower)
        .await
        .expect("the follower hears of the change")
        .unwrap();
    let accounts = page["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 1);
    assert_eq!(accounts[0]["last_position"], second);
    let response = get(
        &app,
        &format!("/v1/accounts/{account}?min_position={second}&wait=10s"),
    )
    .await;
    assert_eq!(response.status(), 200);
    let events: serde_json::Value = get(&app, &format!("/v1/accounts/{account}/events"))
        .await
        .json()
        .await
        .unwrap();
    let positions: Vec<i64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, [first, second]);

    // The pages read the replica too (their sessions live on the primary: read back at once).
    let session = crate::ui::sign_in(&app).await;
    let page = crate::ui::get_page(&app, &format!("/ui/accounts/{account}"), Some(&session)).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains(&format!("#{second}")),
        "the timeline shows #{second}"
    );
    app.stop().await;
}
