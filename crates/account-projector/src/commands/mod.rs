//! One module per subcommand; [`run`] dispatches to them.

mod erase;
mod export;
mod keys;
mod migrate;
mod rebuild;
mod reconcile;
mod serve;
mod status;
mod subscribers;
mod webhooks;

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
pub(crate) async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let database_url = cli.database_url.0;
    match cli.command {
        Command::Migrate => migrate::run(&database_url).await,
        Command::Serve(args) => serve::run(args.into_settings(database_url)?).await,
        Command::Rebuild(args) => rebuild::run(&database_url, args).await,
        Command::Status => status::run(&database_url).await,
        Command::Export(args) => export::run(&database_url, args).await,
        Command::Webhooks(args) => webhooks::run(args).await,
        Command::Reconcile(args) => reconcile::run(&database_url, args).await,
        Command::Subscribers(args) => subscribers::run(&database_url, args).await,
        Command::Erase(args) => erase::run(&database_url, args).await,
        Command::Keys(args) => keys::run(&database_url, args).await,
    }
}

/// A pool for long-running commands: no statement timeout, and the schema must be current.
pub(crate) async fn batch_pool(database_url: &str) -> anyhow::Result<store::PgPool> {
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
pub(crate) async fn ensure_current(pool: &store::PgPool) -> anyhow::Result<()> {
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
