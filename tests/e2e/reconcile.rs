//! `reconcile` against a fake of Argyle's `GET /v2/accounts` (wiremock; Basic auth checked, the
//! real response shape, `limit=200` and the `next` cursor): backfill, drift, retries, a kill half
//! way, the service role, dry runs and the missing-share guard, and the enricher's schedule.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use account_projector::{ArgyleApi, Role};
use enricher::EnricherConfig;
use enricher::reconcile::ReconcileConfig;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;
use wiremock::matchers::{basic_auth, method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::argyle::{KEY_ID, KEY_SECRET};
use crate::helpers::*;

/// The real listing's first account, the template of every generated one.
fn template() -> Value {
    let path = fixtures_dir().join("real-deliveries/api/list_accounts.json");
    let list: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    list["results"][0].clone()
}

/// An account object as Argyle shows it, stamped `updated_at` = base + `minutes`.
fn argyle_account(id: Uuid, user: Uuid, minutes: i64) -> Value {
    let mut account = template();
    account["id"] = json!(id);
    account["user"] = json!(user);
    account["updated_at"] = json!(stamp(minutes));
    account
}

fn stamp(minutes: i64) -> String {
    (chrono::DateTime::parse_from_rfc3339("2026-03-02T15:04:11.123456Z").unwrap()
        + chrono::Duration::minutes(minutes))
    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A webhook carrying `resource`.
fn webhook(resource: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(&json!({
        "event": "accounts.updated",
        "name": "account-projector",
        "data": {"account": resource["id"], "user": resource["user"], "resource": resource}
    }))
    .unwrap()
}

/// Argyle's account list, served 200 at a time with an offset as the cursor.
#[derive(Default)]
struct State {
    listed: Vec<Value>,
    /// What `GET /v2/accounts/{id}` answers beyond the listed ones (an account the listing
    /// missed); any other id is a 404.
    also_gettable: Vec<Value>,
    /// Answers given once, instead of the page at that offset.
    failures: Vec<(usize, ResponseTemplate)>,
    /// The offset of every list request, failures included, and when it arrived.
    requests: Vec<(usize, std::time::Instant)>,
    /// The server's own URL, for `next`.
    base: String,
    /// Before serving this offset, say so and wait to be released.
    gate: Option<(usize, mpsc::Sender<()>, mpsc::Receiver<()>)>,
}

#[derive(Clone, Default)]
struct FakeArgyle(Arc<Mutex<State>>);

impl FakeArgyle {
    fn with(listed: Vec<Value>) -> Self {
        let fake = Self::default();
        fake.0.lock().unwrap().listed = listed;
        fake
    }

    async fn serve(&self) -> MockServer {
        let server = MockServer::start().await;
        self.0.lock().unwrap().base = server.uri();
        Mock::given(method("GET"))
            .and(path("/v2/accounts"))
            .and(basic_auth(KEY_ID, KEY_SECRET))
            .respond_with(ListPage(self.clone()))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path_regex("^/v2/accounts/[0-9a-f-]{36}$"))
            .and(basic_auth(KEY_ID, KEY_SECRET))
            .respond_with(OneAccount(self.clone()))
            .mount(&server)
            .await;
        // Any other key: what Argyle answers a wrong one.
        Mock::given(method("GET"))
            .respond_with(
                ResponseTemplate::new(401)
                    .set_body_json(json!({"detail": "Invalid username/password."})),
            )
            .with_priority(10)
            .mount(&server)
            .await;
        server
    }

    fn requests(&self) -> Vec<usize> {
        self.0
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|r| r.0)
            .collect()
    }

    /// When each request for `offset` arrived.
    fn arrivals(&self, offset: usize) -> Vec<std::time::Instant> {
        let state = self.0.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|r| r.0 == offset)
            .map(|r| r.1)
            .collect()
    }

    /// Holds the answer for `offset` back until the returned sender is used; the receiver hears
    /// when the request arrived.
    fn hold(&self, offset: usize) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (arrived_tx, arrived) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        self.0.lock().unwrap().gate = Some((offset, arrived_tx, release_rx));
        (arrived, release)
    }

    fn fail_once(&self, offset: usize, answer: ResponseTemplate) {
        self.0.lock().unwrap().failures.push((offset, answer));
    }
}

