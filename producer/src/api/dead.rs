//! `/v1/dead/...`: the dead-letter workbench as JSON, on the shared engine
//! [`warren::dead`]. Reading needs `read`, replaying `publish`, purging
//! `admin` (and `"confirm": true`). Every scan looks at no more than
//! `api.dead_scan_limit` messages; totals come from the broker.
//!
//! Replays and purges are audited ([`crate::audit`]) under the caller's
//! grant name, which is also the `x-warren-edited-by` of an edited replay.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use warren::dead::{self, DeadError, ReplayReport, Selector};

use super::{body_error, publisher, ApiState};
use crate::audit;
use crate::auth::{Admin, Publish, Read, RequireScope};
use crate::context::Ctx;
use crate::error::ApiError;

/// Messages listed when a request names no `limit`.
const DEFAULT_LIST_LIMIT: usize = 100;
/// Messages an overview scans when the request names no `limit`: about
/// 0.1 s (measured on a debug build, 20,000 dead letters), fast enough to
/// refresh a page; up to `api.dead_scan_limit` on request.
const DEFAULT_OVERVIEW_SCAN: usize = 1000;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/dead", get(get_overview))
        .route("/v1/dead/messages", get(get_messages))
        .route("/v1/dead/messages/{id}", get(get_message))
        .route("/v1/dead/messages/{id}/replay", post(replay_edited))
        .route("/v1/dead/replay", post(replay))
        .route("/v1/dead/purge", post(purge))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverviewQuery {
    /// Messages to scan (default 1000, at most `api.dead_scan_limit`).
    limit: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesQuery {
    task: Option<String>,
    kind: Option<String>,
    fingerprint: Option<String>,
    /// Messages to return (default 100); the scan is `api.dead_scan_limit`.
    limit: Option<usize>,
}

/// What `POST /v1/dead/replay` and `/purge` apply to: exactly one of
/// `ids`, `group` or `all: true`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorBody {
    ids: Option<Vec<String>>,
    group: Option<GroupBody>,
    all: Option<bool>,
    /// Purge only: must be `true`.
    confirm: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    task: String,
    kind: String,
    fingerprint: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EditBody {
    /// The new payload, any JSON value.
    payload: serde_json::Value,
    #[serde(default)]
    new_id: bool,
}

impl SelectorBody {
    fn selector(self) -> Result<(Selector, Option<bool>), ApiError> {
        let invalid =
            |m: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_selector", m);
        let sel = match (self.ids, self.group, self.all) {
            (Some(ids), None, None | Some(false)) => {
                if ids.is_empty() {
                    return Err(invalid("`ids` is empty"));
                }
                Selector::Ids(ids)
            }
            (None, Some(g), None | Some(false)) => Selector::Group {
                task: g.task,
                kind: g.kind,
                fingerprint: g.fingerprint,
            },
            (None, None, Some(true)) => Selector::All,
            _ => {
                return Err(invalid(
                    "expected exactly one of `ids`, `group` or `\"all\": true`",
                ))
            }
        };
        Ok((sel, self.confirm))
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(body_error)?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!(
                "body, line {}: {}",
                e.line(),
                crate::request::json_error(&e)
            ),
        )
    })
}

/// The API's broker connection, or 503 while it is down.
fn connection(ctx: &Ctx) -> Result<Arc<lapin::Connection>, ApiError> {
    ctx.link().connection().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "not connected to the broker; retry later",
        )
    })
}

fn dead_error(e: DeadError) -> ApiError {
    match e {
        DeadError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        DeadError::Invalid { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_replayable",
            e.to_string(),
        ),
        e => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            e.to_string(),
        ),
    }
}

/// How a selection reads in an audit line (ids only counted: a list of
/// ids would make the line unbounded).
fn describe(sel: &Selector) -> String {
    match sel {
        Selector::All => "all".into(),
        Selector::Ids(ids) => format!("{} ids", ids.len()),
        Selector::Task(t) => format!("task {t}"),
        Selector::Group {
            task,
            kind,
            fingerprint,
        } => format!("group {task}/{kind}/{fingerprint}"),
    }
}

fn report_json(r: &ReplayReport) -> serde_json::Value {
    let failed: Vec<_> = r
        .failed
        .iter()
        .map(|(id, why)| json!({"id": id, "error": why}))
        .collect();
    json!({"replayed": r.replayed, "failed": failed})
}

