//! The test harness shared by `tests/e2e` and `tests/soak`: databases, a running app, signed
//! requests, the binary as a child process, and a fresh fold of the log.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use account_projector::{Application, Settings};
use domain::AccountSnapshot;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha512;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SECRET: &str = "test_webhook_secret";
pub const ACCOUNT: &str = "0187c66e-e7e5-811c-b006-2232f00f426a";
pub const USER: &str = "018051aa-f7a9-a0db-2f38-6cfa325e9d69";

/// Waits used by polls: generous, since CI machines are small; a poll returns as soon as it can.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn url_for(database: &str) -> String {
    let base = server_url();
    let (prefix, _) = base
        .rsplit_once('/')
        .expect("TEST_DATABASE_URL has a database path");
    format!("{prefix}/{database}")
}

/// Creates an empty database of its own for one test and returns its URL. Databases of earlier runs
/// older than two hours are dropped first (once per test process).
pub async fn fresh_database() -> String {
    static SWEPT: OnceCell<()> = OnceCell::const_new();
    let mut admin = PgConnection::connect(&server_url())
        .await
        .expect("Postgres is reachable at TEST_DATABASE_URL");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    SWEPT
        .get_or_init(|| async {
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT datname FROM pg_database WHERE datname LIKE 'ap\\_test\\_%'",
            )
            .fetch_all(&mut admin)
            .await
            .unwrap();
            for name in names {
                let created = name
                    .split('_')
                    .nth(2)
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(now);
                if now.saturating_sub(created) > 7200 {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
            }
        })
        .await;
    let name = format!("ap_test_{now}_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await
        .unwrap();
    url_for(&name)
}

/// A fresh, migrated database.
pub async fn migrated_database() -> String {
    let url = fresh_database().await;
    store::migrate::migrate(&url).await.unwrap();
    url
}

pub fn sign(body: &[u8]) -> String {
    sign_with(SECRET, body)
}

pub fn sign_with(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha512>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The `account-projector` binary cargo builds for the package's integration tests, which run
/// from `target/<profile>/deps/`: it sits one directory up.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable is under target/<profile>/deps");
    profile_dir.join(format!("account-projector{}", std::env::consts::EXE_SUFFIX))
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A file of `tests/fixtures/argyle/` (one account's first connection), byte-exact.
pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join("argyle").join(name)).unwrap()
}

/// Fixtures 01..=08 in order.
pub fn fixture_sequence() -> Vec<(String, Vec<u8>)> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir().join("argyle"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| (n.clone(), fixture(&n)))
        .collect()
}

/// The body with every occurrence of the fixture account's id replaced by `account`.
pub fn for_account(body: &[u8], account: Uuid) -> Vec<u8> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .replace(ACCOUNT, &account.to_string())
        .into_bytes()
}

/// `data.resource` of a body.
pub fn resource_of(body: &[u8]) -> serde_json::Value {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap();
    value["data"]["resource"].clone()
}

