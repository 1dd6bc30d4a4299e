//! `console`: how fast each page of the operator console answers with a large backlog. Fills
//! the real queue layout (the enqueue script, pipelined in batches of 1,000) with N waiting jobs
//! over the six tiers and 1,000 organisations, plus dead and delayed ones, starts one `aiq run`
//! with console tokens (its one job in flight held by a fake that answers after an hour, so the
//! backlog stays), signs in over HTTP and times each page K times: p50, p99, max. A page that
//! does not answer 200 is printed as unreachable with its status, never timed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Map, Value, json};

use super::full::{World, sigterm_and_wait, spawn_daemon, world};
use super::{BenchOptions, Report, daemon_vars, new_job, rate, thousands};
use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::queue::{NewJob, Queue};
use aiq_testkit::fake::{FakeOptions, FakeProviders};
use aiq_testkit::localsvc::free_port;

const TOKEN: &str = "bench-operator-token-0123456789abcdef";
const ORGS: usize = 1_000;

/// One of 1,000 organisations.
fn org_of(i: usize) -> OrganizationId {
    OrganizationId::from(uuid::Uuid::from_u128(
        0x0000_0000_0000_4000_8000_0000_0001_0000 | (i % ORGS) as u128,
    ))
}

/// A valid LLM job of organisation `org_of(i)`, run now or after `delay`.
fn job(tier: Tier, i: usize, delay: Duration) -> NewJob {
    let org = org_of(i);
    let mut j = new_job(
        JobKind::LlmComplete,
        tier,
        org,
        json!({
            "version": 1, "organization_id": org.to_string(), "tier": tier.as_str(),
            "provider": "openai", "model": "gpt-4o-mini",
            "messages": [{ "role": "user", "content": format!("Caption photo {i}.") }],
            "max_tokens": 32
        })
        .to_string(),
    );
    j.delay = delay;
    j
}

/// Enqueues `n` jobs in pipelined batches of 1,000; returns the last job's id.
async fn enqueue_all(
    q: &Queue,
    n: usize,
    make: impl Fn(usize) -> NewJob,
) -> anyhow::Result<String> {
    let (mut i, mut last) = (0, String::new());
    while i < n {
        let end = (i + 1000).min(n);
        let batch: Vec<NewJob> = (i..end).map(&make).collect();
        for r in q.enqueue_batch(&batch).await? {
            last = r?.job_id;
        }
        i = end;
    }
    Ok(last)
}

/// Fills ai_cost_tracking with `n` cost rows over the last 30 days, the 1,000 organisations of
/// [`org_of`] and two providers, in statements of 100,000 (a month of a busy platform's calls
/// in miniature: the money and organisation pages sum them).
async fn fill_costs(w: &World, n: u64) -> anyhow::Result<()> {
    let step = 100_000;
    let mut from = 0;
    while from < n {
        let to = (from + step).min(n) - 1;
        sqlx::query(
            "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type,
                 cost_usd, billing_date, created_at, job_id, attempt, tier, model)
             SELECT ('00000000-0000-4000-8000-00000001' || lpad(to_hex(g % $3), 4, '0'))::uuid,
                 CASE WHEN g % 3 = 0 THEN 'google_vision' ELSE 'openai' END, 'bench',
                 (1 + g % 97)::numeric / 1000000, CURRENT_DATE - (g % 30)::int,
                 now() - make_interval(days => (g % 30)::int), 'cost-' || g, 1,
                 'growth_team', 'gpt-4o-mini'
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind(from as i64)
        .bind(to as i64)
        .bind(ORGS as i64)
        .execute(w.store.pool())
        .await
        .context("filling ai_cost_tracking")?;
        from = to + 1;
    }
    sqlx::query("VACUUM ANALYZE ai_cost_tracking")
        .execute(w.store.pool())
        .await?;
    Ok(())
}

/// `a=b&c=d` with each value percent-encoded.
fn form(fields: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Signs in with the operator token: the session cookie (`name=value`), or why not.
async fn sign_in(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let answer = http
        .post(format!("{base}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", TOKEN)]))
        .send()
        .await?;
    let status = answer.status();
    ensure!(
        status.as_u16() == 303,
        "POST /console/login answered {status}, not 303"
    );
    answer
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("aiq_console="))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
        .context("no aiq_console cookie after signing in")
}

