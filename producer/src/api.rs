//! The HTTP API under `/v1`: publish tasks, list schedules, trigger a
//! schedule now; the dead-letter endpoints live in [`dead`]. Each handler names the scope it needs as a
//! [`RequireScope`] argument ([`crate::auth`]); every error is a JSON body
//! `{"error": code, "message": text}` ([`crate::error`]).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{SecondsFormat, Utc};
use serde_json::json;

use crate::audit;
use crate::auth::{Admin, Caller, Publish, Read, RequireScope, TokenStore};
use crate::context::{ApiPublisher, Ctx, Leadership, Replicas, TaskEvents, Timetable};
use crate::control::ControlError;
use crate::error::ApiError;
use crate::metrics::Source;
use crate::request::{pairs, RequestError, TaskRequest};

mod dead;
mod schedules;
pub(crate) mod tasks;

pub(crate) use schedules::definition_value as schedule_definition;
pub(crate) mod workflows;

/// The API's router state: the whole context, of which each handler takes
/// the part it needs as its `State` (`FromRef`); a handler that needs
/// several takes `State<Arc<Ctx>>`. A type of this crate, so that it may
/// give out `Arc`s of the parts.
#[derive(Clone)]
pub struct ApiState(Arc<Ctx>);

impl FromRef<ApiState> for Arc<Ctx> {
    fn from_ref(s: &ApiState) -> Arc<Ctx> {
        s.0.clone()
    }
}

/// The extractor of [`crate::auth`] finds the tokens in force here.
impl FromRef<ApiState> for TokenStore {
    fn from_ref(s: &ApiState) -> TokenStore {
        s.0.tokens().clone()
    }
}

impl FromRef<ApiState> for Arc<Timetable> {
    fn from_ref(s: &ApiState) -> Arc<Timetable> {
        s.0.timetable().clone()
    }
}

impl FromRef<ApiState> for Arc<Leadership> {
    fn from_ref(s: &ApiState) -> Arc<Leadership> {
        s.0.leadership().clone()
    }
}

impl FromRef<ApiState> for Arc<Replicas> {
    fn from_ref(s: &ApiState) -> Arc<Replicas> {
        s.0.replicas().clone()
    }
}

impl FromRef<ApiState> for Arc<TaskEvents> {
    fn from_ref(s: &ApiState) -> Arc<TaskEvents> {
        s.0.task_events().clone()
    }
}

pub fn router(ctx: Arc<Ctx>) -> Router {
    let limit = ctx.cfg().api.max_body_bytes;
    Router::new()
        .route("/v1/tasks", post(post_tasks).get(tasks::list))
        .route("/v1/replicas", get(get_replicas))
        .route("/v1/schedules/{name}/trigger", post(trigger))
        .route("/v1/schedules/{name}/pause", post(pause))
        .route("/v1/schedules/{name}/resume", post(resume))
        .merge(schedules::routes())
        .merge(dead::routes())
        .merge(workflows::routes())
        .merge(tasks::routes())
        .layer(DefaultBodyLimit::max(limit))
        .with_state(ApiState(ctx))
}

fn body_error(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body exceeds api.max_body_bytes",
        )
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", r.body_text())
    }
}

/// The publisher, or 503 while the broker connection is down or blocked.
fn publisher(ctx: &Ctx) -> Result<ApiPublisher, ApiError> {
    let p = ctx.link().publisher().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "not connected to the broker; retry later",
        )
    })?;
    if p.blocked.is_blocked() {
        return Err(blocked_error());
    }
    Ok(p)
}

fn blocked_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_blocked",
        "the broker is blocking publishers (resource alarm); retry later \
         (a task sent just before the block may still be delivered once it clears: \
         set your own `id` to recognise it)",
    )
}

/// The caller's W3C trace context (`traceparent` + `tracestate` request
/// headers); one the W3C says to ignore is ignored (the tasks then start
/// their own).
fn request_trace(headers: &HeaderMap) -> Option<warren::trace::TraceContext> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    warren::trace::TraceContext::parse(
        get(warren::trace::TRACEPARENT)?,
        get(warren::trace::TRACESTATE),
    )
}

