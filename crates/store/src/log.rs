//! The append-only event log (`events`, `redeliveries`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::Envelope;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Result;
use crate::keys::{KEY_COLUMNS, NO_ACCOUNT, Opened, RowKey, Vault};

/// A delivery about to be appended: the raw body, its signature header, and what its envelope says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub body: Vec<u8>,
    pub signature: Option<String>,
    pub event: String,
    pub account_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
}

impl Delivery {
    /// A delivery of `body`, whose parsed envelope is `envelope`.
    pub fn new(body: &[u8], signature: Option<&str>, envelope: &Envelope) -> Self {
        Self {
            body: body.to_vec(),
            signature: signature.map(str::to_owned),
            event: envelope.event.clone(),
            account_id: envelope.account,
            user_id: envelope.user,
        }
    }
}

/// Where a delivery landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The event's position: new, or the original's for a redelivery.
    pub position: i64,
    /// The body was identical to an event received within the dedup window.
    pub duplicate: bool,
}

/// Appends one delivery as a transaction of its own (a single statement): when this returns `Ok`,
/// the delivery is committed and durable.
pub async fn append(
    pool: &PgPool,
    vault: &Vault,
    delivery: &Delivery,
    dedup_window: Duration,
) -> Result<Appended> {
    let mut conn = pool.acquire().await?;
    let appended = append_in(
        &mut conn,
        vault,
        std::slice::from_ref(delivery),
        dedup_window,
    )
    .await?;
    announce(&mut conn).await?;
    Ok(appended[0])
}

/// Wakes every [`AppendNotifications`] waiter (NOTIFY `events_appended`): called by whoever
/// appended, after the commit, in a transaction of its own. (A NOTIFY inside the append would
/// make appends commit one at a time: Postgres serialises the commits of notifying transactions.)
pub async fn announce(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify('events_appended', '')")
        .execute(conn)
        .await?;
    Ok(())
}

/// The last position at or below which no append is in flight (`log_horizon()`, V18): every
/// position up to it is settled, committed or abandoned. Read it *before* the snapshot that reads
/// the log (under READ COMMITTED, in an earlier statement), and read no further than it: a reader
/// of `position > checkpoint AND position <= horizon` never skips an event that commits late. On
/// a standby it is the primary's last settled position ([`settle`]).
pub async fn horizon(conn: &mut PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT log_horizon()")
        .fetch_one(conn)
        .await?)
}

/// [`horizon`], after recording each position up to it that no event holds (an append that took
/// it and never committed) in `abandoned_positions`, so every settled position is accounted for.
/// Runs under READ COMMITTED (refused otherwise), before the reads it bounds, in their transaction
/// or before it.
pub async fn settle(conn: &mut PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT settle_log()")
        .fetch_one(conn)
        .await?)
}

/// How the positions up to the settled mark are accounted for: `events + abandoned == settled`
/// is the proof that nothing is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Every position up to here is an event or recorded as abandoned.
    pub settled: i64,
    /// Events at or below `settled`.
    pub events: i64,
    /// Positions at or below `settled` whose append never committed.
    pub abandoned: i64,
}

/// See [`Settled`].
pub async fn settled(conn: &mut PgConnection) -> Result<Settled> {
    let (settled, events, abandoned): (i64, i64, i64) = sqlx::query_as(
        "SELECT s.position,
                (SELECT count(*) FROM events e WHERE e.position <= s.position),
                (SELECT count(*) FROM abandoned_positions a WHERE a.position <= s.position)
           FROM log_settled s",
    )
    .fetch_one(conn)
    .await?;
    Ok(Settled {
        settled,
        events,
        abandoned,
    })
}

/// Appends webhook deliveries, in order, inside the caller's transaction (or as one transaction if
/// the connection has none); durable once that commits, after which the caller [`announce`]s it.
/// One answer per delivery, in order.
///
/// Each body is sealed with its account's key (made first if the account has none: a statement
/// of its own, once per account), bound to the account and the sha256 of the body as received.
///
/// Takes [`crate::locks::APPEND_LOCK`] only while it takes its positions, and a lock per body until
/// the transaction ends. A body identical (sha256) to an event received less than `dedup_window`
/// ago, earlier deliveries of the same call included, or appended concurrently, is recorded as
/// another delivery of that event, not as a new one.
#[tracing::instrument(skip_all, fields(deliveries = deliveries.len()))]
pub async fn append_in(
    conn: &mut PgConnection,
    vault: &Vault,
    deliveries: &[Delivery],
    dedup_window: Duration,
) -> Result<Vec<Appended>> {
    append_as(conn, vault, Origin::Webhook, deliveries, dedup_window).await
}

