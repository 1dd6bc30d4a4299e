//! The chain's policy with in-memory ports and paused time: each test scripts the providers'
//! answers, runs `call_chain` as `run_in_span` does, and asserts the exact calls, rows, holds
//! and virtual time. No server, no real sleep: tokio's clock jumps to each retry's deadline.

use std::time::Duration;

use tokio::time::Instant;

use super::call_chain;
use crate::config::CallRetryPolicy;
use crate::domain::{MicroUsd, Provider, Tier};
use crate::jobs::admit::{Admission, admit_job};
use crate::jobs::decode::job_ref;
use crate::jobs::payload::{JobInput, decode};
use crate::jobs::plan::{Plan, Planned};
use crate::jobs::ports::memory::{
    Breaker, MemoryPorts, Row, answer, fail, limits, planned, rate_limited, raw_job,
};
use crate::providers::{ErrorKind, ProviderError};
use crate::queue::backend::{Failure, RawJob};
use crate::store::{CallStatus, ErrorType, JobRef};

const LLM: &str = include_str!("../../../jobs/examples/llm.complete.json");
/// The example's organisation.
const ORG: &str = "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d";
/// The most a call is held at: far above what the scripted answers cost.
const ESTIMATE: i64 = 1_000;

/// Two retries in a call, from 100 ms, up to 2 s (also the longest Retry-After honoured).
const RETRY: CallRetryPolicy = CallRetryPolicy {
    retries: 2,
    base: Duration::from_millis(100),
    cap: Duration::from_secs(2),
};

struct Job {
    raw: RawJob,
    input: JobInput,
    job: JobRef,
    plan: Plan,
}

/// The example LLM job at `attempt` of `max_attempts`, calling `chain` in order.
fn job(attempt: u32, max_attempts: u32, chain: &[(Provider, &str)]) -> Job {
    let raw = raw_job(LLM, attempt, max_attempts);
    let ports_prices = crate::budget::PriceCatalog::builtin();
    let input = decode(&raw, &ports_prices).expect("the example decodes");
    let job = job_ref(&raw, Some(&input));
    let chain = chain
        .iter()
        .map(|(provider, model)| Planned {
            model: Some((*model).to_owned()),
            ..planned(*provider, ESTIMATE)
        })
        .collect();
    Job {
        raw,
        input,
        job,
        plan: Plan {
            chain,
            limits: limits(),
        },
    }
}

fn ports(
    script: impl IntoIterator<Item = Result<crate::providers::openai::Completion, ProviderError>>,
) -> MemoryPorts {
    MemoryPorts::new(RETRY, MicroUsd::from_micros(100_000), script)
}

const OPENAI: (Provider, &str) = (Provider::OpenAi, "gpt-4o-mini");
const ANTHROPIC: (Provider, &str) = (Provider::Anthropic, "claude-haiku-4-5");
const GEMINI: (Provider, &str) = (Provider::Gemini, "gemini-2.5-flash");

/// The chain's outcome; a success's result summary is checked by the integration tier's events.
async fn run(p: &MemoryPorts, j: &Job, start: (usize, bool)) -> Result<(), Failure> {
    call_chain(p, &j.raw, &j.job, &j.input, &j.plan, start)
        .await
        .map(|_| ())
}

/// The reservation id of call `seq` of the test job.
fn hold(seq: i32) -> String {
    format!("j-1:1:{seq}")
}

/// The rows of a failed call `seq` that cost nothing.
fn failed(seq: i32, kind: ErrorKind) -> [String; 2] {
    [
        format!("call {seq} 0 {:?}", CallStatus::Failed),
        format!("error {seq} {:?}", ErrorType::Provider(kind)),
    ]
}

/// The rows of a succeeded call `seq` of `model` at `cost`.
fn succeeded(seq: i32, cost: MicroUsd, model: &str) -> [String; 2] {
    [
        format!("call {seq} {} {:?}", cost.micros(), CallStatus::Succeeded),
        format!("result true {model}"),
    ]
}

/// The rows as short strings, to compare whole sequences.
fn rows(p: &MemoryPorts) -> Vec<String> {
    p.results
        .rows()
        .into_iter()
        .map(|r| match r {
            Row::Call {
                call_seq,
                cost,
                status,
            } => format!("call {call_seq} {} {status:?}", cost.micros()),
            Row::Error {
                call_seq,
                error_type,
            } => format!("error {call_seq} {error_type:?}"),
            Row::Result { completed, model } => {
                format!("result {completed} {}", model.unwrap_or_default())
            }
        })
        .collect()
}

/// What the scripted answer of 10 prompt and 5 completion tokens costs on `model`.
fn cost_of(p: &MemoryPorts, (provider, model): (Provider, &str)) -> MicroUsd {
    p.prices
        .llm_cost(provider.as_str(), model, 10, 0, 5)
        .unwrap()
}

