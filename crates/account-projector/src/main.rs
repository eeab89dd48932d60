//! The `account-projector` command line.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use account_projector::secret::{self, DatabaseUrl, Secret};
use account_projector::telemetry::{self, LogFormat};
use account_projector::webhooks::{self, CreateOptions};
use account_projector::{Application, ArgyleApi, Role, Settings, export, progress};
use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

// Requests allocate many small short-lived buffers (rows, bodies, JSON); mimalloc serves them
// faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use projector::{ProjectorConfig, rebuild};
use store::log::ExportFilter;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Keeps an exact, auditable view of payroll accounts connected through Argyle: signed webhooks go
/// into an append-only Postgres event log, and a projector folds it into one snapshot per account.
#[derive(Parser, Debug)]
#[command(name = "account-projector", version)]
struct Cli {
    /// Postgres connection URL (Postgres 14+). TLS as libpq does it: `?sslmode=` disable, prefer
    /// (the default), require, verify-ca or verify-full, and `sslrootcert=` a PEM file of root
    /// certificates. Prefer the environment variable: a flag shows in `ps`.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/account_projector",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = |raw: &str| Ok::<_, String>(DatabaseUrl(raw.to_owned()))
    )]
    database_url: DatabaseUrl,

    /// Log format.
    #[arg(
        long,
        global = true,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the database if missing, apply pending migrations, and exit.
    Migrate,
    /// Run the service: webhook ingest, projector and query API (or one of them, by --role).
    Serve(ServeArgs),
    /// Refold snapshots from the event log and swap them in, while the service keeps running.
    ///
    /// With --verify nothing is written: the live snapshots are compared with a fresh fold of the
    /// log, each difference is printed (account id and differing fields), and the exit status is 1
    /// if there is any.
    Rebuild(RebuildArgs),
    /// Print the state of the log and the projection: head, checkpoint, lag, leader, counts.
    Status,
    /// Audit export: every event as one NDJSON line on stdout, in log order, with its raw body,
    /// sha256, signature header as received, and the signature re-checked now.
    Export(ExportArgs),
    /// Manage the Argyle webhook subscription that sends this service its webhooks.
    Webhooks(WebhooksArgs),
}

/// Argyle's management API and its key (from the Argyle console: Developers > API keys).
#[derive(clap::Args, Debug)]
struct ArgyleArgs {
    /// Argyle's API base URL: the sandbox by default, https://api.argyle.com/v2 for production.
    #[arg(long, env = "ARGYLE_API_URL", default_value = argyle::SANDBOX_URL)]
    argyle_api_url: String,

    /// API key id (the HTTP Basic user name).
    #[arg(long, env = "ARGYLE_API_KEY_ID", hide_env_values = true)]
    argyle_api_key_id: Option<String>,

    /// API key secret (the HTTP Basic password).
    #[arg(long, env = "ARGYLE_API_KEY_SECRET", hide_env_values = true, value_parser = secret_value)]
    argyle_api_key_secret: Option<Secret>,
}

impl ArgyleArgs {
    /// The API settings, if a key is configured; a half-configured key is an error.
    fn api(&self) -> anyhow::Result<Option<ArgyleApi>> {
        let non_empty = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_owned);
        match (
            non_empty(self.argyle_api_key_id.as_deref()),
            non_empty(self.argyle_api_key_secret.as_ref().map(Secret::expose)),
        ) {
            (Some(key_id), Some(key_secret)) => Ok(Some(ArgyleApi {
                url: self.argyle_api_url.clone(),
                key_id,
                key_secret,
            })),
            (None, None) => Ok(None),
            _ => anyhow::bail!("set both ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET, or neither"),
        }
    }
}

#[derive(clap::Args, Debug)]
struct WebhooksArgs {
    #[command(subcommand)]
    action: WebhooksAction,

    #[command(flatten)]
    argyle: ArgyleArgs,
}