struct ListPage(FakeArgyle);

impl Respond for ListPage {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let query: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        let offset: usize = query.get("cursor").map_or(0, |c| c.parse().unwrap());
        let limit: usize = query.get("limit").map_or(200, |l| l.parse().unwrap());
        if limit != 200 {
            // The check of the URL and key (`limit=1`), not a page of the listing.
            let state = self.0.0.lock().unwrap();
            let page = json!({"next": null, "previous": null, "results": &state.listed[..limit.min(state.listed.len())]});
            return ResponseTemplate::new(200).set_body_json(page);
        }
        let user: Option<Uuid> = query.get("user").map(|u| u.parse().unwrap());
        let gate = {
            let mut state = self.0.0.lock().unwrap();
            match &state.gate {
                Some((at, _, _)) if *at == offset => state.gate.take(),
                _ => None,
            }
        };
        if let Some((_, arrived, release)) = gate {
            arrived.send(()).unwrap();
            release.recv_timeout(PATIENCE).unwrap();
        }
        let mut state = self.0.0.lock().unwrap();
        state.requests.push((offset, std::time::Instant::now()));
        if let Some(i) = state.failures.iter().position(|(at, _)| *at == offset) {
            return state.failures.remove(i).1;
        }
        let matching: Vec<&Value> = state
            .listed
            .iter()
            .filter(|a| user.is_none_or(|u| a["user"] == json!(u)))
            .collect();
        let end = (offset + 200).min(matching.len());
        let next = (end < matching.len()).then(|| {
            let user = user.map(|u| format!("&user={u}")).unwrap_or_default();
            format!("{}/v2/accounts?limit=200&cursor={end}{user}", state.base)
        });
        let page =
            json!({"next": next, "previous": null, "results": &matching[offset.min(end)..end]});
        ResponseTemplate::new(200)
            .set_body_raw(serde_json::to_vec(&page).unwrap(), "application/json")
    }
}

struct OneAccount(FakeArgyle);

impl Respond for OneAccount {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = request.url.path().rsplit('/').next().unwrap();
        let state = self.0.0.lock().unwrap();
        match state
            .listed
            .iter()
            .chain(&state.also_gettable)
            .find(|a| a["id"] == json!(id))
        {
            Some(account) => ResponseTemplate::new(200).set_body_json(account),
            None => ResponseTemplate::new(404).set_body_json(json!({"detail": "Not found."})),
        }
    }
}

fn many_accounts(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| argyle_account(Uuid::new_v4(), Uuid::new_v4(), i as i64 % 600))
        .collect()
}

fn argyle_env(server: &MockServer) -> Vec<(&'static str, String)> {
    vec![
        ("ARGYLE_API_URL", format!("{}/v2", server.uri())),
        ("ARGYLE_API_KEY_ID", KEY_ID.into()),
        ("ARGYLE_API_KEY_SECRET", KEY_SECRET.into()),
    ]
}

