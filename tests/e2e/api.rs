//! The query API's edges: ids, tokens, health.

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use uuid::Uuid;

use crate::helpers::*;

#[tokio::test]
async fn unknown_and_malformed_ids_are_clear_errors() {
    let app = spawn_app().await;
    let missing = app.get(&format!("/v1/accounts/{}", Uuid::new_v4())).await;
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()[CONTENT_TYPE], "application/problem+json");
    assert_eq!(
        missing.json::<serde_json::Value>().await.unwrap()["code"],
        "not_found"
    );
    for path in [
        "/v1/accounts/not-a-uuid",
        "/v1/accounts/%27%20OR%201=1",
        "/v1/users/123/accounts",
    ] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(
            response.json::<serde_json::Value>().await.unwrap()["code"],
            "invalid_id",
            "{path}"
        );
    }
    let unknown = app.get("/v1/../etc/passwd").await;
    assert_eq!(unknown.status(), 404);
    let nobody: serde_json::Value = app
        .get(&format!("/v1/users/{}/accounts", Uuid::nil()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(nobody["accounts"], serde_json::json!([]));
    app.stop().await;
}

#[tokio::test]
async fn bearer_tokens_guard_v1_when_configured() {
    let mut settings = test_settings().await;
    settings.api_tokens = vec!["token-one-0123456789".into(), "token-two-0123456789".into()];
    let app = spawn_app_with(settings).await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    app.wait_for_projection().await;
    let url = format!("{}/v1/accounts/{ACCOUNT}", app.address);
    for presented in [
        None,
        Some("Bearer token-on"),
        Some("Bearer token-one2"),
        Some("token-one-0123456789"),
        Some("Bearer "),
        Some("Basic dG9rZW4tb25l"),
    ] {
        let mut request = app.client.get(&url);
        if let Some(value) = presented {
            request = request.header(AUTHORIZATION, value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{presented:?}");
        assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
        assert_eq!(
            response.json::<serde_json::Value>().await.unwrap()["code"],
            "unauthorized"
        );
    }
    for token in ["token-one-0123456789", "token-two-0123456789"] {
        let response = app
            .client
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{token}");
    }
    let response = app
        .client
        .get(&url)
        .header(AUTHORIZATION, "bearer token-one-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the scheme is case-insensitive");
    assert_eq!(
        app.get("/healthz").await.status(),
        200,
        "health needs no token"
    );
    assert_eq!(app.get("/readyz").await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn readyz_fails_while_migrations_are_pending() {
    let mut settings = test_settings().await;
    settings.migrate = false;
    settings.role = account_projector::Role::Api;
    let app = spawn_app_with(settings).await;
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["code"],
        "not_ready"
    );
    assert_eq!(app.get("/healthz").await.status(), 200);
    store::migrate::migrate(&app.database_url).await.unwrap();
    // Readiness is refreshed once a second, never checked per request.
    poll_until("ready once migrated", || async {
        app.get("/readyz").await.status() == 200
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn metrics_count_webhooks_by_outcome_and_show_the_projection_and_reads() {
    let app = spawn_app().await;
    let body = fixture("01_accounts.added.json");
    app.deliver(&body).await;
    app.deliver(&body).await;
    let unsigned = app
        .client
        .post(format!("{}/webhooks/argyle", app.address))
        .header("Content-Type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    app.wait_for_projection().await;
    app.account_view(ACCOUNT).await;
    // The projector publishes its gauges after a batch; the checkpoint gauge may lag one poll.
    let text = poll_for("metrics show the projection", || async {
        let response = app.get("/metrics").await;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = response.text().await.unwrap();
        text.contains("projector_checkpoint_position")
            .then_some(text)
    })
    .await;
    for needle in [
        "webhooks_total{outcome=\"accepted\"}",
        "webhooks_total{outcome=\"duplicate\"}",
        "webhooks_total{outcome=\"invalid_signature\"}",
        "append_duration_seconds_bucket",
        "append_batch_size_bucket",
        "log_head_position",
        "projector_lag_events",
        "projector_lag_seconds",
        "projector_batch_events_bucket",
        "snapshot_writes_total",
        "snapshot_read_batch_size_bucket",
        "projector_leader",
        "# HELP webhooks_total",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn status_reports_the_log_the_projection_and_the_leader() {
    let app = spawn_app().await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    app.wait_for_projection().await;
    let (code, out, err) = run_binary(&app.database_url, &["status"], &[]).await;
    assert_eq!(code, 0, "{err}");
    for line in [
        "migrations:  up to date",
        "log head:    1",
        "checkpoint:  1 (lag 0 events)",
        "leader:      account-projector all",
        "events:      1 (2 deliveries)",
        "snapshots:   1",
        "quarantined: 0",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    app.stop().await;
    let (code, _, err) =
        run_binary("postgres://postgres@127.0.0.1:1/nowhere", &["status"], &[]).await;
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "one clear sentence: {err}");
    assert!(err.starts_with("error: "), "{err}");
}

#[tokio::test]
async fn openapi_document_describes_every_route_its_errors_and_the_bearer_scheme() {
    let app = spawn_app().await;
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
    let doc: serde_json::Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        paths,
        [
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/v1/accounts/{account_id}",
            "/v1/accounts/{account_id}/changes",
            "/v1/accounts/{account_id}/events",
            "/v1/events",
            "/v1/feed",
            "/v1/feed/stream",
            "/v1/quarantine",
            "/v1/users/{user_id}/accounts",
            "/webhooks/argyle",
        ]
    );
    // Every documented route is served with its documented method: neither the unknown-path
    // fallback nor 405.
    for path in &paths {
        let concrete = path
            .replace("{account_id}", &Uuid::new_v4().to_string())
            .replace("{user_id}", &Uuid::new_v4().to_string());
        let operations = doc["paths"][path].as_object().unwrap();
        let response = if operations.contains_key("post") {
            app.client
                .post(format!("{}{concrete}", app.address))
                .send()
                .await
                .unwrap()
        } else {
            app.get(&concrete).await
        };
        let status = response.status();
        assert_ne!(status, 405, "{path} is documented with the wrong method");
        if *path == "/v1/feed/stream" {
            // A stream that does not end: its head says enough.
            assert_eq!(response.headers()["content-type"], "text/event-stream");
            continue;
        }
        let body = response.text().await.unwrap();
        assert!(
            !body.contains("no such resource"),
            "{path} is documented but not served"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for path in paths.iter().filter(|p| p.starts_with("/v1/")) {
        let get = &doc["paths"][path]["get"];
        assert_eq!(
            get["security"][0]["bearer"],
            serde_json::json!([]),
            "{path}"
        );
        for status in ["400", "401", "503"] {
            assert_eq!(
                get["responses"][status]["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{path} {status}"
            );
        }
    }
    let ingest = &doc["paths"]["/webhooks/argyle"]["post"]["responses"];
    for status in ["200", "400", "401", "413", "415", "503"] {
        assert!(ingest[status].is_object(), "ingest {status} undocumented");
    }
    app.stop().await;
}
