//! Money: the price catalog and the cost of a call. Prices are integer micro-USD; an unknown
//! model or feature is refused (fail closed), never priced at zero.
//!
//! The walking skeleton prices every Vision unit at the 1,001-5,000,000 rate, which never
//! under-counts; the monthly free units, the >5M rate, reservations and limits are the money
//! issue's work.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::domain::MicroUsd;

const BUILTIN_CATALOG: &str = include_str!("catalog.json");

#[derive(Debug, Clone, Deserialize)]
pub struct VisionFeaturePrice {
    pub per_1k: i64,
    pub per_1k_above_5m: i64,
    /// This feature is free when the named feature is in the same request.
    #[serde(default)]
    pub free_with: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionPrices {
    pub free_units_per_month: u64,
    pub tier2_from_units: u64,
    pub features: BTreeMap<String, VisionFeaturePrice>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct ModelPrice {
    pub input_per_1m: i64,
    pub cached_input_per_1m: i64,
    pub output_per_1m: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PriceCatalog {
    pub version: String,
    pub vision: VisionPrices,
    /// provider -> model -> price.
    pub llm: BTreeMap<String, BTreeMap<String, ModelPrice>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PriceError {
    #[error("no price for Vision feature {0:?}: refusing to run an unpriced call")]
    UnknownFeature(String),
    #[error("no price for model {provider}:{model}: refusing to run an unpriced call")]
    UnknownModel { provider: String, model: String },
    #[error("price catalog: {0}")]
    Catalog(String),
}

/// `units * price_per_batch / batch`, rounded up to the next micro-dollar so a cost is never
/// under-counted.
fn ceil_div_price(units: u64, price_per_batch: i64, batch: i64) -> MicroUsd {
    let n = units as i128 * price_per_batch as i128;
    let b = batch as i128;
    MicroUsd::from_micros(((n + b - 1) / b) as i64)
}

impl PriceCatalog {
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_CATALOG).expect("the built-in price catalog parses")
    }

    pub fn parse(json: &str) -> Result<Self, PriceError> {
        let c: PriceCatalog =
            serde_json::from_str(json).map_err(|e| PriceError::Catalog(e.to_string()))?;
        for (name, p) in &c.vision.features {
            if p.per_1k < 0 || p.per_1k_above_5m < 0 {
                return Err(PriceError::Catalog(format!("negative price for {name}")));
            }
        }
        Ok(c)
    }

    /// The cost of one Vision request: `images` billable images, each with every feature.
    pub fn vision_cost(&self, features: &[String], images: u32) -> Result<MicroUsd, PriceError> {
        let mut per_image_per_1k = 0i64;
        for f in features {
            let price = self
                .vision
                .features
                .get(f)
                .ok_or_else(|| PriceError::UnknownFeature(f.clone()))?;
            let free = price
                .free_with
                .as_ref()
                .is_some_and(|other| features.iter().any(|g| g == other));
            if !free {
                per_image_per_1k += price.per_1k;
            }
        }
        Ok(ceil_div_price(images as u64, per_image_per_1k, 1000))
    }

    /// Checks that every feature has a price, before any call is made.
    pub fn check_features(&self, features: &[String]) -> Result<(), PriceError> {
        self.vision_cost(features, 0).map(|_| ())
    }

    pub fn model_price(&self, provider: &str, model: &str) -> Result<ModelPrice, PriceError> {
        self.llm
            .get(provider)
            .and_then(|m| m.get(model))
            .copied()
            .ok_or_else(|| PriceError::UnknownModel {
                provider: provider.to_owned(),
                model: model.to_owned(),
            })
    }

    /// The cost of one LLM call from its usage. `prompt_tokens` includes `cached_tokens`.
    pub fn llm_cost(
        &self,
        provider: &str,
        model: &str,
        prompt_tokens: u64,
        cached_tokens: u64,
        output_tokens: u64,
    ) -> Result<MicroUsd, PriceError> {
        let p = self.model_price(provider, model)?;
        let uncached = prompt_tokens.saturating_sub(cached_tokens) as i128;
        let total = uncached * p.input_per_1m as i128
            + cached_tokens as i128 * p.cached_input_per_1m as i128
            + output_tokens as i128 * p.output_per_1m as i128;
        Ok(MicroUsd::from_micros(
            ((total + 999_999) / 1_000_000) as i64,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vision_costs_follow_the_per_feature_price_and_free_pairs() {
        let c = PriceCatalog::builtin();
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // 1,000 images x label ($1.50) = $1.50.
        assert_eq!(
            c.vision_cost(&f(&["LABEL_DETECTION"]), 1000)
                .unwrap()
                .micros(),
            1_500_000
        );
        // Safe search is free with label detection; object localization is $2.25.
        assert_eq!(
            c.vision_cost(
                &f(&[
                    "LABEL_DETECTION",
                    "SAFE_SEARCH_DETECTION",
                    "OBJECT_LOCALIZATION"
                ]),
                800_000
            )
            .unwrap()
            .micros(),
            (1_500_000 + 2_250_000) * 800
        );
        // One image of label detection costs $0.0015.
        assert_eq!(
            c.vision_cost(&f(&["LABEL_DETECTION"]), 1).unwrap().micros(),
            1_500
        );
        assert!(matches!(
            c.vision_cost(&f(&["MIND_READING"]), 1),
            Err(PriceError::UnknownFeature(_))
        ));
    }

    #[test]
    fn llm_costs_follow_the_documented_formula_and_round_up() {
        let c = PriceCatalog::builtin();
        // gpt-4o-mini: 1,200 prompt of which 1,024 cached, 300 out:
        // 176 * 0.15 + 1024 * 0.075 + 300 * 0.60 = 26.4 + 76.8 + 180 = 283.2 micro-USD -> 284.
        assert_eq!(
            c.llm_cost("openai", "gpt-4o-mini", 1200, 1024, 300)
                .unwrap()
                .micros(),
            284
        );
        assert_eq!(
            c.llm_cost("openai", "gpt-4o", 1_000_000, 0, 0)
                .unwrap()
                .micros(),
            2_500_000
        );
        assert!(matches!(
            c.llm_cost("openai", "gpt-99", 1, 0, 1),
            Err(PriceError::UnknownModel { .. })
        ));
    }
}
