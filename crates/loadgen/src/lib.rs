//! Realistic Argyle webhook traffic: what it is, how it is sent, and what came back.
//!
//! # Layout
//! - [`generate`]: the deliveries of K accounts' lives, interleaved, with redeliveries and arrivals
//!   out of order as configured: first-connection bursts of 10–30 `accounts.updated` refinements with
//!   increasing `resource.updated_at`, connected, sometimes failed or removed, later re-scans,
//!   resource-less updates and other families. Bodies are pretty-printed like Argyle's.
//! - [`send`]: signs and sends deliveries at a fixed rate or as fast as N connections allow,
//!   measuring latency from the scheduled send time (no coordinated omission).
//! - [`write_requests`]: the same signed requests as a file, for a C client (`wrk`) to replay.
//! - [`verify`]: reads the log back through `GET /v1/events` and checks that every acknowledged
//!   delivery is there, byte for byte, at the position it was given.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as Span, Utc};
use hdrhistogram::Histogram;
use hmac::{Hmac, KeyInit, Mac};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sha2::{Digest, Sha256, Sha512};
use uuid::Uuid;

/// The shape of the traffic.
#[derive(Debug, Clone)]
pub struct Workload {
    pub accounts: usize,
    pub seed: u64,
    /// Fraction of deliveries that repeat a body already sent (Argyle's redeliveries).
    pub duplicates: f64,
    /// Probability that two neighbouring events of one account arrive swapped.
    pub out_of_order: f64,
    /// Probability of a resource-less `accounts.updated` after a refinement.
    pub resourceless: f64,
    /// Probability of an event of another family (`paystubs.partially_synced`) after a refinement.
    pub other_families: f64,
    /// Probability that an account fails later; that it is removed.
    pub failures: f64,
    pub removals: f64,
    /// Re-scans after the first connection (each a short burst of refinements).
    pub rescans: usize,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            accounts: 100,
            seed: 1,
            duplicates: 0.1,
            out_of_order: 0.2,
            resourceless: 0.05,
            other_families: 0.05,
            failures: 0.1,
            removals: 0.1,
            rescans: 1,
        }
    }
}

/// One delivery: what it means and its exact bytes.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub account: Uuid,
    pub user: Uuid,
    pub event: &'static str,
    /// `data.resource`, if the body carries one.
    pub resource: Option<Value>,
    pub body: Vec<u8>,
}

fn resource(account: Uuid, user: Uuid, at: DateTime<Utc>, status: &str, step: u32) -> Value {
    json!({
        "id": account, "user": user, "employers": ["Whole Foods"], "item": "item_000012345",
        "source": "argyle_sandbox", "created_at": "2026-03-02T15:04:11.120455Z",
        "updated_at": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "scanned_at": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "connection": {"status": status, "error_code": null, "error_message": null,
                       "updated_at": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)},
        "direct_deposit_switch": {"status": "idle", "error_code": null, "error_message": null,
                                  "updated_at": "2026-03-02T15:04:11.431002Z"},
        "availability": {
            "gigs": {"status": "in_progress", "updated_at": at.to_rfc3339(), "available_count": step,
                     "available_from": null, "available_to": null},
            "paystubs": {"status": "in_progress", "updated_at": at.to_rfc3339(), "available_count": step * 3,
                         "available_from": "2025-03-01T00:00:00Z", "available_to": "2026-03-01T00:00:00Z"},
            "payroll_documents": null, "identities": {"status": "synced", "updated_at": at.to_rfc3339()},
            "ratings": null, "vehicles": null, "deposit_destinations": null, "user_forms": null
        },
        "ongoing_refresh": {"status": "enabled"}
    })
}

/// A body as Argyle sends it: pretty-printed, two-space indent, no trailing newline.
pub fn body(event: &str, account: Uuid, user: Uuid, resource: Option<&Value>) -> Vec<u8> {
    let mut data = json!({"account": account, "user": user});
    if let Some(resource) = resource {
        data["resource"] = resource.clone();
    }
    serde_json::to_vec_pretty(&json!({"event": event, "name": "loadgen", "data": data}))
        .expect("JSON serializes")
}

