//! The job payloads: the Rust side of the contract in `jobs/schema/`. A payload is decoded once,
//! at the top of the handler, into these types; nothing below sees raw JSON. The decoder refuses
//! exactly what the schemas refuse (a test walks every keyword of every schema file to hold it to
//! that), then what only the daemon knows: a model the price catalog cannot price or whose output
//! limit is below `max_tokens`, and a tier or organisation other than the one the job was enqueued
//! with. Every refusal names the field, e.g. `messages[2].content: ...`. Fields the schemas do not
//! name are ignored: the contract grows by optional fields, and a producer newer than this daemon
//! must not see its jobs killed for them.

use serde_json::{Map, Value};

use crate::budget::PriceCatalog;
use crate::domain::{JobKind, OrganizationId, Provider, Tier};
use crate::providers::openai::Message;
use crate::providers::vision::{Feature, ImageSource, MAX_IMAGES};
use crate::queue::backend::RawJob;

/// The newest payload version this daemon understands.
pub const PAYLOAD_VERSION: u32 = 1;

// The caps below mirror `jobs/schema/*.json`; the schema walk in the tests fails when they drift.

/// `idempotency_key` and `correlation_id`, in characters.
pub const MAX_KEY_CHARS: usize = 200;
/// `subject_type`, in characters.
pub const MAX_SUBJECT_TYPE_CHARS: usize = 50;
/// A model name (the job's own and each fallback's), in characters.
pub const MAX_MODEL_CHARS: usize = 100;
/// An image's `uri`, in characters.
pub const MAX_URI_CHARS: usize = 2048;
/// An image's base64 `content`: the whole payload is at most 10 MiB anyway (enqueue.lua).
pub const MAX_IMAGE_CONTENT_CHARS: usize = 10 * 1024 * 1024;
/// One message's `content`: about a million tokens of prose, more than any catalog model reads.
pub const MAX_MESSAGE_CHARS: usize = 4 * 1024 * 1024;
/// `max_tokens`, whatever the model; the catalog's `max_output_tokens` is usually lower.
pub const MAX_TOKENS: u64 = 200_000;
/// A Vision feature's `maxResults`: the API's field is an int32.
pub const MAX_RESULTS: u64 = i32::MAX as u64;
/// The most fallbacks a job may name.
pub const MAX_FALLBACKS: usize = 3;

const LLM_PROVIDERS: [&str; 3] = [
    Provider::OpenAi.as_str(),
    Provider::Anthropic.as_str(),
    Provider::Gemini.as_str(),
];
const LLM_ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];
const TIERS: [&str; 6] = [
    "enterprise_plus",
    "enterprise",
    "professional_agency",
    "growth_team",
    "solo_professional",
    "trial",
];
/// The Vision features of the schema's enum; each must also be priced in the catalog.
const VISION_FEATURES: [&str; 11] = [
    "LABEL_DETECTION",
    "TEXT_DETECTION",
    "DOCUMENT_TEXT_DETECTION",
    "SAFE_SEARCH_DETECTION",
    "FACE_DETECTION",
    "LANDMARK_DETECTION",
    "LOGO_DETECTION",
    "IMAGE_PROPERTIES",
    "CROP_HINTS",
    "WEB_DETECTION",
    "OBJECT_LOCALIZATION",
];

/// Fields every job kind carries.
#[derive(Debug, Clone)]
pub struct Common {
    pub version: u32,
    pub organization_id: OrganizationId,
    pub tier: Tier,
    pub idempotency_key: Option<String>,
    pub correlation_id: Option<String>,
    /// What the job is about (a photo, a document...), recorded with the results.
    pub subject_id: Option<uuid::Uuid>,
    pub subject_type: Option<String>,
    /// Where the job's final event is also posted (a signed webhook); its address is checked
    /// after decoding (`crate::webhooks::address`).
    pub callback_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct VisionPayload {
    pub common: Common,
    pub images: Vec<ImageSource>,
    pub features: Vec<Feature>,
}

#[derive(Debug, Clone)]
pub struct LlmPayload {
    pub common: Common,
    pub provider: String,
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    /// Models to try in order when the first cannot answer (additive: absent means none).
    pub fallback: Vec<ModelRef>,
}

/// One provider and model of an LLM job's fallback chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

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

/// Which contract a refused payload breaks. The decoder checks all of `Schema` before any of the
/// others, so a payload it refuses for `Catalog` or `Queue` is one the schemas accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `jobs/schema` (the payload is a JSON object of a known kind, and each field is as the
    /// kind's schema says).
    Schema,
    /// The price catalog: every model of the chain is priced, and `max_tokens` fits the output
    /// limit of each.
    Catalog,
    /// The queue's record: the payload's tier and organisation are those it was enqueued with.
    Queue,
}

