//! The admission stage: may a job's call go now? For the chain, the provider's pause and
//! breakers (read only: a half-open probe is only noted, and taken by the reserve stage after
//! every check that could hold the job back), the organisation's jobs per minute, and the
//! provider's requests and tokens per minute, moving to the next model of the chain when one is
//! throttled. (An organisation's cap on jobs in flight is kept by the queue when it leases.) Every answer is an
//! [`Admission`]: go (with the model, and whether it is a probe), wait, or Redis down (each of
//! the last two a deferral that spends no attempt).

use std::time::Duration;

use uuid::Uuid;

use super::plan::Planned;
use super::policy::{jitter, spread, throttled_wait};
use super::ports::{Gate, Gates};
use crate::domain::{Provider, Tier};
use crate::queue::backend::Failure;
use crate::queue::events::DelayReason;

/// May a job's call go now?
#[derive(Debug)]
pub enum Admission {
    /// Call model `idx` of the chain; `probe` when it is a half-open breaker's probe, which the
    /// reserve stage takes last.
    Go { idx: usize, probe: bool },
    /// Held back for `after` (before its spread) for this reason.
    Wait { after: Duration, why: Held },
    /// Redis could not answer a check: a deferral, spending no attempt.
    Down(Failure),
}

/// Why a job was held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A model's provider is paused (a 429's Retry-After), and every other model is held back.
    Paused { provider: Provider },
    /// Every model of the chain is held back by an open circuit breaker (its provider's, or
    /// the organisation's own for it).
    Breaker { provider: Provider },
    /// The organisation is over its tier's jobs per minute.
    OrgRate { org: Uuid, tier: Tier },
    /// The model's provider, and every fallback, is at its requests or tokens per minute.
    Throttled { provider: Provider },
    /// After a failed call: no model of the rest of the chain may be called now.
    Chain,
}

impl Held {
    /// The deferral of a job held back for `after`, with its spread.
    pub fn deferral(self, after: Duration) -> Failure {
        let reason = self.reason();
        let (message, after) = match self {
            Held::Paused { provider } => (
                format!("{provider} is paused (rate limited); trying again later"),
                after + spread(jitter::PROVIDER),
            ),
            Held::Breaker { provider } => (
                format!("{provider}'s circuit breaker is open; trying again later"),
                after + spread(jitter::PROVIDER),
            ),
            Held::OrgRate { org, tier } => (
                format!("organization {org} is over its {tier} rate of jobs per minute"),
                after,
            ),
            Held::Throttled { provider } => (
                format!("{provider} is at its requests or tokens per minute"),
                after + spread(jitter::PROVIDER),
            ),
            Held::Chain => (
                "no model of the chain may be called now".to_owned(),
                after + spread(jitter::PROVIDER),
            ),
        };
        Failure::Defer {
            message,
            after,
            reason,
        }
    }

    /// The delay reason of the job's `deferred` event.
    pub fn reason(self) -> DelayReason {
        match self {
            Held::Paused { .. } => DelayReason::ProviderPaused,
            Held::Breaker { .. } => DelayReason::Breaker,
            Held::OrgRate { .. } => DelayReason::OrgRate,
            Held::Throttled { .. } => DelayReason::ProviderRate,
            Held::Chain => DelayReason::Other,
        }
    }
}

