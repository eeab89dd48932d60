//! `bench`: the one-run benchmark. On fresh databases, measures Postgres's own ceiling (pgbench, same
//! payload, same concurrency) and then the service against it, and prints a table ready for
//! BENCHMARKS.md (also written to `target/bench-report.md`).
//!
//! Run from the repository root after `cargo build --release`: `./target/release/bench` (or
//! `cargo run --release -p bench`).
//!
//! # Layout
//! The scenarios, in the order they run and print their rows:
//! - [`baseline`]: Postgres's own ceiling (pgbench single-row INSERT and SELECT) and the log's own
//!   append without HTTP (`benches/pgbench/append.sql`, one group at a time and four overlapping).
//! - [`ingest`]: `serve --role ingest` alone: signed webhooks over HTTP, the same with a wrong
//!   signature, at saturation (with the CPU a delivery costs), and replayed by `wrk`.
//! - [`service`]: `serve` with every role on a fresh database: ingest with the projector folding,
//!   then the rows below, then the server's peak RSS.
//! - [`latency`]: ingest at a fixed 2,000/s, with the machine's CPU during the row.
//! - [`lag`]: projection lag at 1,000 events/s, from the commit to the checkpoint notification.
//! - [`queries`]: `GET /v1/accounts/{id}` flat out (the Rust client, then `wrk`) and at 1,000/s,
//!   and time travel over an account with 10,000 events.
//! - [`rebuild`]: a log of many accounts loaded through the store, refolded by
//!   `account-projector rebuild`.
//! - [`reconcile`]: `account-projector reconcile` against a fake Argyle listing 10,000 and then
//!   100,000 accounts: the command's peak RSS at both (flat) and its accounts/s.
//! - [`feed`]: the compacted change feed on a log of 100,000 events over 10,000 accounts: read
//!   whole a page of 1,000 at a time (pages/s), and a follower's lag at 1,000 events/s.
//! - [`encryption`]: encryption at rest on (`DATA_KEYS`) against off (`ALLOW_PLAINTEXT_LOG`),
//!   each on a fresh database: ingest alone, rebuild of 200,000 events over 10,000 accounts, and
//!   time travel over an account with 10,000 events; off is each row's baseline.
//! - [`partitions`]: the projector folding one log from position 0 with 1, 2 and 4 partitions,
//!   against one partition in the same run.
//! - [`growth`] (only with `--only growth`): the same figures as one log grows, each against the
//!   first size's.
//!
//! Shared by them:
//! - [`report`]: the rows and the Markdown table printed at the end.
//! - [`pg`]: pgbench and psql runners, database URLs.
//! - [`wrk`]: the `wrk` runner (a C client) and its scripts' inputs.
//! - [`server`]: starting, waiting for and stopping the service binary; its log.
//! - [`data`]: setting up the log through the store and waiting for the projector.
//! - [`machine`]: the machine's and this process's CPU shares, a process's peak RSS.

#![forbid(unsafe_code)]

mod baseline;
mod data;
mod encryption;
mod feed;
mod growth;
mod ingest;
mod lag;
mod latency;
mod machine;
mod partitions;
mod pg;
mod queries;
mod rebuild;
mod reconcile;
mod report;
mod server;
mod service;
mod wrk;

use anyhow::Context;
use clap::Parser;

