//! `rebuild [--verify] [--account ID | --partition I]`: refold snapshots from the log, or compare them with it.

use std::process::ExitCode;

use account_projector::progress;
use projector::rebuild;

use crate::cli::RebuildArgs;

pub(crate) async fn run(database_url: &str, args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let vault = args.keys.vault()?;
    let pool = super::batch_pool(database_url).await?;
    if args.verify {
        let progress = progress::for_stderr("verify");
        let differences = rebuild::verify(
            &pool,
            &vault,
            args.account,
            args.partition,
            progress.as_ref(),
        )
        .await?;
        for difference in &differences {
            println!("{} {}", difference.account_id, difference.fields.join(","));
        }
        if differences.is_empty() {
            eprintln!("verify: every snapshot equals a fresh fold of the log");
            Ok(ExitCode::SUCCESS)
        } else {
            eprintln!(
                "verify: {} snapshot(s) differ from the log",
                differences.len()
            );
            Ok(ExitCode::FAILURE)
        }
    } else {
        let report = match args.account {
            Some(account) => rebuild::rebuild_account(&pool, &vault, account).await?,
            None => {
                let progress = progress::for_stderr("rebuild");
                rebuild::rebuild_all(&pool, &vault, args.partition, progress.as_ref()).await?
            }
        };
        eprintln!(
            "rebuild: folded {} events into {} snapshot(s); checkpoint {}",
            report.events, report.accounts, report.checkpoint
        );
        Ok(ExitCode::SUCCESS)
    }
}
