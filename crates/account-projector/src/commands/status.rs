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
    let layout = store::partitions::layout(&mut conn).await?;
    println!("log head:    {head}");
    println!(
        "checkpoint:  {checkpoint} (lag {} events)",
        head - checkpoint
    );
    let holder = |held: Option<(String, Option<String>, i32)>| match held {
        Some((name, address, pid)) => format!(
            "{name} (backend pid {pid}{})",
            address.map(|a| format!(", from {a}")).unwrap_or_default()
        ),
        None => "none (no projector is running)".to_owned(),
    };
    if layout.partitions() == 1 {
        let leader = store::locks::holder(&mut conn, store::locks::Lock::Leader).await?;
        println!("leader:      {}", holder(leader));
    } else {
        println!(
            "partitions:  {} (the checkpoint above is the lowest of them)",
            layout.partitions()
        );
        for (part, at) in layout.parts() {
            let leader = store::locks::holder(&mut conn, part.lock()).await?;
            println!(
                "partition {}: checkpoint {at} (lag {} events), leader {}",
                part.index,
                head - at,
                holder(leader)
            );
        }
    }
    println!(
        "events:      {} ({} deliveries)",
        counts.events, counts.deliveries
    );
    let settled = store::log::settled(&mut conn).await?;
    println!(
        "settled:     {} ({} events + {} abandoned appends{})",
        settled.settled,
        settled.events,
        settled.abandoned,
        if settled.events + settled.abandoned == settled.settled {
            ": every position accounted for"
        } else {
            ": POSITIONS MISSING"
        }
    );
    println!("snapshots:   {snapshots}");
    println!("quarantined: {quarantined}");
    let scanned = store::checkpoints::get(&mut conn, store::checkpoints::ENRICHER).await?;
    let pending = store::enrichment::pending(&mut conn).await?;
    println!(
        "enricher:    scanned to {scanned} (lag {} events), {pending} fetch(es) pending",
        head - scanned
    );
    let subscribers = store::subscribers::list(&mut conn).await?;
    let failing = subscribers.iter().filter(|s| s.state == "failing").count();
    let pending: i64 = subscribers.iter().map(|s| s.pending).sum();
    let notifier = store::locks::holder(&mut conn, store::locks::Lock::Notifier).await?;
    println!(
        "notifier:    {} subscriber(s), {failing} failing, {pending} message(s) pending; {}",
        subscribers.len(),
        match notifier {
            Some((name, _, pid)) => format!("leader {name} (backend pid {pid})"),
            None => "no notifier is running".into(),
        }
    );
    let keys = store::keys::counts(&mut conn).await?;
    let live: i64 = keys.live_by_kek.iter().map(|(_, n)| n).sum();
    let by_kek: Vec<String> = keys
        .live_by_kek
        .iter()
        .map(|(kek, n)| format!("{n} under {kek}"))
        .collect();
    println!(
        "keys:        {live} account key(s){}",
        if by_kek.is_empty() {
            String::new()
        } else {
            format!(" ({})", by_kek.join(", "))
        }
    );
    let (awaiting, oldest) = store::erasure::removed_pending(&mut conn).await?;
    println!(
        "erasure:     {} account(s) erased; {awaiting} removed account(s) not erased{}",
        keys.erased,
        oldest
            .map(|t| format!(
                " (removed since {}; ERASE_REMOVED_AFTER erases them when due)",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ))
            .unwrap_or_default()
    );
    let reconciling = store::locks::holder(&mut conn, store::locks::Lock::Reconcile).await?;
    match store::reconcile::latest(&mut conn, false).await? {
        None => println!("reconcile:   never run"),
        Some(run) => {
            let c = &run.counts;
            let counts = format!(
                "listed {}, new {}, newer at Argyle {}, unchanged {}, newer here {}",
                c.listed, c.new, c.newer_at_argyle, c.unchanged, c.newer_here
            );
            let when = |t: chrono::DateTime<chrono::Utc>| {
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            };
            match (run.state.as_str(), &reconciling) {
                ("running", Some((name, _, pid))) => println!(
                    "reconcile:   run {} running since {} ({name}, backend pid {pid}): page {}, {counts}",
                    run.id,
                    when(run.started_at),
                    run.pages
                ),
                ("running", None) => println!(
                    "reconcile:   run {} stopped after page {} at {} (the next run resumes it){}: {counts}",
                    run.id,
                    run.pages,
                    when(run.updated_at),
                    run.error
                        .as_deref()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                ),
                (state, _) => println!(
                    "reconcile:   run {} {state} at {} (started by {}): {counts}, missing at Argyle {}{}",
                    run.id,
                    run.finished_at.map(when).unwrap_or_default(),
                    run.started_by,
                    run.missing.unwrap_or(0),
                    if run.removals > 0 {
                        format!(", {} removal(s) confirmed", run.removals)
                    } else {
                        String::new()
                    }
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
