//! 7. Encryption at rest, on against off in the same run, each on a fresh database: ingest alone
//!    (`serve --role ingest`, signed webhooks flat out, as [`crate::ingest`] sends them),
//!    `account-projector rebuild` of a log of `encryption_events` events over
//!    `encryption_accounts` accounts loaded straight through the store, and time travel
//!    (`?as_of=`) over one account with 10,000 events. On is the default: `DATA_KEYS` =
//!    [`DATA_KEY`](crate::data::DATA_KEY), every body and resource sealed with its account's key.
//!    Off: no `DATA_KEYS` and `ALLOW_PLAINTEXT_LOG=true`, stored as they are. Each row prints on,
//!    with off as its baseline (ratio on / off).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use loadgen::{Report, generate, send};
use serde_json::Value;
use store::keys::Vault;
use uuid::Uuid;

use crate::Args;
use crate::data::{
    analyze, append_bodies_with, load_interleaved_with, refinements, vault, wait_projected,
};
use crate::ingest::{expect_deliveries, workload};
use crate::pg::url_for;
use crate::queries::time_travel_reads;
use crate::report::{Row, row};
use crate::server::{sending, start_server_with, stop_server, wait_ready};

/// The database of every run here, dropped and created afresh for each.
const DATABASE: &str = "account_projector_bench_encryption";
/// Events of the account read by time travel.
const TIME_TRAVEL_EVENTS: usize = 10_000;
/// Time-travel reads timed, one after the other.
const TIME_TRAVEL_READS: usize = 20;

/// Runs ingest, rebuild and time travel with encryption on, then off, and pushes their rows.
pub async fn run(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.encryption_events > 0 && args.encryption_accounts > 0,
        "--encryption-events and --encryption-accounts must be at least 1"
    );
    let c = args.connections;
    let (on, off) = (ingest(args, true).await?, ingest(args, false).await?);
    let ingested =
        |r: &Report| format!("{:.0}/s (p99 {:.1} ms)", r.throughput(), r.latency_ms(0.99));
    rows.push(row(
        &format!(
            "encryption at rest on (DATA_KEYS) against off (ALLOW_PLAINTEXT_LOG): ingest alone (`--role ingest`), signed webhooks/s over HTTP, {c} connections"
        ),
        ingested(&on),
        &format!("{} off", ingested(&off)),
        Some(on.throughput() / off.throughput()),
        "",
    ));

    let (on, off) = (rebuild(args, true).await?, rebuild(args, false).await?);
    let rebuilt = |r: &Rebuilt| format!("{:.0} events/s ({:.1} s)", r.rate(), r.secs);
    rows.push(row(
        &format!(
            "encryption at rest on against off: rebuild of {} events over {} accounts, whole command",
            on.events, args.encryption_accounts
        ),
        rebuilt(&on),
        &format!("{} off", rebuilt(&off)),
        Some(on.rate() / off.rate()),
        "",
    ));

    let (on, off) = (
        time_travel(args, true).await?,
        time_travel(args, false).await?,
    );
    let (median, max) = (TIME_TRAVEL_READS / 2, TIME_TRAVEL_READS - 1);
    let read = |t: &[f64]| format!("{:.1} / {:.1} ms", t[median], t[max]);
    rows.push(row(
        &format!(
            "encryption at rest on against off: time travel (`?as_of=`) over an account with {TIME_TRAVEL_EVENTS} events, median / max of {TIME_TRAVEL_READS} (ratio of the medians: above 1× is slower)"
        ),
        read(&on),
        &format!("{} off", read(&off)),
        Some(on[median] / off[median]),
        "",
    ));
    Ok(())
}

/// "on" or "off".
fn label(encrypted: bool) -> &'static str {
    if encrypted { "on" } else { "off" }
}

/// What the data loaded through the store is sealed with: what the servers started with
/// `encrypted` read ([`with_data_keys`]).
fn vault_for(encrypted: bool) -> Vault {
    if encrypted {
        vault()
    } else {
        Vault::plaintext()
    }
}

/// [`DATABASE`], dropped, created and migrated; its URL.
async fn fresh_database(args: &Args) -> anyhow::Result<String> {
    let url = url_for(&args.database_url, DATABASE);
    store::migrate::drop_database(&url).await?;
    store::migrate::migrate(&url).await?;
    Ok(url)
}

/// A pool on `url` without statement timeout (the loads are long).
fn pool(url: &str) -> anyhow::Result<store::PgPool> {
    Ok(store::pool(
        url,
        &store::DbOptions {
            statement_timeout: Duration::ZERO,
            ..store::DbOptions::default()
        },
    )?)
}

/// Checks that the log was written as `encrypted` says: account keys when on, none when off.
async fn expect_sealed(pool: &store::PgPool, encrypted: bool) -> anyhow::Result<()> {
    let counts = store::keys::counts(&mut *pool.acquire().await?).await?;
    let live: i64 = counts.live_by_kek.iter().map(|(_, n)| n).sum();
    anyhow::ensure!(
        (live > 0) == encrypted,
        "encryption {}, but the database holds {live} account keys",
        label(encrypted)
    );
    Ok(())
}

/// Ingest alone with encryption on or off, on a fresh database: the same deliveries as the ingest
/// scenario's first run, flat out.
async fn ingest(args: &Args, encrypted: bool) -> anyhow::Result<Report> {
    let url = fresh_database(args).await?;
    let (mut server, base) = start_server_with(&args.server, &url, "ingest", encrypted, &[])?;
    let measured = ingest_at(args, &base, &url, encrypted).await;
    stop_server(&mut server);
    let measured = measured?;
    store::migrate::drop_database(&url).await?;
    Ok(measured)
}

