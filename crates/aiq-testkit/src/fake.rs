//! `aiq-dev fake-providers`: an HTTP server that answers like Google Vision and OpenAI, in their real
//! wire formats, so the demo, the tests and the benchmarks run with no network and no bill.
//! Answers are deterministic: the same request always gets the same answer.
//!
//! It answers Google Vision, OpenAI, Anthropic (`/v1/messages`) and Gemini
//! (`/v1beta/models/{model}:generateContent`). Faults on demand, for tests: an OpenAI message containing `[fake:status=503]` gets that status
//! with OpenAI's error body (429 also carries `retry-after: 1`), `[fake:garbage]` gets a 200
//! whose body is not JSON, and `[fake:delay=800]` answers after 800 ms (to make timeouts); the
//! same markers work for Anthropic and Gemini in their own error envelopes, plus
//! `[fake:spend-limit]` (Anthropic's enforced spend limit) and `[fake:quota-day]` (a Gemini
//! per-day quota). A Vision image with `uri` `fake://status/503` makes the whole request
//! answer 503; an image whose `content` is not base64 gets the per-image "Bad image data." error.
//! `[fake:retry-after=5]` sets a 429's Retry-After as written (`inf`, an HTTP date...), and
//! `[fake:retry-after-ms=1e300]` its retry-after-ms; `[fake:retry-delay=1e30s]` a Gemini 429's
//! RetryInfo delay; `[fake:usage=-1]` the prompt token count an OpenAI answer reports;
//! `[fake:hold]` makes an OpenAI call wait until `POST /_fake/release`; `[fake:big=200]` answers
//! OpenAI with a valid 200 MB body (`[fake:bigchunked=200]`: the same without a Content-Length);
//! `[fake:error-bytes=1000000]` makes OpenAI's injected error message that many bytes long.
//! `GET /_fake/calls` returns how many calls
//! each provider answered, how many calls are being answered now (`running`), a log of OpenAI calls (start and end ms, status) and, from OpenAI's
//! `x-client-request-id` header (aiq sends the job id), how many distinct jobs called, the most
//! calls one job made, and how often a job called while its previous call was still running;
//! OpenAI calls marked `[fake:group=NAME]` are counted per group (`groups`: running now, the most
//! at once).
//! A fixed latency (`--latency-ms`) makes calls take time, for load and crash tests, and
//! `POST /_fake/outage?status=503&ms=3000` makes every call fail for a while.
//! `[fake:flaky=2]` fails the first two calls carrying the same text (503; 529 for Anthropic),
//! then answers; `[fake:nul]` puts a NUL character in an OpenAI answer; `[fake:only=openai]`
//! applies a text's fault markers on that provider only, so a fallback to another provider
//! succeeds.
//! Random faults for load runs: `--error-rate 0.2` fails a fifth of the calls, with a fault kind
//! drawn by `--error-mix` weights (429 with Retry-After, 500, 503/529, timeout, failed Vision
//! image, garbage 200); `--latency-jitter-ms` adds uniform random latency; `--seed` repeats a run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Default)]
struct Counters {
    vision: AtomicU64,
    openai: AtomicU64,
    anthropic: AtomicU64,
    gemini: AtomicU64,
    /// Until when (ms since the epoch) every call answers `outage_status`.
    outage_until_ms: AtomicU64,
    outage_status: std::sync::atomic::AtomicU16,
    latency: Duration,
    options: FakeOptions,
    rng: Mutex<Option<fastrand::Rng>>,
    /// Per job id: (calls in flight now, calls in all).
    jobs: Mutex<HashMap<String, (u32, u32)>>,
    overlaps: AtomicU64,
    /// Calls of any provider being answered now (arrived, not yet answered).
    running: AtomicU64,
    /// Calls seen per (provider, text) carrying a `[fake:flaky=N]` marker.
    flaky: Mutex<HashMap<(&'static str, u64), u32>>,
    /// `[fake:hold]` calls wait until `POST /_fake/release` sets this.
    released: std::sync::atomic::AtomicBool,
    release: tokio::sync::Notify,
    /// OpenAI calls: (provider, start ms, end ms, status), for tests that look at timing.
    log: Mutex<Vec<(&'static str, u64, u64, u16)>>,
    /// Per `[fake:group=NAME]` of OpenAI calls: (calls being answered now, the most at once).
    groups: Mutex<HashMap<String, (u32, u32)>>,
}

/// How the fake behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeOptions {
    /// Every call waits this long before it answers...
    pub latency: Duration,
    /// ...plus a uniform random extra of up to this much.
    pub latency_jitter: Duration,
    /// The share of calls (0 to 1) that fail with a fault drawn at random: a 429 with
    /// Retry-After, a 500, a 503 (529 for Anthropic), a timeout (no answer for 5 s), a garbage
    /// 200, or for Vision an image that fails inside a 200.
    pub error_rate: f64,
    /// How often each kind of fault is drawn, relative to the others, in the order of
    /// [`FAULT_KINDS`]. All zero (the default) draws them equally.
    pub mix: [u32; 6],
    /// Seeds the draws: the same seed gives the same answers in the same arrival order.
    pub seed: u64,
    /// Every OpenAI answer is a valid one of about this many bytes (0: the normal size),
    /// streamed in chunks, for the memory benchmark.
    pub answer_bytes: u64,
}

/// The kinds of random fault, as `--error-mix` names them: a 429 with Retry-After, a 500, a 503
/// (529 for Anthropic), a timeout (no answer for 5 s), a Vision image failing inside a 200 (a
/// garbage 200 for the LLMs), a garbage 200.
pub const FAULT_KINDS: [&str; 6] = ["429", "500", "503", "timeout", "image", "garbage"];

/// Parses `--error-mix`, e.g. `429=3,500=1,timeout=1`: weights per fault kind; kinds not named
/// get 0.
pub fn parse_mix(s: &str) -> Result<[u32; 6], String> {
    let mut mix = [0u32; 6];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not kind=weight"))?;
        let i = FAULT_KINDS
            .iter()
            .position(|k| *k == kind.trim())
            .ok_or_else(|| {
                format!(
                    "unknown fault kind {kind:?}; the kinds are {}",
                    FAULT_KINDS.join(", ")
                )
            })?;
        mix[i] = weight
            .trim()
            .parse()
            .map_err(|_| format!("the weight of {kind} must be a whole number, not {weight:?}"))?;
    }
    if mix.iter().all(|w| *w == 0) {
        return Err("give at least one fault kind a weight above 0".into());
    }
    Ok(mix)
}

