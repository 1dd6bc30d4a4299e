//! `aiq webhooks`: an organisation's endpoints (add, list, rm, rotate) and a test delivery.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;

use super::{print_json, process_env, shown};
use crate::config::{DatabaseSettings, WebhookSettings};
use crate::store::Store;
use crate::webhooks::sign::{self, Key};

#[derive(Debug, Subcommand)]
pub(super) enum WebhooksAction {
    /// Register an endpoint of an organisation; prints its id, and its secret once when aiq
    /// generated it.
    Add {
        #[arg(long)]
        org: uuid::Uuid,
        /// An http:// or https:// URL, at most 2,048 characters.
        #[arg(long)]
        url: String,
        /// A whsec_ secret of your own (default: a new one, printed once).
        #[arg(long)]
        secret: Option<String>,
    },
    /// Endpoints with their status, failing since, last error and pending deliveries.
    List {
        #[arg(long)]
        org: Option<uuid::Uuid>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Delete an endpoint and its undelivered messages.
    Rm { id: uuid::Uuid },
    /// Send a `webhook.test` event to an endpoint now and print the receiver's status.
    Test { id: uuid::Uuid },
    /// Add a new secret (printed once); the older ones keep signing until receivers move over.
    Rotate { id: uuid::Uuid },
}

/// The longest endpoint URL (the payload's callback_url has the same cap).
const MAX_URL_CHARS: usize = crate::jobs::payload::MAX_URI_CHARS;

pub(super) async fn webhooks(action: WebhooksAction) -> anyhow::Result<()> {
    let env = process_env();
    let db = DatabaseSettings::load(&env)?;
    let settings = WebhookSettings::load(&env)?;
    let store = Store::connect(&db, 2, Duration::from_secs(10))
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")?;
    match action {
        WebhooksAction::Add { org, url, secret } => {
            check_url(&url, &settings)?;
            let (secret, generated) = match secret {
                Some(s) => {
                    Key::parse(&s).map_err(|e| anyhow::anyhow!("--secret: {e}"))?;
                    (s, false)
                }
                None => (sign::generate().map_err(anyhow::Error::msg)?, true),
            };
            let id = store.add_webhook_endpoint(org, &url, &secret).await?;
            println!("endpoint {id}");
            if generated {
                println!("secret {secret}");
                println!("(shown once: give it to the receiver to verify signatures)");
            }
        }
        WebhooksAction::List { org, json } => {
            let endpoints = store.webhook_endpoints(org, settings.failing_after).await?;
            for e in &endpoints {
                if json {
                    print_json(e, false)?;
                    continue;
                }
                let status = match (e.disabled, e.failing, e.failing_since) {
                    (true, ..) => "disabled",
                    (false, true, _) => "failing",
                    (false, false, Some(_)) => "retrying",
                    (false, false, None) => "ok",
                };
                println!(
                    "{}  org {}  {}  {status}  secrets {}  pending {}  failing since {}  last error {}",
                    e.id,
                    e.organization_id,
                    shown(&e.url),
                    e.secrets,
                    e.pending,
                    e.failing_since.map_or("-".into(), |t| t.to_rfc3339()),
                    shown(e.last_error.as_deref().unwrap_or("-")),
                );
            }
            if endpoints.is_empty() && !json {
                println!("no endpoints");
            }
        }
        WebhooksAction::Rm { id } => {
            if !store.remove_webhook_endpoint(id).await? {
                bail!("no endpoint {id}");
            }
            println!("removed {id}");
        }
        WebhooksAction::Rotate { id } => {
            let secret = sign::generate().map_err(anyhow::Error::msg)?;
            if !store.rotate_webhook_secret(id, &secret).await? {
                bail!("no endpoint {id}");
            }
            println!("secret {secret}");
            println!("(shown once; the older secrets keep signing until you remove the endpoint)");
        }
        WebhooksAction::Test { id } => {
            let Some((org, url, secrets)) = store.webhook_endpoint(id).await? else {
                bail!("no endpoint {id}");
            };
            let keys: Vec<Key> = secrets.iter().filter_map(|s| Key::parse(s).ok()).collect();
            let message = format!("msg_{}", uuid::Uuid::new_v4().simple());
            let body = serde_json::json!({
                "type": "webhook.test",
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "data": { "endpoint_id": id, "organization_id": org },
            })
            .to_string();
            let sender = crate::webhooks::Sender::new(&settings).map_err(anyhow::Error::msg)?;
            match sender.post(&url, &message, &body, &keys).await {
                Ok(a) => {
                    println!("HTTP {} {}", a.status, shown(&a.body));
                    if !(200..300).contains(&a.status) {
                        bail!("the receiver answered HTTP {}", a.status);
                    }
                }
                Err(e) => bail!("{e}"),
            }
        }
    }
    Ok(())
}

/// An endpoint's URL: http(s), bounded, and not a refused literal address.
fn check_url(url: &str, settings: &WebhookSettings) -> anyhow::Result<()> {
    if url.chars().count() > MAX_URL_CHARS || url.chars().any(char::is_control) {
        bail!("--url must be at most {MAX_URL_CHARS} characters, without control characters");
    }
    crate::webhooks::address::AddressPolicy::new(settings.allow_nets.clone())
        .check_url(url)
        .map_err(|e| anyhow::anyhow!("--url {e}"))
}
