//! `subscribers add|list|remove|replay`: the receivers of outbound webhooks ([`notifier`]).

use std::process::ExitCode;

use crate::cli::{SubscribersAction, SubscribersArgs};

pub(crate) async fn run(database_url: &str, args: SubscribersArgs) -> anyhow::Result<ExitCode> {
    let pool = super::batch_pool(database_url).await?;
    let mut conn = pool.acquire().await.map_err(store::Error::from)?;
    match args.action {
        SubscribersAction::Add { url, from } => {
            let url = notifier::check_url(&url).map_err(|e| anyhow::anyhow!("{e}"))?;
            let id = uuid::Uuid::new_v4();
            let secret = notifier::new_secret();
            store::subscribers::add(&mut conn, id, url.as_str(), &secret, from).await?;
            println!("id: {id}");
            println!("url: {url}");
            println!("secret: {secret}");
            eprintln!(
                "subscribers: added; verify each delivery's webhook-signature with this secret \
                 (Standard Webhooks)"
            );
        }
        SubscribersAction::List { show_secrets } => {
            let checkpoint =
                store::checkpoints::get(&mut conn, store::checkpoints::PROJECTION).await?;
            let subscribers = store::subscribers::list(&mut conn).await?;
            if subscribers.is_empty() {
                eprintln!("subscribers: none");
            }
            for s in subscribers {
                let secret = if show_secrets {
                    s.secret.as_str()
                } else {
                    "hidden"
                };
                println!(
                    "{}  state={}  url={}  cursor={}  lag={}  pending={}  secret={}  last_error={}",
                    s.id,
                    s.state,
                    s.url,
                    s.delivered_to,
                    (checkpoint - s.delivered_to).max(0),
                    s.pending,
                    secret,
                    s.last_error.as_deref().unwrap_or("none")
                );
            }
        }
        SubscribersAction::Remove { id } => {
            if !store::subscribers::remove(&mut conn, id).await? {
                anyhow::bail!("there is no subscriber {id}");
            }
            eprintln!("subscribers: removed {id}");
        }
        SubscribersAction::Replay { id, from } => {
            if !store::subscribers::replay(&mut conn, id, from).await? {
                anyhow::bail!("there is no subscriber {id}");
            }
            eprintln!("subscribers: every change after {from} goes to {id} again");
        }
    }
    Ok(ExitCode::SUCCESS)
}