/// Appends answers of Argyle's API (`argyle.account_fetched`, `argyle.account_not_found`; no
/// signature) like [`append_in`]. The log records them as coming from the API, which is what
/// makes the projector fold a fetched account: a webhook of the same name is logged, not folded.
#[tracing::instrument(skip_all, fields(deliveries = deliveries.len()))]
pub async fn append_fetched_in(
    conn: &mut PgConnection,
    vault: &Vault,
    deliveries: &[Delivery],
    dedup_window: Duration,
) -> Result<Vec<Appended>> {
    append_as(conn, vault, Origin::ArgyleApi, deliveries, dedup_window).await
}

async fn append_as(
    conn: &mut PgConnection,
    vault: &Vault,
    origin: Origin,
    deliveries: &[Delivery],
    dedup_window: Duration,
) -> Result<Vec<Appended>> {
    if deliveries.is_empty() {
        return Ok(vec![]);
    }
    let events: Vec<&str> = deliveries.iter().map(|d| d.event.as_str()).collect();
    let accounts: Vec<Option<Uuid>> = deliveries.iter().map(|d| d.account_id).collect();
    let users: Vec<Option<Uuid>> = deliveries.iter().map(|d| d.user_id).collect();
    let subjects: Vec<Uuid> = accounts.iter().map(|a| a.unwrap_or(NO_ACCOUNT)).collect();
    let sealers = vault.sealers(conn, &subjects).await?;
    let sha256s: Vec<Vec<u8>> = deliveries
        .iter()
        .map(|d| crate::keys::sha256(&d.body))
        .collect();
    let bodies: Vec<Vec<u8>> = deliveries
        .iter()
        .zip(&subjects)
        .zip(&sha256s)
        .map(|((d, subject), sha256)| {
            sealers[subject].seal(
                sealing::Aad::Event {
                    account: *subject,
                    sha256,
                },
                &d.body,
            )
        })
        .collect();
    let window = dedup_window.as_secs_f64();
    // migrations/V16__erasure.sql (first V5): lock, positions, dedup lookups and inserts, in one
    // round trip, as the schema's owner (the service may not insert itself).
    let rows: Vec<(i64, bool)> = match origin {
        Origin::Webhook => {
            let signatures: Vec<Option<&str>> =
                deliveries.iter().map(|d| d.signature.as_deref()).collect();
            sqlx::query_as(
                "SELECT appended_position, is_duplicate
                 FROM append_webhooks($1, $2, $3, $4, $5, $6, make_interval(secs => $7))",
            )
            .bind(events)
            .bind(accounts)
            .bind(users)
            .bind(bodies)
            .bind(sha256s)
            .bind(signatures)
            .bind(window)
            .fetch_all(&mut *conn)
            .await?
        }
        Origin::ArgyleApi => {
            sqlx::query_as(
                "SELECT appended_position, is_duplicate
                 FROM append_fetched($1, $2, $3, $4, $5, make_interval(secs => $6))",
            )
            .bind(events)
            .bind(accounts)
            .bind(users)
            .bind(bodies)
            .bind(sha256s)
            .bind(window)
            .fetch_all(&mut *conn)
            .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|(position, duplicate)| Appended {
            position,
            duplicate,
        })
        .collect())
}

/// Where an event came from (`events.origin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Webhook,
    ArgyleApi,
}

/// One event as stored, with its body opened for the fold.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub position: i64,
    pub received_at: DateTime<Utc>,
    pub event: String,
    pub account_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    /// The body exactly as received, or why it cannot be read.
    pub body: Opened,
    /// `webhook`, `argyle_api` or `erasure`; `None` for events appended before the log recorded it.
    pub origin: Option<String>,
}

