//! The `account-projector` command line.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use account_projector::telemetry::{self, LogFormat};
use account_projector::{Application, Role, Settings};
use clap::{Parser, Subcommand};
use projector::ProjectorConfig;
use tokio_util::sync::CancellationToken;

/// Keeps an exact, auditable view of payroll accounts connected through Argyle: signed webhooks go
/// into an append-only Postgres event log, and a projector folds it into one snapshot per account.
#[derive(Parser, Debug)]
#[command(name = "account-projector", version)]
struct Cli {
    /// Postgres connection URL (Postgres 14+).
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/account_projector",
        hide_env_values = true
    )]
    database_url: String,

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
    #[arg(long)]
    no_migrate: bool,

    /// Comma-separated webhook secrets; a delivery signed with any of them is accepted (rotation).
    #[arg(
        long,
        env = "ARGYLE_WEBHOOK_SECRETS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    webhook_secrets: Vec<String>,

    /// Accept unsigned webhooks when no secret is configured (otherwise ingest refuses to start).
    #[arg(long, env = "ALLOW_UNSIGNED_WEBHOOKS")]
    allow_unsigned_webhooks: bool,

    /// Comma-separated bearer tokens for /v1; when unset, /v1 is open (a warning is logged).
    #[arg(
        long,
        env = "API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_tokens: Vec<String>,

    /// An identical body redelivered within this window is the same event (e.g. 24h, 90m, 0s).
    #[arg(long, env = "DEDUP_WINDOW", default_value = "24h", value_parser = humantime::parse_duration)]
    dedup_window: Duration,

    /// Larger webhook bodies are refused with 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1_048_576)]
    max_body_bytes: usize,

    /// Longest time one HTTP request may take, slow clients included.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,

    /// Events the projector folds per transaction.
    #[arg(long, env = "PROJECTOR_BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    batch_size: i64,

    /// The projector catches up at least this often, even without a notification.
    #[arg(long, env = "PROJECTOR_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,

    /// Largest number of database connections of this process.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    max_connections: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate => {
            let report = store::migrate::migrate(&cli.database_url).await?;
            tracing::info!(created_database = report.created_database, applied = ?report.applied, "migrations done");
            Ok(())
        }
        Command::Serve(args) => {
            let mut settings = Settings::new(cli.database_url);
            settings.role = args.role;
            settings.listen_addr = args.listen_addr;
            settings.migrate = !args.no_migrate;
            settings.webhook_secrets = args.webhook_secrets;
            settings.allow_unsigned_webhooks = args.allow_unsigned_webhooks;
            settings.api_tokens = args.api_tokens;
            settings.dedup_window = args.dedup_window;
            settings.max_body_bytes = args.max_body_bytes;
            settings.request_timeout = args.request_timeout;
            settings.projector = ProjectorConfig {
                batch_size: args.batch_size,
                poll_interval: args.poll_interval,
                ..ProjectorConfig::default()
            };
            settings.db.max_connections = args.max_connections;
            let app = Application::build(settings).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            app.run_until_stopped(shutdown).await
        }
    }
}

/// Fires `shutdown` on SIGTERM or ctrl-c.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested: finishing in-flight work");
    shutdown.cancel();
}
