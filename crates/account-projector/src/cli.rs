//! The command line: every subcommand, flag and environment variable (clap). Defaults come from
//! [`Settings::new`] and the configurations it holds, never written twice.

use std::path::PathBuf;

use account_projector::secret::{self, DatabaseUrl, Secret};
use account_projector::telemetry::LogFormat;
use account_projector::{ArgyleApi, Role, Settings};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use uuid::Uuid;

/// Keeps an exact, auditable view of payroll accounts connected through Argyle: signed webhooks go
/// into an append-only Postgres event log, and a projector folds it into one snapshot per account.
#[derive(Parser, Debug)]
#[command(name = "account-projector", version)]
pub(crate) struct Cli {
    /// Postgres connection URL (Postgres 14+). TLS as libpq does it: `?sslmode=` disable, prefer
    /// (the default), require, verify-ca or verify-full, and `sslrootcert=` a PEM file of root
    /// certificates. Prefer the environment variable: a flag shows in `ps`.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/account_projector",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = |raw: &str| Ok::<_, String>(DatabaseUrl(raw.to_owned()))
    )]
    pub(crate) database_url: DatabaseUrl,

    /// Log format.
    #[arg(
        long,
        global = true,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    pub(crate) log_format: LogFormat,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create the database if missing, apply pending migrations, and exit.
    Migrate,
    /// Run the service: webhook ingest, projector and query API (or one of them, by --role).
    Serve(Box<ServeArgs>),
    /// Refold snapshots from the event log and swap them in, while the service keeps running.
    ///
    /// With --verify nothing is written: the live snapshots are compared with a fresh fold of the
    /// log, each difference is printed (account id and differing fields), and the exit status is 1
    /// if there is any.
    Rebuild(RebuildArgs),
    /// Print the state of the log and the projection: head, checkpoint, lag, leader, counts.
    Status,
    /// Audit export: every event as one NDJSON line on stdout, in log order, with its raw body,
    /// sha256, signature header as received, and the signature re-checked now.
    Export(ExportArgs),
    /// Manage the Argyle webhook subscription that sends this service its webhooks.
    Webhooks(WebhooksArgs),
    /// Compare every account Argyle lists with the log, and append what the log lacks.
    ///
    /// Pages through GET /v2/accounts and, for each account unknown here or with a newer
    /// `updated_at` at Argyle, appends Argyle's object as an `argyle.account_fetched` event: the
    /// backfill of a new installation, and the repair after webhooks were lost. Running it again
    /// appends nothing new; a run that was stopped is resumed from its last page. Accounts held as
    /// active that Argyle does not list are printed, never removed unless --confirm-removals.
    ///
    /// Exit status: 0 done, 1 error, 3 removals refused by the missing-share guard, 130 stopped
    /// (run again to resume).
    Reconcile(ReconcileArgs),
    /// Manage outbound webhook subscribers: receivers of every change of the projection, signed
    /// per the Standard Webhooks spec, delivered by the notifier role.
    Subscribers(SubscribersArgs),
    /// Erase an account's personal data (or every account of a user): its key is destroyed, so
    /// nothing can read its events, snapshot or messages again; the log keeps every row, and the
    /// erasure is appended to it (when, why, by whom).
    ///
    /// Irreversible. The account then shows as `erased` everywhere; later webhooks for it are
    /// logged but never readable. Exit status: 0 erased (or already erased), 1 error.
    Erase(EraseArgs),
    /// Key-encryption keys (DATA_KEYS) and account keys.
    Keys(KeysArgs),
}

/// The key-encryption keys: every command that reads or writes personal data needs them.
#[derive(clap::Args, Debug)]
pub(crate) struct KeyArgs {
    /// Comma-separated base64 32-byte key-encryption keys, newest first (rotation: add the new
    /// key first, run `keys rotate`, then drop the old one). Without it (and without
    /// --data-keys-file), a key is generated on first start into
    /// ~/.config/account-projector/data-keys for local use.
    #[arg(long, env = "DATA_KEYS", hide_env_values = true, value_parser = secret_value)]
    pub(crate) data_keys: Option<Secret>,

