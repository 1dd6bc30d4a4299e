//! An organisation's data as a whole, for `aiq org export` and `aiq org purge`: its rows in
//! every table of `store::tenant::ORG_TABLES`, its jobs in the queue (`aiq_queue::org`) and its
//! budget keys (`budget`), each action recorded in the audit log with who ran it.
//!
//! An export is JSON lines: a header naming the organisation, one `{"table", "row"}` line per
//! row, table by table in the order of each table's key, then one `{"queue", "job"}` line per
//! item of its queue state. It is written to `FILE.partial` and renamed to `FILE` when complete.
//! The partial file is its own progress record: run again, an export keeps the whole lines it
//! finds, goes on after the last row's key in its table, and writes the queue state again (the
//! queue moves, so its part is always read afresh). Running it again gives an equivalent file.
//!
//! A purge removes the queue's jobs first (so none of them writes new rows), then the rows in
//! bounded batches, then the budget keys. Each step removes what is left, so a purge cut short
//! is finished by running it again, and a second purge removes nothing. A running job is left
//! to finish and reported; its rows arrive after the purge, for another purge to remove.

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::budget::{Budget, OrgBudgetPurge};
use crate::domain::OrganizationId;
use crate::queue::Queue;
use crate::store::Store;
use crate::store::tenant::{LEDGER_TABLE, OrgTable};

/// The header line's format version.
const FORMAT: u64 = 1;
/// The longest `--by` name.
const MAX_ACTOR_CHARS: usize = 200;

/// Who runs an action, as the audit log records it: 1 to 200 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(String);

impl Actor {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("--by must name who runs this (1 to 200 characters)".into());
        }
        if s.chars().count() > MAX_ACTOR_CHARS {
            return Err(format!("--by is longer than {MAX_ACTOR_CHARS} characters"));
        }
        if s.chars().any(char::is_control) {
            return Err("--by must not hold control characters".into());
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportSummary {
    pub organization_id: String,
    pub file: PathBuf,
    /// Rows per table (those kept from an earlier partial run included).
    pub rows: BTreeMap<String, u64>,
    /// Queue items per place (waiting, delayed, ...).
    pub queue: BTreeMap<String, u64>,
    /// Whether it went on from a partial file.
    pub resumed: bool,
}

/// What a purge removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PurgeSummary {
    pub organization_id: String,
    /// Rows deleted per table.
    pub rows: BTreeMap<String, u64>,
    /// Jobs and outcomes removed from the queue, per place.
    pub queue: BTreeMap<String, u64>,
    /// Running jobs left to finish: purge again once they have.
    pub running: u64,
    pub budget: OrgBudgetPurge,
    pub kept_ledger: bool,
    /// Whether anything was removed (a second purge: false).
    pub changed: bool,
}

/// `path` with `.partial` appended.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

fn header(org: &OrganizationId) -> String {
    json!({"aiq_export": FORMAT, "organization_id": org.to_string()}).to_string()
}

/// Where an export cut short stopped: the bytes of whole lines to keep, the rows per table they
/// hold, and the table (index in `tables`) and key to go on after.
#[derive(Debug, Default)]
struct Resume {
    keep_bytes: u64,
    rows: BTreeMap<String, u64>,
    at: Option<(usize, String)>,
}

/// Reads a partial export of `org`: whole lines up to the first queue line, a line that does
/// not parse, or the end.
fn read_partial(
    file: &std::fs::File,
    org: &OrganizationId,
    tables: &[OrgTable],
) -> anyhow::Result<Resume> {
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    let mut r = Resume::default();
    let mut first = true;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            break;
        };
        if first {
            if v != serde_json::from_str::<Value>(&header(org))? {
                bail!(
                    "the partial file is not an export of organisation {org} (format {FORMAT}): remove it to start again"
                );
            }
            first = false;
        } else {
            let (Some(table), Some(row)) = (v["table"].as_str(), v.get("row")) else {
                break;
            };
            let Some(i) = tables.iter().position(|t| t.name == table) else {
                break;
            };
            let key = match &row[tables[i].key] {
                Value::String(s) => s.clone(),
                _ => break,
            };
            // Tables come in order; a row out of it ends what can be trusted.
            if r.at.as_ref().is_some_and(|(j, _)| *j > i) {
                break;
            }
            *r.rows.entry(table.to_owned()).or_default() += 1;
            r.at = Some((i, key));
        }
        r.keep_bytes += n as u64;
    }
    Ok(r)
}

/// Writes `org`'s rows and queue state to `out` (see the module's header). Records the start
/// and the end in the audit log.
pub async fn export(
    store: &Store,
    queue: &Queue,
    org: &OrganizationId,
    out: &Path,
    actor: &Actor,
) -> anyhow::Result<ExportSummary> {
    let partial = partial_path(out);
    let resumed = partial.exists();
    store
        .audit(
            actor.as_str(),
            "org.export.start",
            Some(org.as_uuid()),
            &json!({"file": out.display().to_string(), "resumed": resumed}),
        )
        .await?;
    let result = export_to(store, queue, org, out, &partial, resumed).await;
    let (action, details) = match &result {
        Ok(s) => ("org.export.end", serde_json::to_value(s)?),
        Err(e) => ("org.export.failed", json!({"error": format!("{e:#}")})),
    };
    store
        .audit(actor.as_str(), action, Some(org.as_uuid()), &details)
        .await?;
    result
}

