//! Faults: the database going away, poison events, SIGTERM with requests in flight, a projector
//! killed at random moments, and secrets kept out of the logs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_database_goes_away_ingest_answers_503_recovers_and_loses_nothing_acknowledged() {
    let proxy = DbProxy::start().await;
    let (settings, direct) = proxy.settings().await;
    let app = Arc::new(spawn_app_with(settings).await);
    let pool = sqlx::PgPool::connect(&direct).await.unwrap();

    let (accepted, unavailable) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut senders = vec![];
    for sender in 0..4u32 {
        let (app, accepted, unavailable, stop) = (
            app.clone(),
            accepted.clone(),
            unavailable.clone(),
            stop.clone(),
        );
        senders.push(tokio::spawn(async move {
            let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
            let mut acknowledged = vec![];
            for step in 0.. {
                let body = refinement(account, user, sender * 100_000 + step);
                let started = Instant::now();
                let response = tokio::select! {
                    response = app.post_webhook(&body) => response,
                    () = stop.notified() => break,
                };
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "a request hung for {:?}",
                    started.elapsed()
                );
                match response.status().as_u16() {
                    200 => {
                        let json: Value = response.json().await.unwrap();
                        acknowledged.push((body, json["position"].as_i64().unwrap()));
                        accepted.fetch_add(1, Ordering::SeqCst);
                    }
                    503 => {
                        assert!(response.headers().contains_key("retry-after"));
                        let problem: Value = response.json().await.unwrap();
                        assert_eq!(problem["code"], "unavailable");
                        unavailable.fetch_add(1, Ordering::SeqCst);
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            acknowledged
        }));
    }
    let count = |counter: &Arc<AtomicUsize>| counter.load(Ordering::SeqCst);
    poll_until("some deliveries are accepted", || async {
        count(&accepted) >= 40
    })
    .await;
    proxy.set(ProxyState::Down);
    poll_until("the outage is noticed", || async {
        count(&unavailable) >= 8
    })
    .await;
    proxy.set(ProxyState::BlackHole);
    let before = count(&unavailable);
    poll_until("a hanging network is noticed", || async {
        count(&unavailable) >= before + 8
    })
    .await;
    proxy.set(ProxyState::Forwarding);
    let before = count(&accepted);
    poll_until("ingest recovers by itself", || async {
        count(&accepted) >= before + 40
    })
    .await;
    for _ in 0..senders.len() {
        stop.notify_waiters();
    }
    stop.notify_waiters();
    let mut acknowledged = vec![];
    for sender in senders {
        stop.notify_one();
        acknowledged.extend(sender.await.unwrap());
    }

    // Every 200 is in the log, at the position it was given.
    for (body, position) in &acknowledged {
        let stored: Vec<u8> =
            sqlx::query_scalar("SELECT body_sha256 FROM events WHERE position = $1")
                .bind(position)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(stored, Sha256::digest(body).to_vec(), "position {position}");
    }
    // The projector reconnected and folded everything.
    wait_for_projection(&pool).await;
    assert_eq!(stored_snapshots(&pool).await, fresh_fold(&pool).await);
    Arc::into_inner(app).unwrap().stop().await;
}

#[tokio::test]
async fn poison_events_are_quarantined_and_the_projector_moves_on() {
    let app = spawn_app().await;
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    app.deliver(&refinement(account, user, 1)).await;
    let mut not_an_object: Value = serde_json::from_slice(&refinement(account, user, 2)).unwrap();
    not_an_object["data"]["resource"] = "surprise".into();
    let (p1, _) = app
        .deliver(&serde_json::to_vec_pretty(&not_an_object).unwrap())
        .await;
    let mut numeric_stamp: Value = serde_json::from_slice(&refinement(account, user, 3)).unwrap();
    numeric_stamp["data"]["resource"]["updated_at"] = 1_700_000_000.into();
    let (p2, _) = app
        .deliver(&serde_json::to_vec_pretty(&numeric_stamp).unwrap())
        .await;
    let (last, _) = app.deliver(&refinement(account, user, 4)).await;
    app.wait_for_projection().await;

    let view = app.account_view(account).await;
    assert_eq!(view["version"], 2, "the poison events are not folded");
    assert_eq!(
        view["last_position"], last,
        "later events of the same account still apply"
    );
    assert_eq!(view["resource"]["step"], 4);

    let quarantine: Value = app.get("/v1/quarantine").await.json().await.unwrap();
    let entries = quarantine["events"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["position"], p1);
    assert_eq!(entries[0]["account_id"], account.to_string());
    assert!(
        entries[0]["error"]
            .as_str()
            .unwrap()
            .contains("not a JSON object")
    );
    assert_eq!(entries[1]["position"], p2);
    assert!(entries[1]["error"].as_str().unwrap().contains("updated_at"));
    assert!(entries[1]["quarantined_at"].is_string());
    assert_eq!(quarantine["next_after"], Value::Null);
    let page: Value = app
        .get("/v1/quarantine?limit=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["next_after"], p1);

    // A rebuild meets them again and agrees.
    let (code, out, err) = run_binary(&app.database_url, &["rebuild"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let again: Value = app.get("/v1/quarantine").await.json().await.unwrap();
    assert_eq!(again["events"].as_array().unwrap().len(), 2);
    assert_eq!(app.account_view(account).await["version"], 2);
    app.stop().await;
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_then_exits_cleanly() {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let port = free_port().await;
    let listen = format!("127.0.0.1:{port}");
    let mut service = spawn_binary(
        &database_url,
        "all",
        "service",
        &[("LISTEN_ADDR", listen.as_str())],
    );
    poll_until("the service listens", || async {
        tokio::net::TcpStream::connect(&listen).await.is_ok()
    })
    .await;

    // Start a delivery and wait until the handler reads its body (the server's `100 Continue`
    // says so: the connection is accepted and the request is in flight), send half the body,
    // then ask the service to stop.
    let body = refinement(Uuid::new_v4(), Uuid::new_v4(), 1);
    let head = format!(
        "POST /webhooks/argyle HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Argyle-Signature: {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        sign(&body),
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(&listen).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = vec![];
    while !interim.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        interim.push(byte[0]);
    }
    assert!(interim.starts_with(b"HTTP/1.1 100"), "{interim:?}");
    stream.write_all(&body[..body.len() / 2]).await.unwrap();
    let pid = service.process.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    poll_until("new connections are refused", || async {
        tokio::net::TcpStream::connect(&listen).await.is_err()
    })
    .await;

    stream.write_all(&body[body.len() / 2..]).await.unwrap();
    let mut answer = vec![];
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let exit = tokio::time::timeout(Duration::from_secs(15), service.process.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(
        head_position(&pool).await,
        1,
        "the in-flight delivery was committed"
    );
}

async fn head_position(pool: &sqlx::PgPool) -> i64 {
    head(pool).await
}

async fn free_port() -> u16 {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_at_random_moments_under_load_ends_equal_to_a_fresh_fold() {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let accounts: Vec<(Uuid, Uuid)> = (0..10).map(|_| (Uuid::new_v4(), Uuid::new_v4())).collect();
    let load = tokio::spawn({
        let (pool, accounts) = (pool.clone(), accounts.clone());
        async move {
            for step in 0..1500u32 {
                let (account, user) = accounts[step as usize % accounts.len()];
                append_direct(&pool, &refinement(account, user, step)).await;
            }
        }
    });
    for round in 0..8 {
        let mut projector = spawn_binary(
            &database_url,
            "projector",
            &format!("victim-{round}"),
            &[("PROJECTOR_BATCH_SIZE", "7")],
        );
        let pause = rand::rng().random_range(50..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        projector.process.kill().await.unwrap();
    }
    load.await.unwrap();
    let mut projector = spawn_binary(&database_url, "projector", "survivor", &[]);
    wait_for_projection(&pool).await;
    projector.process.kill().await.unwrap();
    let snapshots = stored_snapshots(&pool).await;
    assert_eq!(snapshots, fresh_fold(&pool).await);
    assert!(
        snapshots.values().all(|s| s.version == 150),
        "nothing folded twice or lost"
    );
    let (code, out, err) = run_binary(&database_url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test]
async fn secrets_and_tokens_never_reach_the_logs() {
    let database_url = migrated_database().await;
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let token = "tok-5f1d3c7e9a-4b2d";
    let secret = "whsec-2b8e4a6c0d";
    let password_url = database_url.replacen("postgres@", "postgres:pw-9c3e1a7b@", 1);
    // The enricher fetches from a fake Argyle API with a key, so the key is in use.
    let argyle = wiremock::MockServer::start().await;
    crate::argyle::mount_key_check(&argyle).await;
    let fetched = Uuid::new_v4();
    crate::argyle::mock_account(fetched)
        .respond_with(
            wiremock::ResponseTemplate::new(200)
                .set_body_json(crate::argyle::account_object(fetched)),
        )
        .mount(&argyle)
        .await;
    let log_file = std::env::temp_dir().join(format!("ap-logs-{}.txt", Uuid::new_v4()));
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_account-projector"));
    command
        .args(["serve", "--no-migrate"])
        .env("DATABASE_URL", &password_url)
        .env("LISTEN_ADDR", &listen)
        .env("ARGYLE_WEBHOOK_SECRETS", format!("old-secret-77,{secret}"))
        .env("API_TOKENS", token)
        .env("DATA_KEYS", DATA_KEY)
        .env("ARGYLE_API_URL", format!("{}/v2", argyle.uri()))
        .env("ARGYLE_API_KEY_ID", crate::argyle::KEY_ID)
        .env("ARGYLE_API_KEY_SECRET", crate::argyle::KEY_SECRET)
        .env("RUST_LOG", "trace")
        .env("LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .kill_on_drop(true);
    let mut service = command.spawn().unwrap();
    poll_until("the service listens", || async {
        tokio::net::TcpStream::connect(&listen).await.is_ok()
    })
    .await;
    let client = reqwest::Client::new();
    let body = refinement(Uuid::new_v4(), Uuid::new_v4(), 1);
    let signature = sign_with(secret, &body);
    let post = |signature: String| {
        client
            .post(format!("http://{listen}/webhooks/argyle"))
            .header("Content-Type", "application/json")
            .header("X-Argyle-Signature", signature)
            .body(body.clone())
            .send()
    };
    let accepted = post(signature.clone()).await.unwrap();
    assert_eq!(accepted.status(), 200);
    assert!(
        accepted.headers().contains_key("x-request-id"),
        "the request id is sent back"
    );
    assert_eq!(post("ab".repeat(64)).await.unwrap().status(), 401);
    let authorized = client
        .get(format!("http://{listen}/v1/events"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(authorized.status(), 200);
    let wrong = client
        .get(format!("http://{listen}/v1/events"))
        .bearer_auth(format!("{token}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let resource_less = crate::argyle::resource_less(fetched, 0);
    let accepted = client
        .post(format!("http://{listen}/webhooks/argyle"))
        .header("Content-Type", "application/json")
        .header("X-Argyle-Signature", sign_with(secret, &resource_less))
        .body(resource_less)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);
    poll_until("the enricher fetched the account with the key", || async {
        let view: Value = client
            .get(format!("http://{listen}/v1/accounts/{fetched}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null);
        view["last_event"] == domain::ACCOUNT_FETCHED
    })
    .await;
    let pid = service.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    service.wait().await.unwrap();

    let logs = std::fs::read_to_string(&log_file).unwrap();
    let _ = std::fs::remove_file(&log_file);
    assert!(logs.lines().count() > 10, "trace logs were written");
    for line in logs.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    // One JSON line per request with its span: request id, method, path, status, latency.
    let finished: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["message"] == "request finished")
        .collect();
    let webhook = finished
        .iter()
        .find(|l| l["span"]["path"] == "/webhooks/argyle" && l["status"] == 200)
        .expect("a webhook request line");
    assert_eq!(webhook["span"]["method"], "POST");
    assert_eq!(
        webhook["span"]["request_id"].as_str().unwrap().len(),
        36,
        "a UUID request id: {webhook}"
    );
    assert!(webhook["latency_ms"].as_f64().is_some());
    // The same line says what became of the webhook; no second line per webhook.
    assert_eq!(webhook["span"]["event"], "accounts.updated", "{webhook}");
    assert_eq!(webhook["span"]["position"], 1, "{webhook}");
    assert_eq!(webhook["span"]["duplicate"], false, "{webhook}");
    let request_id = webhook["span"]["request_id"].as_str().unwrap();
    let info_lines_of_the_webhook = logs
        .lines()
        .filter(|l| l.contains(r#""level":"INFO""#) && l.contains(request_id))
        .count();
    assert_eq!(info_lines_of_the_webhook, 1, "{logs}");
    assert!(
        finished
            .iter()
            .any(|l| l["span"]["path"] == "/v1/events" && l["status"] == 401)
    );
    // The command line was logged (at debug), with its secrets redacted.
    assert!(
        logs.contains("command line"),
        "the Debug of the command line is logged"
    );
    let basic_auth = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            crate::argyle::KEY_ID,
            crate::argyle::KEY_SECRET
        ))
    };
    for needle in [
        token,
        secret,
        "old-secret-77",
        "pw-9c3e1a7b",
        signature.as_str(),
        crate::argyle::KEY_SECRET,
        basic_auth.as_str(),
        DATA_KEY,
    ] {
        assert!(!logs.contains(needle), "{needle} leaked into the logs");
    }
}

/// Ends every session of the API-only app (as a Postgres restart would), and waits until they are
/// gone. (Sessions started since, such as the checkpoint listener reconnecting, may be there.)
async fn terminate_api_sessions(pool: &sqlx::PgPool) {
    let query = "SELECT now(), count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'account-projector api'";
    let (at, _): (chrono::DateTime<chrono::Utc>, i64) =
        sqlx::query_as(query).fetch_one(pool).await.unwrap();
    poll_until("the API's sessions are gone", || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'account-projector api'
               AND backend_start <= $1",
        )
        .bind(at)
        .fetch_one(pool)
        .await
        .unwrap();
        left == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queries_survive_their_connections_being_terminated() {
    let writer = spawn_app().await;
    let account = ACCOUNT;
    for (_, body) in fixture_sequence() {
        writer.deliver(&body).await;
    }
    writer.wait_for_projection().await;
    let mut settings = test_settings().await;
    settings.database_url = writer.database_url.clone();
    settings.role = account_projector::Role::Api;
    let app = spawn_app_with(settings).await;
    // Several queries at once, so several connections are kept between requests.
    let views = futures_util::future::join_all((0..6).map(|_| app.account_view(account))).await;
    assert!(views.windows(2).all(|w| w[0] == w[1]));
    let view = views[0].clone();

    // A connection idle for more than a second is checked before use: the first query after the
    // server's sessions ended is answered at once.
    terminate_api_sessions(&app.pool).await;
    // The idle time is what is under test here, not a wait for a condition.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(app.account_view(account).await, view);

    // A connection in steady use is not checked: the one query that finds it dead is answered 503
    // with Retry-After (never 500), the connection is discarded, and the next query succeeds.
    app.account_view(account).await;
    terminate_api_sessions(&app.pool).await;
    let unavailable = AtomicUsize::new(0);
    let recovered = poll_for("a query succeeds again", || async {
        let response = app.get(&format!("/v1/accounts/{account}")).await;
        match response.status().as_u16() {
            200 => Some(response.json::<Value>().await.unwrap()),
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                unavailable.fetch_add(1, Ordering::SeqCst);
                None
            }
            other => panic!("unexpected status {other}"),
        }
    })
    .await;
    assert_eq!(recovered, view);
    assert!(unavailable.load(Ordering::SeqCst) <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_does_not_wait_on_connections_kept_between_requests() {
    let mut settings = test_settings().await;
    settings.shutdown_grace = Duration::from_millis(300);
    settings.request_timeout = Duration::from_secs(120);
    let app = spawn_app_with(settings).await;
    // Connections are now kept: the committer's, and the API's between requests.
    for (_, body) in fixture_sequence() {
        app.deliver(&body).await;
    }
    app.wait_for_projection().await;
    futures_util::future::join_all((0..4).map(|_| app.account_view(ACCOUNT))).await;

    // A request that outlives the grace period: its connection keeps the routes (and with them
    // the kept connections) alive after the server stops waiting for it.
    let body = refinement(Uuid::new_v4(), Uuid::new_v4(), 1);
    let head = format!(
        "POST /webhooks/argyle HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Argyle-Signature: {}\r\nContent-Length: {}\r\n\r\n",
        sign(&body),
        body.len()
    );
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    // A whole request answered first, so the connection is surely being served.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![];
    while !answer.ends_with(b"{\"status\":\"ok\"}") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        answer.push(byte[0]);
    }
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..body.len() / 2]).await.unwrap();

    tokio::time::timeout(Duration::from_secs(20), app.stop())
        .await
        .expect("the app stops without waiting for the lingering request");
    drop(stream);
}

#[tokio::test]
async fn a_connection_kept_for_long_goes_back_to_the_pool_and_its_rules() {
    let url = migrated_database().await;
    let pool = store::pool(&url, &store::DbOptions::default()).unwrap();
    let kept = store::kept::KeptConnections::new(pool.clone(), 1)
        .hand_back_after(Duration::from_millis(200));
    let backend = |mut lease: store::kept::Lease| async move {
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *lease)
            .await
            .unwrap();
        lease.release();
        pid
    };
    let first = backend(kept.acquire().await.unwrap()).await;
    assert_eq!(pool.num_idle(), 0, "kept out of the pool");
    // The connection's age is what is under test here, not a wait for a condition.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = backend(kept.acquire().await.unwrap()).await;
    assert_eq!(first, second, "lent again from the kept ones");
    poll_until("the old connection is back in the pool", || async {
        pool.num_idle() == 1
    })
    .await;
    pool.close().await;
}
