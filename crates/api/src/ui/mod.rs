//! `/ui/`: pages a person reads (support, audit) over the same reads as `/v1`.
//!
//! # Layout
//! - this module: the routes, sign-in and sessions, CSRF, the security headers every page carries,
//!   and error pages.
//! - [`pages`]: one handler per page, each with its template (`templates/ui/`, checked at compile
//!   time by askama).
//! - [`timeline`]: an account's events newest first, each with what it changed, folded with the
//!   same [`domain::step`] as every fold of the log.
//! - [`diff`]: what an event changed, field by field (old → new).
//!
//! # Sessions
//! Behind the same tokens as `/v1`: the sign-in form exchanges an API token for a session. The
//! cookie holds 32 random bytes (hex) and is `HttpOnly`, `SameSite=Strict`, `Path=/ui`, expires with
//! the session (`UI_SESSION_TTL`), and is `Secure` when the request came over HTTPS (as a proxy in
//! front says with `X-Forwarded-Proto` or `Forwarded`). The database keeps digests only
//! ([`store::sessions`]); sign-out deletes the session, and a token taken out of `API_TOKENS` ends
//! its sessions. Without tokens (`--allow-open-api`) the pages are open, as `/v1` is.
//!
//! # CSRF
//! The only forms that change anything are sign-in and sign-out (POST). Sign-in carries a token
//! that must equal a cookie set with the form (double submit); sign-out carries one derived from
//! the session id, which a page of another site cannot read. Both are refused when the browser
//! says the request came from another site (`Sec-Fetch-Site`), and `SameSite=Strict` keeps the
//! session cookie off cross-site requests in the first place. Search is a GET and changes nothing.

mod diff;
mod pages;
mod timeline;

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{ApiState, Problem};

/// How the pages behave.
#[derive(Debug, Clone, Copy)]
pub struct UiConfig {
    /// A session ends this long after sign-in.
    pub session_ttl: Duration,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(8 * 3600),
        }
    }
}

/// The page's policy: no script at all, styles and images from this service only, forms posted
/// only here, never framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const SESSION_COOKIE: &str = "ap_session";
const SIGN_IN_COOKIE: &str = "ap_sign_in";
/// A form body is a token and a CSRF value: anything longer is refused before it is read.
const FORM_BYTES: usize = 16 * 1024;

/// The `/ui/` routes. Pages need a session (or open tokens); sign-in and the assets do not.
pub(crate) fn router(state: Arc<ApiState>) -> Router {
    let pages = Router::new()
        .route("/ui/", get(pages::home))
        .route("/ui/users/{user_id}", get(pages::user))
        .route("/ui/accounts/{account_id}", get(pages::account))
        .route(
            "/ui/accounts/{account_id}/events/{position}",
            get(pages::event),
        )
        .route("/ui/health", get(pages::health))
        .route("/ui/sign-out", post(pages::sign_out))
        .route("/ui/{*rest}", get(pages::not_found))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_session,
        ));
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/sign-in", get(pages::sign_in_form).post(pages::sign_in))
        .route("/ui/assets/ui.css", get(stylesheet))
        .route("/ui/assets/icon.svg", get(icon))
        .merge(pages)
        // Outside the session check and around sign-in too: a hung database is a page that says so.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            page_deadline,
        ))
        .layer(DefaultBodyLimit::max(FORM_BYTES))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

/// Who is looking at a page, as [`require_session`] found.
#[derive(Debug, Clone)]
pub(crate) struct Visitor {
    /// The session id; `None` when the pages are open (no tokens).
    session: Option<String>,
}

impl Visitor {
    /// The value sign-out must carry: derived from the session id, so only a page that was served
    /// to this session knows it.
    fn csrf(&self) -> String {
        self.session.as_deref().map(csrf_for).unwrap_or_default()
    }
}

fn csrf_for(session: &str) -> String {
    hex::encode(
        Sha256::new_with_prefix(b"ui sign-out\0")
            .chain_update(session)
            .finalize(),
    )
}

