//! The page shell (header, navigation, who is signed in, sign-out), the two
//! embedded assets, and the headers every console answer carries: a strict
//! Content-Security-Policy (no inline script, nothing from elsewhere), no
//! framing, no caching, no referrer.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use maud::{html, Markup, DOCTYPE};

use super::session::Session;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// Which navigation entry is highlighted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Schedules,
    Workflows,
    Dead,
    Publish,
    None,
}

pub fn page(title: &str, who: Option<&Session>, nav: Nav, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · warren" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/ui/" { "warren" }
                    @if let Some(s) = who {
                        nav {
                            a.active[nav == Nav::Overview] href="/ui/" { "Overview" }
                            a.active[nav == Nav::Schedules] href="/ui/schedules" { "Schedules" }
                            a.active[nav == Nav::Workflows] href="/ui/workflows" { "Workflows" }
                            a.active[nav == Nav::Dead] href="/ui/dead" { "Dead letters" }
                            a.active[nav == Nav::Publish] href="/ui/publish" { "Publish" }
                        }
                        form.who method="post" action="/ui/logout" {
                            span title="scopes of your token" {
                                (s.who) " · " (scope_list(s))
                            }
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    html_response(StatusCode::OK, markup)
}

/// Any console HTML with the console's headers.
pub fn html_response(status: StatusCode, markup: Markup) -> Response {
    let mut r = (status, markup.into_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure_headers(h);
    r
}

fn secure_headers(h: &mut axum::http::HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

pub fn message(text: &str) -> Markup {
    html! { p.notice { (text) } }
}

/// A one-line notice after an action (`?flash=` of the redirect).
pub fn flash(text: Option<&str>) -> Markup {
    html! {
        @if let Some(t) = text { p.flash role="status" { (t) } }
    }
}

/// The scopes of a session, as the header shows them.
pub fn scope_list(s: &Session) -> String {
    s.scopes
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A hidden CSRF field for a form of this session.
pub fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

pub fn utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `12s`, `3m 4s`, `2h 5m`: how long ago or ahead, for people.
pub fn span(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().unsigned_abs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A redirect after a POST, with a notice for the next page.
pub fn see_other(path: &str, flash: &str) -> Response {
    let mut target = String::from(path);
    target.push(if path.contains('?') { '&' } else { '?' });
    target.push_str("flash=");
    target.extend(form_urlencoded::byte_serialize(flash.as_bytes()));
    axum::response::Redirect::to(&target).into_response()
}

pub async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    secure_headers(h);
    // The assets change only with the binary.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=300"),
    );
    r
}