impl FakeOptions {
    /// Only a fixed latency: no faults.
    pub fn with_latency(latency: Duration) -> Self {
        Self {
            latency,
            ..Self::default()
        }
    }
}

/// Counts one job's call while it runs.
struct InFlight {
    counters: Arc<Counters>,
    job: String,
}

impl InFlight {
    fn start(counters: &Arc<Counters>, job: &str) -> Self {
        let mut jobs = counters.jobs.lock().expect("fake job table");
        let entry = jobs.entry(job.to_owned()).or_default();
        entry.0 += 1;
        entry.1 += 1;
        if entry.0 > 1 {
            counters.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            counters: counters.clone(),
            job: job.to_owned(),
        }
    }
}

/// One OpenAI call of a `[fake:group=NAME]`, counted in its group while it lives.
struct InGroup(Arc<Counters>, String);

impl InGroup {
    fn start(counters: &Arc<Counters>, group: &str) -> Self {
        let mut groups = counters.groups.lock().expect("fake groups");
        let (now, most) = groups.entry(group.to_owned()).or_default();
        *now += 1;
        *most = (*most).max(*now);
        Self(counters.clone(), group.to_owned())
    }
}

impl Drop for InGroup {
    fn drop(&mut self) {
        if let Some((now, _)) = self.0.groups.lock().expect("fake groups").get_mut(&self.1) {
            *now -= 1;
        }
    }
}

/// One call being answered, of any provider, counted in `running` while it lives.
struct Running(Arc<Counters>);

impl Running {
    fn start(counters: &Arc<Counters>) -> Self {
        counters.running.fetch_add(1, Ordering::Relaxed);
        Self(counters.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(entry) = self
            .counters
            .jobs
            .lock()
            .expect("fake job table")
            .get_mut(&self.job)
        {
            entry.0 -= 1;
        }
    }
}

/// A running fake server.
pub struct FakeProviders {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeProviders {
    /// Starts the server on `addr` (port 0 picks a free port) in the current runtime.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(addr, FakeOptions::default()).await
    }

