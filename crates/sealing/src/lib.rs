//! Encryption at rest (crypto-shredding): every copy of an account's personal data is sealed with
//! a key of its own account, and erasing the account destroys that key.
//!
//! - A [`DataKey`] is one account's key: XChaCha20-Poly1305 with a random 192-bit nonce per
//!   message, so nonces never need coordinating between processes.
//! - A [`KeyRing`] holds the key-encryption keys (`DATA_KEYS`, newest first), kept outside the
//!   database. Account keys are stored only wrapped (sealed) by one of them, under the account's id
//!   as associated data, so a wrapped key cannot be moved to another account.
//! - [`seal`] output starts with [`MAGIC`], a byte no UTF-8 text (hence no JSON) starts with: a
//!   column can hold sealed bytes and older plaintext side by side, told apart by [`is_sealed`].
//! - The associated data ([`Aad`]) binds every sealed value to its account and its row (an event
//!   to the sha256 of its plaintext, a snapshot to its account, ...): sealed bytes copied to
//!   another row, or a row whose checksum was changed, fail authentication.
//!
//! Nothing here touches a database; `store::keys` keeps the wrapped keys.

#![forbid(unsafe_code)]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

/// The first byte of sealed bytes: never the first byte of UTF-8 text (it is a continuation
/// byte), so never that of a JSON document.
pub const MAGIC: u8 = 0xAE;
/// The format of what follows [`MAGIC`]: a 24-byte nonce, then the ciphertext and its 16-byte tag.
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes [`seal`] adds to a plaintext.
pub const OVERHEAD: usize = 2 + NONCE_LEN + TAG_LEN;
/// A key-encryption key and an account key are both 32 bytes.
pub const KEY_LEN: usize = 32;

/// True when `bytes` were made by [`DataKey::seal`] (or look as if: [`DataKey::open`] decides).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.first() == Some(&MAGIC)
}

/// What a sealed value is bound to; any difference makes [`DataKey::open`] fail.
#[derive(Debug, Clone, Copy)]
pub enum Aad<'a> {
    /// A log body: its account (nil for an event that names none) and the sha256 of the plaintext
    /// (`events.body_sha256`).
    Event { account: Uuid, sha256: &'a [u8] },
    /// A snapshot's resource.
    Snapshot { account: Uuid },
    /// A quarantine record's reason.
    Quarantine { account: Uuid, position: i64 },
    /// An outbound message's body.
    Message { account: Uuid, message: Uuid },
    /// An account key wrapped by a key-encryption key.
    Key { account: Uuid },
}

impl Aad<'_> {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let (label, account): (&[u8], Uuid) = match self {
            Self::Event { account, .. } => (b"account-projector/event/1", *account),
            Self::Snapshot { account } => (b"account-projector/snapshot/1", *account),
            Self::Quarantine { account, .. } => (b"account-projector/quarantine/1", *account),
            Self::Message { account, .. } => (b"account-projector/message/1", *account),
            Self::Key { account } => (b"account-projector/key/1", *account),
        };
        out.extend_from_slice(label);
        out.push(0);
        out.extend_from_slice(account.as_bytes());
        match self {
            Self::Event { sha256, .. } => out.extend_from_slice(sha256),
            Self::Quarantine { position, .. } => out.extend_from_slice(&position.to_be_bytes()),
            Self::Message { message, .. } => out.extend_from_slice(message.as_bytes()),
            Self::Snapshot { .. } | Self::Key { .. } => {}
        }
        out
    }
}

/// Sealed bytes that do not open: altered, bound to another row, or sealed under another key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the sealed value fails authentication (altered, moved from another row, or sealed under another key)"
)]
pub struct Tampered;

