//! A client for Argyle's management API (`https://api[-sandbox].argyle.com/v2`): webhook
//! subscriptions and account fetches, over HTTP Basic auth.
//!
//! Every failure is an [`Error`] whose message is one sentence a user can act on. Rate limiting
//! (429) is retried with exponential backoff, honouring `Retry-After`; server errors (5xx) and
//! network failures are retried for requests that are safe to repeat (`GET`, `DELETE`), never for
//! `POST /webhooks`, which could then create a subscription twice: its caller re-checks instead.

#![forbid(unsafe_code)]

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};

pub use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// Argyle's sandbox API, the default.
pub const SANDBOX_URL: &str = "https://api-sandbox.argyle.com/v2";

/// The five account events.
pub const ACCOUNT_EVENTS: [&str; 5] = [
    "accounts.added",
    "accounts.connected",
    "accounts.failed",
    "accounts.updated",
    "accounts.removed",
];

/// Events whose subscription may set `config.include_resource` (Argyle rejects it for others).
pub const RESOURCE_EVENTS: [&str; 4] = [
    "accounts.added",
    "accounts.connected",
    "accounts.failed",
    "accounts.updated",
];

/// What went wrong talking to Argyle, as one sentence.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "ARGYLE_API_URL {0:?} is not an https URL (plain http is allowed only to a loopback address)"
    )]
    InvalidUrl(String),
    #[error(
        "Argyle refused the API key (HTTP {0}); check ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET"
    )]
    Unauthorized(u16),
    #[error("Argyle rejected the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    #[error(
        "Argyle kept rate limiting the request (HTTP 429) after {attempts} attempts; try again later"
    )]
    RateLimited { attempts: u32 },
    #[error("Argyle answered HTTP {status} after {attempts} attempts; try again later")]
    Server { status: u16, attempts: u32 },
    #[error("could not reach Argyle at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Argyle's answer to {what} could not be understood: {reason}")]
    UnexpectedAnswer { what: String, reason: String },
    #[error("Argyle has no {0}")]
    NotFound(String),
}

impl Error {
    /// True when trying again later may succeed (rate limiting, server or network trouble).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Server { .. } | Self::Unreachable { .. }
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl Retry {
    /// The pause before attempt `attempt + 1`: doubling from `first_backoff`, or what
    /// `Retry-After` asks for, never more than `max_backoff`.
    fn pause(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let doubled = self
            .first_backoff
            .saturating_mul(1 << attempt.saturating_sub(1).min(16));
        retry_after.unwrap_or(doubled).min(self.max_backoff)
    }
}

/// A webhook subscription as Argyle shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub name: String,
    pub events: Events,
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    #[serde(default)]
    pub secret: Option<String>,
    pub url: String,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub last_sent_at: Option<String>,
}

impl Webhook {
    pub fn include_resource(&self) -> bool {
        self.config
            .as_ref()
            .and_then(|c| c.get("include_resource"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    }
}

/// A subscription's events: a list, or `"*"` for all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Events {
    List(Vec<String>),
    All(String),
}

impl Events {
    /// The names, sorted, for comparing subscriptions.
    pub fn sorted(&self) -> Vec<String> {
        let mut names = match self {
            Self::List(names) => names.clone(),
            Self::All(all) => vec![all.clone()],
        };
        names.sort();
        names
    }
}

/// `POST /v2/webhooks`'s body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewWebhook {
    pub events: Vec<String>,
    pub name: String,
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<WebhookConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookConfig {
    pub include_resource: bool,
}

/// Accounts per page of `GET /v2/accounts`: Argyle's maximum.
pub const ACCOUNTS_PAGE_SIZE: u32 = 200;

/// The largest page body read: 200 account objects are well under a megabyte.
const MAX_PAGE_BYTES: usize = 32 << 20;

/// One account as `GET /v2/accounts` lists it: its ids, and the object exactly as Argyle wrote it.
#[derive(Debug, Clone)]
pub struct ListedAccount {
    pub id: Uuid,
    pub user: Uuid,
    pub object: Box<RawValue>,
}

/// One page of `GET /v2/accounts`.
#[derive(Debug)]
pub struct AccountPage {
    /// The page's accounts, in Argyle's order.
    pub accounts: Vec<ListedAccount>,
    /// Entries that are not an account object with a UUID `id` and `user`: why, one per entry.
    pub unreadable: Vec<String>,
    /// The next page, `None` on the last.
    pub next: Option<Url>,
}

#[derive(Deserialize)]
struct Page<T> {
    next: Option<String>,
    results: Vec<T>,
}

/// Argyle's management API.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    key_id: String,
    key_secret: String,
    retry: Retry,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Whether the URL's host is this machine: `localhost`, 127.0.0.0/8 or `[::1]`.
fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

impl Client {
    /// A client of the API at `base_url` (e.g. [`SANDBOX_URL`]) with an API key.
    pub fn new(base_url: &str, key_id: &str, key_secret: &str) -> Result<Self> {
        // The API key travels in every request: never in clear text beyond this machine.
        let base = Url::parse(base_url.trim_end_matches('/'))
            .ok()
            .filter(|u| match u.scheme() {
                "https" => u.host().is_some(),
                "http" => is_loopback(u),
                _ => false,
            })
            .ok_or_else(|| Error::InvalidUrl(base_url.to_owned()))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("account-projector/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Unreachable {
                url: base_url.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            http,
            base,
            key_id: key_id.to_owned(),
            key_secret: key_secret.to_owned(),
            retry: Retry::default(),
        })
    }

