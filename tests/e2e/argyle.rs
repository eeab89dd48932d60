//! Argyle's management API, faked with wiremock (Basic auth and request bodies checked, real
//! response shapes): `webhooks create|list|delete` through the binary, and the enricher end to end.

use std::time::Duration;

use account_projector::{ArgyleApi, Role, Settings};
use enricher::EnricherConfig;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;
use wiremock::matchers::{basic_auth, body_partial_json, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

pub(crate) const KEY_ID: &str = "test_key_id";
pub(crate) const KEY_SECRET: &str = "test_key_secret";
/// The webhook URL the tests subscribe.
const HOOK_URL: &str = "https://example.com/webhooks/argyle";

fn api_response(name: &str) -> Value {
    let path = fixtures_dir().join("real-deliveries/api").join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn authed(verb: &str, route: &str) -> wiremock::MockBuilder {
    Mock::given(method(verb))
        .and(path(route))
        .and(basic_auth(KEY_ID, KEY_SECRET))
}

/// Runs `account-projector webhooks <args>` against the fake API.
async fn webhooks(server: &MockServer, args: &[&str]) -> (i32, String, String) {
    let url = format!("{}/v2", server.uri());
    let mut all = vec!["webhooks"];
    all.extend_from_slice(args);
    run_binary(
        "postgres://unused",
        &all,
        &[
            ("ARGYLE_API_URL", url.as_str()),
            ("ARGYLE_API_KEY_ID", KEY_ID),
            ("ARGYLE_API_KEY_SECRET", KEY_SECRET),
        ],
    )
    .await
}

/// A subscription as Argyle lists it.
fn listed(id: &str, name: &str, events: &[&str], include_resource: bool, secret: &str) -> Value {
    let mut webhook = api_response("create_webhook_response.json");
    webhook["id"] = id.into();
    webhook["name"] = name.into();
    webhook["events"] = json!(events);
    webhook["config"] = json!({ "include_resource": include_resource });
    webhook["url"] = HOOK_URL.into();
    webhook["secret"] = secret.into();
    webhook
}

/// Argyle's 201 for a subscription it created, as [`listed`].
fn created(
    id: &str,
    name: &str,
    events: &[&str],
    include_resource: bool,
    secret: &str,
) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(listed(id, name, events, include_resource, secret))
}

fn page(results: Vec<Value>, next: Option<String>) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_json(json!({"next": next, "previous": null, "results": results}))
}

const WITH_RESOURCE: [&str; 4] = [
    "accounts.added",
    "accounts.connected",
    "accounts.failed",
    "accounts.updated",
];

