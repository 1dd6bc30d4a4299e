//! The console on the admin port, under `/console/`: pages rendered on the server (no
//! JavaScript needed; `assets/console.js` only refreshes sections live), sign-in and CSRF
//! (`auth`), every value escaped (`html`), every read bounded (pages of 50, counts the scripts
//! keep). Each action is a POST with the session's CSRF token, refused to a viewer, and written
//! to `aiq_audit_log` with the session's name as actor. `docs/console/CONTRACT.md` lists the
//! routes and element ids the browser test relies on.

pub mod auth;
mod calls;
mod dead;
pub mod html;
mod jobs;
mod money;
mod orgs;
mod overview;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::config::{ConsoleRole, ConsoleSettings};
use crate::http::Sources;
use auth::{Auth, Session};

/// Rows per page everywhere.
pub const PAGE: usize = 50;

pub struct Console {
    pub src: Sources,
    pub auth: Auth,
}

pub type Shared = Arc<Console>;

/// The console's routes, to merge into the admin router.
pub fn router(src: Sources, settings: ConsoleSettings) -> Router {
    let state = Arc::new(Console {
        src,
        auth: Auth::new(settings),
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(overview::page))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route("/console/assets/console.css", get(css))
        .route("/console/assets/console.js", get(js))
        .route("/console/jobs", get(jobs::list))
        .route("/console/jobs/{id}", get(jobs::show))
        .route("/console/dead", get(dead::list))
        .route("/console/dead/retry", post(dead::retry_many))
        .route("/console/dead/purge", post(dead::purge_many))
        .route("/console/dead/{id}", get(dead::show))
        .route("/console/dead/{id}/retry", post(dead::retry_one))
        .route("/console/dead/{id}/purge", post(dead::purge_one))
        .route("/console/money", get(money::page))
        .route("/console/orgs", get(orgs::list))
        .route("/console/orgs/{org}", get(orgs::show))
        .route("/console/orgs/{org}/limits", post(orgs::set_limits))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(state)
}

async fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

async fn css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("assets/console.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("assets/console.js"),
    )
}

/// A page's HTML answer, never cached.
pub fn html(code: StatusCode, body: String) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// A query string or form body as its fields, repeated fields kept in order.
#[derive(Debug, Default)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn parse(raw: &[u8]) -> Self {
        Self(url::form_urlencoded::parse(raw).into_owned().collect())
    }
    pub fn query(q: Option<&str>) -> Self {
        Self::parse(q.unwrap_or("").as_bytes())
    }
    /// The first value of a field, empty values as none.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim())
    }
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

/// A GET's session, or the redirect to the sign-in page.
pub fn viewer(c: &Console, headers: &HeaderMap) -> Result<Session, Box<Response>> {
    c.auth
        .session(headers)
        .ok_or_else(|| Box::new(Redirect::to("/console/login").into_response()))
}

/// A POST of an action: signed in (401), an operator (403) with the session's CSRF token (403).
/// A refusal changes nothing.
pub fn operator(c: &Console, headers: &HeaderMap, form: &Fields) -> Result<Session, Box<Response>> {
    let Some(s) = c.auth.session(headers) else {
        return Err(Box::new(
            (StatusCode::UNAUTHORIZED, "sign in first\n").into_response(),
        ));
    };
    if !auth::csrf_ok(&s, form.get("csrf")) {
        return Err(Box::new(
            (
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or not this session's: reload the page\n",
            )
                .into_response(),
        ));
    }
    if s.role != ConsoleRole::Operator {
        return Err(Box::new(
            (StatusCode::FORBIDDEN, "a viewer cannot act\n").into_response(),
        ));
    }
    Ok(s)
}

/// The page of organisations by this month's spend at the query's `cursor` (a missing, bad or
/// negative cursor is the first page), with one row more than a page when there is a next one.
/// The month's sums first take the deltas written since the last fold; a fold that fails leaves
/// them seconds behind, never wrong.
pub async fn org_spend_page(
    c: &Console,
    q: &Fields,
) -> Result<(i64, Vec<crate::store::OrgSpend>), Box<Response>> {
    let cursor: i64 = q
        .get("cursor")
        .and_then(|c| c.parse().ok())
        .filter(|c: &i64| (0..=i64::MAX - PAGE as i64).contains(c))
        .unwrap_or(0);
    if let Err(e) = c.src.store.fold_spend().await {
        tracing::warn!(error = %e, "folding the spend deltas before the console read them failed");
    }
    match c.src.store.org_spend_page(cursor, PAGE as i64 + 1).await {
        Ok(o) => Ok((cursor, o)),
        Err(e) => Err(Box::new(failed("reading the organisations' spend", e))),
    }
}

/// An error for a page: logged, shown as a 500 without its details.
pub fn failed(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "console: {what} failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("{what} failed; see the daemon's log\n"),
    )
        .into_response()
}

/// Writes an action's audit row; a failure to write it is logged (the action is done).
pub async fn audit(
    c: &Console,
    s: &Session,
    action: &str,
    org: Option<uuid::Uuid>,
    details: serde_json::Value,
) {
    if let Err(e) = c.src.store.audit(&s.name, action, org, &details).await {
        tracing::error!(error = %e, action, "console: writing the audit row failed");
    }
}

/// The 303 answer of an action, to a page that says what it did (`done` names a fixed message).
pub fn done(to: &str, done: &str, n: usize) -> Response {
    let sep = if to.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{to}{sep}done={done}&n={n}")).into_response()
}

/// The flash text of `?done=`: fixed messages only, never text from the URL.
pub fn flash(q: &Fields) -> Option<String> {
    let n: usize = q.get("n").and_then(|n| n.parse().ok()).unwrap_or(0);
    let text = match q.get("done")? {
        "retried" => format!("{n} dead jobs queued again"),
        "purged" => format!("{n} dead jobs purged"),
        "limits" => "Limits saved".to_owned(),
        "confirm" => "Nothing done: type the count shown to confirm".to_owned(),
        _ => return None,
    };
    Some(text)
}

async fn login_form(State(c): State<Shared>, headers: HeaderMap) -> Response {
    if c.auth.open() && c.auth.session(&headers).is_some() {
        return Redirect::to("/console/").into_response();
    }
    html(StatusCode::OK, html::login(false))
}

async fn login(State(c): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Fields::parse(&body);
    match form.get("token").and_then(|t| c.auth.token(t)) {
        Some((name, role)) => {
            tracing::info!(name = %name, role = role.as_str(), "console: signed in");
            let cookie = c.auth.cookie(&name, role, auth::through_tls(&headers));
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, cookie),
                    (header::LOCATION, "/console/".to_owned()),
                ],
            )
                .into_response()
        }
        None => html(StatusCode::UNAUTHORIZED, html::login(true)),
    }
}

async fn logout(State(c): State<Shared>, headers: HeaderMap) -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                c.auth.cleared(auth::through_tls(&headers)),
            ),
            (header::LOCATION, "/console/login".to_owned()),
        ],
    )
        .into_response()
}
