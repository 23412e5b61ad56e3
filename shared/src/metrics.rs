//! The operations HTTP surface both roles serve (`/metrics`, `/healthz`,
//! `/readyz`) and the AMQP connection metrics they share. Each component
//! registers its own metrics on the role's [`Registry`]; label values stay
//! bounded (task and schedule names, never ids).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

/// Readiness as the role sees it: ready only while connected and working.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Connection state shared by both roles.
#[derive(Clone)]
pub struct AmqpMetrics {
    pub connected: IntGauge,
    pub reconnects: IntCounter,
    pub blocked: IntGauge,
}

impl AmqpMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            connected: IntGauge::new(
                "warren_amqp_connected",
                "1 while the AMQP connection is open",
            )?,
            reconnects: IntCounter::new(
                "warren_amqp_reconnects_total",
                "AMQP connections re-established after a loss",
            )?,
            blocked: IntGauge::new(
                "warren_amqp_blocked",
                "1 while the broker blocks publishing on this connection (resource alarm)",
            )?,
        };
        registry.register(Box::new(m.connected.clone()))?;
        registry.register(Box::new(m.reconnects.clone()))?;
        registry.register(Box::new(m.blocked.clone()))?;
        Ok(m)
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    health: Health,
}

/// `/metrics`, `/healthz`, `/readyz`; merge a role's own routes into it.
pub fn ops_router(registry: Registry, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(OpsState { registry, health })
}

async fn metrics(State(s): State<OpsState>) -> Response {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], buf).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(s): State<OpsState>) -> Response {
    if s.health.is_ready() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready"})),
        )
            .into_response()
    }
}

/// Bind `addr` and serve `router` until `shutdown`; returns the bound address
/// (useful with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let res = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    tracing::info!(addr = %local, "serving /metrics, /healthz, /readyz");
    Ok((local, task))
}
