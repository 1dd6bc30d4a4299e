//! Gemini `POST /v1beta/models/{model}:generateContent`.

use serde_json::{Value, json};

use super::openai::{Completion, Message, Usage};
use super::{ErrorFormat, ErrorKind, ProviderError, http_client, send};

const FORMAT: ErrorFormat = ErrorFormat {
    provider: PROVIDER,
    classify,
    body_delay: retry_info,
};
use crate::config::ProviderSettings;
use crate::domain::Provider;

pub const PROVIDER: Provider = Provider::Gemini;

/// A RetryInfo delay longer than this means a quota that will not come back soon: fail, as
/// gemini-cli does.
const LONGEST_RETRY: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Clone)]
pub struct GeminiClient {
    http: reqwest::Client,
    settings: ProviderSettings,
    limits: super::BodyLimits,
}

impl GeminiClient {
    pub fn new(settings: &ProviderSettings, limits: &super::BodyLimits) -> Self {
        Self {
            http: http_client(settings.timeout),
            settings: settings.clone(),
            limits: limits.clone(),
        }
    }

    pub async fn complete(
        &self,
        model: &str,
        messages: &[Message],
        max_tokens: u32,
    ) -> Result<Completion, ProviderError> {
        let key = super::api_key(&self.settings, PROVIDER, "AIQ_GEMINI_API_KEY")?;
        let system: Vec<Value> = messages
            .iter()
            .filter(|m| m.role == "system" || m.role == "developer")
            .map(|m| json!({ "text": m.content }))
            .collect();
        let contents: Vec<Value> = messages
            .iter()
            .filter(|m| m.role == "user" || m.role == "assistant")
            .map(|m| {
                let role = if m.role == "assistant" {
                    "model"
                } else {
                    "user"
                };
                json!({ "role": role, "parts": [{ "text": m.content }] })
            })
            .collect();
        let mut body =
            json!({ "contents": contents, "generationConfig": { "maxOutputTokens": max_tokens } });
        if !system.is_empty() {
            body["systemInstruction"] = json!({ "parts": system });
        }
        let request = self
            .http
            .post(format!(
                "{}/v1beta/models/{model}:generateContent",
                self.settings.base_url
            ))
            .header("x-goog-api-key", key.expose())
            .json(&body);
        let answer = send(&FORMAT, &self.limits, request).await?;
        let mut parsed = parse_response(answer.status, &answer.body)?;
        parsed.hold = answer.hold;
        Ok(parsed)
    }
}

/// RetryInfo's `retryDelay` ("38s", "45.837906927s") from the error body: Gemini sends no
/// Retry-After header.
pub fn retry_info(body: &str) -> Option<std::time::Duration> {
    let v: Value = serde_json::from_str(body).ok()?;
    v.pointer("/error/details")?
        .as_array()?
        .iter()
        .find_map(|d| super::parse_delay_secs(d.get("retryDelay")?.as_str()?.strip_suffix('s')?))
}