async fn require_session(
    State(state): State<Arc<ApiState>>,
    mut request: Request,
    next: Next,
) -> Response {
    if state.tokens.is_empty() {
        request.extensions_mut().insert(Visitor { session: None });
        return next.run(request).await;
    }
    let Some(id) = cookie(request.headers(), SESSION_COOKIE) else {
        return to_sign_in(&request, None);
    };
    match session_is_live(&state, &id).await {
        Ok(true) => {
            request
                .extensions_mut()
                .insert(Visitor { session: Some(id) });
            next.run(request).await
        }
        Ok(false) => {
            let mut response = to_sign_in(&request, Some("expired"));
            set_cookie(&mut response, removal(SESSION_COOKIE, request.headers()));
            response
        }
        Err(error) => error.into_response(),
    }
}

/// Whether `id` opens a session that has not expired, made with a token still configured.
async fn session_is_live(state: &ApiState, id: &str) -> Result<bool, UiError> {
    let mut conn = state.sessions.acquire().await.map_err(Problem::from)?;
    let session = store::sessions::find(&mut conn, id.as_bytes())
        .await
        .map_err(Problem::from)?;
    conn.release();
    Ok(session.is_some_and(|s| {
        state
            .tokens
            .iter()
            .any(|t| bool::from(store::sessions::token_digest(t.as_bytes()).ct_eq(&s.token_sha256)))
    }))
}

/// A redirect to the sign-in page that comes back here after it (to the start page after a
/// form, which cannot be replayed as a GET).
fn to_sign_in(request: &Request, notice: Option<&str>) -> Response {
    let here = match *request.method() {
        axum::http::Method::GET => request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/ui/"),
        _ => "/ui/",
    };
    let mut query = vec![("next", here)];
    if let Some(notice) = notice {
        query.push(("notice", notice));
    }
    let query = serde_urlencoded::to_string(query).unwrap_or_default();
    Redirect::to(&format!("/ui/sign-in?{query}")).into_response()
}

/// A place to return to after sign-in: a page of `/ui/` on this service, never another site.
fn safe_next(next: &str) -> &str {
    let local = next.starts_with("/ui/")
        && !next.contains("//")
        && !next.contains('\\')
        && !next.chars().any(char::is_control);
    if local { next } else { "/ui/" }
}

/// Queries behind a page take at most the database deadline; past it, a page that says so.
async fn page_deadline(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(state.database_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(timeout = ?state.database_timeout, "page timed out");
            UiError::Unavailable.into_response()
        }
    }
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let set = |headers: &mut HeaderMap, name: HeaderName, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY,
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(
        headers,
        HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        // Pages show personal data: never kept by a browser or a proxy.
        set(headers, header::CACHE_CONTROL, "no-store");
    }
    response
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../../assets/ui.css"),
    )
}

async fn icon() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../../assets/icon.svg"),
    )
}

/// The value of cookie `name`, if the request carries it.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

/// Whether the browser reached this service over HTTPS: directly, or as a proxy in front says.
/// Believing a forged header only makes that client's own cookie `Secure`.
fn over_https(headers: &HeaderMap) -> bool {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    header("x-forwarded-proto").is_some_and(|p| p.split(',').next().map(str::trim) == Some("https"))
        || header("forwarded").is_some_and(|f| {
            f.split(';')
                .flat_map(|part| part.split(','))
                .any(|pair| pair.trim() == "proto=https")
        })
}

/// A cookie of the pages: `HttpOnly`, `SameSite=Strict`, `Path=/ui`, `Secure` over HTTPS.
fn page_cookie(
    name: &'static str,
    value: String,
    max_age: Duration,
    headers: &HeaderMap,
) -> cookie::Cookie<'static> {
    cookie::Cookie::build((name, value))
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .path("/ui")
        .secure(over_https(headers))
        .max_age(cookie::time::Duration::seconds(
            max_age.as_secs().min(i64::MAX as u64) as i64,
        ))
        .build()
}