/// A refused payload: the field (a path such as `features[0].maxResults`, empty when the payload
/// as a whole is wrong) and why. The message never holds a control character, since it is stored
/// in PostgreSQL (which refuses NUL) and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub field: String,
    pub reason: String,
    pub rule: Rule,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "invalid payload: {}", self.reason)
        } else {
            write!(f, "invalid payload: {}: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for DecodeError {}

fn refuse(field: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError {
        field: field.to_owned(),
        reason: reason.into(),
        rule: Rule::Schema,
    }
}

/// Decodes and checks a job's payload against its kind's schema, the price catalog and the
/// queue's record of the job.
pub fn decode(raw: &RawJob, prices: &PriceCatalog) -> Result<JobInput, DecodeError> {
    let kind: JobKind = raw
        .kind
        .parse()
        .map_err(|e: crate::domain::UnknownJobKind| refuse("", e.to_string()))?;
    let value: Value = serde_json::from_str(&raw.payload)
        .map_err(|e| refuse("", format!("the payload is not JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(refuse(
            "",
            format!(
                "the payload must be a JSON object, not {}",
                type_name(&value)
            ),
        ));
    };
    let mut obj = Object {
        path: String::new(),
        map,
    };
    let common = common(&mut obj)?;
    let input = match kind {
        JobKind::VisionAnnotate => JobInput::Vision(vision(obj, common)?),
        JobKind::LlmComplete => {
            let l = llm(obj, common)?;
            check_catalog(&l, prices)?;
            JobInput::Llm(l)
        }
    };
    check_queue(input.common(), raw)?;
    Ok(input)
}

fn common(obj: &mut Object) -> Result<Common, DecodeError> {
    // Absent means version 1, the contract's default.
    if let Some((field, v)) = obj.take("version")
        && as_integer(&v) != Some(PAYLOAD_VERSION as f64)
    {
        return Err(refuse(
            &field,
            format!(
                "must be {PAYLOAD_VERSION}, the payload version this daemon reads, not {}",
                shown(&v)
            ),
        ));
    }
    let (field, v) = obj.require("organization_id")?;
    let organization_id = OrganizationId::from(uuid(&field, &v)?);
    let (field, v) = obj.require("tier")?;
    let tier: Tier = one_of(&field, &v, &TIERS)?
        .parse()
        .expect("TIERS holds the names of Tier::ALL");
    let idempotency_key = obj
        .take("idempotency_key")
        .map(|(f, v)| text(&f, v, Text::line(1, MAX_KEY_CHARS)))
        .transpose()?;
    let correlation_id = obj
        .take("correlation_id")
        .map(|(f, v)| text(&f, v, Text::line(0, MAX_KEY_CHARS)))
        .transpose()?;
    let subject_id = obj
        .take("subject_id")
        .map(|(f, v)| uuid(&f, &v))
        .transpose()?;
    let subject_type = obj
        .take("subject_type")
        .map(|(f, v)| text(&f, v, Text::line(0, MAX_SUBJECT_TYPE_CHARS)))
        .transpose()?;
    let callback_url = obj
        .take("callback_url")
        .map(|(f, v)| callback_url(&f, v))
        .transpose()?;
    Ok(Common {
        version: PAYLOAD_VERSION,
        organization_id,
        tier,
        idempotency_key,
        correlation_id,
        subject_id,
        subject_type,
        callback_url,
    })
}

/// `callback_url`: the schema's `^https?://[^\u0000-\u0020\u007f]+$`, at most
/// [`MAX_URI_CHARS`] characters.
fn callback_url(field: &str, v: Value) -> Result<String, DecodeError> {
    let s = check_text(field, &v, Text::line(1, MAX_URI_CHARS))?;
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    if !rest.is_some_and(|r| !r.is_empty() && !r.contains(' ')) {
        return Err(refuse(
            field,
            "must be an http:// or https:// URL, without spaces",
        ));
    }
    Ok(into_string(v))
}

fn vision(mut obj: Object, common: Common) -> Result<VisionPayload, DecodeError> {
    let (field, v) = obj.require("images")?;
    let images = array(&field, v, 1, MAX_IMAGES)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| image(&format!("{field}[{i}]"), v))
        .collect::<Result<_, _>>()?;
    let (field, v) = obj.require("features")?;
    let features = array(&field, v, 1, usize::MAX)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| feature(Object::new(format!("{field}[{i}]"), v)?))
        .collect::<Result<_, _>>()?;
    Ok(VisionPayload {
        common,
        images,
        features,
    })
}

