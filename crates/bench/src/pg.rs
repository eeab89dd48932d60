//! Postgres's own tools: pgbench and psql, run as processes, and the URLs of the bench's databases.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// `base` (a URL naming any database) with `database` instead.
pub fn url_for(base: &str, database: &str) -> String {
    let (prefix, _) = base.rsplit_once('/').expect("the URL names a database");
    format!("{prefix}/{database}")
}

/// Runs pgbench with `script`: transactions/s.
pub fn pgbench(url: &str, script: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    Ok(pgbench_run(url, script, clients, seconds, &[])?.0)
}

/// Runs pgbench with `script` and `-D` variables: (transactions/s, transactions).
pub fn pgbench_run(
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
pub fn psql_file(url: &str, script: &str, variables: &[(&str, &str)]) -> anyhow::Result<()> {
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