    pub async fn start_with(addr: SocketAddr, options: FakeOptions) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = router(options);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake providers stopped");
            }
        });
        Ok(Self { addr, task })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeProviders {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn router(options: FakeOptions) -> Router {
    let counters = Arc::new(Counters {
        latency: options.latency,
        options,
        rng: Mutex::new(Some(fastrand::Rng::with_seed(options.seed))),
        ..Counters::default()
    });
    Router::new()
        .route("/v1/images:annotate", post(vision))
        .route("/v1/chat/completions", post(openai))
        .route("/v1/messages", post(anthropic))
        .route("/v1beta/models/{model_action}", post(gemini))
        .route("/_fake/calls", get(calls))
        .route("/_fake/outage", post(outage))
        .route("/_fake/release", post(release))
        .with_state(counters)
}

/// Lets every `[fake:hold]` call, waiting or still to come, answer.
async fn release(State(c): State<Arc<Counters>>) -> StatusCode {
    c.released.store(true, Ordering::Release);
    c.release.notify_waiters();
    StatusCode::NO_CONTENT
}

async fn calls(State(c): State<Arc<Counters>>) -> Json<Value> {
    let jobs = c.jobs.lock().expect("fake job table");
    Json(json!({
        "google_vision": c.vision.load(Ordering::Relaxed),
        "openai": c.openai.load(Ordering::Relaxed),
        "anthropic": c.anthropic.load(Ordering::Relaxed),
        "gemini": c.gemini.load(Ordering::Relaxed),
        "jobs": jobs.len(),
        "max_calls_per_job": jobs.values().map(|(_, n)| *n).max().unwrap_or(0),
        "overlaps": c.overlaps.load(Ordering::Relaxed),
        "running": c.running.load(Ordering::Relaxed),
        "groups": c.groups.lock().expect("fake groups").iter()
            .map(|(g, (now, most))| (g.clone(), json!({ "running": now, "max": most })))
            .collect::<serde_json::Map<_, _>>(),
        "log": c.log.lock().expect("fake call log").iter()
            .map(|(p, start, end, status)| json!([p, start, end, status])).collect::<Vec<_>>(),
    }))
}

#[derive(serde::Deserialize)]
struct Outage {
    status: u16,
    ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `POST /_fake/outage?status=503&ms=3000`: every call answers `status` for that long.
async fn outage(
    State(c): State<Arc<Counters>>,
    axum::extract::Query(o): axum::extract::Query<Outage>,
) -> &'static str {
    c.outage_status.store(o.status, Ordering::Relaxed);
    c.outage_until_ms.store(now_ms() + o.ms, Ordering::Relaxed);
    "ok\n"
}

/// The injected outage's status, while one lasts.
fn in_outage(c: &Counters) -> Option<StatusCode> {
    (now_ms() < c.outage_until_ms.load(Ordering::Relaxed)).then(|| {
        StatusCode::from_u16(c.outage_status.load(Ordering::Relaxed))
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
    })
}

/// A small stable hash (FNV-1a), so answers depend only on the request.
/// The text whose fault markers apply on `wire`: all of it, or nothing when the text names
/// another provider with `[fake:only=...]`.
fn faults_for<'a>(text: &'a str, wire: &str) -> &'a str {
    if !text.contains("[fake:only=") || text.contains(&format!("[fake:only={wire}]")) {
        text
    } else {
        ""
    }
}

/// Whether this call should fail as a `[fake:flaky=N]` one: the first N calls per provider and
/// text do.
fn flaky(c: &Counters, wire: &'static str, marks: &str) -> bool {
    let Some(n) = marks
        .split("[fake:flaky=")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .and_then(|v| v.parse::<u32>().ok())
    else {
        return false;
    };
    let mut seen = c.flaky.lock().expect("flaky counts");
    let calls = seen.entry((wire, fnv(marks.as_bytes()))).or_insert(0);
    *calls += 1;
    *calls <= n
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn google_error(status: StatusCode, google_status: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": status.as_u16(), "message": message, "status": google_status } })),
    )
        .into_response()
}