/// An image is `{"content": ...}` or `{"uri": ...}`: the schema's `oneOf`, so exactly one of the
/// two must be valid (an image with both is refused, one with a valid uri and a broken content is
/// not).
fn image(path: &str, v: Value) -> Result<ImageSource, DecodeError> {
    let mut obj = Object::new(path.to_owned(), v)?;
    let content = obj.take("content").map(|(f, v)| {
        check_text(&f, &v, Text::line(1, MAX_IMAGE_CONTENT_CHARS))?;
        Ok::<_, DecodeError>(v)
    });
    let uri = obj.take("uri").map(|(f, v)| {
        check_text(&f, &v, Text::line(1, MAX_URI_CHARS))?;
        Ok::<_, DecodeError>(v)
    });
    match (content, uri) {
        (Some(Ok(_)), Some(Ok(_))) => Err(refuse(path, "must hold content or uri, not both")),
        (Some(Ok(content)), _) => Ok(ImageSource::Content {
            content: into_string(content),
        }),
        (_, Some(Ok(uri))) => Ok(ImageSource::Uri {
            uri: into_string(uri),
        }),
        (Some(Err(e)), _) | (None, Some(Err(e))) => Err(e),
        (None, None) => Err(refuse(
            path,
            "must hold content (base64 bytes) or uri (gs:// or https://)",
        )),
    }
}

fn feature(mut obj: Object) -> Result<Feature, DecodeError> {
    let (field, v) = obj.require("type")?;
    let kind = one_of(&field, &v, &VISION_FEATURES)?.to_owned();
    let max_results = obj
        .take("maxResults")
        .map(|(f, v)| integer(&f, &v, 1, MAX_RESULTS).map(|n| n as u32))
        .transpose()?;
    Ok(Feature { kind, max_results })
}

fn llm(mut obj: Object, common: Common) -> Result<LlmPayload, DecodeError> {
    let (field, v) = obj.require("provider")?;
    let provider = one_of(&field, &v, &LLM_PROVIDERS)?.to_owned();
    let (field, v) = obj.require("model")?;
    let model = text(&field, v, Text::line(1, MAX_MODEL_CHARS))?;
    let (field, v) = obj.require("messages")?;
    let messages: Vec<Message> = array(&field, v, 1, usize::MAX)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| message(Object::new(format!("{field}[{i}]"), v)?))
        .collect::<Result<_, _>>()?;
    // Providers answer the last user turn; system and developer messages alone would be sent as
    // an empty conversation.
    if !messages.iter().any(|m| m.role == "user") {
        return Err(refuse(
            &field,
            "must hold at least one user message (system and developer messages alone leave nothing to answer)",
        ));
    }
    let (field, v) = obj.require("max_tokens")?;
    let max_tokens = integer(&field, &v, 1, MAX_TOKENS)? as u32;
    let fallback = match obj.take("fallback") {
        None => Vec::new(),
        Some((field, v)) => array(&field, v, 0, MAX_FALLBACKS)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| model_ref(Object::new(format!("{field}[{i}]"), v)?))
            .collect::<Result<_, _>>()?,
    };
    Ok(LlmPayload {
        common,
        provider,
        model,
        messages,
        max_tokens,
        fallback,
    })
}

fn message(mut obj: Object) -> Result<Message, DecodeError> {
    let (field, v) = obj.require("role")?;
    let role = one_of(&field, &v, &LLM_ROLES)?.to_owned();
    let (field, v) = obj.require("content")?;
    let content = text(&field, v, Text::prose(MAX_MESSAGE_CHARS))?;
    Ok(Message { role, content })
}