#[tokio::test]
async fn create_splits_removed_into_its_own_subscription_and_a_second_create_does_nothing() {
    let server = MockServer::start().await;
    authed("GET", "/v2/webhooks")
        .respond_with(page(vec![], None))
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .and(body_partial_json(json!({
            "name": "account-projector",
            "url": HOOK_URL,
            "events": WITH_RESOURCE,
            "config": {"include_resource": true}
        })))
        .respond_with(created(
            "w1",
            "account-projector",
            &WITH_RESOURCE,
            true,
            "s",
        ))
        .expect(1)
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .and(body_partial_json(json!({
            "name": "account-projector-no-resource",
            "events": ["accounts.removed"]
        })))
        .respond_with(created(
            "w2",
            "account-projector-no-resource",
            &["accounts.removed"],
            false,
            "s",
        ))
        .expect(1)
        .mount(&server)
        .await;

    let (code, stdout, stderr) = webhooks(&server, &["create", "--url", HOOK_URL]).await;
    assert_eq!(code, 0, "{stderr}");
    server.verify().await;
    // Both subscriptions sign with one new secret, printed for ARGYLE_WEBHOOK_SECRETS.
    let posts: Vec<Value> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST")
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(posts.len(), 2);
    assert!(posts[1].get("config").is_none(), "{:?}", posts[1]);
    let secret = posts[0]["secret"].as_str().unwrap();
    assert_eq!(posts[1]["secret"], secret);
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(
        stdout.contains(&format!("\nARGYLE_WEBHOOK_SECRETS={secret}\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains("created  w1") && stdout.contains("created  w2"),
        "{stdout}"
    );

    // Argyle now lists both: a second create changes nothing and prints no secret.
    server.reset().await;
    authed("GET", "/v2/webhooks")
        .respond_with(page(
            vec![
                listed(
                    "w2",
                    "account-projector-no-resource",
                    &["accounts.removed"],
                    false,
                    secret,
                ),
                // Argyle may list events in another order.
                listed(
                    "w1",
                    "account-projector",
                    &[
                        "accounts.updated",
                        "accounts.added",
                        "accounts.failed",
                        "accounts.connected",
                    ],
                    true,
                    secret,
                ),
            ],
            None,
        ))
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .respond_with(ResponseTemplate::new(201))
        .expect(0)
        .mount(&server)
        .await;
    let (code, stdout, stderr) = webhooks(&server, &["create", "--url", HOOK_URL]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("exists   w1") && stdout.contains("exists   w2"),
        "{stdout}"
    );
    assert!(!stdout.contains(secret), "{stdout}");
    server.verify().await;
}

#[tokio::test]
async fn create_without_the_resource_is_one_subscription_with_the_given_secret() {
    let server = MockServer::start().await;
    authed("GET", "/v2/webhooks")
        .respond_with(page(vec![], None))
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .and(body_partial_json(json!({
            "name": "ids-only",
            "events": ["accounts.updated", "accounts.removed"],
            "secret": "my-own-secret"
        })))
        .respond_with(created(
            "w3",
            "ids-only",
            &["accounts.updated", "accounts.removed"],
            false,
            "my-own-secret",
        ))
        .expect(1)
        .mount(&server)
        .await;
    // The secret comes from a file (so it is not in `ps`), trimmed.
    let secret_file = std::env::temp_dir().join(format!("ap-secret-{}", Uuid::new_v4()));
    std::fs::write(&secret_file, "my-own-secret\n").unwrap();
    let (code, stdout, stderr) = webhooks(
        &server,
        &[
            "create",
            "--url",
            HOOK_URL,
            "--name",
            "ids-only",
            "--events",
            "accounts.updated,accounts.removed",
            "--no-include-resource",
            "--secret-file",
            secret_file.to_str().unwrap(),
        ],
    )
    .await;
    std::fs::remove_file(&secret_file).unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("ARGYLE_WEBHOOK_SECRETS=my-own-secret"),
        "{stdout}"
    );
    let post = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.method.as_str() == "POST")
        .unwrap();
    let body: Value = serde_json::from_slice(&post.body).unwrap();
    assert!(body.get("config").is_none(), "{body}");
    server.verify().await;
}