/// Runs `account-projector reconcile <args>`; (exit code, summary lines by name, stdout, stderr).
async fn reconcile(
    database_url: &str,
    server: &MockServer,
    args: &[&str],
) -> (i32, BTreeMap<String, String>, String, String) {
    let env = argyle_env(server);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut all = vec!["reconcile", "--rate", "500"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_binary(database_url, &all, &env).await;
    let summary = stdout
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (code, summary, stdout, stderr)
}

fn count(summary: &BTreeMap<String, String>, name: &str) -> i64 {
    summary
        .get(name)
        .unwrap_or_else(|| panic!("no {name:?} in the summary {summary:?}"))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `reconcile`-appended events per account.
async fn fetched_per_account(pool: &PgPool) -> HashMap<Uuid, i64> {
    let from_api: std::collections::HashSet<i64> =
        sqlx::query_scalar("SELECT position FROM events WHERE origin = 'argyle_api'")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut counts = HashMap::new();
    for event in logged_events(pool).await {
        let store::keys::Opened::Plain(body) = &event.body else {
            continue;
        };
        let body: Value = serde_json::from_slice(body).unwrap();
        if event.event == "argyle.account_fetched"
            && from_api.contains(&event.position)
            && body["fetched"]["reason"] == "reconcile"
        {
            *counts.entry(event.account_id.unwrap()).or_insert(0) += 1;
        }
    }
    counts
}

/// A projector (and the rest of `all`) on `database_url`.
async fn service_on(database_url: &str) -> TestApp {
    let mut settings = test_settings().await;
    settings.database_url = database_url.to_owned();
    spawn_app_with(settings).await
}

/// Every listed account's snapshot holds Argyle's object.
async fn assert_snapshots_are(pool: &PgPool, accounts: &[Value]) {
    let snapshots = stored_snapshots(pool).await;
    for account in accounts {
        let id: Uuid = serde_json::from_value(account["id"].clone()).unwrap();
        let snapshot = snapshots
            .get(&id)
            .unwrap_or_else(|| panic!("no snapshot of {id}"));
        assert_eq!(
            snapshot.resource.as_ref().map(|r| r.value()).as_ref(),
            Some(account),
            "{id}"
        );
        assert_eq!(json!(snapshot.user_id), account["user"]);
    }
}

#[tokio::test]
async fn a_backfill_of_2000_accounts_over_10_pages_appends_each_once_and_a_second_run_nothing() {
    let accounts = many_accounts(2_001);
    let fake = FakeArgyle::with(accounts.clone());
    let server = fake.serve().await;
    let database_url = migrated_database().await;
    let pool = PgPool::connect_lazy(&database_url).unwrap();

    // No projector runs: the second run must compare with the log, not the (empty) snapshots.
    let (code, summary, _, stderr) = reconcile(&database_url, &server, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "pages"), 11);
    assert_eq!(count(&summary, "listed"), 2_001);
    assert_eq!(count(&summary, "new"), 2_001);
    assert_eq!(count(&summary, "missing at Argyle"), 0);
    let offsets: Vec<usize> = (0..11).map(|p| p * 200).collect();
    assert_eq!(fake.requests(), offsets, "every page once, in order");
    let appended = fetched_per_account(&pool).await;
    assert_eq!(appended.len(), 2_001);
    assert!(appended.values().all(|&n| n == 1));
    let head_after_first = head(&pool).await;

    let (code, summary, _, stderr) = reconcile(&database_url, &server, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "new"), 0);
    assert_eq!(count(&summary, "unchanged"), 2_001);
    assert_eq!(
        head(&pool).await,
        head_after_first,
        "the second run appended"
    );

    let app = service_on(&database_url).await;
    app.wait_for_projection().await;
    assert_snapshots_are(&pool, &accounts).await;
    // Once folded, a third run still appends nothing and finds nothing missing.
    let (_, summary, _, _) = reconcile(&database_url, &server, &[]).await;
    assert_eq!(count(&summary, "unchanged"), 2_001);
    assert_eq!(count(&summary, "missing at Argyle"), 0);
    assert_eq!(head(&pool).await, head_after_first);

    // Another ARGYLE_API_URL than the last full run's is refused unless forced.
    let elsewhere = FakeArgyle::with(many_accounts(3)).serve().await;
    let (code, _, _, stderr) = reconcile(&database_url, &elsewhere, &[]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("pass --force"), "{stderr}");
    assert_eq!(head(&pool).await, head_after_first);
    let (code, summary, _, stderr) = reconcile(&database_url, &elsewhere, &["--force"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "new"), 3);
    app.stop().await;
}

