//! Anthropic Messages, `POST /v1/messages`.

use serde_json::{Value, json};

use super::openai::{Completion, Message, Usage};
use super::{ErrorFormat, ErrorKind, ProviderError, http_client, no_body_delay, send};

const FORMAT: ErrorFormat = ErrorFormat {
    provider: PROVIDER,
    classify,
    body_delay: no_body_delay,
};
use crate::config::ProviderSettings;
use crate::domain::Provider;

pub const PROVIDER: Provider = Provider::Anthropic;
const API_VERSION: &str = "2023-06-01";

#[derive(Clone)]
pub struct AnthropicClient {
    http: reqwest::Client,
    settings: ProviderSettings,
    limits: super::BodyLimits,
}

impl AnthropicClient {
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
        let key = super::api_key(&self.settings, PROVIDER, "AIQ_ANTHROPIC_API_KEY")?;
        // System messages go to the top-level `system`; the rest alternate user/assistant.
        let system: Vec<&str> = messages
            .iter()
            .filter(|m| m.role == "system" || m.role == "developer")
            .map(|m| m.content.as_str())
            .collect();
        let turns: Vec<Value> = messages
            .iter()
            .filter(|m| m.role == "user" || m.role == "assistant")
            .map(|m| json!({ "role": m.role, "content": m.content }))
            .collect();
        let mut body = json!({ "model": model, "max_tokens": max_tokens, "messages": turns });
        if !system.is_empty() {
            body["system"] = Value::String(system.join("\n\n"));
        }
        let request = self
            .http
            .post(format!("{}/v1/messages", self.settings.base_url))
            .header("x-api-key", key.expose())
            .header("anthropic-version", API_VERSION)
            .json(&body);
        let answer = send(&FORMAT, &self.limits, request).await?;
        let mut parsed = parse_response(answer.status, &answer.body)?;
        parsed.hold = answer.hold;
        Ok(parsed)
    }
}

/// Parses a 2xx body. Anthropic's `input_tokens` leaves out cache reads and writes, which it
/// reports apart; the prompt is their sum, and cache reads are the cached part.
pub fn parse_response(status: u16, body: &str) -> Result<Completion, ProviderError> {
    let raw: Value =
        serde_json::from_str(body).map_err(|e| ProviderError::malformed(PROVIDER, status, e))?;
    if raw.get("type").and_then(Value::as_str) == Some("error") {
        return Err(ProviderError::malformed(
            PROVIDER,
            status,
            "an error envelope with a 2xx status",
        ));
    }
    let content = raw
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no content"))?;
    let text: String = content
        .iter()
        .filter(|c| c.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|c| c.get("text").and_then(Value::as_str))
        .collect();
    let usage = raw
        .get("usage")
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no usage"))?;
    let count = |k: &str| super::usage_count(usage, &format!("/{k}"), PROVIDER, status);
    let input = count("input_tokens")?
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no usage.input_tokens"))?;
    let output = count("output_tokens")?
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no usage.output_tokens"))?;
    let cache_read = count("cache_read_input_tokens")?.unwrap_or(0);
    let cache_write = count("cache_creation_input_tokens")?.unwrap_or(0);
    Ok(Completion {
        text,
        finish_reason: raw
            .get("stop_reason")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned(),
        usage: Usage {
            prompt_tokens: input + cache_read + cache_write,
            cached_tokens: cache_read,
            completion_tokens: output,
        },
        model: raw
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        raw,
        hold: super::BodyHold::default(),
    })
}

/// The one place that maps an Anthropic status and error envelope to an [`ErrorKind`].
pub fn classify(status: u16, body: &str) -> ErrorKind {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let err_type = v
        .as_ref()
        .and_then(|v| v.pointer("/error/type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let spend_limit = body.contains("enforced_spend_limit_reached");
    match status {
        408 => ErrorKind::Timeout,
        429 if spend_limit => ErrorKind::QuotaExhausted,
        429 => ErrorKind::RateLimited,
        402 => ErrorKind::QuotaExhausted,
        401 | 403 => ErrorKind::Unauthorized,
        529 => ErrorKind::Unavailable,
        500..=599 => ErrorKind::Unavailable,
        400 if spend_limit || err_type == "billing_error" => ErrorKind::QuotaExhausted,
        _ => ErrorKind::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_error_types_map_to_the_documented_retry_decisions() {
        let env = |t: &str| {
            format!(
                r#"{{"type":"error","error":{{"type":"{t}","message":"m"}},"request_id":"req_1"}}"#
            )
        };
        let spend = r#"{"type":"error","error":{"type":"rate_limit_error","message":"limit","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        let table = [
            (400, env("invalid_request_error"), ErrorKind::Invalid),
            (401, env("authentication_error"), ErrorKind::Unauthorized),
            (402, env("billing_error"), ErrorKind::QuotaExhausted),
            (403, env("permission_error"), ErrorKind::Unauthorized),
            (404, env("not_found_error"), ErrorKind::Invalid),
            (413, env("request_too_large"), ErrorKind::Invalid),
            (429, env("rate_limit_error"), ErrorKind::RateLimited),
            (429, spend.to_owned(), ErrorKind::QuotaExhausted),
            (500, env("api_error"), ErrorKind::Unavailable),
            (504, env("timeout_error"), ErrorKind::Unavailable),
            (529, env("overloaded_error"), ErrorKind::Unavailable),
            (408, String::new(), ErrorKind::Timeout),
        ];
        for (status, body, want) in table {
            assert_eq!(classify(status, &body), want, "{status} {body}");
        }
    }

    #[test]
    fn usage_counts_cache_reads_and_writes_as_prompt() {
        let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-haiku-4-5-20251001",
          "content":[{"type":"text","text":"Hello"},{"type":"text","text":" there"}],
          "stop_reason":"end_turn","stop_sequence":null,
          "usage":{"input_tokens":1200,"output_tokens":300,"cache_creation_input_tokens":100,"cache_read_input_tokens":500,
                   "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":0},"service_tier":"standard"}}"#;
        let c = parse_response(200, body).unwrap();
        assert_eq!(c.text, "Hello there");
        assert_eq!(c.finish_reason, "end_turn");
        assert_eq!(
            c.usage,
            Usage {
                prompt_tokens: 1800,
                cached_tokens: 500,
                completion_tokens: 300
            }
        );
    }

    #[test]
    fn garbage_and_error_envelopes_are_malformed_not_a_panic() {
        for body in [
            "",
            "{}",
            r#"{"content":[]}"#,
            r#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
            "<html>",
        ] {
            assert_eq!(
                parse_response(200, body).unwrap_err().kind,
                ErrorKind::Malformed,
                "{body}"
            );
        }
    }
}
