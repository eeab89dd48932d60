//! `status`: the log, the projection and the enricher, at a glance.

use std::process::ExitCode;

pub(crate) async fn run(database_url: &str) -> anyhow::Result<ExitCode> {
    let pool = store::pool(
        database_url,
        &store::DbOptions {
            max_connections: 1,
            ..store::DbOptions::default()
        },
    )?;
    let mut conn = pool.acquire().await.map_err(store::Error::from)?;
    let ready = store::check_ready_on(&mut conn).await;
    if ready == Err(store::NotReady::Unavailable) {
        anyhow::bail!("cannot reach the database");
    }
    println!(
        "migrations:  {}",
        if ready.is_ok() {
            "up to date"
        } else {
            "pending (run `account-projector migrate`)"
        }
    );
    if ready.is_err() {
        return Ok(ExitCode::FAILURE);
    }
    let head = store::log::head(&mut conn).await?;
    let checkpoint = store::checkpoints::get(&mut conn, store::checkpoints::PROJECTION).await?;
    let counts = store::log::counts(&mut conn).await?;
    let snapshots = store::snapshots::count(&mut conn).await?;
    let quarantined = store::quarantine::count(&mut conn).await?;
    let leader = store::locks::holder(&mut conn, store::locks::Lock::Leader).await?;
    println!("log head:    {head}");
    println!(
        "checkpoint:  {checkpoint} (lag {} events)",
        head - checkpoint
    );
    match leader {
        Some((name, address, pid)) => println!(
            "leader:      {name} (backend pid {pid}{})",
            address.map(|a| format!(", from {a}")).unwrap_or_default()
        ),
        None => println!("leader:      none (no projector is running)"),
    }
    println!(
        "events:      {} ({} deliveries)",
        counts.events, counts.deliveries
    );
    println!("snapshots:   {snapshots}");
    println!("quarantined: {quarantined}");
    let scanned = store::checkpoints::get(&mut conn, store::checkpoints::ENRICHER).await?;
    let pending = store::enrichment::pending(&mut conn).await?;
    println!(
        "enricher:    scanned to {scanned} (lag {} events), {pending} fetch(es) pending",
        head - scanned
    );
    Ok(ExitCode::SUCCESS)
}
