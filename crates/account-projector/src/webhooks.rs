//! `account-projector webhooks create|list|delete`: the Argyle subscription that sends us webhooks.

use std::fmt::Write as _;
use std::time::Duration;

use argyle::{Client, NewWebhook, RESOURCE_EVENTS, Webhook, WebhookConfig};

/// What `webhooks create` was asked for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub url: String,
    pub name: String,
    pub events: Vec<String>,
    pub include_resource: bool,
    /// The signing secret; generated when `None` (or reused from an identical subscription).
    pub secret: Option<String>,
}

/// What `webhooks create` did, subscription by subscription.
#[derive(Debug)]
pub struct CreateReport {
    pub created: Vec<Webhook>,
    pub existing: Vec<Webhook>,
    /// The secret the created subscriptions sign with (`None` if nothing was created).
    pub secret: Option<String>,
    /// Why creating stopped part way, if it did: what was created before still stands and signs
    /// with `secret`.
    pub error: Option<argyle::Error>,
}

/// The subscriptions `options` needs. With `include_resource`, events Argyle cannot send a
/// resource with (`accounts.removed`) go in a second subscription without it, named `<name>-no-resource`.
pub fn plan(options: &CreateOptions) -> Vec<NewWebhook> {
    let new = |name: &str, events: Vec<String>, include_resource: bool| NewWebhook {
        events,
        name: name.to_owned(),
        url: options.url.clone(),
        secret: options.secret.clone(),
        config: include_resource.then_some(WebhookConfig {
            include_resource: true,
        }),
    };
    if !options.include_resource {
        return vec![new(&options.name, options.events.clone(), false)];
    }
    let (with, without): (Vec<String>, Vec<String>) = options
        .events
        .iter()
        .cloned()
        .partition(|e| RESOURCE_EVENTS.contains(&e.as_str()));
    match (with.is_empty(), without.is_empty()) {
        (false, false) => vec![
            new(&options.name, with, true),
            new(&format!("{}-no-resource", options.name), without, false),
        ],
        (false, true) => vec![new(&options.name, with, true)],
        (true, _) => vec![new(&options.name, without, false)],
    }
}

/// Same name, url and events (in any order).
fn matches(existing: &Webhook, wanted: &NewWebhook) -> bool {
    let mut events = wanted.events.clone();
    events.sort();
    existing.name == wanted.name && existing.url == wanted.url && existing.events.sorted() == events
}

/// Creates the subscriptions `options` needs, skipping any that already exist. Safe to repeat.
pub async fn create(
    client: &Client,
    options: &CreateOptions,
) -> Result<CreateReport, argyle::Error> {
    let listed = client.list_webhooks().await?;
    let mut report = CreateReport {
        created: vec![],
        existing: vec![],
        secret: None,
        error: None,
    };
    let mut missing = vec![];
    for wanted in plan(options) {
        match listed.iter().find(|w| matches(w, &wanted)) {
            Some(existing) => report.existing.push(existing.clone()),
            None => missing.push(wanted),
        }
    }
    if missing.is_empty() {
        return Ok(report);
    }
    // One secret for every subscription, so ARGYLE_WEBHOOK_SECRETS needs one entry: the one given,
    // else the one an existing half of the pair signs with, else a new one.
    let secret = options
        .secret
        .clone()
        .or_else(|| report.existing.iter().find_map(|w| w.secret.clone()))
        .unwrap_or_else(generate_secret);
    for mut wanted in missing {
        wanted.secret = Some(secret.clone());
        match create_one(client, &wanted).await {
            Ok(created) => report.created.push(created),
            Err(error) => {
                report.error = Some(error);
                break;
            }
        }
    }
    if report.created.is_empty() {
        // Nothing stands that signs with the new secret: the error alone says it.
        return Err(report.error.take().expect("a creation failed"));
    }
    report.secret = Some(secret);
    Ok(report)
}