/// One account's key. Its bytes are wiped when dropped and never printed.
#[derive(Clone)]
pub struct DataKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(***)")
    }
}

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let key = random_key();
        Self::from_bytes(key.as_slice()).expect("a generated key is 32 bytes")
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: [u8; KEY_LEN] = bytes.try_into().ok()?;
        let bytes = Zeroizing::new(bytes);
        let cipher = XChaCha20Poly1305::new((&*bytes).into());
        Some(Self { bytes, cipher })
    }

    /// `plaintext` sealed under this key, bound to `aad`: [`MAGIC`], the format, a random nonce,
    /// the ciphertext and its tag.
    pub fn seal(&self, aad: Aad<'_>, plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.cipher, aad, plaintext)
    }

    /// The plaintext of `sealed`, if it was sealed under this key and bound to `aad`.
    pub fn open(&self, aad: Aad<'_>, sealed: &[u8]) -> Result<Vec<u8>, Tampered> {
        open_with(&self.cipher, aad, sealed)
    }
}

fn seal_with(cipher: &XChaCha20Poly1305, aad: Aad<'_>, plaintext: &[u8]) -> Vec<u8> {
    let nonce = XNonce::generate();
    let aad = aad.bytes();
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        // Fails only past 256 GiB, far beyond every bounded input here.
        .expect("XChaCha20-Poly1305 encrypts any message under 256 GiB");
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.push(MAGIC);
    out.push(FORMAT);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
}

fn open_with(cipher: &XChaCha20Poly1305, aad: Aad<'_>, sealed: &[u8]) -> Result<Vec<u8>, Tampered> {
    if sealed.len() < OVERHEAD || sealed[0] != MAGIC || sealed[1] != FORMAT {
        return Err(Tampered);
    }
    let nonce = XNonce::try_from(&sealed[2..2 + NONCE_LEN]).map_err(|_| Tampered)?;
    let aad = aad.bytes();
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: &sealed[2 + NONCE_LEN..],
                aad: &aad,
            },
        )
        .map_err(|_| Tampered)
}

/// An account key as the database keeps it: sealed by the key-encryption key `kek_id`.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub kek_id: String,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WrappedKey({}, {} bytes)", self.kek_id, self.bytes.len())
    }
}

/// Why an account key could not be unwrapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnwrapError {
    /// No key of the ring has this id: DATA_KEYS lacks the key that wrapped it.
    #[error(
        "DATA_KEYS lacks the key-encryption key {0} that wraps account keys of this database; add it back (keys newest first) or run `keys rotate` while it is still configured"
    )]
    UnknownKek(String),
    /// The key of that id does not open it: the stored key was altered.
    #[error("the stored account key fails authentication under key-encryption key {0}")]
    Tampered(String),
}

/// Why `DATA_KEYS` cannot be used. Never quotes a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRingError {
    #[error("DATA_KEYS holds no key")]
    Empty,
    #[error("DATA_KEYS entry {0} is empty")]
    EmptyEntry(usize),
    #[error("DATA_KEYS entry {0} is not base64")]
    NotBase64(usize),
    #[error("DATA_KEYS entry {entry} is {len} bytes once decoded; a key is 32 random bytes")]
    WrongLength { entry: usize, len: usize },
    #[error("DATA_KEYS entry {0} repeats an earlier key")]
    Repeated(usize),
}

struct Kek {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The key-encryption keys, newest first: new account keys are wrapped by the newest, any of them
/// unwraps what it wrapped.
pub struct KeyRing {
    keks: Vec<Kek>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keks.iter().map(|k| k.id.as_str()).collect();
        write!(f, "KeyRing({ids:?})")
    }
}

