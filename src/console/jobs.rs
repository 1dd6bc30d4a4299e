//! `GET /console/jobs`: look a job up by id (its state from Redis, completed from its
//! PostgreSQL result row once finished, as `aiq job show`), or list waiting jobs by tier and
//! organisation, or delayed jobs, a page of 50 at a time.

use std::fmt::Write;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use super::html::{at, cut, esc, url};
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
    b.push_str(r#"<table id="events"><tr><th>when</th><th>what</th></tr>"#);
    if let Some(due) = st.due_at {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>due again ({})</td></tr>",
            at(due),
            esc(st.delay_reason.as_deref().unwrap_or("retry"))
        );
    }
    if let Some(f) = st.finished_at {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>finished: {}</td></tr>",
            at(f),
            st.state.as_str()
        );
    }
    if let Some(e) = &st.last_error {
        let _ = write!(
            b,
            "<tr><td></td><td>last error: {}</td></tr>",
            esc(&cut(e, 2000))
        );
    }
    b.push_str("</table>");
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
