//! The operator console under `/ui/`: server-rendered pages (maud) for the
//! overview, the schedules, the workflows and their runs, the dead-letter workbench and a publish form,
//! with one small embedded script and stylesheet (no CDN, no build step).
//!
//! | module | owns |
//! |---|---|
//! | `signin` | the sign-in table (`SignIn`, `SignIns`), cookies, CSRF tokens |
//! | `guard` | the signed-in extractor, form fields, the checks before an action |
//! | `layout` | the page shell, embedded assets, security headers |
//! | `sample` | the console's broker connection (`ConsoleConnection`); queue depths (and optional management API rates), cached |
//! | `actions` | publishing on behalf of the console, the audit line |
//! | `dead` | the dead-letter workbench on [`warren::dead`] |
//! | `login`, `overview`, `schedules`, `publish` | one page each |
//! | `tasks` | recent tasks and a task's timeline from the task index, the workers |
//! | `workflows` | the workflows with their runs, one run, start and resume (through [`crate::api`]'s functions) |
//!
//! Like [`crate::api`], it only talks to [`crate::context::Ctx`]; the
//! scheduler does not know it exists.

mod actions;
mod dead;
mod guard;
mod layout;
mod login;
mod overview;
mod publish;
mod sample;
mod schedule_edit;
mod schedules;
mod signin;
mod tasks;
mod workflows;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::response::Redirect;
use axum::routing::{any, get, post};
use axum::Router;

use crate::context::Ctx;

/// What every console handler gets.
#[derive(Clone)]
pub struct Console {
    ctx: Arc<Ctx>,
    sign_ins: Arc<signin::SignIns>,
    sampler: Arc<sample::Sampler>,
    conn: Arc<sample::ConsoleConnection>,
    dead: Arc<dead::Workbench>,
}

pub fn router(ctx: Arc<Ctx>) -> Router {
    let limit = ctx.cfg().api.max_body_bytes;
    let state = Console {
        sign_ins: Arc::new(signin::SignIns::new(ctx.cfg().console.session_ttl)),
        sampler: Arc::new(sample::Sampler::new()),
        conn: Arc::default(),
        dead: Arc::default(),
        ctx,
    };
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(overview::page))
        .route("/ui/overview/fragment", get(overview::fragment))
        .route("/ui/login", get(login::form).post(login::sign_in))
        .route("/ui/logout", post(login::sign_out))
        .route("/ui/assets/{file}", get(layout::asset))
        .route("/ui/schedules", get(schedules::page))
        .route(
            "/ui/schedules/edit",
            get(schedule_edit::form).post(schedule_edit::submit),
        )
        .route("/ui/schedules/delete", post(schedule_edit::delete))
        .route("/ui/schedules/{name}/trigger", post(schedules::trigger))
        .route("/ui/schedules/{name}/pause", post(schedules::pause))
        .route("/ui/schedules/{name}/resume", post(schedules::resume))
        .route("/ui/workflows", get(workflows::page))
        .route("/ui/workflows/run", get(workflows::run))
        .route("/ui/workflows/start", post(workflows::start))
        .route("/ui/workflows/resume", post(workflows::resume))
        .route("/ui/publish", get(publish::form).post(publish::submit))
        .route("/ui/tasks", get(tasks::page))
        .route("/ui/tasks/fragment", get(tasks::fragment))
        .route("/ui/tasks/task", get(tasks::task))
        .route("/ui/workers", get(tasks::workers))
        .route("/ui/dead", get(dead::page))
        .route("/ui/dead/group", get(dead::group))
        .route("/ui/dead/message", get(dead::message))
        .route("/ui/dead/replay", post(dead::replay))
        .route("/ui/dead/edit", post(dead::edit))
        .route("/ui/dead/purge", post(dead::purge))
        .route("/ui/dead/search", get(dead::search))
        .route("/ui/{*rest}", any(layout::not_found))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(server_timing))
        .with_state(state)
}

/// `Server-Timing: app;dur=<ms>` on every answer: what the console spent on
/// it (broker samples and dead-letter scans included), visible in the
/// browser's network panel and measured by the render-time test.
async fn server_timing(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let start = std::time::Instant::now();
    let mut r = next.run(req).await;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("app;dur={ms:.1}")) {
        r.headers_mut().insert("server-timing", v);
    }
    r
}

/// The task pages read the task index alone.
impl axum::extract::FromRef<Console> for Arc<crate::context::TaskEvents> {
    fn from_ref(c: &Console) -> Self {
        c.ctx.task_events().clone()
    }
}
