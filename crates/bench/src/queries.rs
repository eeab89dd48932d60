//! Queries against the service with every role: `GET /v1/accounts/{id}` over the accounts of the
//! ingest run, flat out (the Rust load generator, then `wrk` when installed) and at 1,000/s, and
//! time travel over one account with 10,000 events.

use std::sync::Arc;
use std::time::Instant;

use loadgen::{Report, Workload, drive, generate};
use uuid::Uuid;

use crate::Args;
use crate::baseline::Baseline;
use crate::data::{append_bodies, refinements, wait_projected};
use crate::machine::CpuMark;
use crate::report::{Row, row};
use crate::wrk::wrk_accounts;

/// Runs the queries against the server at `base` and pushes their rows.
pub async fn run(
    args: &Args,
    baseline: &Baseline,
    base: &str,
    ingest_workload: &Workload,
    pool: &store::PgPool,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let (c, s, select_tps) = (args.connections, args.seconds, baseline.select_tps);
    let accounts: Arc<Vec<Uuid>> = Arc::new(
        generate(ingest_workload)
            .iter()
            .map(|d| d.account)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .build()?;
    let get = |count: usize, rate: Option<f64>| get(&client, base, &accounts, c, count, rate);
    let mark = CpuMark::now();
    let flat: Report = get(select_tps as usize * s as usize / 2, None).await;
    // The load generator's share of the machine while it ran.
    let client_share = mark.shares().and_then(|s| s.own);
    eprintln!("bench: GET flat out: {}", flat.summary());
    let fixed: Report = get(1000 * s as usize, Some(1000.0)).await;
    eprintln!("bench: GET at 1,000/s: {}", fixed.summary());
    rows.push(row(
        &format!(
            "GET /v1/accounts/{{id}}, {c} connections (the Rust load generator; its share of the machine's CPU)"
        ),
        match client_share {
            Some(share) => format!("{:.0}/s ({:.0}%)", flat.throughput(), share * 100.0),
            None => format!("{:.0}/s", flat.throughput()),
        },
        &format!("{select_tps:.0}/s"),
        Some(flat.throughput() / select_tps),
        "≥ 0.7×",
    ));
    // The same with a C client (wrk), when installed: pgbench's baseline is a C client too,
    // and a lighter client leaves more of the two cores to the server.
    if let Some((rps, p99)) = wrk_accounts(base, &accounts, c, s)? {
        eprintln!("bench: GET with wrk: {rps:.0}/s, p99 {p99:.2} ms");
        rows.push(row(
            &format!("GET /v1/accounts/{{id}} with wrk (C client), {c} connections"),
            format!("{rps:.0}/s (p99 {p99:.2} ms)"),
            &format!("{select_tps:.0}/s"),
            Some(rps / select_tps),
            "≥ 0.7×",
        ));
    }
    rows.push(row(
        "GET at 1,000/s: latency p50 / p99",
        format!(
            "{:.2} / {:.2} ms",
            fixed.latency_ms(0.5),
            fixed.latency_ms(0.99)
        ),
        "",
        None,
        "p99 < 5 ms",
    ));
    rows.push(time_travel(&client, base, pool).await?);
    Ok(())
}

/// `count` GETs of the accounts in turn, `connections` in flight, at `rate` or flat out.
pub async fn get(
    client: &reqwest::Client,
    base: &str,
    accounts: &Arc<Vec<Uuid>>,
    connections: usize,
    count: usize,
    rate: Option<f64>,
) -> Report {
    let (client, base, accounts) = (client.clone(), base.to_owned(), accounts.clone());
    drive(count, connections, rate, move |i| {
        let (client, base, accounts) = (client.clone(), base.clone(), accounts.clone());
        async move {
            let url = format!("{base}/v1/accounts/{}", accounts[i % accounts.len()]);
            match client.get(url).send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let _ = response.bytes().await;
                    (status, None)
                }
                Err(_) => (0, None),
            }
        }
    })
    .await
}

/// Time travel over one account with 10,000 events: the median and max of 20 reads at the head.
async fn time_travel(
    client: &reqwest::Client,
    base: &str,
    pool: &store::PgPool,
) -> anyhow::Result<Row> {
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    append_bodies(pool, refinements(account, user, 10_000)).await?;
    wait_projected(pool).await?;
    let mut conn = pool.acquire().await?;
    let head = store::log::head(&mut conn).await?;
    drop(conn);
    let url = format!("{base}/v1/accounts/{account}?at_position={head}");
    let times = time_travel_reads(client, &url, 20).await?;
    eprintln!(
        "bench: time travel over 10,000 events: median {:.1} ms, max {:.1} ms",
        times[10], times[19]
    );
    Ok(row(
        "time travel over an account with 10,000 events: median / max of 20",
        format!("{:.1} / {:.1} ms", times[10], times[19]),
        "",
        None,
        "< 100 ms",
    ))
}

/// `reads` time-travel GETs of `url`, one after the other: each one's time in milliseconds,
/// sorted. Every one must answer 200.
pub async fn time_travel_reads(
    client: &reqwest::Client,
    url: &str,
    reads: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::with_capacity(reads);
    for _ in 0..reads {
        let started = Instant::now();
        let response = client.get(url).send().await?;
        anyhow::ensure!(
            response.status() == 200,
            "time travel answered {}",
            response.status()
        );
        let _ = response.bytes().await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}
