//! Sign-in by pasting an API token (the token goes in a POST body, never a
//! URL; it is compared and forgotten, the session keeps only who and what
//! scopes), and sign-out.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;

use super::guard::{self, Fields, Signed};
use super::layout::{self, Nav};
use super::{session, Console};

pub async fn form(State(c): State<Console>, headers: HeaderMap) -> Response {
    // Already signed in: straight to the overview.
    if guard::session_id(&headers).is_some_and(|id| c.sessions.touch(id).is_some()) {
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
    let token = fields.get("token").unwrap_or("").trim();
    let Some(caller) = c.ctx.tokens().authenticate(token.as_bytes()) else {
        tracing::info!("console sign-in refused: unknown token");
        return login_page(StatusCode::UNAUTHORIZED, Some("Unknown token."));
    };
    let s = c
        .sessions
        .create(caller.name, caller.scopes, session::Token::new(token));
    tracing::info!(who = %s.who, "console sign-in");
    let cookie = session::set_cookie(&s.id, guard::over_tls(&headers));
    with_cookie(Redirect::to("/ui/").into_response(), &cookie)
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
    c.sessions.remove(&s.id);
    let cookie = session::clear_cookie(guard::over_tls(&headers));
    with_cookie(Redirect::to("/ui/login").into_response(), &cookie)
}

fn with_cookie(mut r: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}
