//! What aiq prints of text it does not control, the part the queue needs too (aiq's `redact`
//! re-exports it and adds the secrets list and `cut`):
//!
//! - [`url`]: the password of every URL in a text is masked (`redis://:***@host`,
//!   `postgres://user:***@host/db?password=***`), whether the text is one URL, a comma-separated
//!   list of cluster nodes, or an error message that quotes one. [`url_passwords`] hands the
//!   same passwords to the scrubbers that look for them anywhere.
//! - [`Field`]: a value an app or a provider supplied (a job id, a correlation id, a provider's
//!   error message) is cut to a bound, with its length noted, so one 1 MB value cannot write
//!   megabytes of logs.
//! - [`terminal`] and [`json`]: control characters (C0, DEL, C1, and the Unicode bidirectional
//!   overrides) are escaped, so text stored in Redis or PostgreSQL cannot move the cursor,
//!   recolour or retitle an operator's terminal, or forge a line of a table. [`Field`] escapes
//!   the same characters.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::ops::Range;

/// What a masked password or secret is replaced with.
pub const MASK: &str = "***";

/// The longest an app-supplied field is in a log line or a span, in characters.
pub const FIELD_MAX: usize = 256;

/// The longest a provider's error message or a job's failure reason is in a log line.
pub const MESSAGE_MAX: usize = 1024;

/// Query parameter names whose value is a password: libpq's `password` and `sslpassword`,
/// redis-rs' `pass` for unix sockets, and the usual spellings.
fn is_password_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(name.as_str(), "pass" | "passwd" | "pwd") || name.ends_with("password")
}

/// Ends the authority part of a URL (and a query value) in free text.
fn ends_url_part(b: u8) -> bool {
    b.is_ascii_whitespace() || b"\"'`<>,;\\".contains(&b)
}

/// The byte ranges of `text` that hold passwords: after the `:` of every URL's userinfo, and
/// the values of password query parameters (`?password=`, `&sslpassword=`, `pass=`).
fn password_ranges(text: &str) -> Vec<Range<usize>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    // Userinfo: scheme://user:password@host
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let start = from + found + 3;
        from = start;
        let end = b[start..]
            .iter()
            .position(|&c| ends_url_part(c) || b"/?#".contains(&c))
            .map_or(b.len(), |p| start + p);
        if let Some(at) = b[start..end].iter().rposition(|&c| c == b'@') {
            let userinfo = start..start + at;
            if let Some(colon) = b[userinfo.clone()].iter().position(|&c| c == b':') {
                let pw = userinfo.start + colon + 1..userinfo.end;
                if !pw.is_empty() {
                    out.push(pw);
                }
            }
        }
    }
    // Parameters: name=value, the name at the start or after ? & ; or a space.
    for (eq, _) in text.match_indices('=') {
        let name_start = b[..eq]
            .iter()
            .rposition(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'-'))
            .map_or(0, |p| p + 1);
        let named =
            name_start < eq && (name_start == 0 || b"?&; \t\"'".contains(&b[name_start - 1]));
        if !named || !is_password_param(&text[name_start..eq]) {
            continue;
        }
        let value_end = b[eq + 1..]
            .iter()
            .position(|&c| ends_url_part(c) || c == b'&' || c == b'#')
            .map_or(b.len(), |p| eq + 1 + p);
        if value_end > eq + 1 {
            out.push(eq + 1..value_end);
        }
    }
    out.sort_by_key(|r| r.start);
    out
}

/// `text` with the password of every URL in it masked: the userinfo's password
/// (`redis://:***@h`, `rediss://user:***@h`, each node of a comma-separated list) and password
/// query parameters (`postgres://u:***@h/db?password=***`). User names, hosts and paths stay, so
/// an operator still sees where aiq connects. A password must be percent-encoded in a URL (a raw
/// `/` or `@` in it ends the userinfo early, for aiq as for the clients).
pub fn url(text: &str) -> Cow<'_, str> {
    let ranges = password_ranges(text);
    if ranges.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for r in ranges {
        if r.start < at {
            continue;
        }
        out.push_str(&text[at..r.start]);
        out.push_str(MASK);
        at = r.end;
    }
    out.push_str(&text[at..]);
    Cow::Owned(out)
}