fn is_base64(s: &str) -> bool {
    !s.is_empty()
        && s.len().is_multiple_of(4)
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

const LABELS: [&str; 8] = [
    "Cat", "Dog", "Tree", "Car", "Building", "Person", "Food", "Sky",
];

fn annotate_one(seed: u64, features: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    for f in features {
        let kind = f.get("type").and_then(Value::as_str).unwrap_or("");
        let max = f
            .get("maxResults")
            .and_then(Value::as_u64)
            .unwrap_or(3)
            .clamp(1, 8) as usize;
        match kind {
            "LABEL_DETECTION" => {
                let labels: Vec<Value> = (0..max.min(3))
                    .map(|i| {
                        let score = 0.99 - 0.07 * i as f64 - (seed % 7) as f64 / 100.0;
                        let name = LABELS[((seed as usize) + i) % LABELS.len()];
                        json!({ "mid": format!("/m/0{:x}", (seed >> 8) % 4096 + i as u64), "description": name,
                                "score": score, "topicality": score })
                    })
                    .collect();
                out.insert("labelAnnotations".into(), Value::Array(labels));
            }
            "SAFE_SEARCH_DETECTION" => {
                out.insert(
                    "safeSearchAnnotation".into(),
                    json!({ "adult": "VERY_UNLIKELY", "spoof": "UNLIKELY", "medical": "VERY_UNLIKELY",
                            "violence": "VERY_UNLIKELY", "racy": "UNLIKELY" }),
                );
            }
            "TEXT_DETECTION" | "DOCUMENT_TEXT_DETECTION" => {
                let text = format!("fake text {:x}", seed % 65536);
                out.insert(
                    "textAnnotations".into(),
                    json!([{ "locale": "en", "description": text,
                             "boundingPoly": { "vertices": [{"x": 1, "y": 2}, {"x": 40, "y": 2}] } }]),
                );
                out.insert(
                    "fullTextAnnotation".into(),
                    json!({ "text": text, "pages": [] }),
                );
            }
            "OBJECT_LOCALIZATION" => {
                out.insert(
                    "localizedObjectAnnotations".into(),
                    json!([{ "mid": "/m/01yrx", "name": LABELS[(seed as usize) % LABELS.len()], "score": 0.9,
                             "boundingPoly": { "normalizedVertices": [{"x": 0.1, "y": 0.2}, {"x": 0.8, "y": 0.9}] } }]),
                );
            }
            "FACE_DETECTION" => {
                out.insert("faceAnnotations".into(), json!([]));
            }
            "LANDMARK_DETECTION" => {
                out.insert("landmarkAnnotations".into(), json!([]));
            }
            "LOGO_DETECTION" => {
                out.insert("logoAnnotations".into(), json!([]));
            }
            "IMAGE_PROPERTIES" => {
                out.insert(
                    "imagePropertiesAnnotation".into(),
                    json!({ "dominantColors": { "colors": [{ "color": {"red": seed % 256, "green": 34, "blue": 56},
                            "score": 0.4, "pixelFraction": 0.2 }] } }),
                );
            }
            "CROP_HINTS" => {
                out.insert("cropHintsAnnotation".into(), json!({ "cropHints": [] }));
            }
            "WEB_DETECTION" => {
                out.insert(
                    "webDetection".into(),
                    json!({ "webEntities": [], "fullMatchingImages": [], "visuallySimilarImages": [] }),
                );
            }
            _ => {}
        }
    }
    Value::Object(out)
}

async fn vision(State(c): State<Arc<Counters>>, headers: HeaderMap, body: String) -> Response {
    c.vision.fetch_add(1, Ordering::Relaxed);
    let _running = Running::start(&c);
    let fail_one_image = match chaos(&c, Wire::Vision).await {
        Some(Some(r)) => return r,
        Some(None) => true,
        None => false,
    };
    if let Some(status) = in_outage(&c) {
        return google_error(status, "UNAVAILABLE", "injected outage");
    }
    if headers.get("x-goog-api-key").is_none() {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "API key not valid. Please pass a valid API key.",
        );
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return google_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "Invalid JSON payload received.",
        );
    };
    let Some(requests) = req.get("requests").and_then(Value::as_array) else {
        return google_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "requests is required",
        );
    };
    if requests.is_empty() || requests.len() > 16 {
        return google_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "1 to 16 requests are allowed per call",
        );
    }
    let mut responses = Vec::with_capacity(requests.len());
    for r in requests {
        let content = r.pointer("/image/content").and_then(Value::as_str);
        let uri = r.pointer("/image/source/imageUri").and_then(Value::as_str);
        if let Some(status) = uri.and_then(|u| u.strip_prefix("fake://status/")) {
            let code = status
                .parse()
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok());
            let code = code.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let name = match code.as_u16() {
                429 => "RESOURCE_EXHAUSTED",
                503 => "UNAVAILABLE",
                400 => "INVALID_ARGUMENT",
                403 => "PERMISSION_DENIED",
                _ => "INTERNAL",
            };
            return google_error(code, name, "injected by the fake provider");
        }
        let features = r
            .get("features")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        match (content, uri) {
            (Some(c), _) if is_base64(c) => {
                responses.push(annotate_one(fnv(c.as_bytes()), &features))
            }
            (Some(_), _) => {
                responses.push(json!({ "error": { "code": 3, "message": "Bad image data." } }))
            }
            (None, Some(u)) => responses.push(annotate_one(fnv(u.as_bytes()), &features)),
            (None, None) => responses
                .push(json!({ "error": { "code": 3, "message": "No image was provided." } })),
        }
    }
    if fail_one_image && let Some(first) = responses.first_mut() {
        *first = json!({ "error": { "code": 14, "message": "The service is currently unavailable (injected)." } });
    }
    Json(json!({ "responses": responses })).into_response()
}

/// The message of an injected error: `[fake:error-bytes=N]` makes it N bytes long (at most
/// 10 MB), as a provider that echoes a whole request back might.
fn injected_message(marks: &str) -> String {
    let long = marks
        .split("[fake:error-bytes=")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .and_then(|n| n.parse::<usize>().ok());
    match long {
        Some(n) => "e".repeat(n.min(10_000_000)),
        None => "injected by the fake provider".to_owned(),
    }
}

