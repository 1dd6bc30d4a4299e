//! Provider clients: one module per wire format, each behind a small client type with its own
//! `reqwest::Client`, base URL, key and timeout. Each module maps HTTP statuses and error bodies
//! to an [`ErrorKind`] in exactly one function (`classify`), tested as a table.
//! Only this module speaks HTTP to a provider.

pub mod anthropic;
pub mod breaker;
pub mod gemini;
pub mod openai;
pub mod vision;

#[cfg(test)]
mod parse_tests;

/// Vision's RetryInfo reader, for the parsers' property tests.
#[cfg(test)]
pub(crate) fn vision_retry_info(body: &str) -> Option<Duration> {
    vision::retry_info(body)
}

use std::time::Duration;

/// What went wrong with a provider call, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 429 rate limit: retry after the provider's delay.
    RateLimited,
    /// 5xx, 529 and the like: retry with backoff.
    Unavailable,
    /// 408 or our own timeout: retry.
    Timeout,
    /// Could not connect or the connection broke: retry.
    Connection,
    /// A 2xx whose body is not the documented shape: retry (it is the provider's fault).
    Malformed,
    /// 400, 404, 413, 422: the request itself is wrong; never retry.
    Invalid,
    /// 401, 403: our key or project is wrong; never retry.
    Unauthorized,
    /// Quota or billing exhausted (OpenAI insufficient_quota...): never retry.
    QuotaExhausted,
}

impl ErrorKind {
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::RateLimited
                | ErrorKind::Unavailable
                | ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::Malformed
        )
    }

    /// The name recorded as `error_type` in ai_processing_errors.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Unavailable => "provider_unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::Malformed => "malformed_response",
            ErrorKind::Invalid => "invalid_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::QuotaExhausted => "quota_exhausted",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider} {}: {message}", kind.as_str())]
pub struct ProviderError {
    pub provider: &'static str,
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub message: String,
    /// The provider's own word on when to come back (Retry-After, retry-after-ms, RetryInfo).
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// An error from reqwest before any response: a timeout or a connection problem, or a
    /// request aiq could not even build (a header value it may not send, say). That last one is
    /// this job's own fault: permanent, and never a failure of the provider's breaker.
    pub(crate) fn transport(provider: &'static str, e: &reqwest::Error) -> Self {
        let kind = if e.is_builder() {
            ErrorKind::Invalid
        } else if e.is_timeout() {
            ErrorKind::Timeout
        } else {
            ErrorKind::Connection
        };
        ProviderError {
            provider,
            kind,
            status: None,
            // reqwest names the URL; a base URL with a password in it keeps it to itself.
            message: crate::redact::url(&e.to_string()).into_owned(),
            retry_after: None,
        }
    }

    pub(crate) fn malformed(
        provider: &'static str,
        status: u16,
        what: impl std::fmt::Display,
    ) -> Self {
        ProviderError {
            provider,
            kind: ErrorKind::Malformed,
            status: Some(status),
            message: format!("response is not the documented shape: {what}"),
            retry_after: None,
        }
    }
}

/// Longest provider-requested delay we honour.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);

/// A provider's delay in seconds, bounded: a value that is not a finite number or is negative
/// means nothing (the caller's own backoff applies); a finite one above [`RETRY_AFTER_CAP`] is
/// the cap. Never panics, whatever the number (`Duration::from_secs_f64` does on inf or 1e30).
pub(crate) fn delay_from_secs(secs: f64) -> Option<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).map_or(RETRY_AFTER_CAP, |d| d.min(RETRY_AFTER_CAP)))
}

/// A delay written as a decimal number of seconds (`"5"`, `"1.5"`; `"inf"`, `"NaN"`, `"-1"` and
/// anything else mean nothing).
pub(crate) fn parse_delay_secs(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() || text.len() > 32 {
        return None;
    }
    delay_from_secs(text.parse::<f64>().ok()?)
}

/// Reads `retry-after-ms` (OpenAI) or `retry-after`, in seconds or as an HTTP date (RFC 9110),
/// each bounded (see [`delay_from_secs`]).
pub(crate) fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return delay_from_secs(ms / 1000.0);
    }
    let value = get("retry-after")?;
    parse_delay_secs(value).or_else(|| {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        let secs = (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds();
        delay_from_secs(secs.max(0) as f64 / 1000.0)
    })
}

