//! `aiq costs` and `aiq budget`: spend, forecasts, holds and limits.

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use super::{print_json, process_env, shown};
use crate::config::{self, QueueSettings};
use crate::domain::Tier;

#[derive(Debug, Subcommand)]
pub(super) enum BudgetAction {
    /// An organisation's spend, holds and limits in today's and this month's windows, with the
    /// platform's.
    Show {
        org: uuid::Uuid,
        /// The organisation's tier, for its default limits (default: the tier of its latest cost).
        #[arg(long)]
        tier: Option<String>,
    },
    /// Set (or clear) an organisation's limit overrides in ai_cost_limits.
    SetLimit {
        org: uuid::Uuid,
        /// Daily limit in USD; omit to keep the tier default.
        #[arg(long)]
        daily_usd: Option<String>,
        /// Monthly limit in USD; omit to keep the tier default.
        #[arg(long)]
        monthly_usd: Option<String>,
    },
    /// Recompute the Redis counters of today and this month from ai_cost_tracking (after Redis
    /// lost its data). Holds of calls still running are kept.
    Rebuild,
}

/// The database and the budget settings, which the money commands need without a full daemon
/// configuration.
async fn money_env() -> anyhow::Result<(crate::store::Store, crate::config::BudgetSettings)> {
    let env = process_env();
    let db = config::DatabaseSettings::load(&env)?;
    let budget = config::BudgetSettings::load(&env)?;
    let store = crate::store::Store::connect(&db, 2, Duration::from_secs(10))
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")?;
    Ok((store, budget))
}

async fn org_monthly_limit(
    store: &crate::store::Store,
    settings: &crate::config::BudgetSettings,
    org: uuid::Uuid,
    tier: Option<&str>,
) -> anyhow::Result<(crate::domain::MicroUsd, crate::domain::MicroUsd, String)> {
    let tier = match tier {
        Some(t) => t.to_owned(),
        None => store
            .org_tiers()
            .await?
            .get(&org)
            .cloned()
            .unwrap_or_else(|| "trial".into()),
    };
    let t: Tier = tier.parse()?;
    let (daily, monthly) = store.org_limit_overrides(org).await?;
    Ok((
        daily.unwrap_or(settings.org_daily[t.index()]),
        monthly.unwrap_or(settings.org_monthly[t.index()]),
        tier,
    ))
}

pub(super) async fn costs(org: Option<uuid::Uuid>, days: i32, json: bool) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    let (store, settings) = money_env().await?;
    let rows = store.spend_by_day(org, days.max(1)).await?;
    let (_, _, today) = crate::budget::windows_at(chrono::Utc::now(), settings.timezone);
    // Per organisation and day, for the forecasts; the platform as a whole too.
    let mut by_org: BTreeMap<
        Option<uuid::Uuid>,
        BTreeMap<chrono::NaiveDate, crate::domain::MicroUsd>,
    > = BTreeMap::new();
    let mut platform: BTreeMap<chrono::NaiveDate, crate::domain::MicroUsd> = BTreeMap::new();
    for r in &rows {
        for map in [by_org.entry(r.organization_id).or_default(), &mut platform] {
            let e = map.entry(r.day).or_default();
            *e = e.checked_add(r.cost).unwrap_or(*e);
        }
    }
    let mut forecasts = Vec::new();
    for (o, days_spend) in &by_org {
        if let Some(o) = o {
            let (_, monthly, _) = org_monthly_limit(&store, &settings, *o, None).await?;
            forecasts.push(crate::budget::report::forecast(
                Some(*o),
                monthly,
                days_spend,
                today,
            ));
        }
    }
    if org.is_none() {
        forecasts.push(crate::budget::report::forecast(
            None,
            settings.global_monthly,
            &platform,
            today,
        ));
    }
    if json {
        print_json(
            &serde_json::json!({ "days": days, "spend": rows, "forecasts": forecasts }),
            false,
        )?;
        return Ok(());
    }
    println!(
        "{:<10} {:<38} {:<15} {:>9} {:>16}",
        "day", "organization", "provider", "requests", "cost"
    );
    for r in &rows {
        let o = r.organization_id.map_or("-".to_owned(), |o| o.to_string());
        println!(
            "{:<10} {:<38} {:<15} {:>9} {:>16}",
            r.day,
            o,
            shown(&r.provider),
            r.requests,
            r.cost.to_string()
        );
    }
    println!();
    println!(
        "{:<38} {:>14} {:>14} {:>14}  runs out",
        "monthly budget", "limit", "this month", "per day"
    );
    for f in &forecasts {
        let who = f
            .organization_id
            .map_or("platform".to_owned(), |o| o.to_string());
        let when = match (f.exhausted, f.runs_out_on) {
            (true, _) => "spent out".to_owned(),
            (false, Some(d)) => d.to_string(),
            (false, None) => "not this month at this rate".to_owned(),
        };
        println!(
            "{:<38} {:>14} {:>14} {:>14}  {when}",
            who,
            f.monthly_limit.to_string(),
            f.month_to_date.to_string(),
            f.daily_rate.to_string()
        );
    }
    Ok(())
}