/// The passwords [`url`] masks in `text`, as written and percent-decoded: for the scrubbers that
/// must find them wherever else they appear (an error message that quotes them decoded).
pub fn url_passwords(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for r in password_ranges(text) {
        let raw = &text[r];
        let decoded = percent_decode(raw);
        if decoded != raw {
            out.push(decoded);
        }
        out.push(raw.to_owned());
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a control character is written out, if it is one: C0 (newline and tab too: a value
/// must not start a line of its own), DEL, C1, and the bidirectional overrides that make text
/// read in another order than it is stored.
fn escape_of(c: char) -> Option<EscapedChar> {
    match c {
        '\n' => Some(EscapedChar::Named("\\n")),
        '\r' => Some(EscapedChar::Named("\\r")),
        '\t' => Some(EscapedChar::Named("\\t")),
        '\0'..='\x1f' | '\x7f' => Some(EscapedChar::Hex(c as u32)),
        '\u{80}'..='\u{9f}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' => {
            Some(EscapedChar::Unicode(c as u32))
        }
        '\u{2066}'..='\u{2069}' => Some(EscapedChar::Unicode(c as u32)),
        _ => None,
    }
}

enum EscapedChar {
    Named(&'static str),
    Hex(u32),
    Unicode(u32),
}

impl fmt::Display for EscapedChar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EscapedChar::Named(s) => f.write_str(s),
            EscapedChar::Hex(n) => write!(f, "\\x{n:02x}"),
            EscapedChar::Unicode(n) => write!(f, "\\u{{{n:x}}}"),
        }
    }
}

fn write_escaped(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    let mut at = 0;
    for (i, c) in text.char_indices() {
        if let Some(e) = escape_of(c) {
            out.write_str(&text[at..i])?;
            write!(out, "{e}")?;
            at = i + c.len_utf8();
        }
    }
    out.write_str(&text[at..])
}

/// `text` fit for a terminal: every control character escaped as `\x1b`, `\r`, `\n`, `\u{9b}`
/// (so ANSI sequences print as text and do nothing). For one value of the CLI's output; the
/// CLI's own line breaks and separators are written around it.
pub fn terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| escape_of(c).is_some()) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let _ = write_escaped(&mut out, text);
    Cow::Owned(out)
}

/// Serialised JSON fit for a terminal. serde_json escapes the C0 controls but writes DEL, C1
/// and the bidirectional overrides as they are; outside strings JSON holds only ASCII
/// punctuation, so each of those is inside a string and becomes its `\u` escape, which every
/// JSON reader decodes back to the same text.
pub fn json(serialized: String) -> String {
    if !serialized.chars().any(|c| escape_of(c).is_some()) {
        return serialized;
    }
    let mut out = String::with_capacity(serialized.len() + 16);
    for c in serialized.chars() {
        match escape_of(c) {
            // serde_json leaves no raw C0 inside strings; between tokens they are white space.
            Some(_) if (c as u32) >= 0x7f => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            _ => out.push(c),
        }
    }
    out
}

/// An app-supplied value as a log or span field: cut to a bound (with its length noted) and
/// with its control characters escaped, as it is formatted (a long value is never copied
/// whole). `Field::new(&id)` bounds to [`FIELD_MAX`] characters, `Field::message(&error)` (a
/// provider's error, a failure reason) to [`MESSAGE_MAX`].
pub struct Field<T> {
    value: T,
    max: usize,
}

impl<T: fmt::Display> Field<T> {
    pub fn new(value: T) -> Self {
        Self {
            value,
            max: FIELD_MAX,
        }
    }

    pub fn message(value: T) -> Self {
        Self {
            value,
            max: MESSAGE_MAX,
        }
    }
}

/// Writes at most `left` characters, escaped, and counts the bytes it was given.
struct Bounded<'a, 'b> {
    out: &'a mut fmt::Formatter<'b>,
    left: usize,
    total: usize,
    cut: bool,
}

impl fmt::Write for Bounded<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.total += s.len();
        if self.cut || s.is_empty() {
            return Ok(());
        }
        match s.char_indices().nth(self.left) {
            None => {
                self.left -= s.chars().count();
                write_escaped(self.out, s)
            }
            Some((end, _)) => {
                self.cut = true;
                write_escaped(self.out, &s[..end])
            }
        }
    }
}

