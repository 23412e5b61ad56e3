//! Creating, editing and deleting API schedules from the console (`admin`,
//! CSRF as every form): the definition goes through the same check as
//! `PUT /v1/schedules/{name}`, the next five instants are shown before
//! saving, and a save is conditional on the version the form was opened
//! with (someone else's change in between is refused, not overwritten).

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use maud::html;
use serde::Deserialize;
use serde_json::{json, Value};

use super::guard::{refused, Fields, Signed};
use super::layout::{self, Nav};
use super::signin::SignIn;
use super::Console;
use crate::auth::Scope;
use crate::book::Origin;
use crate::catalog::{self, Change, Resolution};
use crate::config::{Schedule, ScheduleConfig};

/// Instants shown before saving.
const PREVIEW: usize = 5;

#[derive(Deserialize)]
pub struct Which {
    name: Option<String>,
}

/// `GET /ui/schedules/edit[?name=]`: the form, empty or with a stored
/// API schedule.
pub async fn form(State(c): State<Console>, Signed(s): Signed, Query(q): Query<Which>) -> Response {
    let mut f = Fields::parse(b"timezone=UTC&payload=%7B%7D&enabled=on");
    if let Some(name) = q.name.as_deref() {
        let Some(stored) = c.ctx.timetable().catalog().get(name) else {
            return layout::see_other(
                &c,
                &s,
                "/ui/schedules",
                html! { "No API schedule named " code { (name) } "." },
            );
        };
        f = fields_of(&stored.def, stored.version);
    }
    render(&s, &f, None, None)
}

fn fields_of(d: &ScheduleConfig, version: u64) -> Fields {
    let payload = serde_json::to_string_pretty(&d.payload).unwrap_or_else(|_| "{}".into());
    let mut pairs = vec![
        ("name", d.name.clone()),
        ("cron", d.cron.clone()),
        ("timezone", d.timezone.clone()),
        ("task", d.task.clone()),
        ("workflow", d.workflow.clone().unwrap_or_default()),
        ("payload", payload),
        ("version", version.to_string()),
    ];
    if d.enabled {
        pairs.push(("enabled", "on".into()));
    }
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    Fields::parse(body.as_bytes())
}

