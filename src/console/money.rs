//! `GET /console/money`: spend per day and provider over 30 days as an inline SVG drawn here,
//! organisations by this month's spend (a page of 50) with the share of their own limits and a
//! month-end forecast, and the latest 50 alerts with whether they were delivered.

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::Datelike;

use super::html::esc;
use super::{Fields, PAGE, Shared, failed, html, viewer};
use crate::domain::MicroUsd;

const DAYS: i32 = 30;
const COLOURS: [&str; 6] = [
    "#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6",
];

/// The spend of `month` so far carried to the month's end at the same daily rate.
fn forecast(month: MicroUsd, today: chrono::NaiveDate) -> MicroUsd {
    let day = today.day() as i64;
    let next = if today.month() == 12 {
        chrono::NaiveDate::from_ymd_opt(today.year() + 1, 1, 1)
    } else {
        chrono::NaiveDate::from_ymd_opt(today.year(), today.month() + 1, 1)
    };
    let days_in = next.map_or(30, |n| n.pred_opt().map_or(30, |l| l.day() as i64));
    MicroUsd::from_micros(month.micros().saturating_mul(days_in) / day.max(1))
}

/// The share of the limit in force: the organisation's own, else its tier's default (0: none).
fn share(spent: MicroUsd, own: Option<MicroUsd>, default: MicroUsd) -> String {
    let (limit, whose) = match own {
        Some(l) => (l, "own"),
        None => (default, "tier default"),
    };
    if limit.micros() > 0 {
        format!(
            "{}% of {limit} ({whose})",
            spent.micros().saturating_mul(100) / limit.micros()
        )
    } else {
        format!("no limit ({whose})")
    }
}

/// Stacked bars, one per day, one colour per provider.
fn chart(rows: &[(chrono::NaiveDate, String, MicroUsd)], today: chrono::NaiveDate) -> String {
    let providers: Vec<&str> = {
        let mut p: Vec<&str> = rows.iter().map(|(_, p, _)| p.as_str()).collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    let mut per_day: BTreeMap<chrono::NaiveDate, Vec<(usize, i64)>> = BTreeMap::new();
    for (d, p, m) in rows {
        let i = providers.iter().position(|x| x == p).unwrap_or(0);
        per_day.entry(*d).or_default().push((i, m.micros()));
    }
    let top = per_day
        .values()
        .map(|v| v.iter().map(|(_, m)| *m).sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, h, bar) = (620, 200, 20);
    let mut svg = format!(
        r#"<svg id="spend-svg" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" role="img" aria-label="spend per day and provider, last {DAYS} days">"#,
        h + 40
    );
    for k in 0..DAYS {
        let day = today - chrono::Days::new((DAYS - 1 - k) as u64);
        let x = 10 + k * bar;
        let mut y = h;
        for (i, m) in per_day.get(&day).map(Vec::as_slice).unwrap_or(&[]) {
            let bh = (*m * h as i64 / top) as i32;
            y -= bh;
            let _ = write!(
                svg,
                r#"<rect x="{x}" y="{y}" width="{}" height="{bh}" fill="{}"><title>{day} {}: {}</title></rect>"#,
                bar - 4,
                COLOURS[*i % COLOURS.len()],
                esc(providers[*i]),
                MicroUsd::from_micros(*m)
            );
        }
    }
    let _ = write!(
        svg,
        r#"<text x="10" y="{}" font-size="11">{}</text><text x="{}" y="{}" font-size="11" text-anchor="end">{today}; top {}</text>"#,
        h + 15,
        today - chrono::Days::new((DAYS - 1) as u64),
        w - 10,
        h + 15,
        MicroUsd::from_micros(top)
    );
    for (i, p) in providers.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}" font-size="11">{}</text>"#,
            10 + i * 110,
            h + 25,
            COLOURS[i % COLOURS.len()],
            24 + i * 110,
            h + 34,
            esc(p)
        );
    }
    svg.push_str("</svg>");
    svg
}

