//! The schedules page: every schedule with its cron, zone, next fire (UTC
//! and the schedule's local time), last fire, lateness and misfire policy,
//! and the actions on it.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use chrono::Utc;
use maud::{html, Markup};

use super::actions;
use super::guard::{refused, Fields, Signed};
use super::layout::{self, FlashKey, Nav};
use super::Console;
use crate::auth::Scope;

/// Schedules the page shows.
const PAGE: usize = 500;

pub async fn page(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<FlashKey>,
) -> Response {
    let body = html! {
        (layout::flash(&c, &s, q.flash.as_deref()))
        (table(&c, &s))
    };
    layout::page("Schedules", Some(&s), Nav::Schedules, body)
}

/// One schedule's row: what it is, when it fires, and what may be done.
fn row(
    c: &Console,
    s: &super::signin::SignIn,
    sch: &crate::config::Schedule,
    now: chrono::DateTime<Utc>,
) -> Markup {
    let can_publish = s.may(Scope::Publish);
    let can_admin = s.may(Scope::Admin);
    html! {
        @let st = c.ctx.timetable().status_of(sch.name());
        @let next = if sch.cfg.enabled && !st.paused { st.next_fire.or_else(|| sch.spec.next_after(now)) } else { None };
        @let late = next.map(|n| now - n).filter(|d| d.num_seconds() >= 2);
        tr data-schedule=(sch.name()) data-paused=(st.paused) {
            td.name { (sch.name()) @if sch.origin == crate::book::Origin::Api { " " span.hint title="created through the API or the console" { "(api)" } } }
            td { code { (sch.target()) } }
            td { code { (sch.cfg.cron) } }
            td { (sch.cfg.timezone) }
            td.next { @if let Some(n) = next {
                time datetime=(layout::utc(n)) { (layout::utc(n)) } br;
                span.hint { (n.with_timezone(&sch.spec.tz()).format("%Y-%m-%d %H:%M:%S %Z")) }
            } @else { "—" } }
            td { @if let Some(l) = st.last_fired {
                time datetime=(layout::utc(l)) { (layout::utc(l)) } br; span.hint { (layout::span(now - l)) " ago" }
            } @else { "never (here)" } }
            td.late[late.is_some()] {
                @if let Some(l) = late { (layout::span(l)) } @else if next.is_none() { "—" } @else { "on time" }
            }
            td { (json_name(&sch.cfg.misfire)) " · grace " (humantime::format_duration(sch.cfg.misfire_grace)) }
            td.state {
                @if !sch.cfg.enabled { "disabled" }
                @else if st.paused { span.warn { "paused" } }
                @else { "enabled" }
            }
            td.actions {
                // Switched off in the config: nothing to trigger, pause or resume here.
                @if !sch.cfg.enabled {
                    span.hint title="enabled = false in the schedule's config" { "off in the config" }
                } @else {
                    form method="post" action=(format!("/ui/schedules/{}/trigger", sch.name())) {
                        (layout::csrf(s))
                        button type="submit" disabled[!can_publish]
                            title=(layout::needs(can_publish, Scope::Publish, "publish one task now, as a manual fire")) { "Trigger now" }
                    }
                    " "
                    @let (verb, label) = if st.paused { ("resume", "Resume") } else { ("pause", "Pause") };
                    form method="post" action=(format!("/ui/schedules/{}/{verb}", sch.name())) {
                        (layout::csrf(s))
                        button.secondary type="submit" disabled[!can_admin]
                            title=(layout::needs(can_admin, Scope::Admin, "instants while paused are skipped")) { (label) }
                    }
                }
                @if sch.origin == crate::book::Origin::Api {
                    " "
                    a.button.secondary href=(format!("/ui/schedules/edit?name={}", sch.name())) { "Edit" }
                    " "
                    form method="post" action="/ui/schedules/delete" {
                        (layout::csrf(s))
                        input type="hidden" name="name" value=(sch.name());
                        input type="hidden" name="version" value=(sch.version);
                        button.secondary type="submit" disabled[!can_admin]
                            title=(layout::needs(can_admin, Scope::Admin, "delete this schedule for every replica")) { "Delete" }
                    }
                }
            }
        }
    }
}

