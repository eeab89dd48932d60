//! What an event changed, field by field, for a person: every leaf of the resource before and
//! after (`connection.status`, `employers[0]`), compared. The API's `changes` answer the same
//! question as RFC 6902 patches, for programs.

use std::collections::BTreeMap;

use serde_json::Value;

/// The longest value shown in full; longer ones are cut, with an ellipsis.
const SHOWN_CHARS: usize = 160;

/// One field that an event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldChange {
    /// `connection.status`, `employers[0]`; `(resource)` for a resource that is not an object.
    pub(crate) field: String,
    /// As shown; `None` when the field was added.
    pub(crate) old: Option<String>,
    /// As shown; `None` when the field was removed.
    pub(crate) new: Option<String>,
}

/// The fields that differ between `before` and `after` (either may be absent), in field order.
pub(crate) fn field_changes(before: Option<&Value>, after: Option<&Value>) -> Vec<FieldChange> {
    let mut old = BTreeMap::new();
    let mut new = BTreeMap::new();
    if let Some(before) = before {
        leaves(before, String::new(), &mut old);
    }
    if let Some(after) = after {
        leaves(after, String::new(), &mut new);
    }
    let mut fields: Vec<&String> = old.keys().chain(new.keys()).collect();
    fields.sort();
    fields.dedup();
    fields
        .into_iter()
        .filter_map(|field| {
            let (o, n) = (old.get(field), new.get(field));
            (o != n).then(|| FieldChange {
                field: if field.is_empty() {
                    "(resource)".into()
                } else {
                    field.clone()
                },
                old: o.map(|v| shown(v)),
                new: n.map(|v| shown(v)),
            })
        })
        .collect()
}

/// Every scalar (and every empty object or array) under `value`, by its path.
fn leaves<'a>(value: &'a Value, path: String, out: &mut BTreeMap<String, &'a Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                leaves(child, path, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, child) in items.iter().enumerate() {
                leaves(child, format!("{path}[{i}]"), out);
            }
        }
        _ => {
            out.insert(path, value);
        }
    }
}

/// A value as a person reads it: strings without quotes (an empty one as `""`), the rest as JSON.
fn shown(value: &Value) -> String {
    let text = match value {
        Value::String(s) if !s.is_empty() => s.clone(),
        other => other.to_string(),
    };
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn change(field: &str, old: Option<&str>, new: Option<&str>) -> FieldChange {
        FieldChange {
            field: field.into(),
            old: old.map(Into::into),
            new: new.map(Into::into),
        }
    }

    #[test]
    fn each_changed_leaf_is_one_line_from_old_to_new() {
        let cases = [
            (
                Some(json!({"connection": {"status": "connecting", "error_code": null}})),
                Some(json!({"connection": {"status": "connected", "error_code": null}})),
                vec![change(
                    "connection.status",
                    Some("connecting"),
                    Some("connected"),
                )],
            ),
            (
                None,
                Some(json!({"id": "a", "employers": ["Uber"]})),
                vec![
                    change("employers[0]", None, Some("Uber")),
                    change("id", None, Some("a")),
                ],
            ),
            (
                Some(json!({"employers": ["Uber", "Lyft"], "n": 1})),
                Some(json!({"employers": ["Uber"], "n": 1.5})),
                vec![
                    change("employers[1]", Some("Lyft"), None),
                    change("n", Some("1"), Some("1.5")),
                ],
            ),
            (
                Some(json!({"a": {}, "b": ""})),
                Some(json!({"a": {"x": true}, "b": null})),
                vec![
                    change("a", Some("{}"), None),
                    change("a.x", None, Some("true")),
                    change("b", Some("\"\""), Some("null")),
                ],
            ),
            (Some(json!({"same": 1})), Some(json!({"same": 1})), vec![]),
            (
                Some(json!("x")),
                Some(json!(["y"])),
                vec![
                    change("(resource)", Some("x"), None),
                    change("[0]", None, Some("y")),
                ],
            ),
        ];
        let mut ran = 0;
        for (before, after, expected) in cases {
            assert_eq!(
                field_changes(before.as_ref(), after.as_ref()),
                expected,
                "{before:?} -> {after:?}"
            );
            ran += 1;
        }
        assert_eq!(ran, 6);
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        let long = "é".repeat(SHOWN_CHARS + 10);
        let changes = field_changes(None, Some(&json!({ "k": long })));
        let shown = changes[0].new.as_deref().unwrap();
        assert_eq!(shown.chars().count(), SHOWN_CHARS + 1);
        assert!(shown.ends_with('…'));
    }
}
