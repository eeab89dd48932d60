//! The client against a fake Argyle API serving Argyle's real response shapes.

use std::time::Duration;

use argyle::{Client, Error, NewWebhook, Retry, WebhookConfig};
use serde_json::json;
use uuid::Uuid;
use wiremock::matchers::{basic_auth, body_json, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const KEY_ID: &str = "key_id_123";
const KEY_SECRET: &str = "key_secret_456";

fn real(name: &str) -> serde_json::Value {
    let path = format!(
        "{}/../../tests/fixtures/real-deliveries/api/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn client(server: &MockServer) -> Client {
    Client::new(&format!("{}/v2", server.uri()), KEY_ID, KEY_SECRET)
        .unwrap()
        .with_retry(Retry {
            attempts: 3,
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        })
}

/// Only requests with the API key match: anything else falls through to wiremock's 404.
fn authed(verb: &str, route: &str) -> wiremock::MockBuilder {
    Mock::given(method(verb))
        .and(path(route))
        .and(basic_auth(KEY_ID, KEY_SECRET))
}

#[tokio::test]
async fn create_posts_the_subscription_with_basic_auth() {
    let server = MockServer::start().await;
    authed("POST", "/v2/webhooks")
        .and(body_json(json!({
            "events": ["accounts.connected"],
            "name": "george-test-delete-later",
            "url": "https://your-webhook-backend.com",
            "secret": "optional-secret",
            "config": {"include_resource": true}
        })))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(real("create_webhook_response.json")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let created = client(&server)
        .create_webhook(&NewWebhook {
            events: vec!["accounts.connected".into()],
            name: "george-test-delete-later".into(),
            url: "https://your-webhook-backend.com".into(),
            secret: Some("optional-secret".into()),
            config: Some(WebhookConfig {
                include_resource: true,
            }),
        })
        .await
        .unwrap();
    assert_eq!(created.id, "85fab193-1195-47e3-951b-fbbfbbac3d3e");
    assert!(created.include_resource());
}

#[tokio::test]
async fn list_follows_next_across_pages() {
    let server = MockServer::start().await;
    let hook = |id: &str| {
        let mut w = real("create_webhook_response.json");
        w["id"] = id.into();
        w
    };
    authed("GET", "/v2/webhooks")
        .and(query_param("cursor", "page2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "next": null, "previous": format!("{}/v2/webhooks", server.uri()),
            "results": [hook("c")]
        })))
        .expect(1)
        .mount(&server)
        .await;
    authed("GET", "/v2/webhooks")
        .and(query_param("limit", "200"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "next": format!("{}/v2/webhooks?cursor=page2", server.uri()),
            "previous": null,
            "results": [hook("a"), hook("b")]
        })))
        .expect(1)
        .mount(&server)
        .await;
    let listed = client(&server).list_webhooks().await.unwrap();
    let ids: Vec<_> = listed.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
}

#[tokio::test]
async fn a_next_link_to_another_host_is_not_followed() {
    let server = MockServer::start().await;
    authed("GET", "/v2/webhooks")
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "next": "https://elsewhere.example/v2/webhooks?cursor=x", "previous": null, "results": []
        })))
        .mount(&server)
        .await;
    let error = client(&server).list_webhooks().await.unwrap_err();
    assert!(error.to_string().contains("another host"), "{error}");
}

#[tokio::test]
async fn delete_and_a_missing_subscription() {
    let server = MockServer::start().await;
    authed("DELETE", "/v2/webhooks/85fab193")
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let client = client(&server);
    client.delete_webhook("85fab193").await.unwrap();
    let missing = client.delete_webhook("nope").await.unwrap_err();
    assert!(matches!(missing, Error::NotFound(_)));
    assert_eq!(
        missing.to_string(),
        "Argyle has no webhook subscription nope"
    );
}

