//! OpenAI Chat Completions, `POST /v1/chat/completions`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ErrorFormat, ErrorKind, ProviderError, http_client, no_body_delay, send};

const FORMAT: ErrorFormat = ErrorFormat {
    provider: PROVIDER,
    classify,
    body_delay: no_body_delay,
};
use crate::config::ProviderSettings;
use crate::domain::Provider;

pub const PROVIDER: Provider = Provider::OpenAi;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Token counts from the response's `usage`, the basis of the cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Includes `cached_tokens`.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// Includes reasoning tokens.
    pub completion_tokens: u64,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub raw: Value,
    pub text: String,
    pub finish_reason: String,
    pub usage: Usage,
    /// The model that answered, as the provider names it.
    pub model: String,
    /// The body's share of the memory budget, held until the answer is dropped.
    pub hold: super::BodyHold,
}

#[derive(Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    settings: ProviderSettings,
    limits: super::BodyLimits,
}

impl OpenAiClient {
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
        user: &str,
        request_id: &str,
    ) -> Result<Completion, ProviderError> {
        let key = super::api_key(&self.settings, PROVIDER, "AIQ_OPENAI_API_KEY")?;
        let url = format!("{}/v1/chat/completions", self.settings.base_url);
        let body = serde_json::json!({
            "model": model,
            "messages": messages,
            "max_completion_tokens": max_tokens,
            "stream": false,
            "user": user,
        });
        let request = self
            .http
            .post(url)
            .bearer_auth(key.expose())
            // OpenAI logs this id with the request, so a job can be traced on their side.
            .header("x-client-request-id", request_id)
            .json(&body);
        let answer = send(&FORMAT, &self.limits, request).await?;
        let mut parsed = parse_response(answer.status, &answer.body)?;
        parsed.hold = answer.hold;
        Ok(parsed)
    }
}

/// Parses a 2xx body. A missing `usage` is an error: without it the call cannot be priced.
pub fn parse_response(status: u16, body: &str) -> Result<Completion, ProviderError> {
    let raw: Value =
        serde_json::from_str(body).map_err(|e| ProviderError::malformed(PROVIDER, status, e))?;
    let choice = raw
        .pointer("/choices/0")
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no choices"))?;
    let text = choice
        .pointer("/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let finish_reason = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let usage = raw
        .get("usage")
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no usage"))?;
    let count = |p: &str| super::usage_count(usage, p, PROVIDER, status);
    let usage = Usage {
        prompt_tokens: count("/prompt_tokens")?
            .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no usage.prompt_tokens"))?,
        cached_tokens: count("/prompt_tokens_details/cached_tokens")?.unwrap_or(0),
        completion_tokens: count("/completion_tokens")?.ok_or_else(|| {
            ProviderError::malformed(PROVIDER, status, "no usage.completion_tokens")
        })?,
    };
    if usage.cached_tokens > usage.prompt_tokens {
        return Err(ProviderError::malformed(
            PROVIDER,
            status,
            "cached_tokens exceeds prompt_tokens",
        ));
    }
    let model = raw
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok(Completion {
        raw,
        text,
        finish_reason,
        usage,
        model,
        hold: super::BodyHold::default(),
    })
}

/// The one place that maps an OpenAI status and error body to an [`ErrorKind`].
pub fn classify(status: u16, body: &str) -> ErrorKind {
    let err: Option<Value> = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").cloned());
    let field = |k: &str| {
        err.as_ref()
            .and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (code, kind) = (field("code"), field("type"));
    const QUOTA_CODES: [&str; 5] = [
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    ];
    match status {
        408 => ErrorKind::Timeout,
        429 if kind == "insufficient_quota" || QUOTA_CODES.contains(&code.as_str()) => {
            ErrorKind::QuotaExhausted
        }
        429 => ErrorKind::RateLimited,
        401 | 403 => ErrorKind::Unauthorized,
        409 => ErrorKind::Unavailable,
        500..=599 => ErrorKind::Unavailable,
        _ => ErrorKind::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes_map_to_the_documented_retry_decisions() {
        let table = [
            (
                429,
                r#"{"error":{"message":"Rate limit reached","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
                ErrorKind::RateLimited,
            ),
            (
                429,
                r#"{"error":{"message":"slow down","type":"rate_limit_error","code":"slow_down"}}"#,
                ErrorKind::RateLimited,
            ),
            (
                429,
                r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
                ErrorKind::QuotaExhausted,
            ),
            (
                429,
                r#"{"error":{"message":"spend","type":"invalid_request_error","code":"project_spend_limit_exceeded"}}"#,
                ErrorKind::QuotaExhausted,
            ),
            (
                503,
                r#"{"error":{"message":"overloaded","type":"service_unavailable_error","code":"server_is_overloaded"}}"#,
                ErrorKind::Unavailable,
            ),
            (500, "", ErrorKind::Unavailable),
            (502, "<html>bad gateway</html>", ErrorKind::Unavailable),
            (408, "", ErrorKind::Timeout),
            (
                400,
                r#"{"error":{"message":"bad","type":"invalid_request_error","code":null}}"#,
                ErrorKind::Invalid,
            ),
            (
                401,
                r#"{"error":{"code":"invalid_api_key"}}"#,
                ErrorKind::Unauthorized,
            ),
            (403, "", ErrorKind::Unauthorized),
            (404, "", ErrorKind::Invalid),
        ];
        for (status, body, want) in table {
            assert_eq!(classify(status, body), want, "status {status} body {body}");
        }
    }

    #[test]
    fn usage_is_read_from_the_documented_shape() {
        let body = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1730000000,"model":"gpt-4o-mini-2024-07-18",
          "choices":[{"index":0,"message":{"role":"assistant","content":"hi","refusal":null},"finish_reason":"stop","logprobs":null}],
          "usage":{"prompt_tokens":1200,"completion_tokens":300,"total_tokens":1500,
                   "prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},
                   "completion_tokens_details":{"reasoning_tokens":0}},"service_tier":"default"}"#;
        let c = parse_response(200, body).unwrap();
        assert_eq!(
            c.usage,
            Usage {
                prompt_tokens: 1200,
                cached_tokens: 1024,
                completion_tokens: 300
            }
        );
        assert_eq!(c.text, "hi");
        assert_eq!(c.finish_reason, "stop");
    }

    #[test]
    fn garbage_is_a_malformed_error_not_a_panic() {
        for body in [
            "",
            "null",
            "[]",
            r#"{"choices":[]}"#,
            r#"{"choices":[{"message":{}}]}"#,
            "\u{0}\u{1}",
        ] {
            let e = parse_response(200, body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Malformed, "{body:?}");
        }
    }
}
