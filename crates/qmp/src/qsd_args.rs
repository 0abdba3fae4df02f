//! qemu-storage-daemon's option syntax: dotted keys (`driver=file,file.filename=a,,b`, `,,`
//! for a comma in a value) or a JSON object, turned into the object QMP would carry, and the
//! typed reads of its members that accept either form (keyval values are all strings).

use crate::error::QmpError;
use serde_json::{Map, Value};

/// An option object and how it was written (keyval scalars are strings until read).
#[derive(Debug, Clone)]
pub struct Opts {
    pub map: Map<String, Value>,
    pub keyval: bool,
    /// The dotted path of this object inside the whole option ("" at the root, "file." below).
    pub prefix: String,
}

/// Parses one command-line option value: JSON when it starts with `{`, else dotted keys.
/// `implied` names the key a leading bare value stands for (`socket` in `--chardev socket,..`).
pub fn parse_option(text: &str, implied: Option<&str>) -> Result<Opts, String> {
    if text.trim_start().starts_with('{') {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("{e}"))?;
        match value {
            Value::Object(map) => Ok(Opts {
                map,
                keyval: false,
                prefix: String::new(),
            }),
            _ => Err("JSON option must be an object".into()),
        }
    } else {
        Ok(Opts {
            map: parse_keyval(text, implied)?,
            keyval: true,
            prefix: String::new(),
        })
    }
}

/// QEMU's `keyval_parse`: `key=value` pairs split at single commas, dotted keys nest.
pub fn parse_keyval(text: &str, implied: Option<&str>) -> Result<Map<String, Value>, String> {
    let mut root = Map::new();
    let mut rest = text;
    let mut first = true;
    while !rest.is_empty() {
        let key_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let (key, value);
        if rest[key_end..].starts_with('=') {
            key = rest[..key_end].to_string();
            let (v, r) = take_value(&rest[key_end + 1..]);
            value = v;
            rest = r;
        } else if first && implied.is_some() {
            let (v, r) = take_value(rest);
            key = implied.unwrap_or_default().to_string();
            value = v;
            rest = r;
        } else {
            return Err(format!(
                "Expected '=' after parameter '{}'",
                &rest[..key_end]
            ));
        }
        first = false;
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("Invalid parameter '{key}'"));
        }
        insert_dotted(&mut root, &key, value)?;
    }
    Ok(root)
}

/// Reads a value up to a single comma (`,,` is a comma); returns it and what follows.
fn take_value(text: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == ',' {
            if chars.peek().is_some_and(|(_, n)| *n == ',') {
                chars.next();
                value.push(',');
                continue;
            }
            return (value, &text[i + 1..]);
        }
        value.push(c);
    }
    (value, "")
}

fn insert_dotted(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), String> {
    let mut map = root;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            if map.get(part).is_some_and(Value::is_object) {
                return Err(format!("Parameter '{key}' used inconsistently"));
            }
            map.insert(part.to_string(), Value::String(value));
            return Ok(());
        }
        let entry = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        map = entry
            .as_object_mut()
            .ok_or_else(|| format!("Parameter '{key}' used inconsistently"))?;
    }
    Ok(())
}

fn invalid_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl Opts {
    /// Wraps a QMP argument object.
    pub fn qmp(map: Map<String, Value>) -> Opts {
        Opts {
            map,
            keyval: false,
            prefix: String::new(),
        }
    }

    pub fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Takes member `key` out (so that [`Opts::finish`] can report what was left over).
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    pub fn required(&mut self, key: &str) -> Result<Value, QmpError> {
        self.take(key)
            .ok_or_else(|| QmpError::generic(format!("Parameter '{}' is missing", self.full(key))))
    }

    pub fn str(&mut self, key: &str) -> Result<Option<String>, QmpError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid_type(&self.full(key), "string")),
        }
    }

    pub fn req_str(&mut self, key: &str) -> Result<String, QmpError> {
        let value = self.required(key)?;
        value
            .as_str()
            .map(String::from)
            .ok_or_else(|| invalid_type(&self.full(key), "string"))
    }

    pub fn enum_value(&mut self, key: &str, values: &[&str]) -> Result<Option<String>, QmpError> {
        let Some(text) = self.str(key)? else {
            return Ok(None);
        };
        if values.contains(&text.as_str()) {
            Ok(Some(text))
        } else {
            Err(QmpError::generic(format!(
                "Parameter '{}' does not accept value '{text}'",
                self.full(key)
            )))
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, QmpError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if self.keyval => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(QmpError::generic(format!(
                    "Parameter '{}' expects 'on' or 'off'",
                    self.full(key)
                ))),
            },
            Some(_) => Err(invalid_type(&self.full(key), "boolean")),
        }
    }

    pub fn int(&mut self, key: &str) -> Result<Option<i64>, QmpError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
            Some(Value::String(s)) if self.keyval => s.parse().map(Some).map_err(|_| {
                QmpError::generic(format!("Parameter '{}' expects an integer", self.full(key)))
            }),
            Some(_) => Err(invalid_type(&self.full(key), "integer")),
        }
    }

    /// A nested object member, read with the same mode.
    pub fn object(&mut self, key: &str) -> Result<Option<Opts>, QmpError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Opts {
                map,
                keyval: self.keyval,
                prefix: format!("{}{key}.", self.prefix),
            })),
            Some(_) => Err(invalid_type(&self.full(key), "object")),
        }
    }

    /// Fails on the first member nobody read, as QAPI does.
    pub fn finish(&self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(extra) => Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                self.full(extra)
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_keys_nest_and_double_commas_escape() {
        let map = parse_keyval(
            "driver=qcow2,file.driver=file,file.filename=a,,b.img,node-name=x",
            None,
        )
        .unwrap();
        assert_eq!(
            Value::Object(map),
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": "a,b.img"},
                   "node-name": "x"})
        );
    }

    #[test]
    fn implied_key_takes_the_leading_bare_value() {
        let map = parse_keyval(
            "socket,id=m,path=/tmp/q.sock,server=on,wait=off",
            Some("backend"),
        )
        .unwrap();
        assert_eq!(map["backend"], json!("socket"));
        assert_eq!(map["wait"], json!("off"));
    }

    #[test]
    fn bare_key_without_implied_key_is_an_error() {
        assert_eq!(
            parse_keyval("driver=file,bogus", None).unwrap_err(),
            "Expected '=' after parameter 'bogus'"
        );
    }

    #[test]
    fn json_form_keeps_types_and_keyval_reads_on_off() {
        let mut opts = parse_option(r#"{"driver":"raw","read-only":true}"#, None).unwrap();
        assert!(!opts.keyval);
        assert_eq!(opts.bool("read-only").unwrap(), Some(true));
        let mut opts = parse_option("driver=raw,read-only=on", None).unwrap();
        assert_eq!(opts.bool("read-only").unwrap(), Some(true));
        let mut qmp = Opts::qmp(json!({"read-only": "on"}).as_object().unwrap().clone());
        assert_eq!(
            qmp.bool("read-only").unwrap_err().desc,
            "Invalid parameter type for 'read-only', expected: boolean"
        );
    }
}
