//! The plan stage: the calls a job may make, each priced at the most it can cost (Vision's one,
//! or an LLM job's model followed by its fallbacks), with the organisation's limits. A job the
//! catalog cannot price, or none of whose models can ever fit a limit, is dead before any call.

use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use super::App;
use super::payload::JobInput;
use super::policy::LIMITS_CACHE;
use super::ports::Ports;
use super::record::failed_result;
use crate::budget::OrgLimits;
use crate::domain::{MicroUsd, Provider, Tier};
use crate::providers::vision;
use crate::queue::backend::Failure;
use crate::redact::Field;
use crate::store::{ErrorRecord, ErrorType, JobRef};

/// What a job may call, and within which limits.
pub struct Plan {
    /// The models that can fit, the job's own first; never empty.
    pub chain: Vec<Planned>,
    pub limits: OrgLimits,
}

/// Prices the job's chain and keeps the models that can ever fit. A model whose estimate alone
/// is above a whole window's limit, or above its provider's tokens per minute, can never be
/// called: waiting for a reset would wait forever. The chain keeps the models that can; with
/// none left the job is dead now, and no alert is raised (nobody spent anything).
pub async fn plan_job(app: &App, job: &JobRef, input: &JobInput) -> Result<Plan, Failure> {
    let chain = match chain(app, input) {
        Ok(c) => c,
        Err(e) => return Err(unpriced(app, job, input, e).await),
    };
    let org = input.common().organization_id.as_uuid();
    let limits = app.org_limits(org, input.common().tier).await?;
    let mut fits = Vec::with_capacity(chain.len());
    let mut never = Vec::new();
    for target in chain {
        match never_fits(app, &target, org, limits) {
            Some(why) => never.push(why),
            None => fits.push(target),
        }
    }
    if fits.is_empty() {
        return Err(never_fit(app, job, &never).await);
    }
    Ok(Plan {
        chain: fits,
        limits,
    })
}

/// A call a job may make, priced at the most it can cost. An LLM job's fallback chain is a list
/// of these, its own model first.
pub struct Planned {
    pub provider: Provider,
    pub operation: &'static str,
    pub model: Option<String>,
    pub estimate: MicroUsd,
    pub hold_ttl: Duration,
    /// Tokens the call counts against the provider's tokens-per-minute limit.
    pub tokens: u64,
    /// The job's organisation, whose own breaker the call also passes.
    pub org: String,
}

impl App {
    /// An organisation's limits: its ai_cost_limits overrides over its tier's defaults.
    async fn org_limits(&self, org: Uuid, tier: Tier) -> Result<OrgLimits, Failure> {
        if let Some((at, limits)) = self.limits.lock().expect("limits cache").get(&org)
            && at.elapsed() < LIMITS_CACHE
        {
            return Ok(*limits);
        }
        let (daily, monthly) = self.record(self.store.org_limit_overrides(org).await)?;
        let defaults = self.budget.tier_limits(tier);
        let limits = OrgLimits {
            daily: daily.unwrap_or(defaults.daily),
            monthly: monthly.unwrap_or(defaults.monthly),
        };
        self.limits
            .lock()
            .expect("limits cache")
            .insert(org, (Instant::now(), limits));
        Ok(limits)
    }
}

/// Why `target` can never be called, if it cannot: its estimate is above a whole window's limit
/// (a limit of 0 pauses spending instead: the job waits), or its tokens above its provider's
/// tokens per minute.
fn never_fits(app: &App, target: &Planned, org: Uuid, limits: OrgLimits) -> Option<String> {
    let (scopes, _) = app.budget.scopes(org, limits, app.budget.now());
    let model = target.model.as_deref().unwrap_or(target.operation);
    if let Some(s) = scopes
        .iter()
        .find(|s| s.limit.micros() > 0 && target.estimate > s.limit)
    {
        return Some(format!(
            "{} {model} can cost up to {}, more than the whole {} limit of {} for {}",
            target.provider,
            target.estimate,
            s.window.kind.as_str(),
            s.limit,
            match s.owner {
                crate::budget::Owner::Global => "the platform".to_owned(),
                crate::budget::Owner::Org(o) => format!("organization {o}"),
            }
        ));
    }
    let tpm = app.breakers.tokens_per_minute(target.provider)?;
    (target.tokens > tpm).then(|| {
        format!(
            "{} {model} needs up to {} tokens, more than {}'s {tpm} tokens per minute",
            target.provider, target.tokens, target.provider
        )
    })
}

