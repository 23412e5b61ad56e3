//! The page shell (header, navigation, who is signed in, sign-out), the two
//! embedded assets, and the headers every console answer carries: a strict
//! Content-Security-Policy (no inline script, nothing from elsewhere), no
//! framing, no caching, no referrer.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use maud::{html, Markup, DOCTYPE};

use super::signin::SignIn;
use super::Console;
use crate::auth::Scope;

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
    Tasks,
    Workers,
    None,
}

pub fn page(title: &str, who: Option<&SignIn>, nav: Nav, body: Markup) -> Response {
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
                            a.active[nav == Nav::Tasks] href="/ui/tasks" { "Tasks" }
                            a.active[nav == Nav::Workers] href="/ui/workers" { "Workers" }
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

pub fn message(text: Markup) -> Markup {
    html! { p.notice { (text) } }
}

/// The one-line notice an action left for this page: `key` is the
/// one-time id in `?flash=` of the redirect, looked up in the session, so
/// an unknown or foreign key (or text put in the URL) shows nothing.
pub fn flash(c: &Console, s: &SignIn, key: Option<&str>) -> Markup {
    let text = key.and_then(|k| c.sign_ins.take_flash(&s.id, k));
    html! {
        @if let Some(t) = text { p.flash role="status" { (t) } }
    }
}

/// A message written elsewhere (an error of the API layer, the broker) for
/// a page: its `quoted` names set as code rather than shown with their
/// backticks; everything escaped.
pub fn say(text: &str) -> Markup {
    html! {
        @for (i, part) in text.split('`').enumerate() {
            @if i % 2 == 1 { code { (part) } } @else { (part) }
        }
    }
}

/// `1,234,567`: counts an operator reads at a glance.
pub fn num(n: impl Into<u64>) -> String {
    let digits = n.into().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1 dead letter`, `2 dead letters`, `12,000 dead letters`.
pub fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{} {}", num(n), if n == 1 { one } else { many })
}

/// The tooltip of an action button: what it does, or, disabled, which
/// scope it needs.
pub fn needs(can: bool, scope: Scope, does: &str) -> String {
    if can {
        does.to_owned()
    } else {
        format!("needs the {} scope", scope.name())
    }
}

/// The scopes of a session, as the header shows them.
pub fn scope_list(s: &SignIn) -> String {
    s.scopes
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the session's token may not do on this page, in words (a phone
/// shows no tooltips): "Your token (read) cannot replay (needs publish),
/// nor purge (needs admin)." Nothing when it may do all.
pub fn scope_note(s: &SignIn, needs: &[(&str, Scope)]) -> Markup {
    let missing: Vec<_> = needs.iter().filter(|(_, sc)| !s.may(*sc)).collect();
    html! {
        @if !missing.is_empty() {
            p.hint.scopes {
                "Your token (" (scope_list(s)) ") cannot "
                @for (i, (what, sc)) in missing.iter().enumerate() {
                    @if i > 0 { ", nor " }
                    (what) " (needs " code { (sc.name()) } ")"
                }
                "."
            }
        }
    }
}

/// A hidden CSRF field for a form of this session.
pub fn csrf(s: &SignIn) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

pub fn utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// An epoch number as RFC 3339 UTC (`ms` for milliseconds), or `None`
/// when it is not a plausible instant.
pub fn epoch(n: i64, ms: bool) -> Option<String> {
    let t = if ms {
        DateTime::<Utc>::from_timestamp_millis(n)?
    } else {
        DateTime::<Utc>::from_timestamp(n, 0)?
    };
    let f = if ms {
        SecondsFormat::Millis
    } else {
        SecondsFormat::Secs
    };
    Some(t.to_rfc3339_opts(f, true))
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

/// A redirect after a POST, with a notice for the next page (kept in the
/// session; the URL carries only its one-time id).
pub fn see_other(c: &Console, s: &SignIn, path: &str, notice: Markup) -> Response {
    let mut target = String::from(path);
    if let Some(key) = c.sign_ins.put_flash(&s.id, notice) {
        target.push(if path.contains('?') { '&' } else { '?' });
        target.push_str("flash=");
        target.push_str(&key);
    }
    axum::response::Redirect::to(&target).into_response()
}

/// `?flash=` of a page: the one-time id of a notice (see [`flash`]).
#[derive(serde::Deserialize, Default)]
pub struct FlashKey {
    pub flash: Option<String>,
}

/// Any other path under `/ui/`: a console page saying so, with the way
/// back (the navigation when signed in).
pub async fn not_found(
    axum::extract::State(c): axum::extract::State<Console>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let who = super::signin::session_id(&headers).and_then(|id| c.sign_ins.touch(id));
    let body = html! {
        p.notice { "There is no console page at " code { (uri.path()) } "." }
        p { a href="/ui/" { "Overview" } " · " a href="/ui/dead" { "Dead letters" } " · " a href="/ui/schedules" { "Schedules" } }
    };
    let mut r = page("Not found", who.as_ref(), Nav::None, body);
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_at_a_glance() {
        assert_eq!(num(0u64), "0");
        assert_eq!(num(999u64), "999");
        assert_eq!(num(1000u64), "1,000");
        assert_eq!(num(100_000u64), "100,000");
        assert_eq!(num(1_234_567u64), "1,234,567");
        assert_eq!(count(1u64, "dead letter", "dead letters"), "1 dead letter");
        assert_eq!(count(0u64, "dead letter", "dead letters"), "0 dead letters");
        assert_eq!(
            count(2500u64, "dead letter", "dead letters"),
            "2,500 dead letters"
        );
    }

    #[test]
    fn backticks_become_code_and_everything_is_escaped() {
        assert_eq!(
            say("no workflow named `<b>x</b>` here").into_string(),
            "no workflow named <code>&lt;b&gt;x&lt;/b&gt;</code> here"
        );
        assert_eq!(say("plain").into_string(), "plain");
    }

    #[test]
    fn epoch_numbers_as_rfc3339() {
        assert_eq!(
            epoch(1_700_000_000, false).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(
            epoch(1_700_000_000_123, true).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(epoch(i64::MAX, false), None);
    }
}