impl StoredEvent {
    /// The fold step's input ([`domain::step`]).
    pub fn raw(&self) -> domain::RawEvent<'_> {
        domain::RawEvent {
            position: self.position,
            received_at: self.received_at,
            event: &self.event,
            account: self.account_id,
            user: self.user_id,
            body: match &self.body {
                Opened::Plain(body) => domain::RawBody::Plain(body),
                Opened::Erased => domain::RawBody::Erased,
                Opened::Unreadable(reason) => domain::RawBody::Unreadable(reason),
            },
            origin: match self.origin.as_deref() {
                Some("webhook") => domain::Origin::Webhook,
                Some("erasure") => domain::Origin::Erasure,
                Some(_) => domain::Origin::ArgyleApi,
                None => domain::Origin::Unrecorded,
            },
        }
    }
}

/// A row of `events` with its account's key columns, before its body is opened.
#[derive(sqlx::FromRow)]
struct EventRow {
    position: i64,
    received_at: DateTime<Utc>,
    event: String,
    account_id: Option<Uuid>,
    user_id: Option<Uuid>,
    body: Vec<u8>,
    body_sha256: Vec<u8>,
    origin: Option<String>,
    #[sqlx(flatten)]
    key: RowKey,
}

/// The columns of [`EventRow`], from `events e` joined with its key ([`KEYED`]).
const EVENT_COLUMNS: &str =
    "e.position, e.received_at, e.event, e.account_id, e.user_id, e.body, e.body_sha256, e.origin";

/// `events e` with the key of its account (the nil account's for events that name none), one
/// index probe per row: what reads of some events want, whatever the planner thinks of the keys
/// table (a hash join over every key would make each page of a reconcile cost the whole table).
const KEYED: &str = "events e LEFT JOIN LATERAL (
         SELECT k.kek_id, k.wrapped_key, k.erased_at FROM account_keys k
          WHERE k.account_id = coalesce(e.account_id, '00000000-0000-0000-0000-000000000000'::uuid)
          LIMIT 1) k ON true";

/// [`KEYED`] as a join the planner may choose freely: for reads of the whole log.
const KEYED_ALL: &str = "events e LEFT JOIN account_keys k
     ON k.account_id = coalesce(e.account_id, '00000000-0000-0000-0000-000000000000'::uuid)";

/// Opens a log body read with its key.
fn open_body(
    vault: &Vault,
    account: Option<Uuid>,
    key: &RowKey,
    body: Vec<u8>,
    sha256: &[u8],
) -> Result<Opened> {
    let subject = account.unwrap_or(NO_ACCOUNT);
    vault.open(
        subject,
        key,
        sealing::Aad::Event {
            account: subject,
            sha256,
        },
        body,
        Some(sha256),
    )
}

impl EventRow {
    fn open(self, vault: &Vault) -> Result<StoredEvent> {
        let body = open_body(
            vault,
            self.account_id,
            &self.key,
            self.body,
            &self.body_sha256,
        )?;
        Ok(StoredEvent {
            position: self.position,
            received_at: self.received_at,
            event: self.event,
            account_id: self.account_id,
            user_id: self.user_id,
            body,
            origin: self.origin,
        })
    }
}

fn rows_to_events(rows: Vec<EventRow>, vault: &Vault) -> Result<Vec<StoredEvent>> {
    rows.into_iter().map(|row| row.open(vault)).collect()
}

/// Leaves out the events the database refused to fold (see [`crate::quarantine::RefusedBy::Store`]):
/// every fold of the log reads through it, so none folds what the projector could not write. Of an
/// erased account, whose bodies no fold can read again to decide, every refusal recorded stands.
const NOT_REFUSED_BY_STORE: &str = "NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.position = e.position AND (q.refused_by = 'store' OR k.erased_at IS NOT NULL))";

/// Up to `limit` events with `after < position <= up_to`, in log order, but those the database
/// refused to fold (see [`NOT_REFUSED_BY_STORE`]). `up_to` is a [`horizon`] read before.
#[tracing::instrument(skip(conn))]
pub async fn read_after(
    conn: &mut PgConnection,
    vault: &Vault,
    after: i64,
    up_to: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>> {
    let rows: Vec<EventRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS}, {KEY_COLUMNS}
         FROM {KEYED} WHERE e.position > $1 AND e.position <= $3 AND {NOT_REFUSED_BY_STORE}
         ORDER BY e.position LIMIT $2"
    )))
    .bind(after)
    .bind(limit)
    .bind(up_to)
    .fetch_all(conn)
    .await?;
    rows_to_events(rows, vault)
}

