//! `keys rotate | seal`: the owner's key operations (docs/erasure.md).

use std::process::ExitCode;

use account_projector::progress;

use crate::cli::{KeysAction, KeysArgs};

/// Rows per transaction.
const BATCH: i64 = 1000;

pub(crate) async fn run(database_url: &str, args: KeysArgs) -> anyhow::Result<ExitCode> {
    let vault = args.keys.vault()?;
    let Some(ring) = vault.ring() else {
        anyhow::bail!("keys needs DATA_KEYS (or DATA_KEYS_FILE)");
    };
    let pool = super::batch_pool(database_url).await?;
    let mut conn = pool.acquire().await.map_err(store::Error::from)?;
    let owner_only = |error: store::Error| -> anyhow::Error {
        // SQLSTATE 42501: insufficient_privilege, as the service role meets it here.
        if error.reason().contains("SQLSTATE 42501") {
            anyhow::anyhow!(
                "this needs the schema's owner (the role `migrate` runs as): {}",
                error.reason()
            )
        } else {
            error.into()
        }
    };
    match args.action {
        KeysAction::Rotate => {
            let newest = ring.newest_id().to_owned();
            let bar = progress::for_stderr("rotate");
            bar.start(0);
            let mut last = 0u64;
            let rotated = store::keys::rotate(&mut conn, &vault, BATCH, |done| {
                bar.advance(done.rewrapped - last);
                last = done.rewrapped;
            })
            .await
            .map_err(owner_only)?;
            bar.finish();
            println!(
                "keys rotate: {} account keys re-wrapped under key-encryption key {newest}; {} were under it already",
                rotated.rewrapped, rotated.current
            );
            println!(
                "every live account key is now under {newest}: the older DATA_KEYS entries can be removed"
            );
        }
        KeysAction::Seal => {
            let bar = progress::for_stderr("seal");
            let mut started = false;
            let mut last = 0u64;
            let sealed = store::erasure::seal_log(&mut conn, &vault, BATCH, |done| {
                if !started {
                    bar.start(done.events_total);
                    started = true;
                }
                bar.advance(done.events - last);
                last = done.events;
            })
            .await
            .map_err(owner_only)?;
            bar.finish();
            println!(
                "keys seal: {} event bodies and {} derived rows sealed; the log holds no plaintext body (but erasure events)",
                sealed.events, sealed.rows
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