#[tokio::test]
async fn the_real_listing_is_logged_byte_for_byte_with_the_reason() {
    let raw =
        std::fs::read_to_string(fixtures_dir().join("real-deliveries/api/list_accounts.json"))
            .unwrap();
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v2/accounts"))
        .and(basic_auth(KEY_ID, KEY_SECRET))
        .respond_with(ResponseTemplate::new(200).set_body_raw(raw.clone(), "application/json"))
        .mount(&server)
        .await;
    let database_url = migrated_database().await;
    let pool = PgPool::connect_lazy(&database_url).unwrap();
    let (code, summary, _, stderr) = reconcile(&database_url, &server, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "new"), 1);
    // The object exactly as Argyle wrote it: from its `{` to its `}`, indentation and all.
    let start = raw.find("\"results\": [").unwrap();
    let start = start + raw[start..].find('{').unwrap();
    let end = raw.rfind(']').unwrap();
    let end = raw[..end].rfind('}').unwrap() + 1;
    let object = &raw[start..end];
    let body = logged_body(&pool, 1).await;
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains(object), "{body}");
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["event"], "argyle.account_fetched");
    assert_eq!(event["fetched"]["reason"], "reconcile");
    assert_eq!(event["fetched"]["status"], 200);
    assert_eq!(event["fetched"]["request"], "GET /v2/accounts?limit=200");
}

