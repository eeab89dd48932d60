//! Following the projection: the compacted change feed (long poll), its SSE stream (heartbeats,
//! `Last-Event-ID`, a slow reader cut off) and read-your-writes (`?min_position=`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use account_projector::Role;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::helpers::*;

/// The views by account, as `GET /v1/accounts/{id}` would show each snapshot.
async fn views_of_snapshots(app: &TestApp) -> BTreeMap<String, Value> {
    let mut views = BTreeMap::new();
    for account in stored_snapshots(&app.pool).await.keys() {
        views.insert(account.to_string(), app.account_view(account).await);
    }
    views
}

/// Follows `/v1/feed` from `after` until `done` and a page comes back empty; returns the latest
/// view of each account seen, and the last cursor.
async fn follow(
    app: &TestApp,
    mut after: i64,
    done: impl Fn() -> bool,
) -> (BTreeMap<String, Value>, i64) {
    let mut views: BTreeMap<String, Value> = BTreeMap::new();
    let mut pages = 0;
    loop {
        let page: Value = app
            .get(&format!("/v1/feed?after={after}&limit=7&wait=1s"))
            .await
            .json()
            .await
            .unwrap();
        pages += 1;
        let accounts = page["accounts"].as_array().unwrap();
        let mut previous = after;
        for view in accounts {
            let position = view["last_position"].as_i64().unwrap();
            assert!(
                position > previous,
                "out of order or repeated within a page"
            );
            previous = position;
            views.insert(
                view["account_id"].as_str().unwrap().to_owned(),
                view.clone(),
            );
        }
        let next = page["next_after"].as_i64().unwrap();
        assert!(next >= after, "the cursor went back");
        after = next;
        if accounts.is_empty() && done() && checkpoint(&app.pool).await <= after {
            assert!(pages > 1);
            return (views, after);
        }
    }
}