/// [`read_after`] for one part of the projection: only the events of its accounts.
#[tracing::instrument(skip(conn))]
pub async fn read_part_after(
    conn: &mut PgConnection,
    vault: &Vault,
    part: crate::partitions::Part,
    after: i64,
    up_to: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>> {
    if part.is_whole() {
        return read_after(conn, vault, after, up_to, limit).await;
    }
    let rows: Vec<EventRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS}, {KEY_COLUMNS}
         FROM {KEYED} WHERE e.position > $1 AND e.position <= $3 AND {NOT_REFUSED_BY_STORE}
           AND e.account_id IS NOT NULL AND projection_partition(e.account_id, $5) = $4
         ORDER BY e.position LIMIT $2"
    )))
    .bind(after)
    .bind(limit)
    .bind(up_to)
    .bind(i32::from(part.index))
    .bind(i32::from(part.of))
    .fetch_all(conn)
    .await?;
    rows_to_events(rows, vault)
}

/// Whether each event at `positions` opens to the body its sha256 names, read as every reader
/// reads it: `(position, opens)`.
pub(crate) async fn read_positions(
    conn: &mut PgConnection,
    vault: &Vault,
    positions: &[i64],
) -> Result<Vec<(i64, bool)>> {
    let rows: Vec<EventRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS}, {KEY_COLUMNS} FROM {KEYED} WHERE e.position = ANY($1) ORDER BY e.position"
    )))
    .bind(positions)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            let position = row.position;
            Ok((position, matches!(row.open(vault)?.body, Opened::Plain(_))))
        })
        .collect()
}

/// Every event of `accounts` with `position > after`, in log order, streamed, but those the
/// database refused to fold (see [`NOT_REFUSED_BY_STORE`]).
pub fn stream_accounts_after<'c>(
    conn: &'c mut PgConnection,
    vault: &'c Vault,
    accounts: &'c [Uuid],
    after: i64,
) -> BoxStream<'c, Result<StoredEvent>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS}, {KEY_COLUMNS}
         FROM {KEYED} WHERE e.account_id = ANY($1) AND e.position > $2 AND {NOT_REFUSED_BY_STORE}
         ORDER BY e.position"
    )))
    .bind(accounts)
    .bind(after)
    .fetch(conn)
    .map(move |row: sqlx::Result<EventRow>| row?.open(vault))
    .boxed()
}

/// The highest position in the log (0 when empty).
pub async fn head(conn: &mut PgConnection) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(max(position), 0)::bigint FROM events")
            .fetch_one(conn)
            .await?,
    )
}

/// Counts of what the log holds: distinct events and all deliveries (events plus redeliveries).
pub async fn counts(conn: &mut PgConnection) -> Result<LogCounts> {
    let (events, redeliveries): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM redeliveries)")
            .fetch_one(conn)
            .await?;
    Ok(LogCounts {
        events,
        deliveries: events + redeliveries,
    })
}

/// See [`counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogCounts {
    pub events: i64,
    pub deliveries: i64,
}

/// Wakes a waiter whenever an append commits (LISTEN `events_appended`, sent by a trigger).
pub struct AppendNotifications(sqlx::postgres::PgListener);

impl AppendNotifications {
    /// Opens a listening connection from the pool's settings.
    pub async fn subscribe(pool: &PgPool) -> Result<Self> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen("events_appended").await?;
        Ok(Self(listener))
    }

    /// Waits for the next notification. Errors mean the connection was lost.
    pub async fn wait(&mut self) -> Result<()> {
        self.0.recv().await?;
        Ok(())
    }
}

/// One event as the API and the export show it: the stored row plus how often it was delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub position: i64,
    pub received_at: DateTime<Utc>,
    pub event: String,
    pub account_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    /// The first delivery plus every redelivery.
    pub deliveries: i64,
    /// The request body exactly as received, or why it cannot be read (erased, altered).
    pub body: Opened,
    /// The sha256 of the body as received.
    pub body_sha256: Vec<u8>,
    /// The `X-Argyle-Signature` header of the first delivery, as received.
    pub signature: Option<String>,
}

