//! Secure by default: `/v1` closed without tokens, TLS to Postgres as libpq does it, the two
//! least-privilege roles of `deploy/roles.sql`, secrets kept out of `ps`.

use std::path::PathBuf;
use std::process::Stdio;

use account_projector::{Application, Role};
use serde_json::Value;
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;
use wiremock::{MockServer, ResponseTemplate};

use crate::argyle::{account_object, enricher_settings, mock_account, resource_less};
use crate::helpers::*;

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
const TOKEN: &str = "security-test-token-0123456789";

fn tls_fixture(name: &str) -> PathBuf {
    fixtures_dir().join("tls").join(name)
}

/// `url` with `params` added to its query string.
fn with_params(url: &str, params: &str) -> String {
    format!("{url}{}{params}", if url.contains('?') { '&' } else { '?' })
}

/// `url` addressed to `localhost`, the one name in the server's certificate.
fn via_localhost(url: &str) -> String {
    url.replacen("@127.0.0.1:", "@localhost:", 1)
}

fn database_name(url: &str) -> String {
    let path = url.rsplit_once('/').unwrap().1;
    path.split('?').next().unwrap().to_owned()
}

// --- closed by default ---------------------------------------------------------------------

#[tokio::test]
async fn v1_is_closed_unless_tokens_are_configured_or_it_is_opened_on_purpose() {
    let database_url = migrated_database().await;
    let settings = |role: Role, tokens: &[&str], open: bool| {
        let mut settings = account_projector::Settings::new(database_url.clone());
        settings.vault = test_support::vault();
        settings.listen_addr = "127.0.0.1:0".into();
        settings.webhook_secrets = vec![SECRET.into()];
        settings.role = role;
        settings.api_tokens = tokens.iter().map(|t| (*t).to_owned()).collect();
        settings.allow_open_api = open;
        settings
    };
    let refused = [
        (Role::All, &[][..], "needs API_TOKENS"),
        (Role::Api, &[][..], "needs API_TOKENS"),
        (Role::All, &["fifteen-chars-x"][..], "at least 16"),
        (Role::Ingest, &[TOKEN, "short"][..], "at least 16"),
    ];
    for (role, tokens, expected) in refused {
        let error = Application::build(settings(role, tokens, false))
            .await
            .err()
            .unwrap_or_else(|| panic!("{role:?} with {tokens:?} must not start"));
        assert!(error.to_string().contains(expected), "{role:?}: {error}");
    }
    // Roles that do not serve /v1 need no token.
    for role in [Role::Ingest, Role::Projector] {
        let app = Application::build(settings(role, &[], false)).await;
        assert!(app.is_ok(), "{role:?} starts without tokens");
    }
    assert!(
        Application::build(settings(Role::All, &["sixteen-chars-xx"], false))
            .await
            .is_ok(),
        "a 16-character token is enough"
    );
    // Opened on purpose: /v1 answers without a token.
    let app = spawn_app_with(settings(Role::All, &[], true)).await;
    assert_eq!(app.get("/v1/events").await.status(), 200);
    app.stop().await;
    // Closed by tokens: 401 without one.
    let app = spawn_app_with(settings(Role::All, &[TOKEN], false)).await;
    assert_eq!(app.get("/v1/events").await.status(), 401);
    app.stop().await;

    // The binary: one sentence on stderr and a non-zero exit, for each way of having no token.
    let mut cases = 0;
    for tokens in [None, Some(""), Some(" , "), Some("short-token")] {
        let mut env = vec![
            ("LISTEN_ADDR", "127.0.0.1:0"),
            ("ARGYLE_WEBHOOK_SECRETS", SECRET),
        ];
        if let Some(tokens) = tokens {
            env.push(("API_TOKENS", tokens));
        }
        let (code, _, stderr) = run_binary(&database_url, &["serve"], &env).await;
        assert_ne!(code, 0, "{tokens:?}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one sentence for {tokens:?}: {stderr}");
        assert!(lines[0].starts_with("error: "), "{stderr}");
        assert!(lines[0].contains("API_TOKENS"), "{stderr}");
        cases += 1;
    }
    assert_eq!(cases, 4);
}

// --- TLS ---------------------------------------------------------------------------------------