#[tokio::test]
async fn a_mix_of_drift_is_sorted_out_and_a_webhook_during_the_run_wins() {
    let database_url = migrated_database().await;
    let app = service_on(&database_url).await;
    let user = Uuid::new_v4();
    let id = |_: &str| Uuid::new_v4();
    let (unknown, newer, older, same, unlisted) = (id("u"), id("n"), id("o"), id("s"), id("m"));
    // Held here: newer at Argyle (ours at 10), older at Argyle (ours at 50), identical (20),
    // and one Argyle does not list.
    for (account, minutes) in [(newer, 10), (older, 50), (same, 20), (unlisted, 5)] {
        app.deliver(&webhook(&argyle_account(account, user, minutes)))
            .await;
    }
    // Page 1 (200 fillers and `raced`, listed at 30) and page 2 (`raced_later`, listed at 30):
    // a newer webhook for each arrives while page 2 is held back.
    let (raced, raced_later) = (Uuid::new_v4(), Uuid::new_v4());
    let mut listed = vec![
        argyle_account(unknown, user, 1),
        argyle_account(newer, user, 40),
        argyle_account(older, user, 30),
        argyle_account(same, user, 20),
        argyle_account(raced, user, 30),
    ];
    listed.extend(many_accounts(195));
    listed.push(argyle_account(raced_later, user, 30));
    let fake = FakeArgyle::with(listed.clone());
    let (arrived, release) = fake.hold(200);
    let server = fake.serve().await;
    app.wait_for_projection().await;

    let run = {
        let database_url = database_url.clone();
        let server_uri = server.uri();
        tokio::spawn(async move {
            let env = [
                ("ARGYLE_API_URL", format!("{server_uri}/v2")),
                ("ARGYLE_API_KEY_ID", KEY_ID.into()),
                ("ARGYLE_API_KEY_SECRET", KEY_SECRET.into()),
            ];
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run_binary(&database_url, &["reconcile", "--rate", "500"], &env).await
        })
    };
    tokio::task::spawn_blocking(move || arrived.recv_timeout(PATIENCE).unwrap())
        .await
        .unwrap();
    // Page 1 is committed (raced appended at 30); page 2 is asked for but not yet answered.
    let newer_webhooks = [
        argyle_account(raced, user, 60),
        argyle_account(raced_later, user, 60),
    ];
    for resource in &newer_webhooks {
        app.deliver(&webhook(resource)).await;
    }
    release.send(()).unwrap();
    let (code, stdout, stderr) = run.await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    let summary: BTreeMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once(": ")).collect();
    assert_eq!(summary["listed"], "201");
    assert_eq!(summary["new"], "197", "unknown, raced and 195 fillers");
    assert_eq!(summary["newer at Argyle"], "1");
    assert_eq!(summary["unchanged"], "1");
    assert_eq!(summary["newer here"], "2", "older, and raced_later");
    assert_eq!(summary["missing at Argyle"], "1 of 4 held as active");
    assert!(
        stdout.contains(&format!("missing at Argyle: {unlisted} (user {user})")),
        "{stdout}"
    );

    app.wait_for_projection().await;
    let resource_at = |account: Uuid| {
        let app = &app;
        async move { app.account_view(account).await["resource"]["updated_at"].clone() }
    };
    assert_eq!(resource_at(unknown).await, json!(stamp(1)));
    assert_eq!(resource_at(newer).await, json!(stamp(40)));
    assert_eq!(resource_at(older).await, json!(stamp(50)), "ours was newer");
    assert_eq!(resource_at(same).await, json!(stamp(20)));
    assert_eq!(
        resource_at(raced).await,
        json!(stamp(60)),
        "the webhook wins"
    );
    assert_eq!(resource_at(raced_later).await, json!(stamp(60)));
    let view = app.account_view(unlisted).await;
    assert_eq!(view["status"], "active", "never removed silently");
    let appended = fetched_per_account(&app.pool).await;
    assert_eq!(
        appended.get(&raced_later),
        None,
        "compared with the log, not appended"
    );
    assert_eq!(appended.get(&older), None);
    assert_eq!(appended.get(&same), None);
    assert_eq!(appended.get(&newer), Some(&1));
    app.stop().await;
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_without_skipping_or_doubling() {
    let accounts = many_accounts(1_000);
    let fake = FakeArgyle::with(accounts.clone());
    fake.fail_once(
        400,
        ResponseTemplate::new(429)
            .insert_header("Retry-After", "3")
            .set_body_json(json!({"detail": "Request was throttled."})),
    );
    fake.fail_once(800, ResponseTemplate::new(503));
    let server = fake.serve().await;
    let database_url = migrated_database().await;
    let pool = PgPool::connect_lazy(&database_url).unwrap();
    let (code, summary, _, stderr) = reconcile(&database_url, &server, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    // The first backoff is 1 s: only Retry-After makes the second try wait 3 s.
    let tries = fake.arrivals(400);
    assert_eq!(tries.len(), 2);
    assert!(
        tries[1] - tries[0] >= Duration::from_secs(3),
        "Retry-After was not honoured: {:?}",
        tries[1] - tries[0]
    );
    assert_eq!(count(&summary, "new"), 1_000);
    assert_eq!(fake.requests(), [0, 200, 400, 400, 600, 800, 800]);
    let appended = fetched_per_account(&pool).await;
    assert_eq!(appended.len(), 1_000);
    assert!(appended.values().all(|&n| n == 1));
}

#[tokio::test]
async fn killed_half_way_the_next_run_resumes_after_the_last_page_it_committed() {
    let accounts = many_accounts(2_000);
    let fake = FakeArgyle::with(accounts.clone());
    let server = fake.serve().await;
    let database_url = migrated_database().await;
    let pool = PgPool::connect_lazy(&database_url).unwrap();
    // Page 4 is held back: the run is killed while it waits for it, after 3 committed pages.
    let (arrived, release) = fake.hold(600);
    let env = argyle_env(&server);
    let mut child = tokio::process::Command::new(binary())
        .args(["reconcile", "--rate", "500"])
        .env("DATABASE_URL", &database_url)
        .env("DATA_KEYS", DATA_KEY)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(move || arrived.recv_timeout(PATIENCE).unwrap())
        .await
        .unwrap();
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    release.send(()).unwrap();
    let committed: i32 = sqlx::query_scalar("SELECT pages FROM reconcile_runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(committed, 3);
    assert_eq!(fetched_per_account(&pool).await.len(), 600);
    let requests_before = fake.requests().len();

    let (code, summary, stdout, stderr) = reconcile(&database_url, &server, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("resumed: run 1 after page {committed}")),
        "{stdout}"
    );
    assert_eq!(count(&summary, "listed"), 2_000, "the whole run's counts");
    assert_eq!(count(&summary, "new"), 2_000);
    // The second run asked only for the pages after the last committed one.
    let resumed: Vec<usize> = fake.requests()[requests_before..].to_vec();
    let expected: Vec<usize> = (committed as usize..10).map(|p| p * 200).collect();
    assert_eq!(resumed, expected);
    let appended = fetched_per_account(&pool).await;
    assert_eq!(appended.len(), 2_000);
    assert!(
        appended.values().all(|&n| n == 1),
        "an account appended twice"
    );
    let app = service_on(&database_url).await;
    app.wait_for_projection().await;
    assert_snapshots_are(&pool, &accounts).await;
    app.stop().await;
}

#[tokio::test]
async fn it_runs_as_the_service_role() {
    let accounts = many_accounts(300);
    let fake = FakeArgyle::with(accounts);
    let server = fake.serve().await;
    let database_url = fresh_database().await;
    crate::security::run_roles_sql(&database_url);
    let (code, _, stderr) = run_binary(
        &crate::security::as_role(&database_url, crate::security::OWNER),
        &["migrate"],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let as_service = crate::security::as_role(&database_url, crate::security::SERVICE);
    let (code, summary, _, stderr) = reconcile(&as_service, &server, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "new"), 300);
    let (code, summary, _, stderr) = reconcile(&as_service, &server, &["--dry-run"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "unchanged"), 300);
    let pool = PgPool::connect_lazy(&database_url).unwrap();
    assert_eq!(fetched_per_account(&pool).await.len(), 300);
}

#[tokio::test]
async fn a_dry_run_appends_nothing_and_removals_need_a_404_and_pass_the_guard() {
    let database_url = migrated_database().await;
    let app = service_on(&database_url).await;
    let user = Uuid::new_v4();
    let held: Vec<Value> = (0..10)
        .map(|i| argyle_account(Uuid::new_v4(), user, i))
        .collect();
    for account in &held {
        app.deliver(&webhook(account)).await;
    }
    app.wait_for_projection().await;
    // Argyle lists 2 of the 10 and a new one; of the 8 it does not list, GET finds 1 after all.
    let mut listed = held[..2].to_vec();
    let newcomer = argyle_account(Uuid::new_v4(), user, 0);
    listed.push(newcomer.clone());
    let fake = FakeArgyle::with(listed);
    fake.0.lock().unwrap().also_gettable = vec![held[2].clone()];
    let server = fake.serve().await;
    let head_before = head(&app.pool).await;

    let (code, summary, stdout, stderr) = reconcile(&database_url, &server, &["--dry-run"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\ndry run: nothing appended\n"), "{stdout}");
    assert_eq!(count(&summary, "new"), 1);
    assert_eq!(count(&summary, "unchanged"), 2);
    assert_eq!(summary["missing at Argyle"], "8 of 10 held as active");
    assert_eq!(
        stdout.matches("missing at Argyle: ").count(),
        9,
        "8 ids and the total"
    );
    assert_eq!(head(&app.pool).await, head_before, "a dry run appended");

    // 80% missing: the guard refuses removals, and nothing is appended for them.
    let (code, _, _, stderr) =
        reconcile(&database_url, &server, &["--confirm-removals", "--dry-run"]).await;
    assert_eq!(code, 3, "{stderr}");
    let (code, summary, _, stderr) =
        reconcile(&database_url, &server, &["--confirm-removals"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("removals refused"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(
        count(&summary, "new"),
        1,
        "the listing itself is still reconciled"
    );
    let head_refused = head(&app.pool).await;
    assert_eq!(head_refused, head_before + 1);

    let (code, summary, stdout, stderr) =
        reconcile(&database_url, &server, &["--confirm-removals", "--force"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "removals confirmed"), 7, "{stdout}");
    app.wait_for_projection().await;
    for (i, account) in held.iter().enumerate() {
        let view = app.account_view(account["id"].as_str().unwrap()).await;
        let expected = if i < 3 { "active" } else { "removed" };
        assert_eq!(view["status"], expected, "account {i}");
        if i >= 3 {
            assert_eq!(view["last_event"], "argyle.account_removed");
        }
    }
    // A rebuild folds the confirmed removals as the projector did.
    let (code, stdout, stderr) = run_binary(&database_url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Removed accounts are no longer held as active.
    let (code, summary, _, stderr) = reconcile(&database_url, &server, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    // Only the one GET found is left: held as active and still not listed.
    assert_eq!(summary["missing at Argyle"], "1 of 4 held as active");
    app.stop().await;
}

#[tokio::test]
async fn one_account_or_one_user_is_reconciled_alone() {
    let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mine: Vec<Value> = (0..3)
        .map(|i| argyle_account(Uuid::new_v4(), user, i))
        .collect();
    let mut listed = mine.clone();
    listed.extend((0..4).map(|i| argyle_account(Uuid::new_v4(), other, i)));
    let fake = FakeArgyle::with(listed.clone());
    let server = fake.serve().await;
    let database_url = migrated_database().await;
    let pool = PgPool::connect_lazy(&database_url).unwrap();
    let user_arg = user.to_string();
    let (code, summary, _, stderr) =
        reconcile(&database_url, &server, &["--user", &user_arg]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "new"), 3);
    let one = listed[5]["id"].as_str().unwrap().to_owned();
    let (code, summary, _, stderr) = reconcile(&database_url, &server, &["--account", &one]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "new"), 1);
    let appended = fetched_per_account(&pool).await;
    assert_eq!(appended.len(), 4);
    let unknown = Uuid::new_v4().to_string();
    let (code, summary, _, stderr) =
        reconcile(&database_url, &server, &["--account", &unknown]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "listed"), 0);
    // Bad input changes nothing and says why.
    let (code, _, _, stderr) = reconcile(&database_url, &server, &["--account", "nope"]).await;
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid value 'nope'"), "{stderr}");
    let (code, _, _, stderr) =
        reconcile(&database_url, &server, &["--max-missing-share", "2"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(fetched_per_account(&pool).await.len(), 4);
}

#[tokio::test]
async fn a_wrong_key_or_a_broken_page_is_one_sentence_and_appends_nothing() {
    let fake = FakeArgyle::with(many_accounts(10));
    let server = fake.serve().await;
    let database_url = migrated_database().await;
    let pool = PgPool::connect_lazy(&database_url).unwrap();
    let env = [
        ("ARGYLE_API_URL", format!("{}/v2", server.uri())),
        ("ARGYLE_API_KEY_ID", "wrong".to_owned()),
        ("ARGYLE_API_KEY_SECRET", "key".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, _, stderr) = run_binary(&database_url, &["reconcile"], &env).await;
    assert_eq!(code, 1);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("ARGYLE_API_KEY_ID"), "{stderr}");
    fake.fail_once(
        0,
        ResponseTemplate::new(200).set_body_raw("{\"results\": [", "application/json"),
    );
    let (code, _, _, stderr) = reconcile(&database_url, &server, &[]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("could not be understood"), "{stderr}");
    assert_eq!(head(&pool).await, 0);
}

#[tokio::test]
async fn the_enricher_reconciles_on_schedule_with_status_and_metrics() {
    let accounts = many_accounts(450);
    let fake = FakeArgyle::with(accounts.clone());
    let server = fake.serve().await;
    crate::argyle::mount_key_check(&server).await;
    let mut settings = test_settings().await;
    settings.role = Role::All;
    settings.argyle = Some(ArgyleApi {
        url: format!("{}/v2", server.uri()),
        key_id: KEY_ID.into(),
        key_secret: KEY_SECRET.into(),
    });
    settings.enricher = EnricherConfig {
        reconcile_interval: Some(Duration::from_secs(3600)),
        reconcile: ReconcileConfig {
            rate: 50.0,
            ..ReconcileConfig::default()
        },
        ..EnricherConfig::default()
    };
    let app = spawn_app_with(settings).await;
    poll_until("the scheduled run finishes", || async {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM reconcile_runs")
            .fetch_optional(&app.pool)
            .await
            .unwrap();
        state.as_deref() == Some("finished")
    })
    .await;
    app.wait_for_projection().await;
    assert_snapshots_are(&app.pool, &accounts).await;
    // The run's metrics are recorded just after its end is; then the schedule waits an hour.
    let metrics = poll_for("the run's metrics", || async {
        let metrics = app.get("/metrics").await.text().await.unwrap();
        metrics
            .contains("reconcile_next_run_seconds")
            .then_some(metrics)
    })
    .await;
    let next_run: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("reconcile_next_run_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((3_500.0..=3_600.0).contains(&next_run), "{next_run}");
    assert!(
        metrics.contains("reconcile_runs_total{outcome=\"finished\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("reconcile_drift_total{kind=\"new\"} 450"),
        "{metrics}"
    );
    let (code, stdout, _) = run_binary(&app.database_url, &["status"], &[]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("reconcile:   run 1 finished") && stdout.contains("started by schedule"),
        "{stdout}"
    );
    assert!(stdout.contains("new 450"), "{stdout}");
    // The next run is an hour away: nothing else is listed meanwhile.
    assert_eq!(fake.requests(), [0, 200, 400]);
    app.stop().await;
}

#[tokio::test]
async fn a_removal_under_the_guard_needs_no_force_and_is_confirmed_once_whatever_the_projector() {
    let database_url = migrated_database().await;
    let app = service_on(&database_url).await;
    let user = Uuid::new_v4();
    let held: Vec<Value> = (0..20)
        .map(|i| argyle_account(Uuid::new_v4(), user, i))
        .collect();
    for account in &held {
        app.deliver(&webhook(account)).await;
    }
    // A webhook that names itself a confirmed removal is logged, and removes nothing.
    let forged = serde_json::to_vec(&json!({
        "event": "argyle.account_removed",
        "data": {"account": held[0]["id"], "user": user}
    }))
    .unwrap();
    app.deliver(&forged).await;
    app.wait_for_projection().await;
    assert_eq!(
        app.account_view(held[0]["id"].as_str().unwrap()).await["status"],
        "active"
    );
    app.stop().await;

    // Argyle lists 19 of the 20 (5% missing, under the 10% guard). The projector is stopped.
    let fake = FakeArgyle::with(held[..19].to_vec());
    let server = fake.serve().await;
    let (code, summary, _, stderr) =
        reconcile(&database_url, &server, &["--confirm-removals"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(count(&summary, "removals confirmed"), 1);
    // The removal is in the log, not yet folded: a second run confirms nothing again.
    let (code, summary, _, stderr) =
        reconcile(&database_url, &server, &["--confirm-removals"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(summary.get("removals confirmed"), None, "{summary:?}");
    assert_eq!(count(&summary, "missing at Argyle"), 0);
    let pool = PgPool::connect_lazy(&database_url).unwrap();
    let removals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event = 'argyle.account_removed' AND origin = 'argyle_api'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(removals, 1);
    let app = service_on(&database_url).await;
    app.wait_for_projection().await;
    assert_eq!(
        app.account_view(held[19]["id"].as_str().unwrap()).await["status"],
        "removed"
    );
    app.stop().await;
}
