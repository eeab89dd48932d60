//! Argyle's webhook envelope: `{"event": .., "name": .., "data": {"account", "user", "resource"?, ..}}`.
//!
//! Parsing checks the whole body is JSON but builds no tree: it probes for the few fields the
//! service needs and keeps the resource as raw JSON ([`Resource`]). Unknown fields are not lost: the
//! log keeps the body byte for byte.

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::resource::Resource;

/// Why a webhook body was not accepted as an event. Each maps to one problem code at the HTTP edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The bytes are not a JSON document (syntax, invalid UTF-8, nesting too deep, truncated).
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The JSON is well formed but lacks what every event must carry.
    #[error("{field} {reason}")]
    InvalidPayload {
        /// Dotted path of the offending field, e.g. `data.account`.
        field: &'static str,
        /// What is wrong with it, phrased to follow the field name.
        reason: &'static str,
    },
}

/// The kind of an event, by its `event` name. Only `accounts.*` events are folded into snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    AccountAdded,
    AccountConnected,
    AccountFailed,
    AccountUpdated,
    AccountRemoved,
    /// An `accounts.*` name this version does not know yet: folded like an update.
    OtherAccountEvent,
    /// [`ACCOUNT_FETCHED`]: the account object as fetched from Argyle's API by the enricher, not
    /// received; folded like an update, under the same newer-`updated_at` rule.
    AccountFetched,
    /// [`ACCOUNT_GONE`]: reconcile confirmed that Argyle no longer has the account (not listed,
    /// and `GET /v2/accounts/{id}` answered 404); folded like `accounts.removed`.
    AccountGone,
    /// [`ACCOUNT_ERASED`]: the account's personal data was erased (`account-projector erase`);
    /// folded as terminal over everything, a removal included.
    AccountErased,
    /// Any other family (`paystubs.added`, `users.fully_synced`, ...): stored, never folded.
    NotAccountEvent,
}

/// The name of the events the enricher records: `data.resource` is `GET /v2/accounts/{id}`'s answer.
pub const ACCOUNT_FETCHED: &str = "argyle.account_fetched";

/// The name of the event `reconcile --confirm-removals` records for an account Argyle no longer
/// has: folded as a removal.
pub const ACCOUNT_GONE: &str = "argyle.account_removed";

/// The name of the event `account-projector erase` records: when, why and by whom an account's
/// personal data was erased (its key destroyed), and nothing personal.
pub const ACCOUNT_ERASED: &str = "account_projector.account_erased";

/// The name of the events the enricher records when Argyle answers 404 for an account: kept for
/// the audit trail, never folded.
pub const ACCOUNT_NOT_FOUND: &str = "argyle.account_not_found";

impl EventKind {
    /// Classifies an event name. Unknown names are never an error: Argyle adds them over time.
    pub fn of(name: &str) -> Self {
        match name {
            "accounts.added" => Self::AccountAdded,
            "accounts.connected" => Self::AccountConnected,
            "accounts.failed" => Self::AccountFailed,
            "accounts.updated" => Self::AccountUpdated,
            "accounts.removed" => Self::AccountRemoved,
            ACCOUNT_FETCHED => Self::AccountFetched,
            ACCOUNT_GONE => Self::AccountGone,
            ACCOUNT_ERASED => Self::AccountErased,
            other if other.starts_with("accounts.") => Self::OtherAccountEvent,
            _ => Self::NotAccountEvent,
        }
    }

    /// True for every `accounts.*` event, [`ACCOUNT_FETCHED`], [`ACCOUNT_GONE`] and
    /// [`ACCOUNT_ERASED`], the ones the projector folds.
    pub fn is_folded(self) -> bool {
        self != Self::NotAccountEvent
    }

    /// True for the events only the service itself may append, as answers of Argyle's API: a
    /// webhook of such a name is logged and not folded.
    pub fn speaks_for_argyle_api(self) -> bool {
        matches!(self, Self::AccountFetched | Self::AccountGone)
    }

    /// True for the events only the service's erasure appends: one of another origin is logged
    /// and not folded.
    pub fn is_erasure(self) -> bool {
        self == Self::AccountErased
    }

    /// True for the events that end an account: `accounts.removed`, and [`ACCOUNT_GONE`].
    pub fn is_removal(self) -> bool {
        matches!(self, Self::AccountRemoved | Self::AccountGone)
    }
}

/// What the service needs from one webhook body.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The `event` name as sent.
    pub event: String,
    /// `data.account`: required for `accounts.*`, kept when it is a UUID on other events.
    pub account: Option<Uuid>,
    /// `data.user`: required for `accounts.*`, kept when it is a UUID on other events.
    pub user: Option<Uuid>,
    /// `data.resource` as sent, when present and not `null`.
    pub resource: Option<Resource>,
}

