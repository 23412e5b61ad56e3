//! A producer as a value: [`App::build`] validates the config, registers the
//! metrics and binds the HTTP listener (so [`App::addr`] is known before
//! anything runs, also for `http.addr = 127.0.0.1:0`); [`App::run`] starts
//! the API connection, the election and fire loop, SIGHUP reload and the
//! HTTP server, and stops them in order once `shutdown` is cancelled.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren::metrics::{AmqpMetrics, Health};

use crate::auth::{TokenStore, Tokens};
use crate::config::{self, ProducerConfig, Schedule};
use crate::context::Ctx;
use crate::metrics::Metrics;

pub struct App {
    ctx: Ctx,
    schedules: Vec<Schedule>,
    registry: Registry,
    listener: TcpListener,
    addr: SocketAddr,
}

impl App {
    /// Validate `cfg` (an invalid one is a
    /// [`ConfigError`](warren::config::ConfigError), exit 2 in the binary)
    /// and bind `cfg.http.addr`. Nothing connects yet.
    pub async fn build(cfg: ProducerConfig) -> anyhow::Result<App> {
        let (cfg, schedules) = config::check(cfg, None)?;
        let registry = Registry::new();
        let amqp_metrics = AmqpMetrics::register(&registry)?;
        let metrics = Metrics::register(&registry)?;
        let tokens = Tokens::from_config(&cfg.api)?;
        if cfg.api.enabled && tokens.is_empty() {
            tracing::warn!("no API tokens configured: every /v1 request will be refused (set api.publish_token / api.read_token)");
        }
        let seal = warren::security::Seal::from_config(&cfg.security)?.map(Arc::new);
        let listener = TcpListener::bind(cfg.http.addr).await?;
        let addr = listener.local_addr()?;
        let ctx = Ctx::new(
            cfg,
            metrics,
            amqp_metrics,
            Health::default(),
            TokenStore::new(tokens),
        )
        .with_seal(seal);
        Ok(App {
            ctx,
            schedules,
            registry,
            listener,
            addr,
        })
    }

    /// Re-read `path` on SIGHUP (schedules and tokens). Without it, SIGHUP
    /// is logged and changes nothing.
    pub fn reload_from(mut self, path: Option<PathBuf>) -> Self {
        self.ctx = self.ctx.with_config_path(path);
        self
    }

    /// Where `/metrics`, `/healthz`, `/readyz` and `/v1` are served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Run until `shutdown` is cancelled (`Ok`) or something the producer
    /// cannot live with happens, such as refused broker credentials (`Err`).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            ctx,
            schedules,
            registry,
            listener,
            addr,
        } = self;
        let ctx = Arc::new(ctx);
        ctx.apply_schedules(schedules);
        // A fatal error stops this app without cancelling the caller's token.
        let stop = shutdown.child_token();

        let tracker = TaskTracker::new();
        tracker.spawn(crate::connection::api_connection(ctx.clone(), stop.clone()));
        tracker.spawn(crate::scheduler::run(ctx.clone(), stop.clone()));
        tracker.spawn(crate::reload::on_sighup(ctx.clone(), stop.clone()));

        let server = tokio::spawn(serve(listener, router(&ctx, registry), stop.clone()));
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        tracing::info!(%addr, instance = %ctx.instance(), "warren-producer running");

        stop.cancelled().await;
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 10s");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        match ctx.fatal() {
            Some(why) => Err(anyhow::anyhow!("{why}")),
            None => Ok(()),
        }
    }
}

fn router(ctx: &Arc<Ctx>, registry: Registry) -> Router {
    let mut router = warren::metrics::ops_router(registry, ctx.health().clone());
    if ctx.cfg().api.enabled {
        router = router.merge(crate::api::router(ctx.clone()));
        if ctx.cfg().api.console {
            router = router.merge(crate::console::router(ctx.clone()));
        }
    }
    router
}

/// As [`warren::metrics::serve`], on a listener bound beforehand.
async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) {
    let res = axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "HTTP server failed");
    }
}
