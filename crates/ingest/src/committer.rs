//! Group commit: deliveries that arrive while a commit is in flight share the next transaction.
//!
//! One task per process takes every delivery queued at that moment (up to `max_batch`), appends
//! them in one statement and one commit, and only then answers each request. Nothing waits on a
//! timer: a lone delivery is committed at once, and under load the batch grows by itself to what
//! arrived during the previous commit. Appends are serialised by the log's lock anyway, so sharing
//! a commit is how throughput rises above one WAL flush per delivery.

use std::time::Duration;

use store::PgPool;
use store::kept::KeptConnections;
use store::log::{Appended, Delivery};
use tokio::sync::{mpsc, oneshot};

/// Why an append did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The database is unreachable or timed out; retrying later may succeed.
    #[error("the database is unavailable")]
    Unavailable,
    /// The database refused the delivery.
    #[error("the database refused the append")]
    Failed,
}

struct Job {
    delivery: Delivery,
    reply: oneshot::Sender<Result<Appended, AppendError>>,
}

/// Handle to the committing task; cheap to clone.
#[derive(Clone, Debug)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("event", &self.delivery.event)
            .finish()
    }
}

impl Committer {
    /// A handle and the committing loop, for the caller to run as a supervised task; the loop
    /// ends when the last handle is dropped, after its last batch.
    pub fn new(
        pool: PgPool,
        dedup_window: Duration,
        max_batch: usize,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let max_batch = max_batch.max(1);
        let (jobs, queue) = mpsc::channel(max_batch * 8);
        (
            Self { jobs },
            commit_loop(pool, dedup_window, max_batch, queue),
        )
    }

    /// Appends one delivery; returns once it is committed (or failed).
    pub async fn append(&self, delivery: Delivery) -> Result<Appended, AppendError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { delivery, reply })
            .await
            .map_err(|_| AppendError::Unavailable)?;
        answer.await.map_err(|_| AppendError::Unavailable)?
    }
}

async fn commit_loop(
    pool: PgPool,
    dedup_window: Duration,
    max_batch: usize,
    mut queue: mpsc::Receiver<Job>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    // The one connection the loop appends on is kept between batches: one handed back to the pool
    // and taken again costs two extra round trips (sqlx pings it both ways).
    let connections = KeptConnections::new(pool, 1);
    loop {
        let received = queue.recv_many(&mut batch, max_batch).await;
        if received == 0 {
            break;
        }
        let (deliveries, replies): (Vec<Delivery>, Vec<_>) =
            batch.drain(..).map(|j| (j.delivery, j.reply)).unzip();
        tracing::trace!(deliveries = deliveries.len(), "committing a batch");
        metrics::histogram!("append_batch_size").record(deliveries.len() as f64);
        let started = std::time::Instant::now();
        let outcome = append(&connections, &deliveries, dedup_window).await;
        metrics::histogram!("append_duration_seconds").record(started.elapsed().as_secs_f64());
        if let Ok(appended) = &outcome
            && let Some(head) = appended.iter().map(|a| a.position).max()
        {
            metrics::gauge!("log_head_position").set(head as f64);
        }
        match outcome {
            Ok(appended) => {
                for (reply, appended) in replies.into_iter().zip(appended) {
                    let _ = reply.send(Ok(appended));
                }
            }
            Err(AppendError::Failed) if deliveries.len() > 1 => {
                // One delivery the database refuses must not fail the others: retry them alone.
                for (delivery, reply) in deliveries.into_iter().zip(replies) {
                    let single =
                        append(&connections, std::slice::from_ref(&delivery), dedup_window).await;
                    let _ = reply.send(single.map(|appended| appended[0]));
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error));
                }
            }
        }
    }
}

async fn append(
    connections: &KeptConnections,
    deliveries: &[Delivery],
    dedup_window: Duration,
) -> Result<Vec<Appended>, AppendError> {
    let attempt = async {
        let mut conn = connections.acquire().await?;
        let appended = store::log::append_in(&mut conn, deliveries, dedup_window).await?;
        conn.release();
        Ok(appended)
    };
    attempt.await.map_err(|error: store::Error| {
        if error.is_unavailable() {
            tracing::warn!(%error, deliveries = deliveries.len(), "append failed: database unavailable");
            AppendError::Unavailable
        } else {
            tracing::error!(%error, deliveries = deliveries.len(), "append failed");
            AppendError::Failed
        }
    })
}