#[tokio::test]
async fn list_reads_every_page_and_hides_secrets_unless_asked() {
    let server = MockServer::start().await;
    authed("GET", "/v2/webhooks")
        .and(query_param("cursor", "2"))
        .respond_with(page(
            vec![listed(
                "w3",
                "third",
                &["accounts.removed"],
                false,
                "secret-three",
            )],
            None,
        ))
        .mount(&server)
        .await;
    authed("GET", "/v2/webhooks")
        .and(query_param("limit", "200"))
        .respond_with(page(
            vec![
                listed("w1", "first", &WITH_RESOURCE, true, "secret-one"),
                listed("w2", "second", &WITH_RESOURCE, true, "secret-two"),
            ],
            Some(format!("{}/v2/webhooks?cursor=2", server.uri())),
        ))
        .mount(&server)
        .await;
    let (code, stdout, stderr) = webhooks(&server, &["list"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    for id in ["w1", "w2", "w3"] {
        assert!(stdout.contains(id), "{stdout}");
    }
    assert!(!stdout.contains("secret-"), "{stdout}");
    assert!(stdout.contains("secret=hidden"));
    let (code, shown, _) = webhooks(&server, &["list", "--show-secrets"]).await;
    assert_eq!(code, 0);
    assert!(shown.contains("secret=secret-three"), "{shown}");
}

#[tokio::test]
async fn delete_and_argyle_errors_are_one_sentence() {
    let server = MockServer::start().await;
    authed("DELETE", "/v2/webhooks/w1")
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let (code, stdout, stderr) = webhooks(&server, &["delete", "w1"]).await;
    assert_eq!((code, stdout.as_str()), (0, "deleted w1\n"), "{stderr}");
    let (code, _, stderr) = webhooks(&server, &["delete", "w404"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "error: Argyle has no webhook subscription w404"
    );

    Mock::given(method("GET"))
        .and(path("/v2/webhooks"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({"detail": "Invalid token."})))
        .mount(&server)
        .await;
    let (code, _, stderr) = webhooks(&server, &["list"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "error: Argyle refused the API key (HTTP 401); check ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET"
    );
    server.reset().await;
    authed("GET", "/v2/webhooks")
        .respond_with(page(vec![], None))
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"url": ["Enter a valid URL."]})),
        )
        .mount(&server)
        .await;
    let (code, _, stderr) = webhooks(&server, &["create", "--url", "not a url"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "error: Argyle rejected the request (HTTP 400): url: Enter a valid URL."
    );
    let (code, _, stderr) = run_binary("postgres://unused", &["webhooks", "list"], &[]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("set ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET"),
        "{stderr}"
    );
    let (code, _, stderr) = webhooks(
        &server,
        &["create", "--url", "https://x.example", "--secret", "a,b"],
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("without commas or whitespace"), "{stderr}");
    let (code, _, stderr) = run_binary("postgres://unused", &["webhooks", "list"], &[]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("set ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_create_that_failed_on_the_server_is_not_repeated_when_it_went_through() {
    let server = MockServer::start().await;
    // The first list is empty; the POST answers 502 but the subscription was created, as the
    // list after it shows: nothing is posted again.
    authed("GET", "/v2/webhooks")
        .respond_with(page(vec![], None))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    authed("GET", "/v2/webhooks")
        .respond_with(page(
            vec![listed("w9", "solo", &["accounts.updated"], false, "x")],
            None,
        ))
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .respond_with(ResponseTemplate::new(502))
        .expect(1)
        .mount(&server)
        .await;
    let (code, stdout, stderr) = webhooks(
        &server,
        &[
            "create",
            "--url",
            HOOK_URL,
            "--name",
            "solo",
            "--events",
            "accounts.updated",
            "--no-include-resource",
        ],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("created  w9"), "{stdout}");
    server.verify().await;
}

// --- enrichment -------------------------------------------------------------------------------

/// An `accounts.updated` without `resource` for `account`; `seq` makes each body distinct.
pub(crate) fn resource_less(account: Uuid, seq: u32) -> Vec<u8> {
    let mut value: Value =
        serde_json::from_slice(&fixture("08_accounts.updated.no_resource.json")).unwrap();
    value["data"]["account"] = account.to_string().into();
    value["data"]["seq"] = seq.into();
    serde_json::to_vec_pretty(&value).unwrap()
}

/// Argyle's real `GET /v2/accounts/{id}` answer, for `account`.
pub(crate) fn account_object(account: Uuid) -> Value {
    let mut value = api_response("get_account.json");
    value["id"] = account.to_string().into();
    value
}

pub(crate) fn mock_account(account: Uuid) -> wiremock::MockBuilder {
    authed("GET", &format!("/v2/accounts/{account}"))
}

/// `server` answers the enricher's check of the URL and key (`GET /v2/accounts?limit=1`).
pub(crate) async fn mount_key_check(server: &MockServer) {
    authed("GET", "/v2/accounts")
        .and(query_param("limit", "1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(api_response("list_accounts.json")))
        .mount(server)
        .await;
}

/// Settings whose enricher talks to `server`, which also answers the enricher's check of the URL
/// and key (`GET /v2/accounts?limit=1`).
pub(crate) async fn enricher_settings(
    database_url: &str,
    server: &MockServer,
    rate: f64,
) -> Settings {
    mount_key_check(server).await;
    let mut settings = test_settings().await;
    settings.database_url = database_url.to_owned();
    settings.argyle = Some(ArgyleApi {
        url: format!("{}/v2", server.uri()),
        key_id: KEY_ID.into(),
        key_secret: KEY_SECRET.into(),
    });
    settings.enricher = EnricherConfig {
        window: Duration::from_millis(500),
        rate,
        poll_interval: Duration::from_millis(100),
        retry_interval: Duration::from_millis(100),
        ..EnricherConfig::default()
    };
    settings
}

/// Accepts webhooks with no enricher running, so that a test controls when fetching starts.
async fn ingest_only(database_url: &str) -> TestApp {
    let mut settings = test_settings().await;
    settings.database_url = database_url.to_owned();
    settings.role = Role::Ingest;
    spawn_app_with(settings).await
}

/// `(position, payload)` of every event named `event` for `account`, in log order.
async fn events_named(app: &TestApp, account: Uuid, event: &str) -> Vec<(i64, Value)> {
    let page: Value = app
        .get(&format!("/v1/accounts/{account}/events?limit=1000"))
        .await
        .json()
        .await
        .unwrap();
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == event)
        .map(|e| (e["position"].as_i64().unwrap(), e["payload"].clone()))
        .collect()
}

async fn pending_fetches(app: &TestApp) -> i64 {
    store::enrichment::pending(&mut app.pool.acquire().await.unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_resource_less_webhook_gets_the_account_fetched_into_the_log_and_the_snapshot() {
    let server = MockServer::start().await;
    let account = Uuid::new_v4();
    mock_account(account)
        .respond_with(ResponseTemplate::new(200).set_body_json(account_object(account)))
        .expect(1)
        .mount(&server)
        .await;
    let database_url = fresh_database().await;
    let app = spawn_app_with(enricher_settings(&database_url, &server, 50.0).await).await;
    let (position, _) = app.deliver(&resource_less(account, 0)).await;

    let view = poll_for("the snapshot has the fetched resource", || async {
        let response = app.get(&format!("/v1/accounts/{account}")).await;
        let view: Value = response.json().await.ok()?;
        (!view["resource"].is_null()).then_some(view)
    })
    .await;
    assert_eq!(view["resource"], account_object(account));
    assert_eq!(view["last_event"], domain::ACCOUNT_FETCHED);
    assert_eq!(view["connection_status"], "connected");
    assert_eq!(view["version"], 2);

    let fetched = events_named(&app, account, domain::ACCOUNT_FETCHED).await;
    assert_eq!(fetched.len(), 1);
    let payload = &fetched[0].1;
    assert_eq!(payload["fetched"]["status"], 200);
    assert_eq!(payload["fetched"]["reason"], "enrichment");
    assert_eq!(payload["fetched"]["asked_by_position"], position);
    assert_eq!(payload["data"]["user"], USER);
    // Recorded as fetched, not received: no signature.
    let signature: Option<String> =
        sqlx::query_scalar("SELECT signature FROM events WHERE position = $1")
            .bind(fetched[0].0)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(signature, None);

    // A rebuild is still a pure fold of the log: verify finds nothing, and a real rebuild keeps
    // the fetched resource.
    app.wait_for_projection().await;
    assert_eq!(
        fresh_fold(&app.pool).await,
        stored_snapshots(&app.pool).await
    );
    let (code, out, err) = run_binary(&app.database_url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = run_binary(&app.database_url, &["rebuild"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(app.account_view(account).await, view);
    assert_eq!(pending_fetches(&app).await, 0);
    server.verify().await;
    app.stop().await;
}

#[tokio::test]
async fn a_burst_coalesces_and_fetches_stay_a_window_apart() {
    let server = MockServer::start().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for account in [a, b] {
        mock_account(account)
            .respond_with(ResponseTemplate::new(200).set_body_json(account_object(account)))
            .mount(&server)
            .await;
    }
    let database_url = fresh_database().await;
    // A burst arrives before the enricher runs: one fetch per account, however many webhooks.
    let ingest = ingest_only(&database_url).await;
    for seq in 0..10 {
        ingest.deliver(&resource_less(a, seq)).await;
    }
    for seq in 0..3 {
        ingest.deliver(&resource_less(b, seq)).await;
    }
    ingest.stop().await;
    let app = spawn_app_with(enricher_settings(&database_url, &server, 50.0).await).await;
    poll_until("both accounts are fetched", || async {
        pending_fetches(&app).await == 0
            && events_named(&app, a, domain::ACCOUNT_FETCHED).await.len() == 1
            && events_named(&app, b, domain::ACCOUNT_FETCHED).await.len() == 1
    })
    .await;
    let requests = |account: Uuid| {
        let server = &server;
        async move {
            server
                .received_requests()
                .await
                .unwrap()
                .iter()
                .filter(|r| r.url.path().ends_with(&account.to_string()))
                .count()
        }
    };
    assert_eq!((requests(a).await, requests(b).await), (1, 1));

    // A burst while it runs: fetches at least a window apart, and the last one answers the last
    // webhook (none lost).
    let mut last = 0;
    let burst = std::time::Instant::now();
    for seq in 10..30 {
        last = app.deliver(&resource_less(a, seq)).await.0;
    }
    let burst = burst.elapsed();
    let fetched = poll_for("the last webhook is answered", || async {
        let fetched = events_named(&app, a, domain::ACCOUNT_FETCHED).await;
        let answered = fetched
            .last()
            .is_some_and(|(_, p)| p["fetched"]["asked_by_position"] == last);
        (answered && pending_fetches(&app).await == 0).then_some(fetched)
    })
    .await;
    let times: Vec<chrono::DateTime<chrono::Utc>> = fetched
        .iter()
        .map(|(_, p)| p["fetched"]["at"].as_str().unwrap().parse().unwrap())
        .collect();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::Duration::milliseconds(500),
            "fetches closer than the window: {times:?}"
        );
    }
    // One fetch may be due as the burst starts, then one per window it lasts (rounded up), then
    // one after it.
    let bound = 3 + (burst.as_millis() / 500) as usize;
    assert!(
        fetched.len() <= bound,
        "20 webhooks in {burst:?} made {} fetches",
        fetched.len()
    );
    assert_eq!(requests(a).await, fetched.len());
    app.stop().await;
}

#[tokio::test]
async fn a_404_is_recorded_once_and_not_folded() {
    let server = MockServer::start().await;
    let account = Uuid::new_v4();
    mock_account(account)
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"detail": "Not found."})))
        .expect(1)
        .mount(&server)
        .await;
    let database_url = fresh_database().await;
    let app = spawn_app_with(enricher_settings(&database_url, &server, 50.0).await).await;
    app.deliver(&resource_less(account, 0)).await;
    let recorded = poll_for("the 404 is recorded", || async {
        let events = events_named(&app, account, domain::ACCOUNT_NOT_FOUND).await;
        (!events.is_empty() && pending_fetches(&app).await == 0).then_some(events)
    })
    .await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].1["fetched"]["status"], 404);
    assert!(recorded[0].1["data"].get("resource").is_none());
    app.wait_for_projection().await;
    let view = app.account_view(account).await;
    assert_eq!(
        (view["version"].clone(), view["resource"].clone()),
        (json!(1), Value::Null)
    );
    server.verify().await;
    app.stop().await;
}

#[tokio::test]
async fn server_errors_are_retried_later_and_the_error_is_kept() {
    let server = MockServer::start().await;
    let account = Uuid::new_v4();
    // One round of the client's three attempts fails; the next round succeeds.
    mock_account(account)
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(3)
        .expect(3)
        .mount(&server)
        .await;
    mock_account(account)
        .respond_with(ResponseTemplate::new(200).set_body_json(account_object(account)))
        .expect(1)
        .mount(&server)
        .await;
    let database_url = fresh_database().await;
    let mut settings = enricher_settings(&database_url, &server, 50.0).await;
    // Long enough to see the failure recorded before the retry clears it.
    settings.enricher.first_backoff = Duration::from_secs(3);
    let app = spawn_app_with(settings).await;
    app.deliver(&resource_less(account, 0)).await;
    let error: String = poll_for("the failed attempt is recorded", || async {
        sqlx::query_scalar("SELECT last_error FROM enrichment_requests WHERE account_id = $1")
            .bind(account)
            .fetch_optional(&app.pool)
            .await
            .unwrap()
            .flatten()
    })
    .await;
    assert_eq!(
        error,
        "Argyle answered HTTP 500 after 3 attempts; try again later"
    );
    poll_until("the retry fetches the account", || async {
        events_named(&app, account, domain::ACCOUNT_FETCHED)
            .await
            .len()
            == 1
    })
    .await;
    server.verify().await;
    app.stop().await;
}

#[tokio::test]
async fn a_restart_midway_loses_no_fetch_and_repeats_none() {
    let server = MockServer::start().await;
    let accounts: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    for &account in &accounts {
        mock_account(account)
            .respond_with(ResponseTemplate::new(200).set_body_json(account_object(account)))
            .expect(1)
            .mount(&server)
            .await;
    }
    let database_url = fresh_database().await;
    let ingest = ingest_only(&database_url).await;
    for &account in &accounts {
        ingest.deliver(&resource_less(account, 0)).await;
    }
    ingest.stop().await;
    let fetched_count = |app: &TestApp| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event = $1")
                .bind(domain::ACCOUNT_FETCHED)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    // Two fetches a second: stopped after the first, most are still to do.
    let slow = spawn_app_with(enricher_settings(&database_url, &server, 2.0).await).await;
    poll_until("a first fetch", || async {
        fetched_count(&slow).await >= 1
    })
    .await;
    slow.stop().await;
    let before = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event = $1")
        .bind(domain::ACCOUNT_FETCHED)
        .fetch_one(&PgPool::connect(&database_url).await.unwrap())
        .await
        .unwrap();
    assert!(
        before < 6,
        "the restart came too late to test anything ({before} fetched)"
    );

    let app = spawn_app_with(enricher_settings(&database_url, &server, 50.0).await).await;
    poll_until("every account is fetched", || async {
        fetched_count(&app).await == 6 && pending_fetches(&app).await == 0
    })
    .await;
    for &account in &accounts {
        assert_eq!(
            events_named(&app, account, domain::ACCOUNT_FETCHED)
                .await
                .len(),
            1
        );
    }
    // Each account was requested from Argyle exactly once, across both runs.
    server.verify().await;
    app.stop().await;
}

#[tokio::test]
async fn a_missing_half_of_the_pair_is_created_with_the_existing_secret() {
    let server = MockServer::start().await;
    authed("GET", "/v2/webhooks")
        .respond_with(page(
            vec![listed(
                "w1",
                "account-projector",
                &WITH_RESOURCE,
                true,
                "kept-secret",
            )],
            None,
        ))
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .and(body_partial_json(json!({
            "name": "account-projector-no-resource",
            "events": ["accounts.removed"],
            "secret": "kept-secret"
        })))
        .respond_with(created(
            "w2",
            "account-projector-no-resource",
            &["accounts.removed"],
            false,
            "kept-secret",
        ))
        .expect(1)
        .mount(&server)
        .await;
    let (code, stdout, stderr) = webhooks(&server, &["create", "--url", HOOK_URL]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("exists   w1") && stdout.contains("created  w2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ARGYLE_WEBHOOK_SECRETS=kept-secret"),
        "{stdout}"
    );
    server.verify().await;
}

#[tokio::test]
async fn a_create_stopped_half_way_still_prints_the_secret_of_what_was_created() {
    let server = MockServer::start().await;
    authed("GET", "/v2/webhooks")
        .respond_with(page(vec![], None))
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .and(body_partial_json(json!({"name": "account-projector"})))
        .respond_with(created(
            "w1",
            "account-projector",
            &WITH_RESOURCE,
            true,
            "s",
        ))
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .and(body_partial_json(
            json!({"name": "account-projector-no-resource"}),
        ))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"detail": "Too many webhooks."})),
        )
        .mount(&server)
        .await;
    let (code, stdout, stderr) = webhooks(&server, &["create", "--url", HOOK_URL]).await;
    assert_eq!(code, 1);
    assert!(stdout.contains("created  w1"), "{stdout}");
    assert!(stdout.contains("ARGYLE_WEBHOOK_SECRETS="), "{stdout}");
    assert_eq!(
        stderr.trim(),
        "error: Argyle rejected the request (HTTP 400): Too many webhooks."
    );
}

