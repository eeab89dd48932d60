//! Argyle's webhook envelope: `{"event": .., "name": .., "data": {"account", "user", "resource"?, ..}}`.

use serde_json::Value;
use uuid::Uuid;

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
    /// Any other family (`paystubs.added`, `users.fully_synced`, ...): stored, never folded.
    NotAccountEvent,
}

impl EventKind {
    /// Classifies an event name. Unknown names are never an error: Argyle adds them over time.
    pub fn of(name: &str) -> Self {
        match name {
            "accounts.added" => Self::AccountAdded,
            "accounts.connected" => Self::AccountConnected,
            "accounts.failed" => Self::AccountFailed,
            "accounts.updated" => Self::AccountUpdated,
            "accounts.removed" => Self::AccountRemoved,
            other if other.starts_with("accounts.") => Self::OtherAccountEvent,
            _ => Self::NotAccountEvent,
        }
    }

    /// True for every `accounts.*` event, the ones the projector folds.
    pub fn is_account_event(self) -> bool {
        self != Self::NotAccountEvent
    }
}

/// One webhook body, parsed. The whole document is kept in [`Envelope::payload`], unknown fields
/// included, so nothing Argyle sent is lost.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The `event` name as sent.
    pub event: String,
    /// `data.account`: required for `accounts.*`, kept when it is a UUID on other events.
    pub account: Option<Uuid>,
    /// `data.user`: required for `accounts.*`, kept when it is a UUID on other events.
    pub user: Option<Uuid>,
    /// The whole parsed document.
    pub payload: Value,
}

impl Envelope {
    /// Parses a raw webhook body.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        let payload: Value =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::InvalidJson(e.to_string()))?;
        Self::from_value(payload)
    }

    /// Validates an already parsed document.
    pub fn from_value(payload: Value) -> Result<Self, EnvelopeError> {
        let Some(object) = payload.as_object() else {
            return Err(EnvelopeError::InvalidPayload {
                field: "event",
                reason: "is missing: the body is not a JSON object",
            });
        };
        let event = match object.get("event") {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            Some(Value::String(_)) => {
                return Err(EnvelopeError::InvalidPayload {
                    field: "event",
                    reason: "is empty",
                });
            }
            Some(_) => {
                return Err(EnvelopeError::InvalidPayload {
                    field: "event",
                    reason: "is not a string",
                });
            }
            None => {
                return Err(EnvelopeError::InvalidPayload {
                    field: "event",
                    reason: "is missing",
                });
            }
        };
        let data = object.get("data");
        let account = data.and_then(|d| d.get("account"));
        let user = data.and_then(|d| d.get("user"));
        let (account, user) = if EventKind::of(&event).is_account_event() {
            if !data.is_some_and(Value::is_object) {
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
        if contains_nul(&payload) {
            // Postgres text and jsonb cannot hold U+0000; refuse it here rather than fail later.
            return Err(EnvelopeError::InvalidPayload {
                field: "body",
                reason: "contains the character U+0000, which cannot be stored",
            });
        }
        Ok(Self {
            event,
            account,
            user,
            payload,
        })
    }

    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        EventKind::of(&self.event)
    }

    /// `data.resource`, when present and not `null`.
    pub fn resource(&self) -> Option<&Value> {
        self.payload
            .get("data")?
            .get("resource")
            .filter(|r| !r.is_null())
    }
}

fn required_uuid(value: Option<&Value>, field: &'static str) -> Result<Uuid, EnvelopeError> {
    match value {
        None | Some(Value::Null) => Err(EnvelopeError::InvalidPayload {
            field,
            reason: "is missing",
        }),
        Some(Value::String(s)) => Uuid::try_parse(s).map_err(|_| EnvelopeError::InvalidPayload {
            field,
            reason: "is not a UUID",
        }),
        Some(_) => Err(EnvelopeError::InvalidPayload {
            field,
            reason: "is not a string",
        }),
    }
}

fn optional_uuid(value: Option<&Value>) -> Option<Uuid> {
    value
        .and_then(Value::as_str)
        .and_then(|s| Uuid::try_parse(s).ok())
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
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
        assert_eq!(envelope.resource().unwrap()["item"], "item_000012345");
        assert_eq!(envelope.payload["name"], "accounts-projector");
    }

    #[test]
    fn unknown_fields_and_families_are_kept() {
        let body = br#"{"event":"paystubs.added","data":{"user":"018051aa-f7a9-a0db-2f38-6cfa325e9d69","paystub":"x"},"new":1}"#;
        let envelope = Envelope::parse(body).unwrap();
        assert_eq!(envelope.kind(), EventKind::NotAccountEvent);
        assert_eq!(envelope.account, None);
        assert!(envelope.user.is_some());
        assert_eq!(envelope.payload["new"], 1);
        assert_eq!(
            EventKind::of("accounts.refreshed"),
            EventKind::OtherAccountEvent
        );
    }

    #[test]
    fn malformed_bodies_name_the_field() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"{", None),
            (b"\xff\xfe", None),
            (b"null", Some("event")),
            (b"[]", Some("event")),
            (br#"{"event":1}"#, Some("event")),
            (br#"{"event":""}"#, Some("event")),
            (br#"{"event":"accounts.added"}"#, Some("data")),
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

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let body = "[".repeat(100_000);
        assert!(matches!(
            Envelope::parse(body.as_bytes()),
            Err(EnvelopeError::InvalidJson(_))
        ));
    }
}
