//! Outbound webhooks: a real receiver on port 0 that checks every signature with its own
//! implementation of the Standard Webhooks scheme (HMAC-SHA256 over `id.timestamp.body`), then
//! failures, collapse, redirects, the failing state, a notifier killed mid-delivery and the
//! standby that takes over.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use account_projector::Role;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::*;

/// What the receiver answers.
#[derive(Clone)]
enum Answer {
    Status(u16),
    Redirect(String),
    /// 200 after holding the request this long.
    Slow(Duration),
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    id: String,
    verified: bool,
    view: Value,
    /// Answered 2xx.
    accepted: bool,
}

struct ReceiverState {
    secret: Option<String>,
    answer: Answer,
    received: Vec<Received>,
}

#[derive(Clone)]
struct Receiver {
    url: String,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    async fn start(answer: Answer) -> Self {
        let state = Arc::new(Mutex::new(ReceiverState {
            secret: None,
            answer,
            received: vec![],
        }));
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let state = shared.clone();
                async move { receive(state, headers, body).await }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, state }
    }

    fn answer(&self, answer: Answer) {
        self.state.lock().unwrap().answer = answer;
    }

    fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// The latest accepted view of each account.
    fn latest(&self) -> BTreeMap<String, Value> {
        let mut latest = BTreeMap::new();
        for r in self.received().into_iter().filter(|r| r.accepted) {
            latest.insert(r.view["account_id"].as_str().unwrap().to_owned(), r.view);
        }
        latest
    }
}

async fn receive(
    state: Arc<Mutex<ReceiverState>>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (secret, answer) = {
        let state = state.lock().unwrap();
        (state.secret.clone(), state.answer.clone())
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (id, timestamp, signatures) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let verified = secret.is_some_and(|secret| {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.trim_start_matches("whsec_"))
            .unwrap();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let fresh = timestamp
            .parse::<i64>()
            .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
        fresh
            && signatures
                .split(' ')
                .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
    });
    let accepted = matches!(answer, Answer::Status(200) | Answer::Slow(_));
    let received = Received {
        id,
        verified,
        view: serde_json::from_str(&body).unwrap_or(Value::Null),
        accepted: false,
    };
    let index = {
        let mut state = state.lock().unwrap();
        state.received.push(received);
        state.received.len() - 1
    };
    let response = match answer {
        Answer::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Answer::Redirect(to) => {
            (StatusCode::FOUND, [(axum::http::header::LOCATION, to)]).into_response()
        }
        Answer::Slow(hold) => {
            tokio::time::sleep(hold).await;
            StatusCode::OK.into_response()
        }
    };
    state.lock().unwrap().received[index].accepted = accepted;
    response
}

/// `subscribers add --url <receiver>`; tells the receiver its secret; returns the id.
async fn subscribe(database_url: &str, receiver: &Receiver) -> String {
    let (code, stdout, stderr) = run_binary(
        database_url,
        &["subscribers", "add", "--url", &receiver.url],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap()
            .to_owned()
    };
    receiver.state.lock().unwrap().secret = Some(field("secret"));
    field("id")
}

async fn app_with(database_url: &str, role: Role) -> TestApp {
    let mut settings = test_settings().await;
    settings.database_url = database_url.to_owned();
    settings.role = role;
    settings.notifier.schedule = vec![Duration::from_millis(100); 50];
    settings.notifier.poll_interval = Duration::from_millis(100);
    spawn_app_with(settings).await
}

