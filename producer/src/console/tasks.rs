//! The Tasks page (recent tasks from this replica's index, filters, search
//! by id, refreshed live), one task's timeline across its attempts, and the
//! Workers page. Reading only: the same index as `GET /v1/tasks...`.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{html, Markup};
use serde::Deserialize;

use super::guard::Signed;
use super::layout::{self, Nav};
use crate::context::TaskEvents;
use crate::tasks::{Query as TaskQuery, State as TaskState, TaskView};

/// Tasks listed on the page.
const SHOWN: usize = 200;
/// Seconds between refreshes of the list.
const REFRESH_SECS: u32 = 3;

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    name: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    since: String,
    /// Search by id: straight to its timeline when known.
    #[serde(default)]
    id: String,
}

impl ListQuery {
    /// The filters, or what is wrong with one.
    fn filters(&self) -> Result<TaskQuery, String> {
        let state = match self.state.as_str() {
            "" => None,
            s => Some(TaskState::parse(s).ok_or_else(|| format!("unknown state {s:?}"))?),
        };
        let since = match self.since.trim() {
            "" => None,
            s => Some(
                crate::api::tasks::parse_since(s, Utc::now()).ok_or_else(|| {
                    format!("since {s:?}: a duration such as 10m, or an RFC 3339 instant")
                })?,
            ),
        };
        Ok(TaskQuery {
            name: Some(self.name.trim().to_owned()).filter(|n| !n.is_empty()),
            state,
            since,
            limit: SHOWN,
        })
    }

    fn query_string(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("name", &self.name)
            .append_pair("state", &self.state)
            .append_pair("since", &self.since)
            .finish()
    }
}

/// Where a task's timeline is.
pub fn task_link(id: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("id", id)
        .finish();
    format!("/ui/tasks/task?{q}")
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(layout::utc).unwrap_or_else(|| "—".into())
}

fn badge(state: &str) -> Markup {
    html! { span class={ "badge " (state) } { (state) } }
}

pub async fn page(
    State(events): State<Arc<TaskEvents>>,
    Signed(s): Signed,
    Query(q): Query<ListQuery>,
) -> Response {
    let id = q.id.trim();
    if !id.is_empty() && events.index().get(id).is_some() {
        return Redirect::to(&task_link(id)).into_response();
    }
    let filters = q.filters();
    let body = html! {
        form.filters method="get" action="/ui/tasks" {
            label { "Id " input name="id" value=(q.id) placeholder="task id"; }
            button type="submit" { "Find" }
        }
        form.filters method="get" action="/ui/tasks" {
            label { "Name " input name="name" value=(q.name) placeholder="email.send or email.*"; }
            label { "State "
                select name="state" {
                    option value="" selected[q.state.is_empty()] { "any" }
                    @for st in TaskState::ALL {
                        option value=(st) selected[q.state == *st] { (st) }
                    }
                }
            }
            label { "Since " input name="since" value=(q.since) placeholder="10m"; }
            button type="submit" { "Filter" }
        }
        @if !id.is_empty() {
            p.notice role="alert" { "No task " code { (id) } " in this replica's index (never seen, or older than its retention)." }
        }
        @match &filters {
            Err(e) => p.error role="alert" { (layout::say(e)) },
            Ok(f) => div #tasks data-refresh=(format!("/ui/tasks/fragment?{}", q.query_string())) data-every=(REFRESH_SECS) {
                (list(&events, f))
            },
        }
    };
    let mut r = layout::page("Tasks", Some(&s), Nav::Tasks, body);
    if filters.is_err() || !id.is_empty() {
        *r.status_mut() = if filters.is_err() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::NOT_FOUND
        };
    }
    r
}

/// The list alone, for the page's live refresh.
pub async fn fragment(
    State(events): State<Arc<TaskEvents>>,
    Signed(_): Signed,
    Query(q): Query<ListQuery>,
) -> Response {
    match q.filters() {
        Ok(f) => layout::html_response(StatusCode::OK, list(&events, &f)),
        Err(e) => layout::html_response(StatusCode::UNPROCESSABLE_ENTITY, layout::say(&e)),
    }
}

