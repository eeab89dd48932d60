//! 1. Postgres's own ceiling on this machine with the same payload and concurrency (pgbench
//!    single-row INSERT and SELECT by primary key), and the log's own append without HTTP.

use crate::Args;
use crate::pg::{pgbench, pgbench_run, psql_file, url_for};
use crate::report::{Row, row};

/// What the later scenarios are compared with.
pub struct Baseline {
    /// pgbench single-row INSERT at the bench's concurrency, transactions/s.
    pub insert_tps: f64,
    /// pgbench SELECT by primary key at the bench's concurrency, transactions/s.
    pub select_tps: f64,
    /// The log alone, no HTTP, every group full: deliveries/s.
    pub full_groups: f64,
    /// The same split over four clients whose appends overlap (the service's commit lanes):
    /// deliveries/s.
    pub overlapping: f64,
}

/// Runs the baseline on a fresh database and pushes the pgbench rows. The log-alone measurements
/// are printed with the ingest rows (see [`crate::ingest`]).
pub async fn run(args: &Args, payload: &[u8], rows: &mut Vec<Row>) -> anyhow::Result<Baseline> {
    let (c, s) = (args.connections, args.seconds);
    let baseline_db = url_for(&args.database_url, "account_projector_bench_baseline");
    store::migrate::drop_database(&baseline_db).await?;
    store::migrate::migrate(&baseline_db).await?;
    psql_file(
        &baseline_db,
        "benches/pgbench/setup.sql",
        &[("body", &String::from_utf8_lossy(payload))],
    )?;
    let insert_tps = pgbench(&baseline_db, "benches/pgbench/insert.sql", c, s)?;
    let insert_tps_1 = pgbench(&baseline_db, "benches/pgbench/insert.sql", 1, s.min(5))?;
    let select_tps = pgbench(&baseline_db, "benches/pgbench/select.sql", c, s)?;
    eprintln!(
        "bench: pgbench insert {insert_tps:.0}/s ({c} clients), {insert_tps_1:.0}/s (1 client); select {select_tps:.0}/s"
    );
    rows.push(row(
        &format!(
            "pgbench single-row INSERT, {} B payload, {c} clients",
            payload.len()
        ),
        format!("{insert_tps:.0}/s"),
        "",
        None,
        "",
    ));
    rows.push(row(
        "pgbench single-row INSERT, 1 client",
        format!("{insert_tps_1:.0}/s"),
        "",
        None,
        "",
    ));
    rows.push(row(
        &format!("pgbench SELECT by primary key, {c} clients"),
        format!("{select_tps:.0}/s"),
        "",
        None,
        "",
    ));
    let (full_groups, overlapping) = log_alone(&baseline_db, c, s).await?;
    store::migrate::drop_database(&baseline_db).await?;
    Ok(Baseline {
        insert_tps,
        select_tps,
        full_groups,
        overlapping,
    })
}

/// The log's own append at this concurrency, without HTTP: every group full (one client, `c`
/// new deliveries a call), the best case of one group commit at a time; then the same deliveries
/// split over four clients whose appends overlap, as the service's four commit lanes do.
/// Returns (full groups, overlapping) in deliveries/s.
async fn log_alone(baseline_db: &str, c: usize, s: u64) -> anyhow::Result<(f64, f64)> {
    let full_groups = append_alone(baseline_db, 1, c, s).await?;
    let overlapping = append_alone(baseline_db, 4, (c / 4).max(1), s).await?;
    eprintln!(
        "bench: the log alone: {full_groups:.0} deliveries/s in full groups, {overlapping:.0}/s in four overlapping"
    );
    Ok((full_groups, overlapping))
}

/// The log's own append without HTTP (`benches/pgbench/append.sql`): `clients` pgbench clients,
/// each call appending `group` new deliveries. Checks that the log grew by exactly that many events
/// and returns deliveries/s.
async fn append_alone(
    url: &str,
    clients: usize,
    group: usize,
    seconds: u64,
) -> anyhow::Result<f64> {
    let pool = store::pool(url, &store::DbOptions::default())?;
    let before = store::log::counts(&mut *pool.acquire().await?).await?;
    let (tps, calls) = pgbench_run(
        url,
        "benches/pgbench/append.sql",
        clients,
        seconds,
        &[("group", group.to_string())],
    )?;
    let after = store::log::counts(&mut *pool.acquire().await?).await?;
    pool.close().await;
    anyhow::ensure!(
        after.events - before.events == calls as i64 * group as i64,
        "{calls} calls of {group} new deliveries left {} new events",
        after.events - before.events
    );
    Ok(tps * group as f64)
}
