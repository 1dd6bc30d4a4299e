//! The job payloads: the Rust side of the contract in `jobs/schema/`. A payload is decoded once,
//! at the top of the handler, into these types; nothing below sees raw JSON. New fields are
//! additive and carry `#[serde(default)]`.

use serde::Deserialize;

use crate::domain::{JobKind, OrganizationId, Tier};
use crate::providers::openai::Message;
use crate::providers::vision::{Feature, ImageSource, MAX_IMAGES};
use crate::queue::backend::RawJob;

/// The newest payload version this daemon understands.
pub const PAYLOAD_VERSION: u32 = 1;

/// Fields every job kind carries.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    #[serde(default = "default_version")]
    pub version: u32,
    pub organization_id: OrganizationId,
    pub tier: Tier,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// What the job is about (a photo, a document...), recorded with the results.
    #[serde(default)]
    pub subject_id: Option<uuid::Uuid>,
    #[serde(default)]
    pub subject_type: Option<String>,
}

fn default_version() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionPayload {
    #[serde(flatten)]
    pub common: Common,
    pub images: Vec<ImageSource>,
    pub features: Vec<Feature>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LlmPayload {
    #[serde(flatten)]
    pub common: Common,
    pub provider: String,
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    /// Models to try in order when the first cannot answer (additive: absent means none).
    #[serde(default)]
    pub fallback: Vec<ModelRef>,
}

/// One provider and model of an LLM job's fallback chain.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

/// The most fallbacks a job may name.
pub const MAX_FALLBACKS: usize = 3;

const LLM_PROVIDERS: [&str; 3] = ["openai", "anthropic", "gemini"];

impl LlmPayload {
    /// The job's own model, then its fallbacks, in the order they are tried.
    pub fn chain(&self) -> Vec<ModelRef> {
        std::iter::once(ModelRef {
            provider: self.provider.clone(),
            model: self.model.clone(),
        })
        .chain(self.fallback.iter().cloned())
        .collect()
    }
}

#[derive(Debug, Clone)]
pub enum JobInput {
    Vision(VisionPayload),
    Llm(LlmPayload),
}

impl JobInput {
    pub fn common(&self) -> &Common {
        match self {
            JobInput::Vision(v) => &v.common,
            JobInput::Llm(l) => &l.common,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid payload: {0}")]
pub struct DecodeError(pub String);

fn invalid(msg: impl Into<String>) -> DecodeError {
    DecodeError(msg.into())
}

const LLM_ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// Decodes and checks a job's payload against its kind and the queue's record of it.
pub fn decode(raw: &RawJob) -> Result<JobInput, DecodeError> {
    let kind: JobKind = raw
        .kind
        .parse()
        .map_err(|e: crate::domain::UnknownJobKind| invalid(e.to_string()))?;
    let input = match kind {
        JobKind::VisionAnnotate => {
            let v: VisionPayload =
                serde_json::from_str(&raw.payload).map_err(|e| invalid(e.to_string()))?;
            if v.images.is_empty() || v.images.len() > MAX_IMAGES {
                return Err(invalid(format!(
                    "images must hold 1 to {MAX_IMAGES} images, not {}",
                    v.images.len()
                )));
            }
            if v.features.is_empty() {
                return Err(invalid("features must not be empty"));
            }
            for img in &v.images {
                match img {
                    ImageSource::Content { content } if content.is_empty() => {
                        return Err(invalid("an image's content is empty"));
                    }
                    ImageSource::Uri { uri } if uri.is_empty() => {
                        return Err(invalid("an image's uri is empty"));
                    }
                    _ => {}
                }
            }
            JobInput::Vision(v)
        }
        JobKind::LlmComplete => {
            let l: LlmPayload =
                serde_json::from_str(&raw.payload).map_err(|e| invalid(e.to_string()))?;
            if l.messages.is_empty() {
                return Err(invalid("messages must not be empty"));
            }
            if let Some(m) = l
                .messages
                .iter()
                .find(|m| !LLM_ROLES.contains(&m.role.as_str()))
            {
                return Err(invalid(format!("unknown message role {:?}", m.role)));
            }
            if l.max_tokens == 0 || l.max_tokens > 200_000 {
                return Err(invalid("max_tokens must be 1 to 200000"));
            }
            if l.model.is_empty() {
                return Err(invalid("model must not be empty"));
            }
            if l.fallback.len() > MAX_FALLBACKS {
                return Err(invalid(format!(
                    "fallback names {} models; at most {MAX_FALLBACKS}",
                    l.fallback.len()
                )));
            }
            for f in &l.fallback {
                if !LLM_PROVIDERS.contains(&f.provider.as_str()) {
                    return Err(invalid(format!(
                        "fallback provider {:?} is not one of openai, anthropic, gemini",
                        f.provider
                    )));
                }
                if f.model.is_empty() {
                    return Err(invalid("a fallback's model must not be empty"));
                }
            }
            JobInput::Llm(l)
        }
    };
    let c = input.common();
    if c.version == 0 || c.version > PAYLOAD_VERSION {
        return Err(invalid(format!(
            "payload version {} is not supported (this daemon reads up to {PAYLOAD_VERSION})",
            c.version
        )));
    }
    if c.tier.as_str() != raw.tier {
        return Err(invalid(format!(
            "payload tier {} differs from the queue's tier {}",
            c.tier, raw.tier
        )));
    }
    if c.organization_id.to_string() != raw.organization_id {
        return Err(invalid(
            "payload organization_id differs from the one it was enqueued with",
        ));
    }
    Ok(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d";

    fn raw(kind: &str, payload: &str) -> RawJob {
        RawJob {
            id: "j1".into(),
            kind: kind.into(),
            tier: "trial".into(),
            organization_id: ORG.into(),
            payload: payload.into(),
            token: 1,
            attempt: 1,
            max_attempts: 3,
            enqueued_at_ms: 0,
            interrupts: 0,
            prior: Default::default(),
        }
    }

    #[test]
    fn the_example_payloads_decode() {
        let vision = include_str!("../../jobs/examples/vision.annotate.json");
        let llm = include_str!("../../jobs/examples/llm.complete.json");
        let mut r = raw("vision.annotate", vision);
        r.tier = "enterprise".into();
        assert!(matches!(decode(&r).unwrap(), JobInput::Vision(_)));
        let mut r = raw("llm.complete", llm);
        r.tier = "growth_team".into();
        assert!(matches!(decode(&r).unwrap(), JobInput::Llm(_)));
    }

    #[test]
    fn a_fallback_chain_is_tried_after_the_jobs_own_model() {
        let p = format!(
            r#"{{"organization_id":"{ORG}","tier":"trial","provider":"openai","model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}],"max_tokens":10,
                "fallback":[{{"provider":"anthropic","model":"claude-3-5-haiku"}},{{"provider":"gemini","model":"gemini-2.0-flash"}}]}}"#
        );
        let JobInput::Llm(l) = decode(&raw("llm.complete", &p)).unwrap() else {
            panic!("an llm job")
        };
        let chain: Vec<String> = l
            .chain()
            .iter()
            .map(|m| format!("{}:{}", m.provider, m.model))
            .collect();
        assert_eq!(
            chain,
            [
                "openai:gpt-4o-mini",
                "anthropic:claude-3-5-haiku",
                "gemini:gemini-2.0-flash"
            ]
        );
    }

    #[test]
    fn bad_payloads_are_refused_with_a_reason() {
        let ok_llm = format!(
            r#"{{"organization_id":"{ORG}","tier":"trial","provider":"openai","model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}],"max_tokens":10}}"#
        );
        assert!(decode(&raw("llm.complete", &ok_llm)).is_ok());
        let cases = [
            ("llm.complete", "not json".to_string(), "expected"),
            ("llm.complete", "{}".to_string(), "missing field"),
            (
                "llm.complete",
                ok_llm.replace("\"max_tokens\":10", "\"max_tokens\":0"),
                "max_tokens",
            ),
            (
                "llm.complete",
                ok_llm.replace("\"user\"", "\"wizard\""),
                "role",
            ),
            (
                "llm.complete",
                ok_llm.replace("\"trial\"", "\"enterprise\""),
                "differs",
            ),
            (
                "llm.complete",
                ok_llm.replace("\"trial\"", "\"gold\""),
                "unknown variant",
            ),
            (
                "llm.complete",
                ok_llm.replace("{\"organization_id\"", "{\"version\":9,\"organization_id\""),
                "version",
            ),
            (
                "llm.complete",
                ok_llm.replace(
                    "\"max_tokens\":10",
                    "\"max_tokens\":10,\"fallback\":[{\"provider\":\"mistral\",\"model\":\"m\"}]",
                ),
                "fallback provider",
            ),
            (
                "llm.complete",
                ok_llm.replace(
                    "\"max_tokens\":10",
                    "\"max_tokens\":10,\"fallback\":[{\"provider\":\"gemini\",\"model\":\"\"}]",
                ),
                "fallback's model",
            ),
            (
                "llm.complete",
                ok_llm.replace(
                    "\"max_tokens\":10",
                    &format!(
                        "\"max_tokens\":10,\"fallback\":[{}]",
                        [r#"{"provider":"gemini","model":"gemini-2.0-flash"}"#; 4].join(",")
                    ),
                ),
                "at most 3",
            ),
            ("vision.annotate", ok_llm.clone(), "missing field"),
            ("sound.transcribe", ok_llm.clone(), "unknown job kind"),
        ];
        for (kind, payload, want) in cases {
            let err = decode(&raw(kind, &payload)).unwrap_err();
            assert!(
                err.0.contains(want),
                "{kind} {payload}: {err} should mention {want}"
            );
        }
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;

    /// The JSON Schemas in jobs/schema are the contract other languages code against; the
    /// decoder must refuse exactly what they call required.
    #[test]
    fn every_field_the_schemas_require_is_required_by_the_decoder() {
        let cases = [
            (
                "vision.annotate",
                include_str!("../../jobs/schema/vision.annotate.json"),
                include_str!("../../jobs/examples/vision.annotate.json"),
            ),
            (
                "llm.complete",
                include_str!("../../jobs/schema/llm.complete.json"),
                include_str!("../../jobs/examples/llm.complete.json"),
            ),
        ];
        for (kind, schema, example) in cases {
            let schema: serde_json::Value = serde_json::from_str(schema).unwrap();
            let example: serde_json::Value = serde_json::from_str(example).unwrap();
            let raw = |payload: &serde_json::Value| RawJob {
                id: "j".into(),
                kind: kind.into(),
                tier: example["tier"].as_str().unwrap().into(),
                organization_id: example["organization_id"].as_str().unwrap().into(),
                payload: payload.to_string(),
                token: 1,
                attempt: 1,
                max_attempts: 1,
                enqueued_at_ms: 0,
                interrupts: 0,
                prior: Default::default(),
            };
            assert!(decode(&raw(&example)).is_ok(), "{kind} example decodes");
            let required = schema["required"].as_array().unwrap();
            assert!(!required.is_empty());
            for field in required {
                let field = field.as_str().unwrap();
                let mut without = example.clone();
                without.as_object_mut().unwrap().remove(field);
                assert!(
                    decode(&raw(&without)).is_err(),
                    "{kind} without {field} must be refused"
                );
            }
            for field in schema["properties"].as_object().unwrap().keys() {
                assert!(example.get(field).is_some(), "{kind} example shows {field}");
            }
        }
    }
}