    /// Read the key-encryption keys from FILE instead (one per line or comma-separated; `#`
    /// comments), so that they do not show in `ps` or the environment.
    #[arg(
        long,
        env = "DATA_KEYS_FILE",
        value_name = "FILE",
        conflicts_with = "data_keys"
    )]
    pub(crate) data_keys_file: Option<PathBuf>,

    /// Store new events unencrypted when no key is given (benchmarks and experiments: such
    /// events cannot be erased).
    #[arg(long, env = "ALLOW_PLAINTEXT_LOG")]
    pub(crate) allow_plaintext_log: bool,
}

impl KeyArgs {
    pub(crate) fn vault(&self) -> anyhow::Result<store::keys::Vault> {
        account_projector::data_keys::vault(
            self.data_keys.as_ref().map(Secret::expose),
            self.data_keys_file.as_deref(),
            self.allow_plaintext_log,
        )
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct EraseArgs {
    /// The account to erase.
    #[arg(
        long,
        value_name = "ID",
        required_unless_present = "user",
        conflicts_with = "user"
    )]
    pub(crate) account: Option<Uuid>,

    /// Erase every account of this user.
    #[arg(long, value_name = "ID")]
    pub(crate) user: Option<Uuid>,

    /// Why (recorded in the log in plaintext: a ticket or request number, never personal data).
    #[arg(long)]
    pub(crate) reason: String,

    /// Who asks (recorded with the reason); by default the login name.
    #[arg(long, env = "USER", hide_env_values = true, default_value = "unknown")]
    pub(crate) by: String,

    #[command(flatten)]
    pub(crate) keys: KeyArgs,
}

#[derive(clap::Args, Debug)]
pub(crate) struct KeysArgs {
    #[command(subcommand)]
    pub(crate) action: KeysAction,

    #[command(flatten)]
    pub(crate) keys: KeyArgs,
}

#[derive(Subcommand, Debug)]
pub(crate) enum KeysAction {
    /// Re-wrap every live account key under the newest key-encryption key (the first of
    /// DATA_KEYS), so that the older keys can be dropped. Resumable; run as the schema's owner.
    Rotate,
    /// Seal the event bodies (and their derived copies) written before encryption at rest: the
    /// one sanctioned change to the log's rows. Resumable; recorded; run as the schema's owner.
    Seal,
}

#[derive(clap::Args, Debug)]
pub(crate) struct SubscribersArgs {
    #[command(subcommand)]
    pub(crate) action: SubscribersAction,
}

#[derive(Subcommand, Debug)]
pub(crate) enum SubscribersAction {
    /// Register a receiver and print its id and signing secret (`whsec_...`).
    Add {
        /// Where to POST each change: https, or http to a loopback address.
        #[arg(long)]
        url: String,

        /// Start after this feed cursor (0, the default: every account's current view first).
        #[arg(long, value_name = "CURSOR", default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
        from: i64,
    },
    /// Every subscriber: its state, delivered cursor, lag, pending messages and last error.
    List {
        /// Print each subscriber's signing secret instead of `hidden`.
        #[arg(long)]
        show_secrets: bool,
    },
    /// Remove subscriber ID and its pending messages.
    Remove { id: Uuid },
    /// Deliver again every change after CURSOR to subscriber ID.
    Replay {
        id: Uuid,
        #[arg(long, value_name = "CURSOR", value_parser = clap::value_parser!(i64).range(0..))]
        from: i64,
    },
}

/// Argyle's management API and its key (from the Argyle console: Developers > API keys).
#[derive(clap::Args, Debug)]
pub(crate) struct ArgyleArgs {
    /// Argyle's API base URL: the sandbox by default, https://api.argyle.com/v2 for production.
    #[arg(long, env = "ARGYLE_API_URL", default_value = argyle::SANDBOX_URL)]
    pub(crate) argyle_api_url: String,

    /// API key id (the HTTP Basic user name).
    #[arg(long, env = "ARGYLE_API_KEY_ID", hide_env_values = true)]
    pub(crate) argyle_api_key_id: Option<String>,

    /// API key secret (the HTTP Basic password).
    #[arg(long, env = "ARGYLE_API_KEY_SECRET", hide_env_values = true, value_parser = secret_value)]
    pub(crate) argyle_api_key_secret: Option<Secret>,
}

