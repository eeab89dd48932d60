//! account-projector: composes the ingest, projector, api, enricher and notifier adapters into one service
//! by role.
//!
//! # Layout
//! - [`Settings`]: everything the service is configured with, and the one place its defaults are
//!   written (the binary's `cli.rs` reads them for its flags; `commands/` runs each subcommand).
//! - [`Application`]: validates the settings, migrates if asked, builds the router of the role,
//!   binds the listener, and runs the chosen roles until a shutdown token fires. Tests build one
//!   on port 0 against a database of their own.
//! - [`data_keys`]: where the key-encryption keys come from (`DATA_KEYS`, a file, or one
//!   generated for the quickstart).
//! - [`export`]: the NDJSON audit export; [`progress`]: progress bars and lines for long work.
//! - [`secret`]: secret values whose `Debug` hides them, and secrets read from a file or stdin.
//! - [`supervisor`]: the background tasks of the roles, supervised crash-only.
//! - [`telemetry`]: tracing setup (`RUST_LOG`, `LOG_FORMAT`), Prometheus metrics.
//! - [`openapi`]: `/openapi.json`; [`webhooks`]: the `webhooks create|list|delete` commands.

#![forbid(unsafe_code)]

pub mod data_keys;
pub mod export;
pub mod openapi;
pub mod progress;
pub mod secret;
pub mod supervisor;
pub mod telemetry;
pub mod webhooks;

use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use enricher::EnricherConfig;
use futures_util::future::BoxFuture;
use ingest::{IngestState, Secrets};
use projector::ProjectorConfig;
use store::{DbOptions, PgPool};
use supervisor::{Faults, Supervisor};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Which parts of the service this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Webhook ingest, projector and query API on one listener.
    All,
    /// `POST /webhooks/argyle` only.
    Ingest,
    /// The projector only (the listener serves health endpoints).
    Projector,
    /// The `/v1` query API only.
    Api,
    /// Fetches accounts for resource-less webhooks from Argyle's API (the listener serves health
    /// endpoints). Part of `all` when API keys are configured.
    Enricher,
    /// Delivers each change of the feed to outbound webhook subscribers (the listener serves
    /// health endpoints). Part of `all`.
    Notifier,
}

impl Role {
    fn ingests(self) -> bool {
        matches!(self, Self::All | Self::Ingest)
    }
    fn projects(self) -> bool {
        matches!(self, Self::All | Self::Projector)
    }
    fn serves_api(self) -> bool {
        matches!(self, Self::All | Self::Api)
    }
    fn enriches(self) -> bool {
        matches!(self, Self::All | Self::Enricher)
    }
    fn notifies(self) -> bool {
        matches!(self, Self::All | Self::Notifier)
    }
}

/// Shortest bearer token `serve` accepts: a guessable token is no lock.
pub const MIN_TOKEN_CHARS: usize = 16;

