//! Requests that arrive while one batch is being handled share the next: the shape of the ingest's
//! group commit and of the query API's shared snapshot reads.
//!
//! One task takes every request queued at that moment (up to `max_batch`), hands them to a
//! [`Handler`] in one call, and answers each with its reply. Nothing waits on a timer: a lone
//! request is handled at once, and under load a batch carries what arrived during the previous one.
//! Every request is handled by a batch that starts after it was queued.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

/// What a batch does: one reply per request, in the order of the requests.
pub trait Handler: Send + 'static {
    type Request: Send + 'static;
    type Reply: Send + 'static;

    /// Handles one batch; the returned vector has one reply per request, in order.
    fn handle(
        &mut self,
        batch: Vec<Self::Request>,
    ) -> impl Future<Output = Vec<Self::Reply>> + Send + '_;
}

/// Whether a request whose caller went away while it was queued is still handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// Handled anyway (an append the caller may not hear about, but that its retry will find).
    Handle,
    /// Dropped before the batch (a read nobody waits for).
    Skip,
}

struct Job<Q, R> {
    request: Q,
    reply: oneshot::Sender<R>,
}

/// The batching task has stopped (or was never run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// Handle to a batching task; cheap to clone. The task ends when the last handle is dropped,
/// after its last batch.
pub struct Batcher<Q, R> {
    jobs: mpsc::Sender<Job<Q, R>>,
}

impl<Q, R> Clone for Batcher<Q, R> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
        }
    }
}

impl<Q, R> std::fmt::Debug for Batcher<Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("pending", &self.pending())
            .finish()
    }
}

impl<Q: Send + 'static, R: Send + 'static> Batcher<Q, R> {
    /// A handle and the batching loop, for the caller to run as a (supervised) task. Up to
    /// `max_batch` requests per batch; eight batches' worth may queue before callers wait.
    pub fn new<H>(
        max_batch: usize,
        abandoned: Abandoned,
        handler: H,
    ) -> (Self, impl Future<Output = ()> + Send + 'static)
    where
        H: Handler<Request = Q, Reply = R>,
    {
        let max_batch = max_batch.max(1);
        let (jobs, queue) = mpsc::channel(max_batch * 8);
        (
            Self { jobs },
            batch_loop(queue, max_batch, abandoned, handler),
        )
    }

    /// Queues `request` and waits for its reply.
    pub async fn call(&self, request: Q) -> Result<R, Stopped> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { request, reply })
            .await
            .map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }
}

impl<Q, R> Batcher<Q, R> {
    /// Requests waiting for the next batch.
    pub fn pending(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }
}

async fn batch_loop<H: Handler>(
    mut queue: mpsc::Receiver<Job<H::Request, H::Reply>>,
    max_batch: usize,
    abandoned: Abandoned,
    mut handler: H,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while queue.recv_many(&mut batch, max_batch).await > 0 {
        if abandoned == Abandoned::Skip {
            batch.retain(|job| !job.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
        }
        let (requests, replies): (Vec<_>, Vec<_>) =
            batch.drain(..).map(|job| (job.request, job.reply)).unzip();
        let answers = handler.handle(requests).await;
        debug_assert_eq!(answers.len(), replies.len(), "one reply per request");
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubles numbers, recording the size of each batch.
    struct Double(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

    impl Handler for Double {
        type Request = u32;
        type Reply = u32;
        async fn handle(&mut self, batch: Vec<u32>) -> Vec<u32> {
            self.0.lock().unwrap().push(batch.len());
            tokio::task::yield_now().await;
            batch.into_iter().map(|n| n * 2).collect()
        }
    }

    #[tokio::test]
    async fn each_caller_gets_its_own_reply_and_concurrent_calls_share_batches() {
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let (batcher, run) = Batcher::new(4, Abandoned::Handle, Double(sizes.clone()));
        let task = tokio::spawn(run);
        assert_eq!(batcher.call(21).await, Ok(42));
        let answers = futures_join(&batcher, (0..10).collect::<Vec<u32>>()).await;
        assert_eq!(answers, (0..10).map(|n| Ok(n * 2)).collect::<Vec<_>>());
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 11);
        assert!(sizes.iter().all(|&n| n <= 4), "{sizes:?}");
        assert!(sizes.len() < 11, "some calls shared a batch: {sizes:?}");
        drop(batcher);
        task.await.unwrap();
    }

    async fn futures_join(
        batcher: &Batcher<u32, u32>,
        inputs: Vec<u32>,
    ) -> Vec<Result<u32, Stopped>> {
        let handles: Vec<_> = inputs
            .into_iter()
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.call(n).await })
            })
            .collect();
        let mut answers = vec![];
        for handle in handles {
            answers.push(handle.await.unwrap());
        }
        answers
    }

    #[tokio::test]
    async fn a_stopped_batcher_answers_stopped() {
        let (batcher, run) = Batcher::new(4, Abandoned::Skip, Double(Default::default()));
        drop(run);
        assert_eq!(batcher.call(1).await, Err(Stopped));
    }
}