/// The gaps between consecutive provider calls, on tokio's (paused) clock.
fn gaps(p: &MemoryPorts) -> Vec<Duration> {
    p.providers
        .times()
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect()
}

#[tokio::test(start_paused = true)]
async fn in_call_retries_wait_full_jitter_within_their_bounds_and_each_call_settles_its_own_hold() {
    let p = ports([
        fail(ErrorKind::Unavailable),
        fail(ErrorKind::Timeout),
        answer(10, 5),
    ]);
    let j = job(1, 3, &[OPENAI]);
    let started = Instant::now();
    assert!(run(&p, &j, (0, false)).await.is_ok());
    assert_eq!(p.providers.called(), [Provider::OpenAi; 3]);
    // Full jitter over 100 ms then 200 ms: each wait in [1 ms, its ceiling].
    let g = gaps(&p);
    assert!(
        g[0] >= Duration::from_millis(1) && g[0] <= Duration::from_millis(100),
        "{g:?}"
    );
    assert!(
        g[1] >= Duration::from_millis(1) && g[1] <= Duration::from_millis(200),
        "{g:?}"
    );
    assert!(started.elapsed() <= Duration::from_millis(300));
    let cost = cost_of(&p, OPENAI);
    let estimate = MicroUsd::from_micros(ESTIMATE);
    let mut expected = failed(0, ErrorKind::Unavailable).to_vec();
    // A call that timed out may have been billed: its estimate.
    expected.push(format!("call 1 {ESTIMATE} {:?}", CallStatus::Failed));
    expected.push(format!(
        "error 1 {:?}",
        ErrorType::Provider(ErrorKind::Timeout)
    ));
    expected.extend(succeeded(2, cost, "gpt-4o-mini"));
    assert_eq!(rows(&p), expected);
    // Three holds, each settled on its own at its call's cost; none given back unused.
    assert_eq!(
        *p.ledger.settled.lock().unwrap(),
        [
            (hold(0), MicroUsd::ZERO),
            (hold(1), estimate),
            (hold(2), cost)
        ]
    );
    assert!(p.ledger.given_back.lock().unwrap().is_empty());
    assert_eq!(p.ledger.held(), MicroUsd::ZERO);
    // Before each retry the breaker and the throttle are asked again.
    assert_eq!(
        p.gates.calls(),
        [
            "record:openai:provider_unavailable",
            "breaker:openai",
            "throttle:openai",
            "record:openai:timeout",
            "breaker:openai",
            "throttle:openai",
            "record:openai:ok",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_policy_s_count_then_the_next_model_is_called_at_once() {
    let p = ports([
        fail(ErrorKind::Unavailable),
        fail(ErrorKind::Unavailable),
        fail(ErrorKind::Unavailable),
        answer(10, 5),
    ]);
    let j = job(1, 3, &[OPENAI, ANTHROPIC]);
    assert!(run(&p, &j, (0, false)).await.is_ok());
    // 1 call + AIQ_CALL_RETRIES (2) retries, then the fallback with no wait.
    assert_eq!(
        p.providers.called(),
        [
            Provider::OpenAi,
            Provider::OpenAi,
            Provider::OpenAi,
            Provider::Anthropic
        ]
    );
    assert_eq!(gaps(&p)[2], Duration::ZERO);
    let mut expected: Vec<String> = (0..3)
        .flat_map(|seq| failed(seq, ErrorKind::Unavailable))
        .collect();
    let cost = cost_of(&p, ANTHROPIC);
    expected.extend(succeeded(3, cost, "claude-haiku-4-5"));
    assert_eq!(rows(&p), expected);
    let settled: Vec<String> = p
        .ledger
        .settled
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(settled, [hold(0), hold(1), hold(2), hold(3)]);
    assert_eq!(p.ledger.held(), MicroUsd::ZERO);
}

#[tokio::test(start_paused = true)]
async fn quota_key_and_request_errors_fall_back_at_once_without_a_retry() {
    for kind in [
        ErrorKind::QuotaExhausted,
        ErrorKind::Unauthorized,
        ErrorKind::Invalid,
    ] {
        let p = ports([fail(kind), answer(10, 5)]);
        let j = job(1, 3, &[OPENAI, ANTHROPIC]);
        let started = Instant::now();
        assert!(run(&p, &j, (0, false)).await.is_ok(), "{kind:?}");
        assert_eq!(
            p.providers.called(),
            [Provider::OpenAi, Provider::Anthropic],
            "{kind:?}"
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "{kind:?}");
        assert_eq!(rows(&p)[..2], failed(0, kind), "{kind:?}");
        assert_eq!(p.results.results().len(), 1, "{kind:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_under_the_cap_is_waited_in_the_call_and_pauses_the_provider() {
    let p = ports([rate_limited(Duration::from_millis(1_500)), answer(10, 5)]);
    let j = job(1, 3, &[OPENAI, ANTHROPIC]);
    assert!(run(&p, &j, (0, false)).await.is_ok());
    // The same model again, after the provider's delay plus at most its spread.
    assert_eq!(p.providers.called(), [Provider::OpenAi; 2]);
    let g = gaps(&p)[0];
    assert!(
        g >= Duration::from_millis(1_500)
            && g <= Duration::from_millis(1_500 + crate::jobs::policy::jitter::RETRY_AFTER),
        "{g:?}"
    );
    assert_eq!(
        p.gates.calls()[..2],
        ["pause:openai:1500ms", "record:openai:rate_limited"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_above_the_cap_sends_the_job_back_to_the_queue_with_that_wait() {
    let p = ports([rate_limited(Duration::from_secs(5))]);
    let j = job(1, 3, &[OPENAI]);
    let started = Instant::now();
    match run(&p, &j, (0, false)).await {
        Err(Failure::Retry { after, .. }) => assert_eq!(after, Some(Duration::from_secs(5))),
        other => panic!("{other:?}"),
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(p.providers.called(), [Provider::OpenAi]);
    // Not the last attempt: the call's rows, no result row.
    assert_eq!(rows(&p), failed(0, ErrorKind::RateLimited));
    // With a fallback, the next model instead of the long wait.
    let p = ports([rate_limited(Duration::from_secs(5)), answer(10, 5)]);
    let j = job(1, 3, &[OPENAI, ANTHROPIC]);
    assert!(run(&p, &j, (0, false)).await.is_ok());
    assert_eq!(
        p.providers.called(),
        [Provider::OpenAi, Provider::Anthropic]
    );
}

#[tokio::test(start_paused = true)]
async fn a_non_last_attempt_that_gives_up_returns_retry_without_a_result_row() {
    let p = ports((0..3).map(|_| fail(ErrorKind::Unavailable)));
    let j = job(1, 3, &[OPENAI]);
    assert!(matches!(
        run(&p, &j, (0, false)).await,
        Err(Failure::Retry { after: None, .. })
    ));
    let expected: Vec<String> = (0..3)
        .flat_map(|seq| failed(seq, ErrorKind::Unavailable))
        .collect();
    assert_eq!(rows(&p), expected);
    assert!(p.results.results().is_empty());
}

#[tokio::test(start_paused = true)]
async fn giving_up_on_the_last_attempt_writes_the_failed_result_once_with_the_last_call() {
    let p = ports([
        fail(ErrorKind::Unavailable),
        fail(ErrorKind::Unavailable),
        fail(ErrorKind::Unavailable),
    ]);
    let j = job(3, 3, &[OPENAI]);
    assert!(matches!(
        run(&p, &j, (0, false)).await,
        Err(Failure::Retry { .. })
    ));
    let mut expected: Vec<String> = (0..3)
        .flat_map(|seq| failed(seq, ErrorKind::Unavailable))
        .collect();
    expected.push("result false gpt-4o-mini".into());
    assert_eq!(rows(&p), expected);
    // A request error is the last call of any attempt: dead, with its failed result.
    let p = ports([fail(ErrorKind::Invalid)]);
    let j = job(1, 3, &[OPENAI]);
    assert!(matches!(
        run(&p, &j, (0, false)).await,
        Err(Failure::Permanent { .. })
    ));
    let mut expected = failed(0, ErrorKind::Invalid).to_vec();
    expected.push("result false gpt-4o-mini".into());
    assert_eq!(rows(&p), expected);
}

#[tokio::test(start_paused = true)]
async fn a_probe_gone_before_the_call_gives_the_hold_back_at_zero_and_calls_nothing() {
    let p = ports([answer(10, 5)]);
    // The breaker was read half-open; another job took the probe before this one reserved.
    p.gates.set_breaker(Provider::OpenAi, Breaker::ProbeTaken);
    let j = job(1, 3, &[OPENAI]);
    assert!(matches!(
        run(&p, &j, (0, true)).await,
        Err(Failure::Defer { .. })
    ));
    assert!(p.providers.called().is_empty());
    assert!(rows(&p).is_empty());
    assert_eq!(*p.ledger.given_back.lock().unwrap(), [hold(0)]);
    assert!(p.ledger.settled.lock().unwrap().is_empty());
    assert_eq!(
        *p.ledger.room.lock().unwrap(),
        MicroUsd::from_micros(100_000)
    );
}

#[tokio::test(start_paused = true)]
async fn a_breaker_open_for_the_first_model_skips_to_the_fallback() {
    let p = ports([answer(10, 5)]);
    p.gates
        .set_breaker(Provider::OpenAi, Breaker::Open(Duration::from_secs(30)));
    let j = job(1, 3, &[OPENAI, ANTHROPIC]);
    let org = uuid::Uuid::parse_str(ORG).unwrap();
    let start = match admit_job(&p.gates, &j.plan.chain, org, Tier::GrowthTeam).await {
        Admission::Go { idx, probe } => (idx, probe),
        other => panic!("{other:?}"),
    };
    assert_eq!(start, (1, false));
    assert!(run(&p, &j, start).await.is_ok());
    assert_eq!(p.providers.called(), [Provider::Anthropic]);
    assert_eq!(rows(&p)[1], "result true claude-haiku-4-5");
    // After a failed call, an open breaker on the next model skips it too.
    let p = ports([fail(ErrorKind::QuotaExhausted), answer(10, 5)]);
    p.gates
        .set_breaker(Provider::Anthropic, Breaker::Open(Duration::from_secs(30)));
    let j = job(1, 3, &[OPENAI, ANTHROPIC, GEMINI]);
    assert!(run(&p, &j, (0, false)).await.is_ok());
    assert_eq!(p.providers.called(), [Provider::OpenAi, Provider::Gemini]);
    assert_eq!(rows(&p).last().unwrap(), "result true gemini-2.5-flash");
}

#[tokio::test(start_paused = true)]
async fn with_no_in_call_retries_a_retryable_failure_falls_back_or_gives_up_at_once() {
    let none = CallRetryPolicy {
        retries: 0,
        ..RETRY
    };
    let p = MemoryPorts::new(
        none,
        MicroUsd::from_micros(100_000),
        [fail(ErrorKind::Unavailable), answer(10, 5)],
    );
    let j = job(1, 3, &[OPENAI, ANTHROPIC]);
    assert!(run(&p, &j, (0, false)).await.is_ok());
    assert_eq!(
        p.providers.called(),
        [Provider::OpenAi, Provider::Anthropic]
    );
    assert_eq!(gaps(&p), [Duration::ZERO]);
    let p = MemoryPorts::new(
        none,
        MicroUsd::from_micros(100_000),
        [fail(ErrorKind::Unavailable)],
    );
    let j = job(1, 3, &[OPENAI]);
    assert!(matches!(
        run(&p, &j, (0, false)).await,
        Err(Failure::Retry { .. })
    ));
    assert_eq!(p.providers.called(), [Provider::OpenAi]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_call_with_the_rest_of_the_chain_held_back_goes_back_to_the_queue_and_only_the_last_attempt_writes_its_result()
 {
    for (attempt, results) in [(1, 0), (3, 1)] {
        let p = ports([fail(ErrorKind::QuotaExhausted), answer(10, 5)]);
        p.gates
            .set_breaker(Provider::Anthropic, Breaker::Open(Duration::from_secs(3)));
        let j = job(attempt, 3, &[OPENAI, ANTHROPIC]);
        match run(&p, &j, (0, false)).await {
            // The breaker's wait, spread by at least a second: not the cooldown's end exactly.
            Err(Failure::Retry {
                after: Some(after), ..
            }) => assert!(
                after >= Duration::from_secs(3) && after <= Duration::from_secs(4),
                "{after:?}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.providers.called(), [Provider::OpenAi]);
        assert_eq!(rows(&p)[..2], failed(0, ErrorKind::QuotaExhausted));
        assert_eq!(p.results.results().len(), results, "attempt {attempt}");
        assert_eq!(
            *p.ledger.settled.lock().unwrap(),
            [(hold(0), MicroUsd::ZERO)]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_write_keeps_its_hold_from_the_sweeper_and_a_quick_one_asks_nothing_more() {
    // PostgreSQL takes 5 s to take the rows: the hold is kept before it could expire.
    let p = ports([answer(10, 5)]);
    *p.results.write_takes.lock().unwrap() = Duration::from_secs(5);
    let j = job(1, 3, &[OPENAI]);
    let started = Instant::now();
    assert!(run(&p, &j, (0, false)).await.is_ok());
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert_eq!(
        *p.ledger.kept.lock().unwrap(),
        [(hold(0), crate::jobs::policy::HOLD_WHILE_WRITING)]
    );
    // Then settled at the answer's cost, as any call.
    assert_eq!(
        *p.ledger.settled.lock().unwrap(),
        [(hold(0), cost_of(&p, OPENAI))]
    );
    // A write that is quick makes no more calls to the budget.
    let p = ports([answer(10, 5)]);
    assert!(run(&p, &j, (0, false)).await.is_ok());
    assert!(p.ledger.kept.lock().unwrap().is_empty());
    assert_eq!(p.ledger.settled.lock().unwrap().len(), 1);
}
