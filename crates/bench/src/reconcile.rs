//! 5. Reconcile: `account-projector reconcile` against a fake Argyle in this process listing a
//!    tenth of `reconcile_accounts` and then all of them, on fresh databases: the command's peak
//!    RSS at both sizes (flat: the listing is paged, never held whole) and its accounts/s.

use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::Args;
use crate::machine::peak_rss_mb;
use crate::pg::url_for;
use crate::report::{Row, row};

/// The account object the fake Argyle lists, with its `id`, `user` and `updated_at` replaced.
const TEMPLATE: &str = "tests/fixtures/real-deliveries/api/list_accounts.json";
/// The API key the command is given and the fake Argyle expects.
const KEY_ID: &str = "bench-key";
const KEY_SECRET: &str = "bench-secret";
/// `Basic` + base64 of `KEY_ID:KEY_SECRET`.
const AUTHORIZATION: &str = "Basic YmVuY2gta2V5OmJlbmNoLXNlY3JldA==";
/// Requests per second the command may make: high, so that pacing does not dominate.
const RATE: &str = "1000";
/// How often the command's peak RSS is read while it runs.
const RSS_EVERY: Duration = Duration::from_millis(50);

/// One run of the command.
struct Run {
    accounts: usize,
    peak_rss_mb: f64,
    secs: f64,
}

/// Runs the command with Argyle listing a tenth of `reconcile_accounts`, then all; pushes the rows.
pub async fn run(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.reconcile_accounts >= 10,
        "--reconcile-accounts must be at least 10 (the first run lists a tenth of them)"
    );
    let template = template()?;
    let small = measure(args, &template, args.reconcile_accounts / 10).await?;
    let large = measure(args, &template, args.reconcile_accounts).await?;
    let ratio = large.peak_rss_mb / small.peak_rss_mb;
    let rate = large.accounts as f64 / large.secs;
    rows.push(row(
        &format!(
            "reconcile: peak RSS of the command, Argyle listing {} accounts",
            small.accounts
        ),
        format!("{:.1} MB", small.peak_rss_mb),
        "",
        None,
        "",
    ));
    rows.push(row(
        &format!(
            "reconcile: peak RSS of the command, Argyle listing {} accounts",
            large.accounts
        ),
        format!("{:.1} MB", large.peak_rss_mb),
        &format!("{:.1} MB ({} accounts)", small.peak_rss_mb, small.accounts),
        Some(ratio),
        "≤ 1.5× (flat)",
    ));
    rows.push(row(
        &format!(
            "reconcile: {} new accounts listed and appended, whole command (--rate {RATE})",
            large.accounts
        ),
        format!("{rate:.0} accounts/s ({:.1} s)", large.secs),
        "",
        None,
        "",
    ));
    Ok(())
}

/// The first account object of [`TEMPLATE`].
fn template() -> anyhow::Result<Map<String, Value>> {
    let text = std::fs::read_to_string(TEMPLATE).context("run from the repository root")?;
    let page: Value = serde_json::from_str(&text).context(TEMPLATE)?;
    match &page["results"][0] {
        Value::Object(account) => Ok(account.clone()),
        _ => anyhow::bail!("{TEMPLATE} lists no account object"),
    }
}

/// Reconciles `accounts` listed accounts on a fresh database; checks that each became one event.
async fn measure(
    args: &Args,
    template: &Map<String, Value>,
    accounts: usize,
) -> anyhow::Result<Run> {
    let reconcile_db = url_for(&args.database_url, "account_projector_bench_reconcile");
    store::migrate::drop_database(&reconcile_db).await?;
    store::migrate::migrate(&reconcile_db).await?;
    let (argyle, api_url) = fake_argyle(template.clone(), accounts).await?;
    let result = reconcile(args, &reconcile_db, &api_url).await;
    argyle.abort();
    let (peak_rss_mb, secs) = result?;
    let pool = store::pool(&reconcile_db, &store::DbOptions::default())?;
    let events = {
        let mut conn = pool.acquire().await?;
        store::log::counts(&mut conn).await?.events
    };
    pool.close().await;
    anyhow::ensure!(
        events == accounts as i64,
        "reconcile of {accounts} listed accounts left {events} events in the log"
    );
    eprintln!(
        "bench: reconcile of {accounts} accounts in {secs:.1} s ({:.0} accounts/s), peak RSS {peak_rss_mb:.1} MB",
        accounts as f64 / secs
    );
    store::migrate::drop_database(&reconcile_db).await?;
    Ok(Run {
        accounts,
        peak_rss_mb,
        secs,
    })
}