/// The members `names` of a JSON object, as raw JSON, found in one pass without building a tree.
///
/// Keys are read as bytes, so an object whose other keys hold an escaped surrogate that is not half
/// of a pair (valid RFC 8259, which `str` keys refuse) is probed like any other; values other than
/// the wanted ones are skipped unparsed. A wanted member given twice is an error (`repeated`).
pub(crate) struct ObjectProbe<'a, const N: usize> {
    names: [&'static str; N],
    pub(crate) found: [Option<&'a RawValue>; N],
    pub(crate) repeated: bool,
}

impl<'a, const N: usize> ObjectProbe<'a, N> {
    /// Probes `text`, which must be one JSON object and nothing else.
    pub(crate) fn of(text: &'a str, names: [&'static str; N]) -> Result<Self, serde_json::Error> {
        use serde::de::DeserializeSeed;
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let probe = ObjectSeed(names).deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(probe)
    }
}

struct ObjectSeed<const N: usize>([&'static str; N]);

impl<'de, const N: usize> serde::de::DeserializeSeed<'de> for ObjectSeed<N> {
    type Value = ObjectProbe<'de, N>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, const N: usize> serde::de::Visitor<'de> for ObjectSeed<N> {
    type Value = ObjectProbe<'de, N>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut probe = ObjectProbe {
            names: self.0,
            found: [None; N],
            repeated: false,
        };
        while let Some(KeyBytes(key)) = map.next_key::<KeyBytes>()? {
            match probe
                .names
                .iter()
                .position(|name| name.as_bytes() == key.as_slice())
            {
                Some(i) => {
                    if probe.found[i]
                        .replace(map.next_value::<&'de RawValue>()?)
                        .is_some()
                    {
                        probe.repeated = true;
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(probe)
    }
}

/// An object key as the bytes it decodes to (an unpaired surrogate escape becomes its WTF-8 bytes).
struct KeyBytes(Vec<u8>);

impl<'de> Deserialize<'de> for KeyBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(BytesVisitor).map(KeyBytes)
    }
}

struct BytesVisitor;

impl serde::de::Visitor<'_> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(v.to_vec())
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.as_bytes().to_vec())
    }
}

/// The text of a JSON string value, `None` if `raw` is not a string. An escaped surrogate that is
/// not half of a pair and the escape `\u0000`, both valid JSON that Postgres `text` cannot hold,
/// become U+FFFD: the log keeps the body byte for byte, so nothing is lost.
pub(crate) fn string_lossy(raw: &RawValue) -> Option<String> {
    use serde::Deserializer as _;
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    if let Ok(decoded) = serde_json::from_str::<String>(text) {
        return Some(if decoded.contains('\0') {
            decoded.replace('\0', "\u{FFFD}")
        } else {
            decoded
        });
    }
    let bytes = serde_json::Deserializer::from_str(text)
        .deserialize_bytes(BytesVisitor)
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).replace('\0', "\u{FFFD}"))
}

const REPEATED: EnvelopeError = EnvelopeError::InvalidPayload {
    field: "body",
    reason: "repeats a key the envelope needs (event, data, account, user or resource)",
};

