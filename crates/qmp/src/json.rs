//! JSON as QEMU's monitor reads and writes it: a tokenizer that splits a byte stream into
//! values the way QEMU's json-lexer/json-streamer do (a value is complete when its brackets
//! balance; QEMU's error texts; single-quoted strings accepted), a parser for one value that
//! also keeps each object's key order (see [`KeyOrder`]), and the output format
//! (`{"a": 1, "b": [2, 3]}`, non-ASCII escaped as `\uXXXX`, doubles as `%.17g`).

use crate::qdict::KeyOrder;
use serde::Serialize;
use serde_json::{Map, Number, Value};

/// Deepest nesting of `{`/`[` QEMU accepts (json-streamer.c MAX_NESTING).
pub const MAX_NESTING: usize = 1 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    kind: TokenKind,
    text: Vec<u8>,
}

/// What the lexer is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LexState {
    Start,
    /// Inside a string; `escape` after a backslash.
    Str {
        quote: u8,
        escape: bool,
    },
    /// `-` seen.
    Minus,
    Zero,
    Digits,
    /// `.` seen, a digit must follow.
    Dot,
    Fraction,
    /// `e` seen.
    Exp,
    /// `e+`/`e-` seen.
    ExpSign,
    ExpDigits,
    Keyword,
    /// After a lexical error: skip to a structural or control character.
    Recovery,
}

/// One complete input value with the key order of its objects, or the error QEMU answers for
/// it.
pub type Parsed = Result<(Value, KeyOrder), String>;

/// Splits a byte stream into JSON values as they complete.
#[derive(Debug)]
pub struct Streamer {
    state: LexState,
    token: Vec<u8>,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
    /// Bytes held for the value being assembled (tokens plus the token in progress).
    buffered: usize,
}

impl Default for Streamer {
    fn default() -> Self {
        Self::new()
    }
}

impl Streamer {
    pub fn new() -> Self {
        Streamer {
            state: LexState::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
            buffered: 0,
        }
    }

    /// Bytes held for the value being assembled.
    pub fn buffered(&self) -> usize {
        self.buffered + self.token.len()
    }

