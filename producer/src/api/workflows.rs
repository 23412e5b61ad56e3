//! `/v1/workflows/...`: definitions, starting and resuming runs (`publish`),
//! run status (`read`). Starts and resumes are messages to the coordinator
//! through `<prefix>.workflows`, exactly as any AMQP client would send them;
//! status comes from the runs every replica follows (the view snapshot and
//! the log after it, see [`crate::workflow::store`]), so every replica
//! answers, at most one coordinator round behind. The console's workflow pages call the same
//! `pub(crate)` functions, so there is one way to read and to act.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use warren::trace::TraceContext;

use super::{body_error, publisher, ApiState};
use crate::audit;
use crate::auth::{Publish, Read, RequireScope};
use crate::context::Ctx;
use crate::error::ApiError;
use crate::workflow::run::{Run, RunStatus};
use crate::workflow::{self, store, Workflow};

/// Runs `GET /v1/workflows/<name>/runs` lists at most, newest first.
const LIST_LIMIT: usize = 100;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/workflows", get(list))
        .route("/v1/workflows/{name}/runs", get(runs).post(start))
        .route("/v1/workflows/{name}/runs/{id}", get(status))
        .route("/v1/workflows/{name}/runs/{id}/resume", post(resume))
}

pub(crate) fn definition(ctx: &Ctx, name: &str) -> Result<Arc<Workflow>, ApiError> {
    ctx.workflow(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no workflow named `{name}`"),
        )
    })
}

async fn list(_: RequireScope<Read>, State(ctx): State<Arc<Ctx>>) -> Response {
    let list: Vec<_> = ctx
        .workflows()
        .iter()
        .map(|w| {
            json!({
                "name": w.name,
                "steps": w.steps.iter().map(|s| json!({
                    "name": s.name,
                    "task": s.task,
                    "after": s.after,
                    "compensate": s.compensate,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({"workflows": list})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    #[serde(default)]
    input: serde_json::Value,
    /// The run id (default: generated). A second start with a known id
    /// starts nothing.
    id: Option<String>,
}

async fn start(
    scope: RequireScope<Publish>,
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let wf = definition(&ctx, &name)?;
    let body = body.map_err(body_error)?;
    let req: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody {
            input: serde_json::Value::Null,
            id: None,
        }
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!("expected {{\"input\": …, \"id\": …}}: {e}"),
            )
        })?
    };
    let id = run_id(req.id)?;
    // The caller's trace, when it sent a valid one: the run is its child.
    let trace = headers
        .get(warren::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|p| {
            let state = headers
                .get(warren::trace::TRACESTATE)
                .and_then(|v| v.to_str().ok());
            TraceContext::parse(p, state)
        })
        .map(|t| t.child());
    let (props, body) = workflow::start_message(&wf.name, &req.input, &id, trace.as_ref());
    send(
        &ctx,
        &scope.caller().name,
        "workflow_start",
        &wf.name,
        warren::workflow::START,
        props,
        &body,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"workflow": wf.name, "run": id})),
    )
        .into_response())
}

/// The id of a new run: the caller's (1 to 200 characters), else a fresh one.
pub(crate) fn run_id(id: Option<String>) -> Result<String, ApiError> {
    match id {
        Some(i) if i.is_empty() || i.len() > 200 => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "`id` must be 1 to 200 characters",
        )),
        Some(i) => Ok(i),
        None => Ok(uuid::Uuid::new_v4().to_string()),
    }
}

/// Publish a start or resume message (confirmed) and record the audit line
/// of `who` doing `action` on workflow `target`.
pub(crate) async fn send(
    ctx: &Ctx,
    who: &str,
    action: &str,
    target: &str,
    key: &str,
    props: lapin::BasicProperties,
    body: &[u8],
) -> Result<(), ApiError> {
    let p = publisher(ctx)?;
    let ex = ctx.topo().workflows_exchange();
    let res = p.publisher.publish(&ex, key, props, body).await;
    let result = if res.is_ok() {
        audit::OK
    } else {
        audit::FAILED
    };
    audit::record(
        ctx.metrics(),
        who,
        action,
        target,
        result,
        u64::from(res.is_ok()),
    );
    res.map_err(|e| {
        let status = if e.is_transient() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError::new(status, "not_published", e.to_string())
    })
}

/// The runs this replica follows; 503 until it has read them.
pub(crate) fn view(ctx: &Ctx) -> Result<&store::View, ApiError> {
    let view = ctx.runs();
    if view.is_loaded() {
        Ok(view)
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "the workflow runs are not read yet (this replica is connecting to the broker)",
        ))
    }
}

pub(crate) fn find(view: &store::View, name: &str, id: &str) -> Result<Run, ApiError> {
    view.read(|runs| runs.get(id).filter(|r| r.workflow == name).cloned())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no run `{id}` of workflow `{name}` (not started yet, unknown, or past workflow.retention)"),
            )
        })
}

async fn runs(
    _: RequireScope<Read>,
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    definition(&ctx, &name)?;
    let view = view(&ctx)?;
    let runs = recent_runs(view, &name, LIST_LIMIT);
    let list: Vec<_> = runs
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "status": r.status,
                "started_at": r.started_at,
                "finished_at": r.finished_at,
                "failure": r.failure,
            })
        })
        .collect();
    let as_of = view.read(|r| r.as_of());
    Ok(Json(json!({"workflow": name, "as_of": as_of, "runs": list})).into_response())
}

/// The runs of workflow `name`, newest first, at most `limit`.
pub(crate) fn recent_runs(view: &store::View, name: &str, limit: usize) -> Vec<Run> {
    view.read(|all| {
        let mut ids: Vec<_> = all
            .values()
            .filter(|r| r.workflow == name)
            .map(|r| (r.started_at, r.id.as_str()))
            .collect();
        ids.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        ids.truncate(limit);
        ids.into_iter()
            .filter_map(|(_, id)| all.get(id).cloned())
            .collect()
    })
}

/// Whether `run` may be resumed: only once it finished failed,
/// compensated or compensation_failed.
pub(crate) fn resumable(run: &Run) -> Result<(), ApiError> {
    if matches!(
        run.status,
        RunStatus::Failed | RunStatus::Compensated | RunStatus::CompensationFailed
    ) && run.is_finished()
    {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "not_resumable",
        format!(
            "run `{}` is {}: only a finished failed, compensated or compensation_failed run can be resumed",
            run.id,
            run.status.name()
        ),
    ))
}

async fn status(
    _: RequireScope<Read>,
    State(ctx): State<Arc<Ctx>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    definition(&ctx, &name)?;
    let view = view(&ctx)?;
    let as_of = view.read(|r| r.as_of());
    let run = find(view, &name, &id)?;
    let mut v = serde_json::to_value(&run).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("as_of".into(), json!(as_of));
    }
    Ok(Json(v).into_response())
}

async fn resume(
    scope: RequireScope<Publish>,
    State(ctx): State<Arc<Ctx>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    definition(&ctx, &name)?;
    let run = find(view(&ctx)?, &name, &id)?;
    resumable(&run)?;
    let (props, body) = workflow::resume_message(&name, &id);
    send(
        &ctx,
        &scope.caller().name,
        "workflow_resume",
        &name,
        warren::workflow::RESUME,
        props,
        &body,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"workflow": name, "run": id})),
    )
        .into_response())
}
