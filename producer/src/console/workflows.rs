//! The workflow pages: the configured workflows with their recent runs and a
//! start form, and one run with every step. Reading and acting go through
//! the API's functions ([`crate::api::workflows`]): the same snapshot view,
//! the same resume rule, the same start and resume messages.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use maud::{html, Markup};
use serde::Deserialize;

use super::guard::{refused, Fields, Signed};
use super::layout::{self, Nav};
use super::signin::SignIn;
use super::Console;
use crate::api::workflows as api;
use crate::auth::Scope;
use crate::request::json_error;
use crate::workflow::run::{Exec, Run, StepRun};
use crate::workflow::{self, Workflow};

/// Runs listed per workflow on the list page.
const RECENT: usize = 20;
/// A step result is shown up to this many bytes of pretty JSON.
const RESULT_SHOWN: usize = 4096;

#[derive(Deserialize)]
pub struct ListQuery {
    flash: Option<String>,
}

pub async fn page(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<ListQuery>,
) -> Response {
    let flash = layout::flash(&c, &s, q.flash.as_deref());
    render_list(&c, &s, flash, None).await
}

/// A start form sent back with what was typed and what is wrong with it.
struct Refused<'a> {
    workflow: &'a str,
    fields: &'a Fields,
    error: String,
}

async fn render_list(c: &Console, s: &SignIn, flash: Markup, bad: Option<Refused<'_>>) -> Response {
    let set = c.ctx.workflows();
    // One peek serves every workflow's table; without it the page still
    // shows the definitions and the start forms.
    let snap = if set.is_empty() {
        Ok(None)
    } else {
        api::view(&c.ctx).map(Some)
    };
    let body = html! {
        (flash)
        @if set.is_empty() {
            p.notice { "No workflows configured (" code { "[[workflows]]" } " in the producer's config)." }
        }
        @if !set.is_empty() { (layout::scope_note(s, &[("start a run", Scope::Publish)])) }
        @if let Err(e) = &snap { p.error role="alert" { "Runs unavailable: " (layout::say(e.message())) } }
        @if let Ok(Some(view)) = &snap { @if let Some(t) = view.read(|r| r.as_of()) {
            p.hint { "Run state as of " (layout::utc(t)) " (the coordinator's latest change)." }
        } }
        @for wf in set.iter() {
            @let runs = match &snap { Ok(Some(view)) => api::recent_runs(view, &wf.name, RECENT), _ => Vec::new() };
            @let mine = bad.as_ref().filter(|b| b.workflow == wf.name);
            section.workflow data-workflow=(wf.name) {
                h2 { (wf.name) }
                p.hint {
                    @for (i, st) in wf.steps.iter().enumerate() {
                        @if i > 0 { " · " }
                        code { (st.name) } " → " (st.task)
                        @if !st.after.is_empty() { " (after " (st.after.join(", ")) ")" }
                    }
                }
                (start_form(s, wf, mine))
                @if snap.is_ok() { (runs_table(&runs)) }
            }
        }
    };
    let mut r = layout::page("Workflows", Some(s), Nav::Workflows, body);
    if bad.is_some() {
        *r.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
    }
    r
}

fn start_form(s: &SignIn, wf: &Workflow, bad: Option<&Refused<'_>>) -> Markup {
    let can = s.may(Scope::Publish);
    let typed = |k: &str| bad.and_then(|b| b.fields.get(k)).map(str::to_owned);
    let area = format!("input-{}", wf.name);
    let id = format!("id-{}", wf.name);
    html! {
        @if let Some(b) = bad { p.error role="alert" { (layout::say(&b.error)) } }
        form.publish method="post" action="/ui/workflows/start" {
            (layout::csrf(s))
            input type="hidden" name="workflow" value=(wf.name);
            label for=(area) { "Input (JSON)" }
            textarea id=(area) name="input" rows="4" data-json spellcheck="false" { (typed("input").unwrap_or_else(|| "{}".into())) }
            p.json-error aria-live="polite" {}
            label for=(id) { "Run id (optional)" }
            input id=(id) name="id" placeholder="generated" value=(typed("id").unwrap_or_default());
            button type="submit" disabled[!can]
                title=(layout::needs(can, Scope::Publish, "start a run with this input")) { "Start run" }
        }
    }
}

