//! Creating the database and applying the refinery migrations in `migrations/`.
//!
//! refinery runs over a sqlx connection ([`SqlxMigrator`]), so migrations connect exactly like
//! every other command: same URL, same TLS parameters (`sslmode`, `sslrootcert`). A session
//! advisory lock makes concurrent `migrate` runs (several replicas starting at once) take turns
//! instead of racing.
//!
//! Only a role that owns the schema can migrate. Before applying anything, [`migrate`] reads where
//! the schema stands: a current schema needs nothing (so the least-privilege service role can start
//! with migrations on), and pending migrations that this role cannot apply are an error that says
//! so, instead of a `permission denied` halfway through a migration.

use refinery::Migration;
use refinery_core::traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction};
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::{Error, Result, connect_options};

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

use crate::locks::MIGRATION_LOCK;

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The database had to be created.
    pub created_database: bool,
    /// Names of the migrations applied by this run, in order (`V1__event_log`, ...).
    pub applied: Vec<String>,
    /// The schema's version after the run.
    pub version: i64,
}

/// Where a database's schema stands, for the role connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaState {
    /// The highest migration applied (0 on an empty database).
    pub applied: i64,
    /// The highest migration this build knows.
    pub latest: i64,
    /// The connected role owns the schema and the tables already there (a role that may merely
    /// create in it, as PUBLIC may on Postgres 14, must not end up owning the log).
    pub can_migrate: bool,
}

impl SchemaState {
    /// Every migration this build knows is applied.
    pub fn is_current(&self) -> bool {
        self.applied >= self.latest
    }
}

/// The highest migration version this build knows.
pub fn latest_version() -> i64 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

/// Where the schema of the connected database stands.
pub async fn schema_state(conn: &mut PgConnection) -> Result<SchemaState> {
    let (has_history, can_migrate): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('refinery_schema_history') IS NOT NULL,
                (SELECT pg_has_role(current_user, n.nspowner, 'USAGE')
                   FROM pg_namespace n WHERE n.nspname = current_schema())
                AND coalesce((SELECT pg_has_role(current_user, c.relowner, 'USAGE')
                                FROM pg_class c WHERE c.oid = to_regclass('events')), true)",
    )
    .fetch_one(&mut *conn)
    .await?;
    let applied: Option<i64> = if has_history {
        sqlx::query_scalar("SELECT max(version)::bigint FROM refinery_schema_history")
            .fetch_one(&mut *conn)
            .await?
    } else {
        None
    };
    Ok(SchemaState {
        applied: applied.unwrap_or(0),
        latest: latest_version(),
        can_migrate,
    })
}

/// Creates the database named in `database_url` if it does not exist, then applies pending
/// migrations. A current schema is left alone (any role may call this then); pending migrations
/// the connected role cannot apply are [`Error::CannotMigrate`].
#[tracing::instrument(skip_all)]
pub async fn migrate(database_url: &str) -> Result<MigrationReport> {
    let created_database = create_database_if_missing(database_url).await?;
    let mut conn = connect_options(database_url)?.connect().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut conn)
        .await?;
    let report = migrate_locked(&mut conn).await;
    // The lock is a session lock: closing the connection releases it even if unlock is never sent.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    let (applied, version) = report?;
    for name in &applied {
        tracing::info!(migration = %name, "applied migration");
    }
    Ok(MigrationReport {
        created_database,
        applied,
        version,
    })
}

async fn migrate_locked(conn: &mut PgConnection) -> Result<(Vec<String>, i64)> {
    let state = schema_state(conn).await?;
    if state.is_current() {
        return Ok((vec![], state.applied));
    }
    if !state.can_migrate {
        let role: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut *conn)
            .await?;
        return Err(Error::CannotMigrate {
            role,
            applied: state.applied,
            latest: state.latest,
        });
    }
    let report = embedded::migrations::runner()
        .run_async(&mut SqlxMigrator(conn))
        .await
        .map_err(|e| Error::Migration(e.to_string()))?;
    let applied = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect();
    Ok((applied, schema_state(conn).await?.applied))
}

/// refinery's driver for a sqlx connection: each call of `execute` is one transaction, the way
/// refinery's own drivers do it (a migration and its history row commit together).
struct SqlxMigrator<'c>(&'c mut PgConnection);

impl AsyncTransaction for SqlxMigrator<'_> {
    type Error = sqlx::Error;

    async fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &'a mut self,
        queries: T,
    ) -> Result<usize, Self::Error> {
        let mut tx = self.0.begin().await?;
        let mut count = 0;
        for query in queries {
            // Simple-query protocol: a migration may hold many statements.
            sqlx::raw_sql(sqlx::AssertSqlSafe(query))
                .execute(&mut *tx)
                .await?;
            count += 1;
        }
        tx.commit().await?;
        Ok(count)
    }
}