impl KeyRing {
    /// Parses `DATA_KEYS`: comma-separated base64 32-byte keys, newest first; whitespace around
    /// each is ignored.
    pub fn parse(list: &str) -> Result<Self, KeyRingError> {
        if list.trim().is_empty() {
            return Err(KeyRingError::Empty);
        }
        let mut keks: Vec<Kek> = vec![];
        for (i, entry) in list.split(',').enumerate() {
            let entry_no = i + 1;
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(KeyRingError::EmptyEntry(entry_no));
            }
            let bytes = Zeroizing::new(
                STANDARD
                    .decode(entry)
                    .map_err(|_| KeyRingError::NotBase64(entry_no))?,
            );
            if bytes.len() != KEY_LEN {
                return Err(KeyRingError::WrongLength {
                    entry: entry_no,
                    len: bytes.len(),
                });
            }
            let id = kek_id(&bytes);
            if keks.iter().any(|k| k.id == id) {
                return Err(KeyRingError::Repeated(entry_no));
            }
            let key: &[u8; KEY_LEN] = bytes.as_slice().try_into().expect("length checked");
            keks.push(Kek {
                id,
                cipher: XChaCha20Poly1305::new(key.into()),
            });
        }
        Ok(Self { keks })
    }

    /// A new random key-encryption key, base64, as `DATA_KEYS` takes it.
    pub fn generate_key() -> String {
        STANDARD.encode(random_key().as_slice())
    }

    /// The id of the newest key: what [`KeyRing::wrap`] uses.
    pub fn newest_id(&self) -> &str {
        &self.keks[0].id
    }

    /// The ids of every key, newest first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keks.iter().map(|k| k.id.as_str())
    }

    /// `key` wrapped by the newest key-encryption key, bound to `account`.
    pub fn wrap(&self, account: Uuid, key: &DataKey) -> WrappedKey {
        let newest = &self.keks[0];
        WrappedKey {
            kek_id: newest.id.clone(),
            bytes: seal_with(&newest.cipher, Aad::Key { account }, key.bytes.as_slice()),
        }
    }

    /// The account key `wrapped` holds, if a key of this ring wrapped it for `account`.
    pub fn unwrap(&self, account: Uuid, wrapped: &WrappedKey) -> Result<DataKey, UnwrapError> {
        let kek = self
            .keks
            .iter()
            .find(|k| k.id == wrapped.kek_id)
            .ok_or_else(|| UnwrapError::UnknownKek(wrapped.kek_id.clone()))?;
        let raw = Zeroizing::new(
            open_with(&kek.cipher, Aad::Key { account }, &wrapped.bytes)
                .map_err(|_| UnwrapError::Tampered(kek.id.clone()))?,
        );
        DataKey::from_bytes(&raw).ok_or_else(|| UnwrapError::Tampered(kek.id.clone()))
    }
}

/// 32 bytes from the operating system's random source.
fn random_key() -> Zeroizing<[u8; KEY_LEN]> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(key.as_mut_slice()).expect("the operating system's random source is available");
    key
}

