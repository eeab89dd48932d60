//! 6. The compacted change feed (`GET /v1/feed`), against `serve` with every role on a fresh
//!    database: a log of `feed_events` events over `feed_accounts` accounts, loaded straight
//!    through the store and folded, read whole from 0 a page of 1,000 accounts at a time for the
//!    timed run (pages/s, accounts/s); then a follower long-polling the feed while ingest runs at
//!    1,000 signed webhooks/s: the lag from each delivery's 200 to the follower receiving the view
//!    it changed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use loadgen::{Ack, Workload, generate, send};
use serde_json::Value;

use crate::Args;
use crate::data::{analyze, load_interleaved, wait_projected};
use crate::lag::{lags as checkpoint_lags, record_checkpoints};
use crate::pg::url_for;
use crate::report::{Row, row};
use crate::server::{sending, start_server, stop_server, wait_ready};

/// Accounts per page, the most the feed answers.
const LIMIT: usize = 1000;
/// The follower's long poll.
const WAIT: &str = "5s";

/// When each page of the follower arrived, and its views' `last_position`s.
type Received = Vec<(Instant, Vec<i64>)>;

/// Loads the log on a fresh database, starts the service on it and pushes the feed's rows.
pub async fn run(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.feed_events > 0 && args.feed_accounts > 0,
        "--feed-events and --feed-accounts must be at least 1"
    );
    let feed_db = url_for(&args.database_url, "account_projector_bench_feed");
    store::migrate::drop_database(&feed_db).await?;
    store::migrate::migrate(&feed_db).await?;
    let pool = store::pool(
        &feed_db,
        &store::DbOptions {
            statement_timeout: Duration::ZERO,
            ..store::DbOptions::default()
        },
    )?;
    let appended = load_interleaved(&pool, args.feed_events, args.feed_accounts).await?;
    {
        let mut conn = pool.acquire().await?;
        analyze(&mut conn).await;
    }
    let (mut server, base) = start_server(&args.server, &feed_db, "all")?;
    let result = measure(args, &base, &pool, appended, rows).await;
    stop_server(&mut server);
    result?;
    pool.close().await;
    store::migrate::drop_database(&feed_db).await?;
    Ok(())
}

