//! `GET /console/`: per tier waiting, the oldest's age, in flight, delayed and dead (counts the
//! scripts keep: `{p}:depth` and `{p}:held`, with the sets' exact sizes as the totals); delayed
//! jobs by reason; jobs per minute by outcome over the last hour (`{p}:minute:<m>`); the
//! providers' breakers, pauses and use of their requests and tokens per minute; the platform's
//! spend. Every read is bounded whatever the backlog: a few hashes, 60 minutes, four providers.

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::html::{age, at, esc};
use super::{Shared, failed, html, viewer};

/// The outcomes the per-minute chart stacks, with their colours; the other event types
/// (started, released, interrupted) are in the table only.
const OUTCOMES: [(&str, &str); 6] = [
    ("succeeded", "#109618"),
    ("retried", "#ff9900"),
    ("deferred", "#3366cc"),
    ("failed", "#990099"),
    ("dead", "#dc3912"),
    ("cancelled", "#777777"),
];

/// Stacked bars, one per minute of the last hour, one colour per outcome.
fn minutes_chart(minutes: &[aiq_queue::Minute]) -> String {
    let total = |m: &aiq_queue::Minute| -> u64 {
        OUTCOMES
            .iter()
            .map(|(o, _)| m.counts.get(*o).copied().unwrap_or(0))
            .sum()
    };
    let top = minutes.iter().map(total).max().unwrap_or(0).max(1);
    let (h, bar) = (120_u64, 10_u64);
    let mut svg = format!(
        r#"<svg id="minutes-svg" xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" role="img" aria-label="jobs per minute by outcome, last hour">"#,
        20 + bar * minutes.len() as u64,
        h + 44
    );
    for (k, m) in minutes.iter().enumerate() {
        let x = 10 + k as u64 * bar;
        let mut y = h;
        for (o, colour) in OUTCOMES {
            let n = m.counts.get(o).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let bh = (n * h / top).max(1);
            y = y.saturating_sub(bh);
            let _ = write!(
                svg,
                r#"<rect x="{x}" y="{y}" width="{}" height="{bh}" fill="{colour}"><title>{} {o}: {n}</title></rect>"#,
                bar - 2,
                at(m.start_ms as i64)
            );
        }
    }
    let _ = write!(
        svg,
        r#"<text x="10" y="{}" font-size="11">{} per minute at most; the last bar is this minute</text>"#,
        h + 16,
        top
    );
    let mut x = 10;
    for (o, colour) in OUTCOMES {
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}" font-size="11">{o}</text>"#,
            h + 26,
            x + 13,
            h + 35
        );
        x += 90;
    }
    svg.push_str("</svg>");
    svg
}

