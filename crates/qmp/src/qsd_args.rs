//! qemu-storage-daemon's option syntax: dotted keys (`driver=file,file.filename=a,,b`, `,,`
//! for a comma in a value) or a JSON object, turned into the object QMP would carry, and the
//! typed reads of its members that accept either form (keyval values are all strings).

use crate::error::QmpError;
use crate::json;
use crate::qdict::{first_unexpected, KeyOrder};
use serde_json::{Map, Value};

/// An option object and how it was written (keyval scalars are strings until read).
#[derive(Debug, Clone)]
pub struct Opts {
    pub map: Map<String, Value>,
    pub keyval: bool,
    /// The dotted path of this object inside the whole option ("" at the root, "file." below).
    pub prefix: String,
    /// The input order of the object's keys (QEMU names a leftover member by it).
    order: KeyOrder,
    /// The members taken so far, in order.
    read: Vec<String>,
}

/// Parses one command-line option value: JSON when it starts with `{`, else dotted keys.
/// `implied` names the key a leading bare value stands for (`socket` in `--chardev socket,..`).
pub fn parse_option(text: &str, implied: Option<&str>) -> Result<Opts, String> {
    if text.trim_start().starts_with('{') {
        // QEMU's JSON parser, with its errors (`JSON parse error, duplicate key`).
        match json::parse_one(text.as_bytes())? {
            (Value::Object(map), order) => Ok(Opts::new(map, false, order)),
            _ => Err("JSON option must be an object".into()),
        }
    } else {
        let (map, order) = parse_keyval_ordered(text, implied)?;
        Ok(Opts::new(map, true, order))
    }
}

/// QEMU's `keyval_parse`: `key=value` pairs split at single commas, dotted keys nest.
pub fn parse_keyval(text: &str, implied: Option<&str>) -> Result<Map<String, Value>, String> {
    parse_keyval_ordered(text, implied).map(|(map, _)| map)
}

/// [`parse_keyval`], with the order in which each object's keys first appeared (the order
/// QEMU adds them to its QDicts).
fn parse_keyval_ordered(
    text: &str,
    implied: Option<&str>,
) -> Result<(Map<String, Value>, KeyOrder), String> {
    let mut root = Map::new();
    let mut order = KeyOrder::default();
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
        insert_dotted(&mut root, &mut order, &key, value)?;
    }
    Ok((root, order))
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

fn insert_dotted(
    root: &mut Map<String, Value>,
    root_order: &mut KeyOrder,
    key: &str,
    value: String,
) -> Result<(), String> {
    let mut map = root;
    let mut order = root_order;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        order.push(part.to_string(), KeyOrder::default());
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
        order = order
            .member_mut(part)
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
    fn new(map: Map<String, Value>, keyval: bool, order: KeyOrder) -> Opts {
        Opts {
            map,
            keyval,
            prefix: String::new(),
            order,
            read: Vec::new(),
        }
    }

    /// Wraps a QMP argument object whose keys came in `order`.
    pub fn qmp(map: Map<String, Value>, order: KeyOrder) -> Opts {
        Opts::new(map, false, order)
    }

    pub fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Takes member `key` out (so that [`Opts::finish`] can report what was left over).
    pub fn take(&mut self, key: &str) -> Option<Value> {
        let value = self.map.remove(key)?;
        self.read.push(key.to_string());
        Some(value)
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

    /// Member `key`'s object `map` (already taken), read with the same mode.
    pub fn child(&self, key: &str, map: Map<String, Value>) -> Opts {
        Opts {
            map,
            keyval: self.keyval,
            prefix: format!("{}{key}.", self.prefix),
            order: self.order.member(key),
            read: Vec::new(),
        }
    }

    /// A nested object member, read with the same mode.
    pub fn object(&mut self, key: &str) -> Result<Option<Opts>, QmpError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(self.child(key, map))),
            Some(_) => Err(invalid_type(&self.full(key), "object")),
        }
    }

    /// Fails on a member nobody read, naming the one QAPI names.
    pub fn finish(&self) -> Result<(), QmpError> {
        let read: Vec<&str> = self.read.iter().map(String::as_str).collect();
        let all: Vec<&str> = read
            .iter()
            .copied()
            .chain(self.map.keys().map(String::as_str))
            .collect();
        match first_unexpected(&self.order.qdict_order_of(&all), &read) {
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
        let mut qmp = Opts::qmp(
            json!({"read-only": "on"}).as_object().unwrap().clone(),
            KeyOrder::default(),
        );
        assert_eq!(
            qmp.bool("read-only").unwrap_err().desc,
            "Invalid parameter type for 'read-only', expected: boolean"
        );
    }

    #[test]
    fn json_options_get_the_monitor_parsers_errors() {
        let error = |text: &str| parse_option(text, None).map(|_| ()).unwrap_err();
        assert_eq!(
            error(r#"{"driver":"file","node-name":"f","node-name":"g"}"#),
            "JSON parse error, duplicate key"
        );
        assert_eq!(error(r#"{"driver":1"#), "JSON parse error, premature EOI");
        assert_eq!(
            error(r#"{"driver":"file"} {}"#),
            "Expecting at most one JSON value"
        );
    }

    /// QSD names `zz` for both forms (`foo` comes first alphabetically).
    #[test]
    fn leftover_option_is_the_one_qsd_names() {
        for text in [
            "driver=file,filename=a.qcow2,node-name=f,zz=1,foo=2",
            r#"{"driver":"file","filename":"a.qcow2","node-name":"f","zz":1,"foo":2}"#,
        ] {
            let mut opts = parse_option(text, None).unwrap();
            for key in ["driver", "filename", "node-name"] {
                opts.take(key);
            }
            assert_eq!(
                opts.finish().unwrap_err().desc,
                "Parameter 'zz' is unexpected",
                "{text}"
            );
        }
    }
}
