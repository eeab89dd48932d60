//! 3. The service with every role (`serve --role all`), in its own process, on a fresh database:
//!    ingest flat out with the projector folding at the same time, then [`crate::latency`],
//!    [`crate::lag`] and [`crate::queries`] against the same server, then the server's peak RSS.

use std::sync::Arc;

use loadgen::{Workload, generate, send};

use crate::Args;
use crate::baseline::Baseline;
use crate::data::wait_projected;
use crate::machine::peak_rss_mb;
use crate::pg::url_for;
use crate::report::{Row, row};
use crate::server::{sending, start_server, stop_server, wait_ready};
use crate::{ingest, lag, latency, queries};

/// Runs the service's scenarios on a fresh database and pushes their rows.
pub async fn run(args: &Args, baseline: &Baseline, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let service_db = url_for(&args.database_url, "account_projector_bench");
    store::migrate::drop_database(&service_db).await?;
    store::migrate::migrate(&service_db).await?;
    let (mut server, base) = start_server(&args.server, &service_db, "all")?;
    let result = measure(args, baseline, &base, &service_db, server.id(), rows).await;
    stop_server(&mut server);
    result?;
    store::migrate::drop_database(&service_db).await?;
    Ok(())
}

/// The scenarios, in order, against the server at `base` (process `pid`) on `service_db`.
async fn measure(
    args: &Args,
    baseline: &Baseline,
    base: &str,
    service_db: &str,
    pid: u32,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    wait_ready(base).await?;
    let pool = store::pool(service_db, &store::DbOptions::default())?;
    let ingest_workload = ingest::workload(args.seconds);
    rows.push(ingest_flat_out(args, baseline, base, &ingest_workload).await?);
    rows.push(latency::run(args, base).await);
    wait_projected(&pool).await?;
    rows.push(lag::run(args, base, &pool).await?);
    queries::run(args, baseline, base, &ingest_workload, &pool, rows).await?;
    let rss = peak_rss_mb(pid).unwrap_or(f64::NAN);
    rows.push(row(
        "peak RSS of the server (all roles) over the runs above",
        format!("{rss:.1} MB"),
        "",
        None,
        "< 100 MB",
    ));
    Ok(())
}

/// Ingest flat out, with the projector folding at the same time; every acknowledged delivery is
/// then read back through `GET /v1/events`.
async fn ingest_flat_out(
    args: &Args,
    baseline: &Baseline,
    base: &str,
    ingest_workload: &Workload,
) -> anyhow::Result<Row> {
    let (c, insert_tps) = (args.connections, baseline.insert_tps);
    let deliveries = Arc::new(generate(ingest_workload));
    let flat = send(deliveries.clone(), &sending(base, c, None)).await;
    eprintln!("bench: ingest flat out: {}", flat.summary());
    anyhow::ensure!(
        flat.statuses.keys().all(|s| *s == 200),
        "ingest answered {:?}",
        flat.statuses
    );
    loadgen::verify(base, None, &deliveries, &flat.acks).await?;
    Ok(row(
        &format!("ingest with the projector folding (all roles), {c} connections"),
        format!(
            "{:.0}/s (p99 {:.1} ms)",
            flat.throughput(),
            flat.latency_ms(0.99)
        ),
        &format!("{insert_tps:.0}/s"),
        Some(flat.throughput() / insert_tps),
        "≥ 1.5×",
    ))
}
