//! `erase (--account ID | --user ID) --reason TEXT`: crypto-shredding ([`projector::erase`]).

use std::process::ExitCode;

use projector::erase::{self, Outcome, Request};

use crate::cli::EraseArgs;

pub(crate) async fn run(database_url: &str, args: EraseArgs) -> anyhow::Result<ExitCode> {
    let vault = args.keys.vault()?;
    let pool = super::batch_pool(database_url).await?;
    let request = Request {
        reason: args.reason.clone(),
        requested_by: args.by.clone(),
    };
    let outcomes = match (args.account, args.user) {
        (Some(account), _) => vec![(
            account,
            erase::erase(&pool, &vault, account, &request).await?,
        )],
        (None, Some(user)) => {
            let outcomes = erase::erase_user(&pool, &vault, user, &request).await?;
            if outcomes.is_empty() {
                anyhow::bail!("user {user} has no accounts in the log");
            }
            outcomes
        }
        (None, None) => anyhow::bail!("give --account ID or --user ID"),
    };
    for (account, outcome) in &outcomes {
        match outcome {
            Outcome::Erased { position } => {
                println!("{account} erased (erasure event at position {position})");
            }
            Outcome::AlreadyErased { position } => {
                println!("{account} was already erased (at position {position})");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
