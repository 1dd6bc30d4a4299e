//! Metrics and Sentry: what the operator sees of a running aiq.
//!
//! Metrics go through the `metrics` facade into one Prometheus recorder per process, rendered at
//! `/metrics`. Queue and budget gauges are fleet-wide facts read from Redis at scrape time; job,
//! provider and cost counters are this process's. Labels are bounded: tier, kind, provider,
//! outcome, status, window; never a job or an organisation. The fleet-wide values come from
//! Redis, which anything can write: `queue` hands over only known names with parsed values
//! (the rest is counted in `aiq_metrics_bad_redis_values_total`), and every label value written
//! here is escaped anyway.
//!
//! Sentry gets job failures that end a job (dead) and daemon errors, tagged with kind, tier,
//! provider, organisation and attempt. Every event passes a scrubbing hook first: API keys and
//! the other configured secrets, URL passwords, bearer tokens, `sk-` keys, e-mail addresses and
//! long base64 runs (image bytes) are replaced, and every text cut to a bound, before anything
//! leaves the process. What a job was asked (its payload) goes only with
//! `AIQ_SENTRY_SEND_PAYLOADS=true`. Each job runs bound to a hub of its own ([`job_hub`]), so an
//! event carries the breadcrumbs of its own job only. The transport is our own small one over
//! the same reqwest as the providers.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sentry::protocol::{Event, Value as SentryValue};
use sentry::{ClientOptions, Envelope, Transport, TransportFactory};

use crate::budget::ScopeState;
use crate::queue::{QueueStats, SkippedValues};

/// The process's metrics recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let buckets = |b: &[f64]| b.to_vec();
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("aiq_job_wait_seconds".into()),
                &buckets(&[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 600.0,
                ]),
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("aiq_job_run_seconds".into()),
                    &buckets(&[
                        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    ]),
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("aiq_provider_call_seconds".into()),
                    &buckets(&[
                        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                    ]),
                )
            })
            .expect("static histogram buckets are valid")
            .install_recorder()
            .expect("one metrics recorder per process");
        describe();
        metrics::gauge!("aiq_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        // At 0 from the start, so an alert on its increase sees the first bad value.
        for (key, _) in SkippedValues::default().by_key() {
            metrics::counter!("aiq_metrics_bad_redis_values_total", "key" => key).absolute(0);
        }
        handle
    })
}

/// Help texts, so `promtool check metrics` and readers know what each series is.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("aiq_build_info", "The aiq version running (always 1).");
    describe_counter!(
        "aiq_jobs_finished_total",
        "Job executions finished by this process, by outcome."
    );
    describe_histogram!(
        "aiq_job_wait_seconds",
        metrics::Unit::Seconds,
        "Time from enqueue to start."
    );
    describe_histogram!(
        "aiq_job_run_seconds",
        metrics::Unit::Seconds,
        "Time a job execution ran."
    );
    describe_counter!(
        "aiq_provider_calls_total",
        "Provider calls by provider and status (ok or an error kind)."
    );
    describe_histogram!(
        "aiq_provider_call_seconds",
        metrics::Unit::Seconds,
        "Provider call latency."
    );
    describe_counter!(
        "aiq_cost_micro_usd_total",
        "Money settled for provider calls."
    );
    describe_counter!(
        "aiq_provider_call_retries_total",
        "Failed provider calls tried again inside the same attempt, by provider and error kind."
    );
    describe_counter!(
        "aiq_fallbacks_total",
        "LLM jobs that moved from one provider to the next of their fallback chain."
    );
    // The queue crate counts aiq_jobs_corrupt_total and aiq_queue_repairs_total itself, through
    // the same `metrics` recorder.
    describe_counter!(
        "aiq_jobs_corrupt_total",
        "Leased jobs whose fields in Redis were not what enqueue.lua writes; each went to the dead set as corrupt."
    );
    describe_counter!(
        "aiq_redis_deferrals_total",
        "Jobs that waited, spending no attempt, because Redis could not answer a check before their call, by kind (oom, readonly, loading, masterdown, cluster, busy, connection, protocol, other)."
    );
    describe_counter!(
        "aiq_queue_repairs_total",
        "Repair scans that put back the jobs of queue keys found corrupt (moved aside to {prefix}:corrupt:*)."
    );
    describe_counter!(
        "aiq_jobs_already_done_total",
        "Fetched jobs whose id already had a result row: acknowledged without a provider call."
    );
    describe_counter!(
        "aiq_webhooks_enqueued_total",
        "Webhook messages written to the outbox with jobs' final result rows (one per endpoint and callback_url)."
    );
    describe_counter!(
        "aiq_webhook_deliveries_total",
        "Webhook tries by this process, by outcome: delivered (2xx), retried (a failure tried again later) or given_up (AIQ_WEBHOOK_RETRY_FOR_S after its first failed try)."
    );
    describe_gauge!(
        "aiq_webhook_endpoints_failing",
        "Webhook endpoints failing for longer than AIQ_WEBHOOK_FAILING_AFTER_S (fleet-wide, from PostgreSQL)."
    );
    describe_counter!(
        "aiq_metrics_bad_redis_values_total",
        "Values in the queue's Redis keys that a scrape left out, by key, counted again by each scrape while they stay: fields aiq does not write, counts that are not integers, scores that are not times."
    );
}

