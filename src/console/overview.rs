//! `GET /console/`: per tier waiting, the oldest's age, and the fleet's in flight, delayed and
//! dead (all from `Queue::stats`, counts the scripts keep); the reasons of the next delayed jobs
//! due (a page of 50: nothing counts delayed jobs by reason); the breakers; the platform's spend.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::html::{age, esc};
use super::{Shared, failed, html, viewer};

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
    // In flight, delayed and dead are counted for the fleet, not per tier (their sets hold every
    // tier and nothing counts them by tier): the tiers' rows show -, the footer the totals.
    b.push_str(
        r#"<section id="queue" data-live><table id="tiers"><thead><tr><th>tier</th><th>waiting</th><th>oldest</th><th>in flight</th><th>delayed</th><th>dead</th></tr></thead><tbody>"#,
    );
    for t in crate::domain::Tier::ALL {
        let t = t.as_str();
        let waiting = stats.waiting.get(t).copied().unwrap_or(0);
        let oldest = stats.oldest_age_ms.get(t).copied().unwrap_or(0);
        let _ = write!(
            b,
            r#"<tr data-tier="{t}"><th><a href="/console/jobs?tier={t}">{t}</a></th><td class="waiting">{waiting}</td><td class="oldest">{}</td><td class="inflight">-</td><td class="delayed">-</td><td class="dead">-</td></tr>"#,
            if waiting == 0 {
                "-".to_owned()
            } else {
                age(oldest)
            },
        );
    }
    let _ = write!(
        b,
        r#"</tbody><tfoot><tr data-tier="all"><th>all tiers</th><td class="n">{}</td><td></td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td></tr></tfoot></table>"#,
        stats.waiting.values().sum::<u64>(),
        stats.inflight,
        stats.delayed,
        stats.dead
    );
    b.push_str("<p>Counters since the queue was made: ");
    for (k, v) in &stats.counters {
        let _ = write!(b, "{} {v}; ", esc(k));
    }
    b.push_str("</p></section>");

    b.push_str(r#"<section id="delayed-reasons" data-live><h2>Next delayed jobs by reason</h2>"#);
    match c.src.queue.delayed_page(0, super::PAGE).await {
        Ok(next) => {
            let mut by: std::collections::BTreeMap<String, u64> = Default::default();
            for j in &next {
                *by.entry(j.delay_reason.clone().unwrap_or_else(|| "retry".into()))
                    .or_default() += 1;
            }
            let _ = write!(
                b,
                "<p>The reasons of the next {} due of {} delayed.</p><table id=\"delayed\"><tr><th>reason</th><th>jobs</th></tr>",
                next.len(),
                stats.delayed
            );
            for (r, n) in by {
                let _ = write!(b, r#"<tr><td>{}</td><td class="n">{n}</td></tr>"#, esc(&r));
            }
            b.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(b, "<p>not read: {}</p>", esc(&e.to_string()));
        }
    }
    b.push_str("</section>");

    b.push_str(r#"<section id="breakers" data-live><h2>Provider breakers</h2><table><tr><th>provider</th><th>breaker</th></tr>"#);
    match c.src.breakers.states().await {
        Ok(states) => {
            use crate::providers::breaker::BreakerState;
            for (p, st) in states {
                let text = match st {
                    BreakerState::Closed => "closed".to_owned(),
                    BreakerState::HalfOpen => "half open".to_owned(),
                    BreakerState::Open { remaining } => {
                        format!("open, {} more", age(remaining.as_millis() as u64))
                    }
                };
                let _ = write!(b, "<tr><td>{}</td><td>{text}</td></tr>", esc(p));
            }
        }
        Err(e) => {
            let _ = write!(
                b,
                "<tr><td colspan=2>not read: {}</td></tr>",
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
