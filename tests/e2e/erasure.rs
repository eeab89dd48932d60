//! Erasure by crypto-shredding: after `erase`, no byte of the account's personal data is left
//! readable in the database (a dump, the table files, dead tuples included), every answer shows the
//! account erased, and the log keeps every row; keys rotate; a tampered body is reported.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::*;

/// The fixture sequence for a new account of `user`, its resource naming `employer` and `item`
/// (strings that occur nowhere else), every body edited as JSON and re-serialised.
fn personal_sequence(account: Uuid, user: Uuid, employer: &str, item: &str) -> Vec<Vec<u8>> {
    fixture_sequence()
        .into_iter()
        .filter(|(name, _)| !name.contains("removed"))
        .map(|(_, body)| {
            let mut value: Value = serde_json::from_slice(&body).unwrap();
            value["data"]["account"] = account.to_string().into();
            value["data"]["user"] = user.to_string().into();
            if let Some(resource) = value["data"].get_mut("resource").filter(|r| r.is_object()) {
                resource["id"] = account.to_string().into();
                resource["user"] = user.to_string().into();
                resource["employers"] = serde_json::json!([employer]);
                resource["item"] = item.into();
            }
            serde_json::to_vec(&value).unwrap()
        })
        .collect()
}

/// A person's account: its ids and the two strings that identify it.
struct Person {
    account: Uuid,
    user: Uuid,
    employer: String,
    item: String,
}

impl Person {
    fn new(user: Uuid) -> Self {
        let tag = Uuid::new_v4().simple().to_string();
        Self {
            account: Uuid::new_v4(),
            user,
            employer: format!("Qzxv Employer {tag}"),
            item: format!("item_{tag}"),
        }
    }

    fn bodies(&self) -> Vec<Vec<u8>> {
        personal_sequence(self.account, self.user, &self.employer, &self.item)
    }