/// One account's events in true order.
fn life(workload: &Workload, rng: &mut StdRng) -> Vec<Delivery> {
    let (account, user) = (Uuid::from_u128(rng.random()), Uuid::from_u128(rng.random()));
    let mut at: DateTime<Utc> = "2026-03-02T15:04:11Z".parse().expect("a valid instant");
    let mut step = 0u32;
    let mut events = vec![];
    let push = |events: &mut Vec<Delivery>, event: &'static str, resource: Option<Value>| {
        let body = body(event, account, user, resource.as_ref());
        events.push(Delivery {
            account,
            user,
            event,
            resource,
            body,
        });
    };
    let mut next = |rng: &mut StdRng, status: &str| {
        at += Span::milliseconds(rng.random_range(1..5000));
        step += 1;
        Some(resource(account, user, at, status, step))
    };
    let connected = next(rng, "connecting");
    push(&mut events, "accounts.added", connected);
    let connected = next(rng, "connected");
    push(&mut events, "accounts.connected", connected);
    for scan in 0..=workload.rescans {
        let burst = if scan == 0 {
            rng.random_range(10..=30)
        } else {
            rng.random_range(2..=6)
        };
        for _ in 0..burst {
            let refinement = next(rng, "connected");
            let step = refinement
                .as_ref()
                .map(|r| r["availability"]["gigs"]["available_count"].clone());
            push(&mut events, "accounts.updated", refinement);
            if rng.random_bool(workload.resourceless) {
                push(&mut events, "accounts.updated", None);
            }
            if rng.random_bool(workload.other_families) {
                let other = json!({"event": "paystubs.partially_synced", "name": "loadgen",
                    "data": {"account": account, "user": user, "available_count": step, "days_synced": 111}});
                let body = serde_json::to_vec_pretty(&other).expect("JSON serializes");
                events.push(Delivery {
                    account,
                    user,
                    event: "paystubs.partially_synced",
                    resource: None,
                    body,
                });
            }
        }
        if scan == 0 && rng.random_bool(workload.failures) {
            let failed = next(rng, "error");
            push(&mut events, "accounts.failed", failed);
        }
    }
    if rng.random_bool(workload.removals) {
        push(&mut events, "accounts.removed", None);
    }
    events
}

/// Every delivery of the workload, in sending order.
pub fn generate(workload: &Workload) -> Vec<Delivery> {
    let mut rng = StdRng::seed_from_u64(workload.seed);
    let mut lives: Vec<Vec<Delivery>> = (0..workload.accounts)
        .map(|_| life(workload, &mut rng))
        .collect();
    for life in &mut lives {
        for i in 1..life.len() {
            if rng.random_bool(workload.out_of_order) {
                life.swap(i - 1, i);
            }
        }
    }
    // Interleave the accounts (a window of them at a time, as first connections overlap), and now
    // and then deliver again a body sent recently.
    let mut cursors: Vec<(usize, usize)> = (0..lives.len()).map(|i| (i, 0)).collect();
    let mut order: Vec<Delivery> = vec![];
    while !cursors.is_empty() {
        let pick = rng.random_range(0..cursors.len().min(64));
        let (life, next) = cursors[pick];
        order.push(lives[life][next].clone());
        if next + 1 == lives[life].len() {
            cursors.swap_remove(pick);
        } else {
            cursors[pick].1 += 1;
        }
        if rng.random_bool(workload.duplicates / (1.0 - workload.duplicates).max(0.01)) {
            let again =
                order[rng.random_range(order.len().saturating_sub(2000)..order.len())].clone();
            order.push(again);
        }
    }
    order
}