async fn export_to(
    store: &Store,
    queue: &Queue,
    org: &OrganizationId,
    out: &Path,
    partial: &Path,
    resumed: bool,
) -> anyhow::Result<ExportSummary> {
    let tables = store.org_tables().await?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    let resume = if resumed {
        read_partial(&file, org, &tables)?
    } else {
        Resume::default()
    };
    file.set_len(resume.keep_bytes)?;
    file.seek(std::io::SeekFrom::End(0))?;
    let mut w = BufWriter::new(file);
    if resume.keep_bytes == 0 {
        writeln!(w, "{}", header(org))?;
    }
    let mut summary = ExportSummary {
        organization_id: org.to_string(),
        file: out.to_owned(),
        rows: resume.rows,
        queue: BTreeMap::new(),
        resumed,
    };
    let start = resume.at.as_ref().map_or(0, |(i, _)| *i);
    for (i, t) in tables.iter().enumerate().skip(start) {
        let after = resume
            .at
            .as_ref()
            .filter(|(j, _)| *j == i)
            .map(|(_, k)| k.as_str());
        let prefix = format!("{{\"table\":{},\"row\":", json!(t.name));
        let n = store
            .org_rows(t, org.as_uuid(), after, |row| {
                w.write_all(prefix.as_bytes())?;
                w.write_all(row.as_bytes())?;
                w.write_all(b"}\n")
            })
            .await?
            .with_context(|| format!("writing {}", partial.display()))?;
        *summary.rows.entry(t.name.to_owned()).or_default() += n;
    }
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    queue
        .org_items(org, |item| {
            *counts.entry(item.place.as_str().to_owned()).or_default() += 1;
            let line = json!({"queue": item.place, "job": item.fields});
            writeln!(w, "{line}")
        })
        .await?
        .with_context(|| format!("writing {}", partial.display()))?;
    summary.queue = counts;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(partial, out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(summary)
}

/// Removes `org`'s jobs, rows (but its cost rows with `keep_ledger`) and budget keys (see the
/// module's header). Records the start and the end in the audit log.
pub async fn purge(
    store: &Store,
    queue: &Queue,
    budget: &Budget,
    org: &OrganizationId,
    keep_ledger: bool,
    actor: &Actor,
) -> anyhow::Result<PurgeSummary> {
    store
        .audit(
            actor.as_str(),
            "org.purge.start",
            Some(org.as_uuid()),
            &json!({"keep_ledger": keep_ledger}),
        )
        .await?;
    let result = purge_all(store, queue, budget, org, keep_ledger).await;
    let (action, details) = match &result {
        Ok(s) => ("org.purge.end", serde_json::to_value(s)?),
        Err(e) => ("org.purge.failed", json!({"error": format!("{e:#}")})),
    };
    store
        .audit(actor.as_str(), action, Some(org.as_uuid()), &details)
        .await?;
    result
}

async fn purge_all(
    store: &Store,
    queue: &Queue,
    budget: &Budget,
    org: &OrganizationId,
    keep_ledger: bool,
) -> anyhow::Result<PurgeSummary> {
    let q = queue.org_purge(org).await.context("purging the queue")?;
    let mut summary = PurgeSummary {
        organization_id: org.to_string(),
        queue: q
            .removed
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        running: q.running,
        kept_ledger: keep_ledger,
        ..Default::default()
    };
    for t in store.org_tables().await? {
        if keep_ledger && t.name == LEDGER_TABLE {
            continue;
        }
        let n = store
            .delete_org_rows(&t, org.as_uuid())
            .await
            .with_context(|| format!("deleting from {}", t.name))?;
        if n > 0 {
            summary.rows.insert(t.name.to_owned(), n);
            if t.name == "webhook_endpoints" {
                store.notify_webhook_endpoints_changed().await?;
            }
        }
    }
    // The purged cost rows' deltas into the sums, so no sum of the organisation is left.
    store.fold_spend().await.context("folding the spend sums")?;
    summary.budget = budget
        .purge_org(org.as_uuid())
        .await
        .context("purging the budget keys")?;
    summary.changed =
        q.total() > 0 || summary.rows.values().any(|n| *n > 0) || summary.budget.deleted > 0;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_actor_is_a_bounded_name_without_control_characters() {
        assert_eq!(Actor::parse("ops: Jane").unwrap().as_str(), "ops: Jane");
        assert!(Actor::parse("").is_err());
        assert!(Actor::parse("   ").is_err());
        assert!(Actor::parse("a\nb").is_err());
        assert!(Actor::parse("\u{1b}[31m").is_err());
        assert!(Actor::parse(&"x".repeat(201)).is_err());
        assert!(Actor::parse(&"é".repeat(200)).is_ok());
    }
}