fn model_ref(mut obj: Object) -> Result<ModelRef, DecodeError> {
    let (field, v) = obj.require("provider")?;
    let provider = one_of(&field, &v, &LLM_PROVIDERS)?.to_owned();
    let (field, v) = obj.require("model")?;
    let model = text(&field, v, Text::line(1, MAX_MODEL_CHARS))?;
    Ok(ModelRef { provider, model })
}

/// Every model of the chain is priced and can give `max_tokens`: checked before the job's own
/// model is tried, so an unpriced fallback cannot kill a job halfway, and no call is sent that the
/// provider would refuse for its size.
fn check_catalog(l: &LlmPayload, prices: &PriceCatalog) -> Result<(), DecodeError> {
    let chain = std::iter::once(("model".to_owned(), &l.provider, &l.model)).chain(
        l.fallback
            .iter()
            .enumerate()
            .map(|(i, f)| (format!("fallback[{i}].model"), &f.provider, &f.model)),
    );
    let catalog = |field: &str, reason: String| DecodeError {
        field: field.to_owned(),
        reason,
        rule: Rule::Catalog,
    };
    for (field, provider, model) in chain {
        let limit = prices.max_output_tokens(provider, model).map_err(|_| {
            catalog(
                &field,
                format!(
                    "{provider}:{} has no price in the catalog (version {}); an unpriced model is never run",
                    shown(&Value::String(model.clone())),
                    prices.version
                ),
            )
        })?;
        if l.max_tokens > limit {
            return Err(catalog(
                "max_tokens",
                format!(
                    "must be <= {limit}, the output limit of {provider}:{model} ({field}), not {}",
                    l.max_tokens
                ),
            ));
        }
    }
    Ok(())
}

/// The payload's tier and organisation must be those the job was enqueued with (the queue
/// schedules and bills by the arguments). Organisations are compared as UUIDs, so an upper-case
/// payload UUID of the same value is the same organisation.
fn check_queue(c: &Common, raw: &RawJob) -> Result<(), DecodeError> {
    let queue = |field: &str, reason: String| DecodeError {
        field: field.to_owned(),
        reason,
        rule: Rule::Queue,
    };
    if c.tier.as_str() != raw.tier {
        return Err(queue(
            "tier",
            format!(
                "{} differs from the queue's tier {}",
                c.tier,
                shown(&Value::String(raw.tier.clone()))
            ),
        ));
    }
    match parse_uuid(&raw.organization_id) {
        Some(org) if org == c.organization_id.as_uuid() => Ok(()),
        Some(org) => Err(queue(
            "organization_id",
            format!(
                "{} differs from the organization_id the job was enqueued with ({org})",
                c.organization_id
            ),
        )),
        None => Err(queue(
            "organization_id",
            format!(
                "the job was enqueued with {}, which is not a UUID",
                shown(&Value::String(raw.organization_id.clone()))
            ),
        )),
    }
}

/// A JSON object being taken apart, with its path for the messages.
struct Object {
    path: String,
    map: Map<String, Value>,
}

impl Object {
    fn new(path: String, v: Value) -> Result<Self, DecodeError> {
        match v {
            Value::Object(map) => Ok(Object { path, map }),
            other => Err(refuse(
                &path,
                format!("must be an object, not {}", type_name(&other)),
            )),
        }
    }

    fn field(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// The field's path and value, if present.
    fn take(&mut self, name: &str) -> Option<(String, Value)> {
        let v = self.map.remove(name)?;
        Some((self.field(name), v))
    }

    fn require(&mut self, name: &str) -> Result<(String, Value), DecodeError> {
        self.take(name)
            .ok_or_else(|| refuse(&self.field(name), "missing field"))
    }
}

/// The rules for a string field: its length in characters (JSON Schema counts code points) and
/// whether it is prose, where tab, line feed and carriage return are allowed.
#[derive(Clone, Copy)]
struct Text {
    min: usize,
    max: usize,
    prose: bool,
}

impl Text {
    fn line(min: usize, max: usize) -> Self {
        Text {
            min,
            max,
            prose: false,
        }
    }