/// `POST /webhooks`, retried after a server or network error only once a fresh list shows the
/// subscription was not created after all: never two of the same.
async fn create_one(client: &Client, wanted: &NewWebhook) -> Result<Webhook, argyle::Error> {
    const ATTEMPTS: u32 = 3;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.create_webhook(wanted).await {
            Err(error) if error.is_transient() && attempt < ATTEMPTS => {
                tracing::warn!(%error, name = %wanted.name, "creating the subscription failed; checking before retrying");
                tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                let listed = client.list_webhooks().await?;
                if let Some(created) = listed.into_iter().find(|w| matches(w, wanted)) {
                    return Ok(created);
                }
            }
            result => return result,
        }
    }
}

/// 32 random bytes from the operating system's generator, hex-encoded.
pub fn generate_secret() -> String {
    use rand::TryRngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random generator works");
    hex::encode(bytes)
}

/// `webhooks create`'s output.
pub fn describe_create(report: &CreateReport) -> String {
    let mut out = String::new();
    for webhook in &report.created {
        let _ = writeln!(out, "created  {}", one_line(webhook, false));
    }
    for webhook in &report.existing {
        let _ = writeln!(out, "exists   {}", one_line(webhook, false));
    }
    if let Some(error) = &report.error {
        let _ = writeln!(
            out,
            "\nstopped: {error}\nThe subscription(s) created above are live; run the same command again to create the rest."
        );
    }
    match &report.secret {
        Some(secret) => {
            let _ = writeln!(
                out,
                "\nArgyle signs these webhooks with this secret; give it to ingest (append it, comma-separated, to any secret already there while rotating):\nARGYLE_WEBHOOK_SECRETS={secret}"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "\nNothing to do: identical subscriptions exist and keep their secret (see `webhooks list --show-secrets`)."
            );
        }
    }
    out
}

/// `webhooks list`'s output: one subscription per line; secrets shown only when asked.
pub fn describe_list(webhooks: &[Webhook], show_secrets: bool) -> String {
    if webhooks.is_empty() {
        return "no webhook subscriptions\n".into();
    }
    webhooks
        .iter()
        .map(|w| one_line(w, show_secrets) + "\n")
        .collect()
}

fn one_line(webhook: &Webhook, show_secret: bool) -> String {
    let secret = match (&webhook.secret, show_secret) {
        (None, _) => "none".to_owned(),
        (Some(_), false) => "hidden".to_owned(),
        (Some(secret), true) => secret.clone(),
    };
    format!(
        "{}  name={}  url={}  events={}  include_resource={}  created_at={}  secret={}",
        webhook.id,
        webhook.name,
        webhook.url,
        webhook.events.sorted().join(","),
        webhook.include_resource(),
        webhook.created_at.as_deref().unwrap_or("?"),
        secret
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(events: &[&str], include_resource: bool) -> CreateOptions {
        CreateOptions {
            url: "https://example.com/webhooks/argyle".into(),
            name: "account-projector".into(),
            events: events.iter().map(|e| (*e).to_owned()).collect(),
            include_resource,
            secret: None,
        }
    }

    #[test]
    fn removed_goes_in_a_subscription_without_the_resource() {
        let planned = plan(&options(&argyle::ACCOUNT_EVENTS, true));
        assert_eq!(planned.len(), 2);
        assert_eq!(planned[0].name, "account-projector");
        assert_eq!(planned[0].events, RESOURCE_EVENTS);
        assert!(planned[0].config.is_some());
        assert_eq!(planned[1].name, "account-projector-no-resource");
        assert_eq!(planned[1].events, ["accounts.removed"]);
        assert!(planned[1].config.is_none());

        let plain = plan(&options(&argyle::ACCOUNT_EVENTS, false));
        assert_eq!(plain.len(), 1);
        assert!(plain[0].config.is_none());
        assert_eq!(plan(&options(&["accounts.removed"], true)).len(), 1);
    }

    #[test]
    fn secrets_are_long_and_fresh() {
        let (a, b) = (generate_secret(), generate_secret());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
