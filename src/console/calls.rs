//! A job's provider calls (`ai_cost_tracking`) and error rows (`ai_processing_errors`) as its
//! page shows them: at most 50 of each, every value escaped and cut.

use std::fmt::Write;

use super::Console;
use super::html::{cut, esc};
use crate::domain::MicroUsd;
use crate::store::JOB_ROWS;

/// The two tables, `table#calls` and `table#errors`, with a line when a table holds the first
/// [`JOB_ROWS`] rows only.
pub async fn tables(c: &Console, org: uuid::Uuid, id: &str) -> Result<String, String> {
    let calls = c
        .src
        .store
        .job_calls(org, id)
        .await
        .map_err(|e| e.to_string())?;
    let errors = c
        .src
        .store
        .job_errors(org, id)
        .await
        .map_err(|e| e.to_string())?;
    let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(
            || "-".to_owned(),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
    };
    fn n<T: ToString>(v: Option<T>) -> String {
        v.map_or_else(|| "-".to_owned(), |v| v.to_string())
    }
    let mut b = String::from(
        r#"<h2>Provider calls</h2><table id="calls"><tr><th>when</th><th>attempt</th><th>call</th><th>provider</th><th>model</th><th>status</th><th>cost</th><th>tokens in</th><th>tokens out</th><th>units</th></tr>"#,
    );
    let mut total = MicroUsd::ZERO;
    for r in &calls {
        let cost = MicroUsd::from_micros(r.cost_micros);
        total = MicroUsd::from_micros(total.micros().saturating_add(r.cost_micros));
        let _ = write!(
            b,
            r#"<tr><td>{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td><td>{}</td><td class="status">{}</td><td class="n">{cost}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
            when(r.created_at),
            r.attempt,
            r.call_seq,
            esc(&r.provider),
            esc(r.model.as_deref().unwrap_or("-")),
            esc(&r.call_status),
            n(r.input_tokens),
            n(r.output_tokens),
            n(r.units),
        );
    }
    let _ = write!(
        b,
        r#"<tr><th colspan="6">{} calls</th><td class="n" id="calls-cost">{total}</td><td colspan="3"></td></tr></table>"#,
        calls.len()
    );
    if calls.len() as i64 >= JOB_ROWS {
        let _ = write!(b, "<p>The first {JOB_ROWS} calls.</p>");
    }
    b.push_str(r#"<h2>Errors</h2><table id="errors"><tr><th>when</th><th>attempt</th><th>call</th><th>type</th><th>provider</th><th>HTTP</th><th>message</th></tr>"#);
    for e in &errors {
        let _ = write!(
            b,
            r#"<tr><td>{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td><td>{}</td><td class="n">{}</td><td>{}</td></tr>"#,
            when(e.created_at),
            n(e.retry_count),
            e.call_seq,
            esc(&e.error_type),
            esc(e.provider.as_deref().unwrap_or("-")),
            n(e.http_status),
            esc(&cut(&e.error_message, 500)),
        );
    }
    b.push_str("</table>");
    if errors.len() as i64 >= JOB_ROWS {
        let _ = write!(b, "<p>The first {JOB_ROWS} error rows.</p>");
    }
    Ok(b)
}
