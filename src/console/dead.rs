//! The dead set: `GET /console/dead` lists it newest first, filtered by kind, tier,
//! organisation, provider, reason and time of death; one dead job; retry or purge one, the ones
//! ticked, or every job matching the filter (the operator types the count shown to confirm).
//! The dead set's index is by time: the time filter is a range of it, and the other fields are
//! applied while reading that range in steps of `STEP` jobs, a page reading at most `SCAN` (the
//! cursor resumes). The provider is not in Redis: it is the provider of the job's newest error
//! row (`ai_processing_errors`), looked up for each step in one statement. A count with filters
//! other than time reads at most `SCAN` jobs too and says "at least" when the range holds more;
//! actions by filter work through the whole range in the same steps (up to the time the page
//! was shown, so jobs that die later are not touched) and write one audit row with the count.

use std::collections::HashMap;
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
/// The most dead jobs one page request reads while filtering, and while counting.
const SCAN: usize = 1_000;

/// A dead-set filter; empty fields match everything.
#[derive(Debug, Default, Clone)]
struct Filter {
    kind: Option<String>,
    tier: Option<String>,
    org: Option<String>,
    provider: Option<String>,
    reason: Option<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    /// The fields as given, to write them back into forms and links.
    raw: Vec<(&'static str, String)>,
}

const FIELDS: [&str; 7] = [
    "kind", "tier", "org", "provider", "reason", "since", "until",
];

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
            provider: own("provider"),
            reason: own("reason"),
            since_ms: when("since", false)?,
            until_ms: when("until", true)?,
            raw: FIELDS
                .iter()
                .filter_map(|n| q.get(n).map(|v| (*n, v.to_owned())))
                .collect(),
        })
    }

    /// Whether only the time range filters (or nothing does): Redis counts that exactly.
    fn by_time_only(&self) -> bool {
        self.kind.is_none()
            && self.tier.is_none()
            && self.org.is_none()
            && self.provider.is_none()
            && self.reason.is_none()
    }

    /// The fields Redis holds (the time range is the read's own).
    fn matches(&self, d: &DeadJob) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.kind, &d.kind)
            && eq(&self.tier, &d.tier)
            && eq(&self.org, &d.organization_id)
            && eq(&self.reason, &d.reason)
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

    /// This filter read up to `upto_ms` (the time a page was shown) at the latest.
    fn upto(&self, upto_ms: i64) -> Self {
        let mut f = self.clone();
        f.until_ms = Some(f.until_ms.map_or(upto_ms, |u| u.min(upto_ms)));
        f
    }
}

/// A dead job read, with the provider of its newest error row when there is one.
type Found = (DeadJob, Option<String>);

/// The providers of the jobs' newest error rows (jobs whose organisation is not a UUID have
/// none: nothing of theirs is in PostgreSQL).
async fn providers_of(
    c: &Console,
    jobs: &[DeadJob],
) -> Result<HashMap<(uuid::Uuid, String), String>, String> {
    let keys: Vec<(uuid::Uuid, String)> = jobs
        .iter()
        .filter_map(|d| {
            Some((
                uuid::Uuid::parse_str(&d.organization_id).ok()?,
                d.id.clone(),
            ))
        })
        .collect();
    c.src
        .store
        .last_failed_providers(&keys)
        .await
        .map_err(|e| e.to_string())
}

fn provider_in(map: &HashMap<(uuid::Uuid, String), String>, d: &DeadJob) -> Option<String> {
    let org = uuid::Uuid::parse_str(&d.organization_id).ok()?;
    map.get(&(org, d.id.clone())).cloned()
}

/// One step of the range from `offset`: how many jobs it read, and the matches with their
/// places in the step.
async fn step(
    c: &Console,
    f: &Filter,
    offset: usize,
    n: usize,
) -> Result<(usize, Vec<(usize, Found)>), String> {
    let page = c
        .src
        .queue
        .dead_page_between(f.since_ms, f.until_ms, offset, n)
        .await
        .map_err(|e| e.to_string())?;
    let read = page.len();
    let hits: Vec<(usize, DeadJob)> = page
        .into_iter()
        .enumerate()
        .filter(|(_, d)| f.matches(d))
        .collect();
    let Some(want) = &f.provider else {
        return Ok((
            read,
            hits.into_iter().map(|(i, d)| (i, (d, None))).collect(),
        ));
    };
    let jobs: Vec<DeadJob> = hits.iter().map(|(_, d)| d.clone()).collect();
    let map = providers_of(c, &jobs).await?;
    Ok((
        read,
        hits.into_iter()
            .filter_map(|(i, d)| {
                let p = provider_in(&map, &d)?;
                (&p == want).then_some((i, (d, Some(p))))
            })
            .collect(),
    ))
}