    /// Feeds bytes; every value (or error) completed by them is pushed to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Parsed>) {
        for &byte in bytes {
            self.feed_byte(byte, out);
        }
    }

    /// Ends the input, as QEMU's `json_lexer_flush()`: a number or keyword in progress ends,
    /// any other unfinished token is stray, and a value left open is parsed as it is
    /// (`premature EOI`).
    pub fn finish(&mut self, out: &mut Vec<Parsed>) {
        use LexState::*;
        match self.state {
            Start | Recovery => {}
            Zero | Digits => {
                self.emit(TokenKind::Integer, out);
            }
            Fraction | ExpDigits => {
                self.emit(TokenKind::Float, out);
            }
            Keyword => {
                self.emit(TokenKind::Keyword, out);
            }
            Str { .. } | Minus | Dot | Exp | ExpSign => self.lex_error(out),
        }
        self.state = Start;
        if !self.tokens.is_empty() {
            let tokens = std::mem::take(&mut self.tokens);
            self.reset();
            out.push(parse_tokens(&tokens));
        }
    }

    fn feed_byte(&mut self, byte: u8, out: &mut Vec<Parsed>) {
        // A byte may end the token in progress without being part of it (lookahead); it is
        // then looked at again from the start state.
        loop {
            match self.step(byte, out) {
                Step::Consumed => return,
                Step::Again => continue,
            }
        }
    }

    fn step(&mut self, byte: u8, out: &mut Vec<Parsed>) -> Step {
        use LexState::*;
        match self.state {
            Start => {
                let single = match byte {
                    b'{' => Some(TokenKind::LCurly),
                    b'}' => Some(TokenKind::RCurly),
                    b'[' => Some(TokenKind::LSquare),
                    b']' => Some(TokenKind::RSquare),
                    b':' => Some(TokenKind::Colon),
                    b',' => Some(TokenKind::Comma),
                    _ => None,
                };
                if let Some(kind) = single {
                    self.token.push(byte);
                    self.emit(kind, out);
                    return Step::Consumed;
                }
                self.state = match byte {
                    b' ' | b'\t' | b'\r' | b'\n' => return Step::Consumed,
                    b'"' | b'\'' => Str {
                        quote: byte,
                        escape: false,
                    },
                    b'0' => Zero,
                    b'1'..=b'9' => Digits,
                    b'-' => Minus,
                    b'a'..=b'z' => Keyword,
                    _ => {
                        self.token.push(byte);
                        self.lex_error(out);
                        return Step::Consumed;
                    }
                };
                self.token.push(byte);
                Step::Consumed
            }
            Str { quote, escape } => {
                if !(0x20..=0xfd).contains(&byte) {
                    self.token.push(byte);
                    self.lex_error(out);
                    return Step::Consumed;
                }
                self.token.push(byte);
                if escape {
                    self.state = Str {
                        quote,
                        escape: false,
                    };
                } else if byte == b'\\' {
                    self.state = Str {
                        quote,
                        escape: true,
                    };
                } else if byte == quote {
                    self.emit(TokenKind::String, out);
                }
                Step::Consumed
            }
            Minus => match byte {
                b'0' => self.push_state(byte, Zero),
                b'1'..=b'9' => self.push_state(byte, Digits),
                _ => self.fail(byte, out),
            },
            Zero => match byte {
                b'.' => self.push_state(byte, Dot),
                b'0'..=b'9' => self.fail(byte, out),
                _ => self.end_token(TokenKind::Integer, out),
            },
            Digits => match byte {
                b'0'..=b'9' => self.push_state(byte, Digits),
                b'.' => self.push_state(byte, Dot),
                b'e' | b'E' => self.push_state(byte, Exp),
                _ => self.end_token(TokenKind::Integer, out),
            },
            Dot => match byte {
                b'0'..=b'9' => self.push_state(byte, Fraction),
                _ => self.fail(byte, out),
            },
            Fraction => match byte {
                b'0'..=b'9' => self.push_state(byte, Fraction),
                b'e' | b'E' => self.push_state(byte, Exp),
                _ => self.end_token(TokenKind::Float, out),
            },
            Exp => match byte {
                b'+' | b'-' => self.push_state(byte, ExpSign),
                b'0'..=b'9' => self.push_state(byte, ExpDigits),
                _ => self.fail(byte, out),
            },
            ExpSign => match byte {
                b'0'..=b'9' => self.push_state(byte, ExpDigits),
                _ => self.fail(byte, out),
            },
            ExpDigits => match byte {
                b'0'..=b'9' => self.push_state(byte, ExpDigits),
                _ => self.end_token(TokenKind::Float, out),
            },
            Keyword => match byte {
                b'a'..=b'z' => self.push_state(byte, Keyword),
                _ => self.end_token(TokenKind::Keyword, out),
            },
            Recovery => match byte {
                b'{' | b'}' | b'[' | b']' | b':' | b',' | 0..=0x1f | 0xfe | 0xff
                    if byte != b'\t' =>
                {
                    self.state = Start;
                    Step::Again
                }
                _ => Step::Consumed,
            },
        }
    }

    fn push_state(&mut self, byte: u8, state: LexState) -> Step {
        self.token.push(byte);
        self.state = state;
        Step::Consumed
    }

    fn fail(&mut self, byte: u8, out: &mut Vec<Parsed>) -> Step {
        self.token.push(byte);
        self.lex_error(out);
        Step::Consumed
    }

    /// The token ended before `byte`, which is looked at again.
    fn end_token(&mut self, kind: TokenKind, out: &mut Vec<Parsed>) -> Step {
        self.emit(kind, out);
        Step::Again
    }

    fn lex_error(&mut self, out: &mut Vec<Parsed>) {
        // QEMU prints the token with `%s`: it ends at a NUL byte.
        let shown = self.token.split(|&b| b == 0).next().unwrap_or_default();
        let text = lossy(shown);
        self.token.clear();
        self.state = LexState::Recovery;
        self.reset();
        out.push(Err(format!("JSON parse error, stray '{text}'")));
    }

    fn reset(&mut self) {
        self.tokens.clear();
        self.braces = 0;
        self.brackets = 0;
        self.buffered = 0;
    }

    fn emit(&mut self, kind: TokenKind, out: &mut Vec<Parsed>) {
        self.state = LexState::Start;
        let text = std::mem::take(&mut self.token);
        match kind {
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            _ => {}
        }
        if self.braces + self.brackets > MAX_NESTING as i64 {
            self.reset();
            out.push(Err("JSON nesting depth limit exceeded".into()));
            return;
        }
        self.buffered += text.len() + 1;
        self.tokens.push(Token { kind, text });
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let tokens = std::mem::take(&mut self.tokens);
        self.reset();
        out.push(parse_tokens(&tokens));
    }
}

