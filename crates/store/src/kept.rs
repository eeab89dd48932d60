//! Connections kept between short requests.
//!
//! sqlx pings a connection every time it goes back into its pool (a round trip, and a wake-up of
//! both processes), which on a request that runs one primary-key query is a third of the work.
//! [`KeptConnections`] keeps a few connections out of the pool's hands between requests instead: a
//! request that ended cleanly hands its connection back with [`Lease::release`]; one that failed or
//! was cancelled mid-query just drops it, and the pool's own check on return decides whether it
//! can be used again. A kept connection idle for a while is pinged before it is lent again, as the
//! pool does, since a restarted server may have dropped it. A connection first lent longer ago than
//! [`HAND_BACK_AFTER`] goes back to the pool at its next release, so the pool's own rules apply to
//! it again: its maximum lifetime closes old connections (and with them their cached statement
//! plans, which on a server that never analyzes may have been made while a table was tiny).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

use crate::{Result, usable_after};

/// How long a connection is kept out of the pool's hands, by default, before it goes back at its
/// next release.
pub const HAND_BACK_AFTER: Duration = Duration::from_secs(60);

struct Kept {
    conn: PoolConnection<Postgres>,
    /// Released at.
    since: Instant,
    /// First lent by these kept connections.
    first_lent: Instant,
}

/// A pool front that keeps up to `max_kept` connections between uses; cheap to clone.
#[derive(Clone)]
pub struct KeptConnections {
    pool: PgPool,
    kept: Arc<Mutex<Vec<Kept>>>,
    max_kept: usize,
    hand_back_after: Duration,
}

impl std::fmt::Debug for KeptConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptConnections")
            .field("max_kept", &self.max_kept)
            .finish_non_exhaustive()
    }
}

impl KeptConnections {
    /// Keeps at most `max_kept` of `pool`'s connections; the others go back to the pool. When the
    /// pool closes, the kept connections go back to it, so that closing never waits on them.
    pub fn new(pool: PgPool, max_kept: usize) -> Self {
        let connections = Self {
            pool,
            kept: Arc::default(),
            max_kept,
            hand_back_after: HAND_BACK_AFTER,
        };
        let closing = connections.clone();
        tokio::spawn(async move {
            closing.pool.close_event().await;
            closing.lock().clear();
        });
        connections
    }

    /// Connections first lent longer ago than this go back to the pool at their next release
    /// (default [`HAND_BACK_AFTER`]).
    pub fn hand_back_after(mut self, after: Duration) -> Self {
        self.hand_back_after = after;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Kept>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently released kept connection, else one from the pool (same timeout).
    pub async fn acquire(&self) -> Result<Lease> {
        loop {
            let kept = self.lock().pop();
            let Some(mut kept) = kept else { break };
            if usable_after(&mut kept.conn, kept.since.elapsed()).await {
                return Ok(self.lease(kept.conn, kept.first_lent));
            }
        }
        Ok(self.lease(self.pool.acquire().await?, Instant::now()))
    }

    fn lease(&self, conn: PoolConnection<Postgres>, first_lent: Instant) -> Lease {
        Lease {
            conn,
            home: self.clone(),
            first_lent,
        }
    }
}

/// A connection lent by [`KeptConnections`]. Dropping it returns it to the pool.
pub struct Lease {
    conn: PoolConnection<Postgres>,
    home: KeptConnections,
    first_lent: Instant,
}

impl Lease {
    /// Hands the connection back to be kept: call it only once the last query has completed.
    pub fn release(self) {
        let mut kept = self.home.lock();
        // Checked under the lock that clearing at close takes too: nothing is kept after it.
        if kept.len() < self.home.max_kept
            && !self.home.pool.is_closed()
            && self.first_lent.elapsed() < self.home.hand_back_after
        {
            kept.push(Kept {
                conn: self.conn,
                since: Instant::now(),
                first_lent: self.first_lent,
            });
        }
    }
}

impl Deref for Lease {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}
