//! Creating the database and applying the refinery migrations in `migrations/`.
//!
//! refinery runs over its own tokio-postgres connection; a session advisory lock makes concurrent
//! `migrate` runs (several replicas starting at once) take turns instead of racing.

use sqlx::{ConnectOptions, Connection};
use tokio_postgres::NoTls;

use crate::{Error, Result, connect_options};

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

const MIGRATION_LOCK: i64 = 0x4150_4d49_4752; // "APMIGR"

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The database had to be created.
    pub created_database: bool,
    /// Names of the migrations applied by this run, in order (`V1__event_log`, ...).
    pub applied: Vec<String>,
}

/// The highest migration version this build knows.
pub fn latest_version() -> i64 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

/// Creates the database named in `database_url` if it does not exist, then applies pending migrations.
#[tracing::instrument(skip_all)]
pub async fn migrate(database_url: &str) -> Result<MigrationReport> {
    let created_database = create_database_if_missing(database_url).await?;
    let config: tokio_postgres::Config = database_url
        .parse()
        .map_err(|e: tokio_postgres::Error| Error::InvalidUrl(e.to_string()))?;
    let (mut client, connection) = config.connect(NoTls).await.map_err(migration_error)?;
    let connection = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(migration_error)?;
    let report = embedded::migrations::runner().run_async(&mut client).await;
    // The lock is a session lock: closing the connection releases it even if unlock is never sent.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = connection.await;
    let report = report.map_err(|e| Error::Migration(e.to_string()))?;
    let applied: Vec<String> = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect();
    for name in &applied {
        tracing::info!(migration = %name, "applied migration");
    }
    Ok(MigrationReport {
        created_database,
        applied,
    })
}

fn migration_error(error: tokio_postgres::Error) -> Error {
    Error::Migration(error.to_string())
}

async fn create_database_if_missing(database_url: &str) -> Result<bool> {
    let target = connect_options(database_url)?;
    let Some(name) = target.get_database().map(str::to_owned) else {
        return Ok(false);
    };
    match target.connect().await {
        Ok(connection) => {
            let _ = connection.close().await;
            return Ok(false);
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
        Err(e) => return Err(e.into()),
    }
    let mut maintenance = target.clone().database("postgres").connect().await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let created = match sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut maintenance)
        .await
    {
        Ok(_) => true,
        // Someone else created it meanwhile.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => false,
        Err(e) => return Err(e.into()),
    };
    let _ = maintenance.close().await;
    if created {
        tracing::info!(database = %name, "created database");
    }
    Ok(created)
}

/// Drops the database named in `database_url`, if it exists (benchmarks start from nothing).
pub async fn drop_database(database_url: &str) -> Result<()> {
    let target = connect_options(database_url)?;
    let Some(name) = target.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut maintenance = target.database("postgres").connect().await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"
    )))
    .execute(&mut maintenance)
    .await?;
    Ok(())
}

/// The server's version string.
pub async fn server_version(pool: &sqlx::PgPool) -> Result<String> {
    Ok(sqlx::query_scalar("SELECT version()")
        .fetch_one(pool)
        .await?)
}
