//! The test world's common words: payloads of each job kind built from typed parts, and the two
//! waits every test uses instead of sleeping. The integration harness (`tests/it/harness.rs`),
//! the benchmarks and the demo build on these; the harness adds what needs aiq itself (its
//! settings, queue and store).

use std::future::Future;
use std::time::{Duration, Instant};

use aiq_queue::tenant::Tier;
use serde_json::{Value, json};

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);

/// An `llm.complete` payload (jobs/schema/llm.complete.json): by default one user message to
/// OpenAI's gpt-4o-mini, at most 50 tokens.
#[derive(Debug, Clone)]
pub struct LlmJob(Value);

impl LlmJob {
    pub fn new(tier: Tier, org: &str, text: &str) -> Self {
        Self(json!({
            "version": 1, "organization_id": org, "tier": tier.as_str(), "provider": "openai",
            "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": text }], "max_tokens": 50
        }))
    }

    /// The provider and model that answer.
    pub fn model(mut self, provider: &str, model: &str) -> Self {
        self.0["provider"] = provider.into();
        self.0["model"] = model.into();
        self
    }

    /// A system message before the conversation.
    pub fn system(mut self, text: &str) -> Self {
        if let Some(messages) = self.0["messages"].as_array_mut() {
            messages.insert(0, json!({ "role": "system", "content": text }));
        }
        self
    }

    pub fn max_tokens(mut self, n: u64) -> Self {
        self.0["max_tokens"] = n.into();
        self
    }

    /// Any field, to any JSON value: for the tests of what the daemon refuses.
    pub fn set(mut self, field: &str, value: Value) -> Self {
        self.0[field] = value;
        self
    }

    pub fn json(&self) -> String {
        self.0.to_string()
    }
}

/// A `vision.annotate` payload (jobs/schema/vision.annotate.json): `images` inline images, each
/// asked for three labels and the safe-search verdict (two billable units per image).
#[derive(Debug, Clone)]
pub struct VisionJob(Value);

impl VisionJob {
    pub fn new(tier: Tier, org: &str, images: usize) -> Self {
        let images: Vec<Value> = (0..images)
            .map(|i| json!({ "content": format!("aW1hZ2Ug{i:04}") }))
            .collect();
        Self(json!({
            "version": 1, "organization_id": org, "tier": tier.as_str(), "images": images,
            "features": [{ "type": "LABEL_DETECTION", "maxResults": 3 }, { "type": "SAFE_SEARCH_DETECTION" }]
        }))
    }

    /// Any field, to any JSON value.
    pub fn set(mut self, field: &str, value: Value) -> Self {
        self.0[field] = value;
        self
    }

    pub fn json(&self) -> String {
        self.0.to_string()
    }
}

/// Polls `cond` until it holds; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `probe` until it gives a value, and returns that value; fails after `timeout`. For
/// waits whose condition is also the thing the test goes on with (a fetch that leases a job).
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_llm_job_with_a_system_message_and_another_model_keeps_its_user_turn_last() {
        let v: Value = serde_json::from_str(
            &LlmJob::new(Tier::Trial, "0b6f1b3e-2a55-4c3e-9f1a-000000000001", "Hi")
                .system("Be brief.")
                .model("anthropic", "claude-haiku-4-5")
                .max_tokens(40)
                .json(),
        )
        .unwrap();
        assert_eq!(v["provider"], "anthropic");
        assert_eq!(v["model"], "claude-haiku-4-5");
        assert_eq!(v["max_tokens"], 40);
        assert_eq!(v["tier"], "trial");
        assert_eq!(
            v["messages"],
            json!([{ "role": "system", "content": "Be brief." }, { "role": "user", "content": "Hi" }])
        );
    }

    #[test]
    fn a_vision_job_asks_two_features_of_each_image() {
        let v: Value = serde_json::from_str(
            &VisionJob::new(Tier::Enterprise, "0b6f1b3e-2a55-4c3e-9f1a-000000000001", 3).json(),
        )
        .unwrap();
        assert_eq!(v["images"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["images"][2]["content"], "aW1hZ2Ug0002");
        assert_eq!(v["features"].as_array().map(Vec::len), Some(2));
    }
}
