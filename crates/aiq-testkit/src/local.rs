//! The settings that point a daemon at throw-away parts: written once here for the tests, the
//! demo and the benchmarks.

/// Provider base URLs and API keys for every provider, all pointing at one fake
/// (`fake::FakeProviders::base_url`). The keys are `<label>-<provider>-key` (the fake accepts
/// any key), so a key seen in a log says whose it is.
pub fn provider_vars(fake_url: &str, label: &str) -> Vec<(&'static str, String)> {
    let mut vars = Vec::with_capacity(8);
    for (provider, url, key) in [
        ("vision", "AIQ_VISION_BASE_URL", "AIQ_VISION_API_KEY"),
        ("openai", "AIQ_OPENAI_BASE_URL", "AIQ_OPENAI_API_KEY"),
        (
            "anthropic",
            "AIQ_ANTHROPIC_BASE_URL",
            "AIQ_ANTHROPIC_API_KEY",
        ),
        ("gemini", "AIQ_GEMINI_BASE_URL", "AIQ_GEMINI_API_KEY"),
    ] {
        vars.push((url, fake_url.to_owned()));
        vars.push((key, format!("{label}-{provider}-key")));
    }
    vars
}

/// A per-tier setting with the same value for all six tiers (e.g. `0`: no cap).
pub fn every_tier(value: &str) -> String {
    [
        "enterprise_plus",
        "enterprise",
        "professional_agency",
        "growth_team",
        "solo_professional",
        "trial",
    ]
    .map(|t| format!("{t}={value}"))
    .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_provider_gets_the_fake_and_a_key() {
        let vars = provider_vars("http://127.0.0.1:9", "t");
        assert_eq!(vars.len(), 8);
        assert!(vars.contains(&("AIQ_GEMINI_BASE_URL", "http://127.0.0.1:9".to_owned())));
        assert!(vars.contains(&("AIQ_VISION_API_KEY", "t-vision-key".to_owned())));
        assert_eq!(
            every_tier("0"),
            "enterprise_plus=0,enterprise=0,professional_agency=0,growth_team=0,solo_professional=0,trial=0"
        );
    }
}