#[tokio::test]
async fn every_account_arrives_signed_in_order_and_a_burst_collapses_while_the_receiver_fails() {
    let database_url = migrated_database().await;
    let receiver = Receiver::start(Answer::Status(500)).await;
    subscribe(&database_url, &receiver).await;
    let app = app_with(&database_url, Role::All).await;
    let accounts: Vec<(Uuid, Uuid)> = (0..10).map(|_| (Uuid::new_v4(), Uuid::new_v4())).collect();
    for step in 0..5 {
        for &(account, user) in &accounts {
            app.deliver(&refinement(account, user, step)).await;
        }
    }
    app.wait_for_projection().await;
    poll_until("the receiver has refused a few", || async {
        receiver.received().len() >= 20
    })
    .await;
    // Every change is enqueued (and so collapsed) before the receiver recovers: otherwise an
    // older view still pending could be accepted before the scan reaches its newer one.
    let head = head(&app.pool).await;
    poll_until("the notifier has scanned every change", || async {
        let scanned: i64 = sqlx::query_scalar("SELECT min(scanned_to) FROM subscribers")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        scanned >= head
    })
    .await;
    receiver.answer(Answer::Status(200));
    let mut expected = BTreeMap::new();
    for account in stored_snapshots(&app.pool).await.keys() {
        expected.insert(account.to_string(), app.account_view(account).await);
    }
    poll_until("every account's latest view arrives", || async {
        receiver.latest() == expected
    })
    .await;
    let received = receiver.received();
    assert!(
        received.iter().all(|r| r.verified),
        "a signature did not verify"
    );
    // A retried message keeps its id and body; a newer view gets a new id.
    let mut by_id: BTreeMap<&str, &Value> = BTreeMap::new();
    for r in &received {
        let first = by_id.entry(&r.id).or_insert(&r.view);
        assert_eq!(*first, &r.view, "message {} changed across retries", r.id);
    }
    // Collapsed: each account was accepted once, at its latest view (50 events in all).
    let accepted: Vec<&Received> = received.iter().filter(|r| r.accepted).collect();
    assert_eq!(accepted.len(), 10, "bursts did not collapse");
    // In order per account: positions only grow.
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &received {
        let account = r.view["account_id"].as_str().unwrap();
        let position = r.view["last_position"].as_i64().unwrap();
        let previous = last.insert(account, position).unwrap_or(0);
        assert!(position >= previous, "account {account} went back");
    }
    // Nothing more is pending; the subscriber is caught up.
    let (_, stdout, _) = run_binary(&database_url, &["subscribers", "list"], &[]).await;
    assert!(
        stdout.contains("state=active") && stdout.contains("pending=0"),
        "{stdout}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_a_subscriber_past_its_schedule_is_failing() {
    let database_url = migrated_database().await;
    let elsewhere = Receiver::start(Answer::Status(200)).await;
    let receiver = Receiver::start(Answer::Redirect(elsewhere.url.clone())).await;
    subscribe(&database_url, &receiver).await;
    let app = app_with(&database_url, Role::Ingest).await;
    let projector = app_with(&database_url, Role::Projector).await;
    // The notifier in a process of its own, so that its /metrics are its own.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut notifier = spawn_binary(
        &database_url,
        "notifier",
        "notifier-redirects",
        &[
            ("NOTIFIER_RETRY_SCHEDULE", "50ms,50ms"),
            ("LISTEN_ADDR", listen.as_str()),
            ("RUST_LOG", "error"),
        ],
    );
    app.deliver(&refinement(Uuid::new_v4(), Uuid::new_v4(), 1))
        .await;
    let listed = poll_for("the subscriber is failing", || async {
        let (_, stdout, _) = run_binary(&database_url, &["subscribers", "list"], &[]).await;
        stdout.contains("state=failing").then_some(stdout)
    })
    .await;
    assert!(
        listed.contains("redirect") && listed.contains("not followed"),
        "{listed}"
    );
    assert!(listed.contains("pending=1"), "{listed}");
    assert!(receiver.received().len() >= 2);
    assert!(elsewhere.received().is_empty(), "the redirect was followed");
    let metrics = poll_for("the notifier's metrics say so", || async {
        let url = format!("http://{listen}/metrics");
        let metrics = reqwest::get(url).await.ok()?.text().await.ok()?;
        metrics
            .contains("notifier_failing_subscribers 1")
            .then_some(metrics)
    })
    .await;
    assert!(metrics.contains("notifier_leader 1"), "{metrics}");
    let (_, status, _) = run_binary(&database_url, &["status"], &[]).await;
    assert!(status.contains("1 subscriber(s), 1 failing"), "{status}");
    // It recovers: once the receiver answers 200, the message arrives and the state is active.
    receiver.answer(Answer::Status(200));
    poll_until("the subscriber recovers", || async {
        let (_, stdout, _) = run_binary(&database_url, &["subscribers", "list"], &[]).await;
        stdout.contains("state=active") && stdout.contains("pending=0")
    })
    .await;
    notifier.process.start_kill().unwrap();
    let _ = notifier.process.wait().await;
    projector.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_notifier_killed_mid_delivery_resends_only_that_message_and_the_standby_takes_over() {
    let database_url = migrated_database().await;
    let receiver = Receiver::start(Answer::Slow(Duration::from_millis(1500))).await;
    subscribe(&database_url, &receiver).await;
    let service = app_with(&database_url, Role::Ingest).await;
    let projector = app_with(&database_url, Role::Projector).await;
    let env = [
        ("NOTIFIER_CONCURRENCY", "1"),
        ("NOTIFIER_RETRY_SCHEDULE", "100ms"),
        ("RUST_LOG", "error"),
    ];
    let mut first = spawn_binary(&database_url, "notifier", "notifier-one", &env);
    poll_until("the first notifier leads", || async {
        notifier_leader(&service.pool).await.as_deref() == Some("notifier-one")
    })
    .await;
    let mut second = spawn_binary(&database_url, "notifier", "notifier-two", &env);
    let accounts: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for account in &accounts {
        service
            .deliver(&refinement(*account, Uuid::new_v4(), 1))
            .await;
    }
    poll_until("a delivery is in flight", || async {
        !receiver.received().is_empty()
    })
    .await;
    first.process.start_kill().unwrap();
    first.process.wait().await.unwrap();
    poll_until("the standby delivers every account", || async {
        receiver.latest().len() == 3
    })
    .await;
    assert_eq!(
        notifier_leader(&service.pool).await.as_deref(),
        Some("notifier-two")
    );
    let received = receiver.received();
    let mut arrivals: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &received {
        *arrivals.entry(&r.id).or_default() += 1;
    }
    assert_eq!(arrivals.len(), 3, "one message per account: {arrivals:?}");
    let repeated: Vec<_> = arrivals.values().filter(|&&n| n > 1).collect();
    assert!(
        repeated.len() <= 1,
        "more than the in-flight message was resent: {arrivals:?}"
    );
    assert!(received.iter().all(|r| r.verified));
    second.process.start_kill().unwrap();
    let _ = second.process.wait().await;
    projector.stop().await;
    service.stop().await;
}

async fn notifier_leader(pool: &sqlx::PgPool) -> Option<String> {
    let mut conn = pool.acquire().await.unwrap();
    store::locks::holder(&mut conn, store::locks::Lock::Notifier)
        .await
        .unwrap()
        .map(|(name, _, _)| name)
}

#[tokio::test]
async fn subscribers_are_managed_with_clear_errors() {
    let database_url = migrated_database().await;
    for (args, expected) in [
        (
            vec!["add", "--url", "http://hooks.example.com/in"],
            "not an https URL",
        ),
        (vec!["add", "--url", "nope"], "not a URL"),
        (
            vec!["remove", "00000000-0000-0000-0000-000000000001"],
            "no subscriber",
        ),
        (
            vec![
                "replay",
                "00000000-0000-0000-0000-000000000001",
                "--from",
                "0",
            ],
            "no subscriber",
        ),
    ] {
        let mut all = vec!["subscribers"];
        all.extend(&args);
        let (code, _, stderr) = run_binary(&database_url, &all, &[]).await;
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let receiver = Receiver::start(Answer::Status(200)).await;
    let id = subscribe(&database_url, &receiver).await;
    let (code, stdout, _) = run_binary(&database_url, &["subscribers", "list"], &[]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains(&id) && stdout.contains("secret=hidden"),
        "{stdout}"
    );
    let (code, _, stderr) = run_binary(
        &database_url,
        &["subscribers", "replay", &id, "--from", "0"],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run_binary(&database_url, &["subscribers", "remove", &id], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    let (_, stdout, _) = run_binary(&database_url, &["subscribers", "list"], &[]).await;
    assert!(!stdout.contains(&id));
}
