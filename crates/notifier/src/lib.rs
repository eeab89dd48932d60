//! The notifier: delivers each change of the compacted feed to every subscriber as an outbound
//! webhook, `POST` with the account view as the body, signed per the Standard Webhooks spec
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`).
//!
//! # How
//! - [`scan`]: for each subscriber, reads the feed after its `scanned_to` and records one message
//!   per account (`store::subscribers::enqueue`): a newer view replaces an undelivered older one,
//!   with a new id. So bursts collapse, and an account has at most one message, so one in flight.
//! - [`deliver_due`]: sends the messages that are due, a few at a time. A 2xx within the timeout
//!   deletes the message (unless a newer view replaced it meanwhile, which stays); anything else,
//!   a redirect included (never followed), is retried after the next delay of the schedule. A
//!   message retried past the whole schedule marks its subscriber `failing` (and keeps being
//!   retried at the last delay); a 2xx makes it `active` again.
//! - [`run`]: one notifier works, any other stands by ([`store::leader::run_as_leader`]); it wakes
//!   on the projector's commits, on the next due retry, or every poll interval.
//!
//! # Guarantees
//! - Nothing missed: the feed never skips a change, and `scanned_to` moves in the transaction that
//!   records the messages.
//! - At most the in-flight messages are resent after a crash: a message is deleted only after its
//!   2xx, and its id and body never change across retries.

#![forbid(unsafe_code)]

use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use futures_util::StreamExt;
use store::PgConnection;
use store::checkpoints::CheckpointNotifications;
use store::keys::Vault;
use store::leader::run_as_leader;
use store::locks::Lock;
use store::subscribers::{self, Message};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How the notifier paces and retries.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// The delay before each retry of a message, in order; past the last, the subscriber is
    /// failing and the message is retried at the last delay.
    pub schedule: Vec<Duration>,
    /// A delivery not answered within this has failed.
    pub timeout: Duration,
    /// Deliveries in flight at once (to different accounts or subscribers).
    pub concurrency: usize,
    /// Look for work at least this often.
    pub poll_interval: Duration,
    /// How often a standby retries the lock, and the pause after a database error.
    pub retry_interval: Duration,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(60 * m);
        Self {
            // Immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, 24 h, 24 h: 3.3 days.
            schedule: vec![
                Duration::from_secs(5),
                minutes(5),
                minutes(30),
                minutes(120),
                minutes(300),
                minutes(600),
                minutes(600),
                minutes(1440),
                minutes(1440),
            ],
            timeout: Duration::from_secs(15),
            concurrency: 8,
            poll_interval: Duration::from_secs(1),
            retry_interval: Duration::from_millis(500),
        }
    }
}

/// A new signing secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// A subscriber URL must be `https`, or `http` to this machine (tests, a local relay).
pub fn check_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    match url.scheme() {
        "https" if url.host().is_some() => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(format!(
            "{raw:?} is not an https URL (plain http is allowed only to a loopback address)"
        )),
    }
}

/// Runs the notifier until `shutdown`, surviving database outages.
pub async fn run(
    pool: store::PgPool,
    vault: Vault,
    config: NotifierConfig,
    shutdown: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .user_agent(concat!("account-projector/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.timeout.min(Duration::from_secs(5)))
        .timeout(config.timeout)
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "the notifier cannot build its HTTP client");
            return;
        }
    };
    while !shutdown.is_cancelled() {
        let standing_by = || tracing::info!("another notifier is working; standing by");
        let work = |conn| notify(conn, &vault, &pool, &client, &config, &shutdown);
        match run_as_leader(
            &pool,
            Lock::Notifier,
            config.retry_interval,
            &shutdown,
            standing_by,
            work,
        )
        .await
        {
            Ok(()) => break,
            Err(error) => {
                metrics::gauge!("notifier_leader").set(0.0);
                tracing::warn!(%error, "notifier lost its database connection; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(config.retry_interval) => {}
                }
            }
        }
    }
    metrics::gauge!("notifier_leader").set(0.0);
    tracing::info!("notifier stopped");
}

/// Scans and delivers as the one notifier, on the session that holds its lock, until `shutdown`.
async fn notify(
    mut conn: PgConnection,
    vault: &Vault,
    pool: &store::PgPool,
    client: &reqwest::Client,
    config: &NotifierConfig,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    tracing::info!("notifier is working");
    metrics::gauge!("notifier_leader").set(1.0);
    let mut commits = CheckpointNotifications::subscribe(pool).await?;
    loop {
        scan(&mut conn, vault).await?;
        deliver_due(&mut conn, vault, client, config, shutdown).await?;
        let subscribers = subscribers::list(&mut conn).await?;
        let pending: i64 = subscribers.iter().map(|s| s.pending).sum();
        let failing = subscribers.iter().filter(|s| s.state == "failing").count();
        metrics::gauge!("notifier_pending_messages").set(pending as f64);
        metrics::gauge!("notifier_failing_subscribers").set(failing as f64);
        let until_due = subscribers::next_due(&mut conn)
            .await?
            .map(|at| (at - Utc::now()).to_std().unwrap_or_default());
        let pause = until_due.map_or(config.poll_interval, |d| d.min(config.poll_interval));
        tokio::select! {
            () = shutdown.cancelled() => return store::close(conn).await,
            advanced = commits.next() => { advanced?; }
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Feed page size of a scan.
const SCAN_PAGE: i64 = 500;

/// Turns every subscriber's new changes into messages.
pub async fn scan(conn: &mut PgConnection, vault: &Vault) -> store::Result<()> {
    for subscriber in subscribers::list(conn).await? {
        let mut from = subscriber.scanned_to;
        loop {
            let (snapshots, checkpoint) =
                store::snapshots::changed_after(conn, vault, from, SCAN_PAGE).await?;
            let full = snapshots.len() as i64 == SCAN_PAGE;
            let to = match snapshots.last() {
                Some(last) if full => last.last_position,
                _ => from.max(checkpoint),
            };
            if to == from {
                break;
            }
            let messages: Vec<(Uuid, Uuid, i64, String)> = snapshots
                .iter()
                .map(|s| {
                    let view = web::AccountView::from(s);
                    let body = serde_json::to_string(&view).expect("a view serialises");
                    (s.account_id, Uuid::new_v4(), s.last_position, body)
                })
                .collect();
            if !subscribers::enqueue(conn, vault, subscriber.id, from, to, &messages).await? {
                break; // replayed meanwhile: the next round starts from there
            }
            from = to;
            if !full {
                break;
            }
        }
    }
    Ok(())
}

/// Sends every message that is due, `concurrency` at a time, and records each outcome.
pub async fn deliver_due(
    conn: &mut PgConnection,
    vault: &Vault,
    client: &reqwest::Client,
    config: &NotifierConfig,
    shutdown: &CancellationToken,
) -> store::Result<()> {
    loop {
        let due = subscribers::due(conn, vault, 64).await?;
        if due.is_empty() || shutdown.is_cancelled() {
            return Ok(());
        }
        let (due, unreadable): (Vec<Message>, Vec<Message>) =
            due.into_iter().partition(|m| m.body.is_some());
        for message in &unreadable {
            // Its account was erased since: the erased view follows as a message of its own.
            subscribers::drop_unreadable(conn, message).await?;
        }
        let mut sent = futures_util::stream::iter(due)
            .map(|message| async move {
                let outcome = send(client, &message).await;
                (message, outcome)
            })
            .buffer_unordered(config.concurrency.max(1));
        while let Some((message, outcome)) = sent.next().await {
            match outcome {
                Ok(()) => {
                    metrics::counter!("notifier_deliveries_total", "outcome" => "delivered")
                        .increment(1);
                    subscribers::delivered(conn, &message).await?;
                }
                Err(error) => {
                    metrics::counter!("notifier_deliveries_total", "outcome" => "failed")
                        .increment(1);
                    let attempt = usize::try_from(message.attempts).unwrap_or(0);
                    let exhausted = attempt + 1 >= config.schedule.len();
                    let retry_in = config
                        .schedule
                        .get(attempt)
                        .or(config.schedule.last())
                        .copied()
                        .unwrap_or(Duration::from_secs(60));
                    tracing::warn!(subscriber = %message.subscriber_id, account = %message.account_id,
                        %error, ?retry_in, "outbound webhook failed; it is retried");
                    subscribers::failed(conn, &message, &error, retry_in, exhausted).await?;
                }
            }
        }
    }
}

/// One signed `POST`; `Ok` on a 2xx.
async fn send(client: &reqwest::Client, message: &Message) -> Result<(), String> {
    let id = message.message_id.to_string();
    let body = message.body.clone().unwrap_or_default();
    let timestamp = Utc::now().timestamp();
    let signature = standardwebhooks::Webhook::new(&message.secret)
        .and_then(|w| w.sign(&id, timestamp, body.as_bytes()))
        .map_err(|e| format!("cannot sign with the subscriber's secret: {e}"))?;
    let response = client
        .post(&message.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(standardwebhooks::HEADER_WEBHOOK_ID, &id)
        .header(
            standardwebhooks::HEADER_WEBHOOK_TIMESTAMP,
            timestamp.to_string(),
        )
        .header(standardwebhooks::HEADER_WEBHOOK_SIGNATURE, signature)
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let mut cause: &dyn std::error::Error = &e;
            while let Some(source) = cause.source() {
                cause = source;
            }
            if e.is_timeout() {
                format!("no answer within the timeout ({cause})")
            } else {
                format!("could not reach the subscriber: {cause}")
            }
        })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else if status.is_redirection() {
        let to = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("?");
        Err(format!(
            "HTTP {} redirect to {to}: not followed",
            status.as_u16()
        ))
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriber_urls_are_https_unless_loopback() {
        let cases = [
            ("https://hooks.example.com/in", true),
            ("http://127.0.0.1:9000/in", true),
            ("http://localhost/in", true),
            ("http://[::1]:8000/", true),
            ("http://hooks.example.com/in", false),
            ("http://10.0.0.1/in", false),
            ("ftp://example.com", false),
            ("not a url", false),
        ];
        for (url, ok) in cases {
            assert_eq!(check_url(url).is_ok(), ok, "{url}");
        }
        assert_eq!(cases.len(), 8);
    }

    #[test]
    fn a_new_secret_is_a_standard_webhooks_secret() {
        let secret = new_secret();
        assert!(secret.starts_with("whsec_"));
        assert!(standardwebhooks::Webhook::new(&secret).is_ok());
        assert_ne!(secret, new_secret());
    }
}
