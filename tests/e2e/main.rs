//! End-to-end tests: real Postgres (a fresh database per test), real HTTP on port 0, and for crash
//! and failover tests the real `account-projector` binary as a child process.
//!
//! Postgres is reached at `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).

mod api;
mod argyle;
mod audit;
mod concurrency;
mod crash;
mod erasure;
mod feed;
mod hostile;
mod ingest;
mod never_stall;
mod notifier;
mod partitions;
mod projection;
mod reconcile;
mod reliability;
mod replica;
mod security;
mod ui;

/// The shared harness (`crates/test-support`), as `crate::helpers`.
use test_support as helpers;