/// A row of `events` as [`page`] and [`export`] read it: the event and its key, how often it was
/// delivered, and its signature.
#[derive(sqlx::FromRow)]
struct RecordRow {
    #[sqlx(flatten)]
    event: EventRow,
    deliveries: i64,
    signature: Option<String>,
}

impl RecordRow {
    fn open(self, vault: &Vault) -> Result<EventRecord> {
        let body_sha256 = self.event.body_sha256.clone();
        let event = self.event.open(vault)?;
        Ok(EventRecord {
            position: event.position,
            received_at: event.received_at,
            event: event.event,
            account_id: event.account_id,
            user_id: event.user_id,
            deliveries: self.deliveries,
            body: event.body,
            body_sha256,
            signature: self.signature,
        })
    }
}

const RECORD_COLUMNS: &str = "e.position, e.received_at, e.event, e.account_id, e.user_id, e.body, e.body_sha256, \
     e.origin, e.signature, 1 + (SELECT count(*) FROM redeliveries r WHERE r.position = e.position) AS deliveries, \
     k.kek_id, k.wrapped_key, (k.erased_at IS NOT NULL) AS erased";

/// Up to `limit` events with `after < position <= up_to` in log order, of one account or of the
/// whole log, streamed so a caller can stop early (a page bounded by bytes as well as by rows).
/// A follower's `up_to` is a [`horizon`] read before; a look at one event may pass `i64::MAX`.
pub fn page<'c>(
    conn: &'c mut PgConnection,
    vault: &'c Vault,
    account: Option<Uuid>,
    after: i64,
    up_to: i64,
    limit: i64,
) -> BoxStream<'c, Result<EventRecord>> {
    let query = match account {
        Some(account) => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM {KEYED} WHERE e.account_id = $3 AND e.position > $1 AND e.position <= $4 ORDER BY e.position LIMIT $2"
        )))
        .bind(after)
        .bind(limit)
        .bind(account)
        .bind(up_to),
        None => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM {KEYED} WHERE e.position > $1 AND e.position <= $3 ORDER BY e.position LIMIT $2"
        )))
        .bind(after)
        .bind(limit)
        .bind(up_to),
    };
    query
        .fetch(conn)
        .map(move |row: sqlx::Result<RecordRow>| row?.open(vault))
        .boxed()
}

/// Which events an export covers. Every bound is optional; `since` is inclusive, `until` exclusive,
/// so consecutive exports `[a, b)`, `[b, c)` neither overlap nor leave a gap.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    pub account: Option<Uuid>,
    pub user: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Every event matching `filter`, streamed in log order (constant memory).
pub fn export<'c>(
    conn: &'c mut PgConnection,
    vault: &'c Vault,
    filter: ExportFilter,
) -> BoxStream<'c, Result<EventRecord>> {
    let mut query = sqlx::QueryBuilder::new(format!(
        "SELECT {RECORD_COLUMNS} FROM {KEYED_ALL} WHERE true"
    ));
    if let Some(account) = filter.account {
        query.push(" AND e.account_id = ").push_bind(account);
    }
    if let Some(user) = filter.user {
        query.push(" AND e.user_id = ").push_bind(user);
    }
    if let Some(since) = filter.since {
        query.push(" AND e.received_at >= ").push_bind(since);
    }
    if let Some(until) = filter.until {
        query.push(" AND e.received_at < ").push_bind(until);
    }
    query.push(" ORDER BY e.position");
    // The stream borrows the builder's SQL, so it is built and driven inside one owned stream.
    async_stream::try_stream! {
        let mut rows = query.build_query_as::<RecordRow>().fetch(conn);
        while let Some(row) = rows.try_next().await? {
            yield row.open(vault)?;
        }
    }
    .boxed()
}

/// Where a replay of the log stops: after the last event within every bound given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Until {
    /// Events at positions up to and including this one.
    pub position: Option<i64>,
    /// Events received at or before this instant.
    pub received_at: Option<DateTime<Utc>>,
}

