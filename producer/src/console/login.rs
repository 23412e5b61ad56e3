//! Sign-in by pasting an API token (the token goes in a POST body; it is
//! compared and forgotten, the session keeps only who and what scopes), and
//! sign-out. With `console.link_login` (a local demo's setting, off by
//! default) a link `GET /ui/login?token=…` signs in too, then redirects to
//! the overview so that the token leaves the address bar.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;

use super::guard::{self, Fields, Signed};
use super::layout::{self, Nav};
use super::{signin, Console};

pub async fn form(
    State(c): State<Console>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let link = query.map(|q| Fields::parse(q.as_bytes()));
    if let Some(token) = link.as_ref().and_then(|f| f.get("token")) {
        if !c.ctx.cfg().console.link_login {
            tracing::info!("console sign-in link refused: console.link_login is off");
            return login_page(
                StatusCode::FORBIDDEN,
                Some("Sign-in links are off on this server (console.link_login). Paste the token instead."),
            );
        }
        return open_session(&c, &headers, token.trim(), "link");
    }
    // Already signed in: straight to the overview.
    if signin::session_id(&headers).is_some_and(|id| c.sign_ins.touch(id).is_some()) {
        return Redirect::to("/ui/").into_response();
    }
    login_page(StatusCode::OK, None)
}

fn login_page(status: StatusCode, error: Option<&str>) -> Response {
    let body = html! {
        form.login method="post" action="/ui/login" {
            @if let Some(e) = error { p.error role="alert" { (e) } }
            label for="token" { "API token" }
            input #token type="password" name="token" autocomplete="off" required autofocus;
            p.hint { "The same bearer tokens as the HTTP API: " code { "read" } " to look, "
                code { "publish" } " to trigger, replay and publish, " code { "admin" }
                " to pause and purge." }
            button type="submit" { "Sign in" }
        }
    };
    let mut r = layout::page("Sign in", None, Nav::None, body);
    *r.status_mut() = status;
    r
}

pub async fn sign_in(State(c): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let fields = Fields::parse(&body);
    open_session(
        &c,
        &headers,
        fields.get("token").unwrap_or("").trim(),
        "form",
    )
}

/// A session for `token` (compared in constant time by the token store)
/// and a redirect to the overview, or the form again with the refusal.
/// `via` (form or link) goes in the log line; the token never does.
fn open_session(c: &Console, headers: &HeaderMap, token: &str, via: &str) -> Response {
    let Some(caller) = c.ctx.tokens().authenticate(token.as_bytes()) else {
        tracing::info!(via, "console sign-in refused: unknown token");
        return login_page(StatusCode::UNAUTHORIZED, Some("Unknown token."));
    };
    let s = c.sign_ins.create(
        caller.name,
        caller.scopes,
        secrecy::SecretString::from(token),
    );
    tracing::info!(who = %s.who, via, "console sign-in");
    let cookie = signin::set_cookie(&s.id, guard::over_tls(headers));
    let mut r = with_cookie(Redirect::to("/ui/").into_response(), &cookie);
    // The link's URL carries the token: keep it out of caches and of any
    // Referer (the overview's own answers say the same).
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

pub async fn sign_out(
    State(c): State<Console>,
    Signed(s): Signed,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !s.csrf_ok(Fields::parse(&body).get("csrf")) {
        return (StatusCode::FORBIDDEN, "CSRF token missing or wrong").into_response();
    }
    c.sign_ins.remove(&s.id);
    let cookie = signin::clear_cookie(guard::over_tls(&headers));
    with_cookie(Redirect::to("/ui/login").into_response(), &cookie)
}

fn with_cookie(mut r: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}
