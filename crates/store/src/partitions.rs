//! The projection's hash partitions (`PROJECTOR_PARTITIONS`, migrations/V19).
//!
//! A [`Part`] is what one projector leader folds: the whole projection (one partition, the
//! default), or the accounts whose id hashes to `index` among `of`. Each part has its own
//! checkpoint and its own leader lock ([`Part::lock`]). The projection's checkpoint, the row
//! [`crate::checkpoints::PROJECTION`] every reader of the projection waits on, is the whole's own
//! with one partition, and the lowest partition checkpoint with more: each partition's batch
//! lowers nothing and raises it to the new lowest before it commits ([`advance`]).
//!
//! # Why the projection's checkpoint is never past what a slower partition has committed
//! A batch locks its partition's row first and the projection's row last, after its own writes,
//! and reads the lowest partition in a statement after that lock is granted (READ COMMITTED): any
//! batch that held the row before it has committed and is seen. So the last batch to commit
//! leaves the exact lowest, and no batch writes a value higher than a partition it has not seen.
//!
//! # Laying the partitions out again
//! The layout is in the database, so every projector agrees on it. A projector configured with
//! another number lays the projection out again only when it holds every lock of the stored layout
//! (no projector of it runs): it folds the lagging partitions up to the highest checkpoint
//! ([`Layout::common`]), then replaces the rows in one transaction ([`lay_out`]).

use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::checkpoints::PROJECTION;
use crate::locks::Lock;
use crate::{Error, Result};

/// The most partitions a projection may have (the table's CHECK).
pub const MAX_PARTITIONS: u16 = 64;

/// What one leader folds: partition `index` of `of` (`of == 1`: the whole projection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Part {
    pub index: u16,
    pub of: u16,
}

impl Part {
    /// The projection in one partition.
    pub const WHOLE: Self = Self { index: 0, of: 1 };

    /// Every part of a projection in `partitions` partitions.
    pub fn all(partitions: u16) -> impl Iterator<Item = Self> {
        (0..partitions.max(1)).map(move |index| Self {
            index,
            of: partitions.max(1),
        })
    }

    /// Whether this is the projection in one partition.
    pub fn is_whole(self) -> bool {
        self.of <= 1
    }

    /// Whether `account` belongs to this part.
    pub fn contains(self, account: Uuid) -> bool {
        self.is_whole() || partition_of(account, self.of) == self.index
    }

    /// The lock its leader holds.
    pub fn lock(self) -> Lock {
        if self.is_whole() {
            Lock::Leader
        } else {
            Lock::Partition(self.index)
        }
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_whole() {
            f.write_str("whole")
        } else {
            write!(f, "{}/{}", self.index, self.of)
        }
    }
}

/// The partition of `account` among `partitions`: the first four bytes of the sha256 of its id,
/// big-endian, modulo `partitions`, as `projection_partition()` computes it in SQL.
pub fn partition_of(account: Uuid, partitions: u16) -> u16 {
    let digest = Sha256::digest(account.as_bytes());
    let high = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    (high % u32::from(partitions.max(1))) as u16
}

/// The stored layout: each part's checkpoint, by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub checkpoints: Vec<i64>,
}

impl Layout {
    pub fn partitions(&self) -> u16 {
        self.checkpoints.len() as u16
    }

    /// Each part and its checkpoint.
    pub fn parts(&self) -> impl Iterator<Item = (Part, i64)> + '_ {
        Part::all(self.partitions()).zip(self.checkpoints.iter().copied())
    }

    /// The checkpoint `account`'s events are folded up to.
    pub fn checkpoint_of(&self, account: Uuid) -> i64 {
        self.checkpoints[usize::from(partition_of(account, self.partitions()))]
    }

    /// The lowest checkpoint: every part has folded everything up to it.
    pub fn lowest(&self) -> i64 {
        self.checkpoints.iter().copied().min().unwrap_or(0)
    }

    /// The highest checkpoint: where every part stands once the others catch up to it.
    pub fn common(&self) -> i64 {
        self.checkpoints.iter().copied().max().unwrap_or(0)
    }
}

/// The stored layout, read without locking.
pub async fn layout(conn: &mut PgConnection) -> Result<Layout> {
    read_layout(conn, "").await
}

/// The stored layout with every checkpoint row locked until the end of the caller's transaction
/// (the partitions' in order, then the projection's): no batch of any part commits meanwhile.
pub async fn lock_layout(conn: &mut PgConnection) -> Result<Layout> {
    read_layout(conn, "FOR UPDATE").await
}

