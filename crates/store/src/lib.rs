//! Everything account-projector says to Postgres. No other crate writes SQL.
//!
//! # Layout
//! - [`migrate`]: creates the database if missing and applies the refinery migrations in `migrations/`.
//! - [`log`]: the append-only event log: [`log::append`], [`log::read_after`], dedup of redeliveries.
//! - [`snapshots`]: loading and saving account snapshots (live and the rebuild's shadow).
//! - [`checkpoints`]: how far each reader of the log has got, moved with compare-and-set;
//!   [`partitions`]: the projection's hash partitions, each with its own checkpoint and leader.
//! - [`locks`]: every advisory lock by name; [`leader`]: [`leader::run_as_leader`], the standby
//!   loop of every single-writer role.
//! - [`quarantine`]: events the fold or the store refused; [`enrichment`]: the enricher's queue.
//! - [`keys`]: account keys and the [`keys::Vault`] that seals every copy of personal data at
//!   rest; [`erasure`]: destroying an account's key, and sealing a log written before encryption.
//! - [`sessions`]: sessions of the web pages, stored as digests only.
//! - [`kept`]: connections kept between short requests, without the pool's ping on every return.
//! - [`begin`], [`begin_consistent_read`], [`begin_shared_read`]: transactions by name, so no
//!   other crate needs sqlx.
//!
//! # Why a reader of `position > checkpoint` never skips an event
//! Appends overlap (migrations/V18): each takes its positions from a sequence while it holds one
//! advisory lock ([`locks::APPEND_LOCK`]) for microseconds, and under the same lock takes a
//! transaction-level *marker* lock on its first position, which lasts until it commits or aborts.
//! Postgres makes a transaction's commit visible to new snapshots (ProcArrayEndTransaction)
//! *before* it releases the transaction's locks, so once a marker is gone, its events are visible
//! or will never be. [`log::horizon`] is the position below the lowest marker still held (read
//! with the lock taken shared, so no append is half-seen between the sequence and its marker), or
//! the last position taken when none is: every position up to it is settled. A reader reads the
//! horizon first, then (under READ COMMITTED, in a later statement) `position > checkpoint AND
//! position <= horizon`, and so never misses an event that commits late at a lower position: it
//! has not read past it. The projector, the enricher, rebuild and the log's pages in the API read
//! this way.
//!
//! Positions stay accounted for: an append that takes a position and then rolls back (or loses
//! its connection, or the server crashes) leaves a hole, and [`log::settle`] records every such
//! hole up to the horizon in `abandoned_positions`. Every position up to `log_settled` is then an
//! event or an abandoned position, exactly once ([`log::settled`]; `status` prints it): that is
//! the auditor's proof that nothing is missing, instead of the dense 1, 2, 3 of a log appended
//! one transaction at a time.
//!
//! Dedup stays race-free: each append takes a transaction-level lock per body sha256 (in sorted
//! order, so two batches cannot deadlock) before it looks for an identical body, so a redelivery
//! racing its original waits for the original to commit and then finds it. Readers take no lock
//! but the horizon's brief shared one.

#![forbid(unsafe_code)]

pub mod checkpoints;
pub mod enrichment;
pub mod erasure;
pub mod kept;
pub mod keys;
pub mod leader;
pub mod locks;
pub mod log;
pub mod migrate;
pub mod partitions;
pub mod quarantine;
pub mod reconcile;
pub mod sessions;
pub mod snapshots;
pub mod subscribers;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPoolOptions, PgSslMode};