fn table(c: &Console, s: &super::signin::SignIn) -> Markup {
    // One page: the API lists every schedule (`?after=`).
    let set = c.ctx.timetable().book().page("", None, PAGE);
    let total = c.ctx.timetable().book().len();
    let now = Utc::now();
    let can_admin = s.may(Scope::Admin);
    html! {
        p { a.button href="/ui/schedules/edit" title=(layout::needs(can_admin, Scope::Admin, "create a schedule stored in RabbitMQ")) { "New schedule" } }
        @if set.is_empty() {
            p.notice { "No schedules yet: " code { "[[schedules]]" } " in the producer's config, or a new one here." }
        } @else {
            p.hint {
                (layout::count(total as u64, "schedule", "schedules"))
                @if total > set.len() { " (the first " (set.len()) " shown; " code { "GET /v1/schedules?after=" } " lists them all)" }
                " · this replica "
                @if c.ctx.leadership().is_leader() { strong { "leads" } " and fires them" } @else { "is a standby (another replica fires)" }
            }
            (layout::scope_note(s, &[("trigger", Scope::Publish), ("pause or resume", Scope::Admin)]))
            div.scroll { table.schedules {
                thead { tr {
                    th { "Name" } th { "Task" } th { "Cron" } th { "Zone" }
                    th { "Next fire (UTC, local)" } th { "Last fire" }
                    th { "Late by" } th { "Misfire" } th { "State" } th { "Actions" }
                } }
                tbody {
                    @for sch in set.iter() { (row(c, s, sch, now)) }
                }
            } }
        }
    }
}

pub async fn trigger(
    State(c): State<Console>,
    Signed(s): Signed,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Publish) {
        return r;
    }
    let Some(sch) = c.ctx.timetable().book().get(&name) else {
        return layout::see_other(
            &c,
            &s,
            "/ui/schedules",
            html! { "No schedule named " code { (name) } "." },
        );
    };
    let id = format!("{}@manual-{}", sch.name(), uuid::Uuid::new_v4());
    let result = match &sch.cfg.workflow {
        Some(w) => match c.ctx.link().publisher() {
            Some(p) => {
                crate::workflow::start_scheduled(&p.publisher, c.ctx.topo(), w, &sch.payload, &id)
                    .await
                    .map(|()| vec![id.clone()])
                    .map_err(|e| e.to_string())
            }
            None => Err("not connected to the broker".to_owned()),
        },
        None => {
            let task = sch.task(id.clone());
            actions::publish(&c.ctx, &[(task, std::time::Duration::ZERO)]).await
        }
    };
    actions::audit(&c.ctx, &s.who, "trigger", &name, 1, result.is_ok());
    match result {
        Ok(_) => layout::see_other(
            &c,
            &s,
            "/ui/schedules",
            html! { "Triggered " code { (name) } ": task " code { (id) } "." },
        ),
        Err(e) => layout::see_other(
            &c,
            &s,
            "/ui/schedules",
            html! { code { (name) } " was not triggered: " (layout::say(&e)) },
        ),
    }
}

/// A config enum as the config file spells it (`fire_once`).
fn json_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub async fn pause(
    State(c): State<Console>,
    Signed(s): Signed,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    pause_or_resume(&c, &s, &name, &body, true).await
}

pub async fn resume(
    State(c): State<Console>,
    Signed(s): Signed,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    pause_or_resume(&c, &s, &name, &body, false).await
}

/// Through the leader (`Ctx::pause` / `resume`), like the API: the state
/// survives a failover.
async fn pause_or_resume(
    c: &Console,
    s: &super::signin::SignIn,
    name: &str,
    body: &[u8],
    pause: bool,
) -> Response {
    let f = Fields::parse(body);
    if let Some(r) = refused(s, &f, Scope::Admin) {
        return r;
    }
    let (action, done) = if pause {
        ("pause", "Paused")
    } else {
        ("resume", "Resumed")
    };
    let r = if pause {
        c.ctx.pause(name).await
    } else {
        c.ctx.resume(name).await
    };
    actions::audit(
        &c.ctx,
        &s.who,
        action,
        name,
        usize::from(r.is_ok()),
        r.is_ok(),
    );
    match r {
        Ok(()) => layout::see_other(
            c,
            s,
            "/ui/schedules",
            html! { (done) " " code { (name) } "." },
        ),
        Err(e) => layout::see_other(
            c,
            s,
            "/ui/schedules",
            html! { code { (name) } ": " (action) " failed: " (layout::say(&e.to_string())) },
        ),
    }
}