async fn read_layout(conn: &mut PgConnection, lock: &str) -> Result<Layout> {
    let partitions: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT position FROM projection_partitions ORDER BY partition {lock}"
    )))
    .fetch_all(&mut *conn)
    .await?;
    let whole: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT position FROM projector_checkpoints WHERE name = $1 {lock}"
    )))
    .bind(PROJECTION)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Layout {
        checkpoints: if partitions.is_empty() {
            vec![whole]
        } else {
            partitions
        },
    })
}

/// The checkpoint of `part`, locked until the end of the caller's transaction. Fails with
/// [`Error::Layout`] if the stored layout is not `part`'s (another projector laid it out again).
pub async fn lock(conn: &mut PgConnection, part: Part) -> Result<i64> {
    let found: Option<(i64, i64)> = if part.is_whole() {
        sqlx::query_as(
            "SELECT position, (SELECT count(*) FROM projection_partitions)
               FROM projector_checkpoints WHERE name = $1 FOR UPDATE",
        )
        .bind(PROJECTION)
        .fetch_optional(&mut *conn)
        .await?
        .map(|(position, rows): (i64, i64)| (position, rows.max(1)))
    } else {
        sqlx::query_as(
            "SELECT position, partitions::bigint FROM projection_partitions
              WHERE partition = $1 FOR UPDATE",
        )
        .bind(i32::from(part.index))
        .fetch_optional(&mut *conn)
        .await?
    };
    match found {
        Some((position, stored)) if stored == i64::from(part.of) => Ok(position),
        Some((_, stored)) => Err(Error::Layout {
            stored: stored as u16,
            wanted: part.of,
        }),
        None => Err(Error::Layout {
            stored: layout(conn).await?.partitions(),
            wanted: part.of,
        }),
    }
}

/// Moves `part`'s checkpoint from `from` to `to` (compare-and-set: [`Error::Fenced`] if it was
/// not at `from`), and with partitions raises the projection's checkpoint to the lowest of them
/// (see the module docs). In the caller's transaction, after its writes.
pub async fn advance(conn: &mut PgConnection, part: Part, from: i64, to: i64) -> Result<()> {
    if part.is_whole() {
        return crate::checkpoints::advance(conn, PROJECTION, from, to).await;
    }
    let moved = sqlx::query(
        "UPDATE projection_partitions SET position = $3 WHERE partition = $1 AND position = $2",
    )
    .bind(i32::from(part.index))
    .bind(from)
    .bind(to)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if moved != 1 {
        return Err(Error::Fenced {
            name: format!("{PROJECTION} partition {part}"),
            expected: from,
        });
    }
    // The lock first, the lowest in the next statement: it sees every batch that held the row.
    sqlx::query("SELECT 1 FROM projector_checkpoints WHERE name = $1 FOR UPDATE")
        .bind(PROJECTION)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE projector_checkpoints c SET position = p.lowest
           FROM (SELECT min(position) AS lowest FROM projection_partitions) p
          WHERE c.name = $1 AND c.position < p.lowest",
    )
    .bind(PROJECTION)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Lays the projection out in `partitions` partitions, every one at `at` (and the projection's
/// checkpoint too), in the caller's transaction. The caller holds every lock of the old layout,
/// and every old part has folded up to `at` ([`Layout::common`]).
pub async fn lay_out(conn: &mut PgConnection, partitions: u16, at: i64) -> Result<()> {
    sqlx::query("DELETE FROM projection_partitions")
        .execute(&mut *conn)
        .await?;
    if partitions > 1 {
        sqlx::query(
            "INSERT INTO projection_partitions (partition, partitions, position)
             SELECT p, $1, $2 FROM generate_series(0, $1 - 1) AS p",
        )
        .bind(i32::from(partitions))
        .bind(at)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "UPDATE projector_checkpoints SET position = $2 WHERE name = $1 AND position <> $2",
    )
    .bind(PROJECTION)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_account_is_in_exactly_one_part() {
        let mut counts = [0usize; 3];
        for n in 0..3000u128 {
            let account = Uuid::from_u128(n * 0x9e37_79b9_7f4a_7c15);
            let owners: Vec<Part> = Part::all(3).filter(|p| p.contains(account)).collect();
            assert_eq!(owners.len(), 1, "{account}");
            counts[usize::from(owners[0].index)] += 1;
            assert!(Part::WHOLE.contains(account));
        }
        // A hash, not the id's first bytes: each of three parts gets about a third.
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn parts_name_themselves_and_their_locks() {
        assert_eq!(Part::WHOLE.to_string(), "whole");
        assert_eq!(Part::WHOLE.lock(), Lock::Leader);
        let part = Part { index: 2, of: 3 };
        assert_eq!(part.to_string(), "2/3");
        assert_eq!(part.lock(), Lock::Partition(2));
        assert_ne!(Lock::Partition(0).key(), Lock::Partition(1).key());
    }
}
