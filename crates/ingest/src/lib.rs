//! Webhook ingest: `POST /webhooks/argyle` verifies Argyle's signature and appends the delivery to
//! the event log, answering 200 only once it is committed.
//!
//! # Layout
//! - [`router`] and its one handler, which checks, in order: content type (415), size (413),
//!   signature (401), JSON (400 `invalid_json`), envelope (400 `invalid_payload`), then appends.
//! - [`Secrets`]: the HMAC-SHA512 check against every configured secret (rotation).
//! - [`committer`]: group commit, on [`web::Batcher`]: deliveries that arrive together share one
//!   transaction.
//!
//! Every rejection happens before the store is called, so a rejected request appends nothing.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use axum::{Json, Router};
use domain::{Envelope, EnvelopeError};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha512;
use store::log::Delivery;
use web::Problem;

pub mod committer;

pub use committer::{AppendError, Committer};

/// Header carrying the lowercase hex HMAC-SHA512 of the raw body.
pub const SIGNATURE_HEADER: &str = "x-argyle-signature";

/// The webhook secrets a delivery may be signed with. Empty means signatures are not checked, which
/// the binary allows only with `ALLOW_UNSIGNED_WEBHOOKS=true`.
#[derive(Clone, Default)]
pub struct Secrets(Arc<Vec<Vec<u8>>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} configured)", self.0.len())
    }
}

impl Secrets {
    pub fn new<S: AsRef<[u8]>>(secrets: impl IntoIterator<Item = S>) -> Self {
        Self(Arc::new(
            secrets
                .into_iter()
                .map(|s| s.as_ref().to_vec())
                .filter(|s| !s.is_empty())
                .collect(),
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `header` is the lowercase hex HMAC-SHA512 of `body` under any secret.
    /// The MAC comparison is constant time; every secret is tried.
    pub fn verify(&self, body: &[u8], header: Option<&[u8]>) -> bool {
        let Some(header) = header else { return false };
        if header.len() != 128
            || !header
                .iter()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return false;
        }
        let Ok(signature) = hex::decode(header) else {
            return false;
        };
        self.0.iter().fold(false, |matched, secret| {
            let mut mac =
                Hmac::<Sha512>::new_from_slice(secret).expect("HMAC accepts keys of any length");
            mac.update(body);
            mac.verify_slice(&signature).is_ok() | matched
        })
    }
}

/// What the ingest route needs.
#[derive(Clone, Debug)]
pub struct IngestState {
    /// Appends deliveries, sharing commits between concurrent requests.
    pub committer: Committer,
    pub secrets: Secrets,
    /// Larger bodies are refused with 413 without being read whole.
    pub max_body_bytes: usize,
    /// An append that takes longer is answered 503: the database is unreachable or stuck. Postgres's
    /// own statement timeout cannot fire when the network to it is what hangs.
    pub database_timeout: Duration,
}

/// `POST /webhooks/argyle`.
pub fn router(state: IngestState) -> Router {
    Router::new()
        .route("/webhooks/argyle", post(receive_counted))
        .with_state(state)
}

/// The OpenAPI description of `POST /webhooks/argyle`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(receive_counted), tags((name = "ingest", description = "Argyle webhook deliveries")))]
pub struct IngestDoc;

/// Receives one Argyle webhook delivery and answers 200 only once it is durably in the log.
///
/// Checked in order: content type (415), size (413), signature (401), JSON (400 `invalid_json`),
/// envelope (400 `invalid_payload`). A rejected request appends nothing. Counted by outcome in
/// `webhooks_total{outcome}`.
#[utoipa::path(
    post,
    path = "/webhooks/argyle",
    tag = "ingest",
    params(
        ("X-Argyle-Signature" = Option<String>, Header,
            description = "Lowercase hex HMAC-SHA512 of the raw body under a webhook secret"),
    ),
    request_body(
        content = WebhookBody, content_type = "application/json",
        description = "Argyle's webhook body, byte for byte, signed as sent",
    ),
    responses(
        (status = 200, description = "Durably appended (or recognised as a redelivery)", body = Accepted),
        (status = 400, description = "`invalid_json`, `invalid_payload` (the detail names the field) or `invalid_body`",
            body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`invalid_signature`: missing or wrong X-Argyle-Signature",
            body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds MAX_BODY_BYTES",
            body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: Content-Type is not JSON",
            body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or slow; see Retry-After",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn receive_counted(
    state: State<IngestState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, Problem> {
    let answer = receive(state, headers, body).await;
    let outcome = match &answer {
        Ok(accepted) if accepted.duplicate => "duplicate",
        Ok(_) => "accepted",
        Err(problem) => problem.code,
    };
    metrics::counter!("webhooks_total", "outcome" => outcome).increment(1);
    answer
}

async fn receive(
    State(state): State<IngestState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, Problem> {
    if !is_json(&headers) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        ));
    }
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body exceeds {} bytes", state.max_body_bytes),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.max_body_bytes as u64) {
        return Err(too_large());
    }
    let body = to_bytes(body, state.max_body_bytes).await.map_err(|e| {
        if is_length_limit(&e) {
            too_large()
        } else {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "the request body could not be read",
            )
        }
    })?;
    let signature = headers.get(SIGNATURE_HEADER);
    if !state.secrets.is_empty() && !state.secrets.verify(&body, signature.map(|v| v.as_bytes())) {
        tracing::warn!(
            signed = signature.is_some(),
            "rejected webhook: invalid signature"
        );
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            "X-Argyle-Signature is missing or does not match the body",
        ));
    }
    let envelope = Envelope::parse(&body).map_err(|e| match e {
        EnvelopeError::InvalidJson(reason) => Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {reason}"),
        ),
        e @ EnvelopeError::InvalidPayload { .. } => {
            Problem::new(StatusCode::BAD_REQUEST, "invalid_payload", e.to_string())
        }
    })?;
    let signature = signature.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let delivery = Delivery::new(&body, signature.as_deref(), &envelope);
    let append = state.committer.append(delivery);
    let appended = match tokio::time::timeout(state.database_timeout, append).await {
        Ok(Ok(appended)) => appended,
        Ok(Err(AppendError::Unavailable)) => return Err(Problem::unavailable()),
        Ok(Err(AppendError::Failed)) => return Err(Problem::internal()),
        Err(_) => {
            // It may still commit; Argyle's retry will then be recognised as a redelivery.
            tracing::warn!(timeout = ?state.database_timeout, "append timed out");
            return Err(Problem::unavailable());
        }
    };
    // On the request's span, so the one `request finished` line says what became of the webhook.
    let span = tracing::Span::current();
    span.record("event", envelope.event.as_str());
    span.record("position", appended.position);
    span.record("duplicate", appended.duplicate);
    Ok(Json(Accepted {
        status: "accepted",
        position: appended.position,
        duplicate: appended.duplicate,
    }))
}