    /// The API's base URL, as configured (without a trailing slash).
    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// `base` + the path segments, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http(s) URL has a path")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// `GET /v2/accounts/{id}`: the account object exactly as Argyle sent it, or `None` on 404.
    pub async fn get_account(&self, id: Uuid) -> Result<Option<Box<RawValue>>> {
        let url = self.url(&["accounts", &id.to_string()]);
        let response = self.send(Method::GET, url, None, true).await?.0;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let what = format!("GET /accounts/{id}");
        let text = response.text().await.map_err(|e| unexpected(&what, e))?;
        let account: Box<RawValue> =
            serde_json::from_str(&text).map_err(|e| unexpected(&what, e))?;
        if !account.get().starts_with('{') {
            return Err(unexpected(&what, "the account is not a JSON object"));
        }
        Ok(Some(account))
    }

    /// Checks the URL and the key with one cheap request (`GET /v2/accounts?limit=1`), so that a
    /// wrong base URL is not mistaken for accounts that do not exist.
    pub async fn check(&self) -> Result<()> {
        let mut url = self.url(&["accounts"]);
        url.query_pairs_mut().append_pair("limit", "1");
        let response = self.send(Method::GET, url.clone(), None, true).await?.0;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound(format!(
                "accounts endpoint at {url}; check ARGYLE_API_URL (it ends with /v2)"
            )));
        }
        Ok(())
    }

    /// The first page of `GET /v2/accounts` (every account, or one user's), [`ACCOUNTS_PAGE_SIZE`]
    /// at a time.
    pub fn accounts_url(&self, user: Option<Uuid>) -> Url {
        let mut url = self.url(&["accounts"]);
        url.query_pairs_mut()
            .append_pair("limit", &ACCOUNTS_PAGE_SIZE.to_string());
        if let Some(user) = user {
            url.query_pairs_mut().append_pair("user", &user.to_string());
        }
        url
    }

    /// A page URL kept from an earlier listing (to resume it), accepted only on this API's origin
    /// and under its base path.
    pub fn page_url(&self, stored: &str) -> Result<Url> {
        let url = Url::parse(stored).map_err(|e| unexpected("GET /accounts", e))?;
        if url.origin() == self.base.origin() && url.path().starts_with(self.base.path()) {
            Ok(url)
        } else {
            Err(unexpected(
                "GET /accounts",
                format!("the page {url} is not on {}", self.base),
            ))
        }
    }

    /// One page of `GET /v2/accounts` at `url` (from [`Client::accounts_url`], a page's `next`, or
    /// [`Client::page_url`]). Each object is kept byte for byte; an entry that is not an account
    /// is reported in [`AccountPage::unreadable`], the page's other accounts still count.
    pub async fn list_accounts_page(&self, url: &Url) -> Result<AccountPage> {
        const WHAT: &str = "GET /accounts";
        let response = self.send(Method::GET, url.clone(), None, true).await?.0;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound(format!(
                "accounts endpoint at {url}; check ARGYLE_API_URL (it ends with /v2)"
            )));
        }
        let text = read_bounded(response, MAX_PAGE_BYTES)
            .await
            .map_err(|e| unexpected(WHAT, e))?;
        let page: Page<Box<RawValue>> =
            serde_json::from_str(&text).map_err(|e| unexpected(WHAT, e))?;
        #[derive(Deserialize)]
        struct Ids {
            id: Uuid,
            user: Uuid,
        }
        let mut accounts = Vec::with_capacity(page.results.len());
        let mut unreadable = vec![];
        for (index, object) in page.results.into_iter().enumerate() {
            if !object.get().starts_with('{') {
                unreadable.push(format!("entry {index} is not a JSON object"));
                continue;
            }
            match serde_json::from_str::<Ids>(object.get()) {
                Ok(ids) => accounts.push(ListedAccount {
                    id: ids.id,
                    user: ids.user,
                    object,
                }),
                Err(e) => unreadable.push(format!("entry {index}: {e}")),
            }
        }
        let next = match page.next.filter(|n| !n.is_empty()) {
            None => None,
            Some(next) => Some(self.same_origin(url, &next, WHAT)?),
        };
        Ok(AccountPage {
            accounts,
            unreadable,
            next,
        })
    }

    /// `GET /v2/webhooks`, following `next` to the last page.
    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>> {
        let mut url = self.url(&["webhooks"]);
        url.query_pairs_mut().append_pair("limit", "200");
        let mut webhooks = vec![];
        let mut seen = std::collections::HashSet::new();
        loop {
            if !seen.insert(url.clone()) {
                return Err(unexpected(
                    "GET /webhooks",
                    format!("its pages loop back to {url}"),
                ));
            }
            let response = self.send(Method::GET, url.clone(), None, true).await?.0;
            if response.status() == StatusCode::NOT_FOUND {
                return Err(Error::NotFound(format!("webhooks endpoint at {url}")));
            }
            let page: Page<Webhook> = response
                .json()
                .await
                .map_err(|e| unexpected("GET /webhooks", e))?;
            webhooks.extend(page.results);
            match page.next {
                None => return Ok(webhooks),
                Some(next) => url = self.same_origin(&url, &next, "GET /webhooks")?,
            }
        }
    }

    /// `POST /v2/webhooks`. Not retried on server or network errors: the subscription may have
    /// been created. Callers list first and compare.
    pub async fn create_webhook(&self, new: &NewWebhook) -> Result<Webhook> {
        let body = serde_json::to_vec(new).expect("a NewWebhook serialises");
        let response = self
            .send(Method::POST, self.url(&["webhooks"]), Some(body), false)
            .await?
            .0;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound("webhooks endpoint".into()));
        }
        response
            .json()
            .await
            .map_err(|e| unexpected("POST /webhooks", e))
    }

    /// `DELETE /v2/webhooks/{id}`.
    pub async fn delete_webhook(&self, id: &str) -> Result<()> {
        let (response, attempts) = self
            .send(Method::DELETE, self.url(&["webhooks", id]), None, true)
            .await?;
        // After a retry, a 404 may mean the first attempt deleted it.
        if response.status() == StatusCode::NOT_FOUND && attempts == 1 {
            return Err(Error::NotFound(format!("webhook subscription {id}")));
        }
        Ok(())
    }

    /// A `next` link (relative to the page it came from), accepted only on the API's own origin:
    /// the API key must not go elsewhere.
    fn same_origin(&self, page: &Url, next: &str, what: &str) -> Result<Url> {
        let url = page.join(next).map_err(|e| unexpected(what, e))?;
        if url.origin() == self.base.origin() {
            Ok(url)
        } else {
            Err(unexpected(
                what,
                format!(
                    "its next page is on another host ({})",
                    url.origin().ascii_serialization()
                ),
            ))
        }
    }

    /// Sends a request with the API key, retrying as [`Retry`] says. Returns 2xx and 404 answers;
    /// every other status becomes an [`Error`].
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        idempotent: bool,
    ) -> Result<(Response, u32)> {
        let what = format!("{method} {}", url.path());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = attempt >= self.retry.attempts;
            let mut request: RequestBuilder = self
                .http
                .request(method.clone(), url.clone())
                .basic_auth(&self.key_id, Some(&self.key_secret))
                .header(reqwest::header::ACCEPT, "application/json");
            if let Some(body) = &body {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(error) if idempotent && !last => {
                    let pause = self.retry.pause(attempt, None);
                    tracing::warn!(%error, request = %what, ?pause, "Argyle unreachable; retrying");
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(error) => {
                    return Err(Error::Unreachable {
                        url: self.base.to_string(),
                        reason: root_cause(&error),
                    });
                }
            };
            let status = response.status();
            if status.is_success() || status == StatusCode::NOT_FOUND {
                return Ok((response, attempt));
            }
            let retryable =
                status == StatusCode::TOO_MANY_REQUESTS || (idempotent && status.is_server_error());
            if retryable && !last {
                let pause = self.retry.pause(attempt, retry_after(&response));
                tracing::warn!(status = status.as_u16(), request = %what, ?pause, "Argyle asked us to wait; retrying");
                tokio::time::sleep(pause).await;
                continue;
            }
            return Err(match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    Error::Unauthorized(status.as_u16())
                }
                StatusCode::TOO_MANY_REQUESTS => Error::RateLimited { attempts: attempt },
                s if s.is_server_error() => Error::Server {
                    status: s.as_u16(),
                    attempts: attempt,
                },
                s => Error::Rejected {
                    status: s.as_u16(),
                    message: error_message(&response.text().await.unwrap_or_default()),
                },
            });
        }
    }
}