fn openai_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let mut resp = (
        status,
        Json(json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert("retry-after", "1".parse().expect("static header"));
    }
    resp
}

async fn openai(State(c): State<Arc<Counters>>, headers: HeaderMap, body: String) -> Response {
    let started = now_ms();
    let resp = openai_answer(&c, headers, body).await;
    let mut log = c.log.lock().expect("fake call log");
    if log.len() < 100_000 {
        log.push(("openai", started, now_ms(), resp.status().as_u16()));
    }
    resp
}

async fn openai_answer(c: &Arc<Counters>, headers: HeaderMap, body: String) -> Response {
    c.openai.fetch_add(1, Ordering::Relaxed);
    let _running = Running::start(c);
    let _in_flight = headers
        .get("x-client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|job| InFlight::start(c, job));
    if let Some(Some(r)) = chaos(c, Wire::OpenAi).await {
        return r;
    }
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
    if let Some(status) = in_outage(c) {
        return openai_error(
            status,
            "service_unavailable_error",
            "server_is_overloaded",
            "injected outage",
        );
    }
    if !authorized {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided.",
        );
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            "We could not parse the JSON body of your request.",
        );
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if model.is_empty() || messages.is_empty() {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_required_parameter",
            "model and messages are required",
        );
    }
    let text: String = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join("\n");
    let marks = faults_for(&text, "openai");
    let _in_group = marks
        .split("[fake:group=")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .map(|group| InGroup::start(c, group));
    if flaky(c, "openai", marks) {
        return openai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            "server_is_overloaded",
            "injected by the fake provider (flaky)",
        );
    }
    if let Some(rest) = marks.split("[fake:status=").nth(1) {
        let code = rest
            .get(..3)
            .and_then(|s| s.parse().ok())
            .and_then(|s| StatusCode::from_u16(s).ok());
        let code = code.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (kind, err_code) = match code.as_u16() {
            429 => ("requests", "rate_limit_exceeded"),
            503 => ("service_unavailable_error", "server_is_overloaded"),
            401 => ("invalid_request_error", "invalid_api_key"),
            400 => ("invalid_request_error", "invalid_value"),
            _ => ("server_error", "server_error"),
        };
        let mut resp = openai_error(code, kind, err_code, &injected_message(marks));
        // The header's text as written, so tests can send what a broken provider might:
        // `inf`, `1e30`, an HTTP date...
        for (mark, header) in [
            ("[fake:retry-after=", "retry-after"),
            ("[fake:retry-after-ms=", "retry-after-ms"),
        ] {
            if let Some(value) = marks
                .split(mark)
                .nth(1)
                .and_then(|rest| rest.split(']').next())
                .and_then(|v| axum::http::HeaderValue::from_str(v).ok())
            {
                resp.headers_mut().insert(header, value);
            }
        }
        return resp;
    }
    if let Some(ms) = marks
        .split("[fake:delay=")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    if marks.contains("[fake:hold]") {
        loop {
            // Created before the check: a release in between still wakes it.
            let released = c.release.notified();
            if c.released.load(Ordering::Acquire) {
                break;
            }
            released.await;
        }
    }
    if marks.contains("[fake:garbage]") {
        return (StatusCode::OK, "<html>upstream hiccup</html>").into_response();
    }
    // `[fake:big=200]`: a valid answer of 200 MB with its Content-Length; `[fake:bigchunked=200]`
    // the same without one (chunked), so the reader cannot know the length in advance.
    for (mark, declared) in [("[fake:big=", true), ("[fake:bigchunked=", false)] {
        if let Some(mb) = marks
            .split(mark)
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .and_then(|v| v.parse::<u64>().ok())
        {
            return big_openai_answer(&model, mb.min(4096) * 1024 * 1024, declared);
        }
    }
    if c.options.answer_bytes > 0 {
        return big_openai_answer(&model, c.options.answer_bytes, true);
    }
    let max = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(256);
    // Roughly four characters a token, plus a few tokens of framing per message.
    let prompt_tokens = (text.len() as u64).div_ceil(4) + 4 * messages.len() as u64;
    let seed = fnv(text.as_bytes());
    let completion_tokens = (12 + seed % 20).min(max);
    let finish_reason = if completion_tokens == max {
        "length"
    } else {
        "stop"
    };
    let words: Vec<&str> = (0..completion_tokens)
        .map(|i| LABELS[((seed + i) % LABELS.len() as u64) as usize])
        .collect();
    let mut content = words.join(" ");
    // `[fake:usage=1e12]`: the prompt token count the answer reports, as written (a count no
    // model produces, a negative or a fractional number...).
    let reported_prompt = marks
        .split("[fake:usage=")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .and_then(|v| serde_json::from_str::<Value>(v).ok())
        .unwrap_or_else(|| json!(prompt_tokens));
    if marks.contains("[fake:nul]") {
        // A NUL character, which PostgreSQL's text and jsonb refuse.
        content.push('\u{0}');
    }
    Json(json!({
        "id": format!("chatcmpl-fake{:x}", seed),
        "object": "chat.completion",
        "created": 1_730_000_000u64,
        "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content, "refusal": null },
                      "finish_reason": finish_reason, "logprobs": null }],
        "usage": { "prompt_tokens": reported_prompt, "completion_tokens": completion_tokens,
                   "total_tokens": prompt_tokens + completion_tokens,
                   "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
                   "completion_tokens_details": { "reasoning_tokens": 0, "audio_tokens": 0,
                       "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0 } },
        "service_tier": "default",
        "system_fingerprint": "fp_fake"
    }))
    .into_response()
}