/// The most tokens one usage count may report: above the context plus output of any model a
/// provider sells (about two million today). A count above it, negative, fractional or not a
/// number is not something a model can produce: the answer is unusable (`Malformed`).
pub const MAX_REPORTED_TOKENS: u64 = 50_000_000;

/// A token count of a usage block at `pointer`: `None` when absent (or null), else a whole number
/// from 0 to [`MAX_REPORTED_TOKENS`], or the error that makes the answer unusable. Sums of
/// several such counts cannot overflow.
pub(crate) fn usage_count(
    usage: &serde_json::Value,
    pointer: &str,
    provider: &'static str,
    status: u16,
) -> Result<Option<u64>, ProviderError> {
    match usage.pointer(pointer) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= MAX_REPORTED_TOKENS => Ok(Some(n)),
            _ => Err(ProviderError::malformed(
                provider,
                status,
                format!(
                    "usage{pointer} is {}: not a token count a model can produce",
                    snippet(&v.to_string())
                ),
            )),
        },
    }
}

/// Cuts a provider's body to a length fit for a log line or an error row.
pub(crate) fn snippet(body: &str) -> String {
    const MAX: usize = 500;
    if body.len() <= MAX {
        return body.to_owned();
    }
    let mut end = MAX;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &body[..end])
}

/// How one wire format reads its errors: its status-and-body classification, and a delay its
/// error body may carry (Google's RetryInfo) when there is no Retry-After header.
pub(crate) struct ErrorFormat {
    pub provider: &'static str,
    pub classify: fn(u16, &str) -> ErrorKind,
    pub body_delay: fn(&str) -> Option<Duration>,
}

/// The provider's error message (`error.message` in every format here), cut to
/// `redact::MESSAGE_MAX` characters (it goes to logs, error rows and Sentry), or the status and
/// a snippet of the body.
fn error_message(status: u16, body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(|m| crate::redact::cut(m, crate::redact::MESSAGE_MAX).into_owned())
        })
        .unwrap_or_else(|| format!("HTTP {status}: {}", snippet(body)))
}

/// The error a non-2xx answer stands for.
pub(crate) fn error_from(
    format: &ErrorFormat,
    status: u16,
    body: &str,
    header_delay: Option<Duration>,
) -> ProviderError {
    ProviderError {
        provider: format.provider,
        kind: (format.classify)(status, body),
        status: Some(status),
        message: error_message(status, body),
        retry_after: header_delay
            .or_else(|| (format.body_delay)(body).map(|d| d.min(RETRY_AFTER_CAP))),
    }
}

/// Sends a request; returns the status and body of a 2xx answer, and any other answer, or no
/// answer, as the [`ProviderError`] it stands for.
pub(crate) async fn send(
    format: &ErrorFormat,
    request: reqwest::RequestBuilder,
) -> Result<(u16, String), ProviderError> {
    let resp = request
        .send()
        .await
        .map_err(|e| ProviderError::transport(format.provider, &e))?;
    let status = resp.status().as_u16();
    let header_delay = retry_after_header(resp.headers());
    let body = resp
        .text()
        .await
        .map_err(|e| ProviderError::transport(format.provider, &e))?;
    if (200..300).contains(&status) {
        Ok((status, body))
    } else {
        Err(error_from(format, status, body.as_str(), header_delay))
    }
}

/// For formats whose error bodies carry no delay.
pub(crate) fn no_body_delay(_: &str) -> Option<Duration> {
    None
}

/// The provider's API key, or the error that says which setting is missing.
pub(crate) fn api_key<'a>(
    settings: &'a crate::config::ProviderSettings,
    provider: &'static str,
    setting: &str,
) -> Result<&'a crate::config::Secret, ProviderError> {
    settings.api_key.as_ref().ok_or_else(|| ProviderError {
        provider,
        kind: ErrorKind::Unauthorized,
        status: None,
        message: format!("{setting} is not set"),
        retry_after: None,
    })
}

pub(crate) fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10).min(timeout))
        .pool_max_idle_per_host(64)
        .build()
        .expect("building an HTTP client with static settings")
}