impl<T: fmt::Display> fmt::Display for Field<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut w = Bounded {
            out: f,
            left: self.max,
            total: 0,
            cut: false,
        };
        write!(w, "{}", self.value)?;
        let (cut, total) = (w.cut, w.total);
        if cut {
            write!(f, "... ({total} bytes in all)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_of_every_kind_of_url_is_masked() {
        let cases = [
            ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
            ("redis://user:pw@h", "redis://user:***@h"),
            (
                "rediss://default:p%40ss@h:6380",
                "rediss://default:***@h:6380",
            ),
            (
                "redis://:a@h1:7000,redis://:b@h2:7001, rediss://u:c@h3",
                "redis://:***@h1:7000,redis://:***@h2:7001, rediss://u:***@h3",
            ),
            (
                "postgres://u:pw@h:5432/db?sslmode=require&password=pw2",
                "postgres://u:***@h:5432/db?sslmode=require&password=***",
            ),
            (
                "postgresql:///db?host=/run/pg&user=u&sslpassword=k&x=1",
                "postgresql:///db?host=/run/pg&user=u&sslpassword=***&x=1",
            ),
            (
                "unix:///run/redis.sock?db=1&pass=pw",
                "unix:///run/redis.sock?db=1&pass=***",
            ),
            // A raw @ in the password: the last @ of the authority ends the userinfo.
            ("redis://:p@ss@h/0", "redis://:***@h/0"),
            // Inside an error message, quoted or not.
            (
                "error connecting to \"redis://:pw@h:1/\": refused",
                "error connecting to \"redis://:***@h:1/\": refused",
            ),
            (
                "conninfo host=h password=pw user=u",
                "conninfo host=h password=*** user=u",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(url(text), want, "{text}");
        }
    }

    #[test]
    fn urls_without_passwords_and_ordinary_text_pass_unchanged() {
        for text in [
            "redis://127.0.0.1:6379/",
            "postgres://u@localhost/aiq",
            "https://hooks.example/services/T0/B0/x",
            "http://h/path/user@example.com",
            "a=b, c = d, compass=north, :// @ :",
            "",
        ] {
            assert!(matches!(url(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn url_passwords_gives_each_password_as_written_and_decoded() {
        let got = url_passwords("redis://:p%40ss@h,redis://:two@h2/?password=three");
        assert_eq!(got, vec!["p@ss", "p%40ss", "two", "three"]);
        assert!(url_passwords("redis://h/").is_empty());
    }

    #[test]
    fn a_long_value_is_cut_with_its_length_noted_on_a_character_boundary() {
        let long = "é".repeat(1000);
        let f = Field::new(&long).to_string();
        assert!(f.starts_with(&"é".repeat(FIELD_MAX)), "{f}");
        assert!(f.ends_with("... (2000 bytes in all)"), "{f}");
        assert_eq!(Field::new("short").to_string(), "short");
    }

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        let hostile = "a\x1b[31mred\r\x07\x7f\u{9b}2J\u{202e}\nb\tc";
        let t = terminal(hostile);
        assert_eq!(
            t, "a\\x1b[31mred\\r\\x07\\x7f\\u{9b}2J\\u{202e}\\nb\\tc",
            "{t}"
        );
        assert!(!t.chars().any(|c| c.is_control()), "{t}");
        assert_eq!(Field::new(hostile).to_string(), t);
        // A value formatted in pieces is bounded across them.
        let err = format!(
            "{}",
            Field::message(format_args!("{}{}", "a".repeat(1000), "b".repeat(1000)))
        );
        assert!(
            err.starts_with(&"a".repeat(1000)) && err.ends_with("b... (2000 bytes in all)"),
            "{err}"
        );
        assert!(matches!(terminal("plain ünïcode"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_output_keeps_its_meaning_without_raw_del_or_c1() {
        let v = serde_json::json!({ "id": "a\x1b[31m\x7f\u{9b}\u{202e}b" });
        let s = json(serde_json::to_string(&v).unwrap());
        assert!(!s.chars().any(|c| c.is_control()), "{s}");
        assert!(!s.contains('\u{202e}'), "{s}");
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }
}