async fn get_overview(
    _: RequireScope<Read>,
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<OverviewQuery>,
) -> Result<Response, ApiError> {
    let max = ctx.dead_scan_limit();
    let limit = q.limit.unwrap_or(DEFAULT_OVERVIEW_SCAN).clamp(1, max);
    let b = connection(&ctx)?;
    let o = dead::overview(&b, ctx.topo(), limit)
        .await
        .map_err(dead_error)?;
    Ok(Json(o).into_response())
}

async fn get_messages(
    _: RequireScope<Read>,
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<MessagesQuery>,
) -> Result<Response, ApiError> {
    let scan = ctx.dead_scan_limit();
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT).clamp(1, scan);
    let b = connection(&ctx)?;
    let keep = |t: &dead::DeadTask| {
        q.task.as_ref().is_none_or(|v| *v == t.task)
            && q.kind.as_ref().is_none_or(|v| *v == t.kind)
            && q.fingerprint.as_ref().is_none_or(|v| *v == t.fingerprint)
    };
    let l = dead::list_where(&b, ctx.topo(), scan, limit, keep)
        .await
        .map_err(dead_error)?;
    Ok(Json(l).into_response())
}

async fn get_message(
    _: RequireScope<Read>,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let scan = ctx.dead_scan_limit();
    let b = connection(&ctx)?;
    let m = dead::inspect(&b, ctx.topo(), &id, scan)
        .await
        .map_err(dead_error)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no dead task with id `{id}` in the first {scan} dead messages"),
            )
        })?;
    Ok(Json(m).into_response())
}

async fn replay(
    scope: RequireScope<Publish>,
    State(ctx): State<Arc<Ctx>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (sel, _) = parse::<SelectorBody>(body)?.selector()?;
    let b = publisher(&ctx)?;
    let timeout = ctx.cfg().amqp.confirm_timeout;
    let scan = ctx.dead_scan_limit();
    let who = &scope.caller().name;
    let r = dead::replay(&b.conn, ctx.topo(), &sel, scan, timeout).await;
    let (result, count) = match &r {
        Ok(r) if r.failed.is_empty() => (audit::OK, r.replayed.len()),
        Ok(r) => (audit::FAILED, r.replayed.len()),
        Err(_) => (audit::FAILED, 0),
    };
    audit::record(
        ctx.metrics(),
        who,
        "replay",
        &describe(&sel),
        result,
        count as u64,
    );
    let mut r = r.map_err(dead_error)?;
    if let Selector::Ids(ids) = &sel {
        for id in ids {
            if !r.replayed.contains(id) && !r.failed.iter().any(|(f, _)| f == id) {
                r.failed.push((
                    id.clone(),
                    format!("not found in the first {scan} dead messages"),
                ));
            }
        }
    }
    Ok(Json(report_json(&r)).into_response())
}

async fn replay_edited(
    scope: RequireScope<Publish>,
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let edit: EditBody = parse(body)?;
    let payload = serde_json::to_vec(&edit.payload)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", format!("payload: {e}")))?;
    let b = publisher(&ctx)?;
    let who = &scope.caller().name;
    let r = dead::replay_edited(
        &b.conn,
        ctx.topo(),
        &id,
        payload,
        edit.new_id,
        who,
        &b.publisher,
    )
    .await;
    let (result, count) = match &r {
        Ok(r) if r.failed.is_empty() => (audit::OK, r.replayed.len()),
        _ => (audit::FAILED, 0),
    };
    let target = format!("id {id}");
    audit::record(
        ctx.metrics(),
        who,
        "replay_edited",
        &target,
        result,
        count as u64,
    );
    let r = r.map_err(dead_error)?;
    if !r.failed.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_published",
            "the edited task was not confirmed by the broker; the dead copy is kept",
        )
        .with_extra(report_json(&r)));
    }
    Ok(Json(report_json(&r)).into_response())
}

async fn purge(
    scope: RequireScope<Admin>,
    State(ctx): State<Arc<Ctx>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (sel, confirm) = parse::<SelectorBody>(body)?.selector()?;
    if confirm != Some(true) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "confirm_required",
            "purging deletes dead tasks for good: send `\"confirm\": true`",
        ));
    }
    let b = connection(&ctx)?;
    let scan = ctx.dead_scan_limit();
    let r = dead::purge(&b, ctx.topo(), &sel, scan).await;
    let (result, count) = match &r {
        Ok(n) => (audit::OK, *n),
        Err(_) => (audit::FAILED, 0),
    };
    audit::record(
        ctx.metrics(),
        &scope.caller().name,
        "purge",
        &describe(&sel),
        result,
        count,
    );
    let n = r.map_err(dead_error)?;
    Ok(Json(json!({"purged": n})).into_response())
}