enum Step {
    Consumed,
    Again,
}

/// Parses `text` as exactly one JSON value, as QEMU's `qobject_from_json()` (command-line
/// options in JSON): the first error wins, a second value is an error.
pub fn parse_one(text: &[u8]) -> Parsed {
    let mut streamer = Streamer::new();
    let mut out = Vec::new();
    streamer.feed(text, &mut out);
    streamer.finish(&mut out);
    let mut values = out.into_iter();
    let first = values
        .next()
        .unwrap_or_else(|| Err("Expecting a JSON value".into()))?;
    match values.next() {
        None => Ok(first),
        Some(_) => Err("Expecting at most one JSON value".into()),
    }
}

/// Parses one complete value from its tokens, with QEMU's error texts.
fn parse_tokens(tokens: &[Token]) -> Parsed {
    let mut parser = Parser { tokens, at: 0 };
    parser
        .value()
        .map_err(|message| format!("JSON parse error, {message}"))
}

struct Parser<'a> {
    tokens: &'a [Token],
    at: usize,
}

impl Parser<'_> {
    fn next(&mut self) -> Result<&Token, String> {
        let token = self.tokens.get(self.at).ok_or("premature EOI")?;
        self.at += 1;
        Ok(token)
    }

    fn peek(&self) -> Result<&Token, String> {
        self.tokens
            .get(self.at)
            .ok_or_else(|| "premature EOI".into())
    }

    fn value(&mut self) -> Result<(Value, KeyOrder), String> {
        let token = self.peek()?.clone();
        let plain = |value| Ok((value, KeyOrder::default()));
        match token.kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::String => {
                self.at += 1;
                plain(Value::String(parse_string(&token.text)?))
            }
            TokenKind::Integer | TokenKind::Float => {
                self.at += 1;
                plain(parse_number(&token))
            }
            TokenKind::Keyword => {
                self.at += 1;
                match &token.text[..] {
                    b"true" => plain(Value::Bool(true)),
                    b"false" => plain(Value::Bool(false)),
                    b"null" => plain(Value::Null),
                    other => Err(format!(
                        "invalid keyword '{}'",
                        String::from_utf8_lossy(other)
                    )),
                }
            }
            _ => Err("expecting value".into()),
        }
    }

    fn object(&mut self) -> Result<(Value, KeyOrder), String> {
        self.at += 1;
        let mut map = Map::new();
        let mut order = KeyOrder::default();
        if self.peek()?.kind == TokenKind::RCurly {
            self.at += 1;
            return Ok((Value::Object(map), order));
        }
        loop {
            let key = match self.value()?.0 {
                Value::String(key) => key,
                _ => return Err("key is not a string in object".into()),
            };
            if self.next()?.kind != TokenKind::Colon {
                return Err("missing : in object pair".into());
            }
            let (value, member_order) = self.value()?;
            // QEMU checks after parsing the value, so errors inside it come first.
            if map.contains_key(&key) {
                return Err("duplicate key".into());
            }
            order.push(key.clone(), member_order);
            map.insert(key, value);
            match self.next()?.kind {
                TokenKind::RCurly => return Ok((Value::Object(map), order)),
                TokenKind::Comma => {}
                _ => return Err("expected separator in dict".into()),
            }
        }
    }

    fn array(&mut self) -> Result<(Value, KeyOrder), String> {
        self.at += 1;
        let mut list = Vec::new();
        if self.peek()?.kind == TokenKind::RSquare {
            self.at += 1;
            return Ok((Value::Array(list), KeyOrder::default()));
        }
        let mut items = Vec::new();
        loop {
            let (item, order) = self.value()?;
            list.push(item);
            items.push(order);
            match self.next()?.kind {
                TokenKind::RSquare => return Ok((Value::Array(list), KeyOrder::array(items))),
                TokenKind::Comma => {}
                _ => return Err("expected separator in list".into()),
            }
        }
    }
}

