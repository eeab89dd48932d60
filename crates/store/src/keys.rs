//! Account keys (`account_keys`) and the [`Vault`] that seals and opens personal data with them.
//!
//! Every function of this crate that writes or reads personal data takes the vault: it seals log
//! bodies, snapshot resources, quarantine reasons and outbound messages before they reach the
//! database, and opens them as they come back. Rows read the key of their account in the same
//! statement (a join on `account_keys`), so a row of an erased account is known to be erased in
//! the very snapshot that read it, whatever this process remembers.
//!
//! Keys are cached in memory, unwrapped, for at most [`CACHE_TTL`]: a writer may seal with a key
//! erased in the last minute, which leaves bytes nothing can open, as erasure wants.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sealing::{Aad, DataKey, KeyRing, UnwrapError, WrappedKey};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{Error, Result};

/// How long an unwrapped key stays in memory after it was last read from the database.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Keys kept at most (about 250 bytes each); past this, stale ones are dropped, then all.
const CACHE_MAX: usize = 10_000;

/// The key of events that name no account.
pub const NO_ACCOUNT: Uuid = Uuid::nil();

/// Seals and opens personal data with the keys of its accounts (see the module docs). Cheap to
/// clone; clones share the cache.
#[derive(Clone)]
pub struct Vault(Arc<Inner>);

struct Inner {
    ring: Option<KeyRing>,
    cache: Mutex<HashMap<Uuid, Cached>>,
}

struct Cached {
    wrapped: Vec<u8>,
    key: Arc<DataKey>,
    read_at: Instant,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0.ring {
            Some(ring) => write!(f, "Vault({ring:?})"),
            None => f.write_str("Vault(plaintext)"),
        }
    }
}

/// What a stored value turned out to be once opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// The plaintext (stored in plaintext, or sealed and opened).
    Plain(Vec<u8>),
    /// Sealed under the key of an erased account: nothing can read it.
    Erased,
    /// Sealed, and it does not open: altered in the table, or its key is missing or altered.
    Unreadable(String),
}

/// The key columns a row read beside its sealed value (`LEFT JOIN account_keys k`).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub(crate) struct RowKey {
    pub kek_id: Option<String>,
    pub wrapped_key: Option<Vec<u8>>,
    pub erased: Option<bool>,
}

impl RowKey {
    pub(crate) fn is_erased(&self) -> bool {
        self.erased == Some(true)
    }
}

/// The columns every read of a sealed value selects, from `account_keys k`.
pub(crate) const KEY_COLUMNS: &str = "k.kek_id, k.wrapped_key, (k.erased_at IS NOT NULL) AS erased";

/// How a write seals for one account.
#[derive(Clone)]
pub(crate) enum Sealer {
    /// With the account's key.
    Key(Arc<DataKey>),
    /// The account is erased: with a key made for this value and never stored, so the value is
    /// erased as it is written.
    Erased,
    /// Encryption at rest is off: as it is.
    Plain,
}

impl Sealer {
    pub(crate) fn seal(&self, aad: Aad<'_>, plaintext: &[u8]) -> Vec<u8> {
        match self {
            Self::Key(key) => key.seal(aad, plaintext),
            Self::Erased => DataKey::generate().seal(aad, plaintext),
            Self::Plain => plaintext.to_vec(),
        }
    }
}

impl Vault {
    /// A vault that seals with keys wrapped by `ring`'s newest key.
    pub fn new(ring: KeyRing) -> Self {
        Self(Arc::new(Inner {
            ring: Some(ring),
            cache: Mutex::new(HashMap::new()),
        }))
    }

    /// A vault that stores new values in plaintext (`ALLOW_PLAINTEXT_LOG`): nothing it writes can
    /// be erased. It still reads plaintext, and refuses sealed values (it has no keys).
    pub fn plaintext() -> Self {
        Self(Arc::new(Inner {
            ring: None,
            cache: Mutex::new(HashMap::new()),
        }))
    }

    /// True when new values are sealed.
    pub fn encrypts(&self) -> bool {
        self.0.ring.is_some()
    }

    /// The key-encryption keys, when encrypting.
    pub fn ring(&self) -> Option<&KeyRing> {
        self.0.ring.as_ref()
    }

    fn cached(&self, account: Uuid, wrapped: Option<&[u8]>) -> Option<Arc<DataKey>> {
        let cache = self.0.cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.get(&account)?;
        let fresh = entry.read_at.elapsed() < CACHE_TTL;
        match wrapped {
            // A reader has the row's own wrapped key: the cache only saves unwrapping it.
            Some(wrapped) => (entry.wrapped == wrapped).then(|| entry.key.clone()),
            None => fresh.then(|| entry.key.clone()),
        }
    }

    fn remember(&self, account: Uuid, wrapped: Vec<u8>, key: Arc<DataKey>) {
        let mut cache = self.0.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, entry| entry.read_at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(
            account,
            Cached {
                wrapped,
                key,
                read_at: Instant::now(),
            },
        );
    }