pub async fn page(State(c): State<Shared>, headers: HeaderMap) -> Response {
    let s = match viewer(&c, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let stats = match c.src.queue.stats().await {
        Ok(st) => st,
        Err(e) => return failed("reading the queue's counts", e),
    };
    let mut b = String::new();
    b.push_str(
        r#"<section id="queue" data-live><table id="tiers"><thead><tr><th>tier</th><th>waiting</th><th>oldest</th><th>in flight</th><th>delayed</th><th>dead</th></tr></thead><tbody>"#,
    );
    let of = |m: &BTreeMap<String, u64>, t: &str| m.get(t).copied().unwrap_or(0);
    for t in crate::domain::Tier::ALL {
        let t = t.as_str();
        let waiting = of(&stats.waiting, t);
        let oldest = of(&stats.oldest_age_ms, t);
        let _ = write!(
            b,
            r#"<tr data-tier="{t}"><th><a href="/console/jobs?tier={t}">{t}</a></th><td class="waiting">{waiting}</td><td class="oldest">{}</td><td class="inflight">{}</td><td class="delayed">{}</td><td class="dead"><a href="/console/dead?tier={t}">{}</a></td></tr>"#,
            if waiting == 0 {
                "-".to_owned()
            } else {
                age(oldest)
            },
            of(&stats.inflight_by_tier, t),
            of(&stats.delayed_by_tier, t),
            of(&stats.dead_by_tier, t),
        );
    }
    // What the sets hold beyond the per-tier counts: jobs in them from before the counts were
    // kept, or whose hash names no known tier. Shown, not hidden.
    let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
    let rest = [
        stats.inflight.saturating_sub(sum(&stats.inflight_by_tier)),
        stats.delayed.saturating_sub(sum(&stats.delayed_by_tier)),
        stats.dead.saturating_sub(sum(&stats.dead_by_tier)),
    ];
    if rest.iter().any(|n| *n > 0) {
        let _ = write!(
            b,
            r#"<tr data-tier="unattributed"><th>no tier counted</th><td></td><td></td><td class="inflight">{}</td><td class="delayed">{}</td><td class="dead">{}</td></tr>"#,
            rest[0], rest[1], rest[2]
        );
    }
    let _ = write!(
        b,
        r#"</tbody><tfoot><tr data-tier="all"><th>all tiers</th><td class="n">{}</td><td></td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td></tr></tfoot></table>"#,
        sum(&stats.waiting),
        stats.inflight,
        stats.delayed,
        stats.dead
    );
    b.push_str("<p>Counters since the queue was made: ");
    for (k, v) in &stats.counters {
        let _ = write!(b, "{} {v}; ", esc(k));
    }
    b.push_str("</p></section>");

    b.push_str(r#"<section id="delayed-reasons" data-live><h2>Delayed jobs by reason</h2><table id="delayed"><tr><th>reason</th><th>jobs</th></tr>"#);
    for r in aiq_queue::events::DelayReason::ALL {
        let n = of(&stats.delayed_by_reason, r.as_str());
        if n > 0 {
            let _ = write!(
                b,
                r#"<tr data-reason="{0}"><td>{0}</td><td class="n">{n}</td></tr>"#,
                r.as_str()
            );
        }
    }
    if rest[1] > 0 {
        let _ = write!(
            b,
            r#"<tr data-reason="unattributed"><td>not counted by reason</td><td class="n">{}</td></tr>"#,
            rest[1]
        );
    }
    let _ = write!(
        b,
        r#"<tr><th>all</th><td class="n">{}</td></tr></table></section>"#,
        stats.delayed
    );

    b.push_str(r#"<section id="minutes" data-live><h2>Jobs per minute, last hour</h2>"#);
    match c.src.queue.minutes(60).await {
        Ok(minutes) => {
            b.push_str(&minutes_chart(&minutes));
            b.push_str(r#"<table id="per-minute"><tr><th>event</th><th>last hour</th><th>last 5 minutes</th><th>this minute</th></tr>"#);
            for e in aiq_queue::MINUTE_EVENTS {
                let count = |from: usize| -> u64 {
                    minutes[from.min(minutes.len())..]
                        .iter()
                        .map(|m| m.counts.get(e).copied().unwrap_or(0))
                        .sum()
                };
                let _ = write!(
                    b,
                    r#"<tr data-event="{e}"><td>{e}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
                    count(0),
                    count(minutes.len().saturating_sub(5)),
                    count(minutes.len().saturating_sub(1)),
                );
            }
            b.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(b, "<p>not read: {}</p>", esc(&e.to_string()));
        }
    }
    b.push_str("</section>");

    b.push_str(r#"<section id="providers" data-live><h2>Providers</h2><table id="provider-table"><tr><th>provider</th><th>breaker</th><th>paused</th><th>requests this minute</th><th>tokens this minute</th></tr>"#);
    match c.src.breakers.now().await {
        Ok(now) => {
            use crate::providers::breaker::BreakerState;
            let used = |n: Option<u64>, limit: u64| -> String {
                let n = n.map_or_else(|| "?".to_owned(), |n| n.to_string());
                if limit == 0 {
                    format!("{n} (no limit)")
                } else {
                    format!("{n} of {limit}")
                }
            };
            for p in now {
                let breaker = match p.breaker {
                    BreakerState::Closed => "closed".to_owned(),
                    BreakerState::HalfOpen => "half open".to_owned(),
                    BreakerState::Open { remaining } => {
                        format!("open, {} more", age(remaining.as_millis() as u64))
                    }
                };
                let paused = p.paused.map_or_else(
                    || "no".to_owned(),
                    |d| format!("{} more", age(d.as_millis() as u64)),
                );
                let _ = write!(
                    b,
                    r#"<tr data-provider="{0}"><td>{0}</td><td class="breaker">{breaker}</td><td class="paused">{paused}</td><td class="rpm">{1}</td><td class="tpm">{2}</td></tr>"#,
                    esc(p.provider),
                    used(p.rpm_used, p.rpm),
                    used(p.tpm_used, p.tpm),
                );
            }
        }
        Err(e) => {
            let _ = write!(
                b,
                "<tr><td colspan=5>not read: {}</td></tr>",
                esc(&e.to_string())
            );
        }
    }
    b.push_str("</table></section>");

    b.push_str(r#"<section id="spend" data-live><h2>Platform spend</h2><table><tr><th>window</th><th>spent</th><th>limit</th></tr>"#);
    match crate::http::global_budget(&c.src.budget).await {
        Ok(states) => {
            for st in states {
                let limit = if st.limit.micros() > 0 {
                    st.limit.to_string()
                } else {
                    "none".to_owned()
                };
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{limit}</td></tr>",
                    st.window_kind.as_str(),
                    st.spent
                );
            }
        }
        Err(e) => {
            let _ = write!(
                b,
                "<tr><td colspan=3>not read: {}</td></tr>",
                esc(&e.to_string())
            );
        }
    }
    b.push_str("</table></section>");
    let q = super::Fields::default();
    html(
        StatusCode::OK,
        super::html::page("Overview", &s, super::flash(&q).as_deref(), &b),
    )
}