/// The innermost cause ("Connection refused (os error 111)", "operation timed out"): the outer
/// layers only say that sending failed.
fn root_cause(error: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    if error.is_timeout() {
        format!("timed out ({cause})")
    } else {
        cause.to_string()
    }
}

fn unexpected(what: &str, reason: impl std::fmt::Display) -> Error {
    Error::UnexpectedAnswer {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

/// The body as text, refused once it passes `max` bytes.
async fn read_bounded(mut response: Response, max: usize) -> Result<String, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(format!("the answer is larger than {} MiB", max >> 20));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|e| e.to_string())
}

fn retry_after(response: &Response) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// The message of an error answer: `detail` or `message` if present, else each field's errors
/// (`events: ...`), else the text itself; one line, at most 300 characters.
fn error_message(body: &str) -> String {
    let text = match serde_json::from_str::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(fields)) => {
            match ["detail", "message", "error"]
                .iter()
                .find_map(|k| fields.get(*k).and_then(|v| v.as_str()))
            {
                Some(message) => message.to_owned(),
                None => fields
                    .iter()
                    .map(|(field, errors)| format!("{field}: {}", flatten(errors)))
                    .collect::<Vec<_>>()
                    .join("; "),
            }
        }
        Ok(other) => flatten(&other),
        Err(_) => body.to_owned(),
    };
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut cut: String = line.chars().take(300).collect();
    if cut.is_empty() {
        cut = "no reason given".into();
    }
    cut
}

