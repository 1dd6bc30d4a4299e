//! Google Cloud Vision `POST /v1/images:annotate`: up to 16 images per request, each with its
//! features; per-image errors arrive inside an HTTP 200.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ErrorFormat, ErrorKind, ProviderError, http_client, send};

const FORMAT: ErrorFormat = ErrorFormat {
    provider: PROVIDER,
    classify,
    body_delay: retry_info,
};
use crate::config::ProviderSettings;
use crate::domain::Provider;

pub const PROVIDER: Provider = Provider::GoogleVision;
/// Images per request, the API's limit.
pub const MAX_IMAGES: usize = 16;

/// Where an image comes from: inline base64 bytes, or a `gs://` / `https://` URI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ImageSource {
    Content { content: String },
    Uri { uri: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// The API's feature name, e.g. LABEL_DETECTION.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "maxResults"
    )]
    pub max_results: Option<u32>,
}

/// One image's answer: its annotations, or its error.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageResult {
    Annotated(Value),
    Failed { code: i64, message: String },
}

#[derive(Debug, Clone)]
pub struct VisionResponse {
    /// The whole response body, stored as ai_processing_results.raw_response.
    pub raw: Value,
    pub images: Vec<ImageResult>,
    /// The body's share of the memory budget, held until the answer is dropped.
    pub hold: super::BodyHold,
}

impl VisionResponse {
    /// Billable units: one per feature per image, except images refused as invalid input
    /// (INVALID_ARGUMENT, code 3), which we settle at zero. Other per-image errors are billed,
    /// to be conservative: Google does not document whether they are.
    pub fn billable_images(&self) -> u32 {
        self.images
            .iter()
            .filter(|r| !matches!(r, ImageResult::Failed { code: 3, .. }))
            .count() as u32
    }
}

#[derive(Clone)]
pub struct VisionClient {
    http: reqwest::Client,
    settings: ProviderSettings,
    limits: super::BodyLimits,
}

impl VisionClient {
    pub fn new(settings: &ProviderSettings, limits: &super::BodyLimits) -> Self {
        Self {
            http: http_client(settings.timeout),
            settings: settings.clone(),
            limits: limits.clone(),
        }
    }

    pub async fn annotate(
        &self,
        images: &[ImageSource],
        features: &[Feature],
    ) -> Result<VisionResponse, ProviderError> {
        let key = super::api_key(&self.settings, PROVIDER, "AIQ_VISION_API_KEY")?;
        let requests: Vec<Value> = images
            .iter()
            .map(|img| {
                let image = match img {
                    ImageSource::Content { content } => serde_json::json!({ "content": content }),
                    ImageSource::Uri { uri } => {
                        serde_json::json!({ "source": { "imageUri": uri } })
                    }
                };
                serde_json::json!({ "image": image, "features": features })
            })
            .collect();
        let url = format!("{}/v1/images:annotate", self.settings.base_url);
        let request = self
            .http
            .post(url)
            .header("x-goog-api-key", key.expose())
            .json(&serde_json::json!({ "requests": requests }));
        let answer = send(&FORMAT, &self.limits, request).await?;
        let mut parsed = parse_response(answer.status, &answer.body, images.len())?;
        parsed.hold = answer.hold;
        Ok(parsed)
    }
}

/// Parses a 200 body into one result per image, in request order.
pub fn parse_response(
    status: u16,
    body: &str,
    expected: usize,
) -> Result<VisionResponse, ProviderError> {
    let raw: Value =
        serde_json::from_str(body).map_err(|e| ProviderError::malformed(PROVIDER, status, e))?;
    let responses = raw
        .get("responses")
        .and_then(Value::as_array)
        .ok_or_else(|| ProviderError::malformed(PROVIDER, status, "no responses array"))?;
    if responses.len() != expected {
        return Err(ProviderError::malformed(
            PROVIDER,
            status,
            format!("{} responses for {expected} images", responses.len()),
        ));
    }
    let images = responses
        .iter()
        .map(|r| match r.get("error") {
            Some(err) => ImageResult::Failed {
                code: err.get("code").and_then(Value::as_i64).unwrap_or(2),
                message: err.get("message").and_then(Value::as_str).map_or_else(
                    || "unknown error".to_owned(),
                    |m| crate::redact::cut(m, crate::redact::MESSAGE_MAX).into_owned(),
                ),
            },
            None => ImageResult::Annotated(r.clone()),
        })
        .collect();
    Ok(VisionResponse {
        raw,
        images,
        hold: super::BodyHold::default(),
    })
}

