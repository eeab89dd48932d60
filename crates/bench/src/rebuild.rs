//! 4. Rebuild: a log of many accounts, loaded straight through the store, refolded by
//!    `account-projector rebuild` (the whole command, timed).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::Args;
use crate::data::{analyze, append_bodies, refinement};
use crate::pg::url_for;
use crate::report::{Row, row};

/// Loads the log on a fresh database, runs the rebuild and pushes its row.
pub async fn run(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let rebuild_db = url_for(&args.database_url, "account_projector_bench_rebuild");
    store::migrate::drop_database(&rebuild_db).await?;
    store::migrate::migrate(&rebuild_db).await?;
    let pool = store::pool(
        &rebuild_db,
        &store::DbOptions {
            statement_timeout: Duration::ZERO,
            ..store::DbOptions::default()
        },
    )?;
    let appended = load(args, &pool).await?;
    {
        let mut conn = pool.acquire().await?;
        analyze(&mut conn).await;
    }
    let started = Instant::now();
    let status = Command::new(&args.server)
        .args(["rebuild"])
        .env("DATABASE_URL", &rebuild_db)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "rebuild failed");
    let secs = started.elapsed().as_secs_f64();
    let rate = appended as f64 / secs;
    eprintln!(
        "bench: rebuild of {appended} events over {} accounts in {secs:.1} s: {rate:.0} events/s",
        args.rebuild_accounts
    );
    rows.push(row(
        &format!(
            "rebuild: {appended} events over {} accounts, whole command",
            args.rebuild_accounts
        ),
        format!("{rate:.0} events/s ({secs:.1} s)"),
        "",
        None,
        "≥ 100,000/s",
    ));
    store::migrate::drop_database(&rebuild_db).await?;
    Ok(())
}

/// Appends `rebuild_events` refinements spread over `rebuild_accounts` accounts; returns how many.
async fn load(args: &Args, pool: &store::PgPool) -> anyhow::Result<usize> {
    let per_account = args.rebuild_events.div_ceil(args.rebuild_accounts);
    let ids: Vec<(Uuid, Uuid)> = (0..args.rebuild_accounts)
        .map(|_| (Uuid::new_v4(), Uuid::new_v4()))
        .collect();
    let started = Instant::now();
    // Interleave accounts as live traffic does: step by step across all of them.
    let bodies = (0..per_account).flat_map(|step| {
        ids.iter()
            .map(move |(account, user)| refinement(*account, *user, step))
    });
    let appended = append_bodies(pool, bodies.take(args.rebuild_events)).await?;
    let load_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "bench: loaded {appended} events in {load_secs:.1} s ({:.0}/s through append_webhooks, batches of 1,000)",
        appended as f64 / load_secs
    );
    Ok(appended)
}