/// Argyle's webhook body as the OpenAPI document describes it (the handler parses it with
/// [`Envelope::parse`], keeping the bytes as received). Written out by hand because what ingest
/// accepts depends on the event's name: an `accounts.*` event needs `data` with UUID `account`
/// and `user`; any other event needs only its name. Every other member may hold any JSON value: signed valid JSON is never refused for it.
struct WebhookBody;

impl utoipa::PartialSchema for WebhookBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let folded = "^accounts\\.";
        let other = "^(?!accounts\\.)";
        let uuid = serde_json::json!({"type": "string", "format": "uuid"});
        serde_json::from_value(serde_json::json!({
            "oneOf": [
                {
                    "type": "object",
                    "description": "An account event: folded into the account's snapshot.",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "pattern": folded},
                        "data": {
                            "type": "object",
                            "required": ["account", "user"],
                            "description": "`resource`, the account object, is there when the subscription includes it.",
                            "properties": {"account": uuid, "user": uuid}
                        }
                    }
                },
                {
                    "type": "object",
                    "description": "An event of another family: stored, never folded.",
                    "required": ["event"],
                    "properties": {
                        "event": {"type": "string", "minLength": 1, "pattern": other}
                    }
                }
            ]
        }))
        .expect("the webhook body's schema is a valid schema")
    }
}

impl utoipa::ToSchema for WebhookBody {}

/// The 200 answer, fields in the contract's order.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Accepted {
    #[schema(value_type = String, example = "accepted")]
    status: &'static str,
    /// The event's log position (the original one for a redelivery).
    #[schema(minimum = 1)]
    position: i64,
    /// True when this body was already in the log within the dedup window.
    duplicate: bool,
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test_webhook_secret";

    #[test]
    fn the_fixture_signatures_verify() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/argyle");
        let vectors = std::fs::read_to_string(format!("{dir}/SIGNATURES.txt")).unwrap();
        let secrets = Secrets::new([SECRET]);
        let mut checked = 0;
        for line in vectors
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (signature, file) = line.split_once("  ").unwrap();
            let body = std::fs::read(format!("{dir}/{file}")).unwrap();
            assert!(secrets.verify(&body, Some(signature.as_bytes())), "{file}");
            assert!(!Secrets::new(["other"]).verify(&body, Some(signature.as_bytes())));
            assert!(!secrets.verify(&body, Some(signature.to_uppercase().as_bytes())));
            assert!(!secrets.verify(&body, Some(&signature.as_bytes()[..127])));
            assert!(!secrets.verify(&body[1..], Some(signature.as_bytes())));
            assert!(Secrets::new(["old", SECRET]).verify(&body, Some(signature.as_bytes())));
            checked += 1;
        }
        assert_eq!(checked, 8);
    }

    #[test]
    fn content_types() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            is_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("Application/JSON"));
        assert!(with("application/problem+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!is_json(&HeaderMap::new()));
    }
}

#[cfg(test)]
mod schema_tests {
    #[test]
    fn the_webhook_body_schema_builds() {
        let _ = <super::WebhookBody as utoipa::PartialSchema>::schema();
    }
}
