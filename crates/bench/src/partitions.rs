//! 8. The partitioned projector: one log of `partition_events` events over `partition_accounts`
//!    accounts, loaded straight through the store, folded from position 0 by `serve --role
//!    projector` with each of `--partition-counts` partitions in turn (the projection emptied and
//!    vacuumed between runs). The figure is the whole catch-up, from the process's start until
//!    the projection's checkpoint reaches the head; one partition, in the same run, is the baseline.

use std::time::{Duration, Instant};

use crate::Args;
use crate::data::{analyze, load_interleaved, wait_projected};
use crate::pg::{psql_file, url_for};
use crate::report::{Row, row};
use crate::server::{start_server_with, stop_server};

/// Loads the log on a fresh database and pushes one catch-up row per partition count.
pub async fn run(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.partition_counts.is_empty() && args.partition_counts.iter().all(|&n| n >= 1),
        "--partition-counts needs at least one count of 1 or more"
    );
    let url = url_for(&args.database_url, "account_projector_bench_partitions");
    store::migrate::drop_database(&url).await?;
    store::migrate::migrate(&url).await?;
    let pool = store::pool(
        &url,
        &store::DbOptions {
            statement_timeout: Duration::ZERO,
            ..store::DbOptions::default()
        },
    )?;
    let events = load_interleaved(&pool, args.partition_events, args.partition_accounts).await?;
    analyze(&mut *pool.acquire().await?).await;
    let mut baseline: Option<f64> = None;
    for &partitions in &args.partition_counts {
        // As the schema's owner: the projection emptied, its checkpoint back at 0.
        psql_file(&url, "benches/pgbench/unfold.sql", &[])?;
        let count = partitions.to_string();
        let started = Instant::now();
        let (mut server, _) = start_server_with(
            &args.server,
            &url,
            "projector",
            true,
            &[("PROJECTOR_PARTITIONS", count.as_str())],
        )?;
        let caught_up =
            tokio::time::timeout(Duration::from_secs(1800), wait_projected(&pool)).await;
        let secs = started.elapsed().as_secs_f64();
        stop_server(&mut server);
        caught_up
            .map_err(|_| anyhow::anyhow!("the projector did not catch up in 30 minutes"))??;
        let rate = events as f64 / secs;
        eprintln!(
            "bench: projector with {partitions} partition(s) folded {events} events from 0 in {secs:.1} s: {rate:.0} events/s"
        );
        let base = *baseline.get_or_insert(rate);
        rows.push(row(
            &format!(
                "projector catch-up, {partitions} partition(s): {events} events over {} accounts from 0",
                args.partition_accounts
            ),
            format!("{rate:.0} events/s ({secs:.1} s)"),
            &format!("1 partition: {base:.0}/s"),
            Some(rate / base),
            "",
        ));
    }
    store::migrate::drop_database(&url).await?;
    Ok(())
}
