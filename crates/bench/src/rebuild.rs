//! 4. Rebuild: a log of many accounts, loaded straight through the store, refolded by
//!    `account-projector rebuild` (the whole command, timed).

use std::time::Duration;

use crate::Args;
use crate::data::{analyze, load_interleaved};
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
    let appended = load_interleaved(&pool, args.rebuild_events, args.rebuild_accounts).await?;
    {
        let mut conn = pool.acquire().await?;
        analyze(&mut conn).await;
    }
    let secs = crate::server::run_rebuild(&args.server, &rebuild_db, true)?;
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
