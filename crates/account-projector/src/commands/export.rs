//! `export`: the audit trail as NDJSON on stdout.

use std::process::ExitCode;

use account_projector::export;
use store::log::ExportFilter;

use crate::cli::ExportArgs;

pub(crate) async fn run(database_url: &str, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let vault = args.keys.vault()?;
    let pool = super::batch_pool(database_url).await?;
    let filter = ExportFilter {
        account: args.account,
        user: args.user,
        since: args.since,
        until: args.until,
    };
    let secrets = ingest::Secrets::new(&args.secrets.secrets()?);
    match export::export(&pool, &vault, filter, &secrets, tokio::io::stdout()).await {
        Ok(lines) => tracing::info!(lines, "export done"),
        // The reader went away (`| head`): not an error of ours.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => {}
        Err(e) => return Err(e),
    }
    Ok(ExitCode::SUCCESS)
}
