//! Crashes and shutdown: the projector killed between and in the middle of batches, and SIGTERM.

use std::time::Duration;

use uuid::Uuid;

use crate::helpers::*;

async fn append_round(pool: &sqlx::PgPool, accounts: &[(Uuid, Uuid)], steps: std::ops::Range<u32>) {
    for step in steps {
        let (account, user) = accounts[step as usize % accounts.len()];
        append_direct(pool, &refinement(account, user, step)).await;
    }
}

#[tokio::test]
async fn a_projector_killed_between_or_in_the_middle_of_batches_resumes_without_loss_or_double_counting()
 {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let accounts: Vec<(Uuid, Uuid)> = (0..3).map(|_| (Uuid::new_v4(), Uuid::new_v4())).collect();
    let batch = [("PROJECTOR_BATCH_SIZE", "4")];

    // Round one: fold, then kill while idle, i.e. between batches.
    append_round(&pool, &accounts, 0..30).await;
    let mut projector = spawn_binary(&database_url, "projector", "projector-1", &batch);
    wait_for_projection(&pool).await;
    projector.process.kill().await.unwrap();
    let before = stored_snapshots(&pool).await;
    assert_eq!(before, fresh_fold(&pool).await);

    // Round two: hold one snapshot row locked so the next batch blocks while writing snapshots,
    // then kill the projector in the middle of that batch.
    append_round(&pool, &accounts, 30..60).await;
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM account_snapshots WHERE account_id = $1 FOR UPDATE")
        .bind(accounts[0].0)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut projector = spawn_binary(&database_url, "projector", "projector-2", &batch);
    poll_until("the projector is blocked mid-batch", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'projector-2' AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    projector.process.kill().await.unwrap();
    blocker.rollback().await.unwrap();
    // The killed batch left nothing behind.
    poll_until("the killed session is gone", || async {
        let sessions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'projector-2'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        sessions == 0
    })
    .await;
    assert_eq!(
        checkpoint(&pool).await,
        30,
        "the interrupted batch did not commit"
    );
    assert_eq!(
        stored_snapshots(&pool).await,
        before,
        "no partial batch is visible"
    );

    // Restart: everything is folded exactly once.
    let mut projector = spawn_binary(&database_url, "projector", "projector-3", &batch);
    wait_for_projection(&pool).await;
    let after = stored_snapshots(&pool).await;
    assert_eq!(after, fresh_fold(&pool).await);
    assert!(after.values().all(|s| s.version == 20));
    projector.process.kill().await.unwrap();
}

#[tokio::test]
async fn sigterm_stops_the_service_cleanly() {
    let database_url = migrated_database().await;
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let mut service = spawn_binary(&database_url, "all", "service", &[]);
    poll_until("the projector leads", || async {
        leader(&pool).await.is_some()
    })
    .await;
    let pid = service.process.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(15), service.process.wait())
        .await
        .expect("the service exits within 15 s")
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    assert_eq!(leader(&pool).await, None, "leadership released");
}