pub struct TestApp {
    pub address: String,
    pub database_url: String,
    /// The test's own pool, for assertions; independent of the app's.
    pub pool: PgPool,
    pub client: reqwest::Client,
    /// Makes a supervised task of the app panic (see `account_projector::supervisor`).
    pub faults: account_projector::supervisor::Faults,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The tests' key-encryption key (DATA_KEYS), fixed so that every process of a test opens what
/// another sealed. Never a production key.
pub const DATA_KEY: &str = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=";

/// A vault with [`DATA_KEY`].
pub fn vault() -> store::keys::Vault {
    store::keys::Vault::new(sealing::KeyRing::parse(DATA_KEY).unwrap())
}

/// Settings for a test app on a fresh database: port 0, the fixture secret, quick polling.
pub async fn test_settings() -> Settings {
    let mut settings = Settings::new(fresh_database().await);
    settings.vault = vault();
    settings.listen_addr = "127.0.0.1:0".into();
    settings.webhook_secrets = vec![SECRET.into()];
    // Most tests query /v1 without a token; tests/e2e/security.rs checks it is closed otherwise.
    settings.allow_open_api = true;
    settings.projector.poll_interval = Duration::from_millis(200);
    settings.projector.retry_interval = Duration::from_millis(100);
    settings
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(test_settings().await).await
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    let database_url = settings.database_url.clone();
    let app = Application::build(settings).await.expect("the app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let faults = app.faults();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let pool = PgPool::connect_lazy(&database_url).unwrap();
    TestApp {
        address,
        database_url,
        pool,
        client: reqwest::Client::new(),
        faults,
        shutdown,
        handle,
    }
}

impl TestApp {
    /// Posts a body signed with the test secret.
    pub async fn post_webhook(&self, body: &[u8]) -> reqwest::Response {
        self.client
            .post(format!("{}/webhooks/argyle", self.address))
            .header("Content-Type", "application/json")
            .header("X-Argyle-Signature", sign(body))
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Posts a signed body and returns the accepted position, asserting a 200.
    pub async fn deliver(&self, body: &[u8]) -> (i64, bool) {
        let response = self.post_webhook(body).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        let json: serde_json::Value = response.json().await.unwrap();
        (
            json["position"].as_i64().unwrap(),
            json["duplicate"].as_bool().unwrap(),
        )
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap()
    }

    pub async fn account_view(&self, account: impl std::fmt::Display) -> serde_json::Value {
        let response = self.get(&format!("/v1/accounts/{account}")).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Waits until the projector has folded the whole log.
    pub async fn wait_for_projection(&self) {
        wait_for_projection(&self.pool).await;
    }

    pub async fn event_count(&self) -> (i64, i64) {
        log_counts(&self.pool).await
    }

    /// What the app's run ended with, if it ends within `limit` (without being asked to stop).
    pub async fn exit_within(self, limit: Duration) -> Option<anyhow::Result<()>> {
        let outcome = tokio::time::timeout(limit, self.handle).await.ok();
        self.shutdown.cancel();
        outcome.map(|joined| joined.expect("the app's task does not panic"))
    }

    /// Fires shutdown and waits for the app to stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// `(events, redeliveries)` rows in the log.
pub async fn log_counts(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM redeliveries)")
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn checkpoint(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT position FROM projector_checkpoints WHERE name = 'account_snapshots'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

pub async fn head(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT coalesce(max(position), 0)::bigint FROM events")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Polls until the checkpoint reaches the log head.
pub async fn wait_for_projection(pool: &PgPool) {
    let target = head(pool).await;
    poll_until("the projector catches up", || async {
        checkpoint(pool).await >= target
    })
    .await;
}

/// Polls `condition` every 20 ms until it holds; panics after [`PATIENCE`].
pub async fn poll_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let condition = &mut condition;
    poll_for(what, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Every snapshot folded afresh from the whole log with the domain's fold step, by account (an
/// event the fold refuses leaves the snapshot as it was).
pub async fn fresh_fold(pool: &PgPool) -> BTreeMap<Uuid, AccountSnapshot> {
    let mut conn = pool.acquire().await.unwrap();
    let mut by_account: BTreeMap<Uuid, AccountSnapshot> = BTreeMap::new();
    let vault = vault();
    let mut after = 0;
    let up_to = store::log::horizon(&mut conn).await.unwrap();
    loop {
        let page = store::log::read_after(&mut conn, &vault, after, up_to, 500)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = last.position;
        for stored in page {
            if let (true, Some(account)) = (
                domain::EventKind::of(&stored.event).is_folded(),
                stored.account_id,
            ) {
                let current = by_account.remove(&account);
                let next = match domain::step(current.clone(), stored.raw()) {
                    Ok(next) => next,
                    Err(_) => current,
                };
                if let Some(next) = next {
                    by_account.insert(account, next);
                }
            }
        }
    }
    by_account
}

/// Every event of the log as the API reads it (bodies opened with [`DATA_KEY`]), in order.
pub async fn logged_events(pool: &PgPool) -> Vec<store::log::EventRecord> {
    use futures_util::TryStreamExt;
    let mut conn = pool.acquire().await.unwrap();
    let vault = vault();
    store::log::page(&mut conn, &vault, None, 0, i64::MAX, i64::MAX)
        .try_collect()
        .await
        .unwrap()
}

/// The body logged at `position`, opened: the bytes exactly as received.
pub async fn logged_body(pool: &PgPool, position: i64) -> Vec<u8> {
    let events = logged_events(pool).await;
    let event = events
        .into_iter()
        .find(|e| e.position == position)
        .expect("an event at that position");
    match event.body {
        store::keys::Opened::Plain(body) => body,
        other => panic!("the body at {position} cannot be read: {other:?}"),
    }
}

/// Every stored snapshot, by account.
pub async fn stored_snapshots(pool: &PgPool) -> BTreeMap<Uuid, AccountSnapshot> {
    let mut conn = pool.acquire().await.unwrap();
    store::snapshots::all(&mut conn, &vault())
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.account_id, s))
        .collect()
}

/// Appends a signed-and-verified-elsewhere body straight into the log (no HTTP), for bulk setup.
pub async fn append_direct(pool: &PgPool, body: &[u8]) -> i64 {
    let envelope = domain::Envelope::parse(body).unwrap();
    let delivery = store::log::Delivery::new(body, None, &envelope);
    store::log::append(pool, &vault(), &delivery, Duration::from_secs(86_400))
        .await
        .unwrap()
        .position
}

/// An `accounts.updated` body for `account` whose resource is stamped `updated_at` = base + `step` ms.
pub fn refinement(account: Uuid, user: Uuid, step: u32) -> Vec<u8> {
    let updated_at = chrono::DateTime::parse_from_rfc3339("2026-03-02T15:04:11Z").unwrap()
        + chrono::Duration::milliseconds(i64::from(step));
    serde_json::to_vec_pretty(&serde_json::json!({
        "event": "accounts.updated",
        "name": "accounts-projector",
        "data": {
            "account": account,
            "user": user,
            "resource": {
                "id": account,
                "user": user,
                "updated_at": updated_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "connection": {"status": "connected"},
                "step": step
            }
        }
    }))
    .unwrap()
}

/// The release-or-debug binary built for these tests, run as a child process.
pub struct Child {
    pub process: tokio::process::Child,
    pub name: String,
}

/// Starts `account-projector serve --role <role>` against `database_url`; `name` becomes its
/// Postgres `application_name`, so a test can find its sessions.
pub fn spawn_binary(
    database_url: &str,
    role: &str,
    name: &str,
    extra_env: &[(&str, &str)],
) -> Child {
    let url = format!("{database_url}?application_name={name}");
    let mut command = tokio::process::Command::new(binary());
    command
        .args(["serve", "--role", role, "--no-migrate"])
        .env("DATABASE_URL", url)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ARGYLE_WEBHOOK_SECRETS", SECRET)
        .env("ALLOW_OPEN_API", "true")
        .env("PROJECTOR_POLL_INTERVAL", "100ms")
        .env("DATA_KEYS", DATA_KEY)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    Child {
        process: command.spawn().expect("the binary starts"),
        name: name.into(),
    }
}

/// The `application_name` of the session holding the projector's leader lock, if any.
pub async fn leader(pool: &PgPool) -> Option<String> {
    let mut conn = pool.acquire().await.unwrap();
    store::locks::holder(&mut conn, store::locks::Lock::Leader)
        .await
        .unwrap()
        .map(|(name, _, _)| name)
}

impl TestApp {
    /// Stops an app whose database may be unreachable (its result is not checked).
    pub async fn shutdown_quietly(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }
}

/// Polls `probe` every 20 ms until it yields a value; panics after [`PATIENCE`].
pub async fn poll_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the binary to completion with `args` against `database_url`; returns (exit code, stdout, stderr).
pub async fn run_binary(
    database_url: &str,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(binary());
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .env("DATA_KEYS", DATA_KEY)
        .env_remove("ARGYLE_WEBHOOK_SECRETS");
    for (key, value) in extra_env {
        command.env(key, value);
    }
    let output = command.output().await.expect("the binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// A TCP proxy in front of Postgres that a test can cut (connections dropped, new ones closed at
/// once, as when the server is down) or black-hole (connections accepted, nothing forwarded, as
/// when the network hangs), and restore.
pub struct DbProxy {
    pub port: u16,
    state: std::sync::Arc<tokio::sync::watch::Sender<ProxyState>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyState {
    Forwarding,
    Down,
    BlackHole,
}

impl DbProxy {
    /// Test settings whose app reaches a migrated database of its own through this proxy, with
    /// short timeouts so an outage shows within a second; also returns the direct URL.
    pub async fn settings(&self) -> (Settings, String) {
        let direct = migrated_database().await;
        let mut settings = test_settings().await;
        settings.database_url = self.url(&direct);
        settings.migrate = false;
        settings.db.acquire_timeout = Duration::from_millis(500);
        settings.database_timeout = Duration::from_millis(1000);
        (settings, direct)
    }

    pub async fn start() -> Self {
        let upstream = {
            let url = server_url();
            let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
            (options.get_host().to_string(), options.get_port())
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, _) = tokio::sync::watch::channel(ProxyState::Forwarding);
        let state = std::sync::Arc::new(state);
        let accepting = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mut watch = accepting.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let state = *watch.borrow_and_update();
                    match state {
                        ProxyState::Down => return,
                        ProxyState::BlackHole => {
                            // Hold the socket open, answer nothing, until the state changes.
                            let _ = watch.changed().await;
                            return;
                        }
                        ProxyState::Forwarding => {}
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = async {
                            loop {
                                if watch.changed().await.is_err() { return; }
                                let state = *watch.borrow();
                                match state {
                                    ProxyState::Down => return,
                                    // Stop forwarding but keep both sockets open.
                                    ProxyState::BlackHole => std::future::pending::<()>().await,
                                    ProxyState::Forwarding => {}
                                }
                            }
                        } => {}
                    }
                });
            }
        });
        Self { port, state }
    }

    pub fn set(&self, state: ProxyState) {
        self.state.send_replace(state);
    }

    /// `database_url` with its host and port replaced by the proxy's.
    pub fn url(&self, database_url: &str) -> String {
        let database = database_url.rsplit('/').next().unwrap();
        let base = server_url();
        let options: sqlx::postgres::PgConnectOptions = base.parse().unwrap();
        format!(
            "postgres://{}@127.0.0.1:{}/{database}",
            options.get_username(),
            self.port
        )
    }
}