fn render(s: &SignIn, f: &Fields, error: Option<&str>, preview: Option<&Schedule>) -> Response {
    let can = s.may(Scope::Admin);
    let editing = f.opt("version").is_some();
    let title = if editing {
        "Edit schedule"
    } else {
        "New schedule"
    };
    let body = html! {
        @if let Some(e) = error { p.error role="alert" { (layout::say(e)) } }
        @if !can { p.notice { "Your token lacks the " code { "admin" } " scope: you can fill the form but not save it." } }
        @if let Some(p) = preview {
            section.preview aria-label="Next instants" {
                h2 { "Next " (PREVIEW) " instants" }
                ol { @for t in next_instants(p) {
                    li { time datetime=(layout::utc(t)) { (layout::utc(t)) } " · " (t.with_timezone(&p.spec.tz()).format("%Y-%m-%d %H:%M:%S %Z")) }
                } }
            }
        }
        form.schedule method="post" action="/ui/schedules/edit" {
            (layout::csrf(s))
            @if let Some(v) = f.opt("version") { input type="hidden" name="version" value=(v); }
            label for="name" { "Name" }
            input #name name="name" required placeholder="report-customer-42" readonly[editing] value=(f.get("name").unwrap_or(""));
            div.row {
                div { label for="cron" { "Cron" } input #cron name="cron" required placeholder="0 0 9 * * *" value=(f.get("cron").unwrap_or("")); }
                div { label for="timezone" { "Time zone" } input #timezone name="timezone" placeholder="UTC" value=(f.get("timezone").unwrap_or("UTC")); }
            }
            div.row {
                div { label for="task" { "Task" } input #task name="task" placeholder="report.daily" value=(f.get("task").unwrap_or("")); }
                div { label for="workflow" { "or workflow" } input #workflow name="workflow" value=(f.get("workflow").unwrap_or("")); }
            }
            label for="payload" { "Payload (JSON)" }
            textarea #payload name="payload" rows="6" data-json spellcheck="false" { (f.get("payload").unwrap_or("{}")) }
            p.json-error aria-live="polite" {}
            label { input type="checkbox" name="enabled" checked[f.opt("enabled").is_some()]; " enabled" }
            div.row {
                button.secondary type="submit" name="action" value="preview" { "Show next instants" }
                button type="submit" name="action" value="save" disabled[!can]
                    title=(layout::needs(can, Scope::Admin, "store the schedule; the leader fires it from its next instant")) { "Save" }
            }
        }
    };
    layout::page(title, Some(s), Nav::Schedules, body)
}

fn next_instants(s: &Schedule) -> Vec<chrono::DateTime<Utc>> {
    let mut out = Vec::new();
    let mut cur = Utc::now();
    while out.len() < PREVIEW {
        match s.spec.next_after(cur) {
            Some(t) => {
                out.push(t);
                cur = t;
            }
            None => break,
        }
    }
    out
}

/// The form as the keys of a `[[schedules]]` entry, through the API's
/// parsing (so the same messages name the same keys).
fn definition_of(f: &Fields) -> Result<ScheduleConfig, String> {
    let name = f.get("name").unwrap_or("").trim().to_owned();
    let payload: Value = serde_json::from_str(f.opt("payload").unwrap_or("{}"))
        .map_err(|e| format!("payload, line {}: {e}", e.line()))?;
    let mut obj = json!({
        "cron": f.get("cron").unwrap_or("").trim(),
        "timezone": f.opt("timezone").unwrap_or("UTC").trim(),
        "task": f.get("task").unwrap_or("").trim(),
        "payload": payload,
        "enabled": f.opt("enabled").is_some(),
    });
    if let Some(w) = f.opt("workflow") {
        obj["workflow"] = json!(w.trim());
    }
    crate::api::schedule_definition(&name, obj)
}

/// `POST /ui/schedules/edit`: preview or save.
pub async fn submit(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    let refuse = |e: &str, preview: Option<&Schedule>| {
        let mut r = render(&s, &f, Some(e), preview);
        *r.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
        r
    };
    let def = match definition_of(&f) {
        Ok(d) => d,
        Err(e) => return refuse(&e, None),
    };
    let compiled = match c.ctx.timetable().catalog().check(&def) {
        Ok(sch) => sch,
        Err(problems) => return refuse(&problems.join("; "), None),
    };
    if f.get("action") != Some("save") {
        return render(&s, &f, None, Some(&compiled));
    }
    if let Some(r) = refused(&s, &f, Scope::Admin) {
        return r;
    }
    if c.ctx
        .timetable()
        .book()
        .get(&def.name)
        .is_some_and(|x| x.origin == Origin::Config)
    {
        return refuse(
            "This name belongs to a schedule of the config file: change it there.",
            Some(&compiled),
        );
    }
    // Conditional on what the form showed: a new one must not exist yet.
    let if_version = Some(f.opt("version").and_then(|v| v.parse().ok()).unwrap_or(0));
    let name = def.name.clone();
    let change = Change::Put {
        def: Box::new(def),
        if_version,
        max: Some(c.ctx.cfg().scheduler.max_schedules),
        req: uuid::Uuid::new_v4().to_string(),
    };
    let outcome = write(&c, change).await;
    super::actions::audit(
        &c.ctx,
        &s.who,
        "schedule_put",
        &name,
        1,
        matches!(
            outcome,
            Ok(Resolution::Created { .. } | Resolution::Replaced { .. })
        ),
    );
    match outcome {
        Ok(Resolution::Created { .. } | Resolution::Replaced { .. }) => layout::see_other(
            &c,
            &s,
            "/ui/schedules",
            html! { "Saved schedule " code { (name) } "." },
        ),
        Ok(Resolution::Stale { .. }) => refuse(
            "Someone changed this schedule since you opened it (or it exists already): open it again.",
            Some(&compiled),
        ),
        Ok(Resolution::Full { max }) => refuse(&format!("The catalog is full (scheduler.max_schedules = {max})."), Some(&compiled)),
        Ok(o) => refuse(&format!("Not saved: {o:?}"), Some(&compiled)),
        Err(e) => refuse(&e, Some(&compiled)),
    }
}

/// `POST /ui/schedules/delete`: delete an API schedule.
pub async fn delete(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Admin) {
        return r;
    }
    let name = f.get("name").unwrap_or("").to_owned();
    let change = Change::Delete {
        name: name.clone(),
        if_version: f.opt("version").and_then(|v| v.parse().ok()),
        req: uuid::Uuid::new_v4().to_string(),
    };
    let outcome = write(&c, change).await;
    super::actions::audit(
        &c.ctx,
        &s.who,
        "schedule_delete",
        &name,
        1,
        matches!(outcome, Ok(Resolution::Deleted)),
    );
    let notice = match outcome {
        Ok(Resolution::Deleted) => html! { "Deleted schedule " code { (name) } "." },
        Ok(Resolution::Stale { .. }) => {
            html! { "Not deleted: " code { (name) } " changed meanwhile." }
        }
        Ok(_) => html! { "Not deleted: no API schedule named " code { (name) } "." },
        Err(e) => html! { "Not deleted: " (e) },
    };
    layout::see_other(&c, &s, "/ui/schedules", notice)
}

async fn write(c: &Console, change: Change) -> Result<Resolution, String> {
    let p = c
        .ctx
        .link()
        .publisher()
        .ok_or_else(|| "Not connected to the broker; try again.".to_owned())?;
    catalog::write(
        c.ctx.timetable().catalog(),
        &p.publisher,
        c.ctx.topo().prefix(),
        change,
    )
    .await
    .map_err(|e| e.to_string())
}