/// Reads `/v1/feed/stream` until it has been quiet for a second once `finished` is set; returns
/// the latest view of each account and the last id.
async fn stream_views(
    client: reqwest::Client,
    url: String,
    finished: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (BTreeMap<String, Value>, i64) {
    let mut response = client.get(url).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (mut views, mut last_id) = (BTreeMap::new(), 0);
    let (mut buffer, mut data, mut id) = (String::new(), String::new(), None::<i64>);
    loop {
        let chunk = match tokio::time::timeout(Duration::from_secs(1), response.chunk()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Err(_) if finished.load(std::sync::atomic::Ordering::SeqCst) => {
                return (views, last_id);
            }
            Err(_) => continue,
            Ok(_) => panic!("the stream ended"),
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find('\n') {
            let line: String = buffer.drain(..=end).collect();
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if let Some(position) = id.take() {
                    let view: Value = serde_json::from_str(&data).unwrap();
                    assert!(position > last_id, "the stream went back");
                    last_id = position;
                    views.insert(view["account_id"].as_str().unwrap().to_owned(), view);
                }
                data.clear();
            } else if let Some(value) = line.strip_prefix("id:") {
                id = value.trim().parse().ok();
            } else if let Some(value) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
    }
}

#[tokio::test]
async fn followers_of_the_feed_under_concurrent_ingest_end_equal_to_the_snapshots() {
    let app = spawn_app().await;
    let accounts: Vec<(Uuid, Uuid)> = (0..40).map(|_| (Uuid::new_v4(), Uuid::new_v4())).collect();
    let ingest_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (address, accounts, done) =
            (app.address.clone(), accounts.clone(), ingest_done.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for step in 0..400u32 {
                let (account, user) = accounts[(step as usize * 7) % accounts.len()];
                let body = refinement(account, user, step);
                let response = client
                    .post(format!("{address}/webhooks/argyle"))
                    .header("Content-Type", "application/json")
                    .header("X-Argyle-Signature", sign(&body))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let done = || ingest_done.load(std::sync::atomic::Ordering::SeqCst);
    // One follower from the beginning; a second from a cursor taken while ingest runs.
    let middle: Value = poll_for("some changes are projected", || async {
        let page: Value = app
            .get("/v1/feed?after=0&limit=5")
            .await
            .json()
            .await
            .unwrap();
        (page["accounts"].as_array().unwrap().len() == 5).then_some(page)
    })
    .await;
    let cursor = middle["next_after"].as_i64().unwrap();
    // And one of the SSE stream, from 0, reading while ingest goes on.
    let projected = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streamed = {
        let (client, url) = (
            app.client.clone(),
            format!("{}/v1/feed/stream", app.address),
        );
        let finished = projected.clone();
        tokio::spawn(async move { stream_views(client, url, finished).await })
    };
    let (from_zero, from_middle) = tokio::join!(follow(&app, 0, done), follow(&app, cursor, done));
    sender.await.unwrap();
    app.wait_for_projection().await;
    projected.store(true, std::sync::atomic::Ordering::SeqCst);
    let snapshots = views_of_snapshots(&app).await;
    assert_eq!(snapshots.len(), 40);
    assert_eq!(
        from_zero.0, snapshots,
        "the follower from 0 differs from the snapshots"
    );
    let last = snapshots
        .values()
        .map(|v| v["last_position"].as_i64().unwrap())
        .max()
        .unwrap();
    let (streamed, streamed_to) = streamed.await.unwrap();
    assert_eq!(
        streamed_to, last,
        "the stream did not reach the last change"
    );
    assert_eq!(
        streamed, snapshots,
        "the SSE follower differs from the snapshots"
    );
    // From the middle: every account changed after the cursor, at its latest view.
    let changed_after: BTreeMap<String, Value> = snapshots
        .into_iter()
        .filter(|(_, v)| v["last_position"].as_i64().unwrap() > cursor)
        .collect();
    assert!(!changed_after.is_empty());
    assert_eq!(from_middle.0, changed_after);
    app.stop().await;
}

#[tokio::test]
async fn a_long_poll_is_woken_by_a_commit_and_otherwise_ends_empty_at_its_wait() {
    let app = spawn_app().await;
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    app.deliver(&refinement(account, user, 1)).await;
    app.wait_for_projection().await;
    let page: Value = app.get("/v1/feed").await.json().await.unwrap();
    let cursor = page["next_after"].as_i64().unwrap();
    assert_eq!(page["accounts"].as_array().unwrap().len(), 1);

    // Nothing new: empty after the wait, the cursor unchanged.
    let started = Instant::now();
    let empty: Value = app
        .get(&format!("/v1/feed?after={cursor}&wait=700ms"))
        .await
        .json()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(empty["accounts"], serde_json::json!([]));
    assert_eq!(empty["next_after"], cursor);

    // A change while it waits: answered at once, long before the 20 s wait.
    let started = Instant::now();
    let poll = {
        let (client, url) = (
            app.client.clone(),
            format!("{}/v1/feed?after={cursor}&wait=20s", app.address),
        );
        tokio::spawn(async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    // Give the request time to be waiting, so that the commit is what wakes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.deliver(&refinement(account, user, 2)).await;
    let woken = poll.await.unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert_eq!(woken["accounts"][0]["resource"]["step"], 2);
    assert!(woken["next_after"].as_i64().unwrap() > cursor);

    for bad in ["wait=-1s", "wait=soon", "limit=0", "limit=1001", "after=-1"] {
        let response = app.get(&format!("/v1/feed?{bad}")).await;
        assert_eq!(response.status(), 400, "{bad}");
    }
    app.stop().await;
}

#[tokio::test]
async fn read_your_writes_answers_once_projected_or_503_not_yet_projected() {
    let database_url = migrated_database().await;
    let with_role = |role: Role| {
        let database_url = database_url.clone();
        async move {
            let mut settings = test_settings().await;
            settings.database_url = database_url;
            settings.role = role;
            settings.migrate = false;
            spawn_app_with(settings).await
        }
    };
    // Ingest and the API without a projector: nothing gets folded.
    let ingest = with_role(Role::Ingest).await;
    let api = with_role(Role::Api).await;
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    let (position, _) = ingest.deliver(&refinement(account, user, 1)).await;
    let started = Instant::now();
    let response = api
        .get(&format!(
            "/v1/accounts/{account}?min_position={position}&wait=500ms"
        ))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "not_yet_projected");
    let response = api
        .get(&format!("/v1/accounts/{account}?min_position={position}"))
        .await;
    assert_eq!(response.status(), 503, "wait defaults to 0s");

    // A projector starts while a reader waits: it answers as soon as position is folded.
    let waiting = {
        let (client, url) = (
            api.client.clone(),
            format!(
                "{}/v1/accounts/{account}?min_position={position}&wait=20s",
                api.address
            ),
        );
        tokio::spawn(async move { client.get(url).send().await.unwrap() })
    };
    let projector = with_role(Role::Projector).await;
    let response = waiting.await.unwrap();
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    assert!(view["last_position"].as_i64().unwrap() >= position);
    for bad in [
        "min_position=-1",
        "min_position=x",
        "min_position=1&wait=later",
    ] {
        let response = api.get(&format!("/v1/accounts/{account}?{bad}")).await;
        assert_eq!(response.status(), 400, "{bad}");
    }
    projector.stop().await;
    api.stop().await;
    ingest.stop().await;
}

/// An SSE client on a raw socket with a small receive buffer, so that not reading fills it.
struct SseClient {
    stream: tokio::net::TcpStream,
    buffer: Vec<u8>,
}

impl SseClient {
    async fn connect(app: &TestApp, last_event_id: Option<i64>) -> Self {
        let address = app.address.trim_start_matches("http://");
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(address.parse().unwrap()).await.unwrap();
        let header = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let request = format!(
            // HTTP/1.0: the body ends with the connection, no chunked framing to undo.
            "GET /v1/feed/stream HTTP/1.0\r\nHost: {address}\r\nAccept: text/event-stream\r\n{header}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        Self {
            stream,
            buffer: vec![],
        }
    }

    /// The next line, or `None` at the end of the stream (or after `patience` without one).
    async fn line(&mut self, patience: Duration) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(patience, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Err(_) => return None,
                Ok(Ok(n)) => self.buffer.extend_from_slice(&chunk[..n]),
                Ok(Err(_)) => return None,
            }
        }
    }

    /// Reads events until the stream ends or `until` says stop: `(id, account)` of each.
    async fn events(&mut self, mut until: impl FnMut(usize) -> bool) -> Vec<(i64, String)> {
        let mut events = vec![];
        let (mut id, mut data): (Option<i64>, Option<String>) = (None, None);
        while !until(events.len()) {
            let Some(line) = self.line(Duration::from_secs(5)).await else {
                break;
            };
            if line.is_empty() {
                // The end of one event: its fields come in any order.
                if let (Some(id), Some(data)) = (id.take(), data.take()) {
                    let view: Value =
                        serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data:?}"));
                    events.push((id, view["account_id"].as_str().unwrap().to_owned()));
                }
            } else if let Some(value) = line.strip_prefix("id:") {
                id = value.trim().parse::<i64>().ok();
            } else if let Some(value) = line.strip_prefix("data:") {
                // Several data lines make one value, joined by line breaks (the SSE format).
                let value = value.strip_prefix(' ').unwrap_or(value);
                data = Some(match data.take() {
                    Some(before) => format!("{before}\n{value}"),
                    None => value.to_owned(),
                });
            }
        }
        events
    }
}

#[tokio::test]
async fn the_stream_sends_heartbeats_cuts_off_a_reader_that_stops_and_resumes_from_its_last_id() {
    let mut settings = test_settings().await;
    settings.feed.heartbeat = Duration::from_millis(200);
    settings.feed.send_timeout = Duration::from_millis(500);
    let app = spawn_app_with(settings).await;
    // Enough changes that they outgrow every socket buffer between the server and the reader.
    let total = 4_000;
    let template = fixture("05_accounts.updated.json");
    let mut conn = app.pool.acquire().await.unwrap();
    for _ in 0..total / 500 {
        let deliveries: Vec<store::log::Delivery> = (0..500)
            .map(|_| {
                let body = for_account(&template, Uuid::new_v4());
                let envelope = domain::Envelope::parse(&body).unwrap();
                store::log::Delivery::new(&body, None, &envelope)
            })
            .collect();
        store::log::append_in(
            &mut conn,
            &test_support::vault(),
            &deliveries,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    drop(conn);
    app.wait_for_projection().await;

    // Idle after the changes: a heartbeat comment comes.
    let head = head(&app.pool).await;
    let mut idle = SseClient::connect(&app, Some(head)).await;
    let mut heartbeats = 0;
    while heartbeats < 2 {
        let line = idle
            .line(PATIENCE)
            .await
            .expect("the idle stream stays open");
        assert!(
            !line.starts_with("data:"),
            "an event on an idle stream: {line}"
        );
        if line.starts_with(':') {
            heartbeats += 1;
        }
    }

    // A reader takes 50 events, stops reading for longer than the send timeout, then reads on:
    // the stream has ended well before the last change.
    let mut slow = SseClient::connect(&app, None).await;
    let first = slow.events(|n| n >= 50).await;
    assert_eq!(first.len(), 50);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rest = slow.events(|_| false).await;
    let received = first.len() + rest.len();
    assert!(received < total, "not cut off: it got all {received}");
    eprintln!("the slow reader got {received} of {total} events before it was cut off");
    let last_id = rest.last().unwrap_or(first.last().unwrap()).0;

    // It resumes after its last id: every account once more in all, none skipped.
    let mut resumed = SseClient::connect(&app, Some(last_id)).await;
    let more = resumed.events(|n| received + n >= total).await;
    let mut ids: Vec<i64> = first
        .iter()
        .chain(&rest)
        .chain(&more)
        .map(|e| e.0)
        .collect();
    let accounts: std::collections::BTreeSet<&String> = first
        .iter()
        .chain(&rest)
        .chain(&more)
        .map(|e| &e.1)
        .collect();
    assert_eq!(accounts.len(), total);
    let sorted = {
        let mut sorted = ids.clone();
        sorted.sort();
        sorted
    };
    assert_eq!(ids, sorted, "out of order");
    ids.dedup();
    assert_eq!(ids.len(), total, "an event repeated");
    app.stop().await;
}