impl ArgyleArgs {
    /// The API settings, if a key is configured; a half-configured key is an error.
    pub(crate) fn api(&self) -> anyhow::Result<Option<ArgyleApi>> {
        let non_empty = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_owned);
        match (
            non_empty(self.argyle_api_key_id.as_deref()),
            non_empty(self.argyle_api_key_secret.as_ref().map(Secret::expose)),
        ) {
            (Some(key_id), Some(key_secret)) => Ok(Some(ArgyleApi {
                url: self.argyle_api_url.clone(),
                key_id,
                key_secret,
            })),
            (None, None) => Ok(None),
            _ => anyhow::bail!("set both ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET, or neither"),
        }
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct WebhooksArgs {
    #[command(subcommand)]
    pub(crate) action: WebhooksAction,

    #[command(flatten)]
    pub(crate) argyle: ArgyleArgs,
}

#[derive(Subcommand, Debug)]
pub(crate) enum WebhooksAction {
    /// Subscribe URL to Argyle's account webhooks; does nothing if an identical subscription (same
    /// name, url and events) exists.
    ///
    /// With the resource included (the default), `accounts.removed`, which Argyle cannot send a
    /// resource with, goes into a second subscription named `<name>-no-resource`. Both sign with
    /// one secret, printed as the ARGYLE_WEBHOOK_SECRETS line to give ingest.
    Create {
        /// The public URL of this service's webhook route, e.g. https://example.com/webhooks/argyle.
        #[arg(long)]
        url: String,

        /// Subscription name (Argyle sends it in every webhook's `name`).
        #[arg(long, default_value = "account-projector")]
        name: String,

        /// Comma-separated events.
        #[arg(long, value_delimiter = ',', default_values_t = argyle::ACCOUNT_EVENTS.map(String::from))]
        events: Vec<String>,

        /// Subscribe without `config.include_resource`: webhooks carry ids only (the enricher
        /// can fetch the accounts).
        #[arg(long)]
        no_include_resource: bool,

        /// Signing secret; by default a random 256-bit one (or the secret of an existing half of
        /// the pair). No commas or whitespace: it goes into the comma-separated
        /// ARGYLE_WEBHOOK_SECRETS.
        #[arg(long, value_parser = webhook_secret, conflicts_with = "secret_file")]
        secret: Option<Secret>,

        /// Read the signing secret from FILE (`-`: standard input) instead, so that it does
        /// not show in `ps`.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
    },
    /// List the subscriptions of this API key, every page.
    List {
        /// Print each subscription's signing secret instead of `hidden`.
        #[arg(long)]
        show_secrets: bool,
    },
    /// Delete the subscription ID.
    Delete {
        /// The subscription's id, as `webhooks list` shows it.
        id: String,
    },
}

#[derive(clap::Args, Debug)]
pub(crate) struct ReconcileArgs {
    /// Compare and print the summary; append nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,

    /// Only this account (GET /v2/accounts/{id}).
    #[arg(long, value_name = "ID", conflicts_with = "user")]
    pub(crate) account: Option<Uuid>,

    /// Only this user's accounts (GET /v2/accounts?user=ID).
    #[arg(long, value_name = "ID")]
    pub(crate) user: Option<Uuid>,

    /// For each account held as active that Argyle does not list, fetch it alone and, if Argyle
    /// answers 404, record its removal (`argyle.account_removed`, folded like accounts.removed).
    #[arg(long)]
    pub(crate) confirm_removals: bool,

    /// Go past the guards against another environment's key or URL: confirm removals even when
    /// more than --max-missing-share of the accounts are missing, and list an ARGYLE_API_URL
    /// other than the last full reconcile's.
    #[arg(long)]
    pub(crate) force: bool,

    /// Removals are refused when a larger share (0 to 1) of the accounts held as active is
    /// missing at Argyle, unless --force.
    #[arg(long, env = "RECONCILE_MAX_MISSING_SHARE", default_value_t = defaults().enricher.reconcile.max_missing_share, value_parser = share)]
    pub(crate) max_missing_share: f64,

    /// Most requests per second to Argyle.
    #[arg(long, env = "RECONCILE_RATE", default_value_t = defaults().enricher.reconcile.rate, value_parser = positive_rate)]
    pub(crate) rate: f64,

    #[command(flatten)]
    pub(crate) argyle: ArgyleArgs,