fn list(events: &TaskEvents, f: &TaskQuery) -> Markup {
    let index = events.index();
    let tasks = index.list(f);
    html! {
        p.hint {
            (layout::count(index.len() as u64, "task", "tasks")) " indexed on this replica"
            @if let Some(t) = index.newest() { ", newest event " (layout::utc(t)) }
            "."
        }
        @if tasks.is_empty() {
            p.notice { "No task matches." }
        } @else {
            div.scroll { table.tasks {
                thead { tr { th { "Id" } th { "Task" } th { "State" } th.num { "Attempts" } th { "Updated" } th { "Last error" } } }
                tbody { @for t in &tasks {
                    tr data-task=(t.id) data-state=(t.state.as_str()) {
                        td { a href=(task_link(&t.id)) { code { (t.id) } } }
                        td { code { (t.name) } }
                        td { (badge(t.state.as_str())) }
                        td.num { (t.attempts.len()) }
                        td.nowrap { (time(t.updated_at)) }
                        td.reason { @if let Some(e) = t.attempts.iter().rev().find_map(|a| a.error.as_deref()) { (layout::say(e)) } @else { "—" } }
                    }
                } }
            } }
        }
    }
}

#[derive(Deserialize)]
pub struct TaskQueryParam {
    id: String,
}

/// One task's timeline.
pub async fn task(
    State(events): State<Arc<TaskEvents>>,
    Signed(s): Signed,
    Query(q): Query<TaskQueryParam>,
) -> Response {
    let Some(t) = events.index().get(&q.id) else {
        let mut r = layout::page(
            "Task",
            Some(&s),
            Nav::Tasks,
            html! {
                p.notice { "No task " code { (q.id) } " in this replica's index (never seen, or older than its retention)." }
                p { a href="/ui/tasks" { "All tasks" } }
            },
        );
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    };
    layout::page("Task", Some(&s), Nav::Tasks, timeline(&t))
}

fn timeline(t: &TaskView) -> Markup {
    let result = t
        .result
        .as_ref()
        .and_then(|r| serde_json::to_string_pretty(r).ok());
    html! {
        p.hint { a href="/ui/tasks" { "Tasks" } }
        div.cards { div.card.task data-task=(t.id) data-state=(t.state.as_str()) {
            h2 { code { (t.id) } }
            p { "Task " code { (t.name) } " · " (badge(t.state.as_str())) }
            @if let Some(q) = &t.queue { p { "Queue " code { (q) } } }
            @if let Some(n) = t.next_attempt_at { p { "Next attempt " (layout::utc(n)) } }
            @if let Some(tr) = &t.trace_id { p { "Trace " code { (tr) } } }
            @if t.state == TaskState::Dead { p { a href=(dead_link(&t.id)) { "In the dead-letter workbench" } } }
        } }
        h2 { "Timeline" }
        ol.timeline {
            @if let Some(p) = t.published_at {
                li data-event="published" { (layout::utc(p)) " — published by " (t.source.unwrap_or("?")) }
            }
            @for a in &t.attempts {
                li data-event=(a.outcome) data-attempt=(a.attempt) {
                    (time(a.started_at)) " — attempt " (a.attempt) " "
                    (badge(a.outcome))
                    @if let Some(w) = &a.consumer { " on " code { (w) } }
                    @if let Some(d) = a.duration_ms { " in " (d) " ms" }
                    @if let Some(k) = &a.kind { " (" (k) ")" }
                    @if let Some(e) = &a.error { div.reason { (layout::say(e)) } }
                }
            }
        }
        @if let Some(r) = result {
            h2 { "Result" }
            pre.payload { (r) }
        }
    }
}

fn dead_link(id: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("id", id)
        .finish();
    format!("/ui/dead/message?{q}")
}

/// Consumers heard in the last 16 s.
pub async fn workers(State(events): State<Arc<TaskEvents>>, Signed(s): Signed) -> Response {
    let ws = events.index().workers(Utc::now());
    let body = html! {
        div #workers {
            @if ws.is_empty() {
                p.notice { "No consumer heard in the last 16 s (consumers announce themselves every 5 s on the task events stream)." }
            } @else {
                div.scroll { table.workers {
                    thead { tr { th { "Instance" } th { "Host" } th { "Queues" } th.num { "Running" } th.num { "Concurrency" } th.num { "Succeeded" } th.num { "Failed" } th { "Heard" } } }
                    tbody { @for w in &ws {
                        tr data-worker=(w.instance) {
                            td { code { (w.instance) } }
                            td { (w.host) }
                            td { (w.queues.join(", ")) }
                            td.num { (w.running) }
                            td.num { (w.concurrency) }
                            td.num { (layout::num(w.succeeded)) }
                            td.num { (layout::num(w.failed)) }
                            td.nowrap { (time(DateTime::from_timestamp_millis(w.at))) }
                        }
                    } }
                } }
            }
        }
    };
    layout::page("Workers", Some(&s), Nav::Workers, body)
}
