//! The projection in hash partitions (`PROJECTOR_PARTITIONS`): each partition its own checkpoint
//! and leader, shared by several projector processes; the feed never past the slowest partition;
//! rebuild and verify per partition and whole; laying out again when the number changes.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use store::partitions::{Part, partition_of};
use uuid::Uuid;

use crate::helpers::*;

/// `n` accounts (with their users), at least `per_part` in each of `partitions` partitions.
fn accounts_covering(partitions: u16, per_part: usize, n: usize) -> Vec<(Uuid, Uuid)> {
    let mut by_part = vec![0usize; usize::from(partitions)];
    let mut accounts = vec![];
    while accounts.len() < n || by_part.iter().any(|&c| c < per_part) {
        let account = Uuid::new_v4();
        let part = usize::from(partition_of(account, partitions));
        if accounts.len() >= n && by_part[part] >= per_part {
            continue;
        }
        by_part[part] += 1;
        accounts.push((account, Uuid::new_v4()));
    }
    accounts
}

fn free_listen_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// The `application_name` of the session leading each partition, by index.
async fn partition_leaders(pool: &sqlx::PgPool, partitions: u16) -> Vec<Option<String>> {
    let mut conn = pool.acquire().await.unwrap();
    let mut leaders = vec![];
    for part in Part::all(partitions) {
        leaders.push(
            store::locks::holder(&mut conn, part.lock())
                .await
                .unwrap()
                .map(|(name, _, _)| name),
        );
    }
    leaders
}