/// A job waited because Redis could not answer a check before its call (`kind`: oom, readonly,
/// loading, masterdown, cluster, busy, connection, protocol or other).
pub fn redis_deferral(kind: &'static str) {
    metrics::counter!("aiq_redis_deferrals_total", "kind" => kind).increment(1);
}

/// A fetched job already had its outcome in PostgreSQL and was acknowledged without a call.
pub fn job_already_done() {
    metrics::counter!("aiq_jobs_already_done_total").increment(1);
}

/// A scrape's queue stats read left values out (see [`SkippedValues`]).
pub fn bad_redis_values(skipped: &SkippedValues) {
    for (key, n) in skipped.by_key() {
        if n > 0 {
            metrics::counter!("aiq_metrics_bad_redis_values_total", "key" => key).increment(n);
        }
    }
}

/// A failed call is tried again in the same attempt.
pub fn call_retried(provider: &str, kind: &'static str) {
    metrics::counter!("aiq_provider_call_retries_total", "provider" => provider.to_owned(), "error" => kind)
        .increment(1);
}

/// A call cost more than its reservation's estimate (the actual cost was recorded and settled).
pub fn cost_above_estimate(provider: &str) {
    metrics::counter!("aiq_cost_above_estimate_total", "provider" => provider.to_owned())
        .increment(1);
}

/// An answer whose rows PostgreSQL could not take was kept with its job in Redis.
/// A cancelled job's row was written by this process.
pub fn job_cancelled(tier: &str) {
    let tier = tier
        .parse::<crate::domain::Tier>()
        .map_or("unknown", |t| t.as_str());
    metrics::counter!("aiq_jobs_cancelled_total", "tier" => tier).increment(1);
}

pub fn answer_kept() {
    metrics::counter!("aiq_answers_kept_total").increment(1);
}

/// A kept answer's rows were written by a later execution, with no second call.
pub fn kept_answer_written() {
    metrics::counter!("aiq_kept_answers_written_total").increment(1);
}

/// Webhook messages written to the outbox.
pub fn webhooks_enqueued(n: u64) {
    metrics::counter!("aiq_webhooks_enqueued_total").increment(n);
}

/// One webhook try ended: `outcome` is delivered, retried or given_up.
pub fn webhook_delivery(outcome: &'static str) {
    metrics::counter!("aiq_webhook_deliveries_total", "outcome" => outcome).increment(1);
}

/// Endpoints failing for longer than the setting's threshold, as PostgreSQL counts them.
pub fn webhook_endpoints_failing(n: i64) {
    metrics::gauge!("aiq_webhook_endpoints_failing").set(n.max(0) as f64);
}

/// A job moves to the next model of its fallback chain.
pub fn fell_back(from: &str, to: &str) {
    metrics::counter!("aiq_fallbacks_total", "from" => from.to_owned(), "to" => to.to_owned())
        .increment(1);
}

/// A job ended this execution: `outcome` is succeeded, retried, dead or deferred.
pub fn job_finished(
    outcome: &'static str,
    kind: &str,
    tier: &str,
    provider: &str,
    run: Duration,
    wait: Duration,
) {
    let (kind, tier, provider) = (kind.to_owned(), tier.to_owned(), provider.to_owned());
    metrics::counter!("aiq_jobs_finished_total", "outcome" => outcome, "kind" => kind.clone(),
        "tier" => tier.clone(), "provider" => provider)
    .increment(1);
    metrics::histogram!("aiq_job_run_seconds", "kind" => kind, "outcome" => outcome)
        .record(run.as_secs_f64());
    metrics::histogram!("aiq_job_wait_seconds", "tier" => tier).record(wait.as_secs_f64());
}

/// A provider call ended with `status` ("ok" or an error kind).
pub fn provider_call(provider: &str, status: &'static str, took: Duration) {
    let provider = provider.to_owned();
    metrics::counter!("aiq_provider_calls_total", "provider" => provider.clone(), "status" => status).increment(1);
    metrics::histogram!("aiq_provider_call_seconds", "provider" => provider, "status" => status)
        .record(took.as_secs_f64());
}

/// Money settled for a call.
pub fn cost(provider: &str, tier: &str, usd: f64) {
    // Counters are integers in the facade: count micro-dollars, then expose dollars below.
    metrics::counter!("aiq_cost_micro_usd_total", "provider" => provider.to_owned(), "tier" => tier.to_owned())
        .increment((usd * 1_000_000.0).round().max(0.0) as u64);
}