/// Tells the browser to forget cookie `name`.
fn removal(name: &'static str, headers: &HeaderMap) -> cookie::Cookie<'static> {
    let mut gone = page_cookie(name, String::new(), Duration::ZERO, headers);
    gone.make_removal();
    gone
}

fn set_cookie(response: &mut Response, cookie: cookie::Cookie<'static>) {
    if let Ok(value) = HeaderValue::from_str(&cookie.to_string()) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}

/// 32 random bytes, hex: a session id or a sign-in form's CSRF value.
fn random_secret() -> String {
    use rand::TryRngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system provides randomness");
    hex::encode(bytes)
}

/// Whether the browser says this request was made by a page of another site. Browsers that send
/// no `Sec-Fetch-Site` are judged by the CSRF value alone.
fn from_another_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|site| !matches!(site, "same-origin" | "none"))
}

/// Equal, compared in constant time.
fn same_secret(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// What a page answers when it cannot show what was asked: a page, never JSON.
#[derive(Debug)]
pub(crate) enum UiError {
    /// A malformed id or parameter; the detail says which.
    BadRequest(String),
    /// Nothing is known by that id.
    NotFound(String),
    /// A form that did not come from this service's own page.
    Forbidden(String),
    /// A form longer than any form of these pages.
    TooLarge,
    /// The database does not answer.
    Unavailable,
    /// A fault of ours; the detail went to the log.
    Internal,
}

impl From<Problem> for UiError {
    fn from(problem: Problem) -> Self {
        match problem.status {
            400 => Self::BadRequest(problem.detail),
            404 => Self::NotFound(problem.detail),
            503 => Self::Unavailable,
            _ => Self::Internal,
        }
    }
}

impl From<store::Error> for UiError {
    fn from(error: store::Error) -> Self {
        Problem::from(error).into()
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let (status, heading, message) = match self {
            Self::BadRequest(detail) => (StatusCode::BAD_REQUEST, "Check what was asked", detail),
            Self::NotFound(detail) => (StatusCode::NOT_FOUND, "Not found", detail),
            Self::Forbidden(detail) => (StatusCode::FORBIDDEN, "Refused", detail),
            Self::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "That form is too long",
                format!(
                    "A form of these pages is at most {} KiB.",
                    FORM_BYTES / 1024
                ),
            ),
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "The database is not answering",
                "Nothing is lost: webhooks are still logged once the database is back. \
                 Try this page again in a moment."
                    .to_owned(),
            ),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "This page could not be shown; the service's log has the details.".to_owned(),
            ),
        };
        let mut response = render(
            status,
            &pages::ErrorPage {
                chrome: pages::Chrome::none(),
                status: status.as_u16(),
                heading,
                message,
            },
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

/// A page with `status`; a template that fails to render is logged and answered 500.
fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(error) => {
            tracing::error!(%error, "a page failed to render");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pages_of_this_service_are_returned_to() {
        let cases = [
            (
                "/ui/accounts/x?at_position=3",
                "/ui/accounts/x?at_position=3",
            ),
            ("/ui/", "/ui/"),
            ("https://evil.example/ui/", "/ui/"),
            ("//evil.example/ui/", "/ui/"),
            ("/ui//evil.example", "/ui/"),
            ("/ui/\\evil", "/ui/"),
            ("/v1/events", "/ui/"),
            ("/ui/\r\nSet-Cookie: x", "/ui/"),
            ("", "/ui/"),
        ];
        for (next, expected) in cases {
            assert_eq!(safe_next(next), expected, "{next:?}");
        }
        assert_eq!(cases.len(), 9);
    }

    #[test]
    fn https_is_recognised_from_the_proxy_headers() {
        let cases = [
            (vec![], false),
            (vec![("x-forwarded-proto", "https")], true),
            (vec![("x-forwarded-proto", "HTTPS, http")], true),
            (vec![("x-forwarded-proto", "http")], false),
            (vec![("forwarded", "for=1.2.3.4;proto=https;by=x")], true),
            (vec![("forwarded", "for=1.2.3.4;proto=http")], false),
        ];
        let mut ran = 0;
        for (pairs, expected) in cases {
            let mut headers = HeaderMap::new();
            for (name, value) in &pairs {
                headers.insert(*name, HeaderValue::from_static(value));
            }
            assert_eq!(over_https(&headers), expected, "{pairs:?}");
            ran += 1;
        }
        assert_eq!(ran, 6);
    }
}
