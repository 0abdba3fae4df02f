//! Argument checking with QAPI's messages and order: members in their declared order
//! (missing, then wrong type, then bad enum value), then any member left over is unexpected
//! (the one QEMU's hash table yields first, `qdict::first_unexpected`).

use crate::error::QmpError;
use crate::qdict::{first_unexpected, KeyOrder};
use serde_json::{Map, Value};

/// The QAPI type of an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    Str,
    Int,
    Bool,
    Enum(&'static [&'static str]),
    EnumList(&'static [&'static str]),
}

/// One declared member of a command's arguments.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    pub name: &'static str,
    pub ty: ArgType,
    pub required: bool,
}

pub const fn req(name: &'static str, ty: ArgType) -> Member {
    Member {
        name,
        ty,
        required: true,
    }
}

pub const fn opt(name: &'static str, ty: ArgType) -> Member {
    Member {
        name,
        ty,
        required: false,
    }
}

/// Checked arguments; accessors only return values that passed [`check`].
#[derive(Debug, Clone, Default)]
pub struct Args(Map<String, Value>);

/// Checks `args` (whose keys came in `order`) against `members`, in QAPI's order.
pub fn check(
    members: &[Member],
    args: Map<String, Value>,
    order: &KeyOrder,
) -> Result<Args, QmpError> {
    for member in members {
        let Some(value) = args.get(member.name) else {
            if member.required {
                return Err(QmpError::generic(format!(
                    "Parameter '{}' is missing",
                    member.name
                )));
            }
            continue;
        };
        check_type(member.name, member.ty, value)?;
    }
    let read: Vec<&str> = members
        .iter()
        .map(|m| m.name)
        .filter(|name| args.contains_key(*name))
        .collect();
    if let Some(extra) = first_unexpected(&order.qdict_keys(&args), &read) {
        return Err(QmpError::generic(format!(
            "Parameter '{extra}' is unexpected"
        )));
    }
    Ok(Args(args))
}

fn invalid_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn check_enum(name: &str, values: &[&str], value: &Value) -> Result<(), QmpError> {
    let text = value.as_str().ok_or_else(|| invalid_type(name, "string"))?;
    if values.contains(&text) {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Parameter '{name}' does not accept value '{text}'"
        )))
    }
}

fn check_type(name: &str, ty: ArgType, value: &Value) -> Result<(), QmpError> {
    match ty {
        ArgType::Str if !value.is_string() => Err(invalid_type(name, "string")),
        ArgType::Int if value.as_i64().is_none() => Err(invalid_type(name, "integer")),
        ArgType::Bool if !value.is_boolean() => Err(invalid_type(name, "boolean")),
        ArgType::Enum(values) => check_enum(name, values, value),
        ArgType::EnumList(values) => {
            let items = value
                .as_array()
                .ok_or_else(|| invalid_type(name, "array"))?;
            // QEMU names list elements 'null' in this message (observed on QSD 10.0.2).
            items
                .iter()
                .try_for_each(|item| check_enum("null", values, item))
        }
        _ => Ok(()),
    }
}

impl Args {
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(Value::as_str)
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        self.0.get(name).and_then(Value::as_i64)
    }

    pub fn bool(&self, name: &str) -> Option<bool> {
        self.0.get(name).and_then(Value::as_bool)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn str_list(&self, name: &str) -> Vec<&str> {
        self.0
            .get(name)
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ON_ERROR: &[&str] = &["report", "ignore", "enospc", "stop", "auto"];
    const STREAM: &[Member] = &[
        opt("job-id", ArgType::Str),
        req("device", ArgType::Str),
        opt("speed", ArgType::Int),
        opt("on-error", ArgType::Enum(ON_ERROR)),
        opt("auto-finalize", ArgType::Bool),
    ];

    fn message(args: Value) -> String {
        let Value::Object(map) = args else {
            panic!("test arguments must be an object")
        };
        match check(STREAM, map, &KeyOrder::default()) {
            Ok(_) => "ok".into(),
            Err(e) => e.desc,
        }
    }

    #[test]
    fn qapi_messages_in_qapi_order() {
        assert_eq!(message(json!({"foo": 1})), "Parameter 'device' is missing");
        assert_eq!(
            message(json!({"device": "top", "speed": "x", "foo": 1})),
            "Invalid parameter type for 'speed', expected: integer"
        );
        assert_eq!(
            message(json!({"job-id": 1, "speed": "x"})),
            "Invalid parameter type for 'job-id', expected: string"
        );
        assert_eq!(
            message(json!({"device": "top", "foo": 1})),
            "Parameter 'foo' is unexpected"
        );
        assert_eq!(
            message(json!({"device": "top", "on-error": "bogus"})),
            "Parameter 'on-error' does not accept value 'bogus'"
        );
        assert_eq!(
            message(json!({"device": "top", "on-error": 1})),
            "Invalid parameter type for 'on-error', expected: string"
        );
        assert_eq!(
            message(json!({"device": "top", "auto-finalize": "yes"})),
            "Invalid parameter type for 'auto-finalize', expected: boolean"
        );
        assert_eq!(
            message(json!({"device": "top", "speed": 1.0})),
            "Invalid parameter type for 'speed', expected: integer"
        );
        assert_eq!(
            message(json!({"device": "top", "speed": 18446744073709551615u64})),
            "Invalid parameter type for 'speed', expected: integer"
        );
        assert_eq!(
            message(json!({"device": null})),
            "Invalid parameter type for 'device', expected: string"
        );
        assert_eq!(message(json!({"device": "top", "speed": -1})), "ok");
    }
}