#[tokio::test]
async fn a_wrong_api_url_is_not_taken_for_missing_accounts() {
    let server = MockServer::start().await;
    let account = Uuid::new_v4();
    let database_url = fresh_database().await;
    let mut settings = enricher_settings(&database_url, &server, 50.0).await;
    // Without /v2, every path is unknown to the fake API: 404 for everything.
    settings.argyle.as_mut().unwrap().url = server.uri();
    let app = spawn_app_with(settings).await;
    app.deliver(&resource_less(account, 0)).await;
    poll_until("the enricher has checked the URL", || async {
        server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .any(|r| r.url.path() == "/accounts")
    })
    .await;
    poll_until("the request is recorded", || async {
        pending_fetches(&app).await == 1
    })
    .await;
    // The check failed, so nothing is fetched and nothing is recorded as not found.
    assert!(
        events_named(&app, account, domain::ACCOUNT_NOT_FOUND)
            .await
            .is_empty()
    );
    assert!(
        !server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .any(|r| r.url.path().contains(&account.to_string()))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_removal_cancels_a_pending_fetch() {
    let server = MockServer::start().await;
    let account = Uuid::new_v4();
    mock_account(account)
        .respond_with(ResponseTemplate::new(200).set_body_json(account_object(account)))
        .expect(0)
        .mount(&server)
        .await;
    let database_url = fresh_database().await;
    let ingest = ingest_only(&database_url).await;
    ingest.deliver(&resource_less(account, 0)).await;
    let removed = for_account(&fixture("07_accounts.removed.json"), account);
    ingest.deliver(&removed).await;
    ingest.stop().await;
    let app = spawn_app_with(enricher_settings(&database_url, &server, 50.0).await).await;
    poll_until("both events are scanned", || async {
        let mut conn = app.pool.acquire().await.unwrap();
        store::checkpoints::get(&mut conn, store::checkpoints::ENRICHER)
            .await
            .unwrap()
            == 2
    })
    .await;
    assert_eq!(pending_fetches(&app).await, 0);
    app.stop().await;
    server.verify().await;
}

#[tokio::test]
async fn a_crash_during_a_fetch_loses_nothing_and_logs_the_account_once() {
    let server = MockServer::start().await;
    let account = Uuid::new_v4();
    let database_url = fresh_database().await;
    let ingest = ingest_only(&database_url).await;
    ingest.deliver(&resource_less(account, 0)).await;
    ingest.stop().await;
    let check = || {
        authed("GET", "/v2/accounts")
            .and(query_param("limit", "1"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(api_response("list_accounts.json")),
            )
    };
    check().mount(&server).await;
    // Argyle is slow to answer: the enricher is killed while the fetch is in flight.
    mock_account(account)
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(account_object(account))
                .set_delay(Duration::from_secs(30)),
        )
        .mount(&server)
        .await;
    let api = format!("{}/v2", server.uri());
    let env = [
        ("ARGYLE_API_URL", api.as_str()),
        ("ARGYLE_API_KEY_ID", KEY_ID),
        ("ARGYLE_API_KEY_SECRET", KEY_SECRET),
        ("ENRICH_RATE", "50"),
    ];
    let mut first = spawn_binary(&database_url, "enricher", "enricher-1", &env);
    poll_until("the fetch is in flight", || async {
        server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .any(|r| r.url.path().ends_with(&account.to_string()))
    })
    .await;
    first.process.kill().await.unwrap();
    let pool = PgPool::connect(&database_url).await.unwrap();
    let fetched = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event = $1")
            .bind(domain::ACCOUNT_FETCHED)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(fetched().await, 0);
    assert_eq!(
        store::enrichment::pending(&mut pool.acquire().await.unwrap())
            .await
            .unwrap(),
        1,
        "the request survived the crash"
    );

    // Argyle answers promptly now; a new enricher fetches the account, once.
    server.reset().await;
    check().mount(&server).await;
    mock_account(account)
        .respond_with(ResponseTemplate::new(200).set_body_json(account_object(account)))
        .expect(1)
        .mount(&server)
        .await;
    let mut second = spawn_binary(&database_url, "enricher", "enricher-2", &env);
    poll_until("the account is fetched", || async { fetched().await == 1 }).await;
    poll_until("nothing is pending", || async {
        store::enrichment::pending(&mut pool.acquire().await.unwrap())
            .await
            .unwrap()
            == 0
    })
    .await;
    assert_eq!(fetched().await, 1);
    second.process.kill().await.unwrap();
    server.verify().await;
}
