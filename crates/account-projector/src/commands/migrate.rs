//! `migrate`: create the database if missing and apply pending migrations.

use std::process::ExitCode;

pub(crate) async fn run(database_url: &str) -> anyhow::Result<ExitCode> {
    let report = store::migrate::migrate(database_url).await?;
    tracing::info!(created_database = report.created_database, applied = ?report.applied,
        version = report.version, "migrations done");
    Ok(ExitCode::SUCCESS)
}