/// The two runs against the server at `base` on `pool`'s database, once the projector has folded
/// the `appended` events loaded.
async fn measure(
    args: &Args,
    base: &str,
    pool: &store::PgPool,
    appended: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    wait_ready(base).await?;
    let started = Instant::now();
    wait_projected(pool).await?;
    eprintln!(
        "bench: the projector folded {appended} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let head = head(pool).await?;
    let client = reqwest::Client::new();
    rows.push(read_whole(args, &client, base, appended, head).await?);
    rows.push(follow(args, &client, base, pool, head).await?);
    Ok(())
}

/// The feed read whole from 0, page after page, for `seconds`, starting again from 0 each time
/// the cursor reaches `head`; one reader. Each pass must list every account once.
async fn read_whole(
    args: &Args,
    client: &reqwest::Client,
    base: &str,
    appended: usize,
    head: i64,
) -> anyhow::Result<Row> {
    let accounts = args.feed_accounts.min(appended);
    let deadline = Duration::from_secs(args.seconds);
    let (mut pages, mut views, mut passes, mut in_pass, mut after) = (0usize, 0usize, 0, 0, 0);
    let started = Instant::now();
    while started.elapsed() < deadline {
        let (positions, next_after) = page(client, base, after, None).await?;
        anyhow::ensure!(
            next_after > after,
            "the feed did not move past {after} (head {head})"
        );
        pages += 1;
        views += positions.len();
        in_pass += positions.len();
        after = next_after;
        if after >= head {
            anyhow::ensure!(
                in_pass == accounts,
                "a pass over the feed listed {in_pass} accounts, not {accounts}"
            );
            (passes, in_pass, after) = (passes + 1, 0, 0);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let (pages_per_s, views_per_s) = (pages as f64 / secs, views as f64 / secs);
    eprintln!(
        "bench: feed read whole: {pages} pages, {views} accounts ({passes} passes) in {secs:.1} s: {pages_per_s:.0} pages/s, {views_per_s:.0} accounts/s"
    );
    Ok(row(
        &format!(
            "feed: GET /v1/feed?limit={LIMIT} read whole from 0 over and over ({accounts} accounts, {appended} events), one reader"
        ),
        format!("{pages_per_s:.0} pages/s ({views_per_s:.0} accounts/s)"),
        "",
        None,
        "",
    ))
}

/// A follower long-polling the feed from `from` while `1,000 × seconds` new deliveries are sent at
/// 1,000/s; the row of its lag.
async fn follow(
    args: &Args,
    client: &reqwest::Client,
    base: &str,
    pool: &store::PgPool,
    from: i64,
) -> anyhow::Result<Row> {
    let s = args.seconds;
    let feed_load = Workload {
        accounts: (1000 * s as usize) / 27 + 1,
        seed: 4,
        duplicates: 0.0,
        ..Workload::default()
    };
    let deliveries = Arc::new(
        generate(&feed_load)
            .into_iter()
            .take(1000 * s as usize)
            .collect::<Vec<_>>(),
    );
    // Where the follower stops: unknown until the ingest is over and folded.
    let stop = Arc::new(AtomicI64::new(i64::MAX));
    let follower = tokio::spawn(follower(
        client.clone(),
        base.to_owned(),
        from,
        stop.clone(),
    ));
    // The projection's own lag in the same run, as `lag` measures it: what the feed adds is the rest.
    let (recorder, seen) = record_checkpoints(pool).await?;
    let steady = send(deliveries, &sending(base, args.connections, Some(1000.0))).await;
    eprintln!(
        "bench: ingest at 1,000/s under the follower: {}",
        steady.summary()
    );
    wait_projected(pool).await?;
    stop.store(head(pool).await?, Ordering::SeqCst);
    // The follower's last long poll may wait its whole `WAIT` for nothing.
    let received = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .context("the feed's follower did not reach the head")???;
    recorder.abort();
    let seen = seen.lock().expect("no poison").clone();
    let checkpoint = checkpoint_lags(&steady.acks, &seen)?;
    let (lag, unmatched) = lags(&steady.acks, &received)?;
    anyhow::ensure!(!lag.is_empty(), "the follower received no view to time");
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "bench: feed lag over {} views received in {} pages ({unmatched} matched no delivery): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; the checkpoint notification over {} events: p50 {:.1} ms, p99 {:.1} ms",
        lag.len(),
        received.len(),
        ms(&lag, 0.5),
        ms(&lag, 0.99),
        lag.max() as f64 / 1000.0,
        checkpoint.len(),
        ms(&checkpoint, 0.5),
        ms(&checkpoint, 0.99),
    );
    Ok(row(
        &format!(
            "feed lag at 1,000 events/s (200 → view received by a follower long-polling limit={LIMIT}&wait={WAIT}): p50 / p99 (the rate ingest held)"
        ),
        format!(
            "{:.1} / {:.1} ms ({:.0}/s)",
            ms(&lag, 0.5),
            ms(&lag, 0.99),
            steady.throughput()
        ),
        &format!(
            "{:.1} / {:.1} ms (200 → checkpoint notification, same run)",
            ms(&checkpoint, 0.5),
            ms(&checkpoint, 0.99)
        ),
        None,
        "p99 < 100 ms",
    ))
}

/// Follows the feed from `after` with long polls, recording each page as it arrives, until the
/// cursor reaches `stop`.
async fn follower(
    client: reqwest::Client,
    base: String,
    mut after: i64,
    stop: Arc<AtomicI64>,
) -> anyhow::Result<Received> {
    let mut received = Received::new();
    while after < stop.load(Ordering::SeqCst) {
        let (positions, next_after) = page(&client, &base, after, Some(WAIT)).await?;
        let at = Instant::now();
        if !positions.is_empty() {
            received.push((at, positions));
        }
        after = next_after;
    }
    Ok(received)
}

/// The lag of every view received that a new delivery acknowledged here changed, in microseconds:
/// from the delivery's 200 to the arrival of the page with the view at its position; and how many
/// views matched no delivery.
fn lags(acks: &[Ack], received: &Received) -> anyhow::Result<(Histogram<u64>, usize)> {
    let accepted: HashMap<i64, Instant> = acks
        .iter()
        .filter(|a| !a.duplicate)
        .map(|a| (a.position, a.at))
        .collect();
    let mut lag = Histogram::<u64>::new(3)?;
    let mut unmatched = 0;
    for (at, positions) in received {
        for position in positions {
            match accepted.get(position) {
                Some(sent) => {
                    lag.record(at.saturating_duration_since(*sent).as_micros().max(1) as u64)?
                }
                None => unmatched += 1,
            }
        }
    }
    Ok((lag, unmatched))
}

/// One page of `GET {base}/v1/feed?after=&limit=` (with `wait`, a long poll): its views'
/// `last_position`s and `next_after`.
async fn page(
    client: &reqwest::Client,
    base: &str,
    after: i64,
    wait: Option<&str>,
) -> anyhow::Result<(Vec<i64>, i64)> {
    let mut url = format!("{base}/v1/feed?after={after}&limit={LIMIT}");
    if let Some(wait) = wait {
        url.push_str(&format!("&wait={wait}"));
    }
    let response = client.get(url).send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(
        status == 200,
        "GET /v1/feed answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let page: Value = serde_json::from_slice(&body).context("a feed page")?;
    let positions = page["accounts"]
        .as_array()
        .context("a feed page without accounts")?
        .iter()
        .map(|view| {
            view["last_position"]
                .as_i64()
                .context("a view without last_position")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let next_after = page["next_after"]
        .as_i64()
        .context("a feed page without next_after")?;
    Ok((positions, next_after))
}

/// The head of the log.
async fn head(pool: &store::PgPool) -> anyhow::Result<i64> {
    let mut conn = pool.acquire().await?;
    Ok(store::log::head(&mut conn).await?)
}