/// Times `k` GETs of one page: (p50, p99, max) in ms, or the first status that was not 200.
async fn time_page(
    http: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
    k: usize,
) -> anyhow::Result<Result<(f64, f64, f64), u16>> {
    let mut took = Vec::with_capacity(k);
    for _ in 0..k {
        let mut req = http.get(url);
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        let start = Instant::now();
        let answer = req.send().await?;
        let status = answer.status().as_u16();
        let body = answer.bytes().await?;
        let t = start.elapsed();
        if status != 200 {
            return Ok(Err(status));
        }
        ensure!(!body.is_empty(), "{url} answered 200 with an empty body");
        took.push(t);
    }
    took.sort();
    let pct = |x: f64| took[((took.len() - 1) as f64 * x).round() as usize].as_secs_f64() * 1e3;
    Ok(Ok((pct(0.5), pct(0.99), pct(1.0))))
}

/// Polls `GET /readyz` until the daemon's admin port answers at all.
async fn wait_admin(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while http.get(format!("{base}/readyz")).send().await.is_err() {
        if Instant::now() > deadline {
            bail!("the admin port {base} did not answer within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

pub(crate) async fn console(opts: &BenchOptions) -> anyhow::Result<Report> {
    let mut r = Report::new("console", opts.json);
    let n = opts
        .jobs
        .unwrap_or(if opts.quick { 20_000 } else { 1_000_000 });
    let (dead, delayed) = if opts.quick {
        (200, 500)
    } else {
        (5_000, 20_000)
    };
    let k = if opts.quick { 20 } else { 200 };
    let costs: u64 = if opts.quick { 20_000 } else { 2_000_000 };
    // Every call answers after an hour: the daemon's one job in flight stays there.
    let fake = FakeProviders::start_with(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        FakeOptions::with_latency(Duration::from_secs(3600)),
    )
    .await?;
    let admin = format!("127.0.0.1:{}", free_port()?);
    let extra = [
        ("AIQ_QUEUE_PREFIX", "bench-console".to_owned()),
        ("AIQ_CONCURRENCY", "1".to_owned()),
        ("AIQ_FETCH_BATCH", "1".to_owned()),
        ("AIQ_CONSOLE_OPERATOR_TOKENS", format!("bench:{TOKEN}")),
    ];
    let w: World = world(&fake.base_url(), &extra).await?;
    r.say(format!(
        "console: {} waiting jobs over six tiers and {} organisations, {} delayed, {} dead, {} cost rows over 30 days; each page {k} times, one `aiq run` process",
        thousands(n as u64),
        thousands(ORGS as u64),
        thousands(delayed as u64),
        thousands(dead as u64),
        thousands(costs)
    ));
    let start = Instant::now();
    fill_costs(&w, costs).await?;
    r.say(format!(
        "  {} cost rows written in {:.1} s",
        thousands(costs),
        start.elapsed().as_secs_f64()
    ));
    r.figure("cost_rows", costs);

    // The dead first: jobs whose payload the daemon refuses, before any job it could run.
    enqueue_all(&w.queue, dead, |i| {
        new_job(
            JobKind::LlmComplete,
            Tier::ALL[i % 6],
            org_of(i),
            r#"{"version":1}"#.to_owned(),
        )
    })
    .await?;
    let mut vars = daemon_vars(
        &w.settings.queue.redis.url,
        w.settings.database.url.expose(),
        &fake.base_url(),
    );
    vars.extend(extra.iter().cloned());
    vars.push(("AIQ_ADMIN_ADDR", admin.clone()));
    let daemon = spawn_daemon(&vars)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = w.queue.stats().await?;
        if s.dead >= dead as u64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{} of {dead} refused jobs dead after 300 s: {s:?}",
            s.dead
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    let waiting_id = enqueue_all(&w.queue, n, |i| job(Tier::ALL[i % 6], i, Duration::ZERO)).await?;
    let fill = start.elapsed();
    enqueue_all(&w.queue, delayed, |i| {
        job(Tier::ALL[i % 6], n + i, Duration::from_secs(86_400))
    })
    .await?;
    let s = w.queue.stats().await?;
    let waiting: u64 = s.waiting.values().sum();
    r.say(format!(
        "  filled in {:.1} s ({} jobs/s): {} waiting, {} in flight, {} delayed, {} dead",
        fill.as_secs_f64(),
        thousands(rate(n, fill)),
        thousands(waiting),
        s.inflight,
        thousands(s.delayed),
        thousands(s.dead)
    ));
    ensure!(
        waiting + s.inflight >= n as u64,
        "{waiting} waiting and {} in flight, not {n}",
        s.inflight
    );
    r.figure("waiting", waiting);
    r.figure("delayed", s.delayed);
    r.figure("dead", s.dead);
    r.figure("fill_jobs_per_s", rate(n, fill));

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = format!("http://{admin}");
    wait_admin(&http, &base).await?;
    let cookie = match sign_in(&http, &base).await {
        Ok(c) => Some(c),
        Err(e) => {
            r.say(format!("  cannot sign in: {e:#}"));
            None
        }
    };
    let dead_id = w
        .queue
        .dead_page(0, 1)
        .await?
        .first()
        .map(|d| d.id.clone())
        .unwrap_or_default();
    // Job i is of tier `Tier::ALL[i % 6]` and organisation `org_of(i)`: organisation 2 has
    // professional_agency jobs (1 in 6,000 of the backlog).
    let org = org_of(2).to_string();
    let pages: Vec<(&str, String, bool)> = vec![
        ("login", "/console/login".to_owned(), false),
        ("overview", "/console/".to_owned(), true),
        (
            "jobs (tier and org)",
            format!("/console/jobs?tier=professional_agency&org={org}&state=waiting"),
            true,
        ),
        ("job (waiting)", format!("/console/jobs/{waiting_id}"), true),
        ("job (dead)", format!("/console/jobs/{dead_id}"), true),
        ("dead", "/console/dead".to_owned(), true),
        (
            "dead (filtered by tier)",
            "/console/dead?tier=professional_agency".to_owned(),
            true,
        ),
        (
            "dead (by provider)",
            "/console/dead?provider=openai".to_owned(),
            true,
        ),
        ("dead job", format!("/console/dead/{dead_id}"), true),
        ("money", "/console/money".to_owned(), true),
        ("orgs", "/console/orgs".to_owned(), true),
        ("org", format!("/console/orgs/{org}"), true),
    ];
    r.say(format!(
        "  {:<26} {:>9} {:>9} {:>9}",
        "page", "p50 ms", "p99 ms", "max ms"
    ));
    let mut figures = Map::new();
    let mut worst: f64 = 0.0;
    let mut unreachable = 0;
    for (name, path, signed) in &pages {
        let c = if *signed { cookie.as_deref() } else { None };
        if *signed && c.is_none() {
            r.say(format!("  {name:<26} unreachable: not signed in"));
            figures.insert(
                (*name).to_owned(),
                json!({ "unreachable": "not signed in" }),
            );
            unreachable += 1;
            continue;
        }
        match time_page(&http, &format!("{base}{path}"), c, k).await? {
            Ok((p50, p99, max)) => {
                r.say(format!("  {name:<26} {p50:>9.2} {p99:>9.2} {max:>9.2}"));
                worst = worst.max(max);
                let round = |v: f64| (v * 100.0).round() / 100.0;
                figures.insert(
                    (*name).to_owned(),
                    json!({ "p50_ms": round(p50), "p99_ms": round(p99), "max_ms": round(max) }),
                );
            }
            Err(status) => {
                r.say(format!(
                    "  {name:<26} unreachable: {path} answered {status}"
                ));
                figures.insert((*name).to_owned(), json!({ "unreachable": status }));
                unreachable += 1;
            }
        }
    }
    r.say(format!(
        "  slowest answer of the pages timed: {worst:.2} ms; {unreachable} of {} pages unreachable",
        pages.len()
    ));
    r.figure("pages", Value::Object(figures));
    r.figure("requests_per_page", k);
    r.figure("slowest_ms", (worst * 100.0).round() / 100.0);
    r.figure("unreachable_pages", unreachable);
    let status = sigterm_and_wait(daemon)?;
    ensure!(status.success(), "aiq run exited with {status}");
    Ok(r)
}
