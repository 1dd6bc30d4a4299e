//! The price catalog: what a call costs. Prices are integer micro-USD; an unknown model or feature
//! is refused (fail closed), never priced at zero. The catalog is a versioned JSON file: the
//! built-in one (`catalog.json`) or the one `AIQ_PRICE_CATALOG` names, loaded once at start.
//!
//! Two prices per call: the *estimate* reserved before the call (the most it can cost: every
//! Vision unit at the highest rate, every LLM output token up to max_tokens) and the *actual* cost
//! settled after it (Vision units at their marginal tier, given the month's units so far, the
//! first 1,000 of each feature free; LLM usage from the response).

use std::collections::BTreeMap;
use std::path::Path;

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
    /// The most output tokens one call may ask for (the model's published output limit): a job
    /// whose `max_tokens` is above it is refused at decode, since the provider would refuse the
    /// call and the reservation would be priced for tokens that can never come.
    pub max_output_tokens: u32,
    /// The rates of a call whose prompt is above a threshold (Gemini 2.5 Pro and Claude Sonnet
    /// above 200,000 tokens): they then apply to the whole call, input, cached input and output.
    #[serde(default)]
    pub long_context: Option<LongContextPrice>,
}

/// A model's long-context rates, per 1,000,000 tokens like the base ones.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct LongContextPrice {
    /// The rates apply when the prompt (cached tokens included) has more tokens than this.
    pub above_prompt_tokens: u64,
    pub input_per_1m: i64,
    pub cached_input_per_1m: i64,
    pub output_per_1m: i64,
}

impl ModelPrice {
    /// (input, cached input, output) per 1,000,000 tokens for a call with this many prompt
    /// tokens.
    pub fn rates_for(&self, prompt_tokens: u64) -> (i64, i64, i64) {
        match self.long_context {
            Some(l) if prompt_tokens > l.above_prompt_tokens => {
                (l.input_per_1m, l.cached_input_per_1m, l.output_per_1m)
            }
            _ => (
                self.input_per_1m,
                self.cached_input_per_1m,
                self.output_per_1m,
            ),
        }
    }
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

