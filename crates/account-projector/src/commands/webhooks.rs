//! `webhooks create|list|delete`: the Argyle webhook subscription, through Argyle's API.

use std::process::ExitCode;

use account_projector::secret;
use account_projector::webhooks::{self, CreateOptions};

use crate::cli::{WebhooksAction, WebhooksArgs, webhook_secret};

pub(crate) async fn run(args: WebhooksArgs) -> anyhow::Result<ExitCode> {
    let Some(api) = args.argyle.api()? else {
        anyhow::bail!(
            "set ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET (Argyle console: Developers > API keys)"
        );
    };
    let client = api.client()?;
    match args.action {
        WebhooksAction::Create {
            url,
            name,
            events,
            no_include_resource,
            secret,
            secret_file,
        } => {
            let secret = match secret_file {
                Some(path) => {
                    let read = secret::read_one(&path)?;
                    Some(webhook_secret(read.expose()).map_err(|e| anyhow::anyhow!("{e}"))?)
                }
                None => secret,
            };
            let options = CreateOptions {
                url,
                name,
                events,
                include_resource: !no_include_resource,
                secret: secret.map(|s| s.expose().to_owned()),
            };
            let mut report = webhooks::create(&client, &options).await?;
            print!("{}", webhooks::describe_create(&report));
            if let Some(error) = report.error.take() {
                return Err(error.into());
            }
        }
        WebhooksAction::List { show_secrets } => {
            let listed = client.list_webhooks().await?;
            print!("{}", webhooks::describe_list(&listed, show_secrets));
        }
        WebhooksAction::Delete { id } => {
            client.delete_webhook(&id).await?;
            println!("deleted {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
