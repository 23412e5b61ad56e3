//! The publish form: one ad-hoc task, validated by the same
//! [`TaskRequest`](crate::request::TaskRequest) rules as `POST /v1/tasks`
//! (the page checks the JSON as it is typed; the server checks again).

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use maud::{html, Markup};
use serde_json::{json, Map, Value};

use super::actions;
use super::guard::{refused, Fields, Signed};
use super::layout::{self, FlashKey, Nav};
use super::signin::SignIn;
use super::Console;
use crate::auth::Scope;
use crate::request::{json_error, TaskRequest};

pub async fn form(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<FlashKey>,
) -> Response {
    let flash = layout::flash(&c, &s, q.flash.as_deref());
    render(&s, flash, None, &Fields::parse(b""))
}

fn render(s: &SignIn, flash: Markup, error: Option<&str>, f: &Fields) -> Response {
    let can = s.may(Scope::Publish);
    let body = html! {
        (flash)
        @if let Some(e) = error { p.error role="alert" { (layout::say(e)) } }
        @if !can { p.notice { "Your token lacks the " code { "publish" } " scope: you can fill the form but not send it." } }
        form.publish method="post" action="/ui/publish" {
            (layout::csrf(s))
            label for="task" { "Task name" }
            input #task name="task" required placeholder="email.send" value=(f.get("task").unwrap_or(""));
            label for="payload" { "Payload (JSON)" }
            textarea #payload name="payload" rows="8" data-json spellcheck="false" { (f.get("payload").unwrap_or("{}")) }
            p.json-error aria-live="polite" {}
            div.row {
                div { label for="delay" { "Delay" } input #delay name="delay" placeholder="90s" value=(f.get("delay").unwrap_or("")); }
                div { label for="at" { "or at (RFC 3339)" } input #at name="at" placeholder="2030-01-01T09:00:00Z" value=(f.get("at").unwrap_or("")); }
            }
            div.row {
                div { label for="priority" { "Priority" } input #priority name="priority" type="number" min="0" max="255" value=(f.get("priority").unwrap_or("")); }
                div { label for="max_attempts" { "Max attempts" } input #max_attempts name="max_attempts" type="number" min="1" value=(f.get("max_attempts").unwrap_or("")); }
            }
            button type="submit" disabled[!can]
                title=(layout::needs(can, Scope::Publish, "publish this task, confirmed by the broker")) { "Publish" }
        }
    };
    layout::page("Publish a task", Some(s), Nav::Publish, body)
}

pub async fn submit(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Publish) {
        return r;
    }
    let refuse = |e: String| {
        let mut r = render(&s, html! {}, Some(&e), &f);
        *r.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
        r
    };
    let request = match request_of(&f) {
        Ok(r) => r,
        Err(e) => return refuse(e),
    };
    let task = match request.into_task(Utc::now()) {
        Ok(t) => t,
        Err(e) => return refuse(e.to_string()),
    };
    let name = task.0.name.clone();
    let result = actions::publish(&c.ctx, &[task]).await;
    actions::audit(&c.ctx, &s.who, "publish", &name, 1, result.is_ok());
    match result {
        Ok(ids) => layout::see_other(
            &c,
            &s,
            "/ui/publish",
            html! { "Published " code { (name) } ": task " code { (ids.join(", ")) } "." },
        ),
        Err(e) => refuse(format!("Not published: {e}")),
    }
}

/// The form's fields as the API's JSON request, so the API's rules and
/// messages apply unchanged.
fn request_of(f: &Fields) -> Result<TaskRequest, String> {
    let mut obj = Map::new();
    obj.insert("task".into(), json!(f.get("task").unwrap_or("").trim()));
    let payload = f.opt("payload").unwrap_or("{}");
    let payload: Value = serde_json::from_str(payload)
        .map_err(|e| format!("Payload, line {}: {}", e.line(), json_error(&e)))?;
    obj.insert("payload".into(), payload);
    for key in ["delay", "at"] {
        if let Some(v) = f.opt(key) {
            obj.insert(key.into(), json!(v));
        }
    }
    for key in ["priority", "max_attempts"] {
        if let Some(v) = f.opt(key) {
            let n: u64 = v
                .parse()
                .map_err(|_| format!("`{key}` must be a whole number, not `{v}`"))?;
            obj.insert(key.into(), json!(n));
        }
    }
    serde_json::from_value(Value::Object(obj)).map_err(|e| json_error(&e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_go_through_the_api_rules() {
        let f =
            Fields::parse(b"task=a.b&payload=%7B%22x%22%3A1%7D&delay=90s&priority=&max_attempts=3");
        let (t, d) = request_of(&f).unwrap().into_task(Utc::now()).unwrap();
        assert_eq!(t.name, "a.b");
        assert_eq!(t.max_attempts, Some(3));
        assert_eq!(d.as_secs(), 90);
        let bad = Fields::parse(b"task=a&payload=%7Bx");
        assert!(request_of(&bad).unwrap_err().starts_with("Payload, line 1"));
        let both = Fields::parse(b"task=a&delay=1s&at=2030-01-01T00:00:00Z");
        let e = request_of(&both)
            .unwrap()
            .into_task(Utc::now())
            .unwrap_err();
        assert_eq!(e.to_string(), "give `delay` or `at`, not both");
        let wild = Fields::parse(b"task=a.%2A");
        assert!(request_of(&wild).unwrap().into_task(Utc::now()).is_err());
        let prio = Fields::parse(b"task=a&priority=high");
        assert!(request_of(&prio).unwrap_err().contains("priority"));
    }
}