/// The service's configuration. Its `Debug` shows no secret: the database password, the webhook
/// secrets, the API tokens and the Argyle key are redacted.
#[derive(Clone)]
pub struct Settings {
    pub database_url: String,
    /// A streaming replica the query API, the feed and the pages read from.
    pub read_database_url: Option<String>,
    pub listen_addr: String,
    pub role: Role,
    /// Apply pending migrations (creating the database if needed) before serving.
    pub migrate: bool,
    pub webhook_secrets: Vec<String>,
    /// Run ingest with no secret, accepting unsigned deliveries. Off unless asked for.
    pub allow_unsigned_webhooks: bool,
    pub api_tokens: Vec<String>,
    /// Serve `/v1` with no token. Off unless asked for: without tokens, a role that serves `/v1`
    /// refuses to start.
    pub allow_open_api: bool,
    pub dedup_window: Duration,
    /// Most deliveries one commit may carry (group commit).
    pub max_commit_batch: usize,
    /// Group commits in flight at once, each on its own connection.
    pub commit_lanes: usize,
    pub max_body_bytes: usize,
    /// Longest time one HTTP request may take, slow clients included.
    pub request_timeout: Duration,
    /// Longest wait for the database within one request before answering 503.
    pub database_timeout: Duration,
    /// Longest time a client may take to send a request's headers (slowloris).
    pub header_timeout: Duration,
    /// How long shutdown waits for in-flight requests before closing their connections.
    pub shutdown_grace: Duration,
    pub projector: ProjectorConfig,
    /// Argyle's management API, for the enricher; `None` when no API key is configured.
    pub argyle: Option<ArgyleApi>,
    pub enricher: EnricherConfig,
    /// The change feed's long polls and streams.
    pub feed: api::feed::FeedConfig,
    /// The pages under `/ui/`: how long a session lasts.
    pub ui: api::ui::UiConfig,
    /// Outbound webhooks: the retry schedule and the pace.
    pub notifier: notifier::NotifierConfig,
    pub db: DbOptions,
    /// Seals personal data at rest ([`data_keys`]); plaintext until keys are given.
    pub vault: store::keys::Vault,
    /// Run with no keys, storing new events unencrypted (`ALLOW_PLAINTEXT_LOG`); otherwise a
    /// plaintext vault is refused.
    pub allow_plaintext_log: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |list: &[String]| format!("[{} redacted]", list.len());
        f.debug_struct("Settings")
            .field("database_url", &store::redacted_url(&self.database_url))
            .field(
                "read_database_url",
                &self.read_database_url.as_deref().map(store::redacted_url),
            )
            .field("listen_addr", &self.listen_addr)
            .field("role", &self.role)
            .field("migrate", &self.migrate)
            .field("webhook_secrets", &redacted(&self.webhook_secrets))
            .field("allow_unsigned_webhooks", &self.allow_unsigned_webhooks)
            .field("api_tokens", &redacted(&self.api_tokens))
            .field("allow_open_api", &self.allow_open_api)
            .field("dedup_window", &self.dedup_window)
            .field("max_commit_batch", &self.max_commit_batch)
            .field("commit_lanes", &self.commit_lanes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("database_timeout", &self.database_timeout)
            .field("header_timeout", &self.header_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("projector", &self.projector)
            .field("argyle", &self.argyle)
            .field("enricher", &self.enricher)
            .field("feed", &self.feed)
            .field("ui", &self.ui)
            .field("notifier", &self.notifier)
            .field("db", &self.db)
            .field("vault", &self.vault)
            .field("allow_plaintext_log", &self.allow_plaintext_log)
            .finish()
    }
}

/// Where and how to reach Argyle's management API.
#[derive(Clone)]
pub struct ArgyleApi {
    pub url: String,
    pub key_id: String,
    pub key_secret: String,
}

impl std::fmt::Debug for ArgyleApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArgyleApi")
            .field("url", &self.url)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ArgyleApi {
    /// A client, checking the URL.
    pub fn client(&self) -> anyhow::Result<argyle::Client> {
        Ok(argyle::Client::new(
            &self.url,
            &self.key_id,
            &self.key_secret,
        )?)
    }
}

impl Settings {
    /// Defaults of the contract, for the given database.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            read_database_url: None,
            listen_addr: "127.0.0.1:8080".into(),
            role: Role::All,
            migrate: true,
            webhook_secrets: vec![],
            allow_unsigned_webhooks: false,
            api_tokens: vec![],
            allow_open_api: false,
            dedup_window: Duration::from_secs(24 * 3600),
            max_commit_batch: 256,
            commit_lanes: 1,
            max_body_bytes: 1_048_576,
            request_timeout: Duration::from_secs(30),
            database_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            projector: ProjectorConfig::default(),
            argyle: None,
            enricher: EnricherConfig::default(),
            feed: api::feed::FeedConfig::default(),
            ui: api::ui::UiConfig::default(),
            notifier: notifier::NotifierConfig::default(),
            db: DbOptions::default(),
            vault: store::keys::Vault::plaintext(),
            allow_plaintext_log: false,
        }
    }
}

