//! Projection lag at a steady 1,000 events/s: from the 200 (commit) to the checkpoint
//! notification that covers the event.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use loadgen::{Ack, Workload, generate, send};

use crate::Args;
use crate::data::wait_projected;
use crate::report::{Row, row};
use crate::server::sending;

/// When each checkpoint notification arrived, and the position it covers.
pub type Seen = Arc<Mutex<Vec<(Instant, i64)>>>;

/// Sends `1,000 × seconds` new deliveries at 1,000/s to the server at `base` while recording the
/// checkpoint notifications on `pool`; the row.
pub async fn run(args: &Args, base: &str, pool: &store::PgPool) -> anyhow::Result<Row> {
    let s = args.seconds;
    let (recorder, seen) = record_checkpoints(pool).await?;
    let lag_load = Workload {
        accounts: (1000 * s as usize) / 27 + 1,
        seed: 3,
        duplicates: 0.0,
        ..Workload::default()
    };
    let deliveries = Arc::new(
        generate(&lag_load)
            .into_iter()
            .take(1000 * s as usize)
            .collect::<Vec<_>>(),
    );
    let steady = send(deliveries, &sending(base, args.connections, Some(1000.0))).await;
    wait_projected(pool).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    recorder.abort();
    let seen = seen.lock().expect("no poison").clone();
    let lag = lags(&steady.acks, &seen)?;
    let lag_ms = |q: f64| lag.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "bench: projection lag over {} events: p50 {:.1} ms, p99 {:.1} ms",
        lag.len(),
        lag_ms(0.5),
        lag_ms(0.99)
    );
    Ok(row(
        "projection lag at 1,000 events/s (commit → snapshot visible): p50 / p99",
        format!("{:.1} / {:.1} ms", lag_ms(0.5), lag_ms(0.99)),
        "",
        None,
        "p99 < 50 ms",
    ))
}

/// Subscribes to the checkpoint notifications and records them until the task is aborted.
pub async fn record_checkpoints(
    pool: &store::PgPool,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, Seen)> {
    let mut notifications = store::checkpoints::CheckpointNotifications::subscribe(pool).await?;
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Ok((_, position)) = notifications.next().await {
                seen.lock()
                    .expect("no poison")
                    .push((Instant::now(), position));
            }
        }
    });
    Ok((recorder, seen))
}

/// The lag of every new delivery acknowledged, in microseconds: from its 200 to the first
/// notification of a checkpoint at or past its position.
pub fn lags(acks: &[Ack], seen: &[(Instant, i64)]) -> anyhow::Result<Histogram<u64>> {
    let mut lag = Histogram::<u64>::new(3)?;
    for ack in acks.iter().filter(|a| !a.duplicate) {
        if let Some((at, _)) = seen.iter().find(|(_, position)| *position >= ack.position) {
            lag.record(at.saturating_duration_since(ack.at).as_micros().max(1) as u64)?;
        }
    }
    Ok(lag)
}