async fn partition_checkpoints(pool: &sqlx::PgPool) -> Vec<(i32, i32, i64)> {
    sqlx::query_as("SELECT partition, partitions, position FROM projection_partitions ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_account_hashes_to_the_same_partition_in_sql_and_in_rust() {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let accounts: Vec<Uuid> = (0..2000).map(|_| Uuid::new_v4()).collect();
    let mut checked = 0;
    for partitions in [2u16, 3, 7, 64] {
        let in_sql: Vec<i32> = sqlx::query_scalar(
            "SELECT projection_partition(a, $2) FROM unnest($1::uuid[]) WITH ORDINALITY AS t(a, n) ORDER BY n",
        )
        .bind(&accounts)
        .bind(i32::from(partitions))
        .fetch_all(&pool)
        .await
        .unwrap();
        for (account, sql) in accounts.iter().zip(in_sql) {
            assert_eq!(
                i32::from(partition_of(*account, partitions)),
                sql,
                "{account} of {partitions}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 8000);
    // Time-ordered ids (Argyle's begin with a timestamp) still spread over the partitions.
    let base = Uuid::parse_str("019bfb74-a974-e1fb-d876-0f4e094835f2")
        .unwrap()
        .as_u128();
    let mut counts = [0; 4];
    for n in 0..4000u128 {
        counts[usize::from(partition_of(Uuid::from_u128(base + (n << 64)), 4))] += 1;
    }
    assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
}

#[tokio::test]
async fn the_feed_and_the_projection_checkpoint_wait_for_the_slowest_partition() {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let vault = vault();
    {
        let mut conn = pool.acquire().await.unwrap();
        let mut tx = store::begin(&mut conn).await.unwrap();
        store::partitions::lay_out(&mut tx, 2, 0).await.unwrap();
        store::commit(tx).await.unwrap();
    }
    let accounts = accounts_covering(2, 1, 2);
    let fast = *accounts
        .iter()
        .find(|(a, _)| partition_of(*a, 2) == 0)
        .unwrap();
    let slow = *accounts
        .iter()
        .find(|(a, _)| partition_of(*a, 2) == 1)
        .unwrap();
    // The slow partition's account in the middle: its change is the one a follower could skip.
    let first = append_direct(&pool, &refinement(fast.0, fast.1, 1)).await;
    let middle = append_direct(&pool, &refinement(slow.0, slow.1, 1)).await;
    let last = append_direct(&pool, &refinement(fast.0, fast.1, 2)).await;
    assert!(first < middle && middle < last);

    let mut conn = pool.acquire().await.unwrap().detach();
    let part = |index| Part { index, of: 2 };
    let outcome = projector::run_batch(&mut conn, &vault, part(0), 1000)
        .await
        .unwrap();
    assert_eq!((outcome.events, outcome.checkpoint), (2, last));
    assert_eq!(
        partition_checkpoints(&pool).await,
        vec![(0, 2, last), (1, 2, 0)]
    );
    assert_eq!(
        checkpoint(&pool).await,
        0,
        "the projection waits for partition 1"
    );
    let (page, next) = store::snapshots::changed_after(&mut conn, &vault, 0, 100)
        .await
        .unwrap();
    assert!(
        page.is_empty(),
        "the feed shows nothing past the slowest partition: {page:?}"
    );
    assert_eq!(next, 0);

    let outcome = projector::run_batch(&mut conn, &vault, part(1), 1000)
        .await
        .unwrap();
    assert_eq!((outcome.events, outcome.checkpoint), (1, last));
    assert_eq!(checkpoint(&pool).await, last);
    let (page, _) = store::snapshots::changed_after(&mut conn, &vault, 0, 100)
        .await
        .unwrap();
    let order: Vec<(Uuid, i64)> = page
        .iter()
        .map(|s| (s.account_id, s.last_position))
        .collect();
    assert_eq!(order, vec![(slow.0, middle), (fast.0, last)]);

    // A projector of the whole cannot fold a partitioned projection: its layout is checked.
    let error = projector::run_batch(&mut conn, &vault, Part::WHOLE, 1000)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            store::Error::Layout {
                stored: 2,
                wanted: 1
            }
        ),
        "{error}"
    );
    assert_eq!(stored_snapshots(&pool).await, fresh_fold(&pool).await);
}

/// Appends `rounds` refinements to each account, in a random order of accounts.
async fn append_rounds(
    pool: &sqlx::PgPool,
    accounts: &[(Uuid, Uuid)],
    steps: std::ops::Range<u32>,
) {
    for step in steps {
        for &(account, user) in accounts {
            append_direct(pool, &refinement(account, user, step)).await;
        }
    }
}

#[tokio::test]
async fn three_projector_processes_share_three_partitions_and_one_killed_at_random_ends_equal_to_a_fresh_fold()
 {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let accounts = accounts_covering(3, 3, 12);
    // Positions are dense here (no append aborts): the last is the number of events.
    let total = 25 * accounts.len() as i64;
    let env = |listen: &str| {
        vec![
            ("PROJECTOR_PARTITIONS".to_owned(), "3".to_owned()),
            ("PROJECTOR_BATCH_SIZE".to_owned(), "3".to_owned()),
            ("LISTEN_ADDR".to_owned(), listen.to_owned()),
        ]
    };
    let spawn = |name: String, listen: String| {
        let env = env(&listen);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        (
            spawn_binary(&database_url, "projector", &name, &env),
            listen,
        )
    };
    let mut processes: Vec<(Child, String)> = (0..3)
        .map(|n| spawn(format!("partitioned-{n}"), free_listen_addr()))
        .collect();
    poll_until("every partition has a leader", || async {
        partition_leaders(&pool, 3)
            .await
            .iter()
            .all(Option::is_some)
    })
    .await;
    assert_eq!(partition_checkpoints(&pool).await.len(), 3);

    // Appends go on while one process at a time is killed at a random moment and another started
    // in its place; a follower of the feed reads along.
    let appending = {
        let pool = pool.clone();
        let accounts = accounts.clone();
        tokio::spawn(async move {
            for step in 0..25 {
                append_rounds(&pool, &accounts, step..step + 1).await;
                let pause = rand::rng().random_range(5..40);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        })
    };
    let following = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            let mut cursor = 0;
            let mut seen: BTreeMap<Uuid, (i64, i64)> = BTreeMap::new();
            loop {
                let (page, checkpoint) =
                    store::snapshots::changed_after(&mut conn, &vault(), cursor, 5)
                        .await
                        .unwrap();
                for view in &page {
                    let previous = seen.insert(view.account_id, (view.version, view.last_position));
                    if let Some((version, _)) = previous {
                        assert!(view.version > version, "a follower saw an account go back");
                    }
                }
                // As the feed pages: a full page resumes after its last account, a short one
                // from the checkpoint it was read with.
                cursor = match page.last() {
                    Some(last) if page.len() == 5 => last.last_position,
                    _ => cursor.max(checkpoint),
                };
                if cursor >= total {
                    return seen;
                }
                if page.len() < 5 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    // The victim is a leader, chosen at random, at a random moment: a standby takes over each
    // partition it led.
    let mut kills = 0;
    let mut generation = 3;
    while !appending.is_finished() || kills < 5 {
        let pause = rand::rng().random_range(20..150);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let leaders: Vec<String> = partition_leaders(&pool, 3)
            .await
            .into_iter()
            .flatten()
            .collect();
        let Some(victim) = leaders.get(rand::rng().random_range(0..leaders.len().max(1))) else {
            continue;
        };
        let Some(at) = processes
            .iter()
            .position(|(child, _)| &child.name == victim)
        else {
            continue;
        };
        let (mut child, _) = processes.swap_remove(at);
        child.process.kill().await.unwrap();
        kills += 1;
        processes.push(spawn(
            format!("partitioned-{generation}"),
            free_listen_addr(),
        ));
        generation += 1;
    }
    appending.await.unwrap();
    assert_eq!(head(&pool).await, total);
    wait_for_projection(&pool).await;
    let followed = tokio::time::timeout(PATIENCE, following)
        .await
        .expect("the follower reaches the end")
        .unwrap();

    // Every event folded exactly once, in order per account, whatever was killed when.
    let stored = stored_snapshots(&pool).await;
    assert_eq!(stored, fresh_fold(&pool).await);
    assert_eq!(stored.len(), accounts.len());
    assert!(stored.values().all(|s| s.version == 25), "{stored:?}");
    assert!(kills >= 5, "{kills}");
    // The follower never missed a change: its last view of each account is the final one.
    let finals: BTreeMap<Uuid, (i64, i64)> = stored
        .values()
        .map(|s| (s.account_id, (s.version, s.last_position)))
        .collect();
    assert_eq!(followed, finals);
    for (partition, partitions, position) in partition_checkpoints(&pool).await {
        assert_eq!((partitions, position), (3, total), "partition {partition}");
    }

    // Each leader says so in its /metrics, per partition.
    let leaders = partition_leaders(&pool, 3).await;
    let mut gauges = 0;
    for (index, leader) in leaders.iter().enumerate() {
        let leader = leader.as_deref().expect("every partition is led");
        let (_, listen) = processes
            .iter()
            .find(|(child, _)| child.name == leader)
            .expect("the leader is one of the running processes");
        let metrics = poll_for("the leader's metrics", || async {
            reqwest::get(format!("http://{listen}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()
        })
        .await;
        assert!(
            metrics.contains(&format!("projector_leader{{partition=\"{index}\"}} 1")),
            "{metrics}"
        );
        gauges += 1;
    }
    assert_eq!(gauges, 3);
    let (code, status, _) = run_binary(&database_url, &["status"], &[]).await;
    assert_eq!(code, 0);
    assert!(status.contains("partitions:  3"), "{status}");
    for index in 0..3 {
        assert!(
            status.contains(&format!(
                "partition {index}: checkpoint {total} (lag 0 events), leader partitioned-"
            )),
            "{status}"
        );
    }
    for (mut child, _) in processes {
        child.process.kill().await.unwrap();
    }

    // Verify and rebuild, whole and per partition, agree with the fold.
    let (code, _, stderr) = run_binary(&database_url, &["rebuild", "--verify"], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    for index in ["0", "1", "2"] {
        let (code, _, stderr) = run_binary(
            &database_url,
            &["rebuild", "--verify", "--partition", index],
            &[],
        )
        .await;
        assert_eq!(code, 0, "{stderr}");
    }
    let (code, _, stderr) = run_binary(&database_url, &["rebuild", "--partition", "1"], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stored_snapshots(&pool).await, stored);
    let (code, _, stderr) = run_binary(&database_url, &["rebuild", "--partition", "3"], &[]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("no partition 3"), "{stderr}");
    let (code, _, stderr) = run_binary(&database_url, &["rebuild"], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stored_snapshots(&pool).await, stored);
}

#[tokio::test]
async fn verify_per_partition_finds_a_wrong_snapshot_only_in_its_own_partition() {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let accounts = accounts_covering(2, 2, 4);
    append_rounds(&pool, &accounts, 0..3).await;
    let mut projector = spawn_binary(
        &database_url,
        "projector",
        "verify-partitions",
        &[("PROJECTOR_PARTITIONS", "2")],
    );
    wait_for_projection(&pool).await;
    projector.process.kill().await.unwrap();
    let (damaged, _) = accounts[0];
    sqlx::query("UPDATE account_snapshots SET version = version + 5 WHERE account_id = $1")
        .bind(damaged)
        .execute(&pool)
        .await
        .unwrap();
    let own = partition_of(damaged, 2).to_string();
    let other = (1 - partition_of(damaged, 2)).to_string();
    let (code, stdout, _) = run_binary(
        &database_url,
        &["rebuild", "--verify", "--partition", &own],
        &[],
    )
    .await;
    assert_eq!(code, 1);
    assert_eq!(stdout.trim(), format!("{damaged} version"));
    let (code, stdout, _) = run_binary(
        &database_url,
        &["rebuild", "--verify", "--partition", &other],
        &[],
    )
    .await;
    assert_eq!((code, stdout.as_str()), (0, ""));
    // Rebuilding the other partition leaves the damage; rebuilding its own mends it.
    run_binary(&database_url, &["rebuild", "--partition", &other], &[]).await;
    assert_ne!(stored_snapshots(&pool).await, fresh_fold(&pool).await);
    let (code, _, stderr) = run_binary(&database_url, &["rebuild", "--partition", &own], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stored_snapshots(&pool).await, fresh_fold(&pool).await);
}

#[tokio::test]
async fn another_number_of_partitions_waits_for_the_running_layout_then_lays_it_out_again() {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let accounts = accounts_covering(3, 2, 8);
    append_rounds(&pool, &accounts, 0..4).await;
    let mut two = spawn_binary(
        &database_url,
        "projector",
        "two-partitions",
        &[("PROJECTOR_PARTITIONS", "2")],
    );
    wait_for_projection(&pool).await;
    assert_eq!(partition_checkpoints(&pool).await.len(), 2);
    let mut three = spawn_binary(
        &database_url,
        "projector",
        "three-partitions",
        &[("PROJECTOR_PARTITIONS", "3")],
    );
    append_rounds(&pool, &accounts, 4..8).await;
    wait_for_projection(&pool).await;
    // The process of the stored layout leads both partitions; the other waits for it.
    assert_eq!(
        partition_leaders(&pool, 2).await,
        vec![
            Some("two-partitions".to_owned()),
            Some("two-partitions".to_owned())
        ]
    );
    assert_eq!(partition_checkpoints(&pool).await.len(), 2);
    two.process.kill().await.unwrap();
    poll_until(
        "the waiting projector lays the projection out in three",
        || async { partition_checkpoints(&pool).await.len() == 3 },
    )
    .await;
    append_rounds(&pool, &accounts, 8..9).await;
    wait_for_projection(&pool).await;
    assert_eq!(
        partition_leaders(&pool, 3).await,
        vec![Some("three-partitions".to_owned()); 3]
    );
    let stored = stored_snapshots(&pool).await;
    assert_eq!(stored, fresh_fold(&pool).await);
    assert!(stored.values().all(|s| s.version == 9), "{stored:?}");
    three.process.kill().await.unwrap();

    // Partitions 1 and 2 lag (only partition 0 folds the next round), so laying out in two must
    // first fold them up to partition 0: nothing twice, nothing skipped.
    append_rounds(&pool, &accounts, 9..10).await;
    poll_until("the killed leader's sessions are gone", || async {
        partition_leaders(&pool, 3)
            .await
            .iter()
            .all(Option::is_none)
    })
    .await;
    {
        let mut conn = pool.acquire().await.unwrap().detach();
        projector::run_batch(&mut conn, &vault(), Part { index: 0, of: 3 }, 1000)
            .await
            .unwrap();
    }
    let before = partition_checkpoints(&pool).await;
    assert!(
        before[0].2 > before[1].2 && before[0].2 > before[2].2,
        "{before:?}"
    );
    assert_eq!(checkpoint(&pool).await, before[1].2.min(before[2].2));
    let mut two = spawn_binary(
        &database_url,
        "projector",
        "two-partitions-again",
        &[("PROJECTOR_PARTITIONS", "2")],
    );
    poll_until("the projection is laid out in two", || async {
        partition_checkpoints(&pool).await.len() == 2
    })
    .await;
    wait_for_projection(&pool).await;
    let stored = stored_snapshots(&pool).await;
    assert_eq!(stored, fresh_fold(&pool).await);
    assert!(stored.values().all(|s| s.version == 10), "{stored:?}");
    two.process.kill().await.unwrap();

    // And back to one: the whole projection's own checkpoint and leader.
    let mut one = spawn_binary(&database_url, "projector", "one-partition", &[]);
    poll_until("the projection is whole again", || async {
        partition_checkpoints(&pool).await.is_empty()
    })
    .await;
    append_rounds(&pool, &accounts, 10..11).await;
    wait_for_projection(&pool).await;
    assert_eq!(leader(&pool).await.as_deref(), Some("one-partition"));
    let stored = stored_snapshots(&pool).await;
    assert_eq!(stored, fresh_fold(&pool).await);
    assert!(stored.values().all(|s| s.version == 11), "{stored:?}");
    one.process.kill().await.unwrap();
}

#[tokio::test]
async fn a_number_of_partitions_out_of_range_is_refused_at_start() {
    let database_url = migrated_database().await;
    let cases = ["65", "0", "two", "-1", ""];
    for partitions in cases {
        let (code, _, err) = run_binary(
            &database_url,
            &[
                "serve",
                "--role",
                "projector",
                "--listen-addr",
                "127.0.0.1:0",
            ],
            &[("PROJECTOR_PARTITIONS", partitions)],
        )
        .await;
        assert_ne!(code, 0, "PROJECTOR_PARTITIONS={partitions}: {err}");
        assert!(err.contains("PROJECTOR_PARTITIONS"), "{err}");
    }
    assert_eq!(cases.len(), 5);
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    assert!(partition_checkpoints(&pool).await.is_empty());
}

#[tokio::test]
async fn the_health_page_shows_each_partition_its_checkpoint_and_its_leader() {
    let mut settings = test_settings().await;
    settings.projector.partitions = 2;
    let app = spawn_app_with(settings).await;
    let accounts = accounts_covering(2, 1, 2);
    for &(account, user) in &accounts {
        app.deliver(&refinement(account, user, 1)).await;
    }
    app.wait_for_projection().await;
    let head = head(&app.pool).await;
    let health = crate::ui::get_page(&app, "/ui/health", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        health
            .contains(r#"<dd id="partitions">2 (the checkpoint above is the lowest of them)</dd>"#),
        "{health}"
    );
    for index in 0..2 {
        let line = format!(
            r#"<dd id="partition-{index}">checkpoint {head} (lag 0); leader account-projector all (backend pid "#
        );
        assert!(health.contains(&line), "{line} in {health}");
    }
    assert!(!health.contains(r#"id="leader""#));
    app.stop().await;
}
