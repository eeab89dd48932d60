//! `POST /webhooks/argyle`: what is accepted, what is refused, and that refusals append nothing.

use std::time::Duration;

use account_projector::{Application, Role};
use reqwest::header::CONTENT_TYPE;
use sqlx::Row;

use crate::helpers::*;

#[tokio::test]
async fn a_signed_delivery_is_stored_verbatim_before_the_200() {
    let app = spawn_app().await;
    let body = fixture("01_accounts.added.json");
    let response = app.post_webhook(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"status":"accepted","position":1,"duplicate":false}"#
    );

    let row = sqlx::query("SELECT event, account_id::text, user_id::text, body, signature, received_at <= now() AS past FROM events WHERE position = 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("event"), "accounts.added");
    assert_eq!(row.get::<String, _>("account_id"), ACCOUNT);
    assert_eq!(row.get::<String, _>("user_id"), USER);
    // Stored sealed (docs/erasure.md), and opened to exactly the bytes received.
    let stored = row.get::<Vec<u8>, _>("body");
    assert!(sealing::is_sealed(&stored));
    assert!(!String::from_utf8_lossy(&stored).contains("Whole Foods"));
    assert_eq!(
        logged_body(&app.pool, 1).await,
        body,
        "the raw bytes are kept exactly"
    );
    assert_eq!(row.get::<String, _>("signature"), sign(&body));
    assert!(row.get::<bool, _>("past"));
    // Queries by hand see, through the view, that the body is sealed, and no payload.
    let (payload, sealed): (Option<serde_json::Value>, bool) =
        sqlx::query_as("SELECT payload, sealed FROM events_json WHERE position = 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((payload, sealed), (None, true));
    app.stop().await;
}

#[tokio::test]
async fn a_redelivered_webhook_is_not_a_new_event() {
    let app = spawn_app().await;
    let body = fixture("01_accounts.added.json");
    assert_eq!(app.deliver(&body).await, (1, false));
    assert_eq!(
        app.deliver(&fixture("04_accounts.updated.json")).await,
        (2, false)
    );
    assert_eq!(
        app.deliver(&body).await,
        (1, true),
        "same position as the original"
    );
    assert_eq!(app.deliver(&body).await, (1, true));
    assert_eq!(
        app.event_count().await,
        (2, 2),
        "two events, two extra deliveries"
    );
    app.wait_for_projection().await;
    assert_eq!(
        app.account_view(ACCOUNT).await["version"],
        2,
        "redeliveries do not count"
    );
    app.stop().await;
}

#[tokio::test]
async fn after_the_dedup_window_an_identical_body_is_a_new_event() {
    let mut settings = test_settings().await;
    settings.dedup_window = Duration::from_millis(300);
    let app = spawn_app_with(settings).await;
    // A resource-less accounts.updated repeats byte for byte and still means "changed again".
    let body = fixture("08_accounts.updated.no_resource.json");
    assert_eq!(app.deliver(&body).await, (1, false));
    assert_eq!(app.deliver(&body).await, (1, true), "inside the window");
    let outcome = poll_for("the window has passed", || async {
        let outcome = app.deliver(&body).await;
        (!outcome.1).then_some(outcome)
    })
    .await;
    assert_eq!(outcome, (2, false));
    app.wait_for_projection().await;
    assert_eq!(app.account_view(ACCOUNT).await["version"], 2);
    app.stop().await;
}

struct Case {
    name: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    signature: Option<String>,
    status: u16,
    code: &'static str,
    detail_mentions: &'static str,
}

fn signed(
    name: &'static str,
    body: &[u8],
    status: u16,
    code: &'static str,
    detail_mentions: &'static str,
) -> Case {
    Case {
        name,
        content_type: Some("application/json"),
        body: body.to_vec(),
        signature: Some(sign(body)),
        status,
        code,
        detail_mentions,
    }
}

#[tokio::test]
async fn every_rejection_has_its_status_and_code_and_appends_nothing() {
    let mut settings = test_settings().await;
    settings.max_body_bytes = 4096;
    let app = spawn_app_with(settings).await;
    let good = fixture("01_accounts.added.json");
    let other = fixture("02_accounts.connected.json");
    let mut oversized = good.clone();
    oversized.extend(std::iter::repeat_n(b' ', 5000));
    let cases = vec![
        Case { signature: None, ..signed("no signature", &good, 401, "invalid_signature", "") },
        Case { signature: Some("00".repeat(64)), ..signed("wrong signature", &good, 401, "invalid_signature", "") },
        Case { signature: Some(sign(&other)), ..signed("signature of another body", &good, 401, "invalid_signature", "") },
        Case { signature: Some(sign(&good).to_uppercase()), ..signed("uppercase hex", &good, 401, "invalid_signature", "") },
        Case { signature: Some(sign(&good)[..100].into()), ..signed("truncated signature", &good, 401, "invalid_signature", "") },
        Case { signature: Some(sign_with("other_secret", &good)), ..signed("other secret", &good, 401, "invalid_signature", "") },
        Case { signature: None, ..signed("unsigned garbage", b"not json", 401, "invalid_signature", "") },
        signed("not JSON", b"{\"event\": ", 400, "invalid_json", "JSON"),
        signed("empty body", b"", 400, "invalid_json", "JSON"),
        signed("invalid UTF-8", b"{\"event\":\"\xff\"}", 400, "invalid_json", "JSON"),
        signed("null", b"null", 400, "invalid_payload", "event"),
        signed("array", b"[1,2]", 400, "invalid_payload", "event"),
        signed("no event", br#"{"data":{}}"#, 400, "invalid_payload", "event"),
        signed("event not a string", br#"{"event":7}"#, 400, "invalid_payload", "event"),
        signed(
            "account not a UUID",
            br#"{"event":"accounts.added","data":{"account":"1; DROP TABLE events","user":"018051aa-f7a9-a0db-2f38-6cfa325e9d69"}}"#,
            400,
            "invalid_payload",
            "data.account",
        ),
        signed(
            "no user",
            br#"{"event":"accounts.updated","data":{"account":"0187c66e-e7e5-811c-b006-2232f00f426a"}}"#,
            400,
            "invalid_payload",
            "data.user",
        ),
        signed("over MAX_BODY_BYTES", &oversized, 413, "payload_too_large", "4096"),
        Case { content_type: Some("text/plain"), ..signed("text/plain", &good, 415, "unsupported_media_type", "") },
        Case { content_type: None, ..signed("no content type", &good, 415, "unsupported_media_type", "") },
    ];
    for case in cases {
        let mut request = app
            .client
            .post(format!("{}/webhooks/argyle", app.address))
            .body(case.body.clone());
        if let Some(ct) = case.content_type {
            request = request.header(CONTENT_TYPE, ct);
        }
        if let Some(signature) = &case.signature {
            request = request.header("X-Argyle-Signature", signature);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), case.status, "{}", case.name);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "application/problem+json",
            "{}",
            case.name
        );
        let problem: serde_json::Value = response.json().await.unwrap();
        assert_eq!(problem["code"], case.code, "{}: {problem}", case.name);
        assert_eq!(problem["status"], case.status, "{}", case.name);
        assert_eq!(problem["type"], "about:blank");
        assert!(problem["title"].is_string());
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains(case.detail_mentions),
            "{}: {problem}",
            case.name
        );
    }
    let response = app.get("/webhooks/argyle").await;
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
    assert_eq!(
        app.event_count().await,
        (0, 0),
        "no rejected request appended anything"
    );
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_is_a_503_with_retry_after() {
    let mut settings = test_settings().await;
    settings.database_url = "postgres://postgres@127.0.0.1:1/nowhere".into();
    settings.migrate = false;
    settings.role = Role::Ingest;
    settings.db.acquire_timeout = Duration::from_millis(300);
    let app = spawn_app_with(settings).await;
    let response = app.post_webhook(&fixture("01_accounts.added.json")).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
    let text = response.text().await.unwrap();
    let problem: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(problem["code"], "unavailable");
    assert!(
        !text.contains("127.0.0.1") && !text.to_lowercase().contains("connect"),
        "no internal text: {text}"
    );
    let response = app.get("/readyz").await;
    assert_eq!(response.status(), 503);
    app.shutdown_quietly().await;
}

#[tokio::test]
async fn ingest_refuses_to_start_without_a_secret_unless_unsigned_is_allowed() {
    let mut settings = test_settings().await;
    settings.webhook_secrets = vec![];
    let error = Application::build(settings.clone())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("ARGYLE_WEBHOOK_SECRETS"), "{error}");
    settings.allow_unsigned_webhooks = true;
    let app = spawn_app_with(settings).await;
    let response = app
        .client
        .post(format!("{}/webhooks/argyle", app.address))
        .header(CONTENT_TYPE, "application/json")
        .body(fixture("01_accounts.added.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn any_configured_secret_is_accepted_for_rotation() {
    let mut settings = test_settings().await;
    settings.webhook_secrets = vec!["new_secret".into(), SECRET.into()];
    let app = spawn_app_with(settings).await;
    let old = fixture("01_accounts.added.json");
    assert_eq!(app.deliver(&old).await, (1, false));
    let new = fixture("02_accounts.connected.json");
    let response = app
        .client
        .post(format!("{}/webhooks/argyle", app.address))
        .header(CONTENT_TYPE, "application/json")
        .header("X-Argyle-Signature", sign_with("new_secret", &new))
        .body(new)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn other_families_are_stored_but_not_folded() {
    let app = spawn_app().await;
    let flow = fixtures_dir().join("real-deliveries/2026-08-activity-flow");
    let users_synced = std::fs::read(flow.join("01_users.fully_synced.json")).unwrap();
    let identity = std::fs::read(flow.join("03_identities.added.json")).unwrap();
    app.deliver(&users_synced).await;
    app.deliver(&identity).await;
    app.wait_for_projection().await;
    assert_eq!(app.event_count().await, (2, 0));
    let stored: Vec<Option<String>> =
        sqlx::query_scalar("SELECT account_id::text FROM events ORDER BY position")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        [None, Some("019bfb74-a974-e1fb-d876-0f4e094835f2".into())]
    );
    assert!(
        stored_snapshots(&app.pool).await.is_empty(),
        "no accounts.* event, no snapshot"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_database_refuses_to_change_or_delete_logged_events() {
    let app = spawn_app().await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    for statement in [
        "UPDATE events SET event = 'accounts.removed'",
        "DELETE FROM events",
        "TRUNCATE events CASCADE",
        "UPDATE redeliveries SET signature = 'x'",
        "DELETE FROM redeliveries",
    ] {
        let error = sqlx::query(statement)
            .execute(&app.pool)
            .await
            .expect_err(statement);
        assert!(
            error.to_string().contains("append-only"),
            "{statement}: {error}"
        );
    }
    assert_eq!(app.event_count().await, (1, 1));
    app.stop().await;
}
