//! The checks every console request passes: a live session (else a redirect
//! to the sign-in page), and before any action the session's CSRF token and
//! the scope the action needs (else 403).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use secrecy::ExposeSecret;

use super::layout;
use super::signin::{self, SignIn};
use super::Console;
use crate::auth::Scope;

/// A request from a signed-in browser.
pub struct Signed(pub SignIn);

impl FromRequestParts<Console> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Console) -> Result<Self, Response> {
        let to_login = || Redirect::to("/ui/login").into_response();
        let mut s = signin::session_id(&parts.headers)
            .and_then(|id| state.sign_ins.touch(id))
            .ok_or_else(to_login)?;
        // The tokens in force decide, not those at sign-in (SIGHUP).
        let Some(caller) = state
            .ctx
            .tokens()
            .authenticate(s.token.expose_secret().as_bytes())
        else {
            tracing::info!(who = %s.who, "console session ended: its token is no longer configured");
            state.sign_ins.remove(&s.id);
            return Err(to_login());
        };
        s.who = caller.name;
        s.scopes = caller.scopes;
        Ok(Signed(s))
    }
}

/// Whether the browser reached us over TLS (directly or through a proxy
/// that says so): the session cookie is then marked `Secure`.
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// A reload that asks for fresh numbers (the browser's hard reload sends
/// `Cache-Control: no-cache`): the console then skips its short caches.
pub fn wants_fresh(headers: &HeaderMap) -> bool {
    [header::CACHE_CONTROL, header::PRAGMA].iter().any(|h| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("no-cache"))
    })
}

/// An `application/x-www-form-urlencoded` body, keeping repeated keys (a
/// selection of messages sends `id` once per message).
pub struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn parse(body: &[u8]) -> Self {
        Self(form_urlencoded::parse(body).into_owned().collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A field that may be left empty: empty counts as absent.
    pub fn opt(&self, key: &str) -> Option<&str> {
        self.get(key).map(str::trim).filter(|v| !v.is_empty())
    }

    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The 403 page if `s` may not perform an action needing `scope` with this
/// form: the CSRF token is checked first (a forged request learns nothing
/// about scopes), then the scope.
pub fn refused(s: &SignIn, f: &Fields, scope: Scope) -> Option<Response> {
    if !s.csrf_ok(f.get("csrf")) {
        return Some(forbidden(
            s,
            html! { "The form's CSRF token is missing or wrong: reload the page and try again." },
        ));
    }
    if !s.may(scope) {
        return Some(forbidden(
            s,
            html! { "This needs the " code { (scope.name()) } " scope; your token lacks it." },
        ));
    }
    None
}

fn forbidden(s: &SignIn, why: Markup) -> Response {
    (
        StatusCode::FORBIDDEN,
        layout::page(
            "Forbidden",
            Some(s),
            layout::Nav::None,
            layout::message(why),
        ),
    )
        .into_response()
}
