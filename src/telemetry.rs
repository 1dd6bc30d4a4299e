//! Logging: JSON lines in production (under systemd), compact text in a terminal. `RUST_LOG`
//! overrides the level. Error events also go to Sentry (when it is on) and warnings become its
//! breadcrumbs, through sentry-tracing; see `observe` for metrics and the scrubbing hook.
//!
//! Every line passes one last scrub on its way to stderr, whatever field or message it came
//! from: the configured secrets and the password of any URL in it are masked, and a line longer
//! than [`LINE_MAX`] is cut (the fields an app supplies are bounded where they are logged, see
//! `redact::Field`; this is the guard for anything that slipped by).

use std::io::Write;
use std::sync::Arc;

use sentry::integrations::tracing::{BreadcrumbLayer, ErrorLayer};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

use crate::config::LogFormat;
use crate::redact;

/// The longest log line written, in bytes; a longer one keeps its first [`LINE_HEAD`] bytes.
pub const LINE_MAX: usize = 16 * 1024;
const LINE_HEAD: usize = 4 * 1024;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
/// `secrets` (see `Settings::secrets`) are masked in every line.
pub fn init(format: LogFormat, default_level: &str, secrets: Vec<String>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let writer = ScrubbedStderr {
        secrets: secrets.into(),
        json: format == LogFormat::Json,
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let fmt = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Text => fmt.compact().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(ErrorLayer::new().with_filter(LevelFilter::ERROR))
        .with(BreadcrumbLayer::new().with_filter(LevelFilter::WARN))
        .try_init();
}

/// stderr, through [`scrub_line`]. The fmt layer formats each event into one buffer and writes
/// it with one `write_all`, so each write here is one whole line.
struct ScrubbedStderr {
    secrets: Arc<[String]>,
    json: bool,
}

impl<'a> MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedLine;

    fn make_writer(&'a self) -> ScrubbedLine {
        ScrubbedLine {
            secrets: self.secrets.clone(),
            json: self.json,
        }
    }
}

struct ScrubbedLine {
    secrets: Arc<[String]>,
    json: bool,
}

impl Write for ScrubbedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let line = scrub_line(&text, &self.secrets, self.json);
        std::io::stderr().lock().write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// One formatted log line (with its newline) as it may be written: secrets and URL passwords
/// masked, then cut to [`LINE_MAX`]. A cut JSON line is replaced by a JSON line of its own that
/// says so and holds the start of the original as a string, so the log stays one JSON object
/// a line.
pub fn scrub_line(line: &str, secrets: &[String], json: bool) -> String {
    let masked = redact::secrets(line, secrets, redact::MASK);
    let masked = redact::url(&masked).into_owned();
    if masked.len() <= LINE_MAX {
        return masked;
    }
    let mut end = LINE_HEAD;
    while !masked.is_char_boundary(end) {
        end -= 1;
    }
    let head = &masked[..end];
    if json {
        let mut out = serde_json::json!({
            "level": "WARN",
            "message": format!("a log line of {} bytes was cut to its first {end}", masked.len()),
            "target": "aiq::telemetry",
            "head": head,
        })
        .to_string();
        out.push('\n');
        out
    } else {
        format!("{head}... (a log line of {} bytes, cut)\n", masked.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_loses_its_secrets_and_url_passwords() {
        let secrets = vec!["https://hooks.example/services/T0/B0/SECRETTOKEN".to_owned()];
        let line = "WARN alert webhook failed url=https://hooks.example/services/T0/B0/SECRETTOKEN redis=redis://:pw@h/0\n";
        let out = scrub_line(line, &secrets, false);
        assert_eq!(
            out,
            "WARN alert webhook failed url=*** redis=redis://:***@h/0\n"
        );
    }

    #[test]
    fn a_megabyte_line_is_cut_and_a_json_line_stays_json() {
        let big = format!(
            "{{\"level\":\"INFO\",\"message\":\"{}\"}}\n",
            "x".repeat(1 << 20)
        );
        let out = scrub_line(&big, &[], true);
        assert!(out.len() < LINE_MAX && out.ends_with('\n'), "{}", out.len());
        let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        let said = format!("{} bytes", big.len());
        assert!(v["message"].as_str().unwrap().contains(&said), "{v}");
        let out = scrub_line(&big, &[], false);
        assert!(out.len() < LINE_MAX && out.ends_with("cut)\n"));
        let short = "INFO ok\n";
        assert_eq!(scrub_line(short, &[], false), short);
    }
}