/// A job's first admission. Open breakers and fleet-wide pauses hold calls back without counting
/// anything against a limit: the job takes the first model of its chain whose breakers let it
/// through, or waits. Then the organisation's rate (over it, the job waits for the next minute),
/// then the model's provider's requests and tokens per minute, fleet-wide: over them, the next
/// model of the chain that passes its breakers and throttle, or wait.
pub async fn admit_job(gates: &impl Gates, chain: &[Planned], org: Uuid, tier: Tier) -> Admission {
    let mut first = None;
    let mut held = Duration::MAX;
    // Whether every model was held back by a breaker (not one by a pause).
    let mut breakers_only = true;
    for (i, target) in chain.iter().enumerate() {
        match gates.breaker(target.provider, &target.org).await {
            Ok(Gate::Pass) => first = Some((i, false)),
            Ok(Gate::Probe) => first = Some((i, true)),
            Ok(Gate::Open(wait)) => held = held.min(wait),
            Ok(Gate::Wait(wait)) => {
                held = held.min(wait);
                breakers_only = false;
            }
            Err(f) => return Admission::Down(f),
        }
        if first.is_some() {
            break;
        }
    }
    let Some((first, probe)) = first else {
        let provider = chain[0].provider;
        return Admission::Wait {
            after: held,
            why: if breakers_only {
                Held::Breaker { provider }
            } else {
                Held::Paused { provider }
            },
        };
    };
    match gates.org_rate(org, tier).await {
        Ok(Gate::Pass | Gate::Probe) => {}
        Ok(Gate::Wait(after) | Gate::Open(after)) => {
            return Admission::Wait {
                after,
                why: Held::OrgRate { org, tier },
            };
        }
        Err(f) => return Admission::Down(f),
    }
    let target = &chain[first];
    match gates.throttle(target.provider, target.tokens).await {
        Ok(Gate::Pass | Gate::Probe) => Admission::Go { idx: first, probe },
        Ok(Gate::Wait(wait) | Gate::Open(wait)) => {
            match admit_from(gates, chain, first + 1).await {
                Admission::Wait { after, .. } => Admission::Wait {
                    after: throttled_wait(wait, after),
                    why: Held::Throttled {
                        provider: target.provider,
                    },
                },
                other => other,
            }
        }
        Err(f) => Admission::Down(f),
    }
}

/// May `target` be called now? Its breakers (read only), then its requests and tokens per
/// minute, counted.
pub async fn admit_call(gates: &impl Gates, target: &Planned) -> Result<Gate, Failure> {
    let breaker = gates.breaker(target.provider, &target.org).await?;
    if breaker.wait().is_some() {
        return Ok(breaker);
    }
    Ok(
        match gates.throttle(target.provider, target.tokens).await? {
            Gate::Wait(wait) | Gate::Open(wait) => Gate::Wait(wait),
            Gate::Pass | Gate::Probe => breaker,
        },
    )
}