    fn unwrap(&self, account: Uuid, kek_id: &str, wrapped: &[u8]) -> Result<Arc<DataKey>> {
        if let Some(key) = self.cached(account, Some(wrapped)) {
            return Ok(key);
        }
        let ring = self.0.ring.as_ref().ok_or_else(no_keys)?;
        let key = ring
            .unwrap(
                account,
                &WrappedKey {
                    kek_id: kek_id.to_owned(),
                    bytes: wrapped.to_vec(),
                },
            )
            .map_err(|e| match e {
                UnwrapError::UnknownKek(_) => Error::Keys(e.to_string()),
                UnwrapError::Tampered(_) => Error::KeyTampered(e.to_string()),
            })?;
        let key = Arc::new(key);
        self.remember(account, wrapped.to_vec(), key.clone());
        Ok(key)
    }

    /// How to seal values of each of `accounts` (the nil UUID for events that name no account),
    /// making the keys that do not exist yet.
    pub(crate) async fn sealers(
        &self,
        conn: &mut PgConnection,
        accounts: &[Uuid],
    ) -> Result<HashMap<Uuid, Sealer>> {
        let mut sealers = HashMap::with_capacity(accounts.len());
        let Some(ring) = self.0.ring.as_ref() else {
            for account in accounts {
                sealers.insert(*account, Sealer::Plain);
            }
            return Ok(sealers);
        };
        let mut missing: Vec<Uuid> = vec![];
        for account in accounts {
            if sealers.contains_key(account) {
                continue;
            }
            match self.cached(*account, None) {
                Some(key) => {
                    sealers.insert(*account, Sealer::Key(key));
                }
                None if !missing.contains(account) => missing.push(*account),
                None => {}
            }
        }
        // Read what exists, make what does not, and read again what another writer made first.
        for _ in 0..3 {
            if missing.is_empty() {
                break;
            }
            // Planned at every call (as `snapshots::get_many`): the table grows from nothing, and
            // a plan cached while it was one page would scan all of it for good.
            let rows: Vec<(Uuid, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT account_id, kek_id, wrapped_key FROM account_keys WHERE account_id = ANY($1)",
            )
            .bind(&missing)
            .persistent(false)
            .fetch_all(&mut *conn)
            .await?;
            for (account, kek_id, wrapped) in rows {
                let sealer = match (kek_id, wrapped) {
                    (Some(kek_id), Some(wrapped)) => {
                        Sealer::Key(self.unwrap(account, &kek_id, &wrapped)?)
                    }
                    _ => Sealer::Erased,
                };
                sealers.insert(account, sealer);
            }
            missing.retain(|account| !sealers.contains_key(account));
            if missing.is_empty() {
                break;
            }
            let made: Vec<(Uuid, DataKey, WrappedKey)> = missing
                .iter()
                .map(|account| {
                    let key = DataKey::generate();
                    let wrapped = ring.wrap(*account, &key);
                    (*account, key, wrapped)
                })
                .collect();
            let ids: Vec<Uuid> = made.iter().map(|m| m.0).collect();
            let kek_ids: Vec<&str> = made.iter().map(|m| m.2.kek_id.as_str()).collect();
            let wrapped: Vec<&[u8]> = made.iter().map(|m| m.2.bytes.as_slice()).collect();
            let inserted: Vec<Uuid> = sqlx::query_scalar(
                "INSERT INTO account_keys (account_id, kek_id, wrapped_key)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[])
                 ON CONFLICT (account_id) DO NOTHING
                 RETURNING account_id",
            )
            .bind(&ids)
            .bind(&kek_ids)
            .bind(&wrapped)
            .fetch_all(&mut *conn)
            .await?;
            for (account, key, wrapped) in made {
                if inserted.contains(&account) {
                    let key = Arc::new(key);
                    self.remember(account, wrapped.bytes, key.clone());
                    sealers.insert(account, Sealer::Key(key));
                }
            }
            missing.retain(|account| !sealers.contains_key(account));
        }
        if !missing.is_empty() {
            return Err(Error::Keys(format!(
                "could not read or make the keys of {} accounts",
                missing.len()
            )));
        }
        Ok(sealers)
    }

