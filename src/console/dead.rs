//! The dead set: `GET /console/dead` lists it newest first, filtered by kind, tier,
//! organisation, reason and time of death; one dead job; retry or purge one, the ones ticked,
//! or every job matching the filter (the operator types the count shown to confirm). The dead
//! set's index is by time only: a filter is applied while reading it in bounded steps of
//! `STEP` jobs, a page showing at most 50 and reading at most `SCAN` per request (the cursor
//! resumes). Actions by filter work through it in the same bounded steps and write one audit row
//! with the count.

use std::fmt::Write;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::html::{at, csrf, cut, esc, url};
use super::{Console, Fields, PAGE, Shared, audit, done, failed, html, operator, viewer};
use crate::config::ConsoleRole;
use aiq_queue::DeadJob;

/// Dead jobs read per step.
const STEP: usize = 500;
/// The most dead jobs one page request reads while filtering.
const SCAN: usize = 5_000;

/// A dead-set filter; empty fields match everything.
#[derive(Debug, Default, Clone)]
struct Filter {
    kind: Option<String>,
    tier: Option<String>,
    org: Option<String>,
    reason: Option<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    /// The fields as given, to write them back into forms and links.
    raw: Vec<(&'static str, String)>,
}

const FIELDS: [&str; 6] = ["kind", "tier", "org", "reason", "since", "until"];

/// `2026-12-03`, `2026-12-03T04:05` (a form's datetime-local) or RFC 3339, as UTC ms.
fn time_ms(text: &str, end_of_day: bool) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    for f in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, f) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    let d = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    let t = if end_of_day {
        d.and_hms_milli_opt(23, 59, 59, 999)?
    } else {
        d.and_hms_opt(0, 0, 0)?
    };
    Some(t.and_utc().timestamp_millis())
}

impl Filter {
    fn from(q: &Fields) -> Result<Self, String> {
        let own = |n: &str| q.get(n).map(str::to_owned);
        let when = |n: &str, end| match q.get(n) {
            None => Ok(None),
            Some(t) => time_ms(t, end)
                .map(Some)
                .ok_or_else(|| format!("{n}: not a date or time (2026-12-03 or 2026-12-03T04:05)")),
        };
        Ok(Self {
            kind: own("kind"),
            tier: own("tier"),
            org: own("org"),
            reason: own("reason"),
            since_ms: when("since", false)?,
            until_ms: when("until", true)?,
            raw: FIELDS
                .iter()
                .filter_map(|n| q.get(n).map(|v| (*n, v.to_owned())))
                .collect(),
        })
    }

    fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    fn matches(&self, d: &DeadJob) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.kind, &d.kind)
            && eq(&self.tier, &d.tier)
            && eq(&self.org, &d.organization_id)
            && eq(&self.reason, &d.reason)
            && self.since_ms.is_none_or(|s| d.dead_at_ms >= s)
            && self.until_ms.is_none_or(|u| d.dead_at_ms <= u)
    }

    fn query(&self) -> String {
        self.raw
            .iter()
            .map(|(k, v)| format!("{k}={}", url(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    fn hidden(&self) -> String {
        self.raw
            .iter()
            .map(|(k, v)| format!(r#"<input type="hidden" name="{k}" value="{}">"#, esc(v)))
            .collect()
    }
}

/// Up to `want` dead jobs matching, reading from `offset` (newest first) at most `SCAN`;
/// returns them and where the next read starts (None: the end of the set was reached).
async fn scan(
    c: &Console,
    f: &Filter,
    mut offset: usize,
    want: usize,
) -> Result<(Vec<DeadJob>, Option<usize>), aiq_queue::QueueError> {
    let mut out = Vec::new();
    let mut read = 0;
    loop {
        let step = if f.is_empty() { want.min(STEP) } else { STEP };
        let page = c.src.queue.dead_page(offset, step).await?;
        let n = page.len();
        for (i, d) in page.into_iter().enumerate() {
            if f.matches(&d) {
                out.push(d);
                if out.len() == want {
                    return Ok((out, Some(offset + i + 1)));
                }
            }
        }
        offset += n;
        read += n;
        if n < step {
            return Ok((out, None));
        }
        if read >= SCAN {
            return Ok((out, Some(offset)));
        }
    }
}

/// How many dead jobs match: the scripts' count without a filter, else a read of the whole dead
/// set in steps of `STEP` (what an action by filter reads anyway).
async fn matching_count(c: &Console, f: &Filter) -> Result<u64, aiq_queue::QueueError> {
    if f.is_empty() {
        return Ok(c.src.queue.stats().await?.dead);
    }
    let (mut n, mut offset) = (0u64, 0);
    loop {
        let page = c.src.queue.dead_page(offset, STEP).await?;
        n += page.iter().filter(|d| f.matches(d)).count() as u64;
        if page.len() < STEP {
            return Ok(n);
        }
        offset += page.len();
    }
}

pub async fn list(State(c): State<Shared>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let s = match viewer(&c, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = Fields::query(q.as_deref());
    let (f, bad) = match Filter::from(&q) {
        Ok(f) => (f, None),
        Err(e) => (Filter::default(), Some(e)),
    };
    let cursor: usize = q.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
    let (rows, next) = match scan(&c, &f, cursor, PAGE).await {
        Ok(r) => r,
        Err(e) => return failed("reading the dead set", e),
    };
    let count = match matching_count(&c, &f).await {
        Ok(n) => n,
        Err(e) => return failed("counting the dead set", e),
    };
    let mut b = String::new();
    if let Some(e) = bad {
        let _ = write!(b, r#"<p class="danger">{}</p>"#, esc(&e));
    }
    b.push_str(r#"<form id="dead-filter" method="get" action="/console/dead">"#);
    for n in FIELDS {
        let v = f
            .raw
            .iter()
            .find(|(k, _)| *k == n)
            .map_or("", |(_, v)| v.as_str());
        let _ = write!(
            b,
            r#"<label>{n} <input name="{n}" id="filter-{n}" value="{}"></label> "#,
            esc(v)
        );
    }
    b.push_str(r#"<button id="filter">Filter</button></form>"#);
    let actor = s.role == ConsoleRole::Operator;
    let _ = write!(
        b,
        r#"<form id="dead-selected" method="post" action="/console/dead/retry">{}<table id="dead-list"><tr><th></th><th>id</th><th>kind</th><th>tier</th><th>organisation</th><th>attempts</th><th>reason</th><th>died</th></tr>"#,
        csrf(&s)
    );
    for d in &rows {
        let _ = write!(
            b,
            r#"<tr data-id="{id}"><td><input type="checkbox" name="id" value="{id}"></td><td><a href="/console/dead/{u}">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&d.kind),
            esc(&d.tier),
            esc(&d.organization_id),
            d.attempts,
            esc(&d.reason),
            at(d.dead_at_ms),
            id = esc(&d.id),
            u = url(&d.id),
        );
    }
    b.push_str("</table>");
    if actor {
        b.push_str(r#"<button id="retry-selected" formaction="/console/dead/retry">Retry the ticked</button> <button id="purge-selected" formaction="/console/dead/purge" class="danger">Purge the ticked</button>"#);
    }
    b.push_str("</form>");
    if let Some(n) = next {
        let fq = f.query();
        let _ = write!(
            b,
            r#"<p><a id="next" href="/console/dead?{}{}cursor={n}">next</a></p>"#,
            esc(&fq),
            if fq.is_empty() { "" } else { "&amp;" }
        );
    }
    let _ = write!(
        b,
        r#"<form id="dead-matching" method="post" action="/console/dead/retry">{}{}<p><span id="matching-count">{count}</span> dead jobs match the filter."#,
        csrf(&s),
        f.hidden()
    );
    if actor {
        b.push_str(r#" Type that count to act on all of them: <input name="confirm" id="confirm" inputmode="numeric" autocomplete="off"> <button id="retry-matching" formaction="/console/dead/retry">Retry every match</button> <button id="purge-matching" formaction="/console/dead/purge" class="danger">Purge every match</button>"#);
    }
    b.push_str("</p></form>");
    html(
        StatusCode::OK,
        super::html::page("Dead set", &s, super::flash(&q).as_deref(), &b),
    )
}

pub async fn show(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let s = match viewer(&c, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = Fields::query(q.as_deref());
    let fields = match c.src.queue.job_fields(&id).await {
        Ok(f) => f,
        Err(e) => return failed("reading the job", e),
    };
    let flash = super::flash(&q);
    let mut b = format!("<p>Job <code>{}</code></p>", esc(&id));
    if fields.get("state").map(String::as_str) != Some("dead") {
        b.push_str(r#"<p id="not-dead">This job is not in the dead set (any more).</p>"#);
        let _ = write!(
            b,
            r#"<p><a href="/console/jobs/{}">Its status</a></p>"#,
            url(&id)
        );
        let code = if flash.is_some() {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        };
        return html(
            code,
            super::html::page("Dead job", &s, flash.as_deref(), &b),
        );
    }
    let get = |k: &str| fields.get(k).map_or("", String::as_str);
    let _ = write!(
        b,
        r#"<dl><dt>reason</dt><dd id="reason">{}</dd><dt>attempts</dt><dd id="attempts">{}</dd><dt>kind</dt><dd>{}</dd><dt>tier</dt><dd>{}</dd><dt>organisation</dt><dd>{}</dd><dt>died</dt><dd>{}</dd><dt>last error</dt><dd id="error">{}</dd></dl><h2>Payload</h2><pre id="payload">{}</pre>"#,
        esc(get("dead_reason")),
        esc(get("attempts")),
        esc(get("kind")),
        esc(get("tier")),
        esc(get("org")),
        get("dead_at").parse().map(at).unwrap_or_default(),
        esc(&cut(get("last_error"), 2000)),
        esc(&cut(get("payload"), 4000)),
    );
    if s.role == ConsoleRole::Operator {
        let u = url(&id);
        let _ = write!(
            b,
            r#"<form id="retry" method="post" action="/console/dead/{u}/retry">{t}<button id="retry">Retry</button></form> <form id="purge" method="post" action="/console/dead/{u}/purge">{t}<button id="purge" class="danger">Purge</button></form>"#,
            t = csrf(&s)
        );
    }
    html(
        StatusCode::OK,
        super::html::page("Dead job", &s, flash.as_deref(), &b),
    )
}

async fn act_one(c: Shared, headers: HeaderMap, id: String, body: Bytes, retry: bool) -> Response {
    let form = Fields::parse(&body);
    let s = match operator(&c, &headers, &form) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let ids = vec![id.clone()];
    let n = match if retry {
        c.src.queue.dead_retry(&ids).await
    } else {
        c.src.queue.dead_purge(&ids).await
    } {
        Ok(n) => n,
        Err(e) => return failed("the dead-set action", e),
    };
    let action = if retry {
        "console.dead.retry"
    } else {
        "console.dead.purge"
    };
    audit(
        &c,
        &s,
        action,
        None,
        serde_json::json!({ "ids": ids, "count": n }),
    )
    .await;
    done(
        &format!("/console/dead/{}", url(&id)),
        if retry { "retried" } else { "purged" },
        n,
    )
}

pub async fn retry_one(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    act_one(c, headers, id, body, true).await
}

pub async fn purge_one(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    act_one(c, headers, id, body, false).await
}

/// The ticked ids, or (with `confirm`) every job matching the filter in the form.
async fn act_many(c: Shared, headers: HeaderMap, body: Bytes, retry: bool) -> Response {
    let form = Fields::parse(&body);
    let s = match operator(&c, &headers, &form) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let (word, action) = if retry {
        ("retried", "console.dead.retry")
    } else {
        ("purged", "console.dead.purge")
    };
    let op = |ids: Vec<String>| {
        let c = c.clone();
        async move {
            if retry {
                c.src.queue.dead_retry(&ids).await
            } else {
                c.src.queue.dead_purge(&ids).await
            }
        }
    };
    let ids = form.all("id");
    if form.get("confirm").is_none() {
        if ids.is_empty() {
            return (
                StatusCode::BAD_REQUEST,
                "tick some jobs, or confirm the count of the matching ones\n",
            )
                .into_response();
        }
        let n = match op(ids.clone()).await {
            Ok(n) => n,
            Err(e) => return failed("the dead-set action", e),
        };
        audit(
            &c,
            &s,
            action,
            None,
            serde_json::json!({ "ids": ids, "count": n }),
        )
        .await;
        return done("/console/dead", word, n);
    }
    let f = match Filter::from(&form) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let back = format!("/console/dead?{}", f.query());
    let count = match matching_count(&c, &f).await {
        Ok(n) => n,
        Err(e) => return failed("counting the dead set", e),
    };
    if form.get("confirm") != Some(count.to_string().as_str()) {
        return done(&back, "confirm", 0);
    }
    // Bounded steps: read STEP from where the last step left off, act on the matches; the ones
    // acted on leave the set, so the next read starts that many fewer places on.
    let (mut offset, mut total) = (0usize, 0usize);
    loop {
        let page = match c.src.queue.dead_page(offset, STEP).await {
            Ok(p) => p,
            Err(e) => return failed("reading the dead set", e),
        };
        let read = page.len();
        let hits: Vec<String> = page
            .into_iter()
            .filter(|d| f.matches(d))
            .map(|d| d.id)
            .collect();
        let n = if hits.is_empty() {
            0
        } else {
            match op(hits).await {
                Ok(n) => n,
                Err(e) => return failed("the dead-set action", e),
            }
        };
        total += n;
        offset += read - n.min(read);
        if read < STEP {
            break;
        }
    }
    let filter: serde_json::Map<_, _> = f
        .raw
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(v.as_str())))
        .collect();
    audit(
        &c,
        &s,
        action,
        None,
        serde_json::json!({ "filter": filter, "count": total }),
    )
    .await;
    done(&back, word, total)
}

pub async fn retry_many(State(c): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    act_many(c, headers, body, true).await
}

pub async fn purge_many(State(c): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    act_many(c, headers, body, false).await
}