    #[command(flatten)]
    pub(crate) keys: KeyArgs,
}

fn max_wait(raw: &str) -> Result<humantime::Duration, String> {
    let wait: humantime::Duration = raw.parse().map_err(|e| format!("{e}"))?;
    if *wait > std::time::Duration::from_secs(60) {
        return Err("at most 60s".into());
    }
    Ok(wait)
}

fn session_ttl(raw: &str) -> Result<humantime::Duration, String> {
    let ttl: humantime::Duration = raw.parse().map_err(|e| format!("{e}"))?;
    if *ttl < std::time::Duration::from_secs(60) || *ttl > std::time::Duration::from_secs(7 * 86400)
    {
        return Err("expected from 1m to 7days".into());
    }
    Ok(ttl)
}

fn heartbeat(raw: &str) -> Result<humantime::Duration, String> {
    let every: humantime::Duration = raw.parse().map_err(|e| format!("{e}"))?;
    if every.is_zero() || *every > std::time::Duration::from_secs(15) {
        return Err("expected more than 0s and at most 15s".into());
    }
    Ok(every)
}

pub(crate) fn share(raw: &str) -> Result<f64, String> {
    raw.parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| "expected a share between 0 and 1, e.g. 0.1".into())
}

/// `off` or a duration such as `6h`.
pub(crate) fn interval(raw: &str) -> Result<Interval, String> {
    if raw.trim().eq_ignore_ascii_case("off") {
        return Ok(Interval(None));
    }
    let every: std::time::Duration = raw
        .trim()
        .parse::<humantime::Duration>()
        .map_err(|e| format!("{e}; expected `off` or a duration such as 6h or 30m"))?
        .into();
    if every < std::time::Duration::from_secs(60) {
        return Err("expected `off` or at least 1m".into());
    }
    Ok(Interval(Some(every)))
}

/// A schedule's interval: `None` is off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Interval(pub(crate) Option<std::time::Duration>);

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("off"),
            Some(every) => write!(f, "{}", humantime::format_duration(every)),
        }
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct RebuildArgs {
    /// Compare instead of rebuilding; write nothing; exit 1 if any snapshot differs.
    #[arg(long)]
    pub(crate) verify: bool,

    /// Only this account.
    #[arg(long, value_name = "ID", conflicts_with = "partition")]
    pub(crate) account: Option<Uuid>,

    /// Only the accounts of this partition of the projection (0 to PROJECTOR_PARTITIONS - 1, as
    /// the projection is laid out now; `status` lists them). Without it: every partition.
    #[arg(long, value_name = "I")]
    pub(crate) partition: Option<u16>,

    #[command(flatten)]
    pub(crate) keys: KeyArgs,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ExportArgs {
    /// Only events of this account.
    #[arg(long, value_name = "ID")]
    pub(crate) account: Option<Uuid>,

    /// Only events of this user.
    #[arg(long, value_name = "ID")]
    pub(crate) user: Option<Uuid>,

    /// Only events received at or after this RFC 3339 instant.
    #[arg(long, value_name = "T", value_parser = parse_instant)]
    pub(crate) since: Option<DateTime<Utc>>,

    /// Only events received before this RFC 3339 instant (exclusive, so consecutive ranges tile).
    #[arg(long, value_name = "T", value_parser = parse_instant)]
    pub(crate) until: Option<DateTime<Utc>>,

    /// Secrets to re-check signatures with; without any, `signature_valid` is null.
    #[command(flatten)]
    pub(crate) secrets: SecretArgs,

    #[command(flatten)]
    pub(crate) keys: KeyArgs,
}

/// The webhook secrets, shared by `serve` and `export`.
#[derive(clap::Args, Debug)]
pub(crate) struct SecretArgs {
    /// Comma-separated webhook secrets; a delivery signed with any of them is accepted (rotation).
    #[arg(
        long,
        env = "ARGYLE_WEBHOOK_SECRETS",
        value_delimiter = ',',
        value_parser = list_entry,
        hide_env_values = true,
        conflicts_with = "webhook_secrets_file"
    )]
    pub(crate) webhook_secrets: Vec<Secret>,

    /// Read the webhook secrets from FILE instead (`-`: standard input), separated by commas or
    /// line breaks, so that they do not show in `ps` or the environment.
    #[arg(long, env = "ARGYLE_WEBHOOK_SECRETS_FILE", value_name = "FILE")]
    pub(crate) webhook_secrets_file: Option<PathBuf>,
}