#[derive(Subcommand, Debug)]
enum WebhooksAction {
    /// Subscribe URL to Argyle's account webhooks; does nothing if an identical subscription (same
    /// name, url and events) exists.
    ///
    /// With the resource included (the default), `accounts.removed`, which Argyle cannot send a
    /// resource with, goes into a second subscription named `<name>-no-resource`. Both sign with
    /// one secret, printed as the ARGYLE_WEBHOOK_SECRETS line to give ingest.
    Create {
        /// The public URL of this service's webhook route, e.g. https://example.com/webhooks/argyle.
        #[arg(long)]
        url: String,

        /// Subscription name (Argyle sends it in every webhook's `name`).
        #[arg(long, default_value = "account-projector")]
        name: String,

        /// Comma-separated events.
        #[arg(long, value_delimiter = ',', default_values_t = argyle::ACCOUNT_EVENTS.map(String::from))]
        events: Vec<String>,

        /// Subscribe without `config.include_resource`: webhooks carry ids only (the enricher
        /// can fetch the accounts).
        #[arg(long)]
        no_include_resource: bool,

        /// Signing secret; by default a random 256-bit one (or the secret of an existing half of
        /// the pair). No commas or whitespace: it goes into the comma-separated
        /// ARGYLE_WEBHOOK_SECRETS.
        #[arg(long, value_parser = webhook_secret, conflicts_with = "secret_file")]
        secret: Option<Secret>,

        /// Read the signing secret from FILE (`-`: standard input) instead, so that it does
        /// not show in `ps`.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<std::path::PathBuf>,
    },
    /// List the subscriptions of this API key, every page.
    List {
        /// Print each subscription's signing secret instead of `hidden`.
        #[arg(long)]
        show_secrets: bool,
    },
    /// Delete the subscription ID.
    Delete {
        /// The subscription's id, as `webhooks list` shows it.
        id: String,
    },
}

#[derive(clap::Args, Debug)]
struct RebuildArgs {
    /// Compare instead of rebuilding; write nothing; exit 1 if any snapshot differs.
    #[arg(long)]
    verify: bool,

    /// Only this account.
    #[arg(long, value_name = "ID")]
    account: Option<Uuid>,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    /// Only events of this account.
    #[arg(long, value_name = "ID")]
    account: Option<Uuid>,

    /// Only events of this user.
    #[arg(long, value_name = "ID")]
    user: Option<Uuid>,

    /// Only events received at or after this RFC 3339 instant.
    #[arg(long, value_name = "T", value_parser = parse_instant)]
    since: Option<DateTime<Utc>>,

    /// Only events received before this RFC 3339 instant (exclusive, so consecutive ranges tile).
    #[arg(long, value_name = "T", value_parser = parse_instant)]
    until: Option<DateTime<Utc>>,

    /// Secrets to re-check signatures with; without any, `signature_valid` is null.
    #[command(flatten)]
    secrets: SecretArgs,
}

/// The webhook secrets, shared by `serve` and `export`.
#[derive(clap::Args, Debug)]
struct SecretArgs {
    /// Comma-separated webhook secrets; a delivery signed with any of them is accepted (rotation).
    #[arg(
        long,
        env = "ARGYLE_WEBHOOK_SECRETS",
        value_delimiter = ',',
        value_parser = list_entry,
        hide_env_values = true,
        conflicts_with = "webhook_secrets_file"
    )]
    webhook_secrets: Vec<Secret>,

    /// Read the webhook secrets from FILE instead (`-`: standard input), separated by commas or
    /// line breaks, so that they do not show in `ps` or the environment.
    #[arg(long, env = "ARGYLE_WEBHOOK_SECRETS_FILE", value_name = "FILE")]
    webhook_secrets_file: Option<std::path::PathBuf>,
}

impl SecretArgs {
    /// The secrets, from the flag, the variable or the file.
    fn secrets(&self) -> anyhow::Result<Vec<String>> {
        let secrets = match &self.webhook_secrets_file {
            Some(path) => secret::read_list(path)?,
            None => self.webhook_secrets.clone(),
        };
        if secrets.iter().any(|s| s.expose().is_empty()) {
            anyhow::bail!(
                "ARGYLE_WEBHOOK_SECRETS has an empty entry (two commas in a row, or a comma at an end)"
            );
        }
        Ok(secrets.iter().map(|s| s.expose().to_owned()).collect())
    }
}

fn webhook_secret(raw: &str) -> Result<Secret, String> {
    if raw.is_empty() || raw.contains(',') || raw.chars().any(char::is_whitespace) {
        Err("a webhook secret must be non-empty, without commas or whitespace".into())
    } else {
        Ok(Secret::new(raw))
    }
}