#[tokio::test]
async fn get_account_keeps_the_bytes_and_maps_404_to_none() {
    let server = MockServer::start().await;
    let id = Uuid::parse_str("019571bc-2f60-3955-d972-dbadfe0913a8").unwrap();
    let body = std::fs::read(format!(
        "{}/../../tests/fixtures/real-deliveries/api/get_account.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    authed("GET", &format!("/v2/accounts/{id}"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(body.clone(), "application/json"))
        .mount(&server)
        .await;
    let client = client(&server);
    let account = client.get_account(id).await.unwrap().unwrap();
    // The object exactly as sent (the file ends with a newline after it).
    assert!(account.get().as_bytes() == body.trim_ascii_end());
    assert!(client.get_account(Uuid::new_v4()).await.unwrap().is_none());
}

#[tokio::test]
async fn errors_become_one_sentence() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v2/webhooks"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"detail": "Invalid credentials."})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v2/webhooks"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"config": ["include_resource is not supported for accounts.removed."]}),
        ))
        .mount(&server)
        .await;
    let client = client(&server);
    let unauthorized = client.list_webhooks().await.unwrap_err();
    assert_eq!(
        unauthorized.to_string(),
        "Argyle refused the API key (HTTP 401); check ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET"
    );
    let rejected = client
        .create_webhook(&NewWebhook {
            events: vec!["accounts.removed".into()],
            name: "n".into(),
            url: "https://x.example".into(),
            secret: None,
            config: Some(WebhookConfig {
                include_resource: true,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        rejected.to_string(),
        "Argyle rejected the request (HTTP 400): config: include_resource is not supported for accounts.removed."
    );
    assert!(!rejected.is_transient());
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_then_reported() {
    let server = MockServer::start().await;
    let id = Uuid::new_v4();
    // 429, then 503, then the account.
    authed("GET", &format!("/v2/accounts/{id}"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "0"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    authed("GET", &format!("/v2/accounts/{id}"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    authed("GET", &format!("/v2/accounts/{id}"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": id})))
        .expect(1)
        .mount(&server)
        .await;
    let client = client(&server);
    assert!(client.get_account(id).await.unwrap().is_some());

    // Always 500: three attempts, then one sentence.
    let broken = Uuid::new_v4();
    authed("GET", &format!("/v2/accounts/{broken}"))
        .respond_with(ResponseTemplate::new(500))
        .expect(3)
        .mount(&server)
        .await;
    let error = client.get_account(broken).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "Argyle answered HTTP 500 after 3 attempts; try again later"
    );
    assert!(error.is_transient());
}

#[tokio::test]
async fn a_create_is_not_repeated_after_a_server_error() {
    let server = MockServer::start().await;
    authed("POST", "/v2/webhooks")
        .respond_with(ResponseTemplate::new(502))
        .expect(1)
        .mount(&server)
        .await;
    let error = client(&server)
        .create_webhook(&NewWebhook {
            events: vec!["accounts.added".into()],
            name: "n".into(),
            url: "https://x.example".into(),
            secret: None,
            config: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Server {
                status: 502,
                attempts: 1
            }
        ),
        "{error}"
    );
    let seen: Vec<Request> = server.received_requests().await.unwrap();
    assert_eq!(seen.len(), 1);
}

#[tokio::test]
async fn retry_after_is_honoured_and_a_rate_limited_create_is_retried() {
    let server = MockServer::start().await;
    authed("POST", "/v2/webhooks")
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    authed("POST", "/v2/webhooks")
        .respond_with(
            ResponseTemplate::new(201).set_body_json(real("create_webhook_response.json")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let client = Client::new(&format!("{}/v2", server.uri()), KEY_ID, KEY_SECRET)
        .unwrap()
        .with_retry(Retry {
            attempts: 3,
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(5),
        });
    let started = std::time::Instant::now();
    // Argyle refused the first POST before doing anything, so repeating it cannot duplicate.
    client
        .create_webhook(&NewWebhook {
            events: vec!["accounts.added".into()],
            name: "n".into(),
            url: "https://x.example".into(),
            secret: None,
            config: None,
        })
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retried after {:?}, before the Retry-After of 1 s",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_delete_retried_after_a_server_error_that_finds_nothing_succeeded() {
    let server = MockServer::start().await;
    // The first DELETE went through but its answer was lost as a 502; the retry finds nothing.
    authed("DELETE", "/v2/webhooks/w1")
        .respond_with(ResponseTemplate::new(502))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    authed("DELETE", "/v2/webhooks/w1")
        .respond_with(ResponseTemplate::new(404))
        .expect(1)
        .mount(&server)
        .await;
    client(&server).delete_webhook("w1").await.unwrap();
}

#[tokio::test]
async fn check_tells_a_wrong_base_url_from_a_missing_account() {
    let server = MockServer::start().await;
    authed("GET", "/v2/accounts")
        .and(query_param("limit", "1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(real("list_accounts.json")))
        .mount(&server)
        .await;
    client(&server).check().await.unwrap();
    let wrong = Client::new(&server.uri(), KEY_ID, KEY_SECRET).unwrap();
    let error = wrong.check().await.unwrap_err();
    assert!(
        error.to_string().contains("check ARGYLE_API_URL"),
        "{error}"
    );
}

#[tokio::test]
async fn an_accounts_page_keeps_each_object_and_reports_entries_that_are_not_accounts() {
    let server = MockServer::start().await;
    let account = real("list_accounts.json")["results"][0].clone();
    let next = format!("{}/v2/accounts?limit=200&cursor=abc", server.uri());
    authed("GET", "/v2/accounts")
        .and(query_param("limit", "200"))
        .and(query_param("user", "018051aa-f7a9-a0db-2f38-6cfa325e9d69"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "next": next,
            "previous": null,
            "results": [account, 7, {"id": "not a uuid", "user": "x"}, {"user": account["user"]}]
        })))
        .mount(&server)
        .await;
    let client = client(&server);
    let first = client.accounts_url(Some(
        "018051aa-f7a9-a0db-2f38-6cfa325e9d69".parse().unwrap(),
    ));
    let page = client.list_accounts_page(&first).await.unwrap();
    assert_eq!(page.accounts.len(), 1);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(page.accounts[0].object.get()).unwrap(),
        account
    );
    assert_eq!(
        page.accounts[0].id.to_string(),
        account["id"].as_str().unwrap()
    );
    assert_eq!(page.unreadable.len(), 3, "{:?}", page.unreadable);
    assert_eq!(page.next.as_ref().map(|u| u.as_str()), Some(next.as_str()));
    // A kept page URL is accepted only on the API's own origin and path.
    assert!(client.page_url(&next).is_ok());
    assert!(
        client
            .page_url("https://evil.example/v2/accounts?cursor=abc")
            .is_err()
    );
    assert!(
        client
            .page_url(&format!("{}/other?cursor=abc", server.uri()))
            .is_err()
    );
}

#[tokio::test]
async fn an_accounts_page_that_is_not_a_page_or_leads_elsewhere_is_one_sentence() {
    let server = MockServer::start().await;
    let client = client(&server);
    let cases = [
        ResponseTemplate::new(200).set_body_raw("{\"results\": [", "application/json"),
        ResponseTemplate::new(200).set_body_json(json!({"next": null})),
        ResponseTemplate::new(200)
            .set_body_json(json!({"next": "https://evil.example/v2/accounts", "results": []})),
        ResponseTemplate::new(200).set_body_raw(vec![b' '; 33 << 20], "application/json"),
    ];
    let mut ran = 0;
    for answer in cases {
        server.reset().await;
        authed("GET", "/v2/accounts")
            .respond_with(answer)
            .mount(&server)
            .await;
        let error = client
            .list_accounts_page(&client.accounts_url(None))
            .await
            .unwrap_err();
        assert!(matches!(error, Error::UnexpectedAnswer { .. }), "{error}");
        assert_eq!(error.to_string().lines().count(), 1);
        ran += 1;
    }
    assert_eq!(ran, 4);
}
