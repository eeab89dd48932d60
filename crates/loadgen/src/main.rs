//! `loadgen`: send realistic, signed Argyle webhook traffic to an account-projector deployment and
//! report throughput, latency and statuses; then check every acknowledged delivery is in its log.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use loadgen::{Sending, Workload, generate, send, verify};

/// Sends realistic Argyle webhook traffic (first-connection bursts, re-scans, failures, removals,
/// redeliveries, arrivals out of order) and reports throughput, latency p50/p90/p99/max and statuses.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Base URL of the service.
    #[arg(long, env = "LOADGEN_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Webhook secret to sign with (one of the service's ARGYLE_WEBHOOK_SECRETS).
    #[arg(long, env = "LOADGEN_SECRET", hide_env_values = true)]
    secret: String,
    /// Bearer token for /v1, used to verify the log at the end.
    #[arg(long, env = "LOADGEN_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Accounts whose lives are generated (about 25 deliveries each).
    #[arg(long, default_value_t = 200)]
    accounts: usize,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Deliveries per second; as fast as possible when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// Fraction of deliveries that repeat an earlier body.
    #[arg(long, default_value_t = 0.1)]
    duplicates: f64,
    /// Probability that two neighbouring events of an account arrive swapped.
    #[arg(long, default_value_t = 0.2)]
    out_of_order: f64,
    /// Probability of a resource-less accounts.updated after a refinement.
    #[arg(long, default_value_t = 0.05)]
    resourceless: f64,
    /// Seed of the generator (same seed, same bytes).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Do not read the log back at the end.
    #[arg(long)]
    no_verify: bool,
    /// Write the signed requests to this file instead of sending them, for a client that replays
    /// them (`wrk -s benches/wrk/ingest.lua`; the script names the format).
    #[arg(long, value_name = "FILE")]
    write_requests: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workload = Workload {
        accounts: args.accounts,
        seed: args.seed,
        duplicates: args.duplicates,
        out_of_order: args.out_of_order,
        resourceless: args.resourceless,
        ..Workload::default()
    };
    let deliveries = Arc::new(generate(&workload));
    eprintln!(
        "loadgen: {} deliveries for {} accounts",
        deliveries.len(),
        args.accounts
    );
    if let Some(path) = &args.write_requests {
        loadgen::write_requests(&deliveries, &args.secret, path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "loadgen: wrote {} signed requests to {}",
            deliveries.len(),
            path.display()
        );
        return Ok(());
    }
    let sending = Sending {
        url: args.url.clone(),
        secret: args.secret,
        connections: args.connections,
        rate: args.rate,
    };
    let report = send(deliveries.clone(), &sending).await;
    println!("{}", report.summary());
    if !args.no_verify {
        let checked = verify(
            &args.url,
            args.api_token.as_deref(),
            &deliveries,
            &report.acks,
        )
        .await?;
        println!("verified: all {checked} acknowledged deliveries are in the log, byte for byte");
    }
    anyhow::ensure!(
        report.statuses.keys().all(|s| *s == 200),
        "some deliveries were not accepted"
    );
    Ok(())
}