    /// Opens a value read with its row's key columns. `sha256`, when given, is the checksum the
    /// plaintext must have (a log body's `body_sha256`).
    pub(crate) fn open(
        &self,
        account: Uuid,
        key: &RowKey,
        aad: Aad<'_>,
        stored: Vec<u8>,
        sha256: Option<&[u8]>,
    ) -> Result<Opened> {
        if !sealing::is_sealed(&stored) {
            return Ok(Opened::Plain(stored));
        }
        if key.is_erased() {
            return Ok(Opened::Erased);
        }
        let (Some(kek_id), Some(wrapped)) = (&key.kek_id, &key.wrapped_key) else {
            return Ok(Opened::Unreadable(format!(
                "the value is sealed but account {account} has no key"
            )));
        };
        let data_key = match self.unwrap(account, kek_id, wrapped) {
            Ok(data_key) => data_key,
            Err(Error::KeyTampered(reason)) => return Ok(Opened::Unreadable(reason)),
            Err(other) => return Err(other),
        };
        let Ok(plain) = data_key.open(aad, &stored) else {
            return Ok(Opened::Unreadable(sealing::Tampered.to_string()));
        };
        if let Some(expected) = sha256
            && Sha256::digest(&plain).as_slice() != expected
        {
            return Ok(Opened::Unreadable(
                "the opened body does not match its sha256".into(),
            ));
        }
        Ok(Opened::Plain(plain))
    }
}

fn no_keys() -> Error {
    Error::Keys(
        "the database holds encrypted values but no DATA_KEYS is configured (ALLOW_PLAINTEXT_LOG)"
            .into(),
    )
}

/// Where the account keys stand, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCounts {
    /// Live keys, per key-encryption key id.
    pub live_by_kek: Vec<(String, i64)>,
    /// Erased accounts.
    pub erased: i64,
}

/// Counts the keys.
pub async fn counts(conn: &mut PgConnection) -> Result<KeyCounts> {
    let live_by_kek: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kek_id, count(*) FROM account_keys WHERE kek_id IS NOT NULL
         GROUP BY kek_id ORDER BY count(*) DESC",
    )
    .fetch_all(&mut *conn)
    .await?;
    let erased: i64 =
        sqlx::query_scalar("SELECT count(*) FROM account_keys WHERE erased_at IS NOT NULL")
            .fetch_one(conn)
            .await?;
    Ok(KeyCounts {
        live_by_kek,
        erased,
    })
}

/// The position of `account`'s erasure, if it is erased.
pub async fn erased_at(conn: &mut PgConnection, account: Uuid) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT erased_position FROM account_keys WHERE account_id = $1 AND erased_at IS NOT NULL",
    )
    .bind(account)
    .fetch_optional(conn)
    .await?
    .flatten())
}

/// What [`rotate`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rotated {
    /// Keys re-wrapped under the newest key-encryption key.
    pub rewrapped: u64,
    /// Keys already under it.
    pub current: u64,
}

/// Re-wraps every live account key not under the ring's newest key-encryption key, `batch` at a
/// time, each batch committed (so a stopped run is resumed by the next one); `progress` hears the
/// count after each batch. Needs the schema's owner: the service role may not change a key.
pub async fn rotate(
    conn: &mut PgConnection,
    vault: &Vault,
    batch: i64,
    mut progress: impl FnMut(Rotated),
) -> Result<Rotated> {
    let ring = vault.0.ring.as_ref().ok_or_else(no_keys)?;
    let newest = ring.newest_id().to_owned();
    let mut done = Rotated {
        current: sqlx::query_scalar::<_, i64>("SELECT count(*) FROM account_keys WHERE kek_id = $1")
            .bind(&newest)
            .fetch_one(&mut *conn)
            .await? as u64,
        ..Rotated::default()
    };
    let mut after = Uuid::nil();
    loop {
        let mut tx = crate::begin(conn).await?;
        let rows: Vec<(Uuid, String, Vec<u8>)> = sqlx::query_as(
            "SELECT account_id, kek_id, wrapped_key FROM account_keys
             WHERE account_id > $1 AND kek_id IS NOT NULL AND kek_id <> $2
             ORDER BY account_id LIMIT $3 FOR UPDATE",
        )
        .bind(after)
        .bind(&newest)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last().map(|r| r.0) else {
            crate::rollback(tx).await?;
            break;
        };
        let mut ids = Vec::with_capacity(rows.len());
        let mut wrapped = Vec::with_capacity(rows.len());
        for (account, kek_id, old) in &rows {
            let key = ring
                .unwrap(
                    *account,
                    &WrappedKey {
                        kek_id: kek_id.clone(),
                        bytes: old.clone(),
                    },
                )
                .map_err(|e| Error::Keys(format!("account {account}: {e}")))?;
            ids.push(*account);
            wrapped.push(ring.wrap(*account, &key).bytes);
        }
        sqlx::query(
            "UPDATE account_keys k SET kek_id = $3, wrapped_key = n.wrapped
             FROM unnest($1::uuid[], $2::bytea[]) AS n(account_id, wrapped)
             WHERE k.account_id = n.account_id AND k.wrapped_key IS NOT NULL",
        )
        .bind(&ids)
        .bind(&wrapped)
        .bind(&newest)
        .execute(&mut *tx)
        .await?;
        crate::commit(tx).await?;
        done.rewrapped += rows.len() as u64;
        after = last;
        progress(done);
    }
    Ok(done)
}

/// The plaintext `sha256` of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}
