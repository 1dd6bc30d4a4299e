//! The domain's small types. Each is built only through `parse`/`TryFrom`, so a value that exists
//! is a valid one: a `Tier` is one of the six, an `OrganizationId` is a UUID, money is integer
//! micro-USD. `Tier` and `OrganizationId` are the queue's (it orders by them) and re-exported
//! from `aiq_queue::tenant`; `JobKind` stays here, and the queue stores its name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use aiq_queue::tenant::{InvalidOrganizationId, OrganizationId, Tier, UnknownTier};

/// Money as an integer count of millionths of a US dollar. No floating point touches a price.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct MicroUsd(i64);

impl MicroUsd {
    pub const ZERO: MicroUsd = MicroUsd(0);

    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    pub fn micros(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: MicroUsd) -> Option<MicroUsd> {
        self.0.checked_add(other.0).map(MicroUsd)
    }

    /// Dollars, for display only.
    pub fn as_usd_f64(self) -> f64 {
        self.0 as f64 / 1_000_000.0
    }

    /// Parses a non-negative dollar amount with at most six decimals, e.g. "1000" or "0.25",
    /// exactly (no floating point).
    pub fn parse_usd(s: &str) -> Result<Self, InvalidUsd> {
        let bad = || InvalidUsd(s.to_owned());
        let t = s.trim().trim_start_matches('$');
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        if whole.is_empty() && frac.is_empty()
            || frac.len() > 6
            || !whole.chars().all(|c| c.is_ascii_digit())
            || !frac.chars().all(|c| c.is_ascii_digit())
        {
            return Err(bad());
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let frac: i64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
        whole
            .checked_mul(1_000_000)
            .and_then(|w| w.checked_add(frac))
            .map(MicroUsd)
            .ok_or_else(bad)
    }

    pub fn saturating_sub(self, other: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_sub(other.0))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a dollar amount like 1000 or 0.25 (at most six decimals)")]
pub struct InvalidUsd(pub String);

impl std::iter::Sum for MicroUsd {
    fn sum<I: Iterator<Item = MicroUsd>>(iter: I) -> Self {
        MicroUsd(iter.map(|m| m.0).sum())
    }
}

impl fmt::Display for MicroUsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}${}.{:06}", abs / 1_000_000, abs % 1_000_000)
    }
}

impl MicroUsd {
    /// Dollars as a plain decimal string with six places, e.g. `0.000123` (the outcome
    /// contract's `cost_usd`).
    pub fn decimal(self) -> String {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
    }
}

/// What a job that succeeded cost and took: the `result` of its `succeeded` event and outcome
/// and of its status (jobs/README.md, "Outcomes"). Tokens for LLM jobs, units for Vision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultSummary {
    pub provider: String,
    pub model: Option<String>,
    pub cost_usd: String,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub units: Option<i64>,
    pub duration_ms: i64,
}

impl ResultSummary {
    /// The summary as the JSON text the queue stores.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "null".to_owned())
    }
}

/// The kinds of job aiq runs. The wire names are part of the cross-language contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    #[serde(rename = "vision.annotate")]
    VisionAnnotate,
    #[serde(rename = "llm.complete")]
    LlmComplete,
}

impl JobKind {
    pub const ALL: [JobKind; 2] = [JobKind::VisionAnnotate, JobKind::LlmComplete];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::VisionAnnotate => "vision.annotate",
            JobKind::LlmComplete => "llm.complete",
        }
    }
}

/// The kind's wire name, which the queue stores ([`crate::queue::NewJob`]).
impl AsRef<str> for JobKind {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown job kind {0:?}: expected vision.annotate or llm.complete")]
pub struct UnknownJobKind(pub String);

impl FromStr for JobKind {
    type Err = UnknownJobKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownJobKind(s.to_owned()))
    }
}

/// A provider aiq calls: a closed list, so a provider's name is spelled once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    GoogleVision,
    OpenAi,
    Anthropic,
    Gemini,
}

impl Provider {
    /// Every provider, in the order of [`PROVIDERS`] and of the per-provider settings.
    pub const ALL: [Provider; 4] = [
        Provider::GoogleVision,
        Provider::OpenAi,
        Provider::Anthropic,
        Provider::Gemini,
    ];

    /// The name rows, metrics, breakers and payloads use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Provider::GoogleVision => "google_vision",
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }

    /// Position in [`Provider::ALL`], the index of the per-provider settings' arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The provider of this name, if aiq calls one.
    pub fn parse(name: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The providers aiq calls, by the names their rows, metrics and breakers use; per-provider
/// settings (`AIQ_PROVIDER_RPM`, `AIQ_PROVIDER_TPM`) are indexed in this order.
pub const PROVIDERS: [&str; 4] = [
    Provider::GoogleVision.as_str(),
    Provider::OpenAi.as_str(),
    Provider::Anthropic.as_str(),
    Provider::Gemini.as_str(),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_provider_round_trips_through_its_name_at_its_settings_index() {
        for (i, p) in Provider::ALL.into_iter().enumerate() {
            assert_eq!(p.index(), i);
            assert_eq!(PROVIDERS[i], p.as_str());
            assert_eq!(Provider::parse(p.as_str()), Some(p));
        }
        assert_eq!(Provider::parse("aiq"), None);
    }

    #[test]
    fn micro_usd_prints_as_dollars_with_six_decimals() {
        assert_eq!(MicroUsd::from_micros(1_500).to_string(), "$0.001500");
        assert_eq!(MicroUsd::from_micros(12_345_678).to_string(), "$12.345678");
        assert_eq!(MicroUsd::from_micros(-5).to_string(), "-$0.000005");
    }

    #[test]
    fn dollar_amounts_parse_exactly() {
        assert_eq!(MicroUsd::parse_usd("1000").unwrap().micros(), 1_000_000_000);
        assert_eq!(MicroUsd::parse_usd("0.25").unwrap().micros(), 250_000);
        assert_eq!(
            MicroUsd::parse_usd("$1.000001").unwrap().micros(),
            1_000_001
        );
        assert_eq!(MicroUsd::parse_usd(".5").unwrap().micros(), 500_000);
        for bad in ["", "-1", "1.0000001", "abc", "1e3", "1.2.3", "."] {
            assert!(MicroUsd::parse_usd(bad).is_err(), "{bad}");
        }
    }
}