async fn post_tasks(
    scope: RequireScope<Publish>,
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let (items, single) = task_items(&body, ctx.cfg().api.max_batch)?;
    let tasks = tasks_of(items, single, request_trace(&headers).as_ref())?;
    let p = publisher(&ctx)?;
    // The whole batch in flight at once (it is bounded by api.max_batch):
    // a smaller window would make every request wait for confirms
    // mid-batch, and sequential clients pay that per request.
    let publish = p
        .publisher
        .publish_tasks(ctx.topo(), pairs(&tasks), tasks.len());
    let n = tasks.len();
    let Some(results) = p
        .unless_blocked(ctx.metrics(), Source::Api, n, publish)
        .await
    else {
        audit_publish(&ctx, scope.caller(), &tasks, audit::FAILED, 0);
        return Err(blocked_error());
    };
    answer_published(&ctx, scope.caller(), &tasks, results)
}

/// The body's task objects (one object or an array of them) and whether it
/// was a single object; 400/413/422 for a body that is not.
fn task_items(body: &[u8], max_batch: usize) -> Result<(Vec<serde_json::Value>, bool), ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!(
                "body, line {}: {}",
                e.line(),
                crate::request::json_error(&e)
            ),
        )
    })?;
    let single = value.is_object();
    let items = match value {
        serde_json::Value::Array(a) => a,
        v @ serde_json::Value::Object(_) => vec![v],
        _ => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_task",
                "expected a task object or an array of task objects",
            ))
        }
    };
    if items.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_task",
            "empty array",
        ));
    }
    if items.len() > max_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "{} tasks; at most {max_batch} per request (api.max_batch)",
                items.len(),
            ),
        ));
    }
    Ok((items, single))
}

/// Each item as a task with its delay; 422 naming the first bad one.
fn tasks_of(
    items: Vec<serde_json::Value>,
    single: bool,
    inherited: Option<&warren::trace::TraceContext>,
) -> Result<Vec<(warren::Task, Duration)>, ApiError> {
    let now = Utc::now();
    let mut tasks = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let parsed = serde_json::from_value::<TaskRequest>(item)
            .map_err(|e| RequestError::Json(crate::request::json_error(&e)))
            .and_then(|r| r.into_task_in(now, inherited));
        match parsed {
            Ok(t) => tasks.push(t),
            Err(e) => {
                let msg = if single {
                    e.to_string()
                } else {
                    format!("task [{i}]: {e}")
                };
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_task",
                    msg,
                ));
            }
        }
    }
    Ok(tasks)
}

