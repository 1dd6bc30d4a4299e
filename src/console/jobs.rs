//! `GET /console/jobs`: look a job up by id (its state from Redis, completed from its
//! PostgreSQL result row once finished, as `aiq job show`), or list waiting jobs by tier and
//! organisation, or delayed jobs, a page of 50 at a time.

use std::fmt::Write;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use aiq_queue::events::{JobEvents, JobStatus};

use super::html::{at, at_ms, cut, esc, url};
use super::{Fields, PAGE, Shared, failed, html, viewer};

pub async fn list(State(c): State<Shared>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let s = match viewer(&c, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = Fields::query(q.as_deref());
    if let Some(id) = q.get("id") {
        return Redirect::to(&format!("/console/jobs/{}", url(id))).into_response();
    }
    let cursor: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
    let tier = q
        .get("tier")
        .filter(|t| t.parse::<crate::domain::Tier>().is_ok());
    let org = q.get("org");
    let state = q.get("state").unwrap_or("waiting");
    let mut b = String::from(
        r#"<form id="job-lookup" method="get" action="/console/jobs"><label>Job id <input name="id" id="job-id"></label> <button id="look-up">Look up</button></form>
<form id="job-filter" method="get" action="/console/jobs"><label>State <select name="state"><option>waiting</option><option>delayed</option></select></label> <label>Tier <select name="tier"><option value="">-</option>"#,
    );
    for t in crate::domain::Tier::ALL {
        let sel = if tier == Some(t.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(b, "<option{sel}>{}</option>", t.as_str());
    }
    let _ = write!(
        b,
        r#"</select></label> <label>Organisation <input name="org" value="{}"></label> <button id="list">List</button></form>"#,
        esc(org.unwrap_or(""))
    );
    let next_base = format!(
        "/console/jobs?state={}&tier={}&org={}",
        url(state),
        url(tier.unwrap_or("")),
        url(org.unwrap_or(""))
    );
    let rows = match (state, tier, org) {
        ("delayed", _, _) => c.src.queue.delayed_page(cursor, PAGE + 1).await,
        (_, Some(t), Some(o)) => c.src.queue.waiting_page(t, o, cursor, PAGE + 1).await,
        (_, Some(t), None) => {
            // A tier without an organisation: the organisations with waiting jobs, a page.
            let orgs = match c.src.queue.waiting_orgs(t, cursor, PAGE + 1).await {
                Ok(o) => o,
                Err(e) => return failed("reading the tier's organisations", e),
            };
            b.push_str(r#"<table id="org-heads"><tr><th>organisation with jobs waiting</th><th>its oldest ready since</th></tr>"#);
            for (o, ms) in orgs.iter().take(PAGE) {
                let _ = write!(
                    b,
                    r#"<tr><td><a href="/console/jobs?state=waiting&tier={t}&org={}">{}</a></td><td>{}</td></tr>"#,
                    url(o),
                    esc(o),
                    at(*ms)
                );
            }
            b.push_str("</table>");
            if orgs.len() > PAGE {
                let _ = write!(
                    b,
                    r#"<a id="next" href="{}&cursor={}">next</a>"#,
                    esc(&next_base),
                    cursor + PAGE
                );
            }
            return html(StatusCode::OK, super::html::page("Jobs", &s, None, &b));
        }
        _ => Ok(Vec::new()),
    };
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return failed("reading the jobs", e),
    };
    if state != "delayed" && (tier.is_none() || org.is_none()) {
        b.push_str(
            "<p>Pick a tier (and an organisation) to list waiting jobs, or the delayed state.</p>",
        );
    }
    b.push_str(r#"<table id="job-list"><tr><th>id</th><th>kind</th><th>tier</th><th>organisation</th><th>attempts</th><th>due</th><th>reason</th></tr>"#);
    for j in rows.iter().take(PAGE) {
        let _ = write!(
            b,
            r#"<tr data-id="{id}"><td><a href="/console/jobs/{u}">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&j.kind),
            esc(&j.tier),
            esc(&j.organization_id),
            j.attempts,
            j.at_ms.map(at).unwrap_or_default(),
            esc(j.delay_reason.as_deref().unwrap_or("")),
            id = esc(&j.id),
            u = url(&j.id),
        );
    }
    b.push_str("</table>");
    if rows.len() > PAGE {
        let _ = write!(
            b,
            r#"<a id="next" href="{}&cursor={}">next</a>"#,
            esc(&next_base),
            cursor + PAGE
        );
    }
    html(StatusCode::OK, super::html::page("Jobs", &s, None, &b))
}

pub async fn show(State(c): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let s = match viewer(&c, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let status = match c.src.queue.status(&id).await {
        Ok(st) => st,
        Err(e) => return failed("reading the job", e),
    };
    let org = status
        .as_ref()
        .and_then(|st| uuid::Uuid::parse_str(&st.organization_id).ok());
    let rows = if status.as_ref().is_some_and(|st| !st.state.is_terminal()) {
        Vec::new()
    } else {
        match c.src.store.result_rows(org, &id).await {
            Ok(r) => r,
            Err(e) => return failed("reading the job's result row", e),
        }
    };
    let row = rows.first().cloned();
    let status = crate::store::complete_status(status, &id, rows.into_iter().next());
    let mut b = format!(r#"<p>Job <code>{}</code></p>"#, esc(&id));
    let Some(st) = status else {
        b.push_str(r#"<dl><dt>state</dt><dd id="state">not found</dd></dl><p>Neither Redis nor PostgreSQL knows this job.</p>"#);
        return html(
            StatusCode::NOT_FOUND,
            super::html::page("Job", &s, None, &b),
        );
    };
    let _ = write!(
        b,
        r#"<dl><dt>state</dt><dd id="state">{}</dd><dt>attempts</dt><dd id="attempts">{}</dd><dt>kind</dt><dd>{}</dd><dt>tier</dt><dd>{}</dd><dt>organisation</dt><dd>{}</dd></dl>"#,
        st.state.as_str(),
        st.attempts,
        esc(&st.kind),
        esc(&st.tier),
        esc(&st.organization_id),
    );
    // The job's events from the stream, at its known times (the result row's too).
    let mut hints: Vec<u64> = st
        .finished_at
        .into_iter()
        .map(|t| t.max(0) as u64)
        .collect();
    if let Some((_, r)) = &row {
        hints.extend(r.processed_at.map(|t| t.timestamp_millis().max(0) as u64));
    }
    let events = match c.src.queue.job_events(&id, &hints).await {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(error = %e, "console: reading the job's events failed");
            None
        }
    };
    b.push_str(&events_table(&st, events.as_ref()));
    if let Some((_, r)) = &row {
        let _ = write!(
            b,
            r#"<table id="result"><tr><th>row</th><td>{}</td></tr><tr><th>processed</th><td>{}</td></tr><tr><th>error</th><td id="error">{}</td></tr></table>"#,
            esc(&r.status),
            r.processed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            esc(&cut(r.error_message.as_deref().unwrap_or("-"), 2000)),
        );
    }
    // Its calls and error rows, under the organisation its status names.
    if let Ok(org) = uuid::Uuid::parse_str(&st.organization_id) {
        match super::calls::tables(&c, org, &id).await {
            Ok(t) => b.push_str(&t),
            Err(e) => return failed("reading the job's calls and errors", e),
        }
    }
    if let Some(res) = &st.result {
        let _ = write!(
            b,
            r#"<pre id="summary">{}</pre>"#,
            esc(&cut(&res.to_string(), 4000))
        );
    }
    if st.state == aiq_queue::events::JobState::Dead {
        let _ = write!(
            b,
            r#"<p><a href="/console/dead/{}">In the dead set</a></p>"#,
            url(&id)
        );
    }
    html(StatusCode::OK, super::html::page("Job", &s, None, &b))
}

/// The fields every event has; the rest are its type's own (jobs/README.md, "Events").
const COMMON: [&str; 8] = [
    "type", "job_id", "org", "tier", "kind", "state", "at", "attempts",
];

/// The events table: the stream's events of the job, or where the stream has none of them
/// (events off, trimmed, not readable) the lines its status gives; and what the read may miss.
fn events_table(st: &JobStatus, events: Option<&JobEvents>) -> String {
    let mut b = String::from(
        r#"<table id="events"><tr><th>when</th><th>event</th><th>state</th><th>attempts</th><th>details</th></tr>"#,
    );
    let found = events.map_or(&[][..], |e| e.events.as_slice());
    for e in found {
        let details: Vec<String> = e
            .fields
            .iter()
            .filter(|(k, _)| !COMMON.contains(&k.as_str()))
            .map(|(k, v)| {
                let v = match (k.as_str(), v.parse::<i64>()) {
                    ("until", Ok(ms)) => at_ms(ms),
                    _ => cut(v, 500),
                };
                format!("{}: {}", esc(&cut(k, 40)), esc(&v))
            })
            .collect();
        let when = e
            .get("at")
            .parse::<i64>()
            .map_or_else(|_| esc(&cut(e.get("at"), 40)), at_ms);
        let _ = write!(
            b,
            r#"<tr class="event" data-type="{ty}"><td>{when}</td><td>{ty}</td><td>{}</td><td class="n">{}</td><td>{}</td></tr>"#,
            esc(&cut(e.get("state"), 40)),
            esc(&cut(e.get("attempts"), 20)),
            details.join("; "),
            ty = esc(&cut(e.get("type"), 40)),
        );
    }
    if found.is_empty() {
        if let Some(due) = st.due_at {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>due again ({})</td><td></td><td></td><td></td></tr>",
                at(due),
                esc(st.delay_reason.as_deref().unwrap_or("retry"))
            );
        }
        if let Some(f) = st.finished_at {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>finished: {}</td><td></td><td></td><td></td></tr>",
                at(f),
                st.state.as_str()
            );
        }
        if let Some(e) = &st.last_error {
            let _ = write!(
                b,
                "<tr><td></td><td>last error: {}</td><td></td><td></td><td></td></tr>",
                esc(&cut(e, 2000))
            );
        }
    }
    b.push_str("</table>");
    let Some(ev) = events else {
        b.push_str(r#"<p id="events-none">The events stream could not be read (see the daemon's log); these lines are from the job's status.</p>"#);
        return b;
    };
    if found.is_empty() {
        let why = if ev.off {
            "events are off (AIQ_EVENTS)"
        } else if ev.trimmed {
            "the stream no longer holds them (trimmed)"
        } else {
            "the stream holds none of them where this job's known times point"
        };
        let _ = write!(
            b,
            r#"<p id="events-none">No events of this job were found: {why}. These lines are from the job's status.</p>"#
        );
    } else if ev.incomplete || (st.state.is_terminal() && !ev.ended()) {
        let _ = write!(
            b,
            r#"<p id="events-incomplete">This list may be incomplete: the stream has no index by job, so it is read in at most two windows of {} entries, from this job's first and last known times{}.</p>"#,
            aiq_queue::events::JOB_EVENTS_WINDOW,
            if ev.trimmed {
                "; its oldest events were trimmed"
            } else {
                ""
            },
        );
    }
    if ev.skipped > 0 {
        let _ = write!(
            b,
            r#"<p id="events-skipped">{} stream entries that name this job were not in the contract's shape and were skipped.</p>"#,
            ev.skipped
        );
    }
    b
}