/// Lowercase hex HMAC-SHA512 of `body`, as Argyle signs.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha512>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Writes the deliveries, signed, to `path` for a client that replays them
/// (`benches/wrk/ingest.lua`): per delivery one line `<signature> <body length>`, then the body's
/// exact bytes and a newline.
pub fn write_requests(
    deliveries: &[Delivery],
    secret: &str,
    path: &std::path::Path,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for delivery in deliveries {
        writeln!(
            out,
            "{} {}",
            sign(secret, &delivery.body),
            delivery.body.len()
        )?;
        out.write_all(&delivery.body)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// How to send.
#[derive(Debug, Clone)]
pub struct Sending {
    /// Base URL of the service, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub secret: String,
    /// Requests in flight at most.
    pub connections: usize,
    /// Deliveries per second, or as fast as possible.
    pub rate: Option<f64>,
}

/// What one acknowledged delivery got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Index of the delivery in the sent order.
    pub index: usize,
    pub position: i64,
    pub duplicate: bool,
    /// When the 200 arrived.
    pub at: Instant,
}

/// What a run measured.
#[derive(Debug)]
pub struct Report {
    pub sent: usize,
    pub elapsed: Duration,
    /// Latency in microseconds, from the scheduled send time to the answer.
    pub latency: Histogram<u64>,
    /// Count of answers per HTTP status (0 = no answer: connection error).
    pub statuses: BTreeMap<u16, usize>,
    pub acks: Vec<Ack>,
}

impl Report {
    pub fn throughput(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency quantile in milliseconds.
    pub fn latency_ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn summary(&self) -> String {
        format!(
            "{} deliveries in {:.2} s: {:.0}/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; statuses {:?}",
            self.sent,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.latency_ms(0.5),
            self.latency_ms(0.9),
            self.latency_ms(0.99),
            self.latency.max() as f64 / 1000.0,
            self.statuses,
        )
    }
}

/// Runs `requests` (each an async call returning a status and an optional ack payload) at a fixed
/// rate or flat out with at most `connections` in flight, timing each from its scheduled start.
pub async fn drive<F, Fut>(
    count: usize,
    connections: usize,
    rate: Option<f64>,
    request: F,
) -> Report
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (u16, Option<(i64, bool)>)> + Send + 'static,
{
    let request = Arc::new(request);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(connections.max(1)));
    let results = Arc::new(Mutex::new((
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        BTreeMap::new(),
        Vec::with_capacity(count),
    )));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let scheduled = match rate {
            Some(rate) => {
                let at = started + Duration::from_secs_f64(index as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => Instant::now(),
        };
        let permit = semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore stays open");
        let (request, results) = (request.clone(), results.clone());
        tasks.push(tokio::spawn(async move {
            let (status, ack) = request(index).await;
            let now = Instant::now();
            drop(permit);
            let mut guard = results.lock().expect("no panics while holding the lock");
            let micros = now.duration_since(scheduled).as_micros().max(1) as u64;
            guard.0.saturating_record(micros);
            *guard.1.entry(status).or_insert(0) += 1;
            if let Some((position, duplicate)) = ack {
                guard.2.push(Ack {
                    index,
                    position,
                    duplicate,
                    at: now,
                });
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed();
    let (latency, statuses, acks) = Arc::try_unwrap(results)
        .expect("all tasks done")
        .into_inner()
        .expect("no poison");
    Report {
        sent: count,
        elapsed,
        latency,
        statuses,
        acks,
    }
}

/// Signs and sends `deliveries` to `POST {url}/webhooks/argyle`.
pub async fn send(deliveries: Arc<Vec<Delivery>>, sending: &Sending) -> Report {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(sending.connections)
        .build()
        .expect("a client");
    let url = format!("{}/webhooks/argyle", sending.url.trim_end_matches('/'));
    let secret = sending.secret.clone();
    let signatures: Arc<Vec<String>> =
        Arc::new(deliveries.iter().map(|d| sign(&secret, &d.body)).collect());
    let count = deliveries.len();
    drive(count, sending.connections, sending.rate, move |index| {
        let (client, url, deliveries, signatures) = (
            client.clone(),
            url.clone(),
            deliveries.clone(),
            signatures.clone(),
        );
        async move {
            let response = client
                .post(&url)
                .header("Content-Type", "application/json")
                .header("X-Argyle-Signature", &signatures[index])
                .body(deliveries[index].body.clone())
                .send()
                .await;
            let Ok(response) = response else {
                return (0, None);
            };
            let status = response.status().as_u16();
            if status != 200 {
                return (status, None);
            }
            let ack = response
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| Some((v["position"].as_i64()?, v["duplicate"].as_bool()?)));
            (status, ack)
        }
    })
    .await
}

#[derive(serde::Deserialize)]
struct Page {
    events: Vec<LoggedEvent>,
    next_after: Option<i64>,
}

#[derive(serde::Deserialize)]
struct LoggedEvent {
    position: i64,
    payload: Box<serde_json::value::RawValue>,
}

/// Reads the whole log through `GET /v1/events` and checks every acknowledged delivery is stored
/// byte for byte at its position. Returns the number checked, or what is missing.
pub async fn verify(
    url: &str,
    token: Option<&str>,
    deliveries: &[Delivery],
    acks: &[Ack],
) -> anyhow::Result<usize> {
    let client = reqwest::Client::new();
    let mut stored: HashMap<i64, [u8; 32]> = HashMap::new();
    let mut after = 0;
    loop {
        let mut request = client.get(format!(
            "{}/v1/events?after={after}&limit=1000",
            url.trim_end_matches('/')
        ));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let page: Page = request.send().await?.error_for_status()?.json().await?;
        for event in page.events {
            stored.insert(
                event.position,
                Sha256::digest(event.payload.get().as_bytes()).into(),
            );
        }
        match page.next_after {
            Some(next) => after = next,
            None => break,
        }
    }
    let mut missing = vec![];
    for ack in acks {
        let want: [u8; 32] = Sha256::digest(&deliveries[ack.index].body).into();
        if stored.get(&ack.position) != Some(&want) {
            missing.push(ack.position);
        }
    }
    anyhow::ensure!(
        missing.is_empty(),
        "{} acknowledged deliveries are not in the log as sent: positions {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    Ok(acks.len())
}
