//! 2. Ingest alone: `serve --role ingest`, as the compose stack runs it, so that no projector
//!    competes for the cores while it is timed. Signed webhooks flat out, the same requests with a
//!    wrong signature, saturation at [`SATURATION_CONNECTIONS`] (and what a delivery costs in CPU),
//!    and the same kind of traffic replayed by `wrk`.

use std::sync::Arc;

use loadgen::{Report, Sending, Workload, generate, send};

use crate::Args;
use crate::baseline::Baseline;
use crate::machine::CpuMark;
use crate::pg::url_for;
use crate::report::{Row, row};
use crate::server::{sending, start_server, stop_server, wait_ready};
use crate::wrk::wrk_ingest;

/// Connections of the ingest run that saturates the machine.
const SATURATION_CONNECTIONS: usize = 256;

/// The traffic of the ingest runs (here and with every role): 60 accounts per timed second.
pub fn workload(seconds: u64) -> Workload {
    Workload {
        accounts: 60 * seconds as usize,
        seed: 1,
        ..Workload::default()
    }
}

/// What the runs against `--role ingest` measured.
struct Measured {
    alone: Report,
    refused: Report,
    saturated: Report,
    /// The machine's busy share and the load generator's during the saturation run.
    busy: Option<(f64, f64)>,
    /// wrk's (requests/s, p99 ms), when installed.
    with_wrk: Option<(f64, f64)>,
}

/// Runs ingest alone on a fresh database and pushes its rows, with the log-alone rows of
/// `baseline` among them.
pub async fn run(
    args: &Args,
    baseline: &Baseline,
    cores: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let ingest_workload = workload(args.seconds);
    let ingest_db = url_for(&args.database_url, "account_projector_bench_ingest");
    store::migrate::drop_database(&ingest_db).await?;
    store::migrate::migrate(&ingest_db).await?;
    let (mut server, base) = start_server(&args.server, &ingest_db, "ingest")?;
    let measured = measure(args, &base, &ingest_db, &ingest_workload).await;
    stop_server(&mut server);
    let measured = measured?;
    store::migrate::drop_database(&ingest_db).await?;
    push_rows(rows, &measured, baseline, args.connections);
    if let Some((busy, client)) = measured.busy {
        rows.push(cost_row(busy, client, cores, &measured.saturated, baseline));
    }
    Ok(())
}

/// The runs, against the server at `base` on `ingest_db`.
async fn measure(
    args: &Args,
    base: &str,
    ingest_db: &str,
    ingest_workload: &Workload,
) -> anyhow::Result<Measured> {
    wait_ready(base).await?;
    let deliveries = Arc::new(generate(ingest_workload));
    let sending = sending(base, args.connections, None);
    let alone = send(deliveries.clone(), &sending).await;
    eprintln!("bench: ingest alone flat out: {}", alone.summary());
    anyhow::ensure!(
        alone.statuses.keys().all(|s| *s == 200),
        "ingest answered {:?}",
        alone.statuses
    );
    // This role serves no /v1: count the log directly. Every 200 is an event or a redelivery.
    let pool = store::pool(ingest_db, &store::DbOptions::default())?;
    expect_deliveries(&pool, deliveries.len()).await?;
    let refused = refused(deliveries.clone(), &sending).await?;
    let (saturated, busy, sent) = saturate(ingest_workload, &sending).await?;
    let logged = expect_deliveries(&pool, deliveries.len() + sent).await?;
    let with_wrk = with_wrk(
        args,
        &pool,
        base,
        ingest_workload,
        alone.throughput(),
        logged,
    )
    .await?;
    pool.close().await;
    Ok(Measured {
        alone,
        refused,
        saturated,
        busy,
        with_wrk,
    })
}

/// Checks that the log holds `acknowledged` deliveries (events and redeliveries); returns them.
pub async fn expect_deliveries(pool: &store::PgPool, acknowledged: usize) -> anyhow::Result<i64> {
    let counts = store::log::counts(&mut *pool.acquire().await?).await?;
    anyhow::ensure!(
        counts.deliveries as usize == acknowledged,
        "the log holds {} deliveries, {} were acknowledged",
        counts.deliveries,
        acknowledged
    );
    Ok(counts.deliveries)
}

/// The same requests with a wrong signature: HTTP and the HMAC check, refused before the
/// database, which is what ingest costs without the append.
async fn refused(
    deliveries: Arc<Vec<loadgen::Delivery>>,
    sending: &Sending,
) -> anyhow::Result<Report> {
    let refused = send(
        deliveries,
        &Sending {
            secret: "not-the-secret".into(),
            ..sending.clone()
        },
    )
    .await;
    eprintln!("bench: refused at the signature: {}", refused.summary());
    anyhow::ensure!(
        refused.statuses.keys().all(|s| *s == 401),
        "refused requests were answered {:?}",
        refused.statuses
    );
    Ok(refused)
}

