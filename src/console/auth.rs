//! Sign-in, sessions and CSRF. A session is a cookie the server checks without storing it:
//! `base64url(role \n name \n expiry \n nonce) . base64url(HMAC-SHA256)`, signed with a key made
//! at start from the OS's random source, so every session ends when the process restarts. The
//! CSRF token is an HMAC of the session's cookie payload: bound to the session, never stored.
//! Tokens and signatures are compared in constant time.
//!
//! With no token set (only allowed on a loopback admin address, see `config::load`), the
//! console is open as operator `local`, but only to requests whose `Host` is localhost,
//! 127.0.0.1 or [::1] (against DNS rebinding); anything else is signed out.

use aws_lc_rs::{constant_time, hmac, rand};
use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

use crate::config::{ConsoleRole, ConsoleSettings};

/// The session cookie's name.
pub const COOKIE: &str = "aiq_console";

/// Who a request comes from.
#[derive(Debug, Clone)]
pub struct Session {
    pub name: String,
    pub role: ConsoleRole,
    /// The CSRF token every action of this session must carry.
    pub csrf: String,
}

pub struct Auth {
    key: hmac::Key,
    settings: ConsoleSettings,
}

impl Auth {
    pub fn new(settings: ConsoleSettings) -> Self {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes).expect("the OS random source");
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            settings,
        }
    }

    fn sign(&self, what: &[u8]) -> String {
        B64.encode(hmac::sign(&self.key, what).as_ref())
    }

    fn csrf_for(&self, payload: &str) -> String {
        self.sign(format!("csrf\n{payload}").as_bytes())
    }

    /// The sign-in a token names, if any (every token is compared, in constant time).
    pub fn token(&self, given: &str) -> Option<(String, ConsoleRole)> {
        let mut found = None;
        for t in &self.settings.tokens {
            if constant_time::verify_slices_are_equal(
                t.token.expose().as_bytes(),
                given.trim().as_bytes(),
            )
            .is_ok()
            {
                found = Some((t.name.clone(), t.role));
            }
        }
        found
    }

    /// The `Set-Cookie` value of a new session; `through_tls` when a proxy says the request
    /// came through TLS (`Secure` then follows `AIQ_CONSOLE_COOKIE_SECURE`).
    pub fn cookie(&self, name: &str, role: ConsoleRole, through_tls: bool) -> String {
        let secure = self.settings.cookie_secure.secure(through_tls);
        let expiry = chrono::Utc::now().timestamp() + self.settings.session.as_secs() as i64;
        let mut nonce = [0u8; 16];
        rand::fill(&mut nonce).expect("the OS random source");
        let payload = B64.encode(format!(
            "{}\n{name}\n{expiry}\n{}",
            role.as_str(),
            B64.encode(nonce)
        ));
        let sig = self.sign(payload.as_bytes());
        format!(
            "{COOKIE}={payload}.{sig}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.settings.session.as_secs(),
            if secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that ends a session, `Secure` as a new session's would be.
    pub fn cleared(&self, through_tls: bool) -> String {
        let secure = self.settings.cookie_secure.secure(through_tls);
        format!(
            "{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{}",
            if secure { "; Secure" } else { "" }
        )
    }

    /// The request's session: a valid unexpired cookie, or the open console on loopback.
    pub fn session(&self, headers: &HeaderMap) -> Option<Session> {
        if let Some(s) = cookie_value(headers).and_then(|v| self.check(v)) {
            return Some(s);
        }
        if self.settings.tokens.is_empty() && loopback_host(headers) {
            return Some(Session {
                name: "local".to_owned(),
                role: ConsoleRole::Operator,
                csrf: self.csrf_for("local"),
            });
        }
        None
    }

    /// Whether the console is open without a sign-in (no tokens set).
    pub fn open(&self) -> bool {
        self.settings.tokens.is_empty()
    }

    fn check(&self, value: &str) -> Option<Session> {
        let (payload, sig) = value.split_once('.')?;
        let want = self.sign(payload.as_bytes());
        constant_time::verify_slices_are_equal(want.as_bytes(), sig.as_bytes()).ok()?;
        let text = String::from_utf8(B64.decode(payload).ok()?).ok()?;
        let mut parts = text.split('\n');
        let role = match parts.next()? {
            "operator" => ConsoleRole::Operator,
            "viewer" => ConsoleRole::Viewer,
            _ => return None,
        };
        let name = parts.next()?.to_owned();
        let expiry: i64 = parts.next()?.parse().ok()?;
        if expiry <= chrono::Utc::now().timestamp() {
            return None;
        }
        // A token removed from the settings ends its sessions at the next restart; the name
        // must still be one of the settings' now.
        if !self
            .settings
            .tokens
            .iter()
            .any(|t| t.name == name && t.role == role)
        {
            return None;
        }
        Some(Session {
            name,
            role,
            csrf: self.csrf_for(payload),
        })
    }
}

/// Whether a form's csrf field is the session's token.
pub fn csrf_ok(session: &Session, given: Option<&str>) -> bool {
    given.is_some_and(|g| {
        constant_time::verify_slices_are_equal(session.csrf.as_bytes(), g.as_bytes()).is_ok()
    })
}

/// Whether the request came through TLS (a proxy in front says so with X-Forwarded-Proto).
pub fn through_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    matches!(
        name.to_ascii_lowercase().as_str(),
        "localhost" | "127.0.0.1" | "::1"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsoleToken, CookieSecure, Secret};
    use axum::http::HeaderValue;

    fn auth() -> Auth {
        auth_with(CookieSecure::Auto)
    }

    fn auth_with(cookie_secure: CookieSecure) -> Auth {
        Auth::new(ConsoleSettings {
            tokens: vec![ConsoleToken {
                name: "ann".into(),
                role: ConsoleRole::Viewer,
                token: Secret::new("v".repeat(24)),
            }],
            session: std::time::Duration::from_secs(60),
            cookie_secure,
        })
    }

    #[test]
    fn the_cookie_is_secure_as_the_setting_says_on_sign_in_and_sign_out() {
        let secure = |c: &str| c.split("; ").any(|a| a == "Secure");
        for (setting, plain, tls) in [
            (CookieSecure::Auto, false, true),
            (CookieSecure::Always, true, true),
            (CookieSecure::Never, false, false),
        ] {
            let a = auth_with(setting);
            for (through_tls, want) in [(false, plain), (true, tls)] {
                let c = a.cookie("ann", ConsoleRole::Viewer, through_tls);
                assert_eq!(
                    secure(&c),
                    want,
                    "{setting:?}, through TLS {through_tls}: {c}"
                );
                let gone = a.cleared(through_tls);
                assert_eq!(secure(&gone), want, "{setting:?} clearing: {gone}");
                // Secure or not, the cookie is the same session.
                assert!(a.session(&with_cookie(&c)).is_some());
            }
        }
    }

    fn with_cookie(set_cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let pair = set_cookie.split(';').next().unwrap();
        h.insert(header::COOKIE, HeaderValue::from_str(pair).unwrap());
        h
    }

    #[test]
    fn a_signed_cookie_is_its_session_and_a_changed_one_is_none() {
        let a = auth();
        assert_eq!(a.token(&"v".repeat(24)).unwrap().0, "ann");
        assert!(a.token(&"v".repeat(23)).is_none());
        let c = a.cookie("ann", ConsoleRole::Viewer, false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        let s = a.session(&with_cookie(&c)).unwrap();
        assert_eq!((s.name.as_str(), s.role), ("ann", ConsoleRole::Viewer));
        assert!(csrf_ok(&s, Some(&s.csrf)) && !csrf_ok(&s, Some("x")) && !csrf_ok(&s, None));
        // Claiming operator with the viewer's signature fails.
        let forged = c.replacen(&B64.encode("viewer"), &B64.encode("operator"), 1);
        assert!(a.session(&with_cookie(&forged)).is_none());
        // Another process's key does not know the cookie.
        assert!(auth().session(&with_cookie(&c)).is_none());
    }

    #[test]
    fn without_tokens_only_a_loopback_host_is_let_in() {
        let a = Auth::new(ConsoleSettings::default());
        let host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, HeaderValue::from_str(h).unwrap());
            a.session(&m).map(|s| s.role)
        };
        assert_eq!(host("127.0.0.1:9464"), Some(ConsoleRole::Operator));
        assert_eq!(host("localhost"), Some(ConsoleRole::Operator));
        assert_eq!(host("[::1]:80"), Some(ConsoleRole::Operator));
        assert_eq!(host("evil.example:9464"), None);
        assert_eq!(host("127.0.0.1.evil.example"), None);
    }
}