/// A configured service, bound to its port, not yet running.
pub struct Application {
    listener: TcpListener,
    router: Router,
    pool: PgPool,
    vault: store::keys::Vault,
    projector: Option<ProjectorConfig>,
    enricher: Option<(argyle::Client, EnricherConfig)>,
    notifier: Option<notifier::NotifierConfig>,
    /// The loops behind the routes (the committer, the shared reader), run supervised.
    loops: Loops,
    readiness: web::Readiness,
    faults: Faults,
    limits: ConnectionLimits,
    /// Ends the open feed streams at shutdown.
    streams: CancellationToken,
}

/// Per-connection timeouts of the HTTP server.
#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    header_timeout: Duration,
    shutdown_grace: Duration,
}

impl Application {
    /// Checks the settings, migrates if asked, builds the router of the role, and binds the
    /// listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let checked = validate(&settings)?;
        if settings.migrate {
            migrate(&settings.database_url).await?;
        }
        let mut db = settings.db.clone();
        db.application_name = format!("account-projector {:?}", settings.role).to_lowercase();
        let pool = store::pool(&settings.database_url, &db)?;
        // The replica's pool, for the roles that read through the query API.
        let reads = match &settings.read_database_url {
            Some(url) if settings.role.serves_api() => {
                let mut options = db.clone();
                options.application_name = format!("{} reads", db.application_name);
                Some(store::pool(url, &options).context("READ_DATABASE_URL")?)
            }
            _ => None,
        };
        let listener = TcpListener::bind(&settings.listen_addr)
            .await
            .with_context(|| format!("could not listen on {}", settings.listen_addr))?;
        telemetry::prometheus();
        let readiness = web::Readiness::default();
        readiness
            .check_database(&pool.connect_options(), &mut None)
            .await;
        let streams = CancellationToken::new();
        let (router, loops) = router_for_role(
            &settings,
            &pool,
            reads.as_ref(),
            readiness.clone(),
            checked.secrets,
            streams.clone(),
        );
        Ok(Self {
            listener,
            router,
            pool,
            vault: settings.vault.clone(),
            projector: settings.role.projects().then(|| settings.projector.clone()),
            enricher: checked.enricher,
            notifier: settings.role.notifies().then(|| settings.notifier.clone()),
            loops,
            readiness,
            faults: Faults::default(),
            limits: ConnectionLimits {
                header_timeout: settings.header_timeout,
                shutdown_grace: settings.shutdown_grace,
            },
            streams,
        })
    }

    /// Test hooks into the supervised tasks (see [`Faults`]).
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// The bound port (useful when listening on port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The service's connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// What seals the service's data at rest.
    pub fn vault(&self) -> &store::keys::Vault {
        &self.vault
    }

    /// Serves until `shutdown` fires, then stops accepting, lets in-flight requests and the
    /// projector's current batch finish, and returns.
    ///
    /// Every background task runs under a [`Supervisor`]: if one ends or panics before shutdown,
    /// `/readyz` turns 503 at once and this returns the error within moments (crash-only; the
    /// binary then exits non-zero so the orchestrator restarts it).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "listening");
        let mut supervisor = Supervisor::new(self.faults.clone());
        for (name, task) in self.loops {
            supervisor.spawn(name, task);
        }
        if let Some(config) = self.projector {
            let task = projector::run(
                self.pool.clone(),
                self.vault.clone(),
                config,
                shutdown.clone(),
            );
            supervisor.spawn("projector", Box::pin(task));
        }
        if let Some((client, config)) = self.enricher {
            let task = enricher::run(
                self.pool.clone(),
                self.vault.clone(),
                client,
                config,
                shutdown.clone(),
            );
            supervisor.spawn("enricher", Box::pin(task));
        }
        if let Some(config) = self.notifier {
            let task = notifier::run(
                self.pool.clone(),
                self.vault.clone(),
                config,
                shutdown.clone(),
            );
            supervisor.spawn("notifier", Box::pin(task));
        }
        let refresh = self
            .readiness
            .clone()
            .refresh((*self.pool.connect_options()).clone(), shutdown.clone());
        supervisor.spawn("readiness", Box::pin(refresh));
        let grace = self.limits.shutdown_grace;
        let (stop, streams) = (shutdown.clone(), self.streams.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            streams.cancel();
        });
        let served = serve(self.listener, self.router, shutdown.clone(), self.limits);
        tokio::pin!(served);
        let served = loop {
            tokio::select! {
                served = &mut served => break served,
                died = supervisor.first_exit() => {
                    if shutdown.is_cancelled() {
                        continue; // stopping as asked: tasks end one by one
                    }
                    self.readiness.task_stopped(died.task);
                    tracing::error!(task = died.task, how = %died.how,
                        "a background task stopped; exiting so that a fresh process takes over");
                    shutdown.cancel();
                    return Err(died.into());
                }
            }
        };
        shutdown.cancel();
        supervisor.stop(grace).await;
        self.pool.close().await;
        served.context("HTTP server failed")
    }
}

