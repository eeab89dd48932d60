//! `GET /openapi.json`: the OpenAPI 3 document of every route, generated from the handlers.

use std::sync::OnceLock;

use axum::Json;
use axum::response::IntoResponse;
use utoipa::OpenApi;

/// `/metrics` and `/openapi.json`; the other routes are described by their own crates.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "account-projector",
        description = "An append-only log of Argyle account webhooks and the account snapshots folded \
            from it. Errors are RFC 9457 `application/problem+json` with a stable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(crate::telemetry::metrics, openapi_json)
)]
struct ServiceDoc;

/// The whole service's document: ingest, query API, health, metrics and this route.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ServiceDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.merge(api::openapi::ApiDoc::openapi());
    doc.merge(web::HealthDoc::openapi());
    doc.merge(ingest::IngestDoc::openapi());
    doc
}

/// This OpenAPI 3 document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document of this service",
        body = Object, content_type = "application/json"))
)]
pub async fn openapi_json() -> impl IntoResponse {
    static DOCUMENT: OnceLock<serde_json::Value> = OnceLock::new();
    Json(
        DOCUMENT
            .get_or_init(|| serde_json::to_value(document()).expect("the document serialises"))
            .clone(),
    )
}