impl SecretArgs {
    /// The secrets, from the flag, the variable or the file.
    pub(crate) fn secrets(&self) -> anyhow::Result<Vec<String>> {
        let secrets = match &self.webhook_secrets_file {
            Some(path) => secret::read_list(path)?,
            None => self.webhook_secrets.clone(),
        };
        let exposed: Vec<String> = secrets.iter().map(|s| s.expose().to_owned()).collect();
        secret::refuse_empty_entries("ARGYLE_WEBHOOK_SECRETS", &exposed)?;
        Ok(exposed)
    }
}

pub(crate) fn webhook_secret(raw: &str) -> Result<Secret, String> {
    if raw.is_empty() || raw.contains(',') || raw.chars().any(char::is_whitespace) {
        Err("a webhook secret must be non-empty, without commas or whitespace".into())
    } else {
        Ok(Secret::new(raw))
    }
}

pub(crate) fn secret_value(raw: &str) -> Result<Secret, String> {
    Ok(Secret::new(raw))
}

/// One entry of a comma-separated list of secrets or tokens, surrounding whitespace trimmed (so
/// `old, new` means `new`, not ` new`). An empty entry (`,` is no token at all) is refused where
/// the list is used, in one sentence.
pub(crate) fn list_entry(raw: &str) -> Result<Secret, String> {
    Ok(Secret::new(raw.trim()))
}

pub(crate) fn positive_rate(raw: &str) -> Result<f64, String> {
    raw.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0)
        .ok_or_else(|| "expected a positive number of requests per second, e.g. 5 or 0.5".into())
}

pub(crate) fn parse_instant(raw: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e}; expected RFC 3339, e.g. 2026-03-03T10:00:00Z"))
}

#[derive(clap::Args, Debug)]
pub(crate) struct ServeArgs {
    /// Which roles this process runs.
    #[arg(long, env = "ROLE", value_enum, default_value_t = defaults().role)]
    pub(crate) role: Role,

    /// Address of the HTTP listener.
    #[arg(long, env = "LISTEN_ADDR", default_value_t = defaults().listen_addr)]
    pub(crate) listen_addr: String,

    /// Do not apply pending migrations at start.
    #[arg(long, env = "NO_MIGRATE")]
    pub(crate) no_migrate: bool,

    #[command(flatten)]
    pub(crate) secrets: SecretArgs,

    /// Accept unsigned webhooks when no secret is configured (otherwise ingest refuses to start).
    #[arg(long, env = "ALLOW_UNSIGNED_WEBHOOKS")]
    pub(crate) allow_unsigned_webhooks: bool,