/// Whether every session of `application_name` on the database of `admin` is encrypted, and
/// how many there are.
async fn sessions_encrypted(admin: &PgPool, application_name: &str) -> (i64, bool) {
    sqlx::query_as(
        "SELECT count(*), coalesce(bool_and(s.ssl), false)
           FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
          WHERE a.datname = current_database() AND a.application_name = $1",
    )
    .bind(application_name)
    .fetch_one(admin)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_service_encrypts_its_sessions_with_require_and_with_the_default_prefer() {
    let database_url = migrated_database().await;
    let admin = PgPool::connect(&database_url).await.unwrap();
    let mut cases = 0;
    for (params, encrypted) in [
        ("sslmode=require", true),
        ("", true), // libpq's default, prefer: TLS when the server offers it, as this one does
        ("sslmode=disable", false),
    ] {
        let name = format!("tls-check-{}", Uuid::new_v4().simple());
        let mut settings = test_settings().await;
        let url = if params.is_empty() {
            database_url.clone()
        } else {
            with_params(&database_url, params)
        };
        settings.database_url = with_params(&url, &format!("application_name={name}"));
        let app = spawn_app_with(settings).await;
        app.deliver(&fixture("01_accounts.added.json")).await;
        app.wait_for_projection().await;
        assert_eq!(app.account_view(ACCOUNT).await["version"], 1);
        let (sessions, all_encrypted) = sessions_encrypted(&admin, &name).await;
        assert!(sessions >= 2, "{params}: the service's sessions are there");
        assert_eq!(all_encrypted, encrypted, "{params:?}");
        app.stop().await;
        cases += 1;
    }
    assert_eq!(cases, 3);
}

#[tokio::test]
async fn every_command_honours_sslmode_and_sslrootcert() {
    let database_url = fresh_database().await;
    let snakeoil = format!("sslrootcert={SNAKEOIL}");
    let untrusted = format!(
        "sslrootcert={}",
        tls_fixture("untrusted-root.pem").display()
    );
    // The certificate names only `localhost`: verify-full must reach it by that name.
    let full = with_params(
        &via_localhost(&database_url),
        &format!("sslmode=verify-full&{snakeoil}"),
    );
    let commands: [&[&str]; 5] = [
        &["migrate"],
        &["status"],
        &["export"],
        &["rebuild", "--verify"],
        &["rebuild"],
    ];
    let mut ran = 0;
    for url in [
        full.clone(),
        with_params(&database_url, "sslmode=require"),
        with_params(&database_url, &format!("sslmode=verify-ca&{snakeoil}")),
    ] {
        for args in commands {
            let (code, _, stderr) = run_binary(&url, args, &[]).await;
            assert_eq!(code, 0, "{args:?} with {url}: {stderr}");
            ran += 1;
        }
    }
    assert_eq!(ran, 15);

    // Refused, each with one sentence that names TLS and what to check.
    let refused = [
        // A root that did not sign the server's certificate.
        with_params(
            &via_localhost(&database_url),
            &format!("sslmode=verify-full&{untrusted}"),
        ),
        with_params(&database_url, &format!("sslmode=verify-ca&{untrusted}")),
        // `require` with a root certificate verifies it, as in libpq.
        with_params(&database_url, &format!("sslmode=require&{untrusted}")),
        // The right root, but the server is not reached by a name its certificate holds.
        with_params(&database_url, &format!("sslmode=verify-full&{snakeoil}")),
    ];
    let mut refusals = 0;
    for url in &refused {
        for args in commands {
            let (code, stdout, stderr) = run_binary(url, args, &[]).await;
            assert_ne!(code, 0, "{args:?} with {url} must fail: {stdout}");
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(
                lines.len(),
                1,
                "{args:?} with {url}: one sentence: {stderr}"
            );
            assert!(
                lines[0].contains("TLS") && lines[0].contains("sslrootcert"),
                "{args:?} with {url}: {stderr}"
            );
            refusals += 1;
        }
    }
    assert_eq!(refusals, 20);

    // serve, whose migrations run over the same connection settings.
    let fresh = fresh_database().await;
    let env = [
        ("LISTEN_ADDR", "127.0.0.1:0"),
        ("ARGYLE_WEBHOOK_SECRETS", SECRET),
        ("API_TOKENS", TOKEN),
    ];
    let (code, _, stderr) = run_binary(
        &with_params(
            &via_localhost(&fresh),
            &format!("sslmode=verify-full&{untrusted}"),
        ),
        &["serve"],
        &env,
    )
    .await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("could not migrate") && stderr.contains("TLS"),
        "{stderr}"
    );
    let mut settings = test_settings().await;
    settings.database_url = with_params(
        &via_localhost(&fresh),
        &format!("sslmode=verify-full&{snakeoil}"),
    );
    let app = spawn_app_with(settings).await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    app.wait_for_projection().await;
    assert_eq!(app.account_view(ACCOUNT).await["version"], 1);
    app.stop().await;
}