/// Integers as i64 if they fit, else (unsigned) u64, else a double; other numbers as doubles
/// (QEMU's `parse_literal()` and `QNum`).
fn parse_number(token: &Token) -> Value {
    let text = String::from_utf8_lossy(&token.text);
    if token.kind == TokenKind::Integer {
        if let Ok(v) = text.parse::<i64>() {
            return Value::Number(v.into());
        }
        if let Ok(v) = text.parse::<u64>() {
            return Value::Number(v.into());
        }
    }
    let v: f64 = text.parse().unwrap_or(f64::NAN);
    // JSON cannot carry inf; QEMU would print `inf` (docs/qmp.md). The clamp keeps the value a
    // number.
    Number::from_f64(v.clamp(f64::MIN, f64::MAX))
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// QEMU's `is_valid_codepoint()`: Unicode scalar values that are not noncharacters.
fn is_valid_codepoint(cp: u32) -> bool {
    let noncharacter = (0xFDD0..=0xFDEF).contains(&cp) || cp & 0xFFFE == 0xFFFE;
    cp <= 0x10FFFF && !noncharacter && !(0xD800..=0xDFFF).contains(&cp)
}

/// QEMU's `mod_utf8_codepoint()`: the code point of the sequence at the start of `bytes`, and
/// how many bytes the sequence takes (at least one unless `bytes` is empty or starts with
/// NUL). Modified UTF-8: `C0 80` is U+0000; other overlong forms, surrogates, noncharacters
/// and code points beyond U+10FFFF are invalid.
fn mod_utf8_codepoint(bytes: &[u8]) -> (Option<u32>, usize) {
    const MIN_CODEPOINT: [u32; 5] = [0x80, 0x800, 0x10000, 0x20_0000, 0x400_0000];
    let first = match bytes.first() {
        None | Some(0) => return (None, 0),
        Some(&b) => b,
    };
    if first < 0x80 {
        return (Some(u32::from(first)), 1);
    }
    if first >= 0xFE || first & 0x40 == 0 {
        return (None, 1);
    }
    let len = first.leading_ones() as usize;
    let mut cp = u32::from(first) & ((0x80 >> len) - 1);
    for i in 1..len {
        // Past the end reads as the C string's terminating NUL.
        let byte = bytes.get(i).copied().unwrap_or(0);
        if byte & 0xC0 != 0x80 {
            return (None, i);
        }
        cp = (cp << 6) | u32::from(byte & 0x3F);
    }
    let overlong = cp < MIN_CODEPOINT[len - 2] && !(cp == 0 && len == 2);
    if !is_valid_codepoint(cp) || overlong {
        return (None, len);
    }
    (Some(cp), len)
}

/// Text as QEMU's JSON writer shows bytes that may not be valid: each invalid sequence (as
/// [`mod_utf8_codepoint`] delimits it) becomes one U+FFFD.
fn lossy(bytes: &[u8]) -> String {
    let mut text = String::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (cp, len) = mod_utf8_codepoint(rest);
        text.push(cp.and_then(char::from_u32).unwrap_or('\u{FFFD}'));
        rest = &rest[len.max(1).min(rest.len())..];
    }
    text
}

/// QEMU's `cvt4hex()`: four hex digits at `at`, or `None`.
fn hex4(token: &[u8], at: usize) -> Option<u32> {
    (0..4).try_fold(0u32, |cp, i| {
        let digit = char::from(token.get(at + i).copied()?).to_digit(16)?;
        Some(cp << 4 | digit)
    })
}

