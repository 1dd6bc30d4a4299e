//! Webhook delivery: each process runs one loop that claims due messages of the outbox
//! (`store::webhooks`, `FOR UPDATE SKIP LOCKED` under a lease, so processes share the work and
//! a message whose process died comes due again), signs them the Standard Webhooks way
//! ([`sign`]) and posts them, a bounded number at a time, with a timeout, to addresses the
//! [`address`] policy allows, following no redirect and reading at most [`MAX_ANSWER_BYTES`]
//! of an answer. A 2xx answer delivers the message; anything else is tried again, with the same
//! `webhook-id` and body, after growing delays with jitter ([`retry_delay`]), until
//! `AIQ_WEBHOOK_RETRY_FOR_S` after its first failed try; then it is given up and counted.

pub mod address;
pub mod sign;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::WebhookSettings;
use crate::store::Store;
use crate::store::webhooks::{Claimed, Tried};
use address::{AddressPolicy, CheckedResolver};
use sign::Key;

/// The most of a receiver's answer aiq reads (kept, cut, as the try's error).
pub const MAX_ANSWER_BYTES: usize = 4096;
/// The longest delay between two tries.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
/// How often the loop looks for due messages when it found none (the alerts' loop's pace).
const IDLE_POLL: Duration = Duration::from_millis(500);
/// How long the loop waits after PostgreSQL failed to answer a claim.
const UNAVAILABLE_WAIT: Duration = Duration::from_secs(5);
/// How often the failing endpoints are counted for the gauge, and old messages pruned.
const GAUGE_EVERY: Duration = Duration::from_secs(15);
/// How long finished (delivered or given up) messages stay in the outbox.
pub const KEEP_FINISHED: Duration = Duration::from_secs(7 * 86_400);
/// The most finished messages one pruning step deletes.
const PRUNE_STEP: i64 = 1000;

/// The delay before try number `failures + 1`: `base * 2^(failures - 1)` up to
/// [`MAX_RETRY_DELAY`], of which the upper half is jittered (`jitter` in [0, 1)), so delays grow
/// and tries from many processes spread out.
pub fn retry_delay(base: Duration, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let ceiling = base
        .saturating_mul(1u32 << exp)
        .clamp(Duration::from_millis(1), MAX_RETRY_DELAY.max(base));
    ceiling / 2 + (ceiling / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

/// What posts webhooks: the HTTP client (its resolver checks every address it connects to) and
/// the settings.
pub struct Sender {
    http: reqwest::Client,
    policy: Arc<AddressPolicy>,
    callback_keys: Vec<Key>,
}

/// What one post answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// At most [`MAX_ANSWER_BYTES`] of the body, lossily decoded.
    pub body: String,
}

impl Sender {
    pub fn new(settings: &WebhookSettings) -> Result<Self, String> {
        let policy = Arc::new(AddressPolicy::new(settings.allow_nets.clone()));
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would connect to addresses the resolver never saw.
            .no_proxy()
            .dns_resolver(Arc::new(CheckedResolver {
                policy: policy.clone(),
            }))
            .user_agent(concat!("aiq-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the webhooks' HTTP client: {e}"))?;
        let callback_keys = settings
            .callback_secrets
            .iter()
            .map(|s| Key::parse(s.expose()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            http,
            policy,
            callback_keys,
        })
    }

    /// Posts one message signed by `keys`, now. The error names what failed, without secrets.
    pub async fn post(
        &self,
        url: &str,
        id: &str,
        body: &str,
        keys: &[Key],
    ) -> Result<Answer, String> {
        self.policy
            .check_url(url)
            .map_err(|e| format!("the URL {e}"))?;
        if keys.is_empty() {
            return Err("no secret to sign with".into());
        }
        let timestamp = chrono::Utc::now().timestamp();
        let resp = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                sign::signature_header(keys, id, timestamp, body),
            )
            .body(body.to_owned())
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status().as_u16();
        Ok(Answer {
            status,
            body: read_bounded(resp).await,
        })
    }

    /// One try of a claimed message.
    async fn try_message(&self, m: &Claimed) -> Tried {
        let Some(url) = &m.url else {
            return Tried::Failed {
                status: None,
                error: "the endpoint is disabled".into(),
            };
        };
        let endpoint_keys;
        let keys: &[Key] = match m.endpoint_id {
            None if self.callback_keys.is_empty() => {
                return Tried::Failed {
                    status: None,
                    error: "callback deliveries need AIQ_WEBHOOK_CALLBACK_SECRET to sign them"
                        .into(),
                };
            }
            None => &self.callback_keys,
            Some(_) => {
                endpoint_keys = m
                    .secrets
                    .iter()
                    .filter_map(|s| Key::parse(s).ok())
                    .collect::<Vec<_>>();
                &endpoint_keys
            }
        };
        match self.post(url, &m.id, &m.body, keys).await {
            Ok(a) if (200..300).contains(&a.status) => Tried::Delivered { status: a.status },
            Ok(a) => Tried::Failed {
                status: Some(a.status),
                error: format!("HTTP {}: {}", a.status, crate::redact::Field::new(&a.body)),
            },
            Err(error) => Tried::Failed {
                status: None,
                error,
            },
        }
    }
}