// --- least privilege ---------------------------------------------------------------------------

pub(crate) const OWNER: &str = "account_projector_owner";
pub(crate) const SERVICE: &str = "account_projector_service";

/// Runs `deploy/roles.sql` as the administrator for the database of `database_url`.
pub(crate) fn run_roles_sql(database_url: &str) {
    run_roles_sql_as(database_url, "postgres");
}

/// Runs `deploy/roles.sql` as `admin` (connecting to the `postgres` database) for the database of
/// `database_url`.
fn run_roles_sql_as(database_url: &str, admin: &str) {
    let script = fixtures_dir().join("../../deploy/roles.sql");
    let output = std::process::Command::new("psql")
        .arg(
            as_role(database_url, admin)
                .replace(&format!("/{}", database_name(database_url)), "/postgres"),
        )
        .args([
            "-X",
            "-q",
            "-v",
            &format!("db={}", database_name(database_url)),
        ])
        .args([
            "-v",
            "owner_password=owner-pw-1f2e3d",
            "-v",
            "service_password=svc-pw-4c5b6a",
        ])
        .arg("-f")
        .arg(script)
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "deploy/roles.sql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub(crate) fn as_role(database_url: &str, role: &str) -> String {
    database_url.replacen("postgres@", &format!("{role}@"), 1)
}

/// The SQLSTATE a statement fails with.
async fn sqlstate(pool: &PgPool, statement: &str) -> String {
    let error = sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(pool)
        .await
        .expect_err(statement);
    error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {error}"))
}

