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

use crate::auth::TokenStore;
use crate::config::{self, ProducerConfig, Schedule};
use crate::context::Ctx;
use crate::metrics::Metrics;

pub struct App {
    ctx: Ctx,
    schedules: Vec<Schedule>,
    registry: Registry,
    listener: TcpListener,
    addr: SocketAddr,
    /// `api.metrics_listen`: the ops endpoints' own listener.
    ops: Option<(TcpListener, SocketAddr)>,
}

impl App {
    /// Validate `cfg` (an invalid one is a
    /// [`ConfigError`](warren::config::ConfigError), exit 2 in the binary)
    /// and bind `cfg.http.addr`. Nothing connects yet.
    pub async fn build(cfg: ProducerConfig) -> anyhow::Result<App> {
        Self::from_checked(config::check(cfg, None)?).await
    }

    /// As [`App::build`], for a configuration [`config::check`] passed.
    pub async fn from_checked(checked: config::Checked) -> anyhow::Result<App> {
        let config::Checked {
            cfg,
            schedules,
            workflows,
        } = checked;
        let registry = Registry::new();
        let amqp_metrics = AmqpMetrics::register(&registry)?;
        let metrics = Metrics::register(&registry, cfg.metrics.per_schedule_limit)?;
        let event_metrics = warren::events::EventMetrics::register(&registry)?;
        let index_metrics = crate::tasks::IndexMetrics::register(&registry)?;
        let tokens = cfg.api.tokens()?;
        if cfg.api.enabled && tokens.is_empty() {
            tracing::warn!("no API tokens configured: every /v1 request will be refused (set api.publish_token / api.read_token)");
        }
        let seal = warren::security::Seal::from_config(&cfg.security)?.map(Arc::new);
        let listener = TcpListener::bind(cfg.http.addr).await?;
        let addr = listener.local_addr()?;
        let ops = match cfg.api.metrics_listen {
            Some(at) => {
                let l = TcpListener::bind(at).await?;
                let a = l.local_addr()?;
                Some((l, a))
            }
            None => None,
        };
        let ctx = Ctx::new(
            cfg,
            workflows,
            metrics,
            amqp_metrics,
            Health::default(),
            TokenStore::new(tokens),
        )
        .with_seal(seal);
        let recorder = if ctx.cfg().events.enabled {
            warren::events::Recorder::new(
                ctx.topo().events_stream(),
                warren::events::Origin {
                    role: "producer".into(),
                    instance: ctx.instance().to_owned(),
                    host: warren::config::host_name(),
                },
                event_metrics,
                ctx.cfg().amqp.confirm_timeout,
            )
        } else {
            warren::events::Recorder::disabled()
        };
        let ctx = ctx.with_events(recorder, index_metrics);
        Ok(App {
            ctx,
            schedules,
            registry,
            listener,
            addr,
            ops,
        })
    }

    /// Re-read `path` on SIGHUP (schedules and tokens). Without it, SIGHUP
    /// is logged and changes nothing.
    pub fn reload_from(mut self, path: Option<PathBuf>) -> Self {
        self.ctx = self.ctx.with_config_path(path);
        self
    }

    /// Where `/v1` is served, and `/metrics`, `/healthz`, `/readyz` unless
    /// `api.metrics_listen` moves them ([`App::metrics_addr`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics`, `/healthz`, `/readyz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ops.as_ref().map_or(self.addr, |(_, a)| *a)
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
            ops,
        } = self;
        let ctx = Arc::new(ctx);
        ctx.timetable().apply_schedules(schedules);
        // A fatal error stops this app without cancelling the caller's token.
        let stop = shutdown.child_token();

        let tracker = TaskTracker::new();
        tracker.spawn(crate::connection::api_connection(ctx.clone(), stop.clone()));
        tracker.spawn(crate::scheduler::run(ctx.clone(), stop.clone()));
        tracker.spawn(crate::reload::on_sighup(ctx.clone(), stop.clone()));

        let ops_router = warren::metrics::ops_router(registry, ctx.health().clone());
        let (main, ops_server) = match ops {
            // Scrapers and probes on their own address: the main listener
            // (which may face the internet) no longer answers them.
            Some((l, at)) => {
                tracing::info!(addr = %at, "serving /metrics, /healthz, /readyz");
                let s = tokio::spawn(serve(l, ops_router, stop.clone()));
                (api_router(&ctx), Some(s))
            }
            None => {
                tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
                (ops_router.merge(api_router(&ctx)), None)
            }
        };
        let server = tokio::spawn(serve(listener, main, stop.clone()));
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
        if let Some(s) = ops_server {
            let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
        }
        match ctx.fatal() {
            Some(why) => Err(anyhow::anyhow!("{why}")),
            None => Ok(()),
        }
    }
}

fn api_router(ctx: &Arc<Ctx>) -> Router {
    let mut router = Router::new();
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