/// The first model of the chain from `from` on that may be called now, or the shortest wait
/// among them (zero when there is none left to try).
pub async fn admit_from(gates: &impl Gates, chain: &[Planned], from: usize) -> Admission {
    let mut wait: Option<Duration> = None;
    for (idx, target) in chain.iter().enumerate().skip(from) {
        match admit_call(gates, target).await {
            Ok(Gate::Pass) => return Admission::Go { idx, probe: false },
            Ok(Gate::Probe) => return Admission::Go { idx, probe: true },
            Ok(Gate::Wait(w) | Gate::Open(w)) => wait = Some(wait.map_or(w, |x| x.min(w))),
            Err(f) => return Admission::Down(f),
        }
    }
    Admission::Wait {
        after: wait.unwrap_or_default(),
        why: Held::Chain,
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::ports::memory::{Breaker, MemoryGates, ORG, planned};

    fn org() -> Uuid {
        Uuid::parse_str(ORG).unwrap()
    }

    #[tokio::test]
    async fn a_half_open_probe_is_left_for_the_next_job_when_the_organisations_rate_defers_this_one()
     {
        let gates = MemoryGates::default();
        gates.set_breaker(Provider::OpenAi, Breaker::ProbeFree);
        *gates.org_wait.lock().unwrap() = Some(Duration::from_secs(20));
        let chain = [planned(Provider::OpenAi, 1_000)];
        match admit_job(&gates, &chain, org(), Tier::GrowthTeam).await {
            Admission::Wait { after, why } => {
                assert_eq!(after, Duration::from_secs(20));
                assert_eq!(
                    why,
                    Held::OrgRate {
                        org: org(),
                        tier: Tier::GrowthTeam
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(gates.breaker_of(Provider::OpenAi), Breaker::ProbeFree);
        // The next job, within its rate, is the one told it may probe.
        *gates.org_wait.lock().unwrap() = None;
        match admit_job(&gates, &chain, org(), Tier::GrowthTeam).await {
            Admission::Go {
                idx: 0,
                probe: true,
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(!gates.calls().iter().any(|c| c.starts_with("take_probe")));
    }

    #[tokio::test]
    async fn a_half_open_probe_is_left_for_the_next_job_when_every_model_is_throttled() {
        let gates = MemoryGates::default();
        gates.set_breaker(Provider::OpenAi, Breaker::ProbeFree);
        gates
            .throttled
            .lock()
            .unwrap()
            .insert(Provider::OpenAi, Duration::from_millis(700));
        let chain = [planned(Provider::OpenAi, 1_000)];
        match admit_job(&gates, &chain, org(), Tier::GrowthTeam).await {
            Admission::Wait {
                after,
                why:
                    Held::Throttled {
                        provider: Provider::OpenAi,
                    },
            } => assert_eq!(after, Duration::from_millis(700)),
            other => panic!("{other:?}"),
        }
        assert_eq!(gates.breaker_of(Provider::OpenAi), Breaker::ProbeFree);
    }

    #[tokio::test]
    async fn an_open_breaker_defers_the_job_before_the_rate_or_the_throttle_counts_it() {
        let gates = MemoryGates::default();
        gates.set_breaker(Provider::OpenAi, Breaker::Open(Duration::from_secs(9)));
        gates.set_breaker(Provider::Anthropic, Breaker::Open(Duration::from_secs(4)));
        let chain = [
            planned(Provider::OpenAi, 1_000),
            planned(Provider::Anthropic, 1_000),
        ];
        match admit_job(&gates, &chain, org(), Tier::GrowthTeam).await {
            Admission::Wait {
                after,
                why:
                    why @ Held::Breaker {
                        provider: Provider::OpenAi,
                    },
            } => {
                assert_eq!(after, Duration::from_secs(4));
                assert_eq!(why.reason(), DelayReason::Breaker);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(gates.calls(), ["breaker:openai", "breaker:anthropic"]);
        // One model paused by a 429, the other's breaker open: the job waits for the pause.
        gates.set_breaker(Provider::OpenAi, Breaker::Paused(Duration::from_secs(6)));
        match admit_job(&gates, &chain, org(), Tier::GrowthTeam).await {
            Admission::Wait {
                after,
                why: why @ Held::Paused { .. },
            } => {
                assert_eq!(after, Duration::from_secs(4));
                assert_eq!(why.reason(), DelayReason::ProviderPaused);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_throttled_model_falls_back_to_the_next_model_that_passes_its_gates() {
        let gates = MemoryGates::default();
        gates
            .throttled
            .lock()
            .unwrap()
            .insert(Provider::OpenAi, Duration::from_millis(700));
        gates.set_breaker(Provider::Anthropic, Breaker::ProbeFree);
        let chain = [
            planned(Provider::OpenAi, 1_000),
            planned(Provider::Anthropic, 1_000),
        ];
        match admit_job(&gates, &chain, org(), Tier::GrowthTeam).await {
            Admission::Go {
                idx: 1,
                probe: true,
            } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            gates.calls(),
            [
                "breaker:openai",
                "org_rate",
                "throttle:openai",
                "breaker:anthropic",
                "throttle:anthropic"
            ]
        );
    }

    #[tokio::test]
    async fn after_a_failed_call_the_rest_of_the_chain_waits_for_its_shortest_wait() {
        let gates = MemoryGates::default();
        gates.set_breaker(Provider::Anthropic, Breaker::Open(Duration::from_secs(3)));
        gates
            .throttled
            .lock()
            .unwrap()
            .insert(Provider::Gemini, Duration::from_secs(2));
        let chain = [
            planned(Provider::OpenAi, 1),
            planned(Provider::Anthropic, 1),
            planned(Provider::Gemini, 1),
        ];
        match admit_from(&gates, &chain, 1).await {
            Admission::Wait {
                after,
                why: Held::Chain,
            } => assert_eq!(after, Duration::from_secs(2)),
            other => panic!("{other:?}"),
        }
        // Past the chain's end nothing is asked, and nothing is waited for.
        match admit_from(&gates, &chain, 3).await {
            Admission::Wait { after, .. } => assert_eq!(after, Duration::ZERO),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_held_job_is_deferred_for_its_wait_spread_only_where_many_jobs_wait_for_the_same_thing() {
        let after = Duration::from_secs(3);
        let defer = |held: Held| match held.deferral(after) {
            Failure::Defer { after, .. } => after,
            other => panic!("{other:?}"),
        };
        // The organisation's rate names the next minute's start: no spread.
        assert_eq!(
            defer(Held::OrgRate {
                org: org(),
                tier: Tier::Trial
            }),
            after
        );
        let most = after + Duration::from_millis(jitter::PROVIDER);
        for held in [
            Held::Paused {
                provider: Provider::Gemini,
            },
            Held::Throttled {
                provider: Provider::Gemini,
            },
        ] {
            let d = defer(held);
            assert!(d >= after && d <= most, "{held:?}: {d:?}");
        }
    }
}
