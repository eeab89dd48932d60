//! Hostile requests against the real server: each gets its documented status and problem code,
//! never a 5xx, and only the ones documented as accepted append anything.

use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::helpers::*;

const TOKEN: &str = "s3cr3t-api-token-0123456789";

struct Case {
    name: String,
    method: Method,
    path: String,
    content_type: Option<String>,
    signature: Option<String>,
    authorization: Option<String>,
    body: Vec<u8>,
    status: u16,
    code: Option<&'static str>,
}

fn webhook(name: &str, body: Vec<u8>, status: u16, code: Option<&'static str>) -> Case {
    Case {
        name: name.into(),
        method: Method::POST,
        path: "/webhooks/argyle".into(),
        content_type: Some("application/json".into()),
        signature: Some(sign(&body)),
        authorization: None,
        body,
        status,
        code,
    }
}

fn query(
    name: &str,
    path: String,
    authorization: Option<String>,
    status: u16,
    code: Option<&'static str>,
) -> Case {
    Case {
        name: name.into(),
        method: Method::GET,
        path,
        content_type: None,
        signature: None,
        authorization,
        body: vec![],
        status,
        code,
    }
}

/// A fresh, valid `accounts.updated` body (distinct each call, so none is a redelivery).
fn valid() -> Vec<u8> {
    refinement(Uuid::new_v4(), Uuid::new_v4(), 1)
}

fn with_field(name: &str, value: &str) -> Vec<u8> {
    let body = String::from_utf8(valid()).unwrap();
    body.replacen("\"data\"", &format!("\"{name}\": {value},\n  \"data\""), 1)
        .into_bytes()
}

fn envelope(event: &str, data: &str) -> Vec<u8> {
    format!("{{\"event\": {event}, \"data\": {data}}}").into_bytes()
}

const USER_OK: &str = "\"018051aa-f7a9-a0db-2f38-6cfa325e9d69\"";