pub use sqlx::pool::PoolConnection;
pub use sqlx::postgres::PgConnectOptions;
pub use sqlx::{PgConnection, PgPool, Postgres, Transaction};

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Postgres cannot be reached or did not answer in time: retrying later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Postgres answered with an error that retrying will not fix.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The TLS handshake with the database failed: the server's certificate was refused under
    /// `sslmode=verify-ca`/`verify-full`, a root certificate could not be read, or the server
    /// offers no TLS under `require`. Retrying does not help until the configuration changes.
    #[error(
        "could not connect to the database over TLS ({0}); check sslmode and sslrootcert in DATABASE_URL"
    )]
    Tls(#[source] sqlx::Error),
    /// The database URL cannot be used.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// Creating the database or applying migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// Migrations are pending and the connected role cannot apply them (it does not own the
    /// schema): the least-privilege service role, for one.
    #[error(
        "the database schema is at V{applied} and this build needs V{latest}, but role {role} cannot apply migrations; run `account-projector migrate` as the schema's owner (deploy/roles.sql)"
    )]
    CannotMigrate {
        role: String,
        applied: i64,
        latest: i64,
    },
    /// The keys that open this database's data are not configured: DATA_KEYS lacks a key-encryption
    /// key, or none is configured at all. Retrying does not help until the configuration changes.
    #[error("encryption keys: {0}")]
    Keys(String),
    /// A stored account key fails authentication (altered in the table).
    #[error("{0}")]
    KeyTampered(String),
    /// The checkpoint was not where this projector left it: another writer moved it.
    #[error("the checkpoint {name} moved from {expected}: another projector is writing")]
    Fenced { name: String, expected: i64 },
    /// The projection is laid out in `stored` partitions, not the `wanted` of this projector
    /// (another projector, configured with another `PROJECTOR_PARTITIONS`, laid it out again).
    #[error(
        "the projection is laid out in {stored} partition(s), not the {wanted} of this projector's PROJECTOR_PARTITIONS"
    )]
    Layout { stored: u16, wanted: u16 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        if is_tls_failure(&error) {
            Self::Tls(error)
        } else if is_transient(&error) {
            Self::Unavailable(error)
        } else {
            Self::Database(error)
        }
    }
}

impl Error {
    /// True when the database could not be reached (TLS included) or timed out.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Tls(_))
    }

    /// True when the database refused what a statement carried rather than failed to run it: a
    /// value it cannot hold (SQLSTATE class 22), a constraint (23), a program limit (54), an error a
    /// trigger raised (P0001), a value that could not be encoded, or a statement that ran past the
    /// statement timeout (57014). Sending the same statement again fails the same way; a statement
    /// carrying less may not. Connection loss, shutdown, serialization failures and deadlocks are
    /// not refusals: they are retried as they are.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::Encode(_)) => true,
            Self::Database(sqlx::Error::Database(db)) => db.code().is_some_and(|code| {
                code.starts_with("22")
                    || code.starts_with("23")
                    || code.starts_with("54")
                    || code == "P0001"
            }),
            Self::Unavailable(sqlx::Error::Database(db)) => db.code().as_deref() == Some("57014"),
            _ => false,
        }
    }

    /// What the database said, for a log line or a quarantine record: its message and SQLSTATE.
    pub fn reason(&self) -> String {
        match self {
            Self::Database(sqlx::Error::Database(db))
            | Self::Unavailable(sqlx::Error::Database(db)) => match db.code() {
                Some(code) => format!("{} (SQLSTATE {code})", db.message()),
                None => db.message().to_owned(),
            },
            other => other.to_string(),
        }
    }
}

/// A failed TLS handshake: sqlx's own TLS errors (no TLS offered, an unreadable root
/// certificate), and the certificate errors rustls reports through the socket.
fn is_tls_failure(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Io(io) => io
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()),
        _ => false,
    }
}

fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // connection exceptions, insufficient resources, query canceled (statement timeout),
            // operator intervention (shutdown, cannot connect now), serialization failure, deadlock
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}

/// How to connect: pool size and the timeouts that keep a dead database from hanging callers.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub max_connections: u32,
    /// Waiting longer than this for a pooled connection is `Unavailable`.
    pub acquire_timeout: Duration,
    /// Postgres cancels any statement running longer than this (also bounds lock waits).
    pub statement_timeout: Duration,
    /// Shown in `pg_stat_activity`, so an operator can tell the roles apart; an `application_name`
    /// in the database URL takes precedence.
    pub application_name: String,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
            application_name: "account-projector".into(),
        }
    }
}

/// A pooled connection idle longer than this is pinged before it is handed out.
pub(crate) const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// Whether a connection idle for `idle` may be used: yes if it was used within
/// [`IDLE_BEFORE_PING`], else if it answers a ping (a restarted server may have dropped it).
pub(crate) async fn usable_after(conn: &mut PgConnection, idle: Duration) -> bool {
    idle <= IDLE_BEFORE_PING || sqlx::Connection::ping(conn).await.is_ok()
}

/// A connection from the pool (back to it when dropped).
pub async fn acquire(pool: &PgPool) -> Result<PoolConnection<Postgres>> {
    Ok(pool.acquire().await?)
}

