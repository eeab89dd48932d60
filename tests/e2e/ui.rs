//! The pages under `/ui/`: sessions, CSRF, headers, and what each page shows. The same pages are
//! driven in a real browser by `tests/ui/browser.py`.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use uuid::Uuid;

use crate::helpers::*;

pub(crate) const TOKEN: &str = "ui-test-token-0123456789";
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn closed_app() -> TestApp {
    let mut settings = test_settings().await;
    settings.allow_open_api = false;
    settings.api_tokens = vec![TOKEN.into()];
    spawn_app_with(settings).await
}

/// The `Set-Cookie` header that sets `name`.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with(&format!("{name}=")))
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_owned()
}

/// The value of the hidden `csrf` field of the page's (first) form with one.
fn csrf_field(html: &str) -> String {
    let start = html.find(r#"name="csrf" value=""#).expect("a csrf field") + 19;
    html[start..start + html[start..].find('"').unwrap()].to_owned()
}

/// Loads the sign-in form: its CSRF cookie and field.
async fn sign_in_form(app: &TestApp) -> (String, String) {
    let response = client()
        .get(format!("{}/ui/sign-in", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cookie = cookie_value(&set_cookie(&response, "ap_sign_in").expect("a CSRF cookie"));
    let field = csrf_field(&response.text().await.unwrap());
    assert_eq!(cookie, field);
    (cookie, field)
}

async fn post_sign_in(
    app: &TestApp,
    cookie: &str,
    form: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client()
        .post(format!("{}/ui/sign-in", app.address))
        .header(COOKIE, format!("ap_sign_in={cookie}"))
        .form(form);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// Signs in with the token and returns the session cookie's value.
pub(crate) async fn sign_in(app: &TestApp) -> String {
    let (cookie, csrf) = sign_in_form(app).await;
    let response = post_sign_in(
        app,
        &cookie,
        &[("token", TOKEN), ("csrf", &csrf), ("next", "/ui/health")],
        &[],
    )
    .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/ui/health");
    cookie_value(&set_cookie(&response, "ap_session").expect("a session cookie"))
}

pub(crate) async fn get_page(
    app: &TestApp,
    path: &str,
    session: Option<&str>,
) -> reqwest::Response {
    let mut request = client().get(format!("{}{path}", app.address));
    if let Some(session) = session {
        request = request.header(COOKIE, format!("ap_session={session}"));
    }
    request.send().await.unwrap()
}

fn is_html(response: &reqwest::Response) -> bool {
    response.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html")
}

#[tokio::test]
async fn no_page_is_shown_without_a_session_and_sign_in_gives_a_strict_expiring_cookie() {
    let app = closed_app().await;
    let pages = [
        "/ui/",
        "/ui/?q=0187c66e-e7e5-811c-b006-2232f00f426a",
        "/ui/health",
        &format!("/ui/accounts/{ACCOUNT}"),
        &format!("/ui/accounts/{ACCOUNT}/events/1"),
        &format!("/ui/users/{USER}"),
        "/ui/no-such-page",
    ];
    for page in pages {
        let response = get_page(&app, page, None).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{page}");
        let location = response.headers()[LOCATION].to_str().unwrap().to_owned();
        assert!(
            location.starts_with("/ui/sign-in?next=%2Fui%2F"),
            "{page}: {location}"
        );
        assert!(response.text().await.unwrap().is_empty());
        // A made-up session is no better than none.
        let forged = get_page(&app, page, Some(&"ab".repeat(32))).await;
        assert_eq!(forged.status(), StatusCode::SEE_OTHER, "{page}");
    }
    // The bearer token of /v1 does not open the pages: they take a session.
    let bearer = client()
        .get(format!("{}/ui/health", app.address))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::SEE_OTHER);

    let form = client()
        .get(format!("{}/ui/sign-in", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(form.headers()["content-security-policy"], CSP);
    assert_eq!(form.headers()["x-frame-options"], "DENY");
    assert_eq!(form.headers()["x-content-type-options"], "nosniff");
    assert_eq!(form.headers()["cache-control"], "no-store");

    let session = sign_in(&app).await;
    assert_eq!(session.len(), 64);
    let (cookie, csrf) = sign_in_form(&app).await;
    let response = post_sign_in(&app, &cookie, &[("token", TOKEN), ("csrf", &csrf)], &[]).await;
    let attributes = set_cookie(&response, "ap_session").unwrap();
    let attributes: Vec<&str> = attributes.split("; ").skip(1).collect();
    assert_eq!(
        attributes,
        ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=28800"]
    );
    assert_eq!(
        response.headers()[LOCATION],
        "/ui/",
        "no next: the start page"
    );
    // Behind a proxy that serves HTTPS, the cookie is Secure.
    let (cookie, csrf) = sign_in_form(&app).await;
    let response = post_sign_in(
        &app,
        &cookie,
        &[("token", TOKEN), ("csrf", &csrf)],
        &[("x-forwarded-proto", "https")],
    )
    .await;
    assert!(
        set_cookie(&response, "ap_session")
            .unwrap()
            .contains("; Secure"),
    );

    let page = get_page(&app, "/ui/health", Some(&session)).await;
    assert_eq!(page.status(), 200);
    assert!(is_html(&page));
    assert_eq!(page.headers()["content-security-policy"], CSP);
    assert!(page.text().await.unwrap().contains("Projection health"));

    // Only digests are kept: the table cannot open a session.
    let stored: Vec<(Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT id_sha256, token_sha256 FROM ui_sessions")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 3);
    for (id, token) in &stored {
        for column in [id, token] {
            let shown = format!("{}{}", hex::encode(column), String::from_utf8_lossy(column));
            assert!(!shown.contains(&session) && !shown.contains(TOKEN));
        }
    }
}

#[tokio::test]
async fn sign_in_and_sign_out_refuse_forms_from_elsewhere_and_sign_out_ends_the_session() {
    let app = closed_app().await;
    let (cookie, csrf) = sign_in_form(&app).await;
    let other = "cd".repeat(32);
    type Fields<'a> = Vec<(&'a str, &'a str)>;
    let refusals: [(&str, Fields, Fields, StatusCode); 5] = [
        (
            "a CSRF value that is not the cookie's",
            vec![("token", TOKEN), ("csrf", &other)],
            vec![],
            StatusCode::FORBIDDEN,
        ),
        (
            "no CSRF value",
            vec![("token", TOKEN), ("csrf", "")],
            vec![],
            StatusCode::FORBIDDEN,
        ),
        (
            "a post from another site",
            vec![("token", TOKEN), ("csrf", &csrf)],
            vec![("sec-fetch-site", "cross-site")],
            StatusCode::FORBIDDEN,
        ),
        (
            "a wrong token",
            vec![("token", "not-the-token-0123456789"), ("csrf", &csrf)],
            vec![],
            StatusCode::UNAUTHORIZED,
        ),
        (
            "no token field",
            vec![("csrf", &csrf)],
            vec![],
            StatusCode::BAD_REQUEST,
        ),
    ];
    let mut refused = 0;
    for (what, form, extra, status) in &refusals {
        let response = post_sign_in(&app, &cookie, form, extra).await;
        assert_eq!(response.status(), *status, "{what}");
        assert!(set_cookie(&response, "ap_session").is_none(), "{what}");
        assert!(is_html(&response), "{what}: a page, not JSON");
        refused += 1;
    }
    assert_eq!(refused, 5);
    let huge = "x".repeat(64 * 1024);
    let response = post_sign_in(&app, &cookie, &[("token", &huge), ("csrf", &csrf)], &[]).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM ui_sessions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "no refused sign-in opened a session");

    let session = sign_in(&app).await;
    let page = get_page(&app, "/ui/", Some(&session))
        .await
        .text()
        .await
        .unwrap();
    let sign_out_csrf = csrf_field(&page);
    let sign_out = |csrf: String, site: &'static str| {
        let session = session.clone();
        let address = app.address.clone();
        async move {
            client()
                .post(format!("{address}/ui/sign-out"))
                .header(COOKIE, format!("ap_session={session}"))
                .header("sec-fetch-site", site)
                .form(&[("csrf", csrf)])
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        sign_out(other.clone(), "same-origin").await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        sign_out(sign_out_csrf.clone(), "same-site").await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(get_page(&app, "/ui/", Some(&session)).await.status(), 200);
    let out = sign_out(sign_out_csrf, "same-origin").await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(out.headers()[LOCATION], "/ui/sign-in?notice=signed_out");
    assert!(
        set_cookie(&out, "ap_session")
            .unwrap()
            .contains("Max-Age=0")
    );
    // The same cookie, kept by someone, no longer opens anything.
    let after = get_page(&app, "/ui/", Some(&session)).await;
    assert_eq!(after.status(), StatusCode::SEE_OTHER);
    assert!(
        after.headers()[LOCATION]
            .to_str()
            .unwrap()
            .ends_with("notice=expired")
    );
    // A form posted without a live session returns to the start page after sign-in, not to a
    // form that cannot be replayed as a GET.
    let again = sign_out("00".repeat(32), "same-origin").await;
    assert_eq!(
        again.headers()[LOCATION],
        "/ui/sign-in?next=%2Fui%2F&notice=expired"
    );
}

#[tokio::test]
async fn a_session_ends_when_it_expires_or_its_token_is_withdrawn() {
    let app = closed_app().await;
    let session = sign_in(&app).await;
    assert_eq!(get_page(&app, "/ui/", Some(&session)).await.status(), 200);
    sqlx::query(
        "UPDATE ui_sessions SET created_at = now() - interval '2 hours',
                                expires_at = now() - interval '1 second'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let expired = get_page(&app, "/ui/health", Some(&session)).await;
    assert_eq!(expired.status(), StatusCode::SEE_OTHER);
    let location = expired.headers()[LOCATION].to_str().unwrap().to_owned();
    assert_eq!(location, "/ui/sign-in?next=%2Fui%2Fhealth&notice=expired");
    let page = get_page(&app, &location, None).await.text().await.unwrap();
    assert!(page.contains("Your session has ended"), "{page}");

    // A session opened with a token that is no longer configured opens nothing.
    let withdrawn = "ef".repeat(32);
    let mut conn = app.pool.acquire().await.unwrap();
    store::sessions::open(
        &mut conn,
        withdrawn.as_bytes(),
        b"an-old-token-0123456789",
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    assert!(
        store::sessions::find(&mut conn, withdrawn.as_bytes())
            .await
            .unwrap()
            .is_some()
    );
    let response = get_page(&app, "/ui/", Some(&withdrawn)).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn the_pages_show_the_fixture_account_its_changes_and_its_view_as_of_an_event() {
    // An open service (no tokens): the pages are open too.
    let app = spawn_app().await;
    let sequence = fixture_sequence();
    for (_, body) in &sequence {
        app.deliver(body).await;
    }
    app.deliver(&sequence[2].1).await; // a redelivery of 03
    app.wait_for_projection().await;

    let search = get_page(&app, &format!("/ui/?q={USER}"), None).await;
    assert_eq!(search.status(), StatusCode::SEE_OTHER);
    assert_eq!(search.headers()[LOCATION], format!("/ui/users/{USER}"));
    let user = get_page(&app, &format!("/ui/users/{USER}"), None)
        .await
        .text()
        .await
        .unwrap();
    assert!(user.contains(&format!("/ui/accounts/{ACCOUNT}")));
    assert!(user.contains(r#"<span class="badge badge-removed">removed</span>"#));
    let search = get_page(&app, &format!("/ui/?q=%20{ACCOUNT}%20"), None).await;
    assert_eq!(
        search.headers()[LOCATION],
        format!("/ui/accounts/{ACCOUNT}")
    );

    let page = get_page(&app, &format!("/ui/accounts/{ACCOUNT}"), None).await;
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    let positions: Vec<i64> = page
        .match_indices(r#"data-position=""#)
        .map(|(i, _)| {
            let rest = &page[i + 15..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(
        positions,
        [8, 7, 6, 5, 4, 3, 2, 1],
        "every event once, newest first"
    );
    assert!(page.contains(r#"id="status">removed<"#));
    assert!(page.contains("Whole Foods"));
    assert!(
        page.contains("2 deliveries"),
        "the redelivery of 03 is counted"
    );
    let entry = |position: i64| {
        let start = page.find(&format!(r#"id="event-{position}""#)).unwrap();
        let end = page[start..].find("</li>").unwrap();
        page[start..start + end].to_owned()
    };
    let connected = entry(2);
    assert!(connected.contains("badge-changed"));
    assert!(connected.contains(
        r#"<th scope="row" class="field">connection status</th>
            <td class="old">connecting</td>"#
    ));
    assert!(connected.contains(
        r#"<th scope="row" class="field">connection status</th>
            <td class="old">connecting</td>"#
    ));
    assert!(
        connected.contains(
            r#"<th scope="row" class="field">connection.status</th>
            <td class="old">connecting</td>
            <td class="new">connected</td>"#
        ),
        "{connected}"
    );
    let error = entry(6);
    assert!(
        error.contains(r#"<td class="new">auth_required</td>"#),
        "{error}"
    );
    assert!(entry(7).contains(
        r#"<td class="old">active</td>
            <td class="new">removed</td>"#
    ));
    assert!(entry(8).contains("badge-unchanged"));
    assert!(!page.contains(r#""op":"#), "no RFC 6902 on the page");

    let as_of = get_page(&app, &format!("/ui/accounts/{ACCOUNT}?at_position=2"), None)
        .await
        .text()
        .await
        .unwrap();
    assert!(as_of.contains(r#"id="status">active<"#), "{as_of}");
    assert!(as_of.contains("connection: connected"));
    assert!(as_of.contains("Showing the view as of event #2"));
    assert!(as_of.contains(r#"class="entry selected" id="event-2""#));
    let api: serde_json::Value = app
        .get(&format!("/v1/accounts/{ACCOUNT}?at_position=2"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(api["status"], "active");
    assert_eq!(api["connection_status"], "connected");

    let raw = get_page(&app, &format!("/ui/accounts/{ACCOUNT}/events/1"), None)
        .await
        .text()
        .await
        .unwrap();
    let body = String::from_utf8(sequence[0].1.clone()).unwrap();
    let escaped = body.replace('&', "&amp;").replace('"', "&#34;");
    assert!(raw.contains(&escaped), "the payload exactly as received");

    let health = get_page(&app, "/ui/health", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(health.contains(r#"<dd id="head">8</dd>"#), "{health}");
    assert!(health.contains(r#"<dd id="lag">0 event(s) (caught up)</dd>"#));
}

#[tokio::test]
async fn quarantined_and_erased_events_are_shown_as_such() {
    let app = spawn_app().await;
    let (account, user) = (Uuid::new_v4(), Uuid::new_v4());
    app.deliver(&refinement(account, user, 1)).await;
    let mut poison: serde_json::Value =
        serde_json::from_slice(&refinement(account, user, 2)).unwrap();
    poison["data"]["resource"] = "surprise".into();
    let (poisoned, _) = app.deliver(&serde_json::to_vec(&poison).unwrap()).await;
    app.deliver(&refinement(account, user, 3)).await;
    app.wait_for_projection().await;
    poll_until("the poison event is quarantined", || async {
        let mut conn = app.pool.acquire().await.unwrap();
        !store::quarantine::of_account(&mut conn, &vault(), account)
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let page = get_page(&app, &format!("/ui/accounts/{account}"), None)
        .await
        .text()
        .await
        .unwrap();
    let entry = |page: &str, position: i64| {
        let start = page
            .find(&format!(r#"id="event-{position}""#))
            .unwrap_or_else(|| panic!("no event {position} in {page}"));
        page[start..start + page[start..].find("</li>").unwrap()].to_owned()
    };
    let listed = |page: &str| page.matches(r#"<li class="entry"#).count();
    assert_eq!(listed(&page), 3, "every event once");
    let quarantined = entry(&page, poisoned);
    assert!(quarantined.contains("badge-quarantined"), "{quarantined}");
    assert!(quarantined.contains("Not folded:"), "{quarantined}");
    let health = get_page(&app, "/ui/health", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        health.contains(r#"<p id="quarantined">1 event(s) quarantined"#),
        "{health}"
    );
    assert!(health.contains(&format!("/ui/accounts/{account}#event-{poisoned}")));

    let (code, _, err) = run_binary(
        &app.database_url,
        &[
            "erase",
            "--account",
            &account.to_string(),
            "--reason",
            "ticket-7",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    app.wait_for_projection().await;
    let page = get_page(&app, &format!("/ui/accounts/{account}"), None)
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"id="status">erased<"#), "{page}");
    assert_eq!(listed(&page), 4, "every event once, the erasure too");
    assert!(entry(&page, 1).contains("badge-erased"));
    assert!(entry(&page, poisoned).contains("(the reason was erased with the account)"));
    assert!(
        !page.contains("\"step\""),
        "nothing of the erased resource is shown"
    );
    let raw = get_page(&app, &format!("/ui/accounts/{account}/events/1"), None)
        .await
        .text()
        .await
        .unwrap();
    assert!(raw.contains("this payload is gone for good"), "{raw}");
    assert!(!raw.contains(r#"class="payload""#));
}

#[tokio::test]
async fn errors_are_pages_a_person_reads() {
    let app = spawn_app().await;
    let unknown = Uuid::new_v4();
    let cases = [
        (
            "/ui/accounts/not-a-uuid",
            StatusCode::BAD_REQUEST,
            "is not a UUID",
        ),
        (
            &format!("/ui/accounts/{unknown}"),
            StatusCode::NOT_FOUND,
            "No event of account",
        ),
        (
            &format!("/ui/users/{unknown}"),
            StatusCode::NOT_FOUND,
            "No account of user",
        ),
        (
            &format!("/ui/accounts/{unknown}/events/x"),
            StatusCode::BAD_REQUEST,
            "whole number",
        ),
        (
            &format!("/ui/accounts/{unknown}/events/1"),
            StatusCode::NOT_FOUND,
            "has no event at position 1",
        ),
        (
            "/ui/?q=%E2%9C%93%20not%20an%20id",
            StatusCode::BAD_REQUEST,
            "is a UUID",
        ),
        (
            &format!("/ui/?q={unknown}"),
            StatusCode::NOT_FOUND,
            "Nothing is known about",
        ),
        (
            &format!("/ui/accounts/{unknown}?at_position=-1"),
            StatusCode::BAD_REQUEST,
            "at_position",
        ),
        ("/ui/?q=a&q=b", StatusCode::BAD_REQUEST, "more than once"),
        ("/ui/no/such/page", StatusCode::NOT_FOUND, "no such page"),
    ];
    for (path, status, says) in &cases {
        let response = get_page(&app, path, None).await;
        assert_eq!(response.status(), *status, "{path}");
        assert!(is_html(&response), "{path}");
        let page = response.text().await.unwrap();
        assert!(page.contains(says), "{path}: {page}");
    }
    assert_eq!(cases.len(), 10);
}

#[tokio::test]
async fn a_page_says_so_when_the_database_is_down() {
    let proxy = DbProxy::start().await;
    let (mut settings, _) = proxy.settings().await;
    settings.allow_open_api = false;
    settings.api_tokens = vec![TOKEN.into()];
    let app = spawn_app_with(settings).await;
    let session = sign_in(&app).await;
    assert_eq!(
        get_page(&app, "/ui/health", Some(&session)).await.status(),
        200
    );
    let (cookie, csrf) = sign_in_form(&app).await;
    // Down (connections refused), then a network that hangs: the session check, the page and
    // sign-in each answer a page that says so, within the deadline.
    for state in [ProxyState::Down, ProxyState::BlackHole] {
        proxy.set(state);
        let response = poll_for("the health page to notice the outage", || async {
            let response = get_page(&app, "/ui/health", Some(&session)).await;
            (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(response)
        })
        .await;
        assert!(is_html(&response), "{state:?}");
        assert_eq!(response.headers()["retry-after"], "5");
        let page = response.text().await.unwrap();
        assert!(page.contains("The database is not answering"), "{page}");
        let started = std::time::Instant::now();
        let signing_in =
            post_sign_in(&app, &cookie, &[("token", TOKEN), ("csrf", &csrf)], &[]).await;
        assert_eq!(
            signing_in.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{state:?}"
        );
        assert!(is_html(&signing_in));
        assert!(started.elapsed() < Duration::from_secs(5), "{state:?}");
    }
    proxy.set(ProxyState::Forwarding);
    poll_until("the page recovers", || async {
        get_page(&app, "/ui/health", Some(&session)).await.status() == 200
    })
    .await;
}