/// What [`validate`] found: the secrets to check webhooks with, and the enricher's client when
/// the role enriches.
struct Checked {
    secrets: Secrets,
    enricher: Option<(argyle::Client, EnricherConfig)>,
}

/// Refuses settings the service must not start with, in one sentence; warns about the ones it
/// may start with only because they were asked for.
fn validate(settings: &Settings) -> anyhow::Result<Checked> {
    let role = settings.role;
    if !settings.vault.encrypts() && !settings.allow_plaintext_log {
        bail!(
            "encryption at rest needs DATA_KEYS (base64 32-byte keys, newest first); set ALLOW_PLAINTEXT_LOG=true to store events unencrypted"
        );
    }
    secret::refuse_empty_entries("ARGYLE_WEBHOOK_SECRETS", &settings.webhook_secrets)?;
    secret::refuse_empty_entries("API_TOKENS", &settings.api_tokens)?;
    let secrets = Secrets::new(settings.webhook_secrets.iter().map(|s| s.trim()));
    if role.ingests() && secrets.is_empty() && !settings.allow_unsigned_webhooks {
        bail!(
            "ingest needs ARGYLE_WEBHOOK_SECRETS; set ALLOW_UNSIGNED_WEBHOOKS=true to accept unsigned webhooks"
        );
    }
    if role.ingests() && secrets.is_empty() {
        tracing::warn!("ALLOW_UNSIGNED_WEBHOOKS=true: webhook signatures are not checked");
    }
    if let Some(short) = settings
        .api_tokens
        .iter()
        .map(|t| t.trim().chars().count())
        .find(|&n| n < MIN_TOKEN_CHARS)
    {
        bail!(
            "API_TOKENS has a token of {short} characters; each needs at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)"
        );
    }
    if role.serves_api() && settings.api_tokens.is_empty() {
        if !settings.allow_open_api {
            bail!(
                "the query API needs API_TOKENS (comma-separated bearer tokens); set ALLOW_OPEN_API=true to serve /v1 without a token"
            );
        }
        tracing::warn!(
            "ALLOW_OPEN_API=true and no API_TOKENS: /v1 is open to anyone who can reach {}",
            settings.listen_addr
        );
    }
    let enricher = match (role.enriches(), &settings.argyle) {
        (true, Some(api)) => {
            // Few quick retries per fetch; the enricher itself retries later, durably.
            let client = api.client()?.with_retry(argyle::Retry {
                attempts: 3,
                first_backoff: Duration::from_millis(500),
                max_backoff: Duration::from_secs(5),
            });
            Some((client, settings.enricher.clone()))
        }
        (true, None) if role == Role::Enricher => bail!(
            "the enricher needs ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET to fetch accounts"
        ),
        (true, None) if settings.enricher.reconcile_interval.is_some() => bail!(
            "RECONCILE_INTERVAL needs ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET to list accounts"
        ),
        (true, None) => {
            tracing::info!("ARGYLE_API_KEY_ID is not set: resource-less webhooks are not enriched");
            None
        }
        (false, _) => None,
    };
    Ok(Checked { secrets, enricher })
}