/// Parses a 2xx body. `promptTokenCount` includes cached content; thoughts bill as output.
pub fn parse_response(status: u16, body: &str) -> Result<Completion, ProviderError> {
    let raw: Value =
        serde_json::from_str(body).map_err(|e| ProviderError::malformed(PROVIDER, status, e))?;
    let candidate = raw
        .pointer("/candidates/0")
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no candidates"))?;
    let text: String = candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    let usage = raw
        .get("usageMetadata")
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no usageMetadata"))?;
    let count = |k: &str| super::usage_count(usage, &format!("/{k}"), PROVIDER, status);
    let prompt = count("promptTokenCount")?
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no promptTokenCount"))?;
    let cached = count("cachedContentTokenCount")?.unwrap_or(0).min(prompt);
    let output =
        count("candidatesTokenCount")?.unwrap_or(0) + count("thoughtsTokenCount")?.unwrap_or(0);
    Ok(Completion {
        text,
        finish_reason: candidate
            .get("finishReason")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned(),
        usage: Usage {
            prompt_tokens: prompt,
            cached_tokens: cached,
            completion_tokens: output,
        },
        model: raw
            .get("modelVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        raw,
        hold: super::BodyHold::default(),
    })
}

/// The one place that maps a Gemini status and Google error envelope to an [`ErrorKind`].
pub fn classify(status: u16, body: &str) -> ErrorKind {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let google_status = v
        .as_ref()
        .and_then(|v| v.pointer("/error/status"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let per_day = body.contains("PerDay");
    let key_invalid = body.contains("API_KEY_INVALID");
    let long_wait = retry_info(body).is_some_and(|d| d > LONGEST_RETRY);
    match status {
        408 => ErrorKind::Timeout,
        429 if per_day || long_wait => ErrorKind::QuotaExhausted,
        429 => ErrorKind::RateLimited,
        400 if key_invalid => ErrorKind::Unauthorized,
        401 | 403 => ErrorKind::Unauthorized,
        400 if google_status == "FAILED_PRECONDITION" => ErrorKind::Invalid,
        500..=599 => ErrorKind::Unavailable,
        _ => ErrorKind::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_quotas_map_to_the_documented_retry_decisions() {
        let per_minute = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"You exceeded your current quota. Please retry in 38.9s.",
          "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
                     {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"38s"}]}}"#;
        let per_day = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"quota",
          "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}"#;
        let key = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT",
          "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        let table = [
            (429, per_minute, ErrorKind::RateLimited),
            (429, per_day, ErrorKind::QuotaExhausted),
            (400, key, ErrorKind::Unauthorized),
            (
                400,
                r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"bad"}}"#,
                ErrorKind::Invalid,
            ),
            (
                400,
                r#"{"error":{"code":400,"status":"FAILED_PRECONDITION","message":"billing"}}"#,
                ErrorKind::Invalid,
            ),
            (
                403,
                r#"{"error":{"code":403,"status":"PERMISSION_DENIED"}}"#,
                ErrorKind::Unauthorized,
            ),
            (
                404,
                r#"{"error":{"code":404,"status":"NOT_FOUND"}}"#,
                ErrorKind::Invalid,
            ),
            (
                500,
                r#"{"error":{"code":500,"status":"INTERNAL"}}"#,
                ErrorKind::Unavailable,
            ),
            (
                503,
                r#"{"error":{"code":503,"status":"UNAVAILABLE"}}"#,
                ErrorKind::Unavailable,
            ),
            (
                504,
                r#"{"error":{"code":504,"status":"DEADLINE_EXCEEDED"}}"#,
                ErrorKind::Unavailable,
            ),
        ];
        for (status, body, want) in table {
            assert_eq!(classify(status, body), want, "{status} {body}");
        }
        assert_eq!(
            retry_info(per_minute),
            Some(std::time::Duration::from_secs(38))
        );
        let long = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"retryDelay":"3600s"}]}}"#;
        assert_eq!(classify(429, long), ErrorKind::QuotaExhausted);
    }

    #[test]
    fn usage_counts_thoughts_as_output_and_cached_content_as_cached() {
        let body = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Hi"},{"text":"!"}]},"finishReason":"STOP","index":0}],
          "usageMetadata":{"promptTokenCount":1200,"candidatesTokenCount":300,"thoughtsTokenCount":450,"cachedContentTokenCount":200,
                           "totalTokenCount":1950},"modelVersion":"gemini-2.5-flash","responseId":"r1"}"#;
        let c = parse_response(200, body).unwrap();
        assert_eq!(c.text, "Hi!");
        assert_eq!(c.finish_reason, "STOP");
        assert_eq!(
            c.usage,
            Usage {
                prompt_tokens: 1200,
                cached_tokens: 200,
                completion_tokens: 750
            }
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for body in [
            "",
            "{}",
            r#"{"candidates":[]}"#,
            r#"{"candidates":[{}]}"#,
            "[1,2]",
        ] {
            assert_eq!(
                parse_response(200, body).unwrap_err().kind,
                ErrorKind::Malformed,
                "{body}"
            );
        }
    }
}