/// Runs `reconcile` against the Argyle at `api_url`, reading its peak RSS every [`RSS_EVERY`]
/// while it runs: (the last peak read before it exited, in MB; seconds of the whole command).
async fn reconcile(args: &Args, database_url: &str, api_url: &str) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let mut command = Command::new(&args.server);
    crate::server::with_data_keys(&mut command, true);
    let mut child = command
        .args(["reconcile", "--rate", RATE])
        .env("DATABASE_URL", database_url)
        .env("ARGYLE_API_URL", api_url)
        .env("ARGYLE_API_KEY_ID", KEY_ID)
        .env("ARGYLE_API_KEY_SECRET", KEY_SECRET)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "could not start {} (cargo build --release first)",
                args.server
            )
        })?;
    // The summary on stdout, read as it comes so that the pipe never fills.
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let summary = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let pid = child.id();
    let mut peak = None;
    let status = loop {
        // VmHWM only grows; read before checking for the exit, which takes it away.
        if let Some(mb) = peak_rss_mb(pid) {
            peak = Some(mb);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(RSS_EVERY).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let summary = summary.join().unwrap_or_default();
    anyhow::ensure!(status.success(), "reconcile failed ({status}): {summary}");
    let peak = peak.context("could not read the peak RSS of reconcile from /proc")?;
    Ok((peak, secs))
}

/// The fake Argyle's listing: `total` accounts made from the template a page at a time, account
/// `i` (from 0) with the ids `Uuid::from_u128(i + 1)` (account) and `from_u128(2^64 + i + 1)`
/// (user). The cursor is the offset of the page's first account.
struct Listing {
    template: Map<String, Value>,
    total: usize,
    updated_at: String,
    /// `http://127.0.0.1:PORT`, the origin of the `next` links.
    origin: String,
}

impl Listing {
    fn account(&self, i: usize) -> Value {
        let mut account = self.template.clone();
        account.insert("id".into(), json!(Uuid::from_u128(i as u128 + 1)));
        account.insert(
            "user".into(),
            json!(Uuid::from_u128((1 << 64) + i as u128 + 1)),
        );
        account.insert("updated_at".into(), json!(self.updated_at));
        Value::Object(account)
    }
}

/// Serves `GET /v2/accounts` on a free loopback port; returns the server's task and the API URL.
async fn fake_argyle(
    template: Map<String, Value>,
    total: usize,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, String)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin = format!("http://{}", listener.local_addr()?);
    let listing = Arc::new(Listing {
        template,
        total,
        updated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        origin: origin.clone(),
    });
    let app = axum::Router::new()
        .route("/v2/accounts", axum::routing::get(accounts_page))
        .with_state(listing);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((server, format!("{origin}/v2")))
}

/// One page of `GET /v2/accounts?limit=L&cursor=C`, generated on request.
async fn accounts_page(
    State(listing): State<Arc<Listing>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) != Some(AUTHORIZATION.as_bytes()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let number = |name: &str| query.get(name).and_then(|v| v.parse::<usize>().ok());
    let limit = number("limit").unwrap_or(10).clamp(1, 200);
    let start = number("cursor").unwrap_or(0).min(listing.total);
    let end = (start + limit).min(listing.total);
    let results: Vec<Value> = (start..end).map(|i| listing.account(i)).collect();
    let next = (end < listing.total)
        .then(|| format!("{}/v2/accounts?limit={limit}&cursor={end}", listing.origin));
    let page = json!({"next": next, "previous": null, "results": results});
    let body = serde_json::to_vec(&page).expect("a page serialises");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
