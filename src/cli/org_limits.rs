//! `aiq org set-limits` and `aiq org show`: an organisation's limits at run time. `set-limits`
//! writes its own limits over its tier's defaults to ai_cost_limits, and every running process
//! follows within about 2 s (`crate::limits`); `show` prints the limits in force (the tier's default against the
//! organisation's own) and what it uses of them now.

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use super::{print_json, process_env, shown};
use crate::config::{self, QueueSettings};
use crate::domain::{MicroUsd, OrganizationId, Tier};
use crate::store::{MAX_OVERRIDE_USD, OrgOverrides, OverrideChange};

/// The most jobs in flight one organisation can be given.
const MAX_IN_FLIGHT: i64 = 1_000_000;
/// The most jobs per minute one organisation can be given.
const MAX_JOBS_PER_MINUTE: i64 = 1_000_000_000;

#[derive(Debug, Subcommand)]
pub(crate) enum LimitsAction {
    /// Set or clear an organisation's own limits, over its tier's defaults (stored in
    /// PostgreSQL; every running process follows within about 2 s).
    SetLimits(SetLimitsArgs),
    /// The limits in force for an organisation (tier default, its own) and its use now: jobs in
    /// flight across the fleet, jobs this minute, spent today and this month.
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct SetLimitsArgs {
    /// The organisation, a lower-case UUID.
    #[arg(value_parser = parse_org)]
    org: OrganizationId,
    /// The most of its jobs leased at once across all processes (a job makes at most one call
    /// at a time, so this caps its calls in flight); 0: no limit.
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(0..=MAX_IN_FLIGHT))]
    in_flight: Option<u32>,
    /// Its jobs per minute across all processes; 0: no limit.
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(0..=MAX_JOBS_PER_MINUTE))]
    jobs_per_minute: Option<u32>,
    /// Its daily spending limit in USD (0 pauses its paid calls).
    #[arg(long, value_name = "USD", allow_negative_numbers = true, value_parser = parse_usd)]
    daily_usd: Option<MicroUsd>,
    /// Its monthly spending limit in USD (0 pauses its paid calls).
    #[arg(long, value_name = "USD", allow_negative_numbers = true, value_parser = parse_usd)]
    monthly_usd: Option<MicroUsd>,
    /// Give a limit back to the tier's default (repeat for more than one).
    #[arg(long, value_enum, value_name = "FIELD")]
    clear: Vec<Field>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// The organisation, a lower-case UUID.
    #[arg(value_parser = parse_org)]
    org: OrganizationId,
    /// Its tier, for the defaults (default: the tier of its latest cost, else trial).
    #[arg(long)]
    tier: Option<Tier>,
    /// One JSON object instead of a table (amounts in integer micro-USD).
    #[arg(long)]
    json: bool,
}

/// A limit `--clear` gives back to the tier's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Field {
    InFlight,
    JobsPerMinute,
    DailyUsd,
    MonthlyUsd,
}

/// An organisation as the queue writes it: a UUID in lower case with hyphens.
fn parse_org(s: &str) -> Result<OrganizationId, String> {
    match OrganizationId::parse(s) {
        Ok(org) if org.to_string() == s => Ok(org),
        _ => Err(format!(
            "{} is not an organisation id: it must be a lower-case UUID such as 0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d",
            shown(s)
        )),
    }
}

fn parse_usd(s: &str) -> Result<MicroUsd, String> {
    let usd = MicroUsd::parse_usd(s).map_err(|e| e.to_string())?;
    if usd > MAX_OVERRIDE_USD {
        return Err(format!(
            "{} is more than the most a limit can be, {MAX_OVERRIDE_USD}",
            shown(s)
        ));
    }
    Ok(usd)
}

/// The change the arguments ask for; refused when they ask for none, or set and clear one
/// limit at once.
fn change_of(a: &SetLimitsArgs) -> anyhow::Result<OverrideChange> {
    fn one<T>(set: Option<T>, clear: bool, name: &str) -> anyhow::Result<Option<Option<T>>> {
        match (set, clear) {
            (Some(_), true) => anyhow::bail!("--{name} and --clear {name} contradict each other"),
            (Some(v), false) => Ok(Some(Some(v))),
            (None, true) => Ok(Some(None)),
            (None, false) => Ok(None),
        }
    }
    let clears = |f: Field| a.clear.contains(&f);
    let change = OverrideChange {
        max_in_flight: one(a.in_flight, clears(Field::InFlight), "in-flight")?,
        jobs_per_minute: one(
            a.jobs_per_minute,
            clears(Field::JobsPerMinute),
            "jobs-per-minute",
        )?,
        daily: one(a.daily_usd, clears(Field::DailyUsd), "daily-usd")?,
        monthly: one(a.monthly_usd, clears(Field::MonthlyUsd), "monthly-usd")?,
    };
    if change == OverrideChange::default() {
        anyhow::bail!(
            "nothing to change: give --in-flight, --jobs-per-minute, --daily-usd, --monthly-usd or --clear"
        );
    }
    Ok(change)
}