/// Count, record and audit what the broker confirmed: 202 with the ids, or
/// 503/422 naming the tasks not confirmed.
fn answer_published(
    ctx: &Ctx,
    caller: &Caller,
    tasks: &[(warren::Task, Duration)],
    results: Vec<Result<(), warren::Error>>,
) -> Result<Response, ApiError> {
    let mut ids = Vec::new();
    let mut failed = Vec::new();
    let mut transient = true;
    for ((task, _), r) in tasks.iter().zip(results) {
        match r {
            Ok(()) => {
                log_published(task);
                ctx.task_events()
                    .published(task, warren::events::Source::Api);
                ids.push(task.id.clone());
            }
            Err(e) => {
                transient &= e.is_transient();
                failed.push(json!({"id": task.id, "error": e.to_string()}));
            }
        }
    }
    let m = ctx.metrics();
    m.published
        .with_label_values(&[Source::Api.label()])
        .inc_by(ids.len() as u64);
    let result = if failed.is_empty() {
        audit::OK
    } else {
        audit::FAILED
    };
    audit_publish(ctx, caller, tasks, result, ids.len() as u64);
    if failed.is_empty() {
        return Ok((StatusCode::ACCEPTED, Json(json!({ "ids": ids }))).into_response());
    }
    m.publish_failures
        .with_label_values(&[Source::Api.label()])
        .inc_by(failed.len() as u64);
    let (status, code) = if transient {
        (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable")
    } else {
        (StatusCode::UNPROCESSABLE_ENTITY, "not_published")
    };
    Err(ApiError::new(
        status,
        code,
        format!(
            "{} of {} tasks were not confirmed",
            failed.len(),
            tasks.len()
        ),
    )
    .with_extra(json!({"ids": ids, "failed": failed})))
}

/// One debug line per published task, with the trace it starts or joins.
pub fn log_published(task: &warren::Task) {
    match &task.trace {
        Some(t) => {
            tracing::debug!(task.id = %task.id, task.name = %task.name, trace_id = %t.trace_id_field(), "task published")
        }
        None => tracing::debug!(task.id = %task.id, task.name = %task.name, "task published"),
    }
}

/// The audit line of an ad-hoc publish: its task names (a few), never payloads.
fn audit_publish<T>(
    ctx: &Ctx,
    caller: &Caller,
    tasks: &[(warren::Task, T)],
    result: &str,
    count: u64,
) {
    let mut names: Vec<&str> = tasks.iter().map(|(t, _)| t.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let target = match names.len() {
        0..=3 => names.join(","),
        n => format!("{},+{} more", names[..3].join(","), n - 3),
    };
    audit::record(
        ctx.metrics(),
        &caller.name,
        "publish",
        &target,
        result,
        count,
    );
}

fn fmt_time(t: Option<chrono::DateTime<Utc>>) -> serde_json::Value {
    t.map(|t| json!(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)))
        .unwrap_or(serde_json::Value::Null)
}

/// The producer replicas heard in the last few seconds, and which leads.
async fn get_replicas(
    _: RequireScope<Read>,
    State(replicas): State<Arc<Replicas>>,
) -> Result<Response, ApiError> {
    Ok(Json(json!({ "replicas": replicas.list() })).into_response())
}

async fn trigger(
    scope: RequireScope<Publish>,
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let s = ctx.timetable().book().get(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no schedule named `{name}`"),
        )
    })?;
    let id = format!("{}@manual-{}", s.name(), uuid::Uuid::new_v4());
    let task = s.task(id.clone());
    let p = publisher(&ctx)?;
    let publish = async {
        match &s.cfg.workflow {
            // A workflow schedule starts a run with this id.
            Some(w) => {
                crate::workflow::start_scheduled(&p.publisher, ctx.topo(), w, &s.payload, &id).await
            }
            None => {
                p.publisher
                    .publish_task(ctx.topo(), &task, Duration::ZERO)
                    .await
            }
        }
    };
    let Some(published) = p
        .unless_blocked(ctx.metrics(), Source::Api, 1, publish)
        .await
    else {
        let who = &scope.caller().name;
        audit::record(ctx.metrics(), who, "trigger", s.name(), audit::FAILED, 0);
        return Err(blocked_error());
    };
    let result = if published.is_ok() {
        audit::OK
    } else {
        audit::FAILED
    };
    let count = u64::from(published.is_ok());
    if published.is_ok() && s.cfg.workflow.is_none() {
        ctx.task_events()
            .published(&task, warren::events::Source::Api);
    }
    audit::record(
        ctx.metrics(),
        &scope.caller().name,
        "trigger",
        s.name(),
        result,
        count,
    );
    match published {
        Ok(()) => {
            ctx.metrics()
                .published
                .with_label_values(&[Source::Api.label()])
                .inc();
            Ok((StatusCode::ACCEPTED, Json(json!({"id": id}))).into_response())
        }
        Err(e) => {
            ctx.metrics()
                .publish_failures
                .with_label_values(&[Source::Api.label()])
                .inc();
            let status = if e.is_transient() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            Err(ApiError::new(status, "not_published", e.to_string()))
        }
    }
}

async fn pause(
    scope: RequireScope<Admin>,
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let r = ctx.pause(&name).await;
    pause_answer(&ctx, scope.caller(), "pause", &name, r, true)
}

async fn resume(
    scope: RequireScope<Admin>,
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let r = ctx.resume(&name).await;
    pause_answer(&ctx, scope.caller(), "resume", &name, r, false)
}

/// Audit a pause or resume and answer it.
fn pause_answer(
    ctx: &Ctx,
    caller: &Caller,
    action: &str,
    name: &str,
    r: Result<(), ControlError>,
    paused: bool,
) -> Result<Response, ApiError> {
    let result = if r.is_ok() { audit::OK } else { audit::FAILED };
    audit::record(
        ctx.metrics(),
        &caller.name,
        action,
        name,
        result,
        u64::from(r.is_ok()),
    );
    match r {
        Ok(()) => Ok(Json(json!({"name": name, "paused": paused})).into_response()),
        Err(e @ ControlError::NotFound(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            e.to_string(),
        )),
        Err(e @ ControlError::Refused(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "refused_by_leader",
            e.to_string(),
        )),
        Err(e @ ControlError::Unavailable) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            e.to_string(),
        )),
        Err(e @ ControlError::NoLeader) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            e.to_string(),
        )),
    }
}