pub(super) async fn budget(action: BudgetAction) -> anyhow::Result<()> {
    let (store, settings) = money_env().await?;
    match action {
        BudgetAction::SetLimit {
            org,
            daily_usd,
            monthly_usd,
        } => {
            let parse = |v: Option<String>| {
                v.map(|v| crate::domain::MicroUsd::parse_usd(&v))
                    .transpose()
            };
            let (daily, monthly) = (parse(daily_usd)?, parse(monthly_usd)?);
            store.set_org_limits(org, daily, monthly).await?;
            println!(
                "organization {org}: daily {}, monthly {} (running daemons follow within 5 s)",
                daily.map_or("tier default".to_owned(), |d| d.to_string()),
                monthly.map_or("tier default".to_owned(), |m| m.to_string())
            );
            Ok(())
        }
        BudgetAction::Show { org, tier } => {
            let queue = QueueSettings::load(&process_env())?;
            let budget = crate::budget::Budget::connect(&queue.redis, &settings)
                .await
                .context("connecting to Redis (AIQ_REDIS_URL)")?;
            let (daily, monthly, tier) =
                org_monthly_limit(&store, &settings, org, tier.as_deref()).await?;
            let limits = crate::budget::OrgLimits { daily, monthly };
            let (scopes, _) = budget.scopes(org, limits, chrono::Utc::now());
            println!("organization {org} ({})", shown(&tier));
            println!(
                "{:<8} {:<12} {:<11} {:>14} {:>14} {:>14} {:>6}",
                "owner", "window", "", "spent", "held", "limit", "used"
            );
            for s in budget.state(&scopes).await? {
                let owner = if s.owner == "global" {
                    "platform"
                } else {
                    "org"
                };
                let used = if s.limit.micros() > 0 {
                    format!(
                        "{:.1}%",
                        s.spent.micros() as f64 * 100.0 / s.limit.micros() as f64
                    )
                } else {
                    "-".into()
                };
                println!(
                    "{:<8} {:<12} {:<11} {:>14} {:>14} {:>14} {:>6}",
                    owner,
                    shown(&s.window),
                    s.window_kind.as_str(),
                    s.spent.to_string(),
                    s.reserved.to_string(),
                    s.limit.to_string(),
                    used
                );
            }
            Ok(())
        }
        BudgetAction::Rebuild => {
            let queue = QueueSettings::load(&process_env())?;
            let budget = crate::budget::Budget::connect(&queue.redis, &settings)
                .await
                .context("connecting to Redis (AIQ_REDIS_URL)")?;
            let report = crate::budget::rebuild(&budget, &store).await?;
            println!("{}", shown(&report));
            Ok(())
        }
    }
}