async fn store_env() -> anyhow::Result<crate::store::Store> {
    let db = config::DatabaseSettings::load(&process_env())?;
    crate::store::Store::connect(&db, 2, Duration::from_secs(10))
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")
}

pub(super) async fn limits(action: LimitsAction) -> anyhow::Result<()> {
    match action {
        LimitsAction::SetLimits(args) => set_limits(args).await,
        LimitsAction::Show(args) => show(args).await,
    }
}

async fn set_limits(args: SetLimitsArgs) -> anyhow::Result<()> {
    let change = change_of(&args)?;
    let store = store_env().await?;
    let now = store
        .change_org_overrides(args.org.as_uuid(), &change)
        .await?;
    let count = |n: Option<u32>| match n {
        None => "tier default".to_owned(),
        Some(0) => "no limit".to_owned(),
        Some(n) => n.to_string(),
    };
    let usd = |n: Option<MicroUsd>| n.map_or("tier default".to_owned(), |d| d.to_string());
    println!(
        "organization {}: in flight {}, jobs per minute {}, daily {}, monthly {} (running daemons follow within about 2 s)",
        args.org,
        count(now.max_in_flight),
        count(now.jobs_per_minute),
        usd(now.daily),
        usd(now.monthly)
    );
    Ok(())
}

/// One limit: the tier's default, the organisation's own, the one in force.
#[derive(Debug, serde::Serialize)]
struct Limit<T> {
    tier_default: T,
    #[serde(rename = "override")]
    own: Option<T>,
    in_force: T,
}