    /// The catalog at `path`, or the built-in one.
    pub fn load(path: Option<&Path>) -> Result<Self, PriceError> {
        match path {
            None => Ok(Self::builtin()),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| PriceError::Catalog(format!("reading {}: {e}", p.display())))?;
                Self::parse(&text)
            }
        }
    }

    pub fn parse(json: &str) -> Result<Self, PriceError> {
        let c: PriceCatalog =
            serde_json::from_str(json).map_err(|e| PriceError::Catalog(e.to_string()))?;
        for (name, p) in &c.vision.features {
            if p.per_1k < 0 || p.per_1k_above_5m < 0 {
                return Err(PriceError::Catalog(format!("negative price for {name}")));
            }
        }
        for (provider, models) in &c.llm {
            for (model, p) in models {
                if p.max_output_tokens == 0 {
                    return Err(PriceError::Catalog(format!(
                        "max_output_tokens of {provider}:{model} must be at least 1"
                    )));
                }
                if [p.input_per_1m, p.cached_input_per_1m, p.output_per_1m]
                    .iter()
                    .any(|r| *r < 0)
                {
                    return Err(PriceError::Catalog(format!(
                        "negative price for {provider}:{model}"
                    )));
                }
                // An estimate prices the prompt's upper bound: it bounds the actual cost only
                // if more prompt tokens never cost less per token.
                if let Some(l) = p.long_context
                    && (l.input_per_1m < p.input_per_1m
                        || l.cached_input_per_1m < p.cached_input_per_1m
                        || l.output_per_1m < p.output_per_1m)
                {
                    return Err(PriceError::Catalog(format!(
                        "the long-context rates of {provider}:{model} must not be below its base rates"
                    )));
                }
            }
        }
        Ok(c)
    }

    /// The features of a request that are billed: those not free because of a companion feature
    /// in the same request (safe search with labels, crop hints with image properties).
    pub fn billed_features<'a>(&self, features: &'a [String]) -> Result<Vec<&'a str>, PriceError> {
        let mut billed = Vec::new();
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
            if !free && !billed.contains(&f.as_str()) {
                billed.push(f.as_str());
            }
        }
        Ok(billed)
    }

    /// The actual cost of `units` more units of `feature` when `before` units of it were already
    /// used this month: the first `free_units_per_month` are free, units up to 5,000,000 cost
    /// `per_1k`, later ones `per_1k_above_5m`. Rounded up to the micro-dollar.
    pub fn vision_feature_cost(
        &self,
        feature: &str,
        before: u64,
        units: u64,
    ) -> Result<MicroUsd, PriceError> {
        let price = self
            .vision
            .features
            .get(feature)
            .ok_or_else(|| PriceError::UnknownFeature(feature.to_owned()))?;
        let (start, end) = (before, before + units);
        // Units are numbered from 0; unit n is the (n+1)-th of the month.
        let in_range = |lo: u64, hi: u64| end.min(hi).saturating_sub(start.max(lo));
        let free_end = self.vision.free_units_per_month;
        let tier2_start = self.vision.tier2_from_units.saturating_sub(1).max(free_end);
        let tier1 = in_range(free_end, tier2_start) as i128;
        let tier2 = in_range(tier2_start, u64::MAX) as i128;
        let numerator = tier1 * price.per_1k as i128 + tier2 * price.per_1k_above_5m as i128;
        Ok(MicroUsd::from_micros(((numerator + 999) / 1000) as i64))
    }

    /// The most one Vision request can cost: `images` billable images, each with every billed
    /// feature at its highest rate (what the budget reserves).
    pub fn vision_estimate(
        &self,
        features: &[String],
        images: u32,
    ) -> Result<MicroUsd, PriceError> {
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

    /// The most one LLM call can cost: `input_tokens` (an upper bound) at the uncached input
    /// rate and all of `max_output_tokens` at the output rate, both at the long-context rates
    /// when the bound is above the model's threshold.
    pub fn llm_estimate(
        &self,
        provider: &str,
        model: &str,
        input_tokens: u64,
        max_output_tokens: u64,
    ) -> Result<MicroUsd, PriceError> {
        self.llm_cost(provider, model, input_tokens, 0, max_output_tokens)
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

    /// The most output tokens one call to the model may ask for.
    pub fn max_output_tokens(&self, provider: &str, model: &str) -> Result<u32, PriceError> {
        self.model_price(provider, model)
            .map(|p| p.max_output_tokens)
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
        let (input, cached_input, output) = p.rates_for(prompt_tokens);
        let uncached = prompt_tokens.saturating_sub(cached_tokens) as i128;
        let total = uncached * input as i128
            + cached_tokens as i128 * cached_input as i128
            + output_tokens as i128 * output as i128;
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
            c.vision_estimate(&f(&["LABEL_DETECTION"]), 1000)
                .unwrap()
                .micros(),
            1_500_000
        );
        // Safe search is free with label detection; object localization is $2.25.
        assert_eq!(
            c.vision_estimate(
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
            c.vision_estimate(&f(&["LABEL_DETECTION"]), 1)
                .unwrap()
                .micros(),
            1_500
        );
        assert!(matches!(
            c.vision_estimate(&f(&["MIND_READING"]), 1),
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

    #[test]
    fn billed_features_leave_out_the_free_companions() {
        let c = PriceCatalog::builtin();
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            c.billed_features(&f(&[
                "LABEL_DETECTION",
                "SAFE_SEARCH_DETECTION",
                "IMAGE_PROPERTIES",
                "CROP_HINTS"
            ]))
            .unwrap(),
            vec!["LABEL_DETECTION", "IMAGE_PROPERTIES"]
        );
        assert_eq!(
            c.billed_features(&f(&["SAFE_SEARCH_DETECTION"])).unwrap(),
            vec!["SAFE_SEARCH_DETECTION"]
        );
    }

    #[test]
    fn vision_actual_costs_follow_the_monthly_tiers_free_units_included() {
        let c = PriceCatalog::builtin();
        // The first 1,000 units of a feature each month are free.
        assert_eq!(
            c.vision_feature_cost("LABEL_DETECTION", 0, 1000)
                .unwrap()
                .micros(),
            0
        );
        assert_eq!(
            c.vision_feature_cost("LABEL_DETECTION", 999, 1)
                .unwrap()
                .micros(),
            0
        );
        // The 1,001st costs $1.50 / 1,000 = 1,500 micro-dollars.
        assert_eq!(
            c.vision_feature_cost("LABEL_DETECTION", 1000, 1)
                .unwrap()
                .micros(),
            1_500
        );
        // A call straddling the free tier pays only for the units past it: 300 of 500.
        assert_eq!(
            c.vision_feature_cost("LABEL_DETECTION", 800, 500)
                .unwrap()
                .micros(),
            450_000
        );
        // The pricing page's example: 700 label + 5,300 landmark images in a month cost $0 for
        // labels and 4,300 x $1.50/1,000 = $6.45 for landmarks.
        assert_eq!(
            c.vision_feature_cost("LABEL_DETECTION", 0, 700)
                .unwrap()
                .micros(),
            0
        );
        assert_eq!(
            c.vision_feature_cost("LANDMARK_DETECTION", 0, 5300)
                .unwrap()
                .micros(),
            6_450_000
        );
        // Units past 5,000,000 take the lower rate: label $1.00, object localization $1.50.
        assert_eq!(
            c.vision_feature_cost("LABEL_DETECTION", 4_999_999, 2)
                .unwrap()
                .micros(),
            2_500
        );
        assert_eq!(
            c.vision_feature_cost("OBJECT_LOCALIZATION", 6_000_000, 1000)
                .unwrap()
                .micros(),
            1_500_000
        );
        // One unit of text detection past 5M: $0.60 / 1,000 = 600 micro-dollars.
        assert_eq!(
            c.vision_feature_cost("TEXT_DETECTION", 5_000_000, 1)
                .unwrap()
                .micros(),
            600
        );
        assert!(c.vision_feature_cost("MIND_READING", 0, 1).is_err());
    }

    #[test]
    fn every_model_has_an_output_limit_and_a_catalog_without_one_is_refused() {
        let c = PriceCatalog::builtin();
        assert_eq!(c.max_output_tokens("openai", "gpt-4o-mini"), Ok(16_384));
        assert_eq!(
            c.max_output_tokens("anthropic", "claude-haiku-4-5"),
            Ok(64_000)
        );
        assert_eq!(c.max_output_tokens("gemini", "gemini-2.5-pro"), Ok(65_536));
        assert!(matches!(
            c.max_output_tokens("openai", "gpt-99"),
            Err(PriceError::UnknownModel { .. })
        ));
        let without = BUILTIN_CATALOG.replace(r#", "max_output_tokens": 16384 }"#, " }");
        assert_ne!(without, BUILTIN_CATALOG);
        let err = PriceCatalog::parse(&without).unwrap_err().to_string();
        assert!(err.contains("max_output_tokens"), "{err}");
        let zero =
            BUILTIN_CATALOG.replace(r#""max_output_tokens": 64000"#, r#""max_output_tokens": 0"#);
        let err = PriceCatalog::parse(&zero).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn llm_estimates_bound_the_actual_cost() {
        let c = PriceCatalog::builtin();
        // claude-haiku-4-5: 1,000 input at $1/M + 500 output at $5/M = 1,000 + 2,500 micro.
        assert_eq!(
            c.llm_estimate("anthropic", "claude-haiku-4-5", 1000, 500)
                .unwrap()
                .micros(),
            3_500
        );
        // gemini-2.5-flash: 2,000 in at $0.30/M + 100 out at $2.50/M = 600 + 250.
        assert_eq!(
            c.llm_cost("gemini", "gemini-2.5-flash", 2000, 0, 100)
                .unwrap()
                .micros(),
            850
        );
        let est = c.llm_estimate("openai", "gpt-4o-mini", 1200, 300).unwrap();
        let actual = c
            .llm_cost("openai", "gpt-4o-mini", 1200, 1024, 300)
            .unwrap();
        assert!(actual <= est);
    }

    #[test]
    fn a_prompt_above_the_long_context_threshold_costs_the_long_rates_for_the_whole_call() {
        let c = PriceCatalog::builtin();
        // gemini-2.5-pro above 200,000 prompt tokens: $2.50/M in, $15/M out, $0.25/M cached.
        // 243,005 x 2.5 + 20 x 15 = 607,512.5 + 300 micro-dollars, rounded up.
        assert_eq!(
            c.llm_cost("gemini", "gemini-2.5-pro", 243_005, 0, 20)
                .unwrap()
                .micros(),
            607_813
        );
        // At the threshold itself, the base rates: 200,000 x 1.25 + 20 x 10.
        assert_eq!(
            c.llm_cost("gemini", "gemini-2.5-pro", 200_000, 0, 20)
                .unwrap()
                .micros(),
            250_200
        );
        // Cached tokens at the long cached rate: 3,005 x 2.5 + 240,000 x 0.25 + 0 out.
        assert_eq!(
            c.llm_cost("gemini", "gemini-2.5-pro", 243_005, 240_000, 0)
                .unwrap()
                .micros(),
            67_513
        );
        // claude-sonnet-4-5 above 200,000: $6/M in, $22.50/M out.
        assert_eq!(
            c.llm_cost("anthropic", "claude-sonnet-4-5", 250_000, 0, 1_000)
                .unwrap()
                .micros(),
            1_522_500
        );
        // The estimate of a bound above the threshold is at the long rates too, and bounds
        // every honest answer below it.
        let est = c
            .llm_estimate("gemini", "gemini-2.5-pro", 972_028, 50)
            .unwrap();
        assert_eq!(est.micros(), 2_430_070 + 750);
        for prompt in [1, 199_999, 200_000, 200_001, 972_028] {
            let actual = c
                .llm_cost("gemini", "gemini-2.5-pro", prompt, 0, 50)
                .unwrap();
            assert!(actual <= est, "{prompt}");
        }
    }

    #[test]
    fn a_catalog_whose_long_context_rates_are_below_its_base_rates_is_refused() {
        let cheaper = BUILTIN_CATALOG.replace(
            r#""input_per_1m": 2500000, "cached_input_per_1m": 250000"#,
            r#""input_per_1m": 1000000, "cached_input_per_1m": 250000"#,
        );
        assert_ne!(cheaper, BUILTIN_CATALOG);
        let err = PriceCatalog::parse(&cheaper).unwrap_err().to_string();
        assert!(err.contains("long-context"), "{err}");
    }
}
