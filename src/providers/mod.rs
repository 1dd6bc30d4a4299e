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

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::Provider;

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
    /// A 2xx body longer than `AIQ_MAX_RESPONSE_MB`: read no further, retry (the provider's
    /// fault: no honest answer to a job aiq accepts is that long).
    Oversize,
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
                | ErrorKind::Oversize
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
            ErrorKind::Oversize => "oversize",
            ErrorKind::Invalid => "invalid_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::QuotaExhausted => "quota_exhausted",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{provider} {}: {message}", kind.as_str())]
pub struct ProviderError {
    pub provider: Provider,
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
    pub(crate) fn transport(provider: Provider, e: &reqwest::Error) -> Self {
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

    /// A success status whose body was longer than the cap: read no further.
    pub(crate) fn oversize(provider: Provider, status: u16, what: impl std::fmt::Display) -> Self {
        Self::unusable_answer(
            provider,
            ErrorKind::Oversize,
            status,
            format!("response body above AIQ_MAX_RESPONSE_MB: {what}"),
        )
    }

    fn unusable_answer(provider: Provider, kind: ErrorKind, status: u16, message: String) -> Self {
        ProviderError {
            provider,
            kind,
            status: Some(status),
            message,
            retry_after: None,
        }
    }

    /// True when the provider answered with a success status, so it has most likely billed the
    /// call, whatever the body held.
    pub fn answered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    pub(crate) fn malformed(provider: Provider, status: u16, what: impl std::fmt::Display) -> Self {
        Self::unusable_answer(
            provider,
            ErrorKind::Malformed,
            status,
            format!("response is not the documented shape: {what}"),
        )
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
    provider: Provider,
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
    pub provider: Provider,
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

/// The most of an error answer's body aiq reads: enough for any documented error envelope.
pub const ERROR_BODY_MAX: u64 = 64 * 1024;

/// How much of the providers' answers aiq reads and holds: each body is read up to
/// `max_bytes` and no further, and the bodies being read or held (from the first byte until
/// the job's rows are written) share one budget of `memory_bytes`, counted in KiB. A call waits
/// for room before it reads its body, so peak memory stays bounded whatever providers send.
/// Every acquisition takes all it needs at once (the declared length, or the cap when the
/// length is not declared) and gives back what the body did not use, so no call holds part of
/// the budget while waiting for more: it cannot deadlock.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    pub max_bytes: u64,
    pub memory_bytes: u64,
    memory: Arc<Semaphore>,
}

impl BodyLimits {
    /// `memory_bytes` is raised to `max_bytes` when below it, so one body always fits.
    pub fn new(max_bytes: u64, memory_bytes: u64) -> Self {
        let memory_bytes = memory_bytes.max(max_bytes);
        Self {
            max_bytes,
            memory_bytes,
            memory: Arc::new(Semaphore::new(kib(memory_bytes) as usize)),
        }
    }

    /// Waits until a body of `bytes` fits in the shared budget and holds its share.
    async fn hold(&self, bytes: u64) -> BodyHold {
        let n = kib(bytes
            .saturating_mul(HELD_PER_BODY_BYTE)
            .min(self.memory_bytes)) as u32;
        match self.memory.clone().acquire_many_owned(n).await {
            Ok(p) => BodyHold(Some(Arc::new(p))),
            // The semaphore is never closed.
            Err(_) => BodyHold(None),
        }
    }
}

/// What one byte of a body costs in memory until its rows are written: the body as read, its
/// parsed form, and its encoding for PostgreSQL (measured by `aiq-dev bench bodies`).
const HELD_PER_BODY_BYTE: u64 = 3;

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024).min(u32::MAX as u64)
}

/// A body's share of [`BodyLimits`]' memory budget, given back when the last copy is dropped
/// (the parsed answer carries one until its rows are written).
#[derive(Debug, Clone, Default)]
pub struct BodyHold(Option<Arc<OwnedSemaphorePermit>>);

impl BodyHold {
    /// Keeps the share of a body of `bytes` and gives the rest back.
    fn shrink_to(&mut self, bytes: u64) {
        if let Some(p) = self.0.as_mut().and_then(Arc::get_mut) {
            let keep = kib(bytes.saturating_mul(HELD_PER_BODY_BYTE)).max(1) as usize;
            if p.num_permits() > keep {
                drop(p.split(p.num_permits() - keep));
            }
        }
    }
}