fn limit<T: Copy>(tier_default: T, own: Option<T>) -> Limit<T> {
    Limit {
        tier_default,
        own,
        in_force: own.unwrap_or(tier_default),
    }
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let env = process_env();
    let queue_settings = QueueSettings::load(&env)?;
    let budget_settings = config::BudgetSettings::load(&env)?;
    let store = store_env().await?;
    let org = args.org.as_uuid();
    let tier = match args.tier {
        Some(t) => t,
        None => match store.org_tiers().await?.get(&org) {
            Some(t) => t.parse().unwrap_or(Tier::Trial),
            None => Tier::Trial,
        },
    };
    let own: OrgOverrides = store.org_overrides(org).await?;
    let queue = crate::queue::Queue::connect(&queue_settings)
        .await
        .context("connecting to Redis (AIQ_REDIS_URL)")?;
    let budget = crate::budget::Budget::connect(&queue_settings.redis, &budget_settings)
        .await
        .context("connecting to Redis (AIQ_REDIS_URL)")?;
    let in_flight = limit(
        queue_settings.org_max_in_flight[tier.index()],
        own.max_in_flight,
    );
    let per_minute = limit(
        budget_settings.org_jobs_per_minute[tier.index()],
        own.jobs_per_minute,
    );
    let defaults = budget.tier_limits(tier);
    let daily = limit(defaults.daily, own.daily);
    let monthly = limit(defaults.monthly, own.monthly);
    let (leased, fleet_cap) = queue.org_in_flight(&args.org).await?;
    let this_minute = budget.jobs_this_minute(org).await?;
    let limits = crate::budget::OrgLimits {
        daily: daily.in_force,
        monthly: monthly.in_force,
    };
    let (scopes, _) = budget.scopes(org, limits, budget.now());
    let states = budget.state(&scopes).await?;
    let of = |kind: crate::budget::WindowKind| {
        states
            .iter()
            .find(|s| s.owner != "global" && s.window_kind == kind)
            .map(|s| (s.spent, s.reserved))
            .unwrap_or_default()
    };
    let (spent_today, held_today) = of(crate::budget::WindowKind::Day);
    let (spent_month, held_month) = of(crate::budget::WindowKind::Month);
    if args.json {
        let usd = |l: &Limit<MicroUsd>| {
            serde_json::json!({
                "tier_default": l.tier_default.micros(),
                "override": l.own.map(MicroUsd::micros),
                "in_force": l.in_force.micros(),
            })
        };
        return print_json(
            &serde_json::json!({
                "organization_id": args.org,
                "tier": tier.as_str(),
                "limits": {
                    "in_flight": in_flight,
                    "jobs_per_minute": per_minute,
                    "daily_usd": usd(&daily),
                    "monthly_usd": usd(&monthly),
                },
                // What the queue holds for it now: None until a daemon wrote the override.
                "queue_cap": fleet_cap,
                "use": {
                    "in_flight": leased,
                    "jobs_this_minute": this_minute,
                    "spent_today": spent_today.micros(),
                    "held_today": held_today.micros(),
                    "spent_this_month": spent_month.micros(),
                    "held_this_month": held_month.micros(),
                },
            }),
            false,
        );
    }
    use crate::limits::{
        shown_count as count, shown_own_count as own_count, shown_own_usd as own_usd,
    };
    println!("organization {} ({})", args.org, tier.as_str());
    println!(
        "{:<16} {:>14} {:>14} {:>14}  use now",
        "limit", "tier default", "override", "in force"
    );
    println!(
        "{:<16} {:>14} {:>14} {:>14}  {leased} leased across the fleet",
        "jobs in flight",
        count(in_flight.tier_default),
        own_count(in_flight.own),
        count(in_flight.in_force),
    );
    println!(
        "{:<16} {:>14} {:>14} {:>14}  {this_minute} this minute",
        "jobs per minute",
        count(per_minute.tier_default),
        own_count(per_minute.own),
        count(per_minute.in_force),
    );
    for (name, l, spent, held, when) in [
        ("daily USD", &daily, spent_today, held_today, "today"),
        (
            "monthly USD",
            &monthly,
            spent_month,
            held_month,
            "this month",
        ),
    ] {
        println!(
            "{:<16} {:>14} {:>14} {:>14}  {spent} spent {when}, {held} held",
            name,
            l.tier_default.to_string(),
            own_usd(l.own),
            l.in_force.to_string(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        action: LimitsAction,
    }

    fn parse(args: &[&str]) -> Result<LimitsAction, String> {
        Cli::try_parse_from(std::iter::once("org").chain(args.iter().copied()))
            .map(|c| c.action)
            .map_err(|e| e.to_string())
    }

    const ORG: &str = "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d";

    #[test]
    fn set_limits_refuses_malformed_organisations_and_numbers_with_the_reason() {
        for (args, says) in [
            (
                vec![
                    "set-limits",
                    "0B6F1B3E-2A55-4A6E-9A43-2F6F6F1B2C3D",
                    "--in-flight",
                    "2",
                ],
                "lower-case UUID",
            ),
            (
                vec!["set-limits", "acme", "--in-flight", "2"],
                "lower-case UUID",
            ),
            (vec!["set-limits", ORG, "--in-flight", "-1"], "-1"),
            (vec!["set-limits", ORG, "--in-flight", "1000001"], "1000001"),
            (vec!["set-limits", ORG, "--in-flight", "2.5"], "2.5"),
            (
                vec!["set-limits", ORG, "--jobs-per-minute", "99999999999"],
                "99999999999",
            ),
            (vec!["set-limits", ORG, "--daily-usd", "-5"], "-5"),
            (vec!["set-limits", ORG, "--monthly-usd", "1e9"], "1e9"),
            (
                vec!["set-limits", ORG, "--monthly-usd", "1000000"],
                "the most a limit can be",
            ),
            (
                vec!["set-limits", ORG, "--clear", "everything"],
                "everything",
            ),
        ] {
            let err = parse(&args).expect_err(&format!("{args:?} is refused"));
            assert!(err.contains(says), "{args:?}: {err}");
        }
    }

    #[test]
    fn set_limits_asks_for_a_change_and_refuses_to_set_and_clear_one_limit() {
        let change = |args: &[&str]| match parse(args).expect("parses") {
            LimitsAction::SetLimits(a) => change_of(&a).map_err(|e| e.to_string()),
            LimitsAction::Show(_) => unreachable!(),
        };
        assert!(
            change(&["set-limits", ORG])
                .unwrap_err()
                .contains("nothing to change")
        );
        assert!(
            change(&[
                "set-limits",
                ORG,
                "--in-flight",
                "2",
                "--clear",
                "in-flight"
            ])
            .unwrap_err()
            .contains("contradict")
        );
        assert_eq!(
            change(&[
                "set-limits",
                ORG,
                "--in-flight",
                "0",
                "--clear",
                "daily-usd",
                "--monthly-usd",
                "12.5"
            ])
            .unwrap(),
            OverrideChange {
                max_in_flight: Some(Some(0)),
                jobs_per_minute: None,
                daily: Some(None),
                monthly: Some(Some(MicroUsd::from_micros(12_500_000))),
            }
        );
    }
}
