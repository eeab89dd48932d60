//! `bench`: the one-run benchmark. On fresh databases, measures Postgres's own ceiling (pgbench, same
//! payload, same concurrency) and then the service against it, and prints a table ready for
//! BENCHMARKS.md (also written to `target/bench-report.md`).
//!
//! Run from the repository root after `cargo build --release`: `./target/release/bench`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use loadgen::{Report, Sending, Workload, drive, generate, send};
use uuid::Uuid;

const SECRET: &str = "bench_webhook_secret";

/// The servers' logs (warnings and errors), appended to by every run.
const SERVER_LOG: &str = "target/bench-server.log";

/// Connections of the ingest run that saturates the machine.
const SATURATION_CONNECTIONS: usize = 256;

/// CPU ticks of the whole machine so far (Linux `/proc/stat`).
#[derive(Clone, Copy)]
struct MachineTicks {
    /// The machine's own work: user, nice, system, irq and softirq.
    busy: u64,
    /// Time the host ran something else while this machine had work (virtual machines).
    steal: u64,
    /// All of the above plus idle and iowait.
    total: u64,
}

fn cpu_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    if ticks.len() < 8 {
        return None;
    }
    Some(MachineTicks {
        busy: ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6],
        steal: ticks[7],
        total: ticks[..8].iter().sum(),
    })
}

/// CPU ticks this process (the load generator) has used so far, user and system (Linux `/proc`).
fn own_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command name in parentheses: state is field 3, utime and stime fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The machine's and this process's CPU counters at one moment.
struct CpuMark {
    machine: Option<MachineTicks>,
    own: Option<u64>,
}

/// Shares of the machine's time between two moments.
struct CpuShares {
    /// The machine's own work, all processes.
    busy: f64,
    /// Taken by the host: the machine had that much less CPU than its cores.
    steal: f64,
    /// This process (the load generator); `None` where `/proc/self/stat` cannot be read.
    own: Option<f64>,
}

impl CpuMark {
    fn now() -> Self {
        Self {
            machine: cpu_ticks(),
            own: own_cpu_ticks(),
        }
    }

    /// Since the mark; `None` where the machine's counters cannot be read.
    fn shares(&self) -> Option<CpuShares> {
        let later = Self::now();
        let (after, before) = later.machine.zip(self.machine)?;
        let total = (after.total - before.total).max(1) as f64;
        Some(CpuShares {
            busy: (after.busy - before.busy) as f64 / total,
            steal: (after.steal - before.steal) as f64 / total,
            own: later
                .own
                .zip(self.own)
                .map(|(own1, own0)| (own1 - own0) as f64 / total),
        })
    }
}

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
}

struct Row {
    measure: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
}

fn row(measure: &str, value: String, baseline: &str, ratio: Option<f64>, target: &str) -> Row {
    Row {
        measure: measure.into(),
        value,
        baseline: baseline.into(),
        ratio: ratio
            .map(|r| format!("{r:.2}×"))
            .unwrap_or_else(|| "–".into()),
        target: target.into(),
    }
}

fn url_for(base: &str, database: &str) -> String {
    let (prefix, _) = base.rsplit_once('/').expect("the URL names a database");
    format!("{prefix}/{database}")
}

fn pgbench(url: &str, script: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    Ok(pgbench_run(url, script, clients, seconds, &[])?.0)
}