impl Until {
    /// The whole log.
    pub const END: Self = Self {
        position: None,
        received_at: None,
    };
}

/// One account's events in log order, up to `until`, streamed (those the database refused to
/// fold left out, see [`NOT_REFUSED_BY_STORE`]).
pub fn account_history<'c>(
    conn: &'c mut PgConnection,
    vault: &'c Vault,
    account: Uuid,
    until: Until,
) -> BoxStream<'c, Result<StoredEvent>> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS}, {KEY_COLUMNS} FROM {KEYED}
          WHERE e.account_id = $1 AND ($2::bigint IS NULL OR e.position <= $2)
            AND ($3::timestamptz IS NULL OR e.received_at <= $3) AND {NOT_REFUSED_BY_STORE}
          ORDER BY e.position"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(account)
        .bind(until.position)
        .bind(until.received_at)
        .fetch(conn)
        .map(move |row: sqlx::Result<EventRow>| row?.open(vault))
        .boxed()
}

/// The events the fold reads ([`domain::EventKind::is_folded`]): every `accounts.*` event
/// and the service's own folded answers of Argyle's API ([`FOLDED_API_ANSWERS`]), bound as `$3`.
const FOLDED: &str =
    "e.account_id IS NOT NULL AND (e.event LIKE 'accounts.%' OR e.event = ANY($3))";

/// The names of the service's own events the fold reads, besides `accounts.*`.
const FOLDED_API_ANSWERS: [&str; 3] = [
    domain::ACCOUNT_FETCHED,
    domain::ACCOUNT_GONE,
    domain::ACCOUNT_ERASED,
];

/// Every folded event up to `up_to` (or only `account`'s), streamed ordered by account and then
/// position, so a rebuild can fold one account at a time in constant memory.
pub fn account_events_by_account<'c>(
    conn: &'c mut PgConnection,
    vault: &'c Vault,
    up_to: i64,
    account: Option<Uuid>,
    part: crate::partitions::Part,
) -> BoxStream<'c, Result<StoredEvent>> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS}, {KEY_COLUMNS} FROM {KEYED_ALL}
         WHERE e.position <= $1 AND {FOLDED} AND ($2::uuid IS NULL OR e.account_id = $2)
           AND {NOT_REFUSED_BY_STORE} AND {IN_PART}
         ORDER BY e.account_id, e.position"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(up_to)
        .bind(account)
        .bind(&FOLDED_API_ANSWERS[..])
        .bind(i32::from(part.index))
        .bind(i32::from(part.of))
        .fetch(conn)
        .map(move |row: sqlx::Result<EventRow>| row?.open(vault))
        .boxed()
}

/// The events of one part of the projection ($4 of $5; all of them when $5 is 1).
const IN_PART: &str = "($5::integer <= 1 OR projection_partition(e.account_id, $5) = $4)";

/// How many events [`account_events_by_account`] will yield.
pub async fn count_account_events(
    conn: &mut PgConnection,
    up_to: i64,
    account: Option<Uuid>,
    part: crate::partitions::Part,
) -> Result<i64> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {KEYED_ALL}
         WHERE e.position <= $1 AND {FOLDED} AND ($2::uuid IS NULL OR e.account_id = $2)
           AND {NOT_REFUSED_BY_STORE} AND {IN_PART}"
    )))
    .bind(up_to)
    .bind(account)
    .bind(&FOLDED_API_ANSWERS[..])
    .bind(i32::from(part.index))
    .bind(i32::from(part.of))
    .fetch_one(conn)
    .await?)
}

/// The plan and timing of the dedup lookup every append makes (`EXPLAIN ANALYZE` of the probe in
/// `append_to_log()`, for a body never seen), one line each: how it grows with the log.
pub async fn explain_dedup_lookup(conn: &mut PgConnection) -> Result<Vec<String>> {
    let unseen = crate::keys::sha256(uuid::Uuid::new_v4().as_bytes());
    Ok(sqlx::query_scalar(
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
         SELECT e.position FROM events e
          WHERE e.body_sha256 = $1 AND e.received_at > clock_timestamp() - interval '24 hours'
          ORDER BY e.position DESC LIMIT 1",
    )
    .bind(unseen)
    .fetch_all(conn)
    .await?)
}