/// What a bounded read of the range found: up to `want` matches from `offset`, where the next
/// page starts (None: the end of the range), and how many matched in all that was read.
struct Scanned {
    rows: Vec<Found>,
    next: Option<usize>,
    matched: u64,
    /// Whether the read reached the end of the range (so `matched` counts every match from
    /// `offset` on).
    end: bool,
}

/// Reads from `offset` at most `SCAN` jobs: until `want` matches were found, or, with `count`,
/// on to count the matches in all it reads.
async fn scan(
    c: &Console,
    f: &Filter,
    mut offset: usize,
    want: usize,
    count: bool,
) -> Result<Scanned, String> {
    let mut s = Scanned {
        rows: Vec::new(),
        next: None,
        matched: 0,
        end: false,
    };
    let mut read = 0;
    loop {
        // Without a filter every job read is shown: read no more than the page.
        let n = if f.by_time_only() && !count {
            want.clamp(1, STEP)
        } else {
            STEP
        };
        let (got, hits) = step(c, f, offset, n).await?;
        for (i, found) in hits {
            s.matched += 1;
            if s.rows.len() < want {
                s.rows.push(found);
                // The next page starts after the last job shown.
                s.next = Some(offset + i + 1);
            }
        }
        offset += got;
        read += got;
        if s.rows.len() < want {
            s.next = Some(offset);
        }
        if got < n {
            s.end = true;
            if s.rows.len() < want || s.next == Some(offset) {
                s.next = None;
            }
            return Ok(s);
        }
        if read >= SCAN || (!count && s.rows.len() >= want) {
            return Ok(s);
        }
    }
}

