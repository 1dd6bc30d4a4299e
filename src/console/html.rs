//! The pages' layout and the one escaping function every value from Redis, PostgreSQL or a
//! request goes through before it is written into a page.

use std::fmt::Write;

use super::auth::Session;

/// Text escaped for HTML element content and double-quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Text for a query string value.
pub fn url(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// At most `max` characters of a value, with a mark when it was cut.
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}… ({} bytes in all)", &text[..i], text.len()),
        None => text.to_owned(),
    }
}

/// A duration in ms as the pages show it.
pub fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{} s", ms / 1_000),
        60_000..3_600_000 => format!("{} min", ms / 60_000),
        _ => format!("{} h", ms / 3_600_000),
    }
}

/// A time in ms since the epoch, in UTC.
pub fn at(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// A time in ms since the epoch, in UTC, to the millisecond (events close together).
pub fn at_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string(),
    )
}

/// The hidden CSRF field of an action's form.
pub fn csrf(session: &Session) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        esc(&session.csrf)
    )
}

/// A whole page: head, the nav, who is signed in, the flash and the body.
pub fn page(title: &str, session: &Session, flash: Option<&str>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t} · aiq</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/console/assets/console.css">
<script src="/console/assets/console.js" defer></script></head>
<body><header><nav id="nav"><a id="nav-overview" href="/console/">Overview</a>
<a id="nav-jobs" href="/console/jobs">Jobs</a>
<a id="nav-dead" href="/console/dead">Dead set</a>
<a id="nav-money" href="/console/money">Money</a>
<a id="nav-orgs" href="/console/orgs">Organisations</a></nav>
<span id="who">{name} ({role})</span>
<form id="logout" method="post" action="/console/logout">{csrf}<button id="sign-out">Sign out</button></form></header>
<main><h1>{t}</h1>
"#,
        t = esc(title),
        name = esc(&session.name),
        role = session.role.as_str(),
        csrf = csrf(session),
    );
    if let Some(f) = flash {
        let _ = write!(out, r#"<div id="flash">{}</div>"#, esc(f));
    }
    out.push_str(body);
    out.push_str("</main></body></html>\n");
    out
}

/// The sign-in page, with a message when a token was refused.
pub fn login(refused: bool) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in · aiq</title>
<link rel="stylesheet" href="/console/assets/console.css"></head>
<body><main><h1>Sign in</h1>{msg}
<form id="login" method="post" action="/console/login">
<label for="token">Console token</label>
<input type="password" name="token" id="token" autocomplete="current-password" required>
<button id="sign-in">Sign in</button></form></main></body></html>
"#,
        msg = if refused {
            r#"<div id="flash">That token is not one of this console's.</div>"#
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_comes_out_as_text() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
    }

    #[test]
    fn a_long_value_is_cut_on_a_character() {
        assert_eq!(cut("ééé", 2), "éé… (6 bytes in all)");
        assert_eq!(cut("ab", 2), "ab");
    }
}