/// Unquotes a string token (either quote style) as QEMU's `parse_string()` does: escapes,
/// surrogate pairs, and raw bytes in modified UTF-8.
fn parse_string(token: &[u8]) -> Result<String, String> {
    // The lexer ends a string token with its closing quote.
    let end = token.len().saturating_sub(1);
    let mut text = String::new();
    let mut i = 1;
    while i < end {
        if token[i] != b'\\' {
            let (cp, len) = mod_utf8_codepoint(&token[i..end]);
            let c = cp.and_then(char::from_u32);
            text.push(c.ok_or_else(|| "invalid UTF-8 sequence in string".to_string())?);
            i += len;
            continue;
        }
        let escape_start = i;
        let escaped = token.get(i + 1).copied().unwrap_or(0);
        i += 2;
        let plain = match escaped {
            b'"' => '"',
            b'\'' => '\'',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let mut cp = hex4(token, i);
                i += 4;
                if let Some(high @ 0xD800..=0xDBFF) = cp {
                    if token.get(i) == Some(&b'\\') && token.get(i + 1) == Some(&b'u') {
                        cp = match hex4(token, i + 2) {
                            Some(low @ 0xDC00..=0xDFFF) => {
                                i += 6;
                                Some(0x10000 + ((high & 0x3FF) << 10) + (low & 0x3FF))
                            }
                            _ => None,
                        };
                    }
                }
                match cp
                    .filter(|&cp| is_valid_codepoint(cp))
                    .and_then(char::from_u32)
                {
                    Some(c) => c,
                    None => {
                        // QEMU shows the escape as written, up to where it stopped reading
                        // (four characters on, even past the closing quote).
                        let shown = &token[escape_start..i.min(token.len())];
                        return Err(format!("{} is not a valid Unicode character", lossy(shown)));
                    }
                }
            }
            _ => return Err("invalid escape sequence in string".into()),
        };
        text.push(plain);
    }
    Ok(text)
}

/// A double as QEMU's JSON writer prints it: `printf("%.17g")` (which is not always JSON:
/// QEMU prints infinities as `inf`; our values are finite, see [`parse_number`]).
pub fn format_double(v: f64) -> String {
    const PRECISION: i32 = 17;
    if !v.is_finite() {
        return if v.is_nan() {
            "nan"
        } else if v > 0.0 {
            "inf"
        } else {
            "-inf"
        }
        .into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // 17 significant digits, correctly rounded (ties to even, as glibc).
    let scientific = format!("{:.*e}", PRECISION as usize - 1, v);
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if !(-4..PRECISION).contains(&exponent) {
        let (lead, rest) = digits.split_at(1);
        let rest = rest.trim_end_matches('0');
        let dot = if rest.is_empty() { "" } else { "." };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        return format!("{sign}{lead}{dot}{rest}e{exp_sign}{:02}", exponent.abs());
    }
    let (int_part, frac_part) = if exponent >= 0 {
        let (int_part, frac) = digits.split_at(exponent as usize + 1);
        (int_part.to_string(), frac.to_string())
    } else {
        let zeros = "0".repeat((-exponent - 1) as usize);
        ("0".to_string(), format!("{zeros}{digits}"))
    };
    let frac_part = frac_part.trim_end_matches('0');
    let dot = if frac_part.is_empty() { "" } else { "." };
    format!("{sign}{int_part}{dot}{frac_part}")
}

/// Writes JSON as QEMU does: `": "` and `", "` separators, everything outside ASCII
/// printable escaped as `\uXXXX` (upper-case hex, surrogate pairs above U+FFFF).
struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_f64<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: f64,
    ) -> std::io::Result<()> {
        writer.write_all(format_double(value).as_bytes())
    }

    /// Control characters other than `\b\f\n\r\t` as `\u%04X` (serde_json writes lower-case
    /// hex).
    fn write_char_escape<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        escape: serde_json::ser::CharEscape,
    ) -> std::io::Result<()> {
        use serde_json::ser::CharEscape::*;
        let short = match escape {
            Quote => b'"',
            ReverseSolidus => b'\\',
            Solidus => b'/',
            Backspace => b'b',
            FormFeed => b'f',
            LineFeed => b'n',
            CarriageReturn => b'r',
            Tab => b't',
            AsciiControl(byte) => return write!(writer, "\\u{byte:04X}"),
        };
        writer.write_all(&[b'\\', short])
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() && !c.is_ascii_control() {
                writer.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04X}")?;
                }
            }
        }
        Ok(())
    }
}

/// A parsed value that serializes its objects' members in QDict order.
struct InQDictOrder<'a> {
    value: &'a Value,
    order: &'a KeyOrder,
}

impl Serialize for InQDictOrder<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        let unknown = KeyOrder::default();
        match self.value {
            Value::Object(map) => {
                let mut out = serializer.serialize_map(Some(map.len()))?;
                for key in self.order.qdict_keys(map) {
                    let order = self.order.member_order(key).unwrap_or(&unknown);
                    out.serialize_entry(
                        key,
                        &InQDictOrder {
                            value: &map[key],
                            order,
                        },
                    )?;
                }
                out.end()
            }
            Value::Array(items) => {
                let mut out = serializer.serialize_seq(Some(items.len()))?;
                for (i, value) in items.iter().enumerate() {
                    let order = self.order.item(i).unwrap_or(&unknown);
                    out.serialize_element(&InQDictOrder { value, order })?;
                }
                out.end()
            }
            other => other.serialize(serializer),
        }
    }
}

