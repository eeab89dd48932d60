//! The account object (`data.resource`), kept as the JSON text Argyle sent.
//!
//! The fold needs only two facts from a resource, `updated_at` and `connection.status`, and keeps
//! only the newest resource of a burst; parsing every refinement into a tree just to drop it would
//! dominate replay time. So a [`Resource`] holds the raw JSON and those two facts, and is turned
//! into a tree only when someone asks ([`Resource::value`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// One account object, as raw JSON plus the facts the fold compares.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Exact JSON text; always valid JSON (it comes from a parsed `RawValue`).
    raw: Arc<str>,
    is_object: bool,
    /// `updated_at` is present but not a string (a string that is not RFC 3339 is merely unparseable).
    updated_at_mistyped: bool,
    updated_at: Option<DateTime<Utc>>,
    connection_status: Option<String>,
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    updated_at: Option<&'a RawValue>,
    #[serde(borrow)]
    connection: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ConnectionProbe<'a> {
    #[serde(borrow)]
    status: Option<&'a RawValue>,
}

fn is_object(raw: &RawValue) -> bool {
    raw.get().trim_start().starts_with('{')
}

fn as_string(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<String>(raw.get()).ok()
}

impl Resource {
    /// Wraps a JSON value of any kind; only objects carry `updated_at` and a connection status.
    pub fn from_raw(raw: &RawValue) -> Self {
        let object = is_object(raw);
        let probe = if object {
            serde_json::from_str::<Probe>(raw.get()).ok()
        } else {
            None
        };
        let raw_updated_at = probe
            .as_ref()
            .and_then(|p| p.updated_at)
            .filter(|r| r.get() != "null");
        let updated_at_mistyped = raw_updated_at.is_some_and(|r| !r.get().starts_with('"'));
        let updated_at = raw_updated_at
            .and_then(as_string)
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|t| t.with_timezone(&Utc));
        let connection_status = probe
            .and_then(|p| p.connection)
            .filter(|c| is_object(c))
            .and_then(|c| serde_json::from_str::<ConnectionProbe>(c.get()).ok())
            .and_then(|c| c.status)
            .and_then(as_string);
        Self {
            raw: Arc::from(raw.get()),
            is_object: object,
            updated_at_mistyped,
            updated_at,
            connection_status,
        }
    }

    /// Parses JSON text (as stored); `None` if it is not JSON.
    pub fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str::<&RawValue>(text)
            .ok()
            .map(Self::from_raw)
    }

    /// The JSON text.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The resource as a tree (parsed on each call).
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.raw).expect("a Resource holds valid JSON")
    }

    /// Whether it is a JSON object, as an account object must be.
    pub fn is_object(&self) -> bool {
        self.is_object
    }

    /// True when `updated_at` is there but is not a string (a number, an object, ...).
    pub fn updated_at_mistyped(&self) -> bool {
        self.updated_at_mistyped
    }

    /// `updated_at`, when it is an RFC 3339 string.
    pub fn updated_at(&self) -> Option<DateTime<Utc>> {
        self.updated_at
    }

    /// `connection.status`, when it is a string.
    pub fn connection_status(&self) -> Option<&str> {
        self.connection_status.as_deref()
    }
}

/// Equal when the JSON is equal, whatever the formatting or key order.
impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.raw, &other.raw) || self.raw == other.raw || self.value() == other.value()
    }
}

impl Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.raw).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Ok(Self::from_raw(&raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_probed_and_equality_ignores_formatting() {
        let a = Resource::from_json(r#"{"updated_at": "2026-03-02T15:04:11.120455Z", "connection": {"status": "connected"}, "x": [1]}"#).unwrap();
        assert!(a.is_object());
        assert_eq!(
            a.updated_at().unwrap().to_rfc3339(),
            "2026-03-02T15:04:11.120455+00:00"
        );
        assert_eq!(a.connection_status(), Some("connected"));
        let b = Resource::from_json(r#"{"x":[1],"connection":{"status":"connected"},"updated_at":"2026-03-02T15:04:11.120455Z"}"#).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, Resource::from_json(r#"{"x":[2]}"#).unwrap());
        let odd = Resource::from_json(r#"{"updated_at": 12, "connection": "up"}"#).unwrap();
        assert_eq!((odd.updated_at(), odd.connection_status()), (None, None));
        assert!(odd.updated_at_mistyped());
        let unparseable = Resource::from_json(r#"{"updated_at": "soon"}"#).unwrap();
        assert!(!unparseable.updated_at_mistyped() && unparseable.updated_at().is_none());
        assert!(
            !Resource::from_json(r#"{"updated_at": null}"#)
                .unwrap()
                .updated_at_mistyped()
        );
        assert!(!Resource::from_json(r#""text""#).unwrap().is_object());
        assert_eq!(serde_json::to_string(&a).unwrap(), a.raw());
    }
}