/// Runs pgbench with `script` and `-D` variables: (transactions/s, transactions).
fn pgbench_run(
    url: &str,
    script: &str,
    clients: usize,
    seconds: u64,
    variables: &[(&str, String)],
) -> anyhow::Result<(f64, u64)> {
    let defines = variables
        .iter()
        .flat_map(|(name, value)| ["-D".to_string(), format!("{name}={value}")]);
    let output = Command::new("pgbench")
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &seconds.to_string(),
            "-f",
            script,
        ])
        .args(defines)
        .arg(url)
        .output()
        .context("pgbench must be installed (Debian: postgresql-contrib or postgresql-client)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    let tps = field("tps = ").and_then(|v| v.parse().ok());
    let transactions =
        field("number of transactions actually processed: ").and_then(|v| v.parse().ok());
    let failed = field("number of failed transactions: ").is_some_and(|v| v != "0");
    match (tps, transactions) {
        (Some(tps), Some(transactions)) if output.status.success() && !failed => {
            Ok((tps, transactions))
        }
        _ => bail!(
            "pgbench failed or printed no tps: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Runs a psql script on `url`, with `-v` variables, stopping at its first error.
fn psql_file(url: &str, script: &str, variables: &[(&str, &str)]) -> anyhow::Result<()> {
    let status = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-f", script])
        .args(
            variables
                .iter()
                .flat_map(|(name, value)| ["-v".to_string(), format!("{name}={value}")]),
        )
        .arg(url)
        .stdout(Stdio::null())
        .status()
        .context("psql must be installed")?;
    anyhow::ensure!(status.success(), "psql -f {script} failed");
    Ok(())
}

/// The log's own append without HTTP (`benches/pgbench/append.sql`): `clients` pgbench clients,
/// each call appending `group` new deliveries. Checks that the log grew by exactly that many events
/// and returns deliveries/s.
/// `search_path`, when given, is the session's (e.g. to call `benches/pgbench/unordered.sql`'s
/// function instead).
async fn append_alone(
    url: &str,
    search_path: Option<&str>,
    clients: usize,
    group: usize,
    seconds: u64,
) -> anyhow::Result<f64> {
    let pool = store::pool(url, &store::DbOptions::default())?;
    let before = store::log::counts(&mut *pool.acquire().await?).await?;
    let session = match search_path {
        Some(path) => format!(
            "{url}{}options=-csearch_path%3D{}",
            if url.contains('?') { '&' } else { '?' },
            path.replace(',', "%2C")
        ),
        None => url.to_owned(),
    };
    let (tps, calls) = pgbench_run(
        &session,
        "benches/pgbench/append.sql",
        clients,
        seconds,
        &[("group", group.to_string())],
    )?;
    let after = store::log::counts(&mut *pool.acquire().await?).await?;
    pool.close().await;
    anyhow::ensure!(
        after.events - before.events == calls as i64 * group as i64,
        "{calls} calls of {group} new deliveries left {} new events",
        after.events - before.events
    );
    Ok(tps * group as f64)
}

fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// `wrk` over every account for `seconds` with `connections`: (requests/s, p99 ms), or `None`
/// when wrk is not installed.
fn wrk_accounts(
    base: &str,
    accounts: &[Uuid],
    connections: usize,
    seconds: u64,
) -> anyhow::Result<Option<(f64, f64)>> {
    let ids = std::env::temp_dir().join(format!("bench-ids-{}", std::process::id()));
    std::fs::write(
        &ids,
        accounts
            .iter()
            .map(|a| format!("{a}\n"))
            .collect::<String>(),
    )?;
    let result = wrk(
        base,
        "benches/wrk/accounts.lua",
        ("WRK_IDS_FILE", &ids),
        connections,
        seconds,
    );
    let _ = std::fs::remove_file(&ids);
    result
}

/// `wrk` POSTing `deliveries`, signed, each once, for `seconds` with `connections`:
/// (requests/s, p99 ms), or `None` when wrk is not installed.
fn wrk_ingest(
    base: &str,
    deliveries: &[loadgen::Delivery],
    connections: usize,
    seconds: u64,
) -> anyhow::Result<Option<(f64, f64)>> {
    let path = std::env::temp_dir().join(format!("bench-requests-{}", std::process::id()));
    loadgen::write_requests(deliveries, SECRET, &path)?;
    let result = wrk(
        base,
        "benches/wrk/ingest.lua",
        ("WRK_REQUESTS_FILE", &path),
        connections,
        seconds,
    );
    let _ = std::fs::remove_file(&path);
    result
}

/// Runs `wrk -t2` with `script` (told its thread count), the file it reads named by `input`:
/// (requests/s, p99 ms), or `None` when wrk is not installed. Fails on any answer but 2xx, and when
/// the script ran out of distinct requests.
fn wrk(
    base: &str,
    script: &str,
    input: (&str, &std::path::Path),
    connections: usize,
    seconds: u64,
) -> anyhow::Result<Option<(f64, f64)>> {
    const THREADS: usize = 2;
    let output = Command::new("wrk")
        .args([
            &format!("-t{THREADS}"),
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
            script,
            &format!("{base}/"),
            "--",
            &THREADS.to_string(),
        ])
        .env(input.0, input.1)
        .output();
    let Ok(output) = output else {
        eprintln!("bench: wrk is not installed; skipping its rows");
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success() && !text.contains("Non-2xx") && !text.contains("WRAPPED"),
        "wrk ({script}) failed or saw errors: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .map(str::to_owned)
    };
    let rps: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("wrk printed no rate: {text}"))?;
    let p99 = field("99%")
        .and_then(|v| wrk_ms(&v))
        .with_context(|| format!("wrk printed no p99: {text}"))?;
    Ok(Some((rps, p99)))
}

/// wrk's `1.23ms` / `456.00us` / `1.20s` in milliseconds.
fn wrk_ms(value: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = value.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

/// Starts `serve --role <role>` on a free port; returns the process and its base URL.
fn start_server(
    binary: &str,
    database_url: &str,
    role: &str,
) -> anyhow::Result<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server = Command::new(binary)
        .args(["serve", "--no-migrate", "--role", role])
        .env("DATABASE_URL", database_url)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("ARGYLE_WEBHOOK_SECRETS", SECRET)
        .env("DATABASE_MAX_CONNECTIONS", "32")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(server_log()?)
        .spawn()
        .with_context(|| format!("could not start {binary} (cargo build --release first)"))?;
    Ok((server, format!("http://127.0.0.1:{port}")))
}

/// Where the servers' logs go (appended): [`SERVER_LOG`]. The run with a wrong signature alone
/// logs a warning per request, which would bury the table.
fn server_log() -> anyhow::Result<std::fs::File> {
    if let Some(dir) = std::path::Path::new(SERVER_LOG).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("could not create {dir:?}"))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(SERVER_LOG)
        .with_context(|| format!("could not open {SERVER_LOG}"))
}

/// SIGTERM, then wait for the exit.
fn stop_server(server: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
}

async fn wait_ready(base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(response) = reqwest::get(format!("{base}/readyz")).await
            && response.status() == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the service did not become ready")
}

async fn wait_projected(pool: &store::PgPool) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let head = store::log::head(&mut conn).await?;
    while store::snapshots::checkpoint(&mut conn, store::snapshots::CHECKPOINT).await? < head {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Appends `bodies` straight into the log through the store, in batches (for setting up data).
async fn append_bodies(
    pool: &store::PgPool,
    bodies: impl Iterator<Item = Vec<u8>>,
) -> anyhow::Result<usize> {
    let mut batch = Vec::with_capacity(1000);
    let mut count = 0;
    let mut conn = pool.acquire().await?;
    for body in bodies {
        let envelope = domain::Envelope::parse(&body)?;
        batch.push(store::log::Delivery::new(&body, None, &envelope));
        if batch.len() == 1000 {
            count += store::log::append_in(&mut conn, &batch, Duration::from_secs(86_400))
                .await?
                .len();
            batch.clear();
        }
    }
    count += store::log::append_in(&mut conn, &batch, Duration::from_secs(86_400))
        .await?
        .len();
    Ok(count)
}

fn refinements(account: Uuid, user: Uuid, count: usize) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(move |step| {
        let at = chrono::DateTime::parse_from_rfc3339("2026-03-02T15:04:11Z").unwrap() + chrono::Duration::milliseconds(step as i64);
        let resource = serde_json::json!({"id": account, "user": user, "updated_at": at.to_rfc3339(),
            "connection": {"status": "connected"}, "step": step, "pad": "x".repeat(1800)});
        loadgen::body("accounts.updated", account, user, Some(&resource))
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (c, s) = (args.connections, args.seconds);
    let mut rows = vec![];
    let admin = store::pool(&args.database_url, &store::DbOptions::default())?;
    let version = store::migrate::server_version(&admin).await?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let payload = std::fs::read("tests/fixtures/argyle/05_accounts.updated.json")
        .context("run from the repository root")?;
    eprintln!("bench: {cores} cores; {version}; server logs in {SERVER_LOG}");

    // 1. Postgres's own ceiling with the same payload and concurrency.
    let baseline_db = url_for(&args.database_url, "account_projector_bench_baseline");
    store::migrate::drop_database(&baseline_db).await?;
    store::migrate::migrate(&baseline_db).await?;
    psql_file(
        &baseline_db,
        "benches/pgbench/setup.sql",
        &[("body", &String::from_utf8_lossy(&payload))],
    )?;
    let insert_tps = pgbench(&baseline_db, "benches/pgbench/insert.sql", c, s)?;
    let insert_tps_1 = pgbench(&baseline_db, "benches/pgbench/insert.sql", 1, s.min(5))?;
    let select_tps = pgbench(&baseline_db, "benches/pgbench/select.sql", c, s)?;
    eprintln!(
        "bench: pgbench insert {insert_tps:.0}/s ({c} clients), {insert_tps_1:.0}/s (1 client); select {select_tps:.0}/s"
    );
    rows.push(row(
        &format!(
            "pgbench single-row INSERT, {} B payload, {c} clients",
            payload.len()
        ),
        format!("{insert_tps:.0}/s"),
        "",
        None,
        "",
    ));
    rows.push(row(
        "pgbench single-row INSERT, 1 client",
        format!("{insert_tps_1:.0}/s"),
        "",
        None,
        "",
    ));
    rows.push(row(
        &format!("pgbench SELECT by primary key, {c} clients"),
        format!("{select_tps:.0}/s"),
        "",
        None,
        "",
    ));
    // The log's own append at this concurrency, without HTTP: every group full (one client, `c`
    // new deliveries a call), the best case of group commit; then, as an experiment, appends that
    // overlap (no lock, no NOTIFY: not the service's guarantees), two clients of `c / 2`.
    let full_groups = append_alone(&baseline_db, None, 1, c, s).await?;
    psql_file(&baseline_db, "benches/pgbench/unordered.sql", &[])?;
    let overlapping = append_alone(
        &baseline_db,
        Some("bench_unordered,public"),
        2,
        (c / 2).max(1),
        s,
    )
    .await?;
    eprintln!(
        "bench: the log alone: {full_groups:.0} deliveries/s in full groups, {overlapping:.0}/s overlapping without the lock"
    );
    store::migrate::drop_database(&baseline_db).await?;

    // 2. Ingest alone: `serve --role ingest`, as the compose stack runs it, so that no projector
    // competes for the two cores while it is timed.
    let ingest_workload = Workload {
        accounts: 60 * s as usize,
        seed: 1,
        ..Workload::default()
    };
    let ingest_db = url_for(&args.database_url, "account_projector_bench_ingest");
    store::migrate::drop_database(&ingest_db).await?;
    store::migrate::migrate(&ingest_db).await?;
    let (mut server, base) = start_server(&args.server, &ingest_db, "ingest")?;
    let alone = async {
        wait_ready(&base).await?;
        let deliveries = Arc::new(generate(&ingest_workload));
        let sending = Sending {
            url: base.clone(),
            secret: SECRET.into(),
            connections: c,
            rate: None,
        };
        let alone = send(deliveries.clone(), &sending).await;
        eprintln!("bench: ingest alone flat out: {}", alone.summary());
        anyhow::ensure!(
            alone.statuses.keys().all(|s| *s == 200),
            "ingest answered {:?}",
            alone.statuses
        );
        // This role serves no /v1: count the log directly. Every 200 is an event or a redelivery.
        let pool = store::pool(&ingest_db, &store::DbOptions::default())?;
        let counts = store::log::counts(&mut *pool.acquire().await?).await?;
        anyhow::ensure!(
            counts.deliveries as usize == deliveries.len(),
            "the log holds {} deliveries, {} were acknowledged",
            counts.deliveries,
            deliveries.len()
        );

        // The same requests with a wrong signature: HTTP and the HMAC check, refused before the
        // database, which is what ingest costs without the append.
        let refused = send(
            deliveries.clone(),
            &Sending {
                secret: "not-the-secret".into(),
                ..sending.clone()
            },
        )
        .await;
        eprintln!("bench: refused at the signature: {}", refused.summary());
        anyhow::ensure!(
            refused.statuses.keys().all(|s| *s == 401),
            "refused requests were answered {:?}",
            refused.statuses
        );

        // Saturation: enough connections that the groups are large and the machine is busy, to
        // measure what a delivery costs in CPU across load generator, server and Postgres.
        let many = Arc::new(generate(&Workload {
            accounts: 3 * ingest_workload.accounts,
            seed: 4,
            ..ingest_workload.clone()
        }));
        let mark = CpuMark::now();
        let saturated = send(
            many.clone(),
            &Sending {
                connections: SATURATION_CONNECTIONS,
                ..sending.clone()
            },
        )
        .await;
        // Shares of the machine: busy in all, and busy in this process (the load generator; zero
        // where `/proc/self/stat` cannot be read).
        let busy = mark.shares().map(|s| (s.busy, s.own.unwrap_or(0.0)));
        eprintln!(
            "bench: ingest alone at {SATURATION_CONNECTIONS} connections: {}",
            saturated.summary()
        );
        anyhow::ensure!(
            saturated.statuses.keys().all(|s| *s == 200),
            "ingest answered {:?}",
            saturated.statuses
        );
        let counts = store::log::counts(&mut *pool.acquire().await?).await?;
        anyhow::ensure!(
            counts.deliveries as usize == deliveries.len() + many.len(),
            "the log holds {} deliveries, {} were acknowledged",
            counts.deliveries,
            deliveries.len() + many.len()
        );
        // The same kind of traffic from wrk, a C client like pgbench's, which leaves more of the
        // cores to server and Postgres. Enough new deliveries that none is sent twice.
        let enough = (alone.throughput() * 3.0 * s as f64) as usize;
        let fresh = generate(&Workload {
            accounts: enough / 30 + 1,
            seed: 5,
            ..ingest_workload.clone()
        });
        let with_wrk = wrk_ingest(&base, &fresh, c, s)?;
        if let Some((rps, _)) = with_wrk {
            eprintln!("bench: ingest alone with wrk: {rps:.0}/s");
            let after = store::log::counts(&mut *pool.acquire().await?).await?;
            // wrk counts the answers it read; the log holds at least those.
            anyhow::ensure!(
                after.deliveries as f64 >= counts.deliveries as f64 + rps * s as f64 * 0.99,
                "the log holds {} new deliveries; wrk saw about {:.0} accepted",
                after.deliveries - counts.deliveries,
                rps * s as f64
            );
        }
        pool.close().await;
        anyhow::Ok((alone, refused, saturated, busy, with_wrk))
    }
    .await;
    stop_server(&mut server);
    let (alone, refused, saturated, busy, with_wrk) = alone?;
    store::migrate::drop_database(&ingest_db).await?;
    rows.push(row(
        &format!("ingest alone (`--role ingest`): signed webhooks/s over HTTP, 200 after commit, {c} connections"),
        format!(
            "{:.0}/s (p99 {:.1} ms)",
            alone.throughput(),
            alone.latency_ms(0.99)
        ),
        &format!("{insert_tps:.0}/s"),
        Some(alone.throughput() / insert_tps),
        "≥ 1.5×",
    ));
    if let Some((rps, p99)) = with_wrk {
        rows.push(row(
            &format!("ingest alone with wrk (C client), the same kind of traffic signed beforehand, {c} connections"),
            format!("{rps:.0}/s (p99 {p99:.1} ms)"),
            &format!("{insert_tps:.0}/s"),
            Some(rps / insert_tps),
            "≥ 1.5×",
        ));
    }
    rows.push(row(
        &format!("the same requests with a wrong signature: HTTP and HMAC check only, 401 before the database, {c} connections"),
        format!("{:.0}/s", refused.throughput()),
        &format!("{insert_tps:.0}/s"),
        Some(refused.throughput() / insert_tps),
        "",
    ));
    rows.push(row(
        &format!("the log alone, no HTTP: pgbench, 1 client calling `append_webhooks` with {c} new deliveries each (every group full: group commit's best case at {c} in flight)"),
        format!("{full_groups:.0}/s"),
        &format!("{insert_tps:.0}/s"),
        Some(full_groups / insert_tps),
        "",
    ));
    rows.push(row(
        &format!("the same without the append lock and NOTIFY, 2 clients of {}: appends that overlap (an experiment; positions neither dense nor in commit order)", (c / 2).max(1)),
        format!("{overlapping:.0}/s"),
        &format!("{insert_tps:.0}/s"),
        Some(overlapping / insert_tps),
        "",
    ));
    rows.push(row(
        &format!("ingest alone, {SATURATION_CONNECTIONS} connections"),
        format!(
            "{:.0}/s (p99 {:.1} ms)",
            saturated.throughput(),
            saturated.latency_ms(0.99)
        ),
        &format!("{insert_tps:.0}/s"),
        Some(saturated.throughput() / insert_tps),
        "",
    ));
    if let Some((busy, client)) = busy {
        // CPU seconds per delivery, all cores together. Without the load generator's share (as if
        // the client cost nothing), fully busy cores give server and Postgres no more than
        // `cores / served` deliveries a second, whatever the log's design.
        let per_delivery = busy * cores as f64 / saturated.throughput();
        let client_share = client * cores as f64 / saturated.throughput();
        let served = (per_delivery - client_share).max(f64::EPSILON);
        let ceiling = cores as f64 / served;
        rows.push(row(
            "CPU per delivery at that load: all processes, of which the load generator; the rate server and Postgres alone would give with every core busy and a client that cost nothing",
            format!(
                "{:.0} µs ({:.0}% busy), {:.0} µs load generator: at most {ceiling:.0}/s",
                per_delivery * 1e6,
                busy * 100.0,
                client_share * 1e6,
            ),
            &format!("{insert_tps:.0}/s"),
            Some(ceiling / insert_tps),
            "",
        ));
    }

    // 3. The service with every role, in its own process, on a fresh database.
    let service_db = url_for(&args.database_url, "account_projector_bench");
    store::migrate::drop_database(&service_db).await?;
    store::migrate::migrate(&service_db).await?;
    let (mut server, base) = start_server(&args.server, &service_db, "all")?;
    let result = async {
        wait_ready(&base).await?;
        let pool = store::pool(&service_db, &store::DbOptions::default())?;
        let sending = |rate| Sending {
            url: base.clone(),
            secret: SECRET.into(),
            connections: c,
            rate,
        };

        // Ingest flat out, with the projector folding at the same time.
        let deliveries = Arc::new(generate(&ingest_workload));
        let flat = send(deliveries.clone(), &sending(None)).await;
        eprintln!("bench: ingest flat out: {}", flat.summary());
        anyhow::ensure!(
            flat.statuses.keys().all(|s| *s == 200),
            "ingest answered {:?}",
            flat.statuses
        );
        loadgen::verify(&base, None, &deliveries, &flat.acks).await?;
        rows.push(row(
            &format!("ingest with the projector folding (all roles), {c} connections"),
            format!(
                "{:.0}/s (p99 {:.1} ms)",
                flat.throughput(),
                flat.latency_ms(0.99)
            ),
            &format!("{insert_tps:.0}/s"),
            Some(flat.throughput() / insert_tps),
            "≥ 1.5×",
        ));

        // Ingest at a fixed 2,000/s.
        let steady = Workload {
            accounts: (2000 * s as usize) / 27 + 1,
            seed: 2,
            ..Workload::default()
        };
        let deliveries = Arc::new(
            generate(&steady)
                .into_iter()
                .take(2000 * s as usize)
                .collect::<Vec<_>>(),
        );
        let mark = CpuMark::now();
        let fixed = send(deliveries, &sending(Some(2000.0))).await;
        // How much of the machine the row had: when the host stalls a virtual machine, requests
        // queue meanwhile and the time shows here as steal.
        let shares = mark.shares().map_or_else(String::new, |s| {
            format!(
                " (machine busy {:.0}%, host steal {:.0}%, the load generator {:.0}%)",
                s.busy * 100.0,
                s.steal * 100.0,
                s.own.unwrap_or(0.0) * 100.0
            )
        });
        eprintln!("bench: ingest at 2,000/s: {}{shares}", fixed.summary());
        rows.push(row(
            "ingest at 2,000/s: latency p50 / p99 (the machine's CPU during the row)",
            format!(
                "{:.1} / {:.1} ms{shares}",
                fixed.latency_ms(0.5),
                fixed.latency_ms(0.99)
            ),
            "",
            None,
            "p99 < 20 ms",
        ));
        wait_projected(&pool).await?;

        // Projection lag at a steady 1,000 events/s: from the 200 (commit) to the checkpoint
        // notification that covers the event.
        let mut notifications = store::snapshots::CheckpointNotifications::subscribe(&pool).await?;
        let seen = Arc::new(std::sync::Mutex::new(Vec::<(Instant, i64)>::new()));
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
        let steady = send(deliveries, &sending(Some(1000.0))).await;
        wait_projected(&pool).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        recorder.abort();
        let seen = seen.lock().expect("no poison").clone();
        let mut lag = hdrhistogram::Histogram::<u64>::new(3)?;
        for ack in steady.acks.iter().filter(|a| !a.duplicate) {
            if let Some((at, _)) = seen.iter().find(|(_, position)| *position >= ack.position) {
                lag.record(at.saturating_duration_since(ack.at).as_micros().max(1) as u64)?;
            }
        }
        let lag_ms = |q: f64| lag.value_at_quantile(q) as f64 / 1000.0;
        eprintln!(
            "bench: projection lag over {} events: p50 {:.1} ms, p99 {:.1} ms",
            lag.len(),
            lag_ms(0.5),
            lag_ms(0.99)
        );
        rows.push(row(
            "projection lag at 1,000 events/s (commit → snapshot visible): p50 / p99",
            format!("{:.1} / {:.1} ms", lag_ms(0.5), lag_ms(0.99)),
            "",
            None,
            "p99 < 50 ms",
        ));

        // Queries.
        let accounts: Arc<Vec<Uuid>> = Arc::new(
            generate(&ingest_workload)
                .iter()
                .map(|d| d.account)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        );
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(c)
            .build()?;
        let get = |count: usize, rate: Option<f64>| {
            let (client, base, accounts) = (client.clone(), base.clone(), accounts.clone());
            drive(count, c, rate, move |i| {
                let (client, base, accounts) = (client.clone(), base.clone(), accounts.clone());
                async move {
                    let url = format!("{base}/v1/accounts/{}", accounts[i % accounts.len()]);
                    match client.get(url).send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let _ = response.bytes().await;
                            (status, None)
                        }
                        Err(_) => (0, None),
                    }
                }
            })
        };
        let mark = CpuMark::now();
        let flat: Report = get(select_tps as usize * s as usize / 2, None).await;
        // The load generator's share of the machine while it ran.
        let client_share = mark.shares().and_then(|s| s.own);
        eprintln!("bench: GET flat out: {}", flat.summary());
        let fixed: Report = get(1000 * s as usize, Some(1000.0)).await;
        eprintln!("bench: GET at 1,000/s: {}", fixed.summary());
        rows.push(row(
            &format!(
                "GET /v1/accounts/{{id}}, {c} connections (the Rust load generator; its share of the machine's CPU)"
            ),
            match client_share {
                Some(share) => format!("{:.0}/s ({:.0}%)", flat.throughput(), share * 100.0),
                None => format!("{:.0}/s", flat.throughput()),
            },
            &format!("{select_tps:.0}/s"),
            Some(flat.throughput() / select_tps),
            "≥ 0.7×",
        ));
        // The same with a C client (wrk), when installed: pgbench's baseline is a C client too,
        // and a lighter client leaves more of the two cores to the server.
        if let Some((rps, p99)) = wrk_accounts(&base, &accounts, c, s)? {
            eprintln!("bench: GET with wrk: {rps:.0}/s, p99 {p99:.2} ms");
            rows.push(row(
                &format!("GET /v1/accounts/{{id}} with wrk (C client), {c} connections"),
                format!("{rps:.0}/s (p99 {p99:.2} ms)"),
                &format!("{select_tps:.0}/s"),
                Some(rps / select_tps),
                "≥ 0.7×",
            ));
        }
        rows.push(row(
            "GET at 1,000/s: latency p50 / p99",
            format!(
                "{:.2} / {:.2} ms",
                fixed.latency_ms(0.5),
                fixed.latency_ms(0.99)
            ),
            "",
            None,
            "p99 < 5 ms",
        ));

        // Time travel over one account with 10,000 events.
        let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
        append_bodies(&pool, refinements(account, user, 10_000)).await?;
        wait_projected(&pool).await?;
        let mut conn = pool.acquire().await?;
        let head = store::log::head(&mut conn).await?;
        drop(conn);
        let mut times = vec![];
        for _ in 0..20 {
            let started = Instant::now();
            let response = client
                .get(format!("{base}/v1/accounts/{account}?at_position={head}"))
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == 200,
                "time travel answered {}",
                response.status()
            );
            let _ = response.bytes().await?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        eprintln!(
            "bench: time travel over 10,000 events: median {:.1} ms, max {:.1} ms",
            times[10], times[19]
        );
        rows.push(row(
            "time travel over an account with 10,000 events: median / max of 20",
            format!("{:.1} / {:.1} ms", times[10], times[19]),
            "",
            None,
            "< 100 ms",
        ));

        let rss = peak_rss_mb(server.id()).unwrap_or(f64::NAN);
        rows.push(row(
            "peak RSS of the server (all roles) over the runs above",
            format!("{rss:.1} MB"),
            "",
            None,
            "< 100 MB",
        ));
        anyhow::Ok(())
    }
    .await;
    stop_server(&mut server);
    result?;
    store::migrate::drop_database(&service_db).await?;

    // 4. Rebuild: the log of many accounts, refolded by `account-projector rebuild`.
    let rebuild_db = url_for(&args.database_url, "account_projector_bench_rebuild");
    store::migrate::drop_database(&rebuild_db).await?;
    store::migrate::migrate(&rebuild_db).await?;
    let pool = store::pool(
        &rebuild_db,
        &store::DbOptions {
            statement_timeout: Duration::ZERO,
            ..store::DbOptions::default()
        },
    )?;
    let per_account = args.rebuild_events.div_ceil(args.rebuild_accounts);
    let ids: Vec<(Uuid, Uuid)> = (0..args.rebuild_accounts)
        .map(|_| (Uuid::new_v4(), Uuid::new_v4()))
        .collect();
    let started = Instant::now();
    // Interleave accounts as live traffic does: step by step across all of them.
    let bodies = (0..per_account).flat_map(|step| {
        ids.iter().map(move |(account, user)| {
            let at = chrono::DateTime::parse_from_rfc3339("2026-03-02T15:04:11Z").unwrap() + chrono::Duration::milliseconds(step as i64);
            let resource = serde_json::json!({"id": account, "user": user, "updated_at": at.to_rfc3339(),
                "connection": {"status": "connected"}, "step": step, "pad": "x".repeat(1800)});
            loadgen::body("accounts.updated", *account, *user, Some(&resource))
        })
    });
    let appended = append_bodies(&pool, bodies.take(args.rebuild_events)).await?;
    let load_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "bench: loaded {appended} events in {load_secs:.1} s ({:.0}/s through append_webhooks, batches of 1,000)",
        appended as f64 / load_secs
    );
    {
        let mut conn = pool.acquire().await?;
        sqlx_analyze(&mut conn).await;
    }
    let started = Instant::now();
    let status = Command::new(&args.server)
        .args(["rebuild"])
        .env("DATABASE_URL", &rebuild_db)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "rebuild failed");
    let secs = started.elapsed().as_secs_f64();
    let rate = appended as f64 / secs;
    eprintln!(
        "bench: rebuild of {appended} events over {} accounts in {secs:.1} s: {rate:.0} events/s",
        args.rebuild_accounts
    );
    rows.push(row(
        &format!(
            "rebuild: {appended} events over {} accounts, whole command",
            args.rebuild_accounts
        ),
        format!("{rate:.0} events/s ({secs:.1} s)"),
        "",
        None,
        "≥ 100,000/s",
    ));
    store::migrate::drop_database(&rebuild_db).await?;

    let mut table = format!(
        "Machine: {cores} cores; {version}\nConcurrency {c}; timed runs of {s} s.\n\n| measure | value | baseline | ratio | target |\n|---|---|---|---|---|\n"
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.measure, r.value, r.baseline, r.ratio, r.target
        ));
    }
    println!("{table}");
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-report.md", &table)?;
    Ok(())
}

/// Fresh statistics, as autovacuum would have gathered on a live system.
async fn sqlx_analyze(conn: &mut store::PgConnection) {
    let _ = store::analyze(conn).await;
}