/// A job none of whose models can ever be called: dead on this delivery, with the reason.
async fn never_fit(app: &App, job: &JobRef, why: &[String]) -> Failure {
    let message = format!("this job can never run: {}", why.join("; "));
    let err = ErrorRecord {
        error_type: ErrorType::BudgetExceeded,
        message: message.clone(),
        details: json!({ "never_fits": true, "reasons": why }),
        provider: None,
        http_status: None,
        call_seq: 0,
    };
    let result = failed_result("none", None, &message);
    if let Err(f) = app.record(
        app.store
            .record_failure(
                job,
                &err,
                None,
                Some((&result, crate::store::Ending::Failed)),
            )
            .await,
    ) {
        return f;
    }
    tracing::warn!("dead: {}", Field::message(&message));
    Failure::Permanent { message }
}

/// The calls a job may make, each priced at the most it can cost: Vision's one, or an LLM job's
/// model followed by its fallbacks. A job with any model the catalog cannot price is refused
/// before any call.
fn chain(app: &App, input: &JobInput) -> Result<Vec<Planned>, crate::budget::PriceError> {
    match input {
        JobInput::Vision(v) => {
            let features: Vec<String> = v.features.iter().map(|f| f.kind.clone()).collect();
            Ok(vec![Planned {
                provider: vision::PROVIDER,
                operation: "images:annotate",
                model: None,
                estimate: app
                    .prices
                    .vision_estimate(&features, v.images.len() as u32)?,
                hold_ttl: app.hold_ttl.vision,
                tokens: 0,
                org: v.common.organization_id.to_string(),
            }])
        }
        JobInput::Llm(l) => {
            // An upper bound on input tokens without a tokenizer: a token is at least one byte
            // of UTF-8, plus a few tokens of framing per message.
            let input_bound: u64 = l
                .messages
                .iter()
                .map(|m| m.content.len() as u64 + m.role.len() as u64 + 8)
                .sum();
            l.chain()
                .into_iter()
                .map(|m| {
                    let estimate = app.prices.llm_estimate(
                        &m.provider,
                        &m.model,
                        input_bound,
                        l.max_tokens as u64,
                    )?;
                    // The catalog prices only providers aiq calls.
                    let provider = Provider::parse(&m.provider).ok_or_else(|| {
                        crate::budget::PriceError::UnknownModel {
                            provider: m.provider.clone(),
                            model: m.model.clone(),
                        }
                    })?;
                    Ok(Planned {
                        provider,
                        operation: "chat.completions",
                        estimate,
                        hold_ttl: app.hold_ttl.for_provider(provider),
                        tokens: input_bound + l.max_tokens as u64,
                        org: l.common.organization_id.to_string(),
                        model: Some(m.model),
                    })
                })
                .collect()
        }
    }
}

/// A job the catalog cannot price never reaches a provider.
async fn unpriced(
    app: &App,
    job: &JobRef,
    input: &JobInput,
    e: crate::budget::PriceError,
) -> Failure {
    let provider = match input {
        JobInput::Vision(_) => vision::PROVIDER.as_str().to_owned(),
        JobInput::Llm(l) => l.provider.clone(),
    };
    let err = ErrorRecord {
        error_type: ErrorType::Unpriced,
        message: e.to_string(),
        details: json!({}),
        provider: Some(provider.clone()),
        http_status: None,
        call_seq: 0,
    };
    let result = failed_result(&provider, None, &e.to_string());
    if let Err(f) = app.record(
        app.store
            .record_failure(
                job,
                &err,
                None,
                Some((&result, crate::store::Ending::Failed)),
            )
            .await,
    ) {
        return f;
    }
    Failure::Permanent {
        message: e.to_string(),
    }
}
