//! The service under test: the release binary started as `serve --role <role>` on a free port,
//! waited for, and stopped with SIGTERM; its log; how the load generator reaches it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use loadgen::Sending;

/// The webhook secret the servers are started with and the deliveries are signed with.
pub const SECRET: &str = "bench_webhook_secret";

/// The servers' logs (warnings and errors), appended to by every run.
pub const SERVER_LOG: &str = "target/bench-server.log";

/// Starts `serve --role <role>` on a free port, with encryption at rest ([`DATA_KEY`]); returns the
/// process and its base URL.
///
/// [`DATA_KEY`]: crate::data::DATA_KEY
pub fn start_server(
    binary: &str,
    database_url: &str,
    role: &str,
) -> anyhow::Result<(std::process::Child, String)> {
    start_server_with(binary, database_url, role, true, &[])
}

/// [`start_server`], with encryption at rest on (`encrypted`) or off (see [`with_data_keys`]),
/// and the settings in `env` besides.
pub fn start_server_with(
    binary: &str,
    database_url: &str,
    role: &str,
    encrypted: bool,
    env: &[(&str, &str)],
) -> anyhow::Result<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = Command::new(binary);
    server
        .args(["serve", "--no-migrate", "--role", role])
        .env("DATABASE_URL", database_url)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("ARGYLE_WEBHOOK_SECRETS", SECRET)
        // The query API without a token, on loopback only: the load generator reads it without one.
        .env("ALLOW_OPEN_API", "true")
        .env("DATABASE_MAX_CONNECTIONS", "32")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    let server = with_data_keys(&mut server, encrypted)
        .stdin(Stdio::null())
        .stderr(server_log()?)
        .spawn()
        .with_context(|| format!("could not start {binary} (cargo build --release first)"))?;
    Ok((server, format!("http://127.0.0.1:{port}")))
}

/// Sets encryption at rest on `command` (the service binary, any subcommand): on (`encrypted`),
/// `DATA_KEYS` = [`DATA_KEY`], what [`crate::data::vault`] seals with; off, no `DATA_KEYS` and
/// `ALLOW_PLAINTEXT_LOG=true`, what [`store::keys::Vault::plaintext`] writes.
///
/// [`DATA_KEY`]: crate::data::DATA_KEY
pub fn with_data_keys(command: &mut Command, encrypted: bool) -> &mut Command {
    command.env_remove("DATA_KEYS").env_remove("DATA_KEYS_FILE");
    match encrypted {
        true => command.env("DATA_KEYS", crate::data::DATA_KEY),
        false => command.env("ALLOW_PLAINTEXT_LOG", "true"),
    }
}

/// Runs `account-projector rebuild` of the database at `url` to its end, with encryption on or
/// off; returns how long the whole command took, in seconds.
pub fn run_rebuild(server: &str, url: &str, encrypted: bool) -> anyhow::Result<f64> {
    let mut command = Command::new(server);
    with_data_keys(&mut command, encrypted);
    let started = std::time::Instant::now();
    let status = command
        .args(["rebuild"])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| anyhow::anyhow!("could not run {server} rebuild: {e}"))?;
    anyhow::ensure!(status.success(), "rebuild failed");
    Ok(started.elapsed().as_secs_f64())
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
pub fn stop_server(server: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = server.wait();
}

/// Waits (a minute at most) until `GET {base}/readyz` answers 200.
pub async fn wait_ready(base: &str) -> anyhow::Result<()> {
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

/// Signed deliveries to the server at `base`, `connections` in flight, at `rate` or flat out.
pub fn sending(base: &str, connections: usize, rate: Option<f64>) -> Sending {
    Sending {
        url: base.to_owned(),
        secret: SECRET.into(),
        connections,
        rate,
    }
}