fn secret_value(raw: &str) -> Result<Secret, String> {
    Ok(Secret::new(raw))
}

/// One entry of a comma-separated list of secrets or tokens, surrounding whitespace trimmed (so
/// `old, new` means `new`, not ` new`). An empty entry (`,` is no token at all) is refused where
/// the list is used, in one sentence.
fn list_entry(raw: &str) -> Result<Secret, String> {
    Ok(Secret::new(raw.trim()))
}

fn positive_rate(raw: &str) -> Result<f64, String> {
    raw.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0)
        .ok_or_else(|| "expected a positive number of fetches per second, e.g. 5 or 0.5".into())
}

fn parse_instant(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e}; expected RFC 3339, e.g. 2026-03-03T10:00:00Z"))
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Which roles this process runs.
    #[arg(long, env = "ROLE", value_enum, default_value = "all")]
    role: Role,

    /// Address of the HTTP listener.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    listen_addr: String,

    /// Do not apply pending migrations at start.
    #[arg(long, env = "NO_MIGRATE")]
    no_migrate: bool,

    #[command(flatten)]
    secrets: SecretArgs,

    /// Accept unsigned webhooks when no secret is configured (otherwise ingest refuses to start).
    #[arg(long, env = "ALLOW_UNSIGNED_WEBHOOKS")]
    allow_unsigned_webhooks: bool,

    /// Comma-separated bearer tokens for /v1, each at least 16 characters. Required by the roles
    /// that serve /v1 (all, api) unless --allow-open-api.
    #[arg(
        long,
        env = "API_TOKENS",
        value_delimiter = ',',
        value_parser = list_entry,
        hide_env_values = true
    )]
    api_tokens: Vec<Secret>,

    /// Serve /v1 with no token (local experiments only; a warning is logged).
    #[arg(long, env = "ALLOW_OPEN_API")]
    allow_open_api: bool,

    /// An identical body redelivered within this window is the same event (e.g. 24h, 90m, 0s).
    #[arg(long, env = "DEDUP_WINDOW", default_value = "24h", value_parser = humantime::parse_duration)]
    dedup_window: Duration,

    /// Most deliveries one commit may carry: concurrent requests share a transaction (group commit).
    /// 1 commits each delivery alone.
    #[arg(long, env = "MAX_COMMIT_BATCH", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    max_commit_batch: u16,

    /// Larger webhook bodies are refused with 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1_048_576)]
    max_body_bytes: usize,

    /// Longest time one HTTP request may take, slow clients included.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,

    /// Longest wait for the database within one request before answering 503 with Retry-After.
    #[arg(long, env = "DATABASE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    database_timeout: Duration,

    /// Longest time a client may take to send a request's headers.
    #[arg(long, env = "HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,

    /// On SIGTERM, how long to wait for requests in flight before closing their connections.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,

    /// Events the projector folds per transaction.
    #[arg(long, env = "PROJECTOR_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    batch_size: i64,

    /// The projector catches up at least this often, even without a notification.
    #[arg(long, env = "PROJECTOR_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,

    #[command(flatten)]
    argyle: ArgyleArgs,

    /// The enricher fetches an account at most once per this window, however many resource-less
    /// webhooks arrive for it.
    #[arg(long, env = "ENRICH_WINDOW", default_value = "5s", value_parser = humantime::parse_duration)]
    enrich_window: Duration,

    /// Most account fetches per second the enricher makes.
    #[arg(long, env = "ENRICH_RATE", default_value_t = 5.0, value_parser = positive_rate)]
    enrich_rate: f64,

    /// Largest number of database connections of this process.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    max_connections: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    tracing::debug!(?cli, "command line"); // its Debug shows no secret
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", one_sentence(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let database_url = cli.database_url.0;
    match cli.command {
        Command::Migrate => {
            let report = store::migrate::migrate(&database_url).await?;
            tracing::info!(created_database = report.created_database, applied = ?report.applied,
                version = report.version, "migrations done");
            Ok(ExitCode::SUCCESS)
        }
        Command::Rebuild(args) => rebuild(&database_url, args).await,
        Command::Status => status(&database_url).await,
        Command::Webhooks(args) => manage_webhooks(args).await,
        Command::Export(args) => {
            let pool = batch_pool(&database_url).await?;
            let filter = ExportFilter {
                account: args.account,
                user: args.user,
                since: args.since,
                until: args.until,
            };
            let secrets = ingest::Secrets::new(&args.secrets.secrets()?);
            match export::export(&pool, filter, &secrets, tokio::io::stdout()).await {
                Ok(lines) => tracing::info!(lines, "export done"),
                // The reader went away (`| head`): not an error of ours.
                Err(e)
                    if e.downcast_ref::<std::io::Error>()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => {}
                Err(e) => return Err(e),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            let mut settings = Settings::new(database_url);
            settings.role = args.role;
            settings.listen_addr = args.listen_addr;
            settings.migrate = !args.no_migrate;
            settings.webhook_secrets = args.secrets.secrets()?;
            settings.allow_unsigned_webhooks = args.allow_unsigned_webhooks;
            settings.api_tokens = args
                .api_tokens
                .iter()
                .map(|t| t.expose().to_owned())
                .collect();
            settings.allow_open_api = args.allow_open_api;
            settings.dedup_window = args.dedup_window;
            settings.max_body_bytes = args.max_body_bytes;
            settings.max_commit_batch = usize::from(args.max_commit_batch);
            settings.request_timeout = args.request_timeout;
            settings.database_timeout = args.database_timeout;
            settings.header_timeout = args.header_timeout;
            settings.shutdown_grace = args.shutdown_grace;
            settings.projector = ProjectorConfig {
                batch_size: args.batch_size,
                poll_interval: args.poll_interval,
                ..ProjectorConfig::default()
            };
            settings.argyle = args.argyle.api()?;
            settings.enricher = enricher::EnricherConfig {
                window: args.enrich_window,
                rate: args.enrich_rate,
                ..enricher::EnricherConfig::default()
            };
            settings.db.max_connections = args.max_connections;
            let shutdown = CancellationToken::new();
            stop_on_signal(shutdown.clone()).context("could not install the signal handlers")?;
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn manage_webhooks(args: WebhooksArgs) -> anyhow::Result<ExitCode> {
    let Some(api) = args.argyle.api()? else {
        anyhow::bail!(
            "set ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET (Argyle console: Developers > API keys)"
        );
    };
    let client = api.client()?;
    match args.action {
        WebhooksAction::Create {
            url,
            name,
            events,
            no_include_resource,
            secret,
            secret_file,
        } => {
            let secret = match secret_file {
                Some(path) => {
                    let read = secret::read_one(&path)?;
                    Some(webhook_secret(read.expose()).map_err(|e| anyhow::anyhow!("{e}"))?)
                }
                None => secret,
            };
            let options = CreateOptions {
                url,
                name,
                events,
                include_resource: !no_include_resource,
                secret: secret.map(|s| s.expose().to_owned()),
            };
            let mut report = webhooks::create(&client, &options).await?;
            print!("{}", webhooks::describe_create(&report));
            if let Some(error) = report.error.take() {
                return Err(error.into());
            }
        }
        WebhooksAction::List { show_secrets } => {
            let listed = client.list_webhooks().await?;
            print!("{}", webhooks::describe_list(&listed, show_secrets));
        }
        WebhooksAction::Delete { id } => {
            client.delete_webhook(&id).await?;
            println!("deleted {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A pool for long-running commands: no statement timeout, and the schema must be current.
async fn batch_pool(database_url: &str) -> anyhow::Result<store::PgPool> {
    let options = store::DbOptions {
        max_connections: 4,
        statement_timeout: Duration::ZERO,
        application_name: "account-projector cli".into(),
        ..store::DbOptions::default()
    };
    let pool = store::pool(database_url, &options)?;
    ensure_current(&pool).await?;
    Ok(pool)
}

/// Connects (any failure is reported as it is: TLS, authentication, unreachable) and checks that
/// every migration is applied.
async fn ensure_current(pool: &store::PgPool) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await.map_err(store::Error::from)?;
    store::check_ready_on(&mut conn)
        .await
        .map_err(|reason| match reason {
            store::NotReady::Unavailable => anyhow::anyhow!("cannot reach the database"),
            store::NotReady::MigrationsPending => {
                anyhow::anyhow!(
                    "the database is not migrated; run `account-projector migrate` first"
                )
            }
        })
}

/// The error and its causes in one line, without the repetitions of errors that quote their source.
fn one_sentence(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = vec![];
    for cause in error.chain() {
        let text = cause.to_string();
        if !parts
            .last()
            .is_some_and(|previous| previous.contains(&text))
        {
            parts.push(text);
        }
    }
    parts.join(": ")
}

async fn status(database_url: &str) -> anyhow::Result<ExitCode> {
    let pool = store::pool(
        database_url,
        &store::DbOptions {
            max_connections: 1,
            ..store::DbOptions::default()
        },
    )?;
    let mut conn = pool.acquire().await.map_err(store::Error::from)?;
    let ready = store::check_ready_on(&mut conn).await;
    if ready == Err(store::NotReady::Unavailable) {
        anyhow::bail!("cannot reach the database");
    }
    println!(
        "migrations:  {}",
        if ready.is_ok() {
            "up to date"
        } else {
            "pending (run `account-projector migrate`)"
        }
    );
    if ready.is_err() {
        return Ok(ExitCode::FAILURE);
    }
    let head = store::log::head(&mut conn).await?;
    let checkpoint = store::snapshots::checkpoint(&mut conn, store::snapshots::CHECKPOINT).await?;
    let counts = store::log::counts(&mut conn).await?;
    let snapshots = store::snapshots::count(&mut conn).await?;
    let quarantined = store::quarantine::count(&mut conn).await?;
    let leader = store::snapshots::leader(&mut conn).await?;
    println!("log head:    {head}");
    println!(
        "checkpoint:  {checkpoint} (lag {} events)",
        head - checkpoint
    );
    match leader {
        Some((name, address, pid)) => println!(
            "leader:      {name} (backend pid {pid}{})",
            address.map(|a| format!(", from {a}")).unwrap_or_default()
        ),
        None => println!("leader:      none (no projector is running)"),
    }
    println!(
        "events:      {} ({} deliveries)",
        counts.events, counts.deliveries
    );
    println!("snapshots:   {snapshots}");
    println!("quarantined: {quarantined}");
    let scanned = store::snapshots::checkpoint(&mut conn, store::enrichment::CHECKPOINT).await?;
    let pending = store::enrichment::pending(&mut conn).await?;
    println!(
        "enricher:    scanned to {scanned} (lag {} events), {pending} fetch(es) pending",
        head - scanned
    );
    Ok(ExitCode::SUCCESS)
}

async fn rebuild(database_url: &str, args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let pool = batch_pool(database_url).await?;
    if args.verify {
        let progress = progress::for_stderr("verify");
        let differences = rebuild::verify(&pool, args.account, progress.as_ref()).await?;
        for difference in &differences {
            println!("{} {}", difference.account_id, difference.fields.join(","));
        }
        if differences.is_empty() {
            eprintln!("verify: every snapshot equals a fresh fold of the log");
            Ok(ExitCode::SUCCESS)
        } else {
            eprintln!(
                "verify: {} snapshot(s) differ from the log",
                differences.len()
            );
            Ok(ExitCode::FAILURE)
        }
    } else {
        let report = match args.account {
            Some(account) => rebuild::rebuild_account(&pool, account).await?,
            None => rebuild::rebuild_all(&pool, progress::for_stderr("rebuild").as_ref()).await?,
        };
        eprintln!(
            "rebuild: folded {} events into {} snapshot(s); checkpoint {}",
            report.events, report.accounts, report.checkpoint
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// Fires `shutdown` on SIGTERM or ctrl-c (SIGINT). The handlers are installed before this returns,
/// so before the listener is bound: a signal that finds the service listening always stops it
/// gracefully, never by the signal's default action (an immediate exit that would drop the
/// requests in flight).
fn stop_on_signal(shutdown: CancellationToken) -> std::io::Result<()> {
    #[cfg(unix)]
    let stopped = {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
    };
    #[cfg(not(unix))]
    let stopped = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::spawn(async move {
        stopped.await;
        tracing::info!("shutdown requested: finishing in-flight work");
        shutdown.cancel();
    });
    Ok(())
}