/// Closes a connection cleanly (a `Terminate` message rather than a dropped socket).
pub async fn close(conn: PgConnection) -> Result<()> {
    use sqlx::Connection;
    Ok(conn.close().await?)
}

/// One connection of its own, outside any pool.
pub async fn connect(options: &PgConnectOptions) -> Result<PgConnection> {
    use sqlx::Connection;
    Ok(PgConnection::connect_with(options).await?)
}

/// Parses a database URL into connect options, with libpq's TLS parameters: `sslmode`
/// (`disable`, `allow` (taken as `prefer`), `prefer` (the default), `require`, `verify-ca`,
/// `verify-full`) and `sslrootcert`, also from `PGSSLMODE` and `PGSSLROOTCERT`.
///
/// As in libpq, `require` with a root certificate given verifies the server's certificate against
/// it (like `verify-ca`): naming a root certificate is asking for it to be checked.
pub fn connect_options(database_url: &str) -> Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(database_url)
        // sqlx's message quotes no part of the URL, so no password reaches a log.
        .map_err(|e| Error::InvalidUrl(e.to_string()))?;
    // libpq's `allow` tries without TLS, then with it if the server insists; sqlx would only
    // ever try without. `prefer` reaches every server `allow` does.
    let options = match options.get_ssl_mode() {
        PgSslMode::Allow => options.ssl_mode(PgSslMode::Prefer),
        _ => options,
    };
    let Some(root_cert) = root_cert(database_url) else {
        return Ok(options);
    };
    // Said at once, rather than as a bare "No such file or directory" at the first connection.
    if !matches!(options.get_ssl_mode(), PgSslMode::Disable)
        && let Err(e) = std::fs::File::open(&root_cert)
    {
        return Err(Error::InvalidUrl(format!(
            "sslrootcert {root_cert} cannot be read: {e}"
        )));
    }
    Ok(match options.get_ssl_mode() {
        PgSslMode::Require => options.ssl_mode(PgSslMode::VerifyCa),
        _ => options,
    })
}

/// The URL with its password (in the authority or as a `password` parameter) replaced by `***`,
/// for logs and `Debug`; a URL that does not parse is shown as `<unparseable URL>`, since it
/// could hold a password anywhere.
pub fn redacted_url(database_url: &str) -> String {
    let Ok(mut url) = url::Url::parse(database_url) else {
        return "<unparseable URL>".into();
    };
    if url.password().is_some() && url.set_password(Some("***")).is_err() {
        return "<unparseable URL>".into();
    }
    if url.query_pairs().any(|(key, _)| key == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if key == "password" {
                    "***".into()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// The root certificate file the URL (or else `PGSSLROOTCERT`) names, if any.
fn root_cert(database_url: &str) -> Option<String> {
    let in_url = url::Url::parse(database_url).ok().and_then(|url| {
        url.query_pairs()
            .find(|(key, _)| matches!(&**key, "sslrootcert" | "ssl-root-cert" | "ssl-ca"))
            .map(|(_, value)| value.into_owned())
    });
    in_url
        .or_else(|| std::env::var("PGSSLROOTCERT").ok())
        .filter(|path| !path.is_empty())
}

/// A pool that connects on first use, so a server can start (and report not ready) while Postgres
/// is down.
pub fn pool(database_url: &str, options: &DbOptions) -> Result<PgPool> {
    let mut connect = connect_options(database_url)?;
    if connect.get_application_name().is_none() {
        connect = connect.application_name(&options.application_name);
    }
    let connect = connect.options([(
        "statement_timeout",
        format!("{}", options.statement_timeout.as_millis()),
    )]);
    Ok(PgPoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        // A connection in steady use is not pinged before each use (a round trip per query):
        // only one idle for a while, which is when a restarted server may have dropped it.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move { Ok(usable_after(conn, meta.idle_for).await) })
        })
        .connect_lazy_with(connect))
}

/// Fails unless the database answers on `conn` and every embedded migration is applied.
pub async fn check_ready_on(conn: &mut PgConnection) -> Result<(), NotReady> {
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version)::bigint FROM refinery_schema_history")
            .fetch_one(conn)
            .await
            .map_err(|e| match Error::from(e) {
                Error::Unavailable(_) => NotReady::Unavailable,
                _ => NotReady::MigrationsPending,
            })?;
    if applied.unwrap_or(0) < migrate::latest_version() {
        return Err(NotReady::MigrationsPending);
    }
    Ok(())
}

