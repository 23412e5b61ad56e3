//! `GET /v1/tasks...` and `GET /v1/workers`: what this replica's task index
//! ([`crate::tasks`]) knows, scope `read`. Any replica answers, standby
//! included (docs/tasks.md).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::json;

use super::ApiState;
use crate::auth::{Read, RequireScope};
use crate::context::{Replicas, TaskEvents};
use crate::error::ApiError;
use crate::tasks::{State as TaskState, TaskView};

/// Tasks listed when a request names no `limit`, and the most it may.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/result", get(get_result))
        .route("/v1/workers", get(get_workers))
}

fn bad(param: &str, message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_query", message)
        .with_extra(json!({ "parameter": param }))
}

fn unknown(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_task",
        format!("no task `{id}` in this replica's index (never seen, or older than its retention)"),
    )
    .with_extra(json!({ "id": id, "state": "unknown" }))
}

/// `since`: an RFC 3339 instant, or a duration back from now (`10m`, `2h`).
pub fn parse_since(v: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Some(t.with_timezone(&Utc));
    }
    let d = humantime::parse_duration(v).ok()?;
    Some(now - chrono::TimeDelta::from_std(d).ok()?)
}

/// The filters of `GET /v1/tasks`, each problem naming its parameter.
pub fn parse_query(
    q: &HashMap<String, String>,
    now: DateTime<Utc>,
) -> Result<crate::tasks::Query, ApiError> {
    let mut out = crate::tasks::Query {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    for (k, v) in q {
        match k.as_str() {
            "name" => out.name = Some(v.clone()).filter(|v| !v.is_empty()),
            "state" if v.is_empty() => {}
            "state" => {
                out.state = Some(TaskState::parse(v).ok_or_else(|| {
                    bad(
                        "state",
                        format!(
                            "state = {v:?}: expected one of {}",
                            TaskState::ALL.join(", ")
                        ),
                    )
                })?)
            }
            "since" if v.is_empty() => {}
            "since" => {
                out.since = Some(parse_since(v, now).ok_or_else(|| {
                    bad(
                        "since",
                        format!(
                            "since = {v:?}: expected an RFC 3339 instant or a duration such as 10m"
                        ),
                    )
                })?)
            }
            "limit" => {
                out.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad("limit", format!("limit = {v:?}: expected 1 to {MAX_LIMIT}"))
                    })?
            }
            other => {
                return Err(bad(
                    other,
                    format!("unknown parameter `{other}` (expected name, state, since, limit)"),
                ))
            }
        }
    }
    Ok(out)
}

pub async fn list(
    _: RequireScope<Read>,
    State(events): State<Arc<TaskEvents>>,
    State(replicas): State<Arc<Replicas>>,
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    let query = parse_query(&q, Utc::now())?;
    let index = events.index();
    let tasks = index.list(&query);
    Ok(Json(json!({
        "tasks": tasks,
        "indexed": index.len(),
        "newest_event_at": index.newest(),
        "instance": replicas.instance(),
    }))
    .into_response())
}

async fn get_task(
    _: RequireScope<Read>,
    State(events): State<Arc<TaskEvents>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = events.index().get(&id).ok_or_else(|| unknown(&id))?;
    Ok(Json(t).into_response())
}

/// What `GET /v1/tasks/{id}/result` answers for `t`.
fn result_of(t: TaskView) -> Result<Response, ApiError> {
    match (t.state, t.result) {
        (TaskState::Succeeded, Some(r)) => {
            Ok(Json(json!({"id": t.id, "state": "succeeded", "result": r})).into_response())
        }
        (TaskState::Succeeded, None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_result",
            format!("task `{}` succeeded but its result was not kept (see `results` in the consumer config)", t.id),
        )
        .with_extra(json!({"id": t.id, "state": "succeeded"}))),
        (state, _) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_result",
            format!("task `{}` has no result: it is {}", t.id, state.as_str()),
        )
        .with_extra(json!({"id": t.id, "state": state.as_str()}))),
    }
}

async fn get_result(
    _: RequireScope<Read>,
    State(events): State<Arc<TaskEvents>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    result_of(events.index().get(&id).ok_or_else(|| unknown(&id))?)
}

async fn get_workers(
    _: RequireScope<Read>,
    State(events): State<Arc<TaskEvents>>,
) -> Result<Response, ApiError> {
    let now = Utc::now();
    let workers: Vec<_> = events
        .index()
        .workers(now)
        .into_iter()
        .map(|w| {
            json!({
                "instance": w.instance,
                "host": w.host,
                "queues": w.queues,
                "concurrency": w.concurrency,
                "running": w.running,
                "succeeded": w.succeeded,
                "failed": w.failed,
                "heard_at": DateTime::from_timestamp_millis(w.at),
            })
        })
        .collect();
    Ok(Json(json!({ "workers": workers })).into_response())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_queries_name_their_parameter() {
        let now = Utc::now();
        let q = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            parse_query(&m, now)
        };
        let ok = q(&[
            ("name", "a.*"),
            ("state", "dead"),
            ("since", "10m"),
            ("limit", "5"),
        ])
        .unwrap();
        assert_eq!(ok.limit, 5);
        assert_eq!(ok.state, Some(TaskState::Dead));
        assert_eq!(ok.since, Some(now - chrono::TimeDelta::minutes(10)));
        for (k, v) in [
            ("state", "done"),
            ("since", "yesterday"),
            ("limit", "0"),
            ("limit", "x"),
            ("color", "red"),
        ] {
            let e = q(&[(k, v)]).err().unwrap();
            let body = format!("{e:?}");
            assert!(body.contains(k), "{k}: {body}");
        }
    }
}