    /// Comma-separated bearer tokens for /v1, each at least 16 characters. Required by the roles
    /// that serve /v1 (all, api) unless --allow-open-api.
    #[arg(
        long,
        env = "API_TOKENS",
        value_delimiter = ',',
        value_parser = list_entry,
        hide_env_values = true
    )]
    pub(crate) api_tokens: Vec<Secret>,

    /// A streaming replica for the query API, the feed and the pages (libpq TLS parameters as in
    /// DATABASE_URL); writes, sessions included, still go to DATABASE_URL. Prefer the environment
    /// variable: a flag shows in `ps`.
    #[arg(
        long,
        env = "READ_DATABASE_URL",
        hide_env_values = true,
        value_parser = |raw: &str| Ok::<_, String>(DatabaseUrl(raw.to_owned()))
    )]
    pub(crate) read_database_url: Option<DatabaseUrl>,

    /// Serve /v1 with no token (local experiments only; a warning is logged).
    #[arg(long, env = "ALLOW_OPEN_API")]
    pub(crate) allow_open_api: bool,

    /// An identical body redelivered within this window is the same event (e.g. 24h, 90m, 0s).
    #[arg(long, env = "DEDUP_WINDOW", default_value_t = defaults().dedup_window.into())]
    pub(crate) dedup_window: humantime::Duration,

    /// Most deliveries one commit may carry: concurrent requests share a transaction (group commit).
    /// 1 commits each delivery alone.
    #[arg(long, env = "MAX_COMMIT_BATCH", default_value_t = defaults().max_commit_batch as u16, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) max_commit_batch: u16,

    /// Group commits in flight at once, each on a connection of its own (appends overlap). Raise it
    /// when the database's commit latency (a network away), not its CPU, bounds ingest.
    #[arg(long, env = "COMMIT_LANES", default_value_t = defaults().commit_lanes as u8, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub(crate) commit_lanes: u8,

    /// Larger webhook bodies are refused with 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = defaults().max_body_bytes)]
    pub(crate) max_body_bytes: usize,

    /// Longest time one HTTP request may take, slow clients included.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value_t = defaults().request_timeout.into())]
    pub(crate) request_timeout: humantime::Duration,

    /// Longest wait for the database within one request before answering 503 with Retry-After.
    #[arg(long, env = "DATABASE_TIMEOUT", default_value_t = defaults().database_timeout.into())]
    pub(crate) database_timeout: humantime::Duration,

    /// Longest time a client may take to send a request's headers.
    #[arg(long, env = "HEADER_TIMEOUT", default_value_t = defaults().header_timeout.into())]
    pub(crate) header_timeout: humantime::Duration,

    /// On SIGTERM, how long to wait for requests in flight before closing their connections.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value_t = defaults().shutdown_grace.into())]
    pub(crate) shutdown_grace: humantime::Duration,

    /// Events the projector folds per transaction.
    #[arg(long, env = "PROJECTOR_BATCH_SIZE", default_value_t = defaults().projector.batch_size, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub(crate) batch_size: i64,

    /// The projector catches up at least this often, even without a notification.
    #[arg(long, env = "PROJECTOR_POLL_INTERVAL", default_value_t = defaults().projector.poll_interval.into())]
    pub(crate) poll_interval: humantime::Duration,

    #[command(flatten)]
    pub(crate) argyle: ArgyleArgs,

    /// The enricher fetches an account at most once per this window, however many resource-less
    /// webhooks arrive for it.
    #[arg(long, env = "ENRICH_WINDOW", default_value_t = defaults().enricher.window.into())]
    pub(crate) enrich_window: humantime::Duration,

    /// Most account fetches per second the enricher makes.
    #[arg(long, env = "ENRICH_RATE", default_value_t = defaults().enricher.rate, value_parser = positive_rate)]
    pub(crate) enrich_rate: f64,

    /// The enricher role reconciles with Argyle this often (e.g. 6h), as `reconcile` does, never
    /// confirming removals; `off` by default.
    #[arg(long, env = "RECONCILE_INTERVAL", default_value_t = Interval(defaults().enricher.reconcile_interval), value_parser = interval)]
    pub(crate) reconcile_interval: Interval,

    /// Most requests per second a scheduled reconcile makes to Argyle.
    #[arg(long, env = "RECONCILE_RATE", default_value_t = defaults().enricher.reconcile.rate, value_parser = positive_rate)]
    pub(crate) reconcile_rate: f64,

    /// The longest `?wait=` of the change feed and of read-your-writes lookups the api role
    /// honours (at most 60s).
    #[arg(long, env = "FEED_MAX_WAIT", default_value_t = defaults().feed.max_wait.into(), value_parser = max_wait)]
    pub(crate) feed_max_wait: humantime::Duration,

    /// A session of the pages under `/ui/` ends this long after sign-in (1m to 7days).
    #[arg(long, env = "UI_SESSION_TTL", default_value_t = defaults().ui.session_ttl.into(), value_parser = session_ttl)]
    pub(crate) ui_session_ttl: humantime::Duration,

    /// An idle feed stream (`/v1/feed/stream`) gets a comment line this often (at most 15s).
    #[arg(long, env = "FEED_HEARTBEAT", default_value_t = defaults().feed.heartbeat.into(), value_parser = heartbeat)]
    pub(crate) feed_heartbeat: humantime::Duration,

    /// A feed stream whose reader takes longer than this to accept the next event is ended (it
    /// resumes with Last-Event-ID).
    #[arg(long, env = "FEED_SEND_TIMEOUT", default_value_t = defaults().feed.send_timeout.into())]
    pub(crate) feed_send_timeout: humantime::Duration,

    /// The notifier's delays before each retry of a failed delivery, comma-separated; past the
    /// last, the subscriber is marked failing and retried at the last delay.
    #[arg(long, env = "NOTIFIER_RETRY_SCHEDULE", value_delimiter = ',', default_values_t = defaults().notifier.schedule.iter().map(|d| humantime::Duration::from(*d)).collect::<Vec<_>>())]
    pub(crate) notifier_retry_schedule: Vec<humantime::Duration>,

    /// Outbound deliveries in flight at once.
    #[arg(long, env = "NOTIFIER_CONCURRENCY", default_value_t = defaults().notifier.concurrency, value_parser = clap::value_parser!(usize))]
    pub(crate) notifier_concurrency: usize,

    /// Largest number of database connections of this process.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = defaults().db.max_connections)]
    pub(crate) max_connections: u32,

    /// The projector's leader erases an account this long after its `accounts.removed` (e.g.
    /// 30d); `off` by default.
    #[arg(long, env = "ERASE_REMOVED_AFTER", default_value_t = Interval(defaults().projector.erase_removed_after), value_parser = interval)]
    pub(crate) erase_removed_after: Interval,

    /// Hash partitions of the projection (1 to 64), each with its own checkpoint and leader;
    /// several projector processes share them. Every projector of a database must use the same
    /// number: one with another waits until the others stop, then lays the projection out again
    /// (docs/scaling.md).
    #[arg(long, env = "PROJECTOR_PARTITIONS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=i64::from(store::partitions::MAX_PARTITIONS)))]
    pub(crate) projector_partitions: u16,

    #[command(flatten)]
    pub(crate) keys: KeyArgs,
}