/// A valid OpenAI answer whose content is `bytes` of words, streamed 64 KiB at a time so the
/// fake holds none of it: with its `Content-Length` when `declared`, else chunked.
fn big_openai_answer(model: &str, bytes: u64, declared: bool) -> Response {
    use axum::body::{Body, Bytes};
    let head = format!(
        r#"{{"id":"chatcmpl-fakebig","object":"chat.completion","created":1730000000,"model":{},"choices":[{{"index":0,"message":{{"role":"assistant","content":""#,
        Value::String(model.to_owned())
    );
    let tail = r#""},"finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":10,"completion_tokens":16,"total_tokens":26}}"#;
    const CHUNK: usize = 64 * 1024;
    let filler = Bytes::from("word ".repeat(CHUNK / 5));
    let chunks = bytes.div_ceil(filler.len() as u64);
    let total = head.len() as u64 + chunks * filler.len() as u64 + tail.len() as u64;
    let body = futures::stream::iter(
        std::iter::once(Bytes::from(head))
            .chain((0..chunks).map(move |_| filler.clone()))
            .chain(std::iter::once(Bytes::from_static(tail.as_bytes())))
            .map(Ok::<_, std::convert::Infallible>),
    );
    let mut resp = Response::new(Body::from_stream(body));
    let headers = resp.headers_mut();
    headers.insert("content-type", "application/json".parse().expect("static"));
    if declared {
        headers.insert("content-length", total.into());
    }
    resp
}

/// The faults a request's text asks for (see the module docs).
struct Asked {
    status: Option<StatusCode>,
    garbage: bool,
    delay: Option<Duration>,
}

fn asked(text: &str) -> Asked {
    let status = text
        .split("[fake:status=")
        .nth(1)
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok());
    let delay = text
        .split("[fake:delay=")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms.min(60_000)));
    Asked {
        status,
        garbage: text.contains("[fake:garbage]"),
        delay,
    }
}

/// Deterministic token counts for a prompt: about four characters a token, and an answer of
/// 12 to 31 tokens, never more than `max`.
fn fake_usage(text: &str, messages: usize, max: u64) -> (u64, u64, u64) {
    let prompt = (text.len() as u64).div_ceil(4) + 4 * messages as u64;
    let seed = fnv(text.as_bytes());
    (prompt, (12 + seed % 20).min(max), seed)
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let mut resp = (
        status,
        Json(json!({ "type": "error", "error": { "type": kind, "message": message }, "request_id": "req_fake" })),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert("retry-after", "1".parse().expect("static header"));
    }
    resp
}