fn runs_table(runs: &[Run]) -> Markup {
    let now = Utc::now();
    html! {
        @if runs.is_empty() {
            p.notice { "No runs retained." }
        } @else {
            div.scroll { table.runs {
                thead { tr { th { "Run" } th { "State" } th { "Started" } th { "Duration" } th { "Failed step" } } }
                tbody {
                    @for r in runs {
                        tr data-run=(r.id) data-state=(r.status.name()) {
                            td.name { a href=(run_link(&r.workflow, &r.id)) { (r.id) } }
                            td.state { (state_badge(r.status.name())) }
                            td { (layout::utc(r.started_at)) }
                            td { (duration(r.started_at, r.finished_at, now)) }
                            td { @if let Some(f) = &r.failure {
                                code { (f.step) }
                                @if let Some(e) = &f.error { ": " (e) }
                            } @else { "—" } }
                        }
                    }
                }
            } }
        }
    }
}

fn run_link(workflow: &str, id: &str) -> String {
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("workflow", workflow)
        .append_pair("id", id)
        .finish();
    format!("/ui/workflows/run?{q}")
}

fn duration(start: DateTime<Utc>, end: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match end {
        Some(e) => layout::span(e - start),
        None => format!("{} so far", layout::span(now - start)),
    }
}

fn state_badge(state: &str) -> Markup {
    let warn = matches!(
        state,
        "failed" | "compensating" | "compensated" | "compensation_failed"
    );
    html! { @if warn { span.warn { (state) } } @else { (state) } }
}

#[derive(Deserialize)]
pub struct RunQuery {
    workflow: String,
    id: String,
    flash: Option<String>,
}

pub async fn run(
    State(c): State<Console>,
    Signed(s): Signed,
    Query(q): Query<RunQuery>,
) -> Response {
    let found = match api::definition(&c.ctx, &q.workflow) {
        Ok(_) => api::view(&c.ctx).and_then(|view| {
            let as_of = view.read(|r| r.as_of());
            api::find(view, &q.workflow, &q.id).map(|r| (r, as_of))
        }),
        Err(e) => Err(e),
    };
    let (run, as_of) = match found {
        Ok(v) => v,
        Err(e) => {
            let mut r = layout::page(
                "Workflow run",
                Some(&s),
                Nav::Workflows,
                html! { p.error role="alert" { (layout::say(e.message())) } p { a href="/ui/workflows" { "All workflows" } } },
            );
            *r.status_mut() = e.status();
            return r;
        }
    };
    let now = Utc::now();
    let can = s.may(Scope::Publish);
    let body = html! {
        (layout::flash(&c, &s, q.flash.as_deref()))
        p.hint {
            a href="/ui/workflows" { "Workflows" } " · " code { (run.workflow) }
            @if let Some(t) = as_of { " · as of " (layout::utc(t)) }
        }
        table.kv { tbody {
            tr { th { "State" } td data-run-state=(run.status.name()) { (state_badge(run.status.name())) } }
            tr { th { "Started" } td { (layout::utc(run.started_at)) } }
            tr { th { "Duration" } td { (duration(run.started_at, run.finished_at, now)) } }
            @if run.generation > 0 { tr { th { "Resumed" } td { (layout::count(u64::from(run.generation), "time", "times")) } } }
            tr { th { "Input" } td { pre { (bounded_json(&run.input)) } } }
            @if let Some(f) = &run.failure {
                tr { th { "Failed step" } td.failure {
                    code { (f.step) }
                    @if let Some(k) = &f.dead_kind { " (" (k) ")" }
                    @if let Some(e) = &f.error { ": " (e) }
                } }
            }
            @if let Some(f) = &run.compensation_failure {
                tr { th { "Failed compensation" } td { code { (f.step) } @if let Some(e) = &f.error { ": " (e) } } }
            }
        } }
        @if api::resumable(&run).is_ok() {
            form.resume method="post" action="/ui/workflows/resume" {
                (layout::csrf(&s))
                input type="hidden" name="workflow" value=(run.workflow);
                input type="hidden" name="id" value=(run.id);
                button type="submit" disabled[!can]
                    title=(layout::needs(can, Scope::Publish, "rerun the failed step and what depends on it")) { "Resume" }
            }
        }
        div.scroll { table.steps {
            thead { tr {
                th { "Step" } th { "State" } th { "Attempts" } th { "Task id" }
                th { "Started" } th { "Finished" } th { "Error" } th { "Result" }
            } }
            tbody {
                @for st in &run.steps {
                    (step_row(&st.name, st.state.name(), st.exec.as_ref(), Some(st)))
                    @if let Some(comp) = &st.compensation {
                        (step_row(&format!("{} (compensation)", st.name), comp.state.name(), Some(comp), None))
                    }
                }
            }
        } }
    };
    layout::page(&format!("Run {}", run.id), Some(&s), Nav::Workflows, body)
}