impl ServeArgs {
    /// The service's settings: these arguments over the defaults of [`Settings::new`].
    pub(crate) fn into_settings(self, database_url: String) -> anyhow::Result<Settings> {
        let mut settings = Settings::new(database_url);
        settings.role = self.role;
        settings.listen_addr = self.listen_addr;
        settings.migrate = !self.no_migrate;
        settings.webhook_secrets = self.secrets.secrets()?;
        settings.allow_unsigned_webhooks = self.allow_unsigned_webhooks;
        settings.api_tokens = self
            .api_tokens
            .iter()
            .map(|t| t.expose().to_owned())
            .collect();
        settings.allow_open_api = self.allow_open_api;
        settings.dedup_window = self.dedup_window.into();
        settings.max_body_bytes = self.max_body_bytes;
        settings.max_commit_batch = usize::from(self.max_commit_batch);
        settings.commit_lanes = usize::from(self.commit_lanes);
        settings.read_database_url = self.read_database_url.map(|url| url.0);
        settings.request_timeout = self.request_timeout.into();
        settings.database_timeout = self.database_timeout.into();
        settings.header_timeout = self.header_timeout.into();
        settings.shutdown_grace = self.shutdown_grace.into();
        settings.projector.batch_size = self.batch_size;
        settings.projector.poll_interval = self.poll_interval.into();
        settings.projector.partitions = self.projector_partitions;
        settings.argyle = self.argyle.api()?;
        settings.enricher.window = self.enrich_window.into();
        settings.enricher.rate = self.enrich_rate;
        settings.enricher.reconcile_interval = self.reconcile_interval.0;
        settings.enricher.reconcile.rate = self.reconcile_rate;
        settings.db.max_connections = self.max_connections;
        settings.feed.max_wait = self.feed_max_wait.into();
        settings.ui.session_ttl = self.ui_session_ttl.into();
        if self.notifier_retry_schedule.is_empty() {
            anyhow::bail!("NOTIFIER_RETRY_SCHEDULE needs at least one delay");
        }
        settings.notifier.schedule = self
            .notifier_retry_schedule
            .iter()
            .map(|d| (*d).into())
            .collect();
        settings.notifier.concurrency = self.notifier_concurrency.max(1);
        settings.feed.heartbeat = self.feed_heartbeat.into();
        settings.feed.send_timeout = self.feed_send_timeout.into();
        settings.projector.erase_removed_after = self.erase_removed_after.0;
        settings.vault = self.keys.vault()?;
        settings.allow_plaintext_log = self.keys.allow_plaintext_log;
        Ok(settings)
    }
}

/// The defaults of every `serve` option: [`Settings::new`]'s, the one place they are written.
pub(crate) fn defaults() -> Settings {
    Settings::new(String::new())
}