fn cases(max_body: usize) -> Vec<Case> {
    let good = valid();
    let sig = sign(&good);
    let nested = |depth: usize| {
        format!(
            "{{\"event\":\"x.y\",\"data\":{}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        )
        .into_bytes()
    };
    let mut c = vec![
        // Signatures.
        Case {
            signature: None,
            ..webhook("no signature", good.clone(), 401, Some("invalid_signature"))
        },
        Case {
            signature: Some(String::new()),
            ..webhook(
                "empty signature",
                good.clone(),
                401,
                Some("invalid_signature"),
            )
        },
        Case {
            signature: Some("0".repeat(128)),
            ..webhook(
                "zero signature",
                good.clone(),
                401,
                Some("invalid_signature"),
            )
        },
        Case {
            signature: Some(sig.to_uppercase()),
            ..webhook(
                "uppercase hex",
                good.clone(),
                401,
                Some("invalid_signature"),
            )
        },
        Case {
            signature: Some(sig[..127].into()),
            ..webhook(
                "one digit short",
                good.clone(),
                401,
                Some("invalid_signature"),
            )
        },
        Case {
            signature: Some(format!("{sig}00")),
            ..webhook(
                "one byte long",
                good.clone(),
                401,
                Some("invalid_signature"),
            )
        },
        Case {
            signature: Some(format!("sha512={sig}")),
            ..webhook("prefixed", good.clone(), 401, Some("invalid_signature"))
        },
        Case {
            signature: Some(sign(&valid())),
            ..webhook(
                "signature of another body",
                good.clone(),
                401,
                Some("invalid_signature"),
            )
        },
        Case {
            signature: Some(sign_with("test_webhook_secreT", &good)),
            ..webhook(
                "near-miss secret",
                good.clone(),
                401,
                Some("invalid_signature"),
            )
        },
        Case {
            signature: Some("zz".repeat(64)),
            ..webhook("not hex", good.clone(), 401, Some("invalid_signature"))
        },
        Case {
            signature: None,
            ..webhook(
                "unsigned garbage",
                b"\x00\x01garbage".to_vec(),
                401,
                Some("invalid_signature"),
            )
        },
        // Not JSON.
        webhook("empty body", vec![], 400, Some("invalid_json")),
        webhook(
            "truncated",
            good[..good.len() / 2].to_vec(),
            400,
            Some("invalid_json"),
        ),
        webhook(
            "trailing garbage",
            [good.clone(), b" }".to_vec()].concat(),
            400,
            Some("invalid_json"),
        ),
        webhook(
            "invalid UTF-8",
            b"{\"event\":\"accounts.updated\xff\"}".to_vec(),
            400,
            Some("invalid_json"),
        ),
        webhook(
            "raw NUL byte",
            b"{\"event\":\"a\x00\"}".to_vec(),
            400,
            Some("invalid_json"),
        ),
        webhook(
            "byte order mark",
            [b"\xef\xbb\xbf".to_vec(), good.clone()].concat(),
            400,
            Some("invalid_json"),
        ),
        webhook(
            "nesting 30000 deep",
            nested(30_000),
            400,
            Some("invalid_json"),
        ),
        webhook(
            "nesting 200 deep, well formed",
            nested(200),
            400,
            Some("invalid_json"),
        ),
        webhook(
            "single quotes",
            b"{'event':'accounts.added'}".to_vec(),
            400,
            Some("invalid_json"),
        ),
        // JSON, not an envelope.
        webhook("null", b"null".to_vec(), 400, Some("invalid_payload")),
        webhook(
            "array",
            b"[{\"event\":\"accounts.added\"}]".to_vec(),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "string",
            b"\"accounts.added\"".to_vec(),
            400,
            Some("invalid_payload"),
        ),
        webhook("number", b"12".to_vec(), 400, Some("invalid_payload")),
        webhook("empty object", b"{}".to_vec(), 400, Some("invalid_payload")),
        webhook(
            "event is a number",
            envelope("7", "{}"),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "event is null",
            envelope("null", "{}"),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "event is empty",
            envelope("\"\"", "{}"),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "event is an array",
            envelope("[\"accounts.added\"]", "{}"),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "accounts.* without data",
            b"{\"event\":\"accounts.added\"}".to_vec(),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "data is a string",
            envelope("\"accounts.added\"", "\"x\""),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "account not a UUID",
            envelope(
                "\"accounts.added\"",
                &format!("{{\"account\":\"12345\",\"user\":{USER_OK}}}"),
            ),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "account is a number",
            envelope(
                "\"accounts.added\"",
                &format!("{{\"account\":12345,\"user\":{USER_OK}}}"),
            ),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "account SQL",
            envelope(
                "\"accounts.added\"",
                &format!("{{\"account\":\"'; DROP TABLE events; --\",\"user\":{USER_OK}}}"),
            ),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "user missing",
            envelope(
                "\"accounts.removed\"",
                &format!("{{\"account\":{USER_OK}}}"),
            ),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "escaped U+0000 (signed valid JSON: logged)",
            with_field("note", "\"a\\u0000b\""),
            200,
            None,
        ),
        webhook(
            "escaped lone surrogate (signed valid JSON: logged)",
            with_field("note", "\"a\\ud800b\""),
            200,
            None,
        ),
        webhook(
            "number beyond Postgres numeric (signed valid JSON: logged)",
            with_field("amount", "1e1000000"),
            200,
            None,
        ),
        webhook(
            "duplicate event key",
            b"{\"event\":\"accounts.added\",\"event\":\"paystubs.added\",\"data\":{}}".to_vec(),
            400,
            Some("invalid_payload"),
        ),
        webhook(
            "duplicate account key",
            envelope(
                "\"accounts.added\"",
                &format!("{{\"account\":{USER_OK},\"account\":{USER_OK},\"user\":{USER_OK}}}"),
            ),
            400,
            Some("invalid_payload"),
        ),
        // Strange but valid: stored as they came.
        webhook(
            "SQL-looking strings",
            with_field("note", "\"'); DELETE FROM events; --\""),
            200,
            None,
        ),
        webhook("huge number", with_field("big", "1e400"), 200, None),
        webhook(
            "long integer",
            with_field("big", "123456789012345678901234567890"),
            200,
            None,
        ),
        webhook(
            "unicode and emoji",
            with_field("note", "\"Zoë 🚀 \\ud83d\\ude80 ŝ\""),
            200,
            None,
        ),
        webhook(
            "duplicate unknown keys",
            with_field("x", "1, \"x\": 2"),
            200,
            None,
        ),
        webhook(
            "an unknown family",
            envelope("\"paystubs.added\"", "{\"paystub\":\"p\"}"),
            200,
            None,
        ),
        webhook(
            "a future accounts event",
            envelope(
                "\"accounts.reticulated\"",
                &format!("{{\"account\":{USER_OK},\"user\":{USER_OK}}}"),
            ),
            200,
            None,
        ),
        webhook(
            "near the size limit",
            with_field("pad", &format!("\"{}\"", "x".repeat(max_body - 1024))),
            200,
            None,
        ),
        // Size.
        webhook(
            "one byte over the limit",
            with_field("pad", &format!("\"{}\"", "x".repeat(max_body))),
            413,
            Some("payload_too_large"),
        ),
        webhook(
            "10 MB",
            vec![b' '; 10 * 1024 * 1024],
            413,
            Some("payload_too_large"),
        ),
        // Content types.
        Case {
            content_type: None,
            ..webhook(
                "no content type",
                valid(),
                415,
                Some("unsupported_media_type"),
            )
        },
        Case {
            content_type: Some("text/plain".into()),
            ..webhook("text/plain", valid(), 415, Some("unsupported_media_type"))
        },
        Case {
            content_type: Some("application/xml".into()),
            ..webhook("xml", valid(), 415, Some("unsupported_media_type"))
        },
        Case {
            content_type: Some("application/jsonx".into()),
            ..webhook("jsonx", valid(), 415, Some("unsupported_media_type"))
        },
        Case {
            content_type: Some("multipart/form-data; boundary=x".into()),
            ..webhook("multipart", valid(), 415, Some("unsupported_media_type"))
        },
        Case {
            content_type: Some("application/json; charset=utf-8".into()),
            ..webhook("json with charset", valid(), 200, None)
        },
        // Methods and paths.
        Case {
            method: Method::GET,
            ..webhook("GET webhook", valid(), 405, Some("method_not_allowed"))
        },
        Case {
            method: Method::PUT,
            ..webhook("PUT webhook", valid(), 405, Some("method_not_allowed"))
        },
        Case {
            method: Method::DELETE,
            ..webhook("DELETE webhook", valid(), 405, Some("method_not_allowed"))
        },
        Case {
            method: Method::PATCH,
            ..webhook("PATCH webhook", valid(), 405, Some("method_not_allowed"))
        },
        Case {
            path: "/webhooks/argyle/".into(),
            ..webhook("trailing slash", valid(), 404, Some("not_found"))
        },
        Case {
            path: "/webhooks/ARGYLE".into(),
            ..webhook("other case", valid(), 404, Some("not_found"))
        },
    ];
    let bearer = Some(format!("Bearer {TOKEN}"));
    c.extend([
        query(
            "non-UUID account",
            "/v1/accounts/12345".into(),
            bearer.clone(),
            400,
            Some("invalid_id"),
        ),
        query(
            "traversal in the id",
            "/v1/accounts/..%2F..%2Fetc%2Fpasswd".into(),
            bearer.clone(),
            400,
            Some("invalid_id"),
        ),
        query(
            "SQL in the id",
            "/v1/users/'%3B%20DROP%20TABLE%20events%3B--/accounts".into(),
            bearer.clone(),
            400,
            Some("invalid_id"),
        ),
        query(
            "encoded dots",
            "/%2e%2e/%2e%2e/etc/passwd".into(),
            bearer.clone(),
            404,
            Some("not_found"),
        ),
        query(
            "unknown sub-resource",
            format!("/v1/accounts/{}/secrets", Uuid::new_v4()),
            bearer.clone(),
            404,
            Some("not_found"),
        ),
        query(
            "unknown account",
            format!("/v1/accounts/{}", Uuid::new_v4()),
            bearer.clone(),
            404,
            Some("not_found"),
        ),
        query(
            "no token",
            format!("/v1/accounts/{}", Uuid::new_v4()),
            None,
            401,
            Some("unauthorized"),
        ),
        query(
            "token one char short",
            "/v1/events".into(),
            Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
            401,
            Some("unauthorized"),
        ),
        query(
            "token one char long",
            "/v1/events".into(),
            Some(format!("Bearer {TOKEN}x")),
            401,
            Some("unauthorized"),
        ),
        query(
            "token in other case",
            "/v1/events".into(),
            Some(format!("Bearer {}", TOKEN.to_uppercase())),
            401,
            Some("unauthorized"),
        ),
        query(
            "token without scheme",
            "/v1/events".into(),
            Some(TOKEN.into()),
            401,
            Some("unauthorized"),
        ),
        query(
            "token as Basic",
            "/v1/events".into(),
            Some(format!("Basic {TOKEN}")),
            401,
            Some("unauthorized"),
        ),
        query(
            "scheme only",
            "/v1/events".into(),
            Some("Bearer".into()),
            401,
            Some("unauthorized"),
        ),
        query(
            "the webhook secret as token",
            "/v1/events".into(),
            Some(format!("Bearer {SECRET}")),
            401,
            Some("unauthorized"),
        ),
        query(
            "limit far too large",
            "/v1/events?limit=99999999999999999999".into(),
            bearer.clone(),
            400,
            Some("invalid_query"),
        ),
        query(
            "a valid token",
            "/v1/events".into(),
            bearer.clone(),
            200,
            None,
        ),
    ]);
    c
}

#[tokio::test]
async fn every_hostile_request_gets_its_documented_answer_and_never_a_5xx() {
    let mut settings = test_settings().await;
    settings.api_tokens = vec![TOKEN.into()];
    let max_body = 64 * 1024;
    settings.max_body_bytes = max_body;
    let app = spawn_app_with(settings).await;
    let cases = cases(max_body);
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut accepted = 0;
    for case in cases {
        let mut request = app
            .client
            .request(case.method.clone(), format!("{}{}", app.address, case.path))
            .body(case.body.clone());
        if let Some(ct) = &case.content_type {
            request = request.header(CONTENT_TYPE, ct);
        }
        if let Some(signature) = &case.signature {
            request = request.header("X-Argyle-Signature", signature);
        }
        if let Some(authorization) = &case.authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let status = response.status().as_u16();
        assert!(status < 500, "{}: {status}", case.name);
        assert_eq!(
            status,
            case.status,
            "{}: {}",
            case.name,
            response.text().await.unwrap_or_default()
        );
        if let Some(code) = case.code {
            assert_eq!(
                response.headers()[CONTENT_TYPE],
                "application/problem+json",
                "{}",
                case.name
            );
            let problem: Value = response.json().await.unwrap();
            assert_eq!(problem["code"], code, "{}: {problem}", case.name);
        } else if case.path == "/webhooks/argyle" {
            accepted += 1;
        }
    }
    let (events, redeliveries) = app.event_count().await;
    assert_eq!(
        (events, redeliveries),
        (accepted, 0),
        "exactly the accepted requests were appended"
    );
    app.stop().await;
}

/// Sends raw bytes and returns what the server answered before closing (or timing out).
async fn raw_exchange(port: u16, chunks: &[&[u8]], pause: Duration) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for chunk in chunks {
        if stream.write_all(chunk).await.is_err() {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    let mut answer = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_cannot_exhaust_the_server() {
    let mut settings = test_settings().await;
    settings.request_timeout = Duration::from_millis(800);
    settings.header_timeout = Duration::from_millis(800);
    let app = spawn_app_with(settings).await;
    let port: u16 = app.address.rsplit(':').next().unwrap().parse().unwrap();
    let body = valid();
    let head = format!(
        "POST /webhooks/argyle HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Argyle-Signature: {}\r\nContent-Length: {}\r\n\r\n",
        sign(&body),
        body.len()
    );

    // Fifty clients trickle bodies and fifty trickle headers, all at once.
    let mut slow = vec![];
    for i in 0..100 {
        let (head, body) = (head.clone(), body.clone());
        slow.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = if i % 2 == 0 {
                let bytes: Vec<&[u8]> = std::iter::once(head.as_bytes())
                    .chain(body.chunks(1))
                    .collect();
                raw_exchange(port, &bytes, Duration::from_millis(50)).await
            } else {
                let bytes: Vec<&[u8]> = head.as_bytes().chunks(1).collect();
                raw_exchange(port, &bytes, Duration::from_millis(50)).await
            };
            (i, answer, started.elapsed())
        }));
    }
    // Meanwhile an honest client is served promptly.
    let started = Instant::now();
    assert!(!app.deliver(&valid()).await.1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served in {:?}",
        started.elapsed()
    );

    for task in slow {
        let (i, answer, elapsed) = task.await.unwrap();
        assert!(
            elapsed < Duration::from_secs(8),
            "client {i} was cut off after {elapsed:?}"
        );
        if i % 2 == 0 {
            assert!(
                answer.starts_with("HTTP/1.1 408"),
                "a trickled body gets 408: {answer:?}"
            );
            assert!(answer.contains("request_timeout"));
        } else {
            assert!(
                !answer.contains("200 OK"),
                "trickled headers are never served: {answer:?}"
            );
        }
    }
    assert_eq!(
        app.event_count().await,
        (1, 0),
        "only the honest delivery was appended"
    );
    app.stop().await;
}