/// A transport error as text: reqwest's word and its causes (`connection refused`, the
/// resolver's refusal).
fn transport_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = format!("unreachable: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// At most [`MAX_ANSWER_BYTES`] of an answer; the rest is never read.
async fn read_bounded(mut resp: reqwest::Response) -> String {
    let mut kept = Vec::new();
    while kept.len() < MAX_ANSWER_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ANSWER_BYTES - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Delivers due messages until `stop`.
pub async fn deliver(
    store: Store,
    sender: Arc<Sender>,
    settings: WebhookSettings,
    stop: CancellationToken,
) {
    let batch = (settings.concurrency * 2) as i64;
    // A claim outlives every try of the batch: `2 * concurrency` messages, `concurrency` at a
    // time, each at most a timeout; then a margin for recording them.
    let lease = settings.timeout * 2 + Duration::from_secs(2);
    let mut gauge_at = tokio::time::Instant::now();
    while !stop.is_cancelled() {
        if tokio::time::Instant::now() >= gauge_at {
            gauge_at = tokio::time::Instant::now() + GAUGE_EVERY;
            match store
                .failing_webhook_endpoints(settings.failing_after)
                .await
            {
                Ok(n) => crate::observe::webhook_endpoints_failing(n),
                Err(e) => tracing::debug!(error = %e, "counting failing webhook endpoints failed"),
            }
            if let Err(e) = store.prune_webhooks(KEEP_FINISHED, PRUNE_STEP).await {
                tracing::debug!(error = %e, "pruning finished webhook messages failed");
            }
        }
        let claimed = match store.claim_webhooks(batch, lease).await {
            Ok(c) => c,
            Err(e) => {
                // PostgreSQL away: one line per wait, not one per poll.
                tracing::warn!(error = %e, "claiming webhooks to deliver failed; trying again in a few seconds");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(UNAVAILABLE_WAIT) => {}
                }
                continue;
            }
        };
        let found = !claimed.is_empty();
        futures::stream::iter(claimed)
            .for_each_concurrent(settings.concurrency, |m| {
                let (store, sender, settings) = (&store, &sender, &settings);
                async move { finish(store, sender, settings, &m).await }
            })
            .await;
        if found {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(IDLE_POLL) => {}
        }
    }
}

/// Tries one message and records how it went.
async fn finish(store: &Store, sender: &Sender, settings: &WebhookSettings, m: &Claimed) {
    let tried = sender.try_message(m).await;
    let failures = m.attempts.max(0) as u32 + 1;
    let retry_in = retry_delay(settings.retry_base, failures, fastrand::f64());
    // A disabled endpoint's message is given up at once.
    let retry_for = if m.url.is_some() {
        settings.retry_for
    } else {
        Duration::ZERO
    };
    match store.webhook_tried(m, &tried, retry_in, retry_for).await {
        Ok(given_up) => match &tried {
            Tried::Delivered { .. } => crate::observe::webhook_delivery("delivered"),
            Tried::Failed { error, .. } => {
                let field = crate::redact::Field::new(error);
                if given_up {
                    crate::observe::webhook_delivery("given_up");
                    tracing::warn!(webhook = %m.id, job.id = %crate::redact::Field::new(&m.job_id),
                        organization_id = %m.organization_id, error = %field, "webhook given up");
                } else {
                    crate::observe::webhook_delivery("retried");
                    tracing::info!(webhook = %m.id, error = %field, retry_ms = retry_in.as_millis() as u64,
                        "webhook failed; trying again later");
                }
            }
        },
        // The claim's lease ends and the message comes due again: at least once.
        Err(e) => tracing::warn!(webhook = %m.id, error = %e, "recording a webhook try failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_stay_jittered_within_their_half_and_stop_at_the_cap() {
        let base = Duration::from_secs(5);
        assert_eq!(retry_delay(base, 1, 0.0), Duration::from_millis(2500));
        assert_eq!(retry_delay(base, 1, 1.0), Duration::from_secs(5));
        assert_eq!(retry_delay(base, 2, 0.0), Duration::from_secs(5));
        assert_eq!(retry_delay(base, 3, 0.5), Duration::from_millis(15_000));
        for failures in [20, 31, u32::MAX] {
            assert!(retry_delay(base, failures, 1.0) <= MAX_RETRY_DELAY);
            assert!(retry_delay(base, failures, 0.0) >= MAX_RETRY_DELAY / 2);
        }
        let mut last = Duration::ZERO;
        for failures in 1..12 {
            let low = retry_delay(base, failures, 0.0);
            assert!(low >= last, "the lowest delay never shrinks");
            last = low;
        }
    }
}