impl AsyncQuery<Vec<Migration>> for SqlxMigrator<'_> {
    async fn query<'a>(&'a mut self, query: &'a str) -> Result<Vec<Migration>, Self::Error> {
        use time::format_description::well_known::Rfc3339;
        let rows: Vec<(i32, String, String, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(query.to_owned()))
                .fetch_all(&mut *self.0)
                .await?;
        rows.into_iter()
            .map(|(version, name, applied_on, checksum)| {
                let corrupt = |what: &str| {
                    sqlx::Error::Protocol(format!(
                        "refinery_schema_history row V{version} has an unreadable {what}"
                    ))
                };
                let applied_on = time::OffsetDateTime::parse(&applied_on, &Rfc3339)
                    .map_err(|_| corrupt("applied_on"))?;
                let checksum = checksum.parse().map_err(|_| corrupt("checksum"))?;
                Ok(Migration::applied(version, name, applied_on, checksum))
            })
            .collect()
    }
}

impl AsyncMigrate for SqlxMigrator<'_> {}

async fn create_database_if_missing(database_url: &str) -> Result<bool> {
    let target = connect_options(database_url)?;
    let Some(name) = target.get_database().map(str::to_owned) else {
        return Ok(false);
    };
    match target.connect().await {
        Ok(connection) => {
            let _ = connection.close().await;
            return Ok(false);
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
        Err(e) => return Err(e.into()),
    }
    let mut maintenance = target.clone().database("postgres").connect().await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let created = match sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut maintenance)
        .await
    {
        Ok(_) => true,
        // Someone else created it meanwhile.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => false,
        Err(e) => return Err(e.into()),
    };
    let _ = maintenance.close().await;
    if created {
        tracing::info!(database = %name, "created database");
    }
    Ok(created)
}

/// Drops the database named in `database_url`, if it exists (benchmarks start from nothing).
pub async fn drop_database(database_url: &str) -> Result<()> {
    let target = connect_options(database_url)?;
    let Some(name) = target.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut maintenance = target.database("postgres").connect().await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"
    )))
    .execute(&mut maintenance)
    .await?;
    Ok(())
}

/// The server's version string.
pub async fn server_version(pool: &sqlx::PgPool) -> Result<String> {
    Ok(sqlx::query_scalar("SELECT version()")
        .fetch_one(pool)
        .await?)
}

#[cfg(test)]
mod tests {
    /// Every released migration, as released: refinery refuses to run against a database whose
    /// history holds another checksum for a version, so an edited migration breaks every
    /// installation that applied it. A new migration is added here when it is released.
    /// Every migration this build embeds: version, name and refinery's checksum of its text.
    fn embedded() -> Vec<(i64, String, u64)> {
        super::embedded::migrations::runner()
            .get_migrations()
            .iter()
            .map(|m| (i64::from(m.version()), m.name().to_owned(), m.checksum()))
            .collect()
    }

    const RELEASED: &[(i64, &str, u64)] = &[
        (1, "event_log", 17066047477061155122),
        (2, "account_snapshots", 9179101105360664884),
        (3, "rebuild_shadow", 10866768284726789681),
        (4, "quarantine", 15883362656420890062),
        (5, "append_function", 13395349225843169688),
        (6, "checkpoint_notify", 16628791849746380382),
        (7, "enrichment", 18135844679830080984),
        (8, "snapshot_fillfactor", 10078749140494183139),
        (9, "one_copy_of_each_body", 14559864144395219316),
        (10, "append_with_one_plan", 15092258761288364591),
        (
            11,
            "lossless_resources_and_store_refusals",
            96482408921096424,
        ),
        (12, "least_privilege", 4285268529020328666),
        (13, "reconcile", 14114083790895781021),
        (14, "change_feed", 835578328778674629),
        (15, "notifier", 16533501981476732583),
        (16, "erasure", 11581139475354722505),
        (17, "ui_sessions", 8799915771757506379),
        (18, "overlapping_appends", 12009476492683981808),
        (19, "partitioned_projection", 12134096869761682941),
    ];

    #[test]
    fn released_migrations_are_never_edited() {
        let embedded = embedded();
        let mut checked = 0;
        for &(version, name, checksum) in RELEASED {
            let Some((_, found_name, found)) = embedded.iter().find(|(v, _, _)| *v == version)
            else {
                panic!("migration V{version}__{name} was released and is gone: put it back");
            };
            assert_eq!(
                (found_name.as_str(), *found),
                (name, checksum),
                "migration V{version}__{name} was changed after its release; released migrations \
                 are never edited: add a new migration (V{}) instead",
                embedded.iter().map(|(v, _, _)| v).max().unwrap_or(&0) + 1
            );
            checked += 1;
        }
        for (version, name, checksum) in &embedded {
            assert!(
                RELEASED.iter().any(|(v, _, _)| v == version),
                "migration V{version}__{name} is not pinned: add ({version}, \"{name}\", {checksum}) \
                 to RELEASED in crates/store/src/migrate.rs when it is released"
            );
        }
        assert_eq!(checked, RELEASED.len());
        assert_eq!(embedded.len(), RELEASED.len());
    }
}