async fn anthropic(State(c): State<Arc<Counters>>, headers: HeaderMap, body: String) -> Response {
    c.anthropic.fetch_add(1, Ordering::Relaxed);
    let _running = Running::start(&c);
    if let Some(Some(r)) = chaos(&c, Wire::Anthropic).await {
        return r;
    }
    if let Some(status) = in_outage(&c) {
        return anthropic_error(status, "overloaded_error", "Overloaded");
    }
    if headers.get("x-api-key").is_none() || headers.get("anthropic-version").is_none() {
        return anthropic_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        );
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid JSON",
        );
    };
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let Some(max) = req.get("max_tokens").and_then(Value::as_u64) else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens: Field required",
        );
    };
    if messages.is_empty() {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages: at least one message is required",
        );
    }
    let mut text: String = req
        .get("system")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    for m in &messages {
        text.push('\n');
        text.push_str(m.get("content").and_then(Value::as_str).unwrap_or_default());
    }
    let marks = faults_for(&text, "anthropic");
    if flaky(&c, "anthropic", marks) {
        return anthropic_error(
            StatusCode::from_u16(529).expect("529 is a status"),
            "overloaded_error",
            "Overloaded",
        );
    }
    let a = asked(marks);
    if let Some(d) = a.delay {
        tokio::time::sleep(d).await;
    }
    if marks.contains("[fake:spend-limit]") {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({ "type": "error", "error": { "type": "rate_limit_error", "message": "monthly spend limit reached",
                "details": { "error_code": "enforced_spend_limit_reached" } } })),
        )
            .into_response();
    }
    if let Some(status) = a.status {
        let kind = match status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        return anthropic_error(status, kind, "injected by the fake provider");
    }
    if a.garbage {
        return (StatusCode::OK, "<html>upstream hiccup</html>").into_response();
    }
    let (input, output, seed) = fake_usage(&text, messages.len(), max);
    let words: Vec<&str> = (0..output)
        .map(|i| LABELS[((seed + i) % LABELS.len() as u64) as usize])
        .collect();
    Json(json!({
        "id": format!("msg_fake{seed:x}"), "type": "message", "role": "assistant",
        "model": req.get("model").cloned().unwrap_or(Value::Null),
        "content": [{ "type": "text", "text": words.join(" ") }],
        "stop_reason": if output == max { "max_tokens" } else { "end_turn" }, "stop_sequence": null,
        "usage": { "input_tokens": input, "output_tokens": output, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 0, "service_tier": "standard" }
    }))
    .into_response()
}