/// Applies pending migrations. A current schema is left alone, so the service role (which cannot
/// migrate) starts with migrations on; pending migrations it cannot apply stop it with a sentence
/// that says so.
async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let report = store::migrate::migrate(database_url)
        .await
        .context("could not migrate the database")?;
    if report.applied.is_empty() {
        tracing::info!(
            version = report.version,
            "the database schema is current; nothing to migrate"
        );
    } else {
        tracing::info!(
            created_database = report.created_database,
            applied = report.applied.len(),
            version = report.version,
            "database is migrated"
        );
    }
    Ok(())
}

/// How often the query API reads a replica's checkpoint (`min_position`, the feed's waits).
const REPLICA_POLL: Duration = Duration::from_millis(20);

/// The loops behind a router's routes, to run supervised.
type Loops = Vec<(&'static str, BoxFuture<'static, ()>)>;

/// The routes of the role (health, metrics and the document always; ingest and the query API
/// when the role has them) with the middleware of every route, and the loops behind them.
fn router_for_role(
    settings: &Settings,
    pool: &PgPool,
    reads: Option<&PgPool>,
    readiness: web::Readiness,
    secrets: Secrets,
    streams: CancellationToken,
) -> (Router, Loops) {
    let mut loops: Loops = vec![];
    let mut router = web::health::router(readiness)
        .route("/metrics", axum::routing::get(telemetry::metrics))
        .route("/openapi.json", axum::routing::get(openapi::openapi_json));
    if settings.role.ingests() {
        let (committer, commit_loop) = ingest::Committer::new(
            pool.clone(),
            settings.vault.clone(),
            settings.dedup_window,
            settings.max_commit_batch,
            settings.commit_lanes,
        );
        loops.push(("committer", Box::pin(commit_loop)));
        router = router.merge(ingest::router(IngestState {
            committer,
            secrets,
            max_body_bytes: settings.max_body_bytes,
            database_timeout: settings.database_timeout,
        }));
    }
    if settings.role.serves_api() {
        // Up to half of what the committer and the listeners of the projector and the enricher
        // leave (each holds one for good), so the other roles, `/readyz` and requests beyond the
        // kept ones always find connections.
        let keep =
            (settings.db.max_connections as usize).saturating_sub(2 + settings.commit_lanes) / 2;
        let sessions = store::kept::KeptConnections::new(pool.clone(), keep);
        // With a replica, every query reads there, and waits on the checkpoint the replica has
        // replayed (a standby cannot LISTEN): a view it answers is one it holds.
        let (kept, checkpoint) = match reads {
            Some(reads) => {
                let (checkpoint, poll) = api::feed::Checkpoint::poll(reads.clone(), REPLICA_POLL);
                loops.push(("checkpoint watch", Box::pin(poll)));
                let kept = store::kept::KeptConnections::new(reads.clone(), keep);
                (kept, checkpoint)
            }
            None => {
                let (checkpoint, watch) = api::feed::Checkpoint::watch(pool.clone());
                loops.push(("checkpoint watch", Box::pin(watch)));
                (sessions.clone(), checkpoint)
            }
        };
        let (snapshots, read_loop) = api::reader::SnapshotReader::new(
            kept.clone(),
            settings.vault.clone(),
            settings.database_timeout,
        );
        loops.push(("reader", Box::pin(read_loop)));
        router = router.merge(api::router(api::ApiState {
            snapshots,
            vault: settings.vault.clone(),
            db: kept,
            sessions,
            tokens: settings
                .api_tokens
                .iter()
                .map(|t| t.trim().to_owned())
                .collect(),
            database_timeout: settings.database_timeout,
            checkpoint,
            feed: settings.feed,
            streams,
            ui: settings.ui,
        }));
    }
    (
        web::middleware::finish(router, settings.request_timeout),
        loops,
    )
}

/// Accepts connections until `shutdown` fires, then waits (up to the grace period) for the requests
/// in flight. Headers must arrive within `header_timeout`, so idle half-open clients cannot pile up.
async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("no longer accepting connections; waiting for requests in flight");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(grace = ?limits.shutdown_grace, "requests still in flight after the grace period; closing them");
        }
    }
    Ok(())
}