    /// The byte strings that must not be found once erased: each string raw and hex-encoded.
    fn needles(&self) -> Vec<Vec<u8>> {
        [&self.employer, &self.item]
            .iter()
            .flat_map(|s| {
                [
                    s.as_bytes().to_vec(),
                    hex::encode(s.as_bytes()).into_bytes(),
                ]
            })
            .collect()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `pg_dump` of the whole database (data and schema).
async fn dump(database_url: &str) -> Vec<u8> {
    let output = tokio::process::Command::new("pg_dump")
        .arg("--dbname")
        .arg(database_url)
        .output()
        .await
        .expect("pg_dump runs");
    assert!(
        output.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Every file of the database's directory (tables, TOAST, indexes, free space maps), after a
/// CHECKPOINT has written every page: dead tuples included.
async fn table_files(pool: &PgPool) -> Vec<(PathBuf, Vec<u8>)> {
    sqlx::query("CHECKPOINT").execute(pool).await.unwrap();
    let data_directory: String = sqlx::query_scalar("SHOW data_directory")
        .fetch_one(pool)
        .await
        .unwrap();
    let oid: sqlx::postgres::types::Oid =
        sqlx::query_scalar("SELECT oid FROM pg_database WHERE datname = current_database()")
            .fetch_one(pool)
            .await
            .unwrap();
    let dir = PathBuf::from(data_directory)
        .join("base")
        .join(oid.0.to_string());
    let mut files = vec![];
    for entry in std::fs::read_dir(&dir).expect("the database directory is readable") {
        let path = entry.unwrap().path();
        if path.is_file() {
            files.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    assert!(
        files.len() > 20,
        "only {} files in {}",
        files.len(),
        dir.display()
    );
    files
}

/// Asserts that no needle is in the dump or in any file of the database.
async fn assert_nowhere(pool: &PgPool, database_url: &str, person: &Person, when: &str) {
    let dumped = dump(database_url).await;
    // The dump holds the account (its id is not personal data): the search can find what is there.
    assert!(
        contains(&dumped, person.account.to_string().as_bytes()),
        "{when}: the dump lacks the account id"
    );
    let files = table_files(pool).await;
    let mut searched = 0;
    for needle in person.needles() {
        assert!(
            !contains(&dumped, &needle),
            "{when}: pg_dump holds {:?}",
            String::from_utf8_lossy(&needle)
        );
        for (path, bytes) in &files {
            assert!(
                !contains(bytes, &needle),
                "{when}: {} holds {:?}",
                path.display(),
                String::from_utf8_lossy(&needle)
            );
        }
        searched += 1;
    }
    assert_eq!(searched, 4);
}

async fn deliver_all(app: &TestApp, bodies: &[Vec<u8>]) -> Vec<i64> {
    let mut positions = vec![];
    for body in bodies {
        positions.push(app.deliver(body).await.0);
    }
    app.wait_for_projection().await;
    positions
}

async fn erase(database_url: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["erase"];
    all.extend_from_slice(args);
    run_binary(database_url, &all, &[]).await
}

async fn json(app: &TestApp, path: &str) -> Value {
    let response = app.get(path).await;
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

#[tokio::test]
async fn after_erase_no_byte_of_the_resource_is_in_a_dump_or_the_table_files() {
    let app = spawn_app().await;
    let person = Person::new(Uuid::new_v4());
    // A subscriber that never answers keeps a sealed message pending in `subscriber_messages`.
    let (code, _, err) = run_binary(
        &app.database_url,
        &["subscribers", "add", "--url", "http://127.0.0.1:9/never"],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    deliver_all(&app, &person.bodies()).await;
    let view = app.account_view(person.account).await;
    assert_eq!(view["resource"]["employers"][0], person.employer.as_str());
    poll_until("the notifier holds a message for the account", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM subscriber_messages WHERE account_id = $1",
        )
        .bind(person.account)
        .fetch_one(&app.pool)
        .await
        .unwrap()
            > 0
    })
    .await;

    let (code, out, err) = erase(
        &app.database_url,
        &[
            "--account",
            &person.account.to_string(),
            "--reason",
            "request 42",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("erased (erasure event at position"), "{out}");
    app.wait_for_projection().await;
    let view = app.account_view(person.account).await;
    assert_eq!(view["status"], "erased");
    assert_eq!(view["resource"], Value::Null);
    assert_nowhere(&app.pool, &app.database_url, &person, "after erase").await;

    let (code, _, err) = run_binary(&app.database_url, &["rebuild"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(app.account_view(person.account).await, view);
    assert_nowhere(&app.pool, &app.database_url, &person, "after rebuild").await;
    app.stop().await;
}

#[tokio::test]
async fn an_erased_account_shows_as_erased_in_every_answer_and_the_log_keeps_its_rows() {
    let app = spawn_app().await;
    let person = Person::new(Uuid::new_v4());
    let positions = deliver_all(&app, &person.bodies()).await;
    let account = person.account.to_string();
    let changes_before = json(&app, &format!("/v1/accounts/{account}/changes")).await;
    let changed: Vec<i64> = changes_before["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["position"].as_i64().unwrap())
        .collect();
    assert!(changed.len() >= 3, "{changes_before}");
    let (_, export_before, _) =
        run_binary(&app.database_url, &["export", "--account", &account], &[]).await;
    let first_time = app.account_view(&account).await["first_seen_at"].clone();

    let (code, _, err) = erase(
        &app.database_url,
        &["--account", &account, "--reason", "ticket 7"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    app.wait_for_projection().await;

    // The view, now and as of any time.
    let view = app.account_view(&account).await;
    assert_eq!(
        (
            view["status"].as_str(),
            &view["resource"],
            &view["connection_status"]
        ),
        (Some("erased"), &Value::Null, &Value::Null)
    );
    assert_eq!(view["last_event"], "account_projector.account_erased");
    assert_eq!(view["version"], positions.len() as i64 + 1);
    let as_of = first_time.as_str().unwrap().replace('+', "%2B");
    let then = app.account_view(format!("{account}?as_of={as_of}")).await;
    assert_eq!(
        (then["status"].as_str(), &then["resource"]),
        (Some("erased"), &Value::Null)
    );
    assert_eq!(then["version"], 1);
    let at = app
        .account_view(format!("{account}?at_position={}", positions[3]))
        .await;
    assert_eq!(
        (
            at["status"].as_str(),
            &at["resource"],
            at["version"].as_i64()
        ),
        (Some("erased"), &Value::Null, Some(4))
    );

    // History: every row kept, erased, no payload; the erasure event itself readable.
    let events = json(&app, &format!("/v1/accounts/{account}/events")).await;
    let events = events["events"].as_array().unwrap();
    assert_eq!(events.len(), positions.len() + 1);
    for event in &events[..positions.len()] {
        assert_eq!(
            (&event["erased"], &event["payload"]),
            (&Value::Bool(true), &Value::Null),
            "{event}"
        );
    }
    let erasure = &events[positions.len()];
    assert_eq!(erasure["event"], "account_projector.account_erased");
    assert_eq!(erasure["erased"], false);
    assert_eq!(erasure["payload"]["erasure"]["reason"], "ticket 7");

    // Changes: the same entries, without patches.
    let changes = json(&app, &format!("/v1/accounts/{account}/changes")).await;
    let entries = changes["changes"].as_array().unwrap();
    let after: Vec<i64> = entries
        .iter()
        .map(|c| c["position"].as_i64().unwrap())
        .collect();
    assert_eq!(after, changed);
    assert!(
        entries
            .iter()
            .all(|c| c["patch"].is_null() && c["event"].is_string())
    );
    let paged = json(
        &app,
        &format!(
            "/v1/accounts/{account}/changes?limit=1&after={}",
            changed[0]
        ),
    )
    .await;
    assert_eq!(paged["changes"][0]["position"], changed[1]);
    assert_eq!(paged["next_after"], changed[1]);

    // Export: erased lines without a body, sha256 and signature kept.
    let (code, export_after, err) =
        run_binary(&app.database_url, &["export", "--account", &account], &[]).await;
    assert_eq!(code, 0, "{err}");
    let before: Vec<Value> = export_before
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let after: Vec<Value> = export_after
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(after.len(), before.len() + 1);
    for (was, now) in before.iter().zip(&after) {
        assert_eq!(now["erased"], true);
        assert!(now.get("body").is_none(), "{now}");
        assert_eq!(now["body_sha256"], was["body_sha256"]);
        assert_eq!(now["signature"], was["signature"]);
    }
    let named = before
        .iter()
        .filter(|was| was["body"].as_str().unwrap().contains(&person.employer));
    assert!(named.count() >= 4, "the export before held the data");

    // The feed carries the erased view; the enricher's and reconcile's skips are tested with them.
    let feed = json(&app, "/v1/feed").await;
    let fed = feed["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["account_id"] == account.as_str())
        .unwrap()
        .clone();
    assert_eq!(fed, view);

    // A later webhook is logged, unreadable, and brings nothing back.
    let late = &person.bodies()[4];
    let (position, duplicate) = {
        let mut value: Value = serde_json::from_slice(late).unwrap();
        value["data"]["resource"]["updated_at"] = "2030-01-01T00:00:00Z".into();
        app.deliver(&serde_json::to_vec(&value).unwrap()).await
    };
    assert!(!duplicate);
    app.wait_for_projection().await;
    let later = app.account_view(&account).await;
    assert_eq!(
        (
            later["status"].as_str(),
            &later["resource"],
            later["last_position"].as_i64()
        ),
        (Some("erased"), &Value::Null, Some(position))
    );
    let page = json(
        &app,
        &format!("/v1/accounts/{account}/events?after={}", position - 1),
    )
    .await;
    assert_eq!(
        (&page["events"][0]["erased"], &page["events"][0]["payload"]),
        (&Value::Bool(true), &Value::Null)
    );

    // Rebuild and verify agree; a second erase changes nothing.
    let (code, out, err) = run_binary(&app.database_url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = erase(
        &app.database_url,
        &["--account", &account, "--reason", "again"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("already erased"), "{out}");
    assert_eq!(head(&app.pool).await, position);
    app.stop().await;
}

#[tokio::test]
async fn erase_user_erases_each_account_of_the_user_and_no_other() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let (first, second, other) = (
        Person::new(user),
        Person::new(user),
        Person::new(Uuid::new_v4()),
    );
    for person in [&first, &second, &other] {
        deliver_all(&app, &person.bodies()).await;
    }
    let (code, out, err) = erase(
        &app.database_url,
        &["--user", &user.to_string(), "--reason", "dsr-9"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains(" erased (")).count(),
        2,
        "{out}"
    );
    app.wait_for_projection().await;
    let accounts = json(&app, &format!("/v1/users/{user}/accounts")).await;
    let statuses: BTreeSet<(String, bool)> = accounts["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["status"].as_str().unwrap().to_owned(),
                v["resource"].is_null(),
            )
        })
        .collect();
    assert_eq!(statuses, BTreeSet::from([("erased".to_owned(), true)]));
    assert_eq!(accounts["accounts"].as_array().unwrap().len(), 2);
    let untouched = app.account_view(other.account).await;
    assert_eq!(untouched["status"], "active");
    assert_eq!(
        untouched["resource"]["employers"][0],
        other.employer.as_str()
    );
    let (code, _, err) = erase(
        &app.database_url,
        &["--user", &Uuid::new_v4().to_string(), "--reason", "x"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("has no accounts"), "{err}");
    let (code, _, err) = erase(
        &app.database_url,
        &["--account", &Uuid::new_v4().to_string(), "--reason", "x"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("has no events"), "{err}");
    let (code, _, err) = erase(
        &app.database_url,
        &["--account", &first.account.to_string(), "--reason", " "],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("reason"), "{err}");
    app.stop().await;
}

#[tokio::test]
async fn after_keys_rotate_the_old_key_can_go_and_everything_not_erased_still_reads() {
    let app = spawn_app().await;
    let (kept, erased) = (Person::new(Uuid::new_v4()), Person::new(Uuid::new_v4()));
    deliver_all(&app, &kept.bodies()).await;
    deliver_all(&app, &erased.bodies()).await;
    let (code, _, err) = erase(
        &app.database_url,
        &["--account", &erased.account.to_string(), "--reason", "r"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    app.wait_for_projection().await;
    let url = app.database_url.clone();
    let (code, export_before, err) = run_binary(&url, &["export"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(export_before.contains(&kept.employer));
    app.stop().await;

    let new_key = sealing::KeyRing::generate_key();
    // The new key alone before rotating opens nothing, and says which key is missing.
    let (code, _, err) = run_binary(&url, &["export"], &[("DATA_KEYS", &new_key)]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("DATA_KEYS lacks the key-encryption key"),
        "{err}"
    );

    let both = format!("{new_key},{DATA_KEY}");
    let (code, out, err) = run_binary(&url, &["keys", "rotate"], &[("DATA_KEYS", &both)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("keys re-wrapped"), "{out}");
    let rewrapped: u64 = out.split_whitespace().nth(2).unwrap().parse().unwrap();
    // The kept account's key and the key of events that name no account, none for the erased.
    assert!(rewrapped >= 1, "{out}");

    // The old key gone: every body not erased reads exactly as before; the erased stays erased.
    let (code, export_after, err) = run_binary(&url, &["export"], &[("DATA_KEYS", &new_key)]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(export_after, export_before);
    let (code, out, err) =
        run_binary(&url, &["rebuild", "--verify"], &[("DATA_KEYS", &new_key)]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run_binary(&url, &["keys", "rotate"], &[("DATA_KEYS", &new_key)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(" 0 account keys re-wrapped"), "{out}");
}

#[tokio::test]
async fn a_body_altered_in_the_table_fails_authentication_and_is_quarantined_never_folded() {
    let url = migrated_database().await;
    let pool = PgPool::connect_lazy(&url).unwrap();
    let person = Person::new(Uuid::new_v4());
    let bodies = person.bodies();
    let mut positions = vec![];
    for body in &bodies {
        positions.push(append_direct(&pool, body).await);
    }
    // 06_accounts.updated, the newest resource: one byte of its ciphertext flipped (as the owner,
    // past the append-only trigger).
    let tampered = positions[5];
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    let changed = sqlx::query(
        "UPDATE events SET body = set_byte(body, 60, get_byte(body, 60) # 1) WHERE position = $1",
    )
    .bind(tampered)
    .execute(&mut *tx)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(changed, 1);
    tx.commit().await.unwrap();

    let mut settings = test_settings().await;
    settings.database_url = url.clone();
    let app = spawn_app_with(settings).await;
    app.wait_for_projection().await;
    let quarantine = json(&app, "/v1/quarantine").await;
    let entries = quarantine["events"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{quarantine}");
    assert_eq!(entries[0]["position"], tampered);
    assert!(
        entries[0]["error"]
            .as_str()
            .unwrap()
            .contains("fails authentication"),
        "{quarantine}"
    );
    let view = app.account_view(person.account).await;
    assert_eq!(view["version"], bodies.len() as i64 - 1);
    let previous: Value = serde_json::from_slice(&bodies[4]).unwrap();
    assert_eq!(
        view["resource"]["updated_at"],
        previous["data"]["resource"]["updated_at"]
    );
    let page = json(
        &app,
        &format!(
            "/v1/accounts/{}/events?after={}",
            person.account,
            tampered - 1
        ),
    )
    .await;
    let event = &page["events"][0];
    assert_eq!(
        (&event["payload"], &event["erased"]),
        (&Value::Null, &Value::Bool(false))
    );
    assert!(
        event["unreadable"]
            .as_str()
            .unwrap()
            .contains("fails authentication")
    );
    let (code, out, err) = run_binary(&url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    app.stop().await;
}

#[tokio::test]
async fn erase_removed_after_erases_a_removed_account_once_due_and_says_so() {
    let mut settings = test_settings().await;
    settings.projector.erase_removed_after = Some(std::time::Duration::from_millis(1));
    let app = spawn_app_with(settings).await;
    let (removed, active) = (Person::new(Uuid::new_v4()), Person::new(Uuid::new_v4()));
    deliver_all(&app, &active.bodies()).await;
    let mut bodies = removed.bodies();
    let mut removal: Value = serde_json::from_slice(&fixture("07_accounts.removed.json")).unwrap();
    removal["data"]["account"] = removed.account.to_string().into();
    removal["data"]["user"] = removed.user.to_string().into();
    bodies.push(serde_json::to_vec(&removal).unwrap());
    deliver_all(&app, &bodies).await;
    poll_until("the removed account is erased", || async {
        app.account_view(removed.account).await["status"] == "erased"
    })
    .await;
    assert_eq!(app.account_view(active.account).await["status"], "active");
    let events = json(&app, &format!("/v1/accounts/{}/events", removed.account)).await;
    let last = events["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        last["payload"]["erasure"]["requested_by"],
        "ERASE_REMOVED_AFTER"
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("erasures_scheduled_total 1"), "{metrics}");
    let (code, out, _) = run_binary(&app.database_url, &["status"], &[]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("erasure:     1 account(s) erased; 0 removed account(s) not erased"),
        "{out}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_log_written_in_plaintext_is_sealed_by_keys_seal_and_only_then_erasable() {
    let mut settings = test_settings().await;
    settings.vault = store::keys::Vault::plaintext();
    settings.allow_plaintext_log = true;
    let app = spawn_app_with(settings).await;
    let person = Person::new(Uuid::new_v4());
    let positions = deliver_all(&app, &person.bodies()).await;
    let account = person.account.to_string();
    let plain: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events_json WHERE payload IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(plain, positions.len() as i64);
    let (code, _, err) = erase(&app.database_url, &["--account", &account, "--reason", "r"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("stored in plaintext") && err.contains("keys seal"),
        "{err}"
    );
    let (_, export_before, _) = run_binary(&app.database_url, &["export"], &[]).await;
    let (url, pool) = (app.database_url.clone(), app.pool.clone());
    app.stop().await;

    let (code, out, err) = run_binary(&url, &["keys", "seal"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{} event bodies", positions.len())),
        "{out}"
    );
    let (sealed, readable): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE sealed), count(*) FILTER (WHERE payload IS NOT NULL) FROM events_json",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((sealed, readable), (positions.len() as i64, 0));
    let runs: Vec<(Option<chrono::DateTime<chrono::Utc>>, i64)> =
        sqlx::query_as("SELECT finished_at, events_sealed FROM log_seal_runs")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].0.is_some());
    assert_eq!(runs[0].1, positions.len() as i64);
    let (_, export_after, _) = run_binary(&url, &["export"], &[]).await;
    assert_eq!(export_after, export_before);
    let (code, out, err) = run_binary(&url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    // A second run has nothing left to seal.
    let (code, out, _) = run_binary(&url, &["keys", "seal"], &[]).await;
    assert_eq!(code, 0);
    assert!(out.contains(" 0 event bodies"), "{out}");
    // Sealing is the one change the log allows: any other stays refused, the setting on or not.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL account_projector.sealing_log = 'on'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let refused = sqlx::query("UPDATE events SET event = 'x' WHERE position = 1")
        .execute(&mut *tx)
        .await;
    assert!(refused.unwrap_err().to_string().contains("append-only"));
    drop(tx);

    let (code, _, err) = erase(&url, &["--account", &account, "--reason", "r"]).await;
    assert_eq!(code, 0, "{err}");
    let events = json_of(&url, &account).await;
    assert!(
        events
            .iter()
            .take(positions.len())
            .all(|e| e["erased"] == true)
    );
}

/// The account's events as `export` prints them, parsed.
async fn json_of(database_url: &str, account: &str) -> Vec<Value> {
    let (code, out, err) = run_binary(database_url, &["export", "--account", account], &[]).await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