/// How many dead jobs match, and whether that is all of them: Redis counts a time range
/// exactly; other filters count what a bounded read finds.
async fn matching_count(c: &Console, f: &Filter) -> Result<(u64, bool), String> {
    if f.by_time_only() {
        return c
            .src
            .queue
            .dead_count_between(f.since_ms, f.until_ms)
            .await
            .map(|n| (n, true))
            .map_err(|e| e.to_string());
    }
    let s = scan(c, f, 0, 0, true).await?;
    Ok((s.matched, s.end))
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
    // The page's range ends now: the count it shows and the action by filter it offers see the
    // same jobs, whatever dies after.
    let now = match c.src.queue.now_ms().await {
        Ok(n) => n,
        Err(e) => return failed("reading Redis's clock", e),
    };
    let shown = f.upto(now);
    let read = if cursor == 0 && !f.by_time_only() {
        // One read for the page and its count.
        scan(&c, &shown, 0, PAGE, true)
            .await
            .map(|s| (s.rows, s.next, s.matched, s.end))
    } else {
        match scan(&c, &shown, cursor, PAGE, false).await {
            Ok(s) => matching_count(&c, &shown)
                .await
                .map(|(n, all)| (s.rows, s.next, n, all)),
            Err(e) => Err(e),
        }
    };
    let (mut rows, next, count, complete) = match read {
        Ok(r) => r,
        Err(e) => return failed("reading the dead set", e),
    };
    if f.provider.is_none() {
        let jobs: Vec<DeadJob> = rows.iter().map(|(d, _)| d.clone()).collect();
        match providers_of(&c, &jobs).await {
            Ok(map) => {
                for (d, p) in &mut rows {
                    *p = provider_in(&map, d);
                }
            }
            Err(e) => return failed("reading the dead jobs' providers", e),
        }
    }
    let in_range = if complete {
        count
    } else {
        match c
            .src
            .queue
            .dead_count_between(shown.since_ms, shown.until_ms)
            .await
        {
            Ok(n) => n,
            Err(e) => return failed("counting the dead set", e),
        }
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
        r#"<form id="dead-selected" method="post" action="/console/dead/retry">{}<table id="dead-list"><tr><th></th><th>id</th><th>kind</th><th>tier</th><th>organisation</th><th>provider</th><th>attempts</th><th>reason</th><th>died</th></tr>"#,
        csrf(&s)
    );
    for (d, p) in &rows {
        let _ = write!(
            b,
            r#"<tr data-id="{id}"><td><input type="checkbox" name="id" value="{id}"></td><td><a href="/console/dead/{u}">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td class="provider">{}</td><td class="n">{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&d.kind),
            esc(&d.tier),
            esc(&d.organization_id),
            esc(p.as_deref().unwrap_or("-")),
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
        r#"<form id="dead-matching" method="post" action="/console/dead/retry">{}{}<input type="hidden" name="upto" value="{now}"><p>"#,
        csrf(&s),
        f.hidden()
    );
    if complete {
        let _ = write!(
            b,
            r#"<span id="matching-count">{count}</span> dead jobs match the filter."#
        );
    } else {
        let _ = write!(
            b,
            r#"At least <span id="matching-count">{count}</span> dead jobs match the filter: the newest {SCAN} of the {in_range} in its time range were read. An action on every match acts on all of the range."#
        );
    }
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
    let provider = match uuid::Uuid::parse_str(get("org")) {
        Ok(org) => match c
            .src
            .store
            .last_failed_providers(&[(org, id.clone())])
            .await
        {
            Ok(mut m) => m.remove(&(org, id.clone())),
            Err(e) => return failed("reading the job's provider", e),
        },
        Err(_) => None,
    };
    // The last error is shown when it says more than the reason (a job that ran out of
    // attempts: the reason quotes it; a job that failed for good: they are the same).
    let (reason, last) = (get("dead_reason"), get("last_error"));
    let last = if last.is_empty() || reason.contains(last) {
        String::new()
    } else {
        format!(
            r#"<dt>last error</dt><dd id="error">{}</dd>"#,
            esc(&cut(last, 2000))
        )
    };
    let _ = write!(
        b,
        r#"<dl><dt>reason</dt><dd id="reason">{}</dd><dt>attempts</dt><dd id="attempts">{}</dd><dt>kind</dt><dd>{}</dd><dt>tier</dt><dd>{}</dd><dt>organisation</dt><dd>{}</dd><dt>provider of its last failed call</dt><dd id="provider">{}</dd><dt>died</dt><dd>{}</dd>{last}</dl><h2>Payload</h2><pre id="payload">{}</pre>"#,
        esc(&cut(reason, 2000)),
        esc(get("attempts")),
        esc(get("kind")),
        esc(get("tier")),
        esc(get("org")),
        esc(provider.as_deref().unwrap_or("-")),
        get("dead_at").parse().map(at).unwrap_or_default(),
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
    // The range the page showed: up to when it was shown (jobs that died since are not touched).
    let upto = match form.get("upto").map(str::parse::<i64>) {
        Some(Ok(t)) => t,
        Some(Err(_)) => {
            return (StatusCode::BAD_REQUEST, "upto: not a time in ms\n").into_response();
        }
        None => match c.src.queue.now_ms().await {
            Ok(n) => n,
            Err(e) => return failed("reading Redis's clock", e),
        },
    };
    let f = f.upto(upto);
    let count = match matching_count(&c, &f).await {
        Ok((n, _)) => n,
        Err(e) => return failed("counting the dead set", e),
    };
    if form.get("confirm") != Some(count.to_string().as_str()) {
        return done(&back, "confirm", 0);
    }
    // Bounded steps: read STEP from where the last step left off, act on the matches; the ones
    // acted on leave the set, so the next read starts that many fewer places on.
    let (mut offset, mut total) = (0usize, 0usize);
    loop {
        let (read, hits) = match step(&c, &f, offset, STEP).await {
            Ok(r) => r,
            Err(e) => return failed("reading the dead set", e),
        };
        let hits: Vec<String> = hits.into_iter().map(|(_, (d, _))| d.id).collect();
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
        serde_json::json!({ "filter": filter, "upto_ms": upto, "count": total }),
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
