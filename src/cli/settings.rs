//! `aiq config`: the effective settings, secrets masked.

use super::{print_json, shown};
use crate::config::Settings;

pub(super) fn print(json: bool) -> anyhow::Result<()> {
    let settings = Settings::from_process_env()?;
    let eff = settings.effective();
    if json {
        let map: serde_json::Map<String, serde_json::Value> = eff
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
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
    }
    Ok(())
}
