//! `GET /console/orgs`: organisations with spend this month, a page of 50 (the money page's
//! read); `GET /console/orgs/<org>`: its limits (tier default, its own, in force) and today's
//! use; operators change them with `form#set-limits`, through the statement `aiq org
//! set-limits` uses (`Store::change_org_overrides`; running daemons follow within about 2 s).

use std::fmt::Write;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::html::{csrf, esc};
use super::{Fields, PAGE, Shared, audit, done, failed, html, operator, viewer};
use crate::config::ConsoleRole;
use crate::domain::{MicroUsd, OrganizationId, Tier};
use crate::store::OverrideChange;

pub async fn list(State(c): State<Shared>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let s = match viewer(&c, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = Fields::query(q.as_deref());
    let (cursor, orgs) = match super::org_spend_page(&c, &q).await {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let mut b = String::from(
        r#"<form id="org-lookup" method="get" action="/console/orgs"><p>Organisations with spend this month, most first. Another: <a href="/console/orgs/">/console/orgs/&lt;uuid&gt;</a></p></form><table id="orgs"><tr><th>organisation</th><th>today</th><th>this month</th></tr>"#,
    );
    for o in orgs.iter().take(PAGE) {
        let _ = write!(
            b,
            r#"<tr data-org="{id}"><td><a href="/console/orgs/{id}">{id}</a></td><td class="n">{}</td><td class="n">{}</td></tr>"#,
            o.today,
            o.month,
            id = o.organization_id
        );
    }
    b.push_str("</table>");
    if orgs.len() > PAGE {
        let _ = write!(
            b,
            r#"<a id="next" href="/console/orgs?cursor={}">next</a>"#,
            cursor + PAGE as i64
        );
    }
    html(
        StatusCode::OK,
        super::html::page("Organisations", &s, None, &b),
    )
}

fn org_of(text: &str) -> Option<OrganizationId> {
    OrganizationId::parse_canonical(text).ok()
}

pub async fn show(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(org): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let s = match viewer(&c, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = Fields::query(q.as_deref());
    let Some(id) = org_of(&org) else {
        let b = format!(
            "<p>{} is not an organisation id (a lower-case UUID).</p>",
            esc(&org)
        );
        return html(
            StatusCode::NOT_FOUND,
            super::html::page("Organisation", &s, None, &b),
        );
    };
    let uuid = id.as_uuid();
    let tier = match q.get("tier").and_then(|t| t.parse::<Tier>().ok()) {
        Some(t) => t,
        None => match c.src.store.org_latest_tier(uuid).await {
            Ok(t) => t.and_then(|t| t.parse().ok()).unwrap_or(Tier::Trial),
            Err(e) => return failed("reading the organisation's tier", e),
        },
    };
    let own = match c.src.store.org_overrides(uuid).await {
        Ok(o) => o,
        Err(e) => return failed("reading the organisation's limits", e),
    };
    let budget = &c.src.budget;
    let in_flight_default = c.src.queue.settings().org_max_in_flight[tier.index()];
    let per_minute_default = budget.settings().org_jobs_per_minute[tier.index()];
    let money = budget.tier_limits(tier);
    let (leased, _) = match c.src.queue.org_in_flight(&id).await {
        Ok(n) => n,
        Err(e) => return failed("reading the organisation's jobs in flight", e),
    };
    let this_minute = match budget.jobs_this_minute(uuid).await {
        Ok(n) => n,
        Err(e) => return failed("reading the organisation's jobs this minute", e),
    };
    let limits = crate::budget::OrgLimits {
        daily: own.daily.unwrap_or(money.daily),
        monthly: own.monthly.unwrap_or(money.monthly),
    };
    let (scopes, _) = budget.scopes(uuid, limits, budget.now());
    let states = match budget.state(&scopes).await {
        Ok(st) => st,
        Err(e) => return failed("reading the organisation's spend", e),
    };
    let spent = |kind| {
        states
            .iter()
            .find(|st| st.owner != "global" && st.window_kind == kind)
            .map_or(MicroUsd::ZERO, |st| st.spent)
    };
    use crate::limits::{
        shown_count as count, shown_own_count as own_count, shown_own_usd as own_usd,
    };
    let mut b = format!(
        r#"<p>Organisation <code>{id}</code>, tier <span id="tier">{}</span> (the tier of its latest cost row; <code>?tier=</code> shows another's defaults).</p>
<table id="limits"><tr><th>limit</th><th>tier default</th><th>override</th><th>in force</th><th>use now</th></tr>"#,
        tier.as_str()
    );
    let _ = write!(
        b,
        r#"<tr data-limit="in_flight"><td>jobs in flight</td><td>{}</td><td>{}</td><td>{}</td><td class="n">{leased}</td></tr>"#,
        count(in_flight_default),
        own_count(own.max_in_flight),
        count(own.max_in_flight.unwrap_or(in_flight_default))
    );
    let _ = write!(
        b,
        r#"<tr data-limit="jobs_per_minute"><td>jobs per minute</td><td>{}</td><td>{}</td><td>{}</td><td class="n">{this_minute}</td></tr>"#,
        count(per_minute_default),
        own_count(own.jobs_per_minute),
        count(own.jobs_per_minute.unwrap_or(per_minute_default))
    );
    let _ = write!(
        b,
        r#"<tr data-limit="daily_usd"><td>daily spend</td><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td></tr>"#,
        money.daily,
        own_usd(own.daily),
        limits.daily,
        spent(crate::budget::WindowKind::Day)
    );
    let _ = write!(
        b,
        r#"<tr data-limit="monthly_usd"><td>monthly spend</td><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td></tr></table>"#,
        money.monthly,
        own_usd(own.monthly),
        limits.monthly,
        spent(crate::budget::WindowKind::Month)
    );
    if s.role == ConsoleRole::Operator {
        let _ = write!(
            b,
            r#"<form id="set-limits" method="post" action="/console/orgs/{id}/limits">{}<p>Empty: left as it is; <code>default</code>: back to the tier's default; 0 jobs: no limit.</p>
<label>jobs in flight <input name="in_flight" inputmode="numeric"></label>
<label>jobs per minute <input name="jobs_per_minute" inputmode="numeric"></label>
<label>daily USD <input name="daily_usd" inputmode="decimal"></label>
<label>monthly USD <input name="monthly_usd" inputmode="decimal"></label>
<button id="save-limits">Save</button></form>"#,
            csrf(&s)
        );
    }
    html(
        StatusCode::OK,
        super::html::page("Organisation", &s, super::flash(&q).as_deref(), &b),
    )
}

/// One field of the form: empty leaves the limit, `default` clears it, else its value.
fn field<T>(
    form: &Fields,
    name: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<Option<T>>, String> {
    match form.get(name) {
        None => Ok(None),
        Some("default") => Ok(Some(None)),
        Some(v) => parse(v)
            .map(|t| Some(Some(t)))
            .ok_or_else(|| format!("{name}: {} is not a limit", esc(v))),
    }
}

pub async fn set_limits(
    State(c): State<Shared>,
    headers: HeaderMap,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    let form = Fields::parse(&body);
    let s = match operator(&c, &headers, &form) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let Some(id) = org_of(&org) else {
        return (StatusCode::NOT_FOUND, "not an organisation id\n").into_response();
    };
    let count = |v: &str| v.parse::<u32>().ok();
    let usd = |v: &str| MicroUsd::parse_usd(v).ok();
    let change = (|| {
        Ok::<_, String>(OverrideChange {
            max_in_flight: field(&form, "in_flight", count)?,
            jobs_per_minute: field(&form, "jobs_per_minute", count)?,
            daily: field(&form, "daily_usd", usd)?,
            monthly: field(&form, "monthly_usd", usd)?,
        })
    })();
    let change = match change {
        Ok(c) => c,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let now = match c
        .src
        .store
        .change_org_overrides(id.as_uuid(), &change)
        .await
    {
        Ok(n) => n,
        Err(e) => return failed("saving the limits", e),
    };
    audit(
        &c,
        &s,
        "console.org.set_limits",
        Some(id.as_uuid()),
        serde_json::json!({
            "max_in_flight": now.max_in_flight,
            "jobs_per_minute": now.jobs_per_minute,
            "daily_micros": now.daily.map(MicroUsd::micros),
            "monthly_micros": now.monthly.map(MicroUsd::micros),
        }),
    )
    .await;
    done(&format!("/console/orgs/{id}"), "limits", 1)
}