/// The one place that maps a Vision HTTP status and Google error envelope to an [`ErrorKind`].
pub fn classify(status: u16, body: &str) -> ErrorKind {
    let envelope: Option<Value> = serde_json::from_str(body).ok();
    let google_status = envelope
        .as_ref()
        .and_then(|v| v.pointer("/error/status"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let per_day = envelope
        .as_ref()
        .map(|v| {
            let s = v.to_string();
            s.contains("PerDay") || s.contains("per day")
        })
        .unwrap_or(false);
    match status {
        408 => ErrorKind::Timeout,
        429 if per_day => ErrorKind::QuotaExhausted,
        429 => ErrorKind::RateLimited,
        401 | 403 => ErrorKind::Unauthorized,
        400 | 404 | 409 | 411 | 413 | 422 | 501 => {
            if google_status == "ABORTED" {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Invalid
            }
        }
        500..=599 => ErrorKind::Unavailable,
        _ => ErrorKind::Invalid,
    }
}

/// RetryInfo's `retryDelay` ("5s", "1.5s") from a Google error envelope.
pub(crate) fn retry_info(body: &str) -> Option<std::time::Duration> {
    let v: Value = serde_json::from_str(body).ok()?;
    v.pointer("/error/details")?
        .as_array()?
        .iter()
        .find_map(|d| super::parse_delay_secs(d.get("retryDelay")?.as_str()?.strip_suffix('s')?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_documented_retry_decisions() {
        let quota = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"Quota exceeded for quota metric 'Requests' and limit 'Requests per day'","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"RequestsPerDay"}]}]}}"#;
        let table = [
            (408, "", ErrorKind::Timeout),
            (
                429,
                r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"rate"}}"#,
                ErrorKind::RateLimited,
            ),
            (429, quota, ErrorKind::QuotaExhausted),
            (
                400,
                r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"bad"}}"#,
                ErrorKind::Invalid,
            ),
            (401, "", ErrorKind::Unauthorized),
            (
                403,
                r#"{"error":{"code":403,"status":"PERMISSION_DENIED"}}"#,
                ErrorKind::Unauthorized,
            ),
            (404, "", ErrorKind::Invalid),
            (
                409,
                r#"{"error":{"code":409,"status":"ABORTED"}}"#,
                ErrorKind::Unavailable,
            ),
            (500, "", ErrorKind::Unavailable),
            (
                503,
                r#"{"error":{"code":503,"status":"UNAVAILABLE"}}"#,
                ErrorKind::Unavailable,
            ),
            (504, "", ErrorKind::Unavailable),
        ];
        for (status, body, want) in table {
            assert_eq!(classify(status, body), want, "status {status} body {body}");
        }
    }

    #[test]
    fn per_image_errors_inside_a_200_are_kept_per_image() {
        let body = r#"{"responses":[
            {"labelAnnotations":[{"mid":"/m/01yrx","description":"Cat","score":0.98,"topicality":0.98}]},
            {"error":{"code":3,"message":"Bad image data."}},
            {"error":{"code":14,"message":"try again"}}]}"#;
        let r = parse_response(200, body, 3).unwrap();
        assert!(matches!(r.images[0], ImageResult::Annotated(_)));
        assert_eq!(
            r.images[1],
            ImageResult::Failed {
                code: 3,
                message: "Bad image data.".into()
            }
        );
        assert_eq!(r.billable_images(), 2);
    }

    #[test]
    fn garbage_and_wrong_counts_are_malformed_errors() {
        for (body, n) in [
            ("<html>oops</html>", 1),
            (r#"{"responses":[]}"#, 1),
            (r#"{"x":1}"#, 1),
        ] {
            let e = parse_response(200, body, n).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Malformed, "{body}");
            assert!(e.is_retryable());
        }
    }

    #[test]
    fn retry_info_sets_the_delay() {
        let body = r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"slow down","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"7s"}]}}"#;
        let e = super::super::error_from(&FORMAT, 429, body, None);
        assert_eq!(e.retry_after, Some(std::time::Duration::from_secs(7)));
        assert_eq!(e.message, "slow down");
    }
}