/// Why the service is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("the database is unreachable")]
    Unavailable,
    #[error("database migrations are pending")]
    MigrationsPending,
}

/// Starts a read-write transaction on `conn`.
pub async fn begin(conn: &mut PgConnection) -> Result<Transaction<'_, Postgres>> {
    use sqlx::Connection;
    Ok(conn.begin().await?)
}

/// Commits a transaction begun by [`begin`] (or a read one).
pub async fn commit(tx: Transaction<'_, Postgres>) -> Result<()> {
    Ok(tx.commit().await?)
}

/// Sets this session's statement timeout (`Duration::ZERO`: none), e.g. on a session taken from
/// a pool of request-sized timeouts for long work.
pub async fn set_statement_timeout(conn: &mut PgConnection, timeout: Duration) -> Result<()> {
    sqlx::query("SELECT set_config('statement_timeout', $1, false)")
        .bind(timeout.as_millis().to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// Rolls a transaction back.
pub async fn rollback(tx: Transaction<'_, Postgres>) -> Result<()> {
    Ok(tx.rollback().await?)
}

/// Starts a read-only transaction that sees one consistent snapshot of the database throughout.
pub async fn begin_consistent_read(conn: &mut PgConnection) -> Result<Transaction<'_, Postgres>> {
    use sqlx::Connection;
    Ok(conn
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?)
}

/// Exports the snapshot of a [`begin_consistent_read`] transaction so another session can share it.
pub async fn export_snapshot(tx: &mut PgConnection) -> Result<String> {
    Ok(sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(tx)
        .await?)
}

/// Starts a read-only transaction that sees exactly the snapshot exported by [`export_snapshot`].
pub async fn begin_shared_read<'c>(
    conn: &'c mut PgConnection,
    snapshot: &str,
) -> Result<Transaction<'c, Postgres>> {
    if snapshot.is_empty() || !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(Error::Database(sqlx::Error::Protocol(format!(
            "unexpected snapshot id {snapshot:?}"
        ))));
    }
    let mut tx = begin_consistent_read(conn).await?;
    // SET TRANSACTION takes no parameters; the id was checked to be hex digits and dashes above.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET TRANSACTION SNAPSHOT '{snapshot}'"
    )))
    .execute(&mut *tx)
    .await?;
    Ok(tx)
}

/// Refreshes the planner's statistics of the log (after a bulk load).
pub async fn analyze(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("ANALYZE events").execute(conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redacted_url_keeps_everything_but_the_password() {
        let cases = [
            (
                "postgres://svc:s3cr%2Ft@db.example:5432/ap?sslmode=require",
                "postgres://svc:***@db.example:5432/ap?sslmode=require",
            ),
            (
                "postgres://svc@db/ap?password=s3cret&sslmode=verify-full",
                "postgres://svc@db/ap?password=***&sslmode=verify-full",
            ),
            ("postgres://db/ap", "postgres://db/ap"),
            ("not a url s3cret", "<unparseable URL>"),
        ];
        for (url, redacted) in cases {
            assert_eq!(redacted_url(url), redacted);
            assert!(!redacted_url(url).contains("s3cr"), "{url}");
        }
        assert_eq!(cases.len(), 4);
    }

    #[test]
    fn require_with_a_root_certificate_verifies_it_as_libpq_does() {
        let mode = |url: &str| connect_options(url).unwrap().get_ssl_mode();
        assert!(matches!(
            mode("postgres://h/db?sslmode=require"),
            PgSslMode::Require
        ));
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"); // any readable file
        assert!(matches!(
            mode(&format!(
                "postgres://h/db?sslmode=require&sslrootcert={root}"
            )),
            PgSslMode::VerifyCa
        ));
        assert!(matches!(
            mode(&format!(
                "postgres://h/db?sslmode=verify-full&sslrootcert={root}"
            )),
            PgSslMode::VerifyFull
        ));
        let missing = connect_options("postgres://h/db?sslmode=verify-full&sslrootcert=/no/ca.pem");
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("sslrootcert /no/ca.pem cannot be read")
        );
        assert!(matches!(
            mode("postgres://h/db?sslmode=disable"),
            PgSslMode::Disable
        ));
    }
}