/// The fleet-wide facts of one scrape, read from Redis: written straight into the response
/// rather than into the process's recorder, so two scrapes never mix their values.
#[derive(Default)]
pub struct Fleet<'a> {
    pub stats: Option<&'a QueueStats>,
    pub budget: &'a [ScopeState],
    /// (provider, open) for each circuit breaker.
    pub breakers: Vec<(&'static str, bool)>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    if samples.is_empty() {
        return;
    }
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, v) in samples {
        out.push_str(&format!("{name}{labels} {}\n", sample_value(*v)));
    }
}

/// A label pair in the text format. The value is escaped even where we believe it safe (tiers,
/// events and windows are fixed names): one slip must not let a value end the label set.
fn label(name: &str, value: &str) -> String {
    let mut v = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => v.push_str("\\\\"),
            '"' => v.push_str("\\\""),
            '\n' => v.push_str("\\n"),
            c => v.push(c),
        }
    }
    format!("{{{name}=\"{v}\"}}")
}

/// A sample value in the text format, which spells the infinities and NaN its own way (Rust's
/// `inf` would break the scrape).
fn sample_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// Renders the Prometheus text: the fleet-wide families of this scrape, then this process's.
pub fn render(fleet: &Fleet<'_>) -> String {
    let handle = prometheus();
    let mut out = String::new();
    if let Some(s) = fleet.stats {
        let waiting: Vec<_> = s
            .waiting
            .iter()
            .map(|(t, n)| (label("tier", t), *n as f64))
            .collect();
        family(
            &mut out,
            "aiq_queue_waiting_jobs",
            "gauge",
            "Jobs waiting per tier (fleet-wide, from Redis).",
            &waiting,
        );
        let oldest: Vec<_> = s
            .oldest_age_ms
            .iter()
            .map(|(t, ms)| (label("tier", t), *ms as f64 / 1000.0))
            .collect();
        family(
            &mut out,
            "aiq_queue_oldest_job_age_seconds",
            "gauge",
            "How long the oldest waiting job of each tier has waited.",
            &oldest,
        );
        family(
            &mut out,
            "aiq_queue_inflight_jobs",
            "gauge",
            "Jobs leased to workers now.",
            &[(String::new(), s.inflight as f64)],
        );
        family(
            &mut out,
            "aiq_queue_delayed_jobs",
            "gauge",
            "Jobs waiting for a retry or a budget window.",
            &[(String::new(), s.delayed as f64)],
        );
        family(
            &mut out,
            "aiq_queue_dead_jobs",
            "gauge",
            "Jobs in the dead set.",
            &[(String::new(), s.dead as f64)],
        );
        // Per tier, as the scripts count them ({p}:held); the totals above are the sets' sizes.
        let mut held = Vec::new();
        for (state, by) in [
            ("inflight", &s.inflight_by_tier),
            ("delayed", &s.delayed_by_tier),
            ("dead", &s.dead_by_tier),
        ] {
            for (t, n) in by {
                let (a, b) = (label("state", state), label("tier", t));
                // Two pairs in one set: `{state="..",tier=".."}`.
                let pairs = format!("{{{},{}}}", &a[1..a.len() - 1], &b[1..b.len() - 1]);
                held.push((pairs, *n as f64));
            }
        }
        family(
            &mut out,
            "aiq_queue_tier_jobs",
            "gauge",
            "Jobs leased, delayed or dead per tier, as the queue scripts count them (fleet-wide, from Redis).",
            &held,
        );
        let events: Vec<_> = s
            .counters
            .iter()
            .map(|(e, n)| (label("event", e), *n as f64))
            .collect();
        family(
            &mut out,
            "aiq_queue_events_total",
            "counter",
            "Queue events since the queue began (fleet-wide, from Redis); interrupted counts leases reaped from dead workers.",
            &events,
        );
    }
    let global: Vec<&ScopeState> = fleet
        .budget
        .iter()
        .filter(|b| b.owner == "global")
        .collect();
    let per = |f: &dyn Fn(&ScopeState) -> f64| -> Vec<(String, f64)> {
        global
            .iter()
            .map(|b| (label("window", b.window_kind.as_str()), f(b)))
            .collect()
    };
    family(
        &mut out,
        "aiq_budget_spent_usd",
        "gauge",
        "Platform spend in the current window, US dollars.",
        &per(&|b| b.spent.as_usd_f64()),
    );
    family(
        &mut out,
        "aiq_budget_limit_usd",
        "gauge",
        "Platform limit of the current window, US dollars.",
        &per(&|b| b.limit.as_usd_f64()),
    );
    family(
        &mut out,
        "aiq_budget_used_ratio",
        "gauge",
        "Platform spend over its limit in the current window.",
        &per(&|b| {
            if b.limit.micros() > 0 {
                b.spent.micros() as f64 / b.limit.micros() as f64
            } else {
                0.0
            }
        }),
    );
    let breakers: Vec<_> = fleet
        .breakers
        .iter()
        .map(|(p, open)| (label("provider", p), if *open { 1.0 } else { 0.0 }))
        .collect();
    family(
        &mut out,
        "aiq_provider_breaker_open",
        "gauge",
        "1 while a provider's circuit breaker holds its calls back.",
        &breakers,
    );
    out.push_str(&dollars_from_micros(&handle.render()));
    out
}

