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
    /// Any other family (`paystubs.added`, `users.fully_synced`, ...): stored, never folded.
    NotAccountEvent,
}

/// The name of the events the enricher records: `data.resource` is `GET /v2/accounts/{id}`'s answer.
pub const ACCOUNT_FETCHED: &str = "argyle.account_fetched";

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
            other if other.starts_with("accounts.") => Self::OtherAccountEvent,
            _ => Self::NotAccountEvent,
        }
    }

    /// True for every `accounts.*` event and [`ACCOUNT_FETCHED`], the ones the projector folds.
    pub fn is_account_event(self) -> bool {
        self != Self::NotAccountEvent
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

#[derive(Deserialize)]
struct TopProbe<'a> {
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<DataField<'a>>,
}

/// `data` as probed in the same pass as the envelope: the fields we need when it is an object,
/// nothing otherwise (only `accounts.*` events require it to be an object).
enum DataField<'a> {
    Object(DataProbe<'a>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for DataField<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DataVisitor)
    }
}

struct DataVisitor;

impl<'de> serde::de::Visitor<'de> for DataVisitor {
    type Value = DataField<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut probe = DataProbe::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let slot = match key.as_ref() {
                "account" => &mut probe.account,
                "user" => &mut probe.user,
                "resource" => &mut probe.resource,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if slot.replace(map.next_value::<&'de RawValue>()?).is_some() {
                return Err(serde::de::Error::custom("repeated key in data"));
            }
        }
        Ok(DataField::Object(probe))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(DataField::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(DataField::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(DataField::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(DataField::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(DataField::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(DataField::Other)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(DataField::Other)
    }
}

#[derive(Default)]
struct DataProbe<'a> {
    account: Option<&'a RawValue>,
    user: Option<&'a RawValue>,
    resource: Option<&'a RawValue>,
}

impl Envelope {
    /// Parses and validates an untrusted webhook body: UTF-8, JSON, nesting at most [`MAX_DEPTH`],
    /// nothing Postgres `jsonb` cannot hold (see [`unstorable`]), and the envelope fields. This is the check ingest applies before appending.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        let text =
            std::str::from_utf8(body).map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;
        if nesting_depth(text) > MAX_DEPTH {
            return Err(EnvelopeError::InvalidJson(format!(
                "nesting deeper than {MAX_DEPTH} levels"
            )));
        }
        let envelope = Self::probe(text)?;
        if let Some(reason) = unstorable(text) {
            // The projection keeps resources as Postgres `jsonb`: refuse here what it cannot hold,
            // rather than log a body the projector could then never write.
            return Err(EnvelopeError::InvalidPayload {
                field: "body",
                reason,
            });
        }
        Ok(envelope)
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
        let top: TopProbe = serde_json::from_str(text).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => EnvelopeError::InvalidPayload {
                field: "body",
                reason: "repeats a key the envelope needs (event, data, account, user or resource)",
            },
            _ => EnvelopeError::InvalidJson(e.to_string()),
        })?;
        let event = match top.event {
            None => {
                return Err(EnvelopeError::InvalidPayload {
                    field: "event",
                    reason: "is missing",
                });
            }
            Some(raw) => match serde_json::from_str::<String>(raw.get()) {
                Ok(name) if name.is_empty() => {
                    return Err(EnvelopeError::InvalidPayload {
                        field: "event",
                        reason: "is empty",
                    });
                }
                Ok(name) => name,
                Err(_) => {
                    return Err(EnvelopeError::InvalidPayload {
                        field: "event",
                        reason: "is not a string",
                    });
                }
            },
        };
        let data = match top.data {
            Some(DataField::Object(data)) => Some(data),
            Some(DataField::Other) | None => None,
        };
        let (account, user, resource) = match &data {
            Some(d) => (
                d.account,
                d.user,
                d.resource
                    .filter(|r| r.get() != "null")
                    .map(Resource::from_raw),
            ),
            None => (None, None, None),
        };
        let (account, user) = if EventKind::of(&event).is_account_event() {
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
        Some(raw) => match serde_json::from_str::<String>(raw) {
            Ok(s) => Uuid::try_parse(&s).map_err(|_| EnvelopeError::InvalidPayload {
                field,
                reason: "is not a UUID",
            }),
            Err(_) => Err(EnvelopeError::InvalidPayload {
                field,
                reason: "is not a string",
            }),
        },
    }
}

fn optional_uuid(value: Option<&RawValue>) -> Option<Uuid> {
    value
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
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

/// Largest decimal exponent of a number's leading digit that Postgres `numeric` holds (weight
/// 32,767 in base-10,000 digits).
const MAX_NUMERIC_WEIGHT: i64 = 131_071;
/// Most digits after the decimal point that Postgres `numeric` holds.
const MAX_NUMERIC_SCALE: i64 = 16_383;
/// Postgres refuses any exponent this large before looking at the digits.
const MAX_NUMERIC_EXPONENT: i64 = (i32::MAX / 2) as i64;

/// Why valid JSON `text` cannot be stored as Postgres `jsonb`, if it cannot: the escape `\u0000`,
/// an escaped surrogate that is not half of a pair, or a number outside `numeric`'s range. One pass,
/// no tree built.
fn unstorable(text: &str) -> Option<&'static str> {
    const NUL: &str = "contains the character U+0000, which cannot be stored";
    const SURROGATE: &str =
        "contains an escaped surrogate that is not half of a pair, which cannot be stored";
    const NUMBER: &str = "contains a number too large or too precise to be stored";
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                // The previous character was an escaped high surrogate, which must be followed by
                // an escaped low one.
                let mut high = false;
                while i < bytes.len() && bytes[i] != b'"' {
                    let escape = (bytes[i] == b'\\').then(|| bytes.get(i + 1)).flatten();
                    let code = match escape {
                        Some(b'u') => text
                            .get(i + 2..i + 6)
                            .and_then(|hex| u16::from_str_radix(hex, 16).ok()),
                        _ => None,
                    };
                    match code {
                        Some(0) => return Some(NUL),
                        Some(0xD800..=0xDBFF) if !high => high = true,
                        Some(0xDC00..=0xDFFF) if high => high = false,
                        Some(0xD800..=0xDFFF) => return Some(SURROGATE),
                        _ if high => return Some(SURROGATE),
                        _ => {}
                    }
                    i += match (escape, code) {
                        (_, Some(_)) => 6,
                        (Some(_), None) => 2,
                        (None, _) => 1,
                    };
                }
                if high {
                    return Some(SURROGATE);
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let (end, storable) = number_storable(bytes, i);
                if !storable {
                    return Some(NUMBER);
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    None
}

/// Reads the JSON number starting at `start`; returns where it ends and whether Postgres `numeric`
/// holds it (the checks of its `numeric_in`: exponent, leading digit's weight, digits after the
/// point).
fn number_storable(bytes: &[u8], start: usize) -> (usize, bool) {
    let digits = |from: usize| {
        let len = bytes[from..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        (&bytes[from..from + len], from + len)
    };
    let at = start + usize::from(bytes[start] == b'-');
    let (integer, mut at) = digits(at);
    let mut fraction: &[u8] = &[];
    if bytes.get(at) == Some(&b'.') {
        (fraction, at) = digits(at + 1);
    }
    let mut exponent: i64 = 0;
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        let negative = bytes.get(at) == Some(&b'-');
        at += usize::from(matches!(bytes.get(at), Some(b'+' | b'-')));
        let (written, end) = digits(at);
        at = end;
        exponent = written.iter().fold(0i64, |n, d| {
            (n * 10 + i64::from(d - b'0')).min(MAX_NUMERIC_EXPONENT)
        });
        if negative {
            exponent = -exponent;
        }
    }
    let nonzero = |d: &u8| *d != b'0';
    let leading = match (
        integer.iter().position(nonzero),
        fraction.iter().position(nonzero),
    ) {
        (Some(k), _) => Some((integer.len() - k - 1) as i64),
        (None, Some(k)) => Some(-(k as i64) - 1),
        (None, None) => None, // zero: no leading digit
    };
    let storable = exponent.abs() < MAX_NUMERIC_EXPONENT
        && fraction.len() as i64 - exponent <= MAX_NUMERIC_SCALE
        && leading.is_none_or(|weight| weight + exponent <= MAX_NUMERIC_WEIGHT);
    (at, storable)
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
            (br#"{"event":"x.y","data":{"a":"\u0000"}}"#, Some("body")),
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

    /// Each case was checked against Postgres 15: `SELECT '[<value>]'::jsonb`.
    #[test]
    fn what_postgres_jsonb_cannot_hold_is_refused() {
        let cases = [
            ("1e131071", true),
            ("9e131071", true),
            ("1e131072", false),
            ("0.0001e131075", true),
            ("1e-16383", true),
            ("1e-16384", false),
            ("1.5e-16383", false),
            ("0.000001e-16378", false),
            ("1e1000000", false),
            ("0e1000000", true),
            ("0e-1000000", false),
            ("0e99999999999", false),
            ("1E+5", true),
            ("-0", true),
            ("-12.50e-3", true),
            ("123456789012345678901234567890", true),
            (r#""\ud800""#, false),
            (r#""\udc00""#, false),
            (r#""\ud800\udc00""#, true),
            (r#""\uDBFF\uDFFF""#, true),
            (r#""\ud800x""#, false),
            (r#""\ud800\ud800""#, false),
            (r#""\ud800\n""#, false),
            (r#""x\ud800""#, false),
            (r#""\\ud800""#, true),
            (r#""\u00e9\u0041""#, true),
        ];
        for (value, storable) in cases {
            let body = format!(r#"{{"event":"x.y","data":{{"v":[{value}]}}}}"#);
            let parsed = Envelope::parse(body.as_bytes());
            assert_eq!(parsed.is_ok(), storable, "{value}: {parsed:?}");
        }
        // In a key too.
        assert!(Envelope::parse(br#"{"event":"x.y","data":{"\ud800":1}}"#).is_err());
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_not_a_nul() {
        assert!(Envelope::parse(br#"{"event":"x.y","data":{"a":"\\u0000"}}"#).is_ok());
        assert!(Envelope::parse(br#"{"event":"x.y","data":{"a":"\\\u0000"}}"#).is_err());
        assert!(Envelope::parse(br#"{"event":"x.y","data":{"u0000":1}}"#).is_ok());
    }

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