/// JSON text, already serialized in QEMU's format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json(pub String);

impl Json {
    /// Serializes `value` in QEMU's format. Struct fields keep their declared order, which is
    /// how replies match QEMU's key order.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Json {
        let mut bytes = Vec::new();
        let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, QemuFormatter);
        // Our own types and serde_json values always serialize.
        if value.serialize(&mut serializer).is_err() {
            return Json("null".into());
        }
        Json(String::from_utf8(bytes).unwrap_or_else(|_| "null".into()))
    }

    /// Serializes a value that came from a client as QEMU sends it back: object members in
    /// QDict order (`order` is the value's input order).
    pub fn of_input(value: &Value, order: &KeyOrder) -> Json {
        Json::of(&InQDictOrder { value, order })
    }

    pub fn empty_object() -> Json {
        Json("{}".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The values (without their key order) or errors that `chunks` complete.
    fn feed_all(chunks: &[&[u8]]) -> Vec<Result<Value, String>> {
        let mut streamer = Streamer::new();
        let mut out = Vec::new();
        for chunk in chunks {
            streamer.feed(chunk, &mut out);
        }
        out.into_iter().map(|p| p.map(|(value, _)| value)).collect()
    }

    /// Feeds each input alone and expects exactly one error, with its message.
    fn each_fails_with(cases: &[(&[u8], &str)]) {
        for (input, message) in cases {
            assert_eq!(
                feed_all(&[input]),
                vec![Err(message.to_string())],
                "{input:?}"
            );
        }
    }

    #[test]
    fn split_value_completes_on_last_byte() {
        let out = feed_all(&[b"{\"execute\":", b" \"quit\"", b"}"]);
        assert_eq!(out, vec![Ok(json!({"execute": "quit"}))]);
    }

    #[test]
    fn several_values_in_one_read() {
        let out = feed_all(&[b"{\"a\":1}{\"b\":[1,2]} {}"]);
        assert_eq!(
            out,
            vec![Ok(json!({"a": 1})), Ok(json!({"b": [1, 2]})), Ok(json!({}))]
        );
    }

    #[test]
    fn garbage_gets_qemus_messages() {
        // As observed on QSD: a keyword ends only at the next delimiter.
        let out = feed_all(&[b"not json", b"[1,2]"]);
        assert_eq!(
            out,
            vec![
                Err("JSON parse error, invalid keyword 'not'".into()),
                Err("JSON parse error, invalid keyword 'json'".into()),
                Ok(json!([1, 2])),
            ]
        );
        let cases: &[(&[u8], &str)] = &[
            (b"}", "JSON parse error, expecting value"),
            (b"{\"a\" 1}", "JSON parse error, missing : in object pair"),
            (b"{1:2}", "JSON parse error, key is not a string in object"),
            (b"{\"a\":1,}", "JSON parse error, expecting value"),
            (b"[1,]", "JSON parse error, expecting value"),
            (b"{\"a\":tru}", "JSON parse error, invalid keyword 'tru'"),
            (
                b"{\"x\":\"\\q\"}",
                "JSON parse error, invalid escape sequence in string",
            ),
            (
                b"\"\\u00zz\"",
                "JSON parse error, \\u00zz is not a valid Unicode character",
            ),
        ];
        each_fails_with(cases);
    }

    #[test]
    fn stray_character_recovers_at_next_structural_character() {
        let out = feed_all(&[b"@x {\"a\":1}"]);
        assert_eq!(
            out,
            vec![
                Err("JSON parse error, stray '@'".into()),
                Ok(json!({"a": 1}))
            ]
        );
    }

    #[test]
    fn numbers_wait_for_a_delimiter() {
        let mut streamer = Streamer::new();
        let mut out = Vec::new();
        streamer.feed(b"42", &mut out);
        assert!(out.is_empty());
        streamer.feed(b" ", &mut out);
        assert_eq!(out, vec![Ok((json!(42), KeyOrder::default()))]);
    }

    #[test]
    fn single_quotes_and_escapes() {
        let out = feed_all(&[b"{'execute': 'q\\'x', \"u\": \"\\u00e9\\ud83d\\ude00\"}"]);
        assert_eq!(out, vec![Ok(json!({"execute": "q'x", "u": "é😀"}))]);
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = vec![b'['; MAX_NESTING + 5];
        let out = feed_all(&[&deep]);
        assert_eq!(out[0], Err("JSON nesting depth limit exceeded".into()));
    }

    #[test]
    fn output_matches_qemus_format() {
        let value = json!({"a": [1, 2], "b": "é😀"});
        assert_eq!(
            Json::of(&value).0,
            r#"{"a": [1, 2], "b": "\u00E9\uD83D\uDE00"}"#
        );
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"a\": 1, \"a\": 2}", "JSON parse error, duplicate key"),
            (
                b"{\"x\": {\"a\": 1, \"a\": 2}}",
                "JSON parse error, duplicate key",
            ),
            (b"[{\"a\": 1, \"a\": 2}]", "JSON parse error, duplicate key"),
            // The second value is parsed before the check.
            (b"{\"a\": 1, \"a\": }", "JSON parse error, expecting value"),
        ];
        each_fails_with(cases);
    }

    #[test]
    fn doubles_print_as_printf_17g() {
        // Values QSD echoed as `id`; the tie 2251799813685247.25 rounds to even, as glibc.
        let cases = [
            (1.0, "1"),
            (0.1, "0.10000000000000001"),
            (100.0, "100"),
            (-0.0, "-0"),
            (1.5, "1.5"),
            (1e-7, "9.9999999999999995e-08"),
            (0.000123, "0.00012300000000000001"),
            (1e16, "10000000000000000"),
            (1e17, "1e+17"),
            (9007199254740989.0 / 4.0, "2251799813685247.2"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
            (5e-324, "4.9406564584124654e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
        ];
        for (value, text) in cases {
            assert_eq!(format_double(value), text, "{value:e}");
        }
    }

    #[test]
    fn parse_one_wants_exactly_one_complete_value() {
        let value = |text: &[u8]| parse_one(text).map(|(v, _)| v);
        assert_eq!(value(b"{\"a\": 1}"), Ok(json!({"a": 1})));
        assert_eq!(value(b"12"), Ok(json!(12)));
        assert_eq!(
            value(b"{\"a\": 1"),
            Err("JSON parse error, premature EOI".into())
        );
        assert_eq!(
            value(b"{\"a\": \"x"),
            Err("JSON parse error, stray '\"x'".into())
        );
        assert_eq!(
            value(b"{} {}"),
            Err("Expecting at most one JSON value".into())
        );
    }

    #[test]
    fn strings_are_modified_utf8_as_qemu_reads_them() {
        let parse = |input: &[u8]| feed_all(&[input]);
        assert_eq!(parse(b"\"a\xc0\x80b\""), vec![Ok(json!("a\u{0}b"))]);
        for input in [
            &b"\"\xef\xbf\xbe\""[..],
            b"\"\xed\xa0\x80\"",
            b"\"\xe0\x80\x80\"",
        ] {
            assert_eq!(
                parse(input),
                vec![Err(
                    "JSON parse error, invalid UTF-8 sequence in string".into()
                )],
                "{input:?}"
            );
        }
        assert_eq!(
            parse(b"\"\\uDC00\""),
            vec![Err(
                "JSON parse error, \\uDC00 is not a valid Unicode character".into()
            )]
        );
        assert_eq!(
            parse(b"\"\\u00\""),
            vec![Err(
                "JSON parse error, \\u00\" is not a valid Unicode character".into()
            )]
        );
    }

    #[test]
    fn stray_text_ends_at_nul_and_shows_bad_bytes_as_replacement() {
        assert_eq!(
            feed_all(&[b"\x00"]),
            vec![Err("JSON parse error, stray ''".into())]
        );
        assert_eq!(
            feed_all(&[b"\"\xf8\x88\x80\x80\x80\x05"]),
            vec![Err("JSON parse error, stray '\"\u{FFFD}\u{5}'".into())]
        );
        // Recovery stops at `:` and `,` too.
        assert_eq!(
            feed_all(&[b"@x,1 "]),
            vec![
                Err("JSON parse error, stray '@'".into()),
                Err("JSON parse error, expecting value".into()),
                Ok(json!(1)),
            ]
        );
    }
}
