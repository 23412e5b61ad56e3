//! `/v1/schedules`: list (paged) and read every schedule (`read`); create,
//! replace and delete API schedules (`admin`) with optimistic concurrency:
//! a schedule's `ETag` is its catalog version, `If-Match` makes a write
//! conditional (412 when someone changed it first), `If-None-Match: *`
//! creates only. Config-file schedules are read-only here (409 naming the
//! file). Changes go through [`crate::catalog`]: every replica sees them
//! within a moment, the leader fires them.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::{body_error, fmt_time, publisher, ApiState};
use crate::audit;
use crate::auth::{Admin, Read, RequireScope};
use crate::book::Origin;
use crate::catalog::{self, Change, Resolution, WriteError};
use crate::config::{Schedule, ScheduleConfig};
use crate::context::{Ctx, Leadership, Replicas, Timetable};
use crate::error::ApiError;

/// Schedules one page lists by default, and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/schedules", get(list))
        .route("/v1/schedules/{name}", get(read).put(put).delete(delete))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

/// What the API shows of a schedule.
pub(crate) fn describe(timetable: &Timetable, s: &Schedule) -> serde_json::Value {
    let st = timetable.status_of(s.name());
    let next = if s.cfg.enabled && !st.paused {
        st.next_fire.or_else(|| s.spec.next_after(Utc::now()))
    } else {
        None
    };
    let tz = s.spec.tz();
    json!({
        "name": s.name(),
        "source": s.origin,
        "version": s.version,
        "cron": s.cfg.cron,
        "timezone": s.cfg.timezone,
        "task": s.cfg.task,
        "workflow": s.cfg.workflow,
        "enabled": s.cfg.enabled,
        "paused": st.paused,
        "misfire": s.cfg.misfire,
        "misfire_grace": humantime::format_duration(s.cfg.misfire_grace).to_string(),
        "dst_gap": s.cfg.dst_gap,
        "dst_overlap": s.cfg.dst_overlap,
        "next_fire": fmt_time(next),
        "next_fire_local": next.map(|n| n.with_timezone(&tz).to_rfc3339()),
        "last_fire": fmt_time(st.last_fired),
    })
}

async fn list(
    _: RequireScope<Read>,
    State(timetable): State<Arc<Timetable>>,
    State(leadership): State<Arc<Leadership>>,
    State(replicas): State<Arc<Replicas>>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("limit = {limit}: must be 1 to {MAX_PAGE}"),
        ));
    }
    let page = timetable.book().page(&q.prefix, q.after.as_deref(), limit);
    let next_after = (page.len() == limit)
        .then(|| page.last().map(|s| s.name().to_owned()))
        .flatten();
    let list: Vec<_> = page.iter().map(|s| describe(&timetable, s)).collect();
    Ok(Json(json!({
        "leader": leadership.is_leader(),
        "instance": replicas.instance(),
        "total": timetable.book().len(),
        "schedules": list,
        "next_after": next_after,
    }))
    .into_response())
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no schedule named `{name}`"),
    )
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

async fn read(
    _: RequireScope<Read>,
    State(timetable): State<Arc<Timetable>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let s = timetable
        .book()
        .get(&name)
        .ok_or_else(|| not_found(&name))?;
    let mut body = describe(&timetable, &s);
    if let Some(stored) = timetable
        .catalog()
        .get(&name)
        .filter(|_| s.origin == Origin::Api)
    {
        body["definition"] = serde_json::to_value(&stored.def).unwrap_or_default();
        body["updated_at"] = fmt_time(Some(stored.updated_at));
    }
    Ok(([(header::ETAG, etag(s.version))], Json(body)).into_response())
}

/// The version a write is conditional on: `If-Match: "<version>"` (or `*`:
/// it must exist), `If-None-Match: *` (it must not).
fn precondition(headers: &HeaderMap, exists: Option<u64>) -> Result<Option<u64>, ApiError> {
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == b"*")
    {
        return Ok(Some(0));
    }
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or_default().trim();
    if text == "*" {
        return exists.map(Some).ok_or_else(|| {
            ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition_failed",
                "If-Match: * but the schedule does not exist",
            )
        });
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse::<u64>()
        .map(Some)
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_precondition",
                format!("If-Match must be an ETag of this API (\"<version>\"), got {text:?}"),
            )
        })
}

/// 409 for a name the config file holds.
fn config_owned(ctx: &Ctx, name: &str) -> Result<(), ApiError> {
    if ctx
        .timetable()
        .book()
        .get(name)
        .is_some_and(|s| s.origin == Origin::Config)
    {
        let file = ctx
            .config_path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the producer's config".into());
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "config_schedule",
            format!("schedule `{name}` is defined in {file}: change it there (read-only through the API)"),
        ));
    }
    Ok(())
}