impl Envelope {
    /// Parses and validates an untrusted webhook body: UTF-8, JSON, nesting at most [`MAX_DEPTH`],
    /// and the envelope fields. This is the check ingest applies before appending. Nothing else in
    /// the body is judged: a signed delivery with this envelope is logged whatever else it holds.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        let text =
            std::str::from_utf8(body).map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;
        if nesting_depth(text) > MAX_DEPTH {
            return Err(EnvelopeError::InvalidJson(format!(
                "nesting deeper than {MAX_DEPTH} levels"
            )));
        }
        Self::probe(text)
    }

    /// Parses a body read back from the event log. The log holds only bodies that passed
    /// [`Envelope::parse`], so the checks that only guard the log's door are skipped.
    pub fn parse_logged(body: &[u8]) -> Result<Self, EnvelopeError> {
        let text =
            std::str::from_utf8(body).map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;
        Self::probe(text)
    }

    /// Checks the JSON and extracts the envelope fields in one pass over the body (and one more over
    /// the resource). No tree is built.
    fn probe(text: &str) -> Result<Self, EnvelopeError> {
        if !text.trim_start().starts_with('{') {
            serde_json::from_str::<IgnoredAny>(text)
                .map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;
            return Err(EnvelopeError::InvalidPayload {
                field: "event",
                reason: "is missing: the body is not a JSON object",
            });
        }
        let top = ObjectProbe::of(text, ["event", "data"])
            .map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;
        let [event, data] = top.found;
        if top.repeated {
            return Err(REPEATED);
        }
        let event = match event {
            None => {
                return Err(EnvelopeError::InvalidPayload {
                    field: "event",
                    reason: "is missing",
                });
            }
            Some(raw) => match string_lossy(raw) {
                Some(name) if name.is_empty() => {
                    return Err(EnvelopeError::InvalidPayload {
                        field: "event",
                        reason: "is empty",
                    });
                }
                Some(name) => name,
                None => {
                    return Err(EnvelopeError::InvalidPayload {
                        field: "event",
                        reason: "is not a string",
                    });
                }
            },
        };
        // `data` is probed only when it is an object (only `accounts.*` events require one).
        let data = match data.filter(|d| d.get().starts_with('{')) {
            Some(raw) => {
                let probe = ObjectProbe::of(raw.get(), ["account", "user", "resource"])
                    .map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;
                if probe.repeated {
                    return Err(REPEATED);
                }
                Some(probe.found)
            }
            None => None,
        };
        let (account, user, resource) = match data {
            Some([account, user, resource]) => (
                account,
                user,
                resource
                    .filter(|r| r.get() != "null")
                    .map(Resource::from_raw),
            ),
            None => (None, None, None),
        };
        // Ids are required of `accounts.*` events, the ones Argyle sends folded. A webhook named
        // like one of the service's own API answers is logged and not folded, so it needs none.
        let kind = EventKind::of(&event);
        let (account, user) = if kind.is_folded() && !kind.speaks_for_argyle_api() {
            if data.is_none() {
                return Err(EnvelopeError::InvalidPayload {
                    field: "data",
                    reason: "is missing or not an object",
                });
            }
            (
                Some(required_uuid(account, "data.account")?),
                Some(required_uuid(user, "data.user")?),
            )
        } else {
            (optional_uuid(account), optional_uuid(user))
        };
        Ok(Self {
            event,
            account,
            user,
            resource,
        })
    }

    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        EventKind::of(&self.event)
    }
}

fn required_uuid(value: Option<&RawValue>, field: &'static str) -> Result<Uuid, EnvelopeError> {
    match value.map(RawValue::get) {
        None | Some("null") => Err(EnvelopeError::InvalidPayload {
            field,
            reason: "is missing",
        }),
        Some(_) => match value.and_then(string_lossy) {
            Some(s) => Uuid::try_parse(&s).map_err(|_| EnvelopeError::InvalidPayload {
                field,
                reason: "is not a UUID",
            }),
            None => Err(EnvelopeError::InvalidPayload {
                field,
                reason: "is not a string",
            }),
        },
    }
}

fn optional_uuid(value: Option<&RawValue>) -> Option<Uuid> {
    value
        .and_then(string_lossy)
        .and_then(|s| Uuid::try_parse(&s).ok())
}

/// Deepest nesting of arrays and objects accepted, as serde_json's own limit: anything deeper is
/// refused before any recursive parser (ours or Postgres's) sees it.
pub const MAX_DEPTH: usize = 128;