pub async fn page(State(c): State<Shared>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let s = match viewer(&c, &headers) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let q = Fields::query(q.as_deref());
    let (cursor, orgs) = match super::org_spend_page(&c, &q).await {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let today = chrono::Utc::now().date_naive();
    let days = match c.src.store.spend_per_provider_day(DAYS - 1).await {
        Ok(d) => d,
        Err(e) => return failed("reading the spend per day", e),
    };
    let alerts = match c.src.store.latest_alerts(PAGE as i64).await {
        Ok(a) => a,
        Err(e) => return failed("reading the alerts", e),
    };
    let mut b = format!(
        r#"<section id="spend-chart"><h2>Spend per day and provider, last {DAYS} days</h2>{}</section>"#,
        chart(&days, today)
    );
    b.push_str(r#"<section id="orgs-spend"><h2>Organisations this month</h2><table id="org-spend"><tr><th>organisation</th><th>tier</th><th>today</th><th>of its daily limit</th><th>this month</th><th>of its monthly limit</th><th>month-end forecast</th></tr>"#);
    for o in orgs.iter().take(PAGE) {
        // The tier of its latest cost row; its defaults hold where it has no limit of its own.
        let tier = o
            .tier
            .as_deref()
            .and_then(|t| t.parse::<crate::domain::Tier>().ok())
            .unwrap_or(crate::domain::Tier::Trial);
        let defaults = c.src.budget.tier_limits(tier);
        let _ = write!(
            b,
            r#"<tr data-org="{id}"><td><a href="/console/orgs/{id}">{id}</a></td><td>{}</td><td class="n">{}</td><td class="daily">{}</td><td class="n">{}</td><td class="monthly">{}</td><td class="n">{}</td></tr>"#,
            tier.as_str(),
            o.today,
            share(o.today, o.daily_limit, defaults.daily),
            o.month,
            share(o.month, o.monthly_limit, defaults.monthly),
            forecast(o.month, today),
            id = o.organization_id,
        );
    }
    b.push_str("</table>");
    if orgs.len() > PAGE {
        let _ = write!(
            b,
            r#"<a id="next" href="/console/money?cursor={}">next</a>"#,
            cursor + PAGE as i64
        );
    }
    b.push_str(r#"</section><section id="alerts-list"><h2>Alerts</h2><table id="alerts"><tr><th>raised</th><th>scope</th><th>threshold</th><th>message</th><th>delivered</th></tr>"#);
    for a in &alerts {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            a.created_at.format("%Y-%m-%d %H:%M UTC"),
            esc(&a.scope),
            esc(&a.threshold),
            esc(&a.message),
            match a.delivered_at {
                Some(d) => d.format("%Y-%m-%d %H:%M UTC").to_string(),
                None => format!("not yet ({} tries)", a.delivery_attempts),
            }
        );
    }
    b.push_str("</table></section>");
    html(StatusCode::OK, super::html::page("Money", &s, None, &b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_is_of_the_limit_in_force_the_organisations_own_or_its_tiers_default() {
        let usd = MicroUsd::from_micros;
        assert_eq!(
            share(usd(2_500_000), None, usd(10_000_000)),
            format!("25% of {} (tier default)", usd(10_000_000))
        );
        assert_eq!(
            share(usd(2_500_000), Some(usd(5_000_000)), usd(10_000_000)),
            format!("50% of {} (own)", usd(5_000_000))
        );
        assert_eq!(share(usd(1), None, usd(0)), "no limit (tier default)");
        assert_eq!(share(usd(1), Some(usd(0)), usd(9)), "no limit (own)");
        // No overflow on a spend far past the limit.
        assert!(share(usd(i64::MAX), None, usd(1)).starts_with("9223372036854775807% of"));
    }

    #[test]
    fn the_forecast_carries_the_daily_rate_to_the_months_end() {
        let d = chrono::NaiveDate::from_ymd_opt(2026, 2, 7).unwrap();
        assert_eq!(forecast(MicroUsd::from_micros(7_000), d).micros(), 28_000);
        let d = chrono::NaiveDate::from_ymd_opt(2026, 12, 10).unwrap();
        assert_eq!(forecast(MicroUsd::from_micros(10_000), d).micros(), 31_000);
    }
}