/// The ingest run against the server at `base` on `url`.
async fn ingest_at(args: &Args, base: &str, url: &str, encrypted: bool) -> anyhow::Result<Report> {
    wait_ready(base).await?;
    let deliveries = Arc::new(generate(&workload(args.seconds)));
    let sent = send(deliveries.clone(), &sending(base, args.connections, None)).await;
    eprintln!(
        "bench: ingest alone flat out, encryption {}: {}",
        label(encrypted),
        sent.summary()
    );
    anyhow::ensure!(
        sent.statuses.keys().all(|s| *s == 200),
        "ingest answered {:?}",
        sent.statuses
    );
    let pool = store::pool(url, &store::DbOptions::default())?;
    expect_deliveries(&pool, deliveries.len()).await?;
    expect_sealed(&pool, encrypted).await?;
    pool.close().await;
    Ok(sent)
}

/// One rebuild: the events refolded and how long the whole command took.
struct Rebuilt {
    events: usize,
    secs: f64,
}

impl Rebuilt {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }
}

/// `account-projector rebuild` with encryption on or off, of a log loaded on a fresh database
/// through the store with the matching vault.
async fn rebuild(args: &Args, encrypted: bool) -> anyhow::Result<Rebuilt> {
    let url = fresh_database(args).await?;
    let pool = pool(&url)?;
    let events = load_interleaved_with(
        &pool,
        &vault_for(encrypted),
        args.encryption_events,
        args.encryption_accounts,
    )
    .await?;
    {
        let mut conn = pool.acquire().await?;
        analyze(&mut conn).await;
    }
    expect_sealed(&pool, encrypted).await?;
    pool.close().await;
    let secs = crate::server::run_rebuild(&args.server, &url, encrypted)?;
    let rebuilt = Rebuilt { events, secs };
    eprintln!(
        "bench: rebuild of {events} events over {} accounts, encryption {}, in {secs:.1} s: {:.0} events/s",
        args.encryption_accounts,
        label(encrypted),
        rebuilt.rate()
    );
    store::migrate::drop_database(&url).await?;
    Ok(rebuilt)
}

/// Time travel with encryption on or off: one account of [`TIME_TRAVEL_EVENTS`] events loaded on
/// a fresh database, served by `serve` with every role; the times of the reads, sorted.
async fn time_travel(args: &Args, encrypted: bool) -> anyhow::Result<Vec<f64>> {
    let url = fresh_database(args).await?;
    let pool = pool(&url)?;
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    append_bodies_with(
        &pool,
        &vault_for(encrypted),
        refinements(account, user, TIME_TRAVEL_EVENTS),
    )
    .await?;
    expect_sealed(&pool, encrypted).await?;
    let (mut server, base) = start_server_with(&args.server, &url, "all", encrypted, &[])?;
    let measured = time_travel_at(&base, &pool, account, encrypted).await;
    stop_server(&mut server);
    let times = measured?;
    pool.close().await;
    store::migrate::drop_database(&url).await?;
    Ok(times)
}

/// The reads of `account` as of now against the server at `base`, once it has folded the log; the
/// first one, untimed, must show every event.
async fn time_travel_at(
    base: &str,
    pool: &store::PgPool,
    account: Uuid,
    encrypted: bool,
) -> anyhow::Result<Vec<f64>> {
    wait_ready(base).await?;
    wait_projected(pool).await?;
    let head = store::log::head(&mut *pool.acquire().await?).await?;
    // Every event was received before now (the database's clock is this machine's).
    let as_of = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let url = format!("{base}/v1/accounts/{account}?as_of={as_of}");
    let client = reqwest::Client::new();
    let response = client.get(&url).send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(
        status == 200,
        "time travel answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let view: Value = serde_json::from_slice(&body).context("an account view")?;
    anyhow::ensure!(
        view["version"].as_i64() == Some(TIME_TRAVEL_EVENTS as i64)
            && view["last_position"].as_i64() == Some(head),
        "time travel as of now folded version {} up to {} (expected {TIME_TRAVEL_EVENTS} up to {head})",
        view["version"],
        view["last_position"]
    );
    let times = time_travel_reads(&client, &url, TIME_TRAVEL_READS).await?;
    eprintln!(
        "bench: time travel over {TIME_TRAVEL_EVENTS} events, encryption {}: median {:.1} ms, max {:.1} ms",
        label(encrypted),
        times[TIME_TRAVEL_READS / 2],
        times[TIME_TRAVEL_READS - 1]
    );
    Ok(times)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::data::DATA_KEY;
    use crate::server::with_data_keys;

    #[test]
    fn the_data_loaded_is_sealed_as_the_servers_read_it() {
        assert!(vault_for(true).encrypts());
        assert!(!vault_for(false).encrypts());
        let mut on = Command::new("true");
        with_data_keys(&mut on, true);
        let mut off = Command::new("true");
        with_data_keys(&mut off, false);
        let envs = |c: &Command| {
            c.get_envs()
                .map(|(k, v)| {
                    let text = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
                    (text(k), v.map(text))
                })
                .collect::<std::collections::HashMap<_, _>>()
        };
        let (on, off) = (envs(&on), envs(&off));
        assert_eq!(on["DATA_KEYS"].as_deref(), Some(DATA_KEY));
        assert_eq!(off["DATA_KEYS"], None, "removed");
        assert_eq!(off["DATA_KEYS_FILE"], None, "removed");
        assert_eq!(off["ALLOW_PLAINTEXT_LOG"].as_deref(), Some("true"));
    }
}
