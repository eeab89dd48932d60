//! The OpenAPI description of the query routes, generated from the handlers.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::history;

/// `/v1/*`.
#[derive(OpenApi)]
#[openapi(
    paths(
        crate::get_account,
        crate::get_user_accounts,
        history::account_events,
        history::account_changes,
        history::all_events,
        history::quarantine,
        crate::feed::feed,
        crate::feed::feed_stream,
    ),
    components(schemas(crate::Problem)),
    modifiers(&QueryRoutes),
    tags(
        (name = "accounts", description = "Current and past account views"),
        (name = "audit", description = "The event log, field-level changes and quarantined events"),
        (name = "feed", description = "Following the projection: the compacted change feed"),
    )
)]
pub struct ApiDoc;

/// What every `/v1` route shares: the bearer scheme, 401 without a valid token, and 503 when the
/// database is unreachable or slower than `DATABASE_TIMEOUT`.
struct QueryRoutes;

impl Modify for QueryRoutes {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from API_TOKENS (required unless the service runs with ALLOW_OPEN_API=true)",
                    ))
                    .build(),
            ),
        );
        let requirement =
            utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new());
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for operation in item.get.iter_mut() {
                operation.security = Some(vec![requirement.clone()]);
                let responses = &mut operation.responses.responses;
                responses.insert(
                    "401".into(),
                    problem("`unauthorized`: no valid bearer token was given").into(),
                );
                responses.insert(
                    "503".into(),
                    problem("`unavailable`: the database is unreachable or slow; see Retry-After")
                        .into(),
                );
            }
        }
    }
}

/// A response whose body is a problem document.
fn problem(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}
