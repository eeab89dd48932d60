//! Data set up straight through the store (no HTTP), and waiting for the projector to fold it.

use std::time::{Duration, Instant};

use uuid::Uuid;

/// The bench's key-encryption key (DATA_KEYS of the servers it starts): a fixed key, so the
/// data it loads through the store opens in the server. Never a production key.
pub const DATA_KEY: &str = "YmVuY2gtb25seS1rZXktZW5jcnlwdGlvbi1rZXkhIT8=";

/// A vault with [`DATA_KEY`]: what every scenario seals with (encryption at rest is the default).
pub fn vault() -> store::keys::Vault {
    store::keys::Vault::new(sealing::KeyRing::parse(DATA_KEY).expect("the bench key parses"))
}

/// Waits until the projector's checkpoint reaches the head of the log.
pub async fn wait_projected(pool: &store::PgPool) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let head = store::log::head(&mut conn).await?;
    while store::checkpoints::get(&mut conn, store::checkpoints::PROJECTION).await? < head {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Appends `bodies` straight into the log through the store, in batches (for setting up data),
/// sealed with [`vault`].
pub async fn append_bodies(
    pool: &store::PgPool,
    bodies: impl Iterator<Item = Vec<u8>>,
) -> anyhow::Result<usize> {
    append_bodies_with(pool, &vault(), bodies).await
}

/// [`append_bodies`] with `vault` instead (e.g. [`store::keys::Vault::plaintext`], encryption off).
pub async fn append_bodies_with(
    pool: &store::PgPool,
    vault: &store::keys::Vault,
    bodies: impl Iterator<Item = Vec<u8>>,
) -> anyhow::Result<usize> {
    let mut batch = Vec::with_capacity(1000);
    let mut count = 0;
    let mut conn = pool.acquire().await?;
    for body in bodies {
        let envelope = domain::Envelope::parse(&body)?;
        batch.push(store::log::Delivery::new(&body, None, &envelope));
        if batch.len() == 1000 {
            count += store::log::append_in(&mut conn, vault, &batch, Duration::from_secs(86_400))
                .await?
                .len();
            batch.clear();
        }
    }
    count += store::log::append_in(&mut conn, vault, &batch, Duration::from_secs(86_400))
        .await?
        .len();
    Ok(count)
}

/// Appends `events` refinements spread over `accounts` new accounts, interleaved step by step across
/// all of them as live traffic is, sealed with [`vault`]; returns how many.
pub async fn load_interleaved(
    pool: &store::PgPool,
    events: usize,
    accounts: usize,
) -> anyhow::Result<usize> {
    load_interleaved_with(pool, &vault(), events, accounts).await
}

/// [`load_interleaved`] with `vault` instead (e.g. [`store::keys::Vault::plaintext`], encryption
/// off).
pub async fn load_interleaved_with(
    pool: &store::PgPool,
    vault: &store::keys::Vault,
    events: usize,
    accounts: usize,
) -> anyhow::Result<usize> {
    let per_account = events.div_ceil(accounts);
    let ids: Vec<(Uuid, Uuid)> = (0..accounts)
        .map(|_| (Uuid::new_v4(), Uuid::new_v4()))
        .collect();
    let started = Instant::now();
    let bodies = (0..per_account).flat_map(|step| {
        ids.iter()
            .map(move |(account, user)| refinement(*account, *user, step))
    });
    let appended = append_bodies_with(pool, vault, bodies.take(events)).await?;
    let load_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "bench: loaded {appended} events in {load_secs:.1} s ({:.0}/s through append_webhooks, batches of 1,000)",
        appended as f64 / load_secs
    );
    Ok(appended)
}

/// `count` refinements (`accounts.updated`) of one account, one millisecond apart.
pub fn refinements(account: Uuid, user: Uuid, count: usize) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(move |step| refinement(account, user, step))
}

/// The `step`-th refinement of an account: an `accounts.updated` with a resource of about 2 KB,
/// `step` milliseconds after the first.
pub fn refinement(account: Uuid, user: Uuid, step: usize) -> Vec<u8> {
    let at = chrono::DateTime::parse_from_rfc3339("2026-03-02T15:04:11Z").unwrap()
        + chrono::Duration::milliseconds(step as i64);
    let resource = serde_json::json!({"id": account, "user": user, "updated_at": at.to_rfc3339(),
        "connection": {"status": "connected"}, "step": step, "pad": "x".repeat(1800)});
    loadgen::body("accounts.updated", account, user, Some(&resource))
}

/// Fresh statistics, as autovacuum would have gathered on a live system.
pub async fn analyze(conn: &mut store::PgConnection) {
    let _ = store::analyze(conn).await;
}
