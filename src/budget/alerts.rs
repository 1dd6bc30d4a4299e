//! Budget alerts: at 80%, 95% and 100% of every window of every scope, and on spend spikes.
//!
//! An alert is a row in ai_cost_alerts, whose unique key (scope, window, threshold) makes it
//! exist once however many processes cross the threshold at the same moment. The row is also the
//! outbox: a delivery loop in every process claims due rows (`FOR UPDATE SKIP LOCKED`, with a
//! lease), posts them to the webhook as Slack-compatible JSON and marks them delivered, or backs
//! off and tries again while the webhook fails. 100% means the limit stopped a call: with
//! reservations, settled spend never passes the limit, so "reached" is the moment a call is
//! refused.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Refusal, ScopeState, WindowKind};
use crate::config::{RetryPolicy, Secret};
use crate::domain::MicroUsd;
use crate::store::{NewAlert, Store};

/// Percent thresholds of a limit.
pub const THRESHOLDS: [u8; 2] = [80, 95];

/// How deliveries back off while the webhook fails.
pub const DELIVERY_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    base: Duration::from_millis(500),
    cap: Duration::from_secs(300),
};

/// Raises alerts; remembers which it already raised so hot paths do not ask PostgreSQL again.
pub struct Alerts {
    store: Store,
    raised: Mutex<HashSet<(String, String, String)>>,
    wake: tokio::sync::Notify,
}

fn org_of(owner: &str) -> Option<Uuid> {
    owner
        .strip_prefix("org:")
        .and_then(|o| Uuid::parse_str(o).ok())
}

fn describe(owner: &str) -> String {
    match org_of(owner) {
        Some(o) => format!("organization {o}"),
        None => "the platform".into(),
    }
}

impl Alerts {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            raised: Mutex::new(HashSet::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    async fn raise(&self, alert: NewAlert) {
        let key = (
            alert.scope.clone(),
            format!("{}:{}", alert.window_kind, alert.window_start),
            alert.threshold.clone(),
        );
        if self.raised.lock().expect("alert cache").contains(&key) {
            return;
        }
        match self.store.insert_alert(&alert).await {
            Ok(created) => {
                if created {
                    tracing::warn!(scope = %alert.scope, threshold = %alert.threshold, "{}", alert.message);
                    // Sentry too (a no-op when it is off), once, from the process that created it.
                    sentry::with_scope(
                        |scope| {
                            scope.set_tag("alert.scope", &alert.scope);
                            scope.set_tag(
                                "alert.window",
                                format!("{}:{}", alert.window_kind, alert.window_start),
                            );
                            scope.set_tag("alert.threshold", &alert.threshold);
                        },
                        || sentry::capture_message(&alert.message, sentry::Level::Warning),
                    );
                    self.wake.notify_one();
                }
                self.raised.lock().expect("alert cache").insert(key);
            }
            Err(e) => {
                tracing::error!(error = %e, "recording a budget alert failed; it will be raised again")
            }
        }
    }

    /// Raises the 80% and 95% alerts that `states` (after a settlement) have crossed.
    pub async fn check(&self, states: &[ScopeState]) {
        for s in states {
            if s.limit.micros() <= 0 {
                continue;
            }
            for t in THRESHOLDS {
                if (s.spent.micros() as i128) * 100 >= (s.limit.micros() as i128) * t as i128 {
                    let period = if s.window_kind == WindowKind::Day {
                        "daily"
                    } else {
                        "monthly"
                    };
                    self.raise(NewAlert {
                        scope: s.owner.clone(),
                        organization_id: org_of(&s.owner),
                        window_kind: s.window_kind.as_str().into(),
                        window_start: s.window.clone(),
                        threshold: t.to_string(),
                        spent: s.spent,
                        limit: Some(s.limit),
                        message: format!(
                            "aiq budget: {} has spent {} of its {period} limit of {} ({t}% reached) for {}",
                            describe(&s.owner),
                            s.spent,
                            s.limit,
                            s.window
                        ),
                    })
                    .await;
                }
            }
        }
    }

    /// Raises the 100% alert of the scope that refused a call.
    pub async fn limit_reached(&self, r: &Refusal) {
        let owner = r.scope.owner.name();
        self.raise(NewAlert {
            organization_id: org_of(&owner),
            scope: owner,
            window_kind: r.scope.window.kind.as_str().into(),
            window_start: r.scope.window.label.clone(),
            threshold: "100".into(),
            spent: r.spent,
            limit: Some(r.scope.limit),
            message: format!(
                "aiq {} (100%): calls wait until the window resets",
                r.message()
            ),
        })
        .await;
    }

    /// Raises spike alerts, once per scope and hour.
    pub async fn check_spikes(&self, multiple: f64, min: MicroUsd) {
        let spikes = match self.store.spend_spikes(multiple, min).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "checking for spend spikes failed");
                return;
            }
        };
        let hour = chrono::Utc::now().format("%Y-%m-%dT%H").to_string();
        for s in spikes {
            let owner = s
                .organization_id
                .map_or_else(|| "global".to_owned(), |o| format!("org:{o}"));
            self.raise(NewAlert {
                message: format!(
                    "aiq spend spike: {} spent {} in the last hour, over {multiple}x its hourly average of {}",
                    describe(&owner),
                    s.last_hour,
                    s.average_hour
                ),
                organization_id: s.organization_id,
                scope: owner,
                window_kind: "hour".into(),
                window_start: hour.clone(),
                threshold: "spike".into(),
                spent: s.last_hour,
                limit: None,
            })
            .await;
        }
    }
}

/// Delivers recorded alerts until `stop`: claims due ones, posts each to the webhook, records
/// the outcome. Without a webhook, an alert is delivered to the log only.
pub async fn deliver(alerts: &Alerts, webhook: Option<Secret>, stop: CancellationToken) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("building an HTTP client with static settings");
    loop {
        let claimed = match alerts.store.claim_alerts(20, Duration::from_secs(60)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "claiming alerts to deliver failed");
                Vec::new()
            }
        };
        for a in &claimed {
            let outcome = match &webhook {
                None => Ok(()),
                Some(url) => post(&http, url, &a.message).await,
            };
            let recorded = match outcome {
                Ok(()) => alerts.store.alert_delivered(a.id).await,
                Err(e) => {
                    let wait =
                        DELIVERY_RETRY.delay(a.delivery_attempts as u32 + 1, fastrand::f64());
                    tracing::warn!(alert = %a.id, error = %e, retry_ms = wait.as_millis() as u64, "alert webhook failed");
                    alerts.store.alert_failed(a.id, &e, wait).await
                }
            };
            if let Err(e) = recorded {
                tracing::warn!(alert = %a.id, error = %e, "recording an alert delivery failed");
            }
        }
        if !claimed.is_empty() {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = alerts.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Posts one alert. The error says what went wrong without the webhook's URL, which is its
/// credential: it is logged and stored in `ai_cost_alerts.last_delivery_error`.
async fn post(http: &reqwest::Client, url: &Secret, text: &str) -> Result<(), String> {
    let resp = http
        .post(url.expose())
        .json(&serde_json::json!({ "text": text }))
        .send()
        .await
        .map_err(|e| unreachable(e, url))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered HTTP {}", resp.status().as_u16()))
    }
}

/// A transport error as text: reqwest's word and its causes (`connection refused`), with the
/// URL left out, and masked should a cause quote it anyway.
fn unreachable(e: reqwest::Error, url: &Secret) -> String {
    let e = e.without_url();
    let mut text = format!("webhook unreachable: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    crate::redact::secrets(&text, &[url.expose().to_owned()], crate::redact::MASK).into_owned()
}