/// The facade's counters are integers, so cost is counted in micro-dollars; Prometheus readers
/// want dollars. Rewrites `aiq_cost_micro_usd_total` samples into `aiq_cost_usd_total`.
fn dollars_from_micros(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("# HELP aiq_cost_micro_usd_total") {
            out.push_str(
                "# HELP aiq_cost_usd_total Money settled for provider calls, in US dollars.\n",
            );
        } else if let Some(rest) = line.strip_prefix("# TYPE aiq_cost_micro_usd_total") {
            out.push_str(&format!("# TYPE aiq_cost_usd_total{rest}\n"));
        } else if let Some(rest) = line.strip_prefix("aiq_cost_micro_usd_total") {
            match rest.rsplit_once(' ') {
                Some((labels, v)) => {
                    let micros: f64 = v.parse().unwrap_or(0.0);
                    out.push_str(&format!(
                        "aiq_cost_usd_total{labels} {}\n",
                        micros / 1_000_000.0
                    ));
                }
                None => out.push_str(&format!("{line}\n")),
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Replaces secrets, URL passwords, bearer tokens, `sk-` keys, e-mail addresses and long base64
/// runs.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let s = crate::redact::secrets(text, secrets, "[secret]");
    let s = crate::redact::url(&s);
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=';
    let is_word = |c: char| c.is_ascii_alphanumeric() || "._%+-".contains(c);
    while i < chars.len() {
        // A run of base64 characters long enough to be file bytes, not a word.
        let run = chars[i..].iter().take_while(|c| is_b64(**c)).count();
        if run >= 64 {
            out.push_str("[bytes]");
            i += run;
            continue;
        }
        // Bearer tokens and sk- style keys.
        let rest: String = chars[i..chars.len().min(i + 7)].iter().collect();
        if rest.eq_ignore_ascii_case("bearer ") {
            let tok = chars[i + 7..]
                .iter()
                .take_while(|c| !c.is_whitespace() && **c != '"')
                .count();
            out.push_str("Bearer [secret]");
            i += 7 + tok;
            continue;
        }
        if chars[i..].starts_with(&['s', 'k', '-']) && (i == 0 || !is_word(chars[i - 1])) {
            let tok = chars[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '-' || **c == '_')
                .count();
            if tok >= 12 {
                out.push_str("[secret]");
                i += tok;
                continue;
            }
        }
        // An e-mail address: word@word.word
        if chars[i] == '@' {
            let mut start = out.len();
            while start > 0 && is_word(out[..start].chars().last().unwrap_or(' ')) {
                start -= out[..start].chars().last().map_or(1, char::len_utf8);
            }
            let after = chars[i + 1..].iter().take_while(|c| is_word(**c)).count();
            let domain: String = chars[i + 1..i + 1 + after].iter().collect();
            if start < out.len() && domain.contains('.') {
                out.truncate(start);
                out.push_str("[email]");
                i += 1 + after;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// The longest text an event field carries, in characters; a longer one is cut, its length
/// noted. Tags get Sentry's own bound.
const EVENT_TEXT_MAX: usize = crate::redact::MESSAGE_MAX;
const TAG_MAX: usize = 200;
/// With `AIQ_SENTRY_SEND_PAYLOADS=true`, the payload's strings may be this long.
const PAYLOAD_TEXT_MAX: usize = 8 * 1024;

/// Keys whose values are what a job was asked (prompts, messages, image data). They leave the
/// process only with `AIQ_SENTRY_SEND_PAYLOADS=true`.
const PAYLOAD_KEYS: [&str; 6] = ["payload", "messages", "prompt", "images", "content", "text"];

fn is_payload_key(key: &str) -> bool {
    PAYLOAD_KEYS.contains(&key.to_ascii_lowercase().as_str())
}

/// [`scrub`], then cut to `max` characters.
fn scrub_cut(text: &mut String, secrets: &[String], max: usize) {
    let clean = scrub(text, secrets);
    *text = crate::redact::cut(&clean, max).into_owned();
}

fn scrub_value(v: &mut SentryValue, secrets: &[String], max: usize) {
    match v {
        SentryValue::String(s) => scrub_cut(s, secrets, max),
        SentryValue::Array(a) => a.iter_mut().for_each(|x| scrub_value(x, secrets, max)),
        SentryValue::Object(o) => scrub_entries(o.iter_mut(), secrets, max),
        _ => {}
    }
}

/// Scrubs the values of a map; the values of keys that name a credential are replaced whole.
fn scrub_entries<'a>(
    entries: impl Iterator<Item = (&'a String, &'a mut SentryValue)>,
    secrets: &[String],
    max: usize,
) {
    for (k, x) in entries {
        let key = k.to_ascii_lowercase();
        if key.contains("authorization")
            || key.contains("api_key")
            || key.contains("apikey")
            || key == "password"
        {
            *x = SentryValue::String("[secret]".into());
        } else {
            scrub_value(x, secrets, max);
        }
    }
}

/// What an event may carry of the jobs' payloads: with `send_payloads` off, every value under
/// a [`PAYLOAD_KEYS`] key goes (its size stays, as `payload_bytes`, where the caller set it).
fn strip_payloads(event: &mut Event<'static>) {
    let strip =
        |m: &mut sentry::protocol::Map<String, SentryValue>| m.retain(|k, _| !is_payload_key(k));
    strip(&mut event.extra);
    for c in event.contexts.values_mut() {
        if let sentry::protocol::Context::Other(m) = c {
            strip(m);
        }
    }
    for b in event.breadcrumbs.values.iter_mut() {
        strip(&mut b.data);
    }
    if let Some(r) = event.request.as_mut() {
        r.data = None;
    }
}

/// The hook every event passes before it leaves (`before_send`): payloads stripped unless
/// `send_payloads`, then every string it carries through [`scrub`] and cut to a bound, so no
/// secret, URL password, e-mail address or image leaves, and no field is longer than
/// [`EVENT_TEXT_MAX`] characters (the payload's, when sent, [`PAYLOAD_TEXT_MAX`]).
pub fn prepare_event(
    mut event: Event<'static>,
    secrets: &[String],
    send_payloads: bool,
) -> Event<'static> {
    if !send_payloads {
        strip_payloads(&mut event);
    }
    let s = |t: &mut String| scrub_cut(t, secrets, EVENT_TEXT_MAX);
    if let Some(m) = event.message.as_mut() {
        s(m);
    }
    if let Some(l) = event.logentry.as_mut() {
        s(&mut l.message);
        l.params
            .iter_mut()
            .for_each(|v| scrub_value(v, secrets, EVENT_TEXT_MAX));
    }
    for e in event.exception.values.iter_mut() {
        if let Some(v) = e.value.as_mut() {
            s(v);
        }
    }
    for (k, v) in event.extra.iter_mut() {
        let max = if is_payload_key(k) {
            PAYLOAD_TEXT_MAX
        } else {
            EVENT_TEXT_MAX
        };
        scrub_value(v, secrets, max);
    }
    for v in event.tags.values_mut() {
        scrub_cut(v, secrets, TAG_MAX);
    }
    for c in event.contexts.values_mut() {
        if let sentry::protocol::Context::Other(m) = c {
            scrub_entries(m.iter_mut(), secrets, EVENT_TEXT_MAX);
        }
    }
    for b in event.breadcrumbs.values.iter_mut() {
        if let Some(m) = b.message.as_mut() {
            s(m);
        }
        scrub_entries(b.data.iter_mut(), secrets, EVENT_TEXT_MAX);
    }
    if let Some(r) = event.request.as_mut() {
        r.headers.retain(|k, _| {
            !k.eq_ignore_ascii_case("authorization") && !k.to_ascii_lowercase().contains("api-key")
        });
        if let Some(d) = r.data.as_mut() {
            s(d);
        }
    }
    if let Some(t) = event.transaction.as_mut() {
        s(t);
    }
    if let Some(c) = event.culprit.as_mut() {
        s(c);
    }
    event
}

/// A Sentry hub of a job's own, for the job's future (`SentryFutureExt::bind_hub`): it starts
/// from the current hub's client and scope (tags, options) but without breadcrumbs, and the
/// breadcrumbs the job leaves stay in it. So an event about a job carries that job's steps
/// only, never those of the jobs that ran beside it on the same thread or before it.
pub fn job_hub() -> Arc<sentry::Hub> {
    let hub = sentry::Hub::new_from_top(sentry::Hub::current());
    hub.configure_scope(|scope| scope.clear_breadcrumbs());
    Arc::new(hub)
}

/// Sends envelopes from a thread of its own (sentry calls the transport synchronously).
struct HttpTransport {
    tx: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    pending: Arc<(Mutex<usize>, Condvar)>,
}

impl HttpTransport {
    fn new(dsn: &sentry::types::Dsn) -> Self {
        let url = dsn.envelope_api_url().to_string();
        let auth = dsn
            .to_auth(Some(concat!("aiq/", env!("CARGO_PKG_VERSION"))))
            .to_string();
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let counter = pending.clone();
        std::thread::Builder::new()
            .name("aiq-sentry".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                // reqwest's client needs a runtime around it, even to be built.
                let _entered = rt.enter();
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("building an HTTP client with static settings");
                for body in rx {
                    let sent = rt.block_on(
                        http.post(&url)
                            .header("X-Sentry-Auth", &auth)
                            .header("Content-Type", "application/x-sentry-envelope")
                            .body(body)
                            .send(),
                    );
                    if let Err(e) = sent {
                        eprintln!(
                            "aiq: sending an event to Sentry failed: {}",
                            e.without_url()
                        );
                    }
                    let (lock, cvar) = &*counter;
                    *lock.lock().expect("sentry counter") -= 1;
                    cvar.notify_all();
                }
            })
            .expect("spawning the Sentry thread");
        Self {
            tx: Mutex::new(Some(tx)),
            pending,
        }
    }
}

impl Transport for HttpTransport {
    fn send_envelope(&self, envelope: Envelope) {
        let mut body = Vec::new();
        if envelope.to_writer(&mut body).is_err() {
            return;
        }
        if let Some(tx) = self.tx.lock().expect("sentry sender").as_ref() {
            *self.pending.0.lock().expect("sentry counter") += 1;
            if tx.send(body).is_err() {
                *self.pending.0.lock().expect("sentry counter") -= 1;
            }
        }
    }

    fn flush(&self, timeout: Duration) -> bool {
        let (lock, cvar) = &*self.pending;
        let guard = lock.lock().expect("sentry counter");
        let (guard, _) = cvar
            .wait_timeout_while(guard, timeout, |n| *n > 0)
            .expect("sentry counter");
        *guard == 0
    }

    fn shutdown(&self, timeout: Duration) -> bool {
        let drained = self.flush(timeout);
        self.tx.lock().expect("sentry sender").take();
        drained
    }
}

/// Sentry's options apart from the DSN and the transport: release, environment, no personal
/// data, and [`prepare_event`] as the last hook before an event leaves.
pub fn sentry_options(
    environment: &str,
    secrets: Vec<String>,
    send_payloads: bool,
) -> ClientOptions {
    let secrets = Arc::new(secrets);
    let mut options = ClientOptions::default();
    options.release = Some(concat!("aiq@", env!("CARGO_PKG_VERSION")).into());
    options.environment = Some(environment.to_owned().into());
    options.send_default_pii = false;
    options.before_send = Some(Arc::new(move |e| {
        Some(prepare_event(e, &secrets, send_payloads))
    }));
    options
}

/// Starts Sentry when a DSN is set. Keep the guard alive; dropping it flushes.
pub fn init_sentry(
    dsn: &str,
    environment: &str,
    secrets: Vec<String>,
    send_payloads: bool,
) -> anyhow::Result<sentry::ClientInitGuard> {
    let parsed: sentry::types::Dsn = dsn
        .parse()
        .map_err(|e| anyhow::anyhow!("setting AIQ_SENTRY_DSN: not a Sentry DSN: {e}"))?;
    let mut options = sentry_options(environment, secrets, send_payloads);
    options.dsn = Some(parsed.clone());
    let factory: Arc<dyn TransportFactory> =
        Arc::new(move |_: &ClientOptions| -> Arc<dyn Transport> {
            Arc::new(HttpTransport::new(&parsed))
        });
    options.transport = Some(factory);
    Ok(sentry::init(options))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sentry's own transport API, keeping each event instead of sending it: a fake of the
    /// third party, so the real options and hook run.
    #[derive(Default)]
    struct Captured(Mutex<Vec<Event<'static>>>);

    impl Transport for Captured {
        fn send_envelope(&self, envelope: Envelope) {
            if let Some(e) = envelope.event() {
                self.0.lock().unwrap().push(e.clone());
            }
        }
    }

    /// Runs `f` with a hub whose client has aiq's options ([`sentry_options`]) and returns the
    /// events it sent.
    fn captured(secrets: &[&str], send_payloads: bool, f: impl FnOnce()) -> Vec<Event<'static>> {
        let sink = Arc::new(Captured::default());
        let secrets = secrets.iter().map(|s| (*s).to_owned()).collect();
        let mut options = sentry_options("test", secrets, send_payloads);
        options.dsn = Some("https://public@sentry.invalid/1".parse().unwrap());
        let transport = sink.clone();
        options.transport = Some(Arc::new(move |_: &ClientOptions| {
            transport.clone() as Arc<dyn Transport>
        }));
        let client = Arc::new(sentry::Client::from(options));
        let hub = Arc::new(sentry::Hub::new(Some(client), Arc::default()));
        sentry::Hub::run(hub, f);
        std::mem::take(&mut *sink.0.lock().unwrap())
    }

    fn dead_job_event() {
        sentry::with_scope(
            |scope| {
                // Not base64, or the scrubber would take it for image bytes.
                scope.set_extra("correlation_id", "c-".repeat(1 << 19).into());
                scope.set_extra("payload_bytes", 123.into());
                scope.set_extra(
                    "payload",
                    serde_json::json!({ "messages": [{ "role": "user", "content": "my private prompt" }] }),
                );
            },
            || {
                sentry::capture_message(
                    "job failed for good: key sk-live-0123456789abcdef, redis redis://:redis-pw@h/0",
                    sentry::Level::Error,
                )
            },
        );
    }

    #[test]
    fn an_event_carries_no_payload_unless_payloads_are_on_and_no_secret_or_long_text_either_way() {
        let secrets = ["sk-live-0123456789abcdef"];
        let events = captured(&secrets, false, dead_job_event);
        assert_eq!(events.len(), 1);
        let sent = serde_json::to_string(&events[0]).unwrap();
        assert!(!sent.contains("my private prompt"), "{sent}");
        assert!(!events[0].extra.contains_key("payload"), "{sent}");
        assert_eq!(events[0].extra["payload_bytes"], 123);
        assert!(
            !sent.contains("sk-live") && !sent.contains("redis-pw"),
            "{sent}"
        );
        assert!(sent.contains("redis://:***@h/0"), "{sent}");
        let correlation = events[0].extra["correlation_id"].as_str().unwrap();
        assert!(
            correlation.len() < 2 * EVENT_TEXT_MAX
                && correlation.ends_with("(1048576 bytes in all)"),
            "{}",
            correlation.len()
        );
        assert!(sent.len() < 16 * 1024, "{}", sent.len());

        // With AIQ_SENTRY_SEND_PAYLOADS=true the payload goes, scrubbed like the rest.
        let events = captured(&secrets, true, dead_job_event);
        let sent = serde_json::to_string(&events[0]).unwrap();
        assert!(sent.contains("my private prompt"), "{sent}");
        assert!(
            !sent.contains("sk-live") && !sent.contains("redis-pw"),
            "{sent}"
        );
    }

    #[test]
    fn an_event_about_one_job_carries_that_jobs_breadcrumbs_only() {
        use sentry::SentryFutureExt;
        use sentry::integrations::tracing::{BreadcrumbLayer, ErrorLayer};
        use tracing_subscriber::filter::LevelFilter;
        use tracing_subscriber::prelude::*;

        // The layers `telemetry::init` installs.
        let subscriber = || {
            tracing_subscriber::registry()
                .with(ErrorLayer::new().with_filter(LevelFilter::ERROR))
                .with(BreadcrumbLayer::new().with_filter(LevelFilter::WARN))
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Two jobs taking turns on one thread, as the worker's tasks do; with `own_hubs` each
        // is bound to a hub of its own, as `JobService` binds them.
        let run = |own_hubs: bool| {
            captured(&[], false, || {
                tracing::subscriber::with_default(subscriber(), || {
                    tracing::warn!("before any job");
                    let a = async {
                        tracing::warn!("a: first step");
                        tokio::task::yield_now().await;
                        tracing::warn!("a: second step");
                        tokio::task::yield_now().await;
                        tracing::error!("a failed");
                    };
                    let b = async {
                        tracing::warn!("b: first step");
                        tokio::task::yield_now().await;
                        tokio::task::yield_now().await;
                        tracing::error!("b failed");
                    };
                    rt.block_on(async {
                        if own_hubs {
                            futures::join!(a.bind_hub(job_hub()), b.bind_hub(job_hub()));
                        } else {
                            futures::join!(a, b);
                        }
                    });
                })
            })
        };
        let crumbs = |events: &[Event<'static>], about: &str| -> Vec<String> {
            let e = events
                .iter()
                .find(|e| e.message.as_deref() == Some(about))
                .unwrap_or_else(|| panic!("no event {about}: {events:?}"));
            e.breadcrumbs
                .values
                .iter()
                .filter_map(|b| b.message.clone())
                .collect()
        };
        let events = run(true);
        assert_eq!(
            crumbs(&events, "a failed"),
            ["a: first step", "a: second step"]
        );
        assert_eq!(crumbs(&events, "b failed"), ["b: first step"]);
        // Without hubs of their own, one job's event carries the other's steps: the case above
        // is what the binding changes.
        let shared = run(false);
        assert!(crumbs(&shared, "b failed").contains(&"a: second step".to_owned()));
    }

    #[test]
    fn scrubbing_removes_keys_tokens_emails_and_bytes() {
        let secrets = vec!["vision-key-123".to_owned()];
        let text = "key vision-key-123, auth Bearer abc.def, openai sk-proj-ABCDEFGHIJKLMNOP, mail jane.doe+x@example.co.uk \
                    img iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg== end";
        let s = scrub(text, &secrets);
        assert!(!s.contains("vision-key-123"), "{s}");
        assert!(!s.contains("abc.def"), "{s}");
        assert!(!s.contains("sk-proj"), "{s}");
        assert!(!s.contains("jane.doe"), "{s}");
        assert!(!s.contains("iVBORw0KGgo"), "{s}");
        assert!(
            s.contains("[email]") && s.contains("[bytes]") && s.contains("Bearer [secret]"),
            "{s}"
        );
        assert!(s.starts_with("key [secret],") && s.ends_with(" end"), "{s}");
        // Ordinary text passes unchanged.
        assert_eq!(
            scrub("caption a cat @ 3pm, ask-me", &secrets),
            "caption a cat @ 3pm, ask-me"
        );
    }

    /// The fleet-wide families `render` writes, with the most series each can have: one per
    /// tier, per queue event, per budget window (day, month) and per provider.
    fn fleet_families() -> [(&'static str, usize); 11] {
        let tiers = crate::domain::Tier::ALL.len();
        let providers = crate::domain::PROVIDERS.len();
        [
            ("aiq_queue_waiting_jobs", tiers),
            ("aiq_queue_oldest_job_age_seconds", tiers),
            ("aiq_queue_inflight_jobs", 1),
            ("aiq_queue_delayed_jobs", 1),
            ("aiq_queue_dead_jobs", 1),
            ("aiq_queue_tier_jobs", 3 * tiers),
            ("aiq_queue_events_total", crate::queue::COUNTER_EVENTS.len()),
            ("aiq_budget_spent_usd", 2),
            ("aiq_budget_limit_usd", 2),
            ("aiq_budget_used_ratio", 2),
            ("aiq_provider_breaker_open", providers),
        ]
    }

    /// The sample lines of one family.
    fn samples<'t>(text: &'t str, family: &str) -> Vec<&'t str> {
        text.lines()
            .filter(|l| {
                l.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .collect()
    }

    fn scope(owner: &str, window_kind: crate::budget::WindowKind) -> ScopeState {
        ScopeState {
            scope: format!("{owner}:{}", window_kind.as_str()),
            owner: owner.to_owned(),
            window_kind,
            window: "2026-11".into(),
            spent: crate::domain::MicroUsd::from_micros(5),
            reserved: crate::domain::MicroUsd::ZERO,
            limit: crate::domain::MicroUsd::from_micros(10),
        }
    }

    #[test]
    fn the_fleet_wide_families_have_a_bounded_number_of_series() {
        // The most a stats read can hand over: every tier, every event the scripts count.
        let tiers = crate::domain::Tier::ALL.map(|t| (t.as_str().to_owned(), 3));
        let stats = QueueStats {
            waiting: tiers.iter().cloned().collect(),
            oldest_age_ms: tiers.iter().cloned().collect(),
            inflight_by_tier: tiers.iter().cloned().collect(),
            delayed_by_tier: tiers.iter().cloned().collect(),
            dead_by_tier: tiers.iter().cloned().collect(),
            counters: crate::queue::COUNTER_EVENTS
                .iter()
                .map(|e| ((*e).to_owned(), 1))
                .collect(),
            ..Default::default()
        };
        use crate::budget::WindowKind::{Day, Month};
        // Organisations' scopes are not the platform's and add no series.
        let budget = [
            scope("global", Day),
            scope("global", Month),
            scope("org:1", Day),
            scope("org:2", Month),
        ];
        let fleet = Fleet {
            stats: Some(&stats),
            budget: &budget,
            breakers: crate::domain::PROVIDERS
                .iter()
                .map(|p| (*p, false))
                .collect(),
        };
        let text = render(&fleet);
        let mut total = 0;
        for (family, most) in fleet_families() {
            let n = samples(&text, family).len();
            assert_eq!(n, most, "{family}:\n{text}");
            total += n;
        }
        // Five per tier, the three set sizes, one per event, three per budget window, one per
        // provider.
        assert_eq!(total, 5 * 6 + 3 + 13 + 3 * 2 + 4);
    }

    #[test]
    fn every_label_value_render_writes_is_escaped() {
        let hostile = "x\"} 1\nevil{a=\"\\";
        let stats = QueueStats {
            waiting: [(hostile.to_owned(), 5)].into(),
            counters: [(hostile.to_owned(), 7)].into(),
            ..Default::default()
        };
        let fleet = Fleet {
            stats: Some(&stats),
            ..Default::default()
        };
        let text = render(&fleet);
        let escaped = r#"{tier="x\"} 1\nevil{a=\"\\"} 5"#;
        assert!(
            text.contains(&format!("aiq_queue_waiting_jobs{escaped}\n")),
            "{text}"
        );
        assert!(
            text.contains(r#"aiq_queue_events_total{event="x\"} 1\nevil{a=\"\\"} 7"#),
            "{text}"
        );
        assert!(!text.lines().any(|l| l.starts_with("evil")), "{text}");
    }

    #[test]
    fn sample_values_are_spelled_as_the_text_format_wants() {
        assert_eq!(sample_value(1.5), "1.5");
        assert_eq!(sample_value(3.0), "3");
        assert_eq!(sample_value(f64::INFINITY), "+Inf");
        assert_eq!(sample_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(sample_value(f64::NAN), "NaN");
    }

    #[test]
    fn cost_counters_read_out_in_dollars() {
        let text = "# TYPE aiq_cost_micro_usd_total counter\naiq_cost_micro_usd_total{provider=\"openai\",tier=\"trial\"} 1500\n";
        let out = dollars_from_micros(text);
        assert!(out.contains("# TYPE aiq_cost_usd_total counter"), "{out}");
        assert!(
            out.contains("aiq_cost_usd_total{provider=\"openai\",tier=\"trial\"} 0.0015"),
            "{out}"
        );
        assert!(!out.contains("micro"), "{out}");
    }
}