/// The one-run benchmark of account-projector against Postgres's own ceiling on this machine.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Postgres server (any database on it); the benchmark creates and drops its own databases.
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The service binary to run.
    #[arg(long, default_value = "target/release/account-projector")]
    server: String,
    /// Concurrency of the throughput runs (pgbench clients, HTTP connections).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Length of each timed run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Events in the log for the rebuild run.
    #[arg(long, default_value_t = 1_000_000)]
    rebuild_events: usize,
    /// Accounts those events are spread over.
    #[arg(long, default_value_t = 10_000)]
    rebuild_accounts: usize,
    /// Accounts the fake Argyle lists for the reconcile run (after a run with a tenth of them).
    #[arg(long, default_value_t = 100_000)]
    reconcile_accounts: usize,
    /// Events in the log for the change feed's runs.
    #[arg(long, default_value_t = 100_000)]
    feed_events: usize,
    /// Accounts those events are spread over.
    #[arg(long, default_value_t = 10_000)]
    feed_accounts: usize,
    /// Events in the log for encryption's rebuild runs (on, then off).
    #[arg(long, default_value_t = 200_000)]
    encryption_events: usize,
    /// Accounts those events are spread over.
    #[arg(long, default_value_t = 10_000)]
    encryption_accounts: usize,
    /// Events in the log the partitioned projector folds from 0.
    #[arg(long, default_value_t = 200_000)]
    partition_events: usize,
    /// Accounts those events are spread over.
    #[arg(long, default_value_t = 10_000)]
    partition_accounts: usize,
    /// The numbers of partitions the projector folds that log with, in order (the first is the
    /// baseline).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    partition_counts: Vec<u16>,
    /// Run only this scenario (the others are skipped); all of them when absent.
    #[arg(long, value_name = "SCENARIO", value_parser = ["ingest", "reconcile", "feed", "encryption", "partitions", "growth"])]
    only: Option<String>,
    /// The log sizes (events) `--only growth` grows one database to, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100000,1000000,3000000,10000000"
    )]
    growth_sizes: Vec<usize>,
    /// Accounts those events are spread over at the largest size (fewer, in proportion, before).
    #[arg(long, default_value_t = 300_000)]
    growth_accounts: usize,
    /// Vacuum the snapshot table after each load of `--only growth` (as autovacuum would).
    #[arg(long)]
    growth_vacuum: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rows = vec![];
    let admin = store::pool(&args.database_url, &store::DbOptions::default())?;
    let version = store::migrate::server_version(&admin).await?;
    let cores = machine::cores();
    let payload = std::fs::read("tests/fixtures/argyle/05_accounts.updated.json")
        .context("run from the repository root")?;
    eprintln!(
        "bench: {cores} cores; {version}; server logs in {}",
        server::SERVER_LOG
    );

    let ingest_only = args.only.as_deref() == Some("ingest");
    if args.only.is_none() || ingest_only {
        // 1. Postgres's own ceiling with the same payload and concurrency.
        let baseline = baseline::run(&args, &payload, &mut rows).await?;
        // 2. Ingest alone, as the compose stack runs it.
        ingest::run(&args, &baseline, cores, &mut rows).await?;
        if !ingest_only {
            // 3. The service with every role, in its own process, on a fresh database.
            service::run(&args, &baseline, &mut rows).await?;
            // 4. Rebuild: the log of many accounts, refolded by `account-projector rebuild`.
            rebuild::run(&args, &mut rows).await?;
        }
    }
    let only = |scenario: &str| args.only.as_deref().is_none_or(|o| o == scenario);
    // 5. Reconcile: Argyle's listing paged through by `account-projector reconcile`.
    if only("reconcile") {
        reconcile::run(&args, &mut rows).await?;
    }
    // 6. The change feed: read whole, and followed while ingest runs.
    if only("feed") {
        feed::run(&args, &mut rows).await?;
    }
    // 7. Encryption at rest: ingest, rebuild and time travel, on against off.
    if only("encryption") {
        encryption::run(&args, &mut rows).await?;
    }

    // 8. The partitioned projector: one log folded from 0 with 1, 2 and 4 partitions.
    if only("partitions") {
        partitions::run(&args, &mut rows).await?;
    }

    // 9. Cost as the log grows: only when asked for (long, and it takes disk).
    if args.only.as_deref() == Some("growth") {
        growth::run(&args, &mut rows).await?;
    }

    report::print(&rows, cores, &version, args.connections, args.seconds)?;
    drop(admin);
    Ok(())
}