fn flatten(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items.iter().map(flatten).collect::<Vec<_>>().join(", "),
        serde_json::Value::Object(fields) => fields
            .iter()
            .map(|(k, v)| format!("{k}: {}", flatten(v)))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_are_one_line() {
        assert_eq!(
            error_message(r#"{"detail":"Invalid URL."}"#),
            "Invalid URL."
        );
        assert_eq!(
            error_message(
                r#"{"config":["include_resource is not supported for accounts.removed"],"url":["Enter a valid URL."]}"#
            ),
            "config: include_resource is not supported for accounts.removed; url: Enter a valid URL."
        );
        assert_eq!(error_message("Bad\n  gateway"), "Bad gateway");
        assert_eq!(error_message(""), "no reason given");
        assert_eq!(error_message(&"x".repeat(1000)).len(), 300);
    }

    #[test]
    fn backoff_doubles_and_honours_retry_after_within_the_cap() {
        let retry = Retry {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(retry.pause(1, None), Duration::from_millis(100));
        assert_eq!(retry.pause(3, None), Duration::from_millis(400));
        assert_eq!(retry.pause(10, None), Duration::from_secs(1));
        assert_eq!(
            retry.pause(1, Some(Duration::from_secs(5))),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn urls_encode_segments_and_refuse_other_origins() {
        let client = Client::new("https://api-sandbox.argyle.com/v2/", "id", "secret").unwrap();
        assert_eq!(
            client.url(&["webhooks", "a/b"]).as_str(),
            "https://api-sandbox.argyle.com/v2/webhooks/a%2Fb"
        );
        let page = client.url(&["webhooks"]);
        assert_eq!(
            client
                .same_origin(&page, "?cursor=x", "GET /webhooks")
                .unwrap()
                .as_str(),
            "https://api-sandbox.argyle.com/v2/webhooks?cursor=x"
        );
        assert!(
            client
                .same_origin(
                    &page,
                    "https://api-sandbox.argyle.com/v2/webhooks?cursor=x",
                    "GET /webhooks"
                )
                .is_ok()
        );
        assert!(
            client
                .same_origin(&page, "https://evil.example/v2/webhooks", "GET /webhooks")
                .is_err()
        );
        assert!(matches!(
            Client::new("ftp://x", "a", "b"),
            Err(Error::InvalidUrl(_))
        ));
    }

    #[test]
    fn plain_http_is_refused_unless_the_host_is_this_machine() {
        let cases = [
            ("https://api.argyle.com/v2", true),
            ("http://127.0.0.1:9000/v2", true),
            ("http://127.8.9.10/v2", true),
            ("http://localhost:9000", true),
            ("http://LOCALHOST", true),
            ("http://[::1]:9000/v2", true),
            ("http://api.argyle.com/v2", false),
            ("http://10.0.0.1/v2", false),
            ("http://localhost.evil.example/v2", false),
            ("http://[::2]/v2", false),
            ("ws://127.0.0.1/v2", false),
        ];
        for (url, allowed) in cases {
            assert_eq!(Client::new(url, "id", "secret").is_ok(), allowed, "{url}");
        }
        assert_eq!(cases.len(), 11);
    }
}