    fn prose(max: usize) -> Self {
        Text {
            min: 0,
            max,
            prose: true,
        }
    }
}

/// C0 controls and DEL: PostgreSQL refuses NUL in text (SQLSTATE 22021) after the provider was
/// paid, and the others have no place in names, keys and URIs. They are all ASCII, so a byte scan
/// finds them in UTF-8.
fn is_refused_control(b: u8, prose: bool) -> bool {
    (b < 0x20 || b == 0x7f) && !(prose && matches!(b, b'\t' | b'\n' | b'\r'))
}

fn check_text<'v>(field: &str, v: &'v Value, rule: Text) -> Result<&'v str, DecodeError> {
    let Value::String(s) = v else {
        return Err(refuse(
            field,
            format!("must be a string, not {}", type_name(v)),
        ));
    };
    if rule.min > 0 && s.chars().take(rule.min).count() < rule.min {
        return Err(refuse(
            field,
            if rule.min == 1 {
                "must not be empty".to_owned()
            } else {
                format!("must be at least {} characters", rule.min)
            },
        ));
    }
    // A string of at most `max` bytes has at most `max` characters; count only longer ones.
    if s.len() > rule.max {
        let chars = s.chars().count();
        if chars > rule.max {
            return Err(refuse(
                field,
                format!("must be at most {} characters, not {chars}", rule.max),
            ));
        }
    }
    if let Some(at) = s.bytes().position(|b| is_refused_control(b, rule.prose)) {
        let allowed = if rule.prose {
            " other than tab, line feed and carriage return"
        } else {
            ""
        };
        return Err(refuse(
            field,
            format!(
                "must not hold control characters{allowed}: U+{:04X} at byte {at}",
                s.as_bytes()[at]
            ),
        ));
    }
    Ok(s)
}

fn text(field: &str, v: Value, rule: Text) -> Result<String, DecodeError> {
    check_text(field, &v, rule)?;
    Ok(into_string(v))
}

/// The string of a value [`check_text`] accepted, moved out rather than copied (image content
/// runs to megabytes).
fn into_string(v: Value) -> String {
    match v {
        Value::String(s) => s,
        _ => unreachable!("check_text accepted only strings"),
    }
}