/// Saturation: enough connections that the groups are large and the machine is busy, to
/// measure what a delivery costs in CPU across load generator, server and Postgres.
/// Returns the run, the machine's and the load generator's busy shares, and the deliveries sent.
async fn saturate(
    ingest_workload: &Workload,
    sending: &Sending,
) -> anyhow::Result<(Report, Option<(f64, f64)>, usize)> {
    let many = Arc::new(generate(&Workload {
        accounts: 3 * ingest_workload.accounts,
        seed: 4,
        ..ingest_workload.clone()
    }));
    let mark = CpuMark::now();
    let saturated = send(
        many.clone(),
        &Sending {
            connections: SATURATION_CONNECTIONS,
            ..sending.clone()
        },
    )
    .await;
    // Shares of the machine: busy in all, and busy in this process (the load generator; zero
    // where `/proc/self/stat` cannot be read).
    let busy = mark.shares().map(|s| (s.busy, s.own.unwrap_or(0.0)));
    eprintln!(
        "bench: ingest alone at {SATURATION_CONNECTIONS} connections: {}",
        saturated.summary()
    );
    anyhow::ensure!(
        saturated.statuses.keys().all(|s| *s == 200),
        "ingest answered {:?}",
        saturated.statuses
    );
    Ok((saturated, busy, many.len()))
}

/// The same kind of traffic from wrk, a C client like pgbench's, which leaves more of the
/// cores to server and Postgres. Enough new deliveries that none is sent twice. `logged` is the
/// log's deliveries before.
async fn with_wrk(
    args: &Args,
    pool: &store::PgPool,
    base: &str,
    ingest_workload: &Workload,
    alone_throughput: f64,
    logged: i64,
) -> anyhow::Result<Option<(f64, f64)>> {
    let s = args.seconds;
    let enough = (alone_throughput * 3.0 * s as f64) as usize;
    let fresh = generate(&Workload {
        accounts: enough / 30 + 1,
        seed: 5,
        ..ingest_workload.clone()
    });
    let with_wrk = wrk_ingest(base, &fresh, args.connections, s)?;
    if let Some((rps, _)) = with_wrk {
        eprintln!("bench: ingest alone with wrk: {rps:.0}/s");
        let after = store::log::counts(&mut *pool.acquire().await?).await?;
        // wrk counts the answers it read; the log holds at least those.
        anyhow::ensure!(
            after.deliveries as f64 >= logged as f64 + rps * s as f64 * 0.99,
            "the log holds {} new deliveries; wrk saw about {:.0} accepted",
            after.deliveries - logged,
            rps * s as f64
        );
    }
    Ok(with_wrk)
}

/// The rows of ingest alone, of the log alone (from `baseline`) and of saturation.
fn push_rows(rows: &mut Vec<Row>, measured: &Measured, baseline: &Baseline, c: usize) {
    let insert_tps = baseline.insert_tps;
    let (alone, refused, saturated) = (&measured.alone, &measured.refused, &measured.saturated);
    let vs_insert = |rate: f64| Some(rate / insert_tps);
    let insert = format!("{insert_tps:.0}/s");
    rows.push(row(
        &format!("ingest alone (`--role ingest`): signed webhooks/s over HTTP, 200 after commit, {c} connections"),
        format!("{:.0}/s (p99 {:.1} ms)", alone.throughput(), alone.latency_ms(0.99)),
        &insert,
        vs_insert(alone.throughput()),
        "≥ 1.5×",
    ));
    if let Some((rps, p99)) = measured.with_wrk {
        rows.push(row(
            &format!("ingest alone with wrk (C client), the same kind of traffic signed beforehand, {c} connections"),
            format!("{rps:.0}/s (p99 {p99:.1} ms)"),
            &insert,
            vs_insert(rps),
            "≥ 1.5×",
        ));
    }
    rows.push(row(
        &format!("the same requests with a wrong signature: HTTP and HMAC check only, 401 before the database, {c} connections"),
        format!("{:.0}/s", refused.throughput()),
        &insert,
        vs_insert(refused.throughput()),
        "",
    ));
    rows.push(row(
        &format!("the log alone, no HTTP: pgbench, 1 client calling `append_webhooks` with {c} new deliveries each (every group full: group commit's best case at {c} in flight)"),
        format!("{:.0}/s", baseline.full_groups),
        &insert,
        vs_insert(baseline.full_groups),
        "",
    ));
    rows.push(row(
        &format!("the same split over 4 pgbench clients of {} new deliveries: appends that overlap, as the service's 4 commit lanes do", (c / 4).max(1)),
        format!("{:.0}/s", baseline.overlapping),
        &insert,
        vs_insert(baseline.overlapping),
        "",
    ));
    rows.push(row(
        &format!("ingest alone, {SATURATION_CONNECTIONS} connections"),
        format!(
            "{:.0}/s (p99 {:.1} ms)",
            saturated.throughput(),
            saturated.latency_ms(0.99)
        ),
        &insert,
        vs_insert(saturated.throughput()),
        "",
    ));
}

/// CPU seconds per delivery, all cores together. Without the load generator's share (as if
/// the client cost nothing), fully busy cores give server and Postgres no more than
/// `cores / served` deliveries a second, whatever the log's design.
fn cost_row(busy: f64, client: f64, cores: usize, saturated: &Report, baseline: &Baseline) -> Row {
    let insert_tps = baseline.insert_tps;
    let per_delivery = busy * cores as f64 / saturated.throughput();
    let client_share = client * cores as f64 / saturated.throughput();
    let served = (per_delivery - client_share).max(f64::EPSILON);
    let ceiling = cores as f64 / served;
    row(
        "CPU per delivery at that load: all processes, of which the load generator; the rate server and Postgres alone would give with every core busy and a client that cost nothing",
        format!(
            "{:.0} µs ({:.0}% busy), {:.0} µs load generator: at most {ceiling:.0}/s",
            per_delivery * 1e6,
            busy * 100.0,
            client_share * 1e6,
        ),
        &format!("{insert_tps:.0}/s"),
        Some(ceiling / insert_tps),
        "",
    )
}
