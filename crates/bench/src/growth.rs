//! Cost as the log grows (`--only growth`; not in the default run, it takes long and takes disk).
//! One database is grown step by step to each size of `--growth-sizes`, over accounts that grow
//! towards `--growth-accounts` in proportion. At each size, with every role serving and the log
//! folded: ingest flat out, GET p99 at 1,000/s, time travel over one account of 10,000 events (loaded
//! first, so its rows age as the log grows), and `rebuild` of the whole log. Each figure's baseline
//! is the same figure at the first size, in the same run. Beside them, what explains a curve: the
//! dedup lookup's plan and time, the sizes of the log and its indexes, and the snapshot table's
//! dead rows and HOT updates (its bloat under sustained load). With `--growth-vacuum` the snapshot
//! table is vacuumed once the projector has folded each load, as autovacuum would, to tell its bloat from the log's size.

use std::sync::Arc;
use std::time::Duration;

use loadgen::{Workload, generate, send};
use uuid::Uuid;

use crate::Args;
use crate::data::{analyze, append_bodies, load_interleaved, refinements, wait_projected};
use crate::pg::url_for;
use crate::queries::{get, time_travel_reads};
use crate::report::{Row, row};
use crate::server::{run_rebuild, sending, start_server, stop_server, wait_ready};

/// What one size measured.
#[derive(Clone, Copy)]
struct Figures {
    events: i64,
    ingest: f64,
    get_p99: f64,
    time_travel: f64,
    rebuild: f64,
}

pub async fn run(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let url = url_for(&args.database_url, "account_projector_bench_growth");
    store::migrate::drop_database(&url).await?;
    store::migrate::migrate(&url).await?;
    let pool = store::pool(
        &url,
        &store::DbOptions {
            statement_timeout: Duration::ZERO,
            ..store::DbOptions::default()
        },
    )?;
    let (traveller, user) = (Uuid::new_v4(), Uuid::new_v4());
    append_bodies(&pool, refinements(traveller, user, 10_000)).await?;
    let largest = *args.growth_sizes.iter().max().unwrap_or(&0);
    let mut first: Option<Figures> = None;
    for (step, &size) in args.growth_sizes.iter().enumerate() {
        let held = store::log::counts(&mut *pool.acquire().await?)
            .await?
            .events as usize;
        if size > held {
            let adding = size - held;
            let accounts = (args.growth_accounts * adding / largest.max(1)).max(1);
            load_interleaved(&pool, adding, accounts).await?;
        }
        analyze(&mut *pool.acquire().await?).await;
        let figures = measure(args, &url, &pool, traveller, step as u64).await?;
        explain(&pool, figures.events).await?;
        // The first size is every later one's baseline (and its own).
        let base = *first.get_or_insert(figures);
        push_rows(rows, &figures, &base);
    }
    pool.close().await;
    store::migrate::drop_database(&url).await?;
    Ok(())
}

/// The four figures at the log's current size.
async fn measure(
    args: &Args,
    url: &str,
    pool: &store::PgPool,
    traveller: Uuid,
    step: u64,
) -> anyhow::Result<Figures> {
    let (mut server, base) = start_server(&args.server, url, "all")?;
    let outcome = async {
        wait_ready(&base).await?;
        wait_projected(pool).await?;
        // The projector has just folded the load: what autovacuum would do next.
        if args.growth_vacuum {
            crate::pg::psql_file(url, "benches/pgbench/vacuum_snapshots.sql", &[])?;
        }
        let events = store::log::counts(&mut *pool.acquire().await?).await?.events;
        // Ingest flat out: traffic of its own (a seed per size, so no body repeats an earlier
        // size's), with the projector folding beside it.
        let workload = Workload {
            accounts: 60 * args.seconds as usize,
            seed: 100 + step,
            ..Workload::default()
        };
        let deliveries = Arc::new(generate(&workload));
        let sent = send(deliveries, &sending(&base, args.connections, None)).await;
        anyhow::ensure!(
            sent.statuses.keys().all(|s| *s == 200),
            "ingest answered {:?}",
            sent.statuses
        );
        wait_projected(pool).await?;
        // GET at 1,000/s over accounts of the whole log.
        let accounts: Vec<Uuid> = store::snapshots::sample_ids(&mut *pool.acquire().await?, 10_000)
            .await?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.connections)
            .build()?;
        let fixed = get(
            &client,
            &base,
            &Arc::new(accounts),
            args.connections,
            1000 * args.seconds as usize,
            Some(1000.0),
        )
        .await;
        anyhow::ensure!(
            fixed.statuses.keys().all(|s| *s == 200),
            "GET answered {:?}",
            fixed.statuses
        );
        let head = store::log::head(&mut *pool.acquire().await?).await?;
        let times = time_travel_reads(
            &client,
            &format!("{base}/v1/accounts/{traveller}?at_position={head}"),
            20,
        )
        .await?;
        eprintln!(
            "bench: growth at {events} events: ingest {}; GET at 1,000/s {}; time travel median {:.1} ms",
            sent.summary(),
            fixed.summary(),
            times[10]
        );
        Ok((events, sent.throughput(), fixed.latency_ms(0.99), times[10]))
    }
    .await;
    stop_server(&mut server);
    let (events, ingest, get_p99, time_travel) = outcome?;
    let rebuild = rebuild(args, url, pool).await?;
    Ok(Figures {
        events,
        ingest,
        get_p99,
        time_travel,
        rebuild,
    })
}

/// `account-projector rebuild` of the whole log: events/s.
async fn rebuild(args: &Args, url: &str, pool: &store::PgPool) -> anyhow::Result<f64> {
    let events = store::log::counts(&mut *pool.acquire().await?)
        .await?
        .events;
    let secs = run_rebuild(&args.server, url, true)?;
    eprintln!("bench: growth: rebuild of {events} events in {secs:.1} s");
    Ok(events as f64 / secs)
}

/// Prints what explains the curve at this size: the dedup lookup's plan and time, the log's and
/// the snapshots' sizes, and the snapshot table's dead rows and HOT updates.
async fn explain(pool: &store::PgPool, events: i64) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    for line in store::log::explain_dedup_lookup(&mut conn).await? {
        eprintln!("bench: growth at {events} events: dedup lookup: {line}");
    }
    for line in store::snapshots::table_health(&mut conn).await? {
        eprintln!("bench: growth at {events} events: {line}");
    }
    Ok(())
}

fn push_rows(rows: &mut Vec<Row>, at: &Figures, base: &Figures) {
    let size = format!("{} events", at.events);
    let first = format!("{} events", base.events);
    let measures = [
        (
            "ingest flat out with every role",
            format!("{:.0}/s", at.ingest),
            format!("{:.0}/s at {first}", base.ingest),
            at.ingest / base.ingest,
        ),
        (
            "GET p99 at 1,000/s",
            format!("{:.2} ms", at.get_p99),
            format!("{:.2} ms at {first}", base.get_p99),
            base.get_p99 / at.get_p99,
        ),
        (
            "time travel over 10,000 events, median of 20",
            format!("{:.1} ms", at.time_travel),
            format!("{:.1} ms at {first}", base.time_travel),
            base.time_travel / at.time_travel,
        ),
        (
            "rebuild, whole command",
            format!("{:.0} events/s", at.rebuild),
            format!("{:.0} events/s at {first}", base.rebuild),
            at.rebuild / base.rebuild,
        ),
    ];
    for (measure, value, baseline, ratio) in measures {
        rows.push(row(
            &format!("log of {size}: {measure} (ratio: speed against the first size)"),
            value,
            &baseline,
            Some(ratio),
            "≥ 0.8×",
        ));
    }
}
