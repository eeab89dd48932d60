//! Supervision of the background tasks of a process's roles (the committer, the shared reader,
//! the projector, the enricher, the readiness check).
//!
//! Crash-only: a task that ends or panics while the process is not shutting down makes the process
//! unready at once and stops it with an error (a non-zero exit), so the orchestrator (compose's
//! `restart:`, Kubernetes) starts a fresh one. Restarting a task in place was the alternative; it
//! was not chosen because a task that died took its state with it (the committer's queue and the
//! requests waiting on it, the reader's lookups), and a fresh process is the one state known to be
//! whole. The projector and the enricher already survive database outages by themselves: only a
//! bug or a panic ends them, and that is what this catches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use tokio::task::{Id, JoinSet};

/// A task that ended while it should still run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {task} task {how}")]
pub struct TaskDied {
    pub task: &'static str,
    /// `panicked: <message>` or `stopped`.
    pub how: String,
}

/// Runs named tasks and reports the first that ends.
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    faults: Faults,
}

impl Supervisor {
    pub fn new(faults: Faults) -> Self {
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            faults,
        }
    }

    /// Spawns `task` under `name`.
    pub fn spawn(&mut self, name: &'static str, task: BoxFuture<'static, ()>) {
        let fault = self.faults.receiver(name);
        let handle = self.tasks.spawn(async move {
            tokio::pin!(task);
            tokio::select! {
                () = &mut task => {}
                Ok(()) = fault => panic!("a fault was injected into the {name} task"),
            }
        });
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first task to end, however it ends. Pending forever when there is none.
    pub async fn first_exit(&mut self) -> TaskDied {
        let Some(joined) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, how) = match joined {
            Ok((id, ())) => (id, "stopped".to_owned()),
            Err(error) => {
                let id = error.id();
                let how = if error.is_panic() {
                    let panic = error.into_panic();
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    format!("panicked: {message}")
                } else {
                    "was cancelled".to_owned()
                };
                (id, how)
            }
        };
        TaskDied {
            task: self.names.get(&id).copied().unwrap_or("background"),
            how,
        }
    }

    /// Waits for every task to end (on shutdown), up to `grace`; the rest are aborted.
    pub async fn stop(mut self, grace: std::time::Duration) {
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                ?grace,
                "background tasks still running after the grace period; aborting them"
            );
        }
    }
}

/// Test hooks: make a supervised task panic, as a bug in it would. Cheap to clone.
#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<HashMap<&'static str, oneshot::Sender<()>>>>);

impl Faults {
    fn receiver(&self, name: &'static str) -> oneshot::Receiver<()> {
        let (sender, receiver) = oneshot::channel();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, sender);
        receiver
    }

    /// Makes the running task `name` panic; false if no such task runs.
    pub fn panic(&self, name: &str) -> bool {
        let sender = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        sender.is_some_and(|s| s.send(()).is_ok())
    }
}