/// How deeply `text` nests arrays and objects (brackets inside strings do not count).
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text.as_bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDED: &[u8] = include_bytes!("../../../tests/fixtures/argyle/01_accounts.added.json");

    #[test]
    fn a_fixture_parses_with_its_ids_and_resource() {
        let envelope = Envelope::parse(ADDED).unwrap();
        assert_eq!(envelope.kind(), EventKind::AccountAdded);
        assert_eq!(
            envelope.account.unwrap().to_string(),
            "0187c66e-e7e5-811c-b006-2232f00f426a"
        );
        assert_eq!(
            envelope.user.unwrap().to_string(),
            "018051aa-f7a9-a0db-2f38-6cfa325e9d69"
        );
        let resource = envelope.resource.unwrap();
        assert_eq!(resource.value()["item"], "item_000012345");
        assert_eq!(resource.connection_status(), Some("connecting"));
    }

    #[test]
    fn other_families_parse_with_optional_ids() {
        let body = br#"{"event":"paystubs.added","data":{"user":"018051aa-f7a9-a0db-2f38-6cfa325e9d69","paystub":"x"},"new":1}"#;
        let envelope = Envelope::parse(body).unwrap();
        assert_eq!(envelope.kind(), EventKind::NotAccountEvent);
        assert_eq!(envelope.account, None);
        assert!(envelope.user.is_some());
        assert_eq!(
            EventKind::of("accounts.refreshed"),
            EventKind::OtherAccountEvent
        );
        let no_data = Envelope::parse(br#"{"event":"users.fully_synced"}"#).unwrap();
        assert_eq!((no_data.account, no_data.user), (None, None));
    }

    #[test]
    fn malformed_bodies_name_the_field() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"{", None),
            (b"", None),
            (b"\xff\xfe", None),
            (b"{\"event\":\"a\"} trailing", None),
            (b"null", Some("event")),
            (b"[]", Some("event")),
            (br#"{"event":1}"#, Some("event")),
            (br#"{"event":""}"#, Some("event")),
            (br#"{"event":"a","event":"b"}"#, Some("body")),
            (br#"{"event":"a","data":{"user":"x","user":"y"}}"#, Some("body")),
            (br#"{"event":"accounts.added"}"#, Some("data")),
            (br#"{"event":"accounts.added","data":[]}"#, Some("data")),
            (br#"{"event":"accounts.added","data":{"user":"018051aa-f7a9-a0db-2f38-6cfa325e9d69"}}"#, Some("data.account")),
            (br#"{"event":"accounts.added","data":{"account":"nope","user":"018051aa-f7a9-a0db-2f38-6cfa325e9d69"}}"#, Some("data.account")),
            (br#"{"event":"accounts.added","data":{"account":"018051aa-f7a9-a0db-2f38-6cfa325e9d69","user":7}}"#, Some("data.user")),
        ];
        for (body, field) in cases {
            match (Envelope::parse(body), field) {
                (Err(EnvelopeError::InvalidJson(_)), None) => {}
                (Err(EnvelopeError::InvalidPayload { field: got, .. }), Some(want)) => {
                    assert_eq!(&got, want)
                }
                (other, _) => panic!("{:?} gave {other:?}", String::from_utf8_lossy(body)),
            }
        }
    }

    /// Valid JSON that Postgres `jsonb` or a `serde_json::Value` cannot hold is still an event: the
    /// log keeps the bytes, the projection keeps the resource as `json` (exact text).
    #[test]
    fn json_that_jsonb_cannot_hold_still_parses() {
        let values = [
            r#""\u0000""#,
            r#""\ud800""#,
            r#""\udc00x""#,
            r#""\ud800\ud800""#,
            "1e131072",
            "1e-16384",
            "1e1000000",
            "123456789012345678901234567890e99999",
        ];
        for value in values {
            let body = format!(
                r#"{{"event":"accounts.updated","data":{{"account":"{ID}","user":"{ID}","resource":{{"id":"x","v":[{value}],"connection":{{"status":"connected"}}}},"n":{value}}}}}"#
            );
            let envelope =
                Envelope::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{value}: {e}"));
            let resource = envelope.resource.unwrap();
            assert!(resource.raw().contains(value), "{value}");
            assert_eq!(resource.connection_status(), Some("connected"), "{value}");
        }
        // In keys too, and in the names the service reads (made storable, the body kept as sent).
        let body = format!(
            r#"{{"event":"accounts.\u0000\ud800","\ud800":1,"data":{{"\udfff":2,"account":"{ID}","user":"{ID}","resource":{{"\ud800":3,"updated_at":"2026-01-01T00:00:00Z","connection":{{"status":"\u0000"}}}}}}}}"#
        );
        let envelope = Envelope::parse(body.as_bytes()).unwrap();
        let name = envelope.event.strip_prefix("accounts.").unwrap();
        assert!(
            !name.is_empty() && name.chars().all(|c| c == '\u{FFFD}'),
            "{name:?}"
        );
        let resource = envelope.resource.unwrap();
        assert!(resource.updated_at().is_some());
        assert_eq!(resource.connection_status(), Some("\u{FFFD}"));
        assert_eq!(values.len(), 8);
    }

    const ID: &str = "018051aa-f7a9-a0db-2f38-6cfa325e9d69";

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let body = "[".repeat(100_000);
        assert!(matches!(
            Envelope::parse(body.as_bytes()),
            Err(EnvelopeError::InvalidJson(_))
        ));
        let nested = |depth| {
            format!(
                "{{\"event\":\"x\",\"data\":{}{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        assert!(matches!(
            Envelope::parse(nested(100_000).as_bytes()),
            Err(EnvelopeError::InvalidJson(_))
        ));
        assert!(matches!(
            Envelope::parse(nested(MAX_DEPTH).as_bytes()),
            Err(EnvelopeError::InvalidJson(_))
        ));
        assert!(Envelope::parse(nested(MAX_DEPTH - 1).as_bytes()).is_ok());
        assert!(Envelope::parse(br#"{"event":"x","data":{"s":"[[[[{{{{\"]]"}}"#).is_ok());
    }
}