#[tokio::test]
async fn every_role_and_command_runs_as_the_service_role_which_cannot_write_the_log_directly() {
    let database_url = fresh_database().await;
    run_roles_sql(&database_url);
    let as_owner = as_role(&database_url, OWNER);
    let as_service = as_role(&database_url, SERVICE);
    let (code, _, stderr) = run_binary(&as_owner, &["migrate"], &[]).await;
    assert_eq!(code, 0, "migrate as the owner: {stderr}");

    // Every role in one process, as the service: ingest, projector, api, and the enricher
    // against the fake Argyle API. Migrations are on (the default): the schema is current.
    let argyle = MockServer::start().await;
    let fetched = Uuid::new_v4();
    mock_account(fetched)
        .respond_with(ResponseTemplate::new(200).set_body_json(account_object(fetched)))
        .mount(&argyle)
        .await;
    let mut settings = enricher_settings(&as_service, &argyle, 50.0).await;
    settings.migrate = true;
    assert_eq!(settings.role, Role::All);
    // A subscriber, added as the service: the notifier (in `all`) delivers to it as the service.
    let (code, _, stderr) = run_binary(
        &as_service,
        &[
            "subscribers",
            "add",
            "--url",
            "http://127.0.0.1:9/unreachable",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "subscribers add as the service: {stderr}");
    let app = spawn_app_with(settings).await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    for (_, body) in fixture_sequence() {
        app.deliver(&body).await;
    }
    // The feed reads, and the notifier scans, enqueues and records a failed delivery, as the
    // service role.
    let feed: Value = app.get("/v1/feed?wait=5s").await.json().await.unwrap();
    assert!(!feed["accounts"].as_array().unwrap().is_empty(), "{feed}");
    poll_until("the notifier records its failed delivery", || async {
        let (_, stdout, _) = run_binary(&as_service, &["subscribers", "list"], &[]).await;
        stdout.contains("could not reach the subscriber")
    })
    .await;
    app.deliver(&resource_less(fetched, 0)).await;
    let view = poll_for("the enricher's fetch is folded", || async {
        let view: Value = app
            .get(&format!("/v1/accounts/{fetched}"))
            .await
            .json()
            .await
            .ok()?;
        (view["last_event"] == domain::ACCOUNT_FETCHED).then_some(view)
    })
    .await;
    assert_eq!(view["resource"], account_object(fetched));
    app.wait_for_projection().await;
    assert_eq!(app.account_view(ACCOUNT).await["status"], "removed");
    // A webhook that calls itself a fetch is logged, and not folded: only the service's own
    // appends through append_fetched speak for Argyle's API.
    let mut forged: Value = serde_json::from_slice(&resource_less(fetched, 1)).unwrap();
    forged["event"] = domain::ACCOUNT_FETCHED.into();
    forged["data"]["resource"] =
        serde_json::json!({"id": fetched, "updated_at": "2999-01-01T00:00:00Z"});
    let (position, _) = app.deliver(&serde_json::to_vec(&forged).unwrap()).await;
    app.wait_for_projection().await;
    let after = app.account_view(fetched).await;
    assert_eq!(
        after["resource"],
        account_object(fetched),
        "the forged fetch is not folded"
    );
    assert!(after["last_position"].as_i64().unwrap() < position);
    app.stop().await;

    for args in [
        &["rebuild"][..],
        &["rebuild", "--verify"],
        &["rebuild", "--account", ACCOUNT],
        &["export"],
        &["status"],
        &["migrate"],
        &[
            "erase",
            "--account",
            ACCOUNT,
            "--reason",
            "service role test",
        ],
    ] {
        let (code, _, stderr) = run_binary(&as_service, args, &[]).await;
        assert_eq!(code, 0, "{args:?} as the service: {stderr}");
    }
    // Rotating or sealing changes keys or the log's rows: the owner's, in one sentence.
    for args in [&["keys", "rotate"][..], &["keys", "seal"]] {
        let (code, _, stderr) = run_binary(&as_service, args, &[]).await;
        assert_eq!(code, 1, "{args:?} as the service");
        assert!(
            stderr.contains("needs the schema's owner"),
            "{args:?}: {stderr}"
        );
    }

    // The service cannot write the log but through the functions, nor change the schema.
    let service = PgPool::connect(&as_service).await.unwrap();
    let mut refused = 0;
    for statement in [
        "INSERT INTO events (position, received_at, event, body, body_sha256)
         VALUES (1000, now() - interval '1 year', 'accounts.updated', '{}', sha256(''))",
        "INSERT INTO redeliveries (position, received_at) VALUES (1, now())",
        "UPDATE events SET event = 'x'",
        "DELETE FROM events",
        "TRUNCATE events CASCADE",
        "UPDATE redeliveries SET signature = 'x'",
        "DELETE FROM redeliveries",
        "TRUNCATE redeliveries",
        "ALTER TABLE events DISABLE TRIGGER events_append_only",
        "CREATE TABLE mine (id int)",
        "SELECT * FROM append_to_log('argyle_api', ARRAY['argyle.account_fetched'],
             ARRAY[NULL::uuid], ARRAY[NULL::uuid], ARRAY['{}'::bytea], ARRAY[NULL::bytea],
             ARRAY[NULL::text], '0s')",
        "DELETE FROM quarantine",
        "UPDATE quarantine SET error = 'x'",
        "SELECT grant_service_role('account_projector_service')",
        // A key is destroyed only by erase_account, which records the erasure.
        "DELETE FROM account_keys",
        "UPDATE account_keys SET wrapped_key = NULL, kek_id = NULL, erased_at = now()",
        "TRUNCATE account_keys",
        "INSERT INTO account_keys (account_id, erased_at) VALUES (gen_random_uuid(), now())",
    ] {
        assert_eq!(
            sqlstate(&service, statement).await,
            "42501",
            "{statement}: permission denied"
        );
        refused += 1;
    }
    assert_eq!(refused, 18);
    // append_fetched appends only the enricher's two names.
    assert_eq!(
        sqlstate(
            &service,
            "SELECT * FROM append_fetched(ARRAY['accounts.updated'], ARRAY[NULL::uuid],
                 ARRAY[NULL::uuid], ARRAY['{}'::bytea], ARRAY[NULL::bytea], '0s')"
        )
        .await,
        "22023"
    );
    // The append lock in the function is the one the store documents.
    let definition: String =
        sqlx::query_scalar("SELECT pg_get_functiondef('append_to_log'::regproc)")
            .fetch_one(&service)
            .await
            .unwrap();
    assert!(definition.contains(&store::locks::APPEND_LOCK.to_string()));
    let superuser: bool = sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1")
        .bind(SERVICE)
        .fetch_one(&service)
        .await
        .unwrap();
    assert!(!superuser);
    // The pages' sessions: opened, found and closed as the service; never extended in place.
    let mut conn = service.acquire().await.unwrap();
    let expires = store::sessions::open(
        &mut conn,
        b"a-session-id",
        TOKEN.as_bytes(),
        std::time::Duration::from_secs(60),
    )
    .await
    .unwrap();
    let found = store::sessions::find(&mut conn, b"a-session-id")
        .await
        .unwrap();
    assert_eq!(found.map(|s| s.expires_at), Some(expires));
    assert_eq!(
        sqlstate(
            &service,
            "UPDATE ui_sessions SET expires_at = expires_at + interval '1 day'"
        )
        .await,
        "42501"
    );
    store::sessions::close(&mut conn, b"a-session-id")
        .await
        .unwrap();
    assert!(
        store::sessions::find(&mut conn, b"a-session-id")
            .await
            .unwrap()
            .is_none()
    );
    drop(conn);
    service.close().await;

    // Pending migrations the service cannot apply: `serve` says so in one sentence.
    let owner = PgPool::connect(&as_owner).await.unwrap();
    sqlx::query("DELETE FROM refinery_schema_history WHERE version = (SELECT max(version) FROM refinery_schema_history)")
        .execute(&owner)
        .await
        .unwrap();
    owner.close().await;
    let (code, _, stderr) = run_binary(
        &as_service,
        &["serve"],
        &[
            ("LISTEN_ADDR", "127.0.0.1:0"),
            ("ARGYLE_WEBHOOK_SECRETS", SECRET),
            ("API_TOKENS", TOKEN),
        ],
    )
    .await;
    assert_ne!(code, 0);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot apply migrations") && stderr.contains(SERVICE),
        "{stderr}"
    );

    // An administrator that is not a superuser (a managed service's admin user) can run it too,
    // creating the database, and migrating as the owner then works.
    let admin_name = format!("ap_admin_{}", Uuid::new_v4().simple());
    let admin = PgPool::connect(&database_url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {admin_name} LOGIN CREATEROLE CREATEDB"
    )))
    .execute(&admin)
    .await
    .unwrap();
    let second = database_url.replace(
        &database_name(&database_url),
        &format!("{}_m", database_name(&database_url)),
    );
    run_roles_sql_as(&second, &admin_name);
    let (code, _, stderr) = run_binary(&as_role(&second, OWNER), &["migrate"], &[]).await;
    assert_eq!(code, 0, "migrate as the owner: {stderr}");
    run_roles_sql_as(&second, &admin_name);
    let (code, _, stderr) = run_binary(&as_role(&second, SERVICE), &["status"], &[]).await;
    assert_eq!(code, 0, "status as the service: {stderr}");
    for statement in [
        format!("DROP DATABASE {} WITH (FORCE)", database_name(&second)),
        format!("REVOKE account_projector_owner FROM {admin_name}"),
        format!("DROP ROLE {admin_name}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

// --- secrets out of `ps` -----------------------------------------------------------------------

#[tokio::test]
async fn webhook_secrets_can_come_from_standard_input_or_a_file() {
    let app = spawn_app().await;
    app.deliver(&fixture("01_accounts.added.json")).await;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_account-projector"));
    command
        .args(["export", "--webhook-secrets-file", "-"])
        .env("DATABASE_URL", &app.database_url)
        .env("DATA_KEYS", DATA_KEY)
        .env("RUST_LOG", "warn")
        .env_remove("ARGYLE_WEBHOOK_SECRETS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("old-secret\n{SECRET}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line: Value =
        serde_json::from_slice(output.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["signature_valid"], true);

    let file = std::env::temp_dir().join(format!("ap-secrets-{}", Uuid::new_v4()));
    let mut verdicts = vec![];
    for content in [format!("{SECRET}\n"), "some-other-secret".to_owned()] {
        std::fs::write(&file, content).unwrap();
        let (code, stdout, stderr) = run_binary(
            &app.database_url,
            &["export"],
            &[("ARGYLE_WEBHOOK_SECRETS_FILE", file.to_str().unwrap())],
        )
        .await;
        assert_eq!(code, 0, "{stderr}");
        let line: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
        verdicts.push(line["signature_valid"].clone());
    }
    std::fs::remove_file(&file).unwrap();
    assert_eq!(verdicts, [Value::Bool(true), Value::Bool(false)]);
    let (code, _, stderr) = run_binary(
        &app.database_url,
        &["export", "--webhook-secrets-file", "/nonexistent/secrets"],
        &[],
    )
    .await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("could not read /nonexistent/secrets"),
        "{stderr}"
    );
    app.stop().await;
}
