//! What aiq prints of text it does not control. Three rules, each one function used at every
//! place text leaves the process (logs, error messages, `aiq` output, /readyz, Sentry):
//!
//! - [`url`]: the password of every URL in a text is masked (`redis://:***@host`,
//!   `postgres://user:***@host/db?password=***`), whether the text is one URL, a comma-separated
//!   list of cluster nodes, or an error message that quotes one. [`url_passwords`] hands the
//!   same passwords to the scrubbers that look for them anywhere.
//! - [`Field`] and [`cut`]: a value an app or a provider supplied (a job id, a correlation id,
//!   a provider's error message) is cut to a bound, with its length noted, so one 1 MB value
//!   cannot write megabytes of logs.
//! - [`terminal`] and [`json`]: control characters (C0, DEL, C1, and the Unicode bidirectional
//!   overrides) are escaped, so text stored in Redis or PostgreSQL cannot move the cursor,
//!   recolour or retitle an operator's terminal, or forge a line of a table.
//!
//! The queue logs and prints Redis URLs too, so `url`, `Field`, `terminal` and `json` live in
//! the queue crate (`aiq_queue::redact`) and are re-exported here: one implementation of each.

use std::borrow::Cow;

pub use aiq_queue::redact::{
    FIELD_MAX, Field, MASK, MESSAGE_MAX, json, terminal, url, url_passwords,
};

/// `text` with every one of `secrets` (those of four characters or more: shorter ones would
/// mask ordinary words) replaced by `mask`.
pub fn secrets<'a>(text: &'a str, secrets: &[String], mask: &str) -> Cow<'a, str> {
    let mut out = Cow::Borrowed(text);
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), mask));
        }
    }
    out
}

/// `text` cut to `max` characters, with its length noted: `abc... (1048576 bytes in all)`.
pub fn cut(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        Some((end, _)) => Cow::Owned(format!("{}... ({} bytes in all)", &text[..end], text.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_replaced_and_short_ones_left_alone() {
        let s = ["sk-123456".to_owned(), "ab".to_owned()];
        assert_eq!(secrets("key sk-123456 ab", &s, MASK), "key *** ab");
    }

    #[test]
    fn a_long_text_is_cut_with_its_length_noted() {
        assert_eq!(cut("abcdef", 3), "abc... (6 bytes in all)");
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut(&"é".repeat(4), 2), "éé... (8 bytes in all)");
    }
}
