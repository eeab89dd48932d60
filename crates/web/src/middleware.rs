//! What every route of the service runs through: one tracing span per request, a time limit,
//! request ids.

use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::Problem;

/// `router` with the fallbacks (404, 405 as problems) and the middleware of every route: a time
/// limit of `request_timeout` plus the request's `?wait=` (408 after it), one span per request, and an `x-request-id`
/// (generated, and sent back).
pub fn finish(router: Router, request_timeout: Duration) -> Router {
    router
        .fallback(crate::problem::not_found)
        .method_not_allowed_fallback(crate::problem::method_not_allowed)
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            time_limit(request_timeout, request, next)
        }))
        .layer(request_span())
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

type RequestSpan = TraceLayer<
    SharedClassifier<ServerErrorsAsFailures>,
    fn(&Request) -> tracing::Span,
    (),
    fn(&Response, Duration, &tracing::Span),
>;

/// One span per request (request id, method, path; status and latency when it ends; for an accepted
/// webhook its event, position and whether it was a redelivery), and one `request finished` line.
/// Only the path is logged: queries and headers may carry secrets.
fn request_span() -> RequestSpan {
    fn make_span(request: &Request) -> tracing::Span {
        let id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::info_span!(
            "request",
            request_id = %id,
            method = %request.method(),
            path = %request.uri().path(),
            status = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
            event = tracing::field::Empty,
            position = tracing::field::Empty,
            duplicate = tracing::field::Empty,
        )
    }
    fn on_response(response: &Response, latency: Duration, span: &tracing::Span) {
        let latency_ms = latency.as_secs_f64() * 1000.0;
        span.record("status", response.status().as_u16());
        span.record("latency_ms", latency_ms);
        tracing::info!(
            status = response.status().as_u16(),
            latency_ms,
            "request finished"
        );
    }
    TraceLayer::new_for_http()
        .make_span_with(make_span as fn(&Request) -> tracing::Span)
        .on_request(())
        .on_response(on_response as fn(&Response, Duration, &tracing::Span))
}

async fn time_limit(limit: Duration, request: Request, next: Next) -> Response {
    // A request that asks to be held open (`?wait=`) gets that long on top.
    let limit = limit + crate::wait::requested(request.uri().query());
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request took too long",
        )
        .into_response(),
    }
}
