//! `aiq config`: the effective settings, secrets masked, then the job policy's fixed constants
//! (`jobs::policy`), which no setting changes.

use super::{print_json, shown};
use crate::config::Settings;

pub(super) fn print(json: bool) -> anyhow::Result<()> {
    let settings = Settings::from_process_env()?;
    let eff = settings.effective();
    let policy = crate::jobs::policy_constants();
    if json {
        let mut map: serde_json::Map<String, serde_json::Value> = eff
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
        // Not a variable: the constants, under one key of their own.
        let constants: serde_json::Map<String, serde_json::Value> = policy
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
        map.insert("policy".to_owned(), constants.into());
        print_json(&serde_json::Value::Object(map), false)?;
    } else {
        for (k, v) in eff {
            println!("{k}={}", shown(&v));
        }
        println!(
            "# retry policy: {} attempts, delays full-jitter up to {} ms doubling from {} ms",
            settings.retry.max_attempts,
            settings.retry.cap.as_millis(),
            settings.retry.base.as_millis()
        );
        for (k, v) in policy {
            println!("# policy constant {k}: {v}");
        }
    }
    Ok(())
}
