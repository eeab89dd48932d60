//! The account object (`data.resource`), kept as the JSON text Argyle sent.
//!
//! The fold needs only two facts from a resource, `updated_at` and `connection.status`, and keeps
//! only the newest resource of a burst; parsing every refinement into a tree just to drop it would
//! dominate replay time. So a [`Resource`] holds the raw JSON and those two facts, and is turned
//! into a tree only when someone asks ([`Resource::value`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::envelope::{ObjectProbe, string_lossy};
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
    /// `updated_at` is an RFC 3339 instant outside what the store holds (see [`STORABLE_YEARS`]).
    updated_at_out_of_range: bool,
    connection_status: Option<String>,
}

/// The years (in UTC) of an `updated_at` the store can hold: what four RFC 3339 digits can write
/// and Postgres `timestamptz` reads back (it has no year 0 and writes earlier years as BC).
pub const STORABLE_YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

fn is_object(raw: &RawValue) -> bool {
    raw.get().trim_start().starts_with('{')
}

impl Resource {
    /// Wraps a JSON value of any kind; only objects carry `updated_at` and a connection status.
    pub fn from_raw(raw: &RawValue) -> Self {
        let object = is_object(raw);
        let probe = if object {
            ObjectProbe::of(raw.get(), ["updated_at", "connection"]).ok()
        } else {
            None
        };
        let [raw_updated_at, connection] = probe.map(|p| p.found).unwrap_or_default();
        let raw_updated_at = raw_updated_at.filter(|r| r.get() != "null");
        let updated_at_mistyped = raw_updated_at.is_some_and(|r| !r.get().starts_with('"'));
        let parsed = raw_updated_at
            .and_then(string_lossy)
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|t| t.with_timezone(&Utc));
        let updated_at_out_of_range =
            parsed.is_some_and(|t| !STORABLE_YEARS.contains(&chrono::Datelike::year(&t)));
        let updated_at = parsed.filter(|_| !updated_at_out_of_range);
        let connection_status = connection
            .filter(|c| is_object(c))
            .and_then(|c| ObjectProbe::of(c.get(), ["status"]).ok())
            .and_then(|c| c.found[0])
            .and_then(string_lossy);
        Self {
            raw: Arc::from(raw.get()),
            is_object: object,
            updated_at_mistyped,
            updated_at,
            updated_at_out_of_range,
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

    /// The resource as a tree (parsed on each call), or `None` for valid JSON that a tree cannot
    /// hold: a number beyond `f64`, an escaped surrogate that is not half of a pair.
    pub fn try_value(&self) -> Option<Value> {
        serde_json::from_str(&self.raw).ok()
    }

    /// The resource as a tree; JSON a tree cannot hold (see [`Resource::try_value`]) becomes the
    /// string of its text, so this never fails.
    pub fn value(&self) -> Value {
        self.try_value()
            .unwrap_or_else(|| Value::String(self.raw.to_string()))
    }

    /// Whether it is a JSON object, as an account object must be.
    pub fn is_object(&self) -> bool {
        self.is_object
    }

    /// True when `updated_at` is there but is not a string (a number, an object, ...).
    pub fn updated_at_mistyped(&self) -> bool {
        self.updated_at_mistyped
    }

    /// True when `updated_at` is an RFC 3339 instant whose UTC year is outside [`STORABLE_YEARS`].
    pub fn updated_at_out_of_range(&self) -> bool {
        self.updated_at_out_of_range
    }

    /// `updated_at`, when it is an RFC 3339 string of a storable instant.
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
        Arc::ptr_eq(&self.raw, &other.raw)
            || self.raw == other.raw
            || matches!((self.try_value(), other.try_value()), (Some(a), Some(b)) if a == b)
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