fn step_row(name: &str, state: &str, exec: Option<&Exec>, step: Option<&StepRun>) -> Markup {
    html! {
        tr data-step=(name) data-state=(state) {
            td.name { (name) }
            td.state { (state_badge(state)) }
            td { @if let Some(e) = exec { (e.attempts) } @else { "—" } }
            td { @if let Some(e) = exec { a href=(super::tasks::task_link(&e.task_id)) { code { (e.task_id) } } } @else { "—" } }
            td { @if let Some(e) = exec { (layout::utc(e.started_at)) } @else { "—" } }
            td { @if let Some(t) = exec.and_then(|e| e.finished_at) { (layout::utc(t)) } @else { "—" } }
            td.error { @if let Some(e) = exec {
                @if let Some(k) = &e.dead_kind { (k) ": " }
                @if let Some(m) = &e.error { (m) }
            } }
            td { @if let Some(st) = step {
                @if let Some(v) = &st.result { pre { (bounded_json(v)) } }
                @else if st.result_dropped { "(too large, dropped)" }
            } }
        }
    }
}

/// Pretty JSON cut at [`RESULT_SHOWN`] bytes (on a character boundary),
/// saying how much there was; maud escapes it.
fn bounded_json(v: &serde_json::Value) -> String {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    if text.len() <= RESULT_SHOWN {
        return text;
    }
    let mut cut = RESULT_SHOWN;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}\n… ({} bytes in all)", &text[..cut], text.len())
}

pub async fn start(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Publish) {
        return r;
    }
    let name = f.get("workflow").unwrap_or("").to_owned();
    let wf = match api::definition(&c.ctx, &name) {
        Ok(wf) => wf,
        Err(e) => return layout::see_other(&c, &s, "/ui/workflows", layout::say(e.message())),
    };
    let refuse = |error: String| Refused {
        workflow: &wf.name,
        fields: &f,
        error,
    };
    let input: serde_json::Value = match serde_json::from_str(f.opt("input").unwrap_or("null")) {
        Ok(v) => v,
        Err(e) => {
            let why = format!("Input, line {}: {}", e.line(), json_error(&e));
            return render_list(&c, &s, html! {}, Some(refuse(why))).await;
        }
    };
    let id = match api::run_id(f.opt("id").map(str::to_owned)) {
        Ok(id) => id,
        Err(e) => return render_list(&c, &s, html! {}, Some(refuse(e.message().to_owned()))).await,
    };
    let (props, msg) = workflow::start_message(&wf.name, &input, &id, None);
    let sent = api::send(
        &c.ctx,
        &s.who,
        "workflow_start",
        &wf.name,
        warren::workflow::START,
        props,
        &msg,
    )
    .await;
    match sent {
        Ok(()) => layout::see_other(
            &c,
            &s,
            &run_link(&wf.name, &id),
            html! { "Started run " code { (id) } "." },
        ),
        Err(e) => {
            let why = format!("Not started: {}", e.message());
            render_list(&c, &s, html! {}, Some(refuse(why))).await
        }
    }
}

pub async fn resume(State(c): State<Console>, Signed(s): Signed, body: Bytes) -> Response {
    let f = Fields::parse(&body);
    if let Some(r) = refused(&s, &f, Scope::Publish) {
        return r;
    }
    let (name, id) = (f.get("workflow").unwrap_or(""), f.get("id").unwrap_or(""));
    let back = run_link(name, id);
    let checked = match api::definition(&c.ctx, name) {
        Ok(_) => api::view(&c.ctx)
            .and_then(|view| api::find(view, name, id))
            .and_then(|r| api::resumable(&r)),
        Err(e) => Err(e),
    };
    if let Err(e) = checked {
        return layout::see_other(
            &c,
            &s,
            &back,
            html! { "Not resumed: " (layout::say(e.message())) },
        );
    }
    let (props, msg) = workflow::resume_message(name, id);
    match api::send(
        &c.ctx,
        &s.who,
        "workflow_resume",
        name,
        warren::workflow::RESUME,
        props,
        &msg,
    )
    .await
    {
        Ok(()) => layout::see_other(&c, &s, &back, html! { "Resumed run " code { (id) } "." }),
        Err(e) => layout::see_other(
            &c,
            &s,
            &back,
            html! { "Not resumed: " (layout::say(e.message())) },
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_large_result_is_cut_on_a_character_boundary_and_says_so() {
        let small = serde_json::json!({"a": 1});
        assert_eq!(bounded_json(&small), "{\n  \"a\": 1\n}");
        let big = serde_json::json!({"s": "é".repeat(RESULT_SHOWN)});
        let shown = bounded_json(&big);
        let full = serde_json::to_string_pretty(&big).unwrap().len();
        assert!(
            shown.ends_with(&format!("… ({full} bytes in all)")),
            "{shown}"
        );
        assert!(shown.len() < RESULT_SHOWN + 40);
    }
}
