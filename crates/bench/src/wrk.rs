//! `wrk`, a C client as light as pgbench's, driving the service with the scripts in `benches/wrk/`.
//! Every runner answers `None` when wrk is not installed, and the bench skips its rows.

use std::process::Command;

use anyhow::Context;
use uuid::Uuid;

use crate::server::SECRET;

/// `wrk` over every account for `seconds` with `connections`: (requests/s, p99 ms), or `None`
/// when wrk is not installed.
pub fn wrk_accounts(
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
pub fn wrk_ingest(
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