/// The body of a `PUT`: the keys of a `[[schedules]]` entry as JSON, the
/// name from the path (a `name` in the body must agree).
fn definition(name: &str, body: &[u8]) -> Result<ScheduleConfig, ApiError> {
    let invalid =
        |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_schedule", m);
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("body is not JSON: {e}")))?;
    definition_value(name, v).map_err(invalid)
}

/// The keys of a `[[schedules]]` entry as JSON (the API's body, the
/// console's form), named `name`.
pub(crate) fn definition_value(
    name: &str,
    mut v: serde_json::Value,
) -> Result<ScheduleConfig, String> {
    let obj = v
        .as_object_mut()
        .ok_or_else(|| "body must be a JSON object of schedule keys".to_owned())?;
    match obj.get("name") {
        Some(n) if n.as_str() != Some(name) => {
            return Err(format!(
                "name: {n} in the body differs from `{name}` in the path"
            ))
        }
        _ => {
            obj.insert("name".into(), json!(name));
        }
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

async fn put(
    scope: RequireScope<Admin>,
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let who = scope.caller().name.clone();
    let def = definition(&name, &body)?;
    // The one validation of `[[schedules]]`, every problem at once.
    ctx.timetable().catalog().check(&def).map_err(|problems| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_schedule",
            problems.join("; "),
        )
        .with_extra(json!({ "problems": problems }))
    })?;
    config_owned(&ctx, &name)?;
    let exists = ctx.timetable().catalog().get(&name).map(|s| s.version);
    let if_version = precondition(&headers, exists)?;
    let change = Change::Put {
        def: Box::new(def),
        if_version,
        max: Some(ctx.cfg().scheduler.max_schedules),
        req: uuid::Uuid::new_v4().to_string(),
    };
    let outcome = write(&ctx, change).await;
    let result = if outcome.is_ok() {
        audit::OK
    } else {
        audit::FAILED
    };
    audit::record(ctx.metrics(), &who, "schedule_put", &name, result, 1);
    let (status, version) = match outcome? {
        Resolution::Created { version } => (StatusCode::CREATED, version),
        Resolution::Replaced { version } => (StatusCode::OK, version),
        other => return Err(refusal(&name, other)),
    };
    let body = match ctx.timetable().book().get(&name) {
        Some(s) => describe(ctx.timetable(), &s),
        None => json!({"name": name, "version": version}),
    };
    Ok((status, [(header::ETAG, etag(version))], Json(body)).into_response())
}

async fn delete(
    scope: RequireScope<Admin>,
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    config_owned(&ctx, &name)?;
    let exists = ctx.timetable().catalog().get(&name).map(|s| s.version);
    if exists.is_none() {
        return Err(not_found(&name));
    }
    let if_version = precondition(&headers, exists)?;
    let change = Change::Delete {
        name: name.clone(),
        if_version,
        req: uuid::Uuid::new_v4().to_string(),
    };
    let outcome = write(&ctx, change).await;
    let result = if outcome.is_ok() {
        audit::OK
    } else {
        audit::FAILED
    };
    audit::record(
        ctx.metrics(),
        &scope.caller().name,
        "schedule_delete",
        &name,
        result,
        1,
    );
    match outcome? {
        Resolution::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
        other => Err(refusal(&name, other)),
    }
}

async fn write(ctx: &Ctx, change: Change) -> Result<Resolution, ApiError> {
    let p = publisher(ctx)?;
    catalog::write(
        ctx.timetable().catalog(),
        &p.publisher,
        ctx.topo().prefix(),
        change,
    )
    .await
    .map_err(|e| match e {
        WriteError::Broker(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            e.to_string(),
        ),
        WriteError::NotReadBack => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "no_outcome", e.to_string())
        }
    })
}

fn refusal(name: &str, o: Resolution) -> ApiError {
    match o {
        Resolution::Stale { current } => ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            format!(
                "schedule `{name}` changed meanwhile (its version is now {current}); read it again"
            ),
        )
        .with_extra(json!({ "version": current })),
        Resolution::NotFound => not_found(name),
        Resolution::Full { max } => ApiError::new(
            StatusCode::CONFLICT,
            "too_many_schedules",
            format!("the catalog holds scheduler.max_schedules = {max} schedules already"),
        ),
        Resolution::Invalid(why) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_schedule", why)
        }
        Resolution::Created { .. } | Resolution::Replaced { .. } | Resolution::Deleted => {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "unexpected outcome",
            )
        }
    }
}
