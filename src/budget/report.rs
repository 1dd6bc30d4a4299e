//! Spend reports for operators: `aiq costs` (spend per organisation, provider and day, and when
//! each monthly budget runs out at the current rate) and `aiq budget show|rebuild`.

use std::collections::BTreeMap;

use chrono::{Datelike, NaiveDate};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::MicroUsd;

/// When a monthly budget runs out at the recent daily rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Forecast {
    pub organization_id: Option<Uuid>,
    pub monthly_limit: MicroUsd,
    pub month_to_date: MicroUsd,
    /// Average daily spend over the last seven days (or the month's days so far, if fewer).
    pub daily_rate: MicroUsd,
    /// The day the limit is reached at that rate; None when it is not reached this month.
    pub runs_out_on: Option<NaiveDate>,
    pub exhausted: bool,
}

/// Forecasts from the spend of the last days. `by_day` holds the spend per day up to and
/// including `today` (missing days spent nothing).
pub fn forecast(
    organization_id: Option<Uuid>,
    monthly_limit: MicroUsd,
    by_day: &BTreeMap<NaiveDate, MicroUsd>,
    today: NaiveDate,
) -> Forecast {
    let month_start = today.with_day(1).expect("day 1 exists");
    let month_to_date: MicroUsd = by_day.range(month_start..=today).map(|(_, c)| *c).sum();
    let window_days = (today.day() as i64).clamp(1, 7);
    let from = today - chrono::Days::new(window_days as u64 - 1);
    let recent: MicroUsd = by_day.range(from..=today).map(|(_, c)| *c).sum();
    let daily_rate = MicroUsd::from_micros(recent.micros() / window_days);
    let exhausted = month_to_date >= monthly_limit;
    let runs_out_on = if exhausted {
        Some(today)
    } else if daily_rate.micros() > 0 {
        let left = monthly_limit.micros() - month_to_date.micros();
        let days = (left + daily_rate.micros() - 1) / daily_rate.micros();
        // A tiny rate against a large limit lasts past any date chrono can hold: not this month.
        today
            .checked_add_days(chrono::Days::new(days.max(0) as u64))
            .filter(|day| day.month() == today.month() && day.year() == today.year())
    } else {
        None
    };
    Forecast {
        organization_id,
        monthly_limit,
        month_to_date,
        daily_rate,
        runs_out_on,
        exhausted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn a_steady_rate_runs_out_on_the_day_the_limit_is_passed() {
        // $10 a day for the 7 days to the 10th; $100 spent this month; limit $200.
        let mut by_day = BTreeMap::new();
        for day in 1..=10 {
            by_day.insert(
                d(&format!("2026-11-{day:02}")),
                MicroUsd::from_micros(10_000_000),
            );
        }
        let f = forecast(
            None,
            MicroUsd::from_micros(200_000_000),
            &by_day,
            d("2026-11-10"),
        );
        assert_eq!(f.month_to_date.micros(), 100_000_000);
        assert_eq!(f.daily_rate.micros(), 10_000_000);
        assert_eq!(f.runs_out_on, Some(d("2026-11-20")));
        assert!(!f.exhausted);
        // At that rate a $1,000 limit lasts past the month.
        let f = forecast(
            None,
            MicroUsd::from_micros(1_000_000_000),
            &by_day,
            d("2026-11-10"),
        );
        assert_eq!(f.runs_out_on, None);
        // Spent out already.
        let f = forecast(
            None,
            MicroUsd::from_micros(50_000_000),
            &by_day,
            d("2026-11-10"),
        );
        assert!(f.exhausted);
        assert_eq!(f.runs_out_on, Some(d("2026-11-10")));
    }

    #[test]
    fn a_few_micro_dollars_against_a_large_limit_never_run_out_and_do_not_panic() {
        // $0.000005 spent today against $100,000 a month: 2e10 days at that rate.
        let by_day = BTreeMap::from([(d("2026-11-10"), MicroUsd::from_micros(5))]);
        let f = forecast(
            None,
            MicroUsd::from_micros(100_000_000_000),
            &by_day,
            d("2026-11-10"),
        );
        assert_eq!(f.runs_out_on, None);
        assert!(!f.exhausted);
    }

    #[test]
    fn early_in_a_month_the_rate_uses_the_days_so_far() {
        let by_day = BTreeMap::from([
            (d("2026-11-01"), MicroUsd::from_micros(30_000_000)),
            (d("2026-10-31"), MicroUsd::from_micros(999_000_000)),
        ]);
        let f = forecast(
            None,
            MicroUsd::from_micros(300_000_000),
            &by_day,
            d("2026-11-01"),
        );
        assert_eq!(
            f.month_to_date.micros(),
            30_000_000,
            "last month's spend does not count"
        );
        assert_eq!(f.daily_rate.micros(), 30_000_000);
        assert_eq!(f.runs_out_on, Some(d("2026-11-10")));
    }
}