/// A key-encryption key's id: the first 8 bytes of a SHA-256 of it, in hex. It says which key
/// wrapped what, without revealing the key.
fn kek_id(key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"account-projector key-encryption key id\0")
        .chain_update(key)
        .finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[&str]) -> KeyRing {
        KeyRing::parse(&keys.join(",")).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_its_binding() {
        let key = DataKey::generate();
        let account = Uuid::new_v4();
        let sha = [7u8; 32];
        let sealed = key.seal(
            Aad::Event {
                account,
                sha256: &sha,
            },
            b"{\"event\":\"x\"}",
        );
        assert!(is_sealed(&sealed));
        assert_eq!(sealed.len(), OVERHEAD + 13);
        assert_eq!(
            key.open(
                Aad::Event {
                    account,
                    sha256: &sha
                },
                &sealed
            )
            .unwrap(),
            b"{\"event\":\"x\"}"
        );
        let other_sha = [8u8; 32];
        let cases: [(&str, Result<Vec<u8>, Tampered>); 4] = [
            (
                "another key",
                DataKey::generate().open(
                    Aad::Event {
                        account,
                        sha256: &sha,
                    },
                    &sealed,
                ),
            ),
            (
                "another account",
                key.open(
                    Aad::Event {
                        account: Uuid::new_v4(),
                        sha256: &sha,
                    },
                    &sealed,
                ),
            ),
            (
                "another checksum",
                key.open(
                    Aad::Event {
                        account,
                        sha256: &other_sha,
                    },
                    &sealed,
                ),
            ),
            (
                "another kind of row",
                key.open(Aad::Snapshot { account }, &sealed),
            ),
        ];
        for (case, opened) in &cases {
            assert_eq!(opened, &Err(Tampered), "{case}");
        }
        assert_eq!(cases.len(), 4);
    }

    #[test]
    fn every_altered_byte_fails_authentication() {
        let key = DataKey::generate();
        let account = Uuid::new_v4();
        let sealed = key.seal(Aad::Snapshot { account }, b"Acme Corp employer");
        let mut checked = 0;
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 0x01;
            assert_eq!(
                key.open(Aad::Snapshot { account }, &altered),
                Err(Tampered),
                "byte {i}"
            );
            checked += 1;
        }
        assert_eq!(checked, sealed.len());
        assert_eq!(
            key.open(Aad::Snapshot { account }, &sealed[..sealed.len() - 1]),
            Err(Tampered)
        );
        assert_eq!(key.open(Aad::Snapshot { account }, b""), Err(Tampered));
    }

    #[test]
    fn a_wrapped_key_unwraps_under_any_key_of_the_ring_that_wrapped_it() {
        let old = KeyRing::generate_key();
        let new = KeyRing::generate_key();
        let account = Uuid::new_v4();
        let key = DataKey::generate();
        let sealed = key.seal(Aad::Snapshot { account }, b"payload");
        let wrapped = ring(&[&old]).wrap(account, &key);
        // Rotation: the new key first, the old one still there.
        let rotated = ring(&[&new, &old]);
        let unwrapped = rotated.unwrap(account, &wrapped).unwrap();
        assert_eq!(
            unwrapped.open(Aad::Snapshot { account }, &sealed).unwrap(),
            b"payload"
        );
        let rewrapped = rotated.wrap(account, &unwrapped);
        assert_eq!(rewrapped.kek_id, rotated.newest_id());
        // The old key gone: what it wrapped is lost, what the new one wrapped is not.
        let only_new = ring(&[&new]);
        assert!(matches!(
            only_new.unwrap(account, &wrapped),
            Err(UnwrapError::UnknownKek(_))
        ));
        let again = only_new.unwrap(account, &rewrapped).unwrap();
        assert_eq!(
            again.open(Aad::Snapshot { account }, &sealed).unwrap(),
            b"payload"
        );
        // Bound to its account.
        assert!(matches!(
            only_new.unwrap(Uuid::new_v4(), &rewrapped),
            Err(UnwrapError::Tampered(_))
        ));
    }

    #[test]
    fn data_keys_errors_name_the_entry_never_the_key() {
        let good = KeyRing::generate_key();
        let short = STANDARD.encode([1u8; 16]);
        let cases = [
            ("", KeyRingError::Empty),
            (" , ", KeyRingError::EmptyEntry(1)),
            (&format!("{good},"), KeyRingError::EmptyEntry(2)),
            ("not base64!", KeyRingError::NotBase64(1)),
            (
                &format!("{good},{short}"),
                KeyRingError::WrongLength { entry: 2, len: 16 },
            ),
            (&format!("{good}, {good}"), KeyRingError::Repeated(2)),
        ];
        for (list, expected) in &cases {
            let error = KeyRing::parse(list).unwrap_err();
            assert_eq!(&error, expected, "{list:?}");
            assert!(!error.to_string().contains(&good));
        }
        assert_eq!(cases.len(), 6);
        let parsed = KeyRing::parse(&format!(" {good} ,{}", KeyRing::generate_key())).unwrap();
        assert_eq!(parsed.ids().count(), 2);
        assert!(!format!("{parsed:?}").contains(&good));
        assert_eq!(format!("{:?}", DataKey::generate()), "DataKey(***)");
    }
}