/// A 2xx answer: its status, its body and the body's share of the memory budget.
pub(crate) struct Answer {
    pub status: u16,
    pub body: String,
    pub hold: BodyHold,
}

/// Reads a body up to `cap` bytes. Returns the bytes and whether that was the whole body; on
/// `false` the rest is never read (the connection is dropped with the response).
async fn read_capped(
    resp: &mut reqwest::Response,
    cap: u64,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut buf = Vec::with_capacity(resp.content_length().unwrap_or(0).min(cap) as usize);
    while let Some(chunk) = resp.chunk().await? {
        if (buf.len() + chunk.len()) as u64 > cap {
            return Ok((buf, false));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf, true))
}

/// Sends a request; returns a 2xx answer, and any other answer, or no answer, as the
/// [`ProviderError`] it stands for. An error body is read up to [`ERROR_BODY_MAX`]; a 2xx body
/// up to the cap, waiting for room in the memory budget first: a longer one, declared or not,
/// is `Oversize`.
pub(crate) async fn send(
    format: &ErrorFormat,
    limits: &BodyLimits,
    request: reqwest::RequestBuilder,
) -> Result<Answer, ProviderError> {
    let transport = |e: reqwest::Error| ProviderError::transport(format.provider, &e);
    let mut resp = request.send().await.map_err(transport)?;
    let status = resp.status().as_u16();
    let header_delay = retry_after_header(resp.headers());
    if !(200..300).contains(&status) {
        let (bytes, _) = read_capped(&mut resp, ERROR_BODY_MAX)
            .await
            .map_err(transport)?;
        let body = String::from_utf8_lossy(&bytes);
        return Err(error_from(format, status, &body, header_delay));
    }
    let declared = resp.content_length();
    if let Some(n) = declared.filter(|n| *n > limits.max_bytes) {
        return Err(ProviderError::oversize(
            format.provider,
            status,
            format!("Content-Length {n}, cap {}", limits.max_bytes),
        ));
    }
    let mut hold = limits.hold(declared.unwrap_or(limits.max_bytes)).await;
    let (bytes, whole) = read_capped(&mut resp, limits.max_bytes)
        .await
        .map_err(transport)?;
    if !whole {
        return Err(ProviderError::oversize(
            format.provider,
            status,
            format!("more than {} bytes", limits.max_bytes),
        ));
    }
    hold.shrink_to(bytes.len() as u64);
    let body = String::from_utf8(bytes)
        .map_err(|e| ProviderError::malformed(format.provider, status, e))?;
    Ok(Answer { status, body, hold })
}

/// For formats whose error bodies carry no delay.
pub(crate) fn no_body_delay(_: &str) -> Option<Duration> {
    None
}

/// The provider's API key, or the error that says which setting is missing.
pub(crate) fn api_key<'a>(
    settings: &'a crate::config::ProviderSettings,
    provider: Provider,
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

#[cfg(test)]
mod body_limit_tests {
    use super::*;

    #[tokio::test]
    async fn holds_take_what_they_need_at_once_and_give_back_what_the_body_did_not_use() {
        const MIB: u64 = 1024 * 1024;
        // Each body holds three times its size (read, parsed, encoded for PostgreSQL).
        let limits = BodyLimits::new(MIB, 6 * MIB);
        let mut a = limits.hold(MIB).await;
        let b = limits.hold(MIB).await;
        assert_eq!(limits.memory.available_permits(), 0);
        // A third waits while the budget is full...
        let waiting = tokio::spawn({
            let limits = limits.clone();
            async move { limits.hold(MIB / 2).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // ...and gets its room once a body turns out shorter than the cap.
        a.shrink_to(10 * 1024);
        let c = waiting.await.unwrap();
        assert_eq!(limits.memory.available_permits(), 3072 - 30 - 1536);
        drop((a, b, c));
        assert_eq!(limits.memory.available_permits(), 6144);
        // A cap above the memory budget raises the budget: one body always fits.
        assert_eq!(BodyLimits::new(4 * MIB, MIB).memory_bytes, 4 * MIB);
    }
}