async fn gemini(
    State(c): State<Arc<Counters>>,
    axum::extract::Path(model_action): axum::extract::Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    c.gemini.fetch_add(1, Ordering::Relaxed);
    let _running = Running::start(&c);
    if let Some(Some(r)) = chaos(&c, Wire::Gemini).await {
        return r;
    }
    if let Some(status) = in_outage(&c) {
        return google_error(
            status,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
        );
    }
    let Some(model) = model_action.strip_suffix(":generateContent") else {
        return google_error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown method");
    };
    if headers.get("x-goog-api-key").is_none() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": { "code": 400, "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT", "details": [{ "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID", "domain": "googleapis.com" }] } })),
        )
            .into_response();
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return google_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "Invalid JSON payload received.",
        );
    };
    let contents = req
        .get("contents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if contents.is_empty() {
        return google_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "contents is not specified",
        );
    }
    let mut text = String::new();
    for part in req
        .pointer("/systemInstruction/parts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default());
    }
    for content in &contents {
        for part in content
            .get("parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            text.push('\n');
            text.push_str(part.get("text").and_then(Value::as_str).unwrap_or_default());
        }
    }
    let marks = faults_for(&text, "gemini");
    if flaky(&c, "gemini", marks) {
        return google_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "injected by the fake provider (flaky)",
        );
    }
    let a = asked(marks);
    if let Some(d) = a.delay {
        tokio::time::sleep(d).await;
    }
    if marks.contains("[fake:quota-day]") {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({ "error": { "code": 429, "status": "RESOURCE_EXHAUSTED", "message": "You exceeded your current quota.",
                "details": [{ "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                  "violations": [{ "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier" }] }] } })),
        )
            .into_response();
    }
    if let Some(status) = a.status {
        if status == StatusCode::TOO_MANY_REQUESTS {
            // `[fake:retry-delay=1e30s]`: RetryInfo's delay as written.
            let retry_delay = marks
                .split("[fake:retry-delay=")
                .nth(1)
                .and_then(|rest| rest.split(']').next())
                .unwrap_or("1s");
            return (
                status,
                Json(json!({ "error": { "code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Please retry in 1s.",
                    "details": [{ "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                      "violations": [{ "quotaId": "GenerateRequestsPerMinutePerProjectPerModel" }] },
                      { "@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay }] } })),
            )
                .into_response();
        }
        let name = match status.as_u16() {
            400 => "INVALID_ARGUMENT",
            403 => "PERMISSION_DENIED",
            503 => "UNAVAILABLE",
            504 => "DEADLINE_EXCEEDED",
            _ => "INTERNAL",
        };
        return google_error(status, name, "injected by the fake provider");
    }
    if a.garbage {
        return (StatusCode::OK, "<html>upstream hiccup</html>").into_response();
    }
    let max = req
        .pointer("/generationConfig/maxOutputTokens")
        .and_then(Value::as_u64)
        .unwrap_or(8192);
    let (prompt, output, seed) = fake_usage(&text, contents.len(), max);
    let words: Vec<&str> = (0..output)
        .map(|i| LABELS[((seed + i) % LABELS.len() as u64) as usize])
        .collect();
    Json(json!({
        "candidates": [{ "content": { "role": "model", "parts": [{ "text": words.join(" ") }] },
                         "finishReason": if output == max { "MAX_TOKENS" } else { "STOP" }, "index": 0 }],
        "usageMetadata": { "promptTokenCount": prompt, "candidatesTokenCount": output, "thoughtsTokenCount": 0,
                           "cachedContentTokenCount": 0, "totalTokenCount": prompt + output },
        "modelVersion": model, "responseId": format!("fake{seed:x}")
    }))
    .into_response()
}

/// Which wire format a fault must speak.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Vision,
    OpenAi,
    Anthropic,
    Gemini,
}

/// Waits the configured latency, then maybe answers with a random fault (see [`FakeOptions`]).
/// For Vision, `Some(None)` asks the caller to fail one image inside a 200.
/// A fault kind, by the mix's weights (equally when they are all zero).
fn pick_fault(rng: &mut fastrand::Rng, mix: &[u32; 6]) -> u32 {
    let total: u32 = mix.iter().sum();
    if total == 0 {
        return rng.u32(0..6);
    }
    let mut r = rng.u32(0..total);
    for (i, w) in mix.iter().enumerate() {
        if r < *w {
            return i as u32;
        }
        r -= w;
    }
    5
}

async fn chaos(c: &Counters, wire: Wire) -> Option<Option<Response>> {
    let (jitter_ms, roll, pick) = {
        let mut guard = c.rng.lock().expect("fake rng");
        let rng = guard.get_or_insert_with(fastrand::Rng::new);
        let jitter = c.options.latency_jitter.as_millis() as u64;
        (
            if jitter > 0 { rng.u64(0..=jitter) } else { 0 },
            rng.f64(),
            pick_fault(rng, &c.options.mix),
        )
    };
    let wait = c.latency + Duration::from_millis(jitter_ms);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    if roll >= c.options.error_rate {
        return None;
    }
    let fault = |status: u16| StatusCode::from_u16(status).expect("a valid status");
    let error = |status: StatusCode| match wire {
        Wire::OpenAi => openai_error(status, "server_error", "injected", "injected fault"),
        Wire::Anthropic => {
            let kind = match status.as_u16() {
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            anthropic_error(status, kind, "injected fault")
        }
        Wire::Vision | Wire::Gemini => {
            let mut r = google_error(
                status,
                if status.as_u16() == 429 {
                    "RESOURCE_EXHAUSTED"
                } else {
                    "UNAVAILABLE"
                },
                "injected fault",
            );
            if status.as_u16() == 429 {
                r.headers_mut()
                    .insert("retry-after", "1".parse().expect("static header"));
            }
            r
        }
    };
    Some(Some(match pick {
        0 => {
            let mut r = error(fault(429));
            r.headers_mut()
                .insert("retry-after", "1".parse().expect("static header"));
            r
        }
        1 => error(fault(500)),
        2 => error(if wire == Wire::Anthropic {
            fault(529)
        } else {
            fault(503)
        }),
        3 => {
            // A timeout: no answer for longer than a test's client waits.
            tokio::time::sleep(Duration::from_secs(5)).await;
            error(fault(504))
        }
        4 if wire == Wire::Vision => return Some(None),
        _ => (StatusCode::OK, "<html>upstream hiccup</html>").into_response(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_mix_names_kinds_and_weights() {
        assert_eq!(parse_mix("429=3, timeout=1").unwrap(), [3, 0, 0, 1, 0, 0]);
        assert!(
            parse_mix("418=1")
                .unwrap_err()
                .contains("unknown fault kind")
        );
        assert!(parse_mix("500=x").unwrap_err().contains("whole number"));
        assert!(parse_mix("500=0").unwrap_err().contains("at least one"));
        let mut rng = fastrand::Rng::with_seed(1);
        let only_500 = [0, 1, 0, 0, 0, 0];
        assert!((0..1000).all(|_| pick_fault(&mut rng, &only_500) == 1));
        let mut counts = [0u32; 6];
        for _ in 0..6000 {
            counts[pick_fault(&mut rng, &[1, 0, 0, 0, 0, 2]) as usize] += 1;
        }
        assert_eq!(counts[1..5], [0, 0, 0, 0]);
        assert!((1800..2200).contains(&counts[0]), "{counts:?}");
    }

    #[tokio::test]
    async fn with_a_mix_of_only_429_every_failed_call_is_a_429_with_retry_after() {
        let fake = FakeProviders::start_with(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            FakeOptions {
                error_rate: 1.0,
                mix: parse_mix("429=1").unwrap(),
                ..FakeOptions::default()
            },
        )
        .await
        .unwrap();
        let http = reqwest::Client::new();
        for _ in 0..10 {
            let r = http
                .post(format!("{}/v1/chat/completions", fake.base_url()))
                .bearer_auth("k")
                .body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 429);
            assert_eq!(r.headers()["retry-after"], "1");
        }
    }
}