fn one_of(field: &str, v: &Value, allowed: &[&'static str]) -> Result<&'static str, DecodeError> {
    v.as_str()
        .and_then(|s| allowed.iter().copied().find(|a| *a == s))
        .ok_or_else(|| {
            refuse(
                field,
                format!("must be one of {}, not {}", allowed.join(", "), shown(v)),
            )
        })
}

/// The value of a JSON number without a fractional part (JSON Schema's `integer`: `64.0` is one).
fn as_integer(v: &Value) -> Option<f64> {
    let n = v.as_number()?;
    if n.is_u64() || n.is_i64() {
        // Exact for every value the caps allow; larger ones only need to compare as too large.
        return n.as_f64();
    }
    n.as_f64().filter(|f| f.fract() == 0.0)
}

fn integer(field: &str, v: &Value, min: u64, max: u64) -> Result<u64, DecodeError> {
    let Some(n) = as_integer(v) else {
        return Err(refuse(
            field,
            format!("must be an integer, not {}", shown(v)),
        ));
    };
    if n < min as f64 {
        return Err(refuse(field, format!("must be >= {min}")));
    }
    if n > max as f64 {
        return Err(refuse(field, format!("must be <= {max}")));
    }
    Ok(match v.as_u64() {
        Some(u) => u,
        // An integral float inside the caps, e.g. 64.0.
        None => n as u64,
    })
}

fn array(field: &str, v: Value, min: usize, max: usize) -> Result<Vec<Value>, DecodeError> {
    let Value::Array(items) = v else {
        return Err(refuse(
            field,
            format!("must be an array, not {}", type_name(&v)),
        ));
    };
    if items.len() < min {
        return Err(refuse(
            field,
            format!(
                "must hold at least {min} item{}",
                if min == 1 { "" } else { "s" }
            ),
        ));
    }
    if items.len() > max {
        return Err(refuse(
            field,
            format!("must hold at most {max} items, not {}", items.len()),
        ));
    }
    Ok(items)
}

/// A UUID in the schema's `format: uuid`: 8-4-4-4-12 hex digits, either case. The uuid crate
/// also reads the braced, URN and hyphen-less forms, which the contract does not allow.
fn parse_uuid(s: &str) -> Option<uuid::Uuid> {
    let b = s.as_bytes();
    let shaped = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
    if shaped {
        uuid::Uuid::try_parse(s).ok()
    } else {
        None
    }
}

fn uuid(field: &str, v: &Value) -> Result<uuid::Uuid, DecodeError> {
    let Value::String(s) = v else {
        return Err(refuse(
            field,
            format!("must be a string, not {}", type_name(v)),
        ));
    };
    parse_uuid(s).ok_or_else(|| {
        refuse(
            field,
            format!("must be a UUID (8-4-4-4-12 hex digits), not {}", shown(v)),
        )
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for a message: JSON, cut to a few dozen characters so a megabyte of content is not
/// copied into the error row. JSON escapes the C0 controls but not DEL, so DEL is escaped here.
fn shown(v: &Value) -> String {
    const MAX: usize = 40;
    let json = match v {
        Value::Array(_) => return "an array".to_owned(),
        Value::Object(_) => return "an object".to_owned(),
        Value::String(s) => match s.char_indices().nth(MAX) {
            Some((cut, _)) => format!("{}...", Value::from(&s[..cut])),
            None => v.to_string(),
        },
        _ => v.to_string(),
    };
    json.replace('\u{7f}', "\\u007f")
}

#[cfg(test)]
mod contract_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d";
    const VISION: &str = include_str!("../../jobs/examples/vision.annotate.json");
    const LLM: &str = include_str!("../../jobs/examples/llm.complete.json");

    fn raw(kind: &str, tier: &str, payload: &str) -> RawJob {
        RawJob {
            id: "j1".into(),
            kind: kind.into(),
            tier: tier.into(),
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

    fn decode_json(kind: &str, v: &Value) -> Result<JobInput, DecodeError> {
        let tier = v["tier"].as_str().unwrap_or("trial");
        decode(&raw(kind, tier, &v.to_string()), &PriceCatalog::builtin())
    }

    /// The example of `kind` with `edit` applied.
    fn example(kind: &str, edit: impl FnOnce(&mut Value)) -> Value {
        let mut v: Value =
            serde_json::from_str(if kind == "llm.complete" { LLM } else { VISION }).unwrap();
        edit(&mut v);
        v
    }

    #[test]
    fn the_example_payloads_decode() {
        let JobInput::Vision(v) =
            decode_json("vision.annotate", &example("vision.annotate", |_| {})).unwrap()
        else {
            panic!("a vision job")
        };
        assert_eq!(v.images.len(), 2);
        assert_eq!(v.features[0].max_results, Some(10));
        assert_eq!(v.common.subject_type.as_deref(), Some("photo"));
        let JobInput::Llm(l) =
            decode_json("llm.complete", &example("llm.complete", |_| {})).unwrap()
        else {
            panic!("an llm job")
        };
        assert_eq!(l.max_tokens, 64);
        assert_eq!(l.messages[1].role, "user");
        assert_eq!(l.common.version, 1);
    }

    #[test]
    fn a_fallback_chain_is_tried_after_the_jobs_own_model() {
        let JobInput::Llm(l) =
            decode_json("llm.complete", &example("llm.complete", |_| {})).unwrap()
        else {
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
                "anthropic:claude-haiku-4-5",
                "gemini:gemini-2.5-flash"
            ]
        );
    }

    /// The payloads found to run, or to die for the wrong reason, before the decoder enforced the
    /// contract; each is refused with the field and the rule it breaks.
    #[test]
    fn the_payloads_that_used_to_slip_through_are_refused_naming_the_field() {
        let long = |n: usize| Value::from("x".repeat(n));
        let cases: Vec<(&str, Value, &str, &str, Rule)> = vec![
            (
                "vision.annotate",
                example("vision.annotate", |v| {
                    v["features"][0]["maxResults"] = 0.into()
                }),
                "features[0].maxResults",
                "must be >= 1",
                Rule::Schema,
            ),
            (
                "vision.annotate",
                example("vision.annotate", |v| v["correlation_id"] = long(201)),
                "correlation_id",
                "at most 200 characters, not 201",
                Rule::Schema,
            ),
            (
                "vision.annotate",
                example("vision.annotate", |v| v["subject_type"] = long(51)),
                "subject_type",
                "at most 50 characters",
                Rule::Schema,
            ),
            (
                "llm.complete",
                example("llm.complete", |v| v["provider"] = "mistral".into()),
                "provider",
                "must be one of openai, anthropic, gemini, not \"mistral\"",
                Rule::Schema,
            ),
            (
                "vision.annotate",
                example("vision.annotate", |v| {
                    v["features"][1]["type"] = "MIND_READING".into()
                }),
                "features[1].type",
                "must be one of LABEL_DETECTION",
                Rule::Schema,
            ),
            (
                "llm.complete",
                example("llm.complete", |v| {
                    v["fallback"][1]["model"] = "gemini-0-ultra".into()
                }),
                "fallback[1].model",
                "gemini:\"gemini-0-ultra\" has no price in the catalog",
                Rule::Catalog,
            ),
            (
                "llm.complete",
                example(
                    "llm.complete",
                    |v| {
                        v["messages"] =
                            serde_json::json!([{ "role": "system", "content": "Be brief." }])
                    },
                ),
                "messages",
                "at least one user message",
                Rule::Schema,
            ),
            (
                "llm.complete",
                example("llm.complete", |v| v["max_tokens"] = 200_000.into()),
                "max_tokens",
                "must be <= 16384, the output limit of openai:gpt-4o-mini (model)",
                Rule::Catalog,
            ),
            (
                "llm.complete",
                example("llm.complete", |v| {
                    v["model"] = "claude-sonnet-4-5".into();
                    v["provider"] = "anthropic".into();
                    v["max_tokens"] = 32_000.into();
                    v["fallback"] =
                        serde_json::json!([{ "provider": "openai", "model": "gpt-4o" }]);
                }),
                "max_tokens",
                "the output limit of openai:gpt-4o (fallback[0].model)",
                Rule::Catalog,
            ),
            (
                "llm.complete",
                example("llm.complete", |v| {
                    v["messages"][1]["content"] = "a\u{0}b".into()
                }),
                "messages[1].content",
                "must not hold control characters other than tab, line feed and carriage return: U+0000 at byte 1",
                Rule::Schema,
            ),
            (
                "llm.complete",
                example("llm.complete", |v| v["model"] = "gpt-4o-mini\t".into()),
                "model",
                "must not hold control characters: U+0009",
                Rule::Schema,
            ),
            (
                "vision.annotate",
                example("vision.annotate", |v| v["idempotency_key"] = "".into()),
                "idempotency_key",
                "must not be empty",
                Rule::Schema,
            ),
            (
                "vision.annotate",
                example("vision.annotate", |v| {
                    v["images"][0]["uri"] = "gs://b/o.jpg".into();
                }),
                "images[0]",
                "not both",
                Rule::Schema,
            ),
            (
                "vision.annotate",
                example("vision.annotate", |v| {
                    v["subject_id"] = "5f0c8a2e9d1b4f438a6e0c7b2d9e1a33".into()
                }),
                "subject_id",
                "must be a UUID",
                Rule::Schema,
            ),
            (
                "vision.annotate",
                example("vision.annotate", |v| v["version"] = 9.into()),
                "version",
                "must be 1, the payload version this daemon reads, not 9",
                Rule::Schema,
            ),
            (
                "llm.complete",
                example("llm.complete", |v| {
                    v["organization_id"] = "7c0f5e1a-0000-4000-8000-000000000001".into()
                }),
                "organization_id",
                "differs from the organization_id the job was enqueued with",
                Rule::Queue,
            ),
            (
                "vision.annotate",
                example("llm.complete", |_| {}),
                "images",
                "missing field",
                Rule::Schema,
            ),
        ];
        for (kind, payload, field, reason, rule) in cases {
            let err = decode_json(kind, &payload).unwrap_err();
            assert_eq!(
                (err.field.as_str(), err.rule),
                (field, rule),
                "{kind}: {err}"
            );
            assert!(err.reason.contains(reason), "{err} should say {reason:?}");
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid payload: {field}: "))
            );
        }
    }

    #[test]
    fn a_tier_other_than_the_queues_is_refused() {
        let p = example("llm.complete", |_| {}).to_string();
        let err = decode(&raw("llm.complete", "trial", &p), &PriceCatalog::builtin()).unwrap_err();
        assert_eq!((err.field.as_str(), err.rule), ("tier", Rule::Queue));
        assert_eq!(
            err.to_string(),
            "invalid payload: tier: growth_team differs from the queue's tier \"trial\""
        );
    }

    #[test]
    fn a_payload_that_is_not_a_json_object_of_a_known_kind_is_refused_as_a_whole() {
        let prices = PriceCatalog::builtin();
        for (kind, payload, want) in [
            (
                "llm.complete",
                "not json",
                "the payload is not JSON: expected",
            ),
            (
                "llm.complete",
                "[1]",
                "the payload must be a JSON object, not an array",
            ),
            (
                "sound.transcribe",
                LLM,
                "unknown job kind \"sound.transcribe\"",
            ),
        ] {
            let err = decode(&raw(kind, "growth_team", payload), &prices).unwrap_err();
            assert_eq!(err.field, "");
            assert!(err.reason.starts_with(want), "{err}");
        }
    }

    /// enqueue.lua asks for the canonical lower-case form of its argument; the payload's UUID is
    /// compared by value, so a producer that upper-cases it loses nothing.
    #[test]
    fn an_upper_case_organization_id_of_the_same_value_is_the_same_organisation() {
        let p = example("llm.complete", |v| {
            v["organization_id"] = ORG.to_uppercase().into()
        });
        let input = decode_json("llm.complete", &p).unwrap();
        assert_eq!(input.common().organization_id.to_string(), ORG);
        let mut r = raw("llm.complete", "growth_team", &p.to_string());
        r.organization_id = ORG.to_uppercase();
        assert!(decode(&r, &PriceCatalog::builtin()).is_ok());
    }

    #[test]
    fn what_the_schemas_allow_at_their_edges_is_accepted() {
        let accepted = [
            // Prose keeps its tabs and line breaks.
            example("llm.complete", |v| {
                v["messages"][1]["content"] = "Line one,\r\n\tline two.\n".into()
            }),
            // Caps count characters, not bytes.
            example("llm.complete", |v| {
                v["correlation_id"] = "é".repeat(200).into()
            }),
            // An integer may be written with a zero fraction.
            example("llm.complete", |v| {
                v["max_tokens"] = serde_json::json!(64.0);
                v["version"] = serde_json::json!(1.0);
            }),
            // The output limit of every model of the chain is an allowed max_tokens.
            example("llm.complete", |v| v["max_tokens"] = 16_384.into()),
            // Fields the schema does not name are ignored (the contract is additive).
            example("llm.complete", |v| {
                v["priority_hint"] = "high".into();
                v["messages"][0]["name"] = "captioner".into();
            }),
            // An empty correlation_id and subject_type are allowed (no minLength).
            example("vision.annotate", |v| {
                v["correlation_id"] = "".into();
                v["subject_type"] = "".into();
            }),
            // oneOf: a valid uri beside a broken content is still exactly one valid branch.
            example("vision.annotate", |v| v["images"][1]["content"] = 7.into()),
            // A conversation may end with the assistant's turn (a prefill).
            example("llm.complete", |v| {
                v["messages"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({ "role": "assistant", "content": "A cat" }))
            }),
        ];
        for p in accepted {
            let kind = if p.get("images").is_some() {
                "vision.annotate"
            } else {
                "llm.complete"
            };
            if let Err(e) = decode_json(kind, &p) {
                panic!("{p} should decode: {e}");
            }
        }
    }

    #[test]
    fn a_refusal_shows_the_offending_value_escaped_and_short() {
        let p = example("llm.complete", |v| {
            v["provider"] = format!("\u{0}{}", "y".repeat(5000)).into()
        });
        let err = decode_json("llm.complete", &p).unwrap_err().to_string();
        assert!(err.contains(r#"not "\u0000yyy"#), "{err}");
        assert!(err.ends_with("...") && err.len() < 200, "{err}");
        assert!(!err.bytes().any(|b| b < 0x20), "{err}");
        // JSON leaves DEL as it is; the message does not.
        let p = example("llm.complete", |v| v["provider"] = "\u{7f}".into());
        let err = decode_json("llm.complete", &p).unwrap_err().to_string();
        assert!(err.ends_with(r#"not "\u007f""#), "{err}");
    }
}
