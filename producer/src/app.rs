//! `warren-producer run`: wires config, metrics, the publishing connection
//! (API), the election and fire loop, SIGHUP reload and the HTTP server, and
//! shuts them down in order.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::Connection;
use prometheus::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren::amqp::Publisher;
use warren::metrics::{AmqpMetrics, Health};
use warren::Topology;

use crate::config::{self, ProducerConfig, Schedule, ScheduleSet};
use crate::metrics::Metrics;

/// What one schedule looks like from outside (API, metrics).
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub next_fire: Option<DateTime<Utc>>,
    pub last_fired: Option<DateTime<Utc>>,
}

/// The publishing side the API uses: present while connected.
#[derive(Clone)]
pub struct ApiPublisher {
    pub publisher: Publisher,
    pub blocked: warren::amqp::Blocked,
}

pub struct Ctx {
    pub cfg: ProducerConfig,
    pub config_path: Option<PathBuf>,
    pub topo: Topology,
    pub metrics: Metrics,
    pub amqp_metrics: AmqpMetrics,
    pub health: Health,
    pub schedules: watch::Sender<ScheduleSet>,
    pub status: Mutex<HashMap<String, Status>>,
    pub leader: AtomicBool,
    pub instance: String,
    pub api_publisher: RwLock<Option<ApiPublisher>>,
    /// Replaced whole on SIGHUP, so a rotated token works at once.
    pub tokens: RwLock<Arc<crate::api::Tokens>>,
    /// Why the process must stop (exit 1), set once.
    pub fatal: std::sync::OnceLock<String>,
}

impl Ctx {
    pub fn set_next(&self, name: &str, next: Option<DateTime<Utc>>) {
        // 0 = no further fire (e.g. a 7-field expression whose years are over).
        let v = next.map_or(0.0, |n| n.timestamp_millis() as f64 / 1000.0);
        self.metrics.next_fire.with_label_values(&[name]).set(v);
        if let Ok(mut m) = self.status.lock() {
            m.entry(name.to_owned()).or_default().next_fire = next;
        }
    }

    pub fn set_last(&self, name: &str, t: DateTime<Utc>) {
        if let Ok(mut m) = self.status.lock() {
            m.entry(name.to_owned()).or_default().last_fired = Some(t);
        }
    }

    pub fn status_of(&self, name: &str) -> Status {
        self.status
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .unwrap_or_default()
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// The API tokens in force.
    pub fn tokens(&self) -> Arc<crate::api::Tokens> {
        match self.tokens.read() {
            Ok(g) => g.clone(),
            // A writer panicked mid-swap: the Arc inside is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn api_publisher(&self) -> Option<ApiPublisher> {
        self.api_publisher.read().ok().and_then(|g| g.clone())
    }
}

/// This replica's name in logs, the state snapshot and the `app_id` of ticks:
/// `<host>:<pid>`, unique among replicas even without `$HOSTNAME`.
pub fn instance_id() -> String {
    format!("{}:{}", warren::config::host_name(), std::process::id())
}

/// Connect with [`warren::amqp::connect_with_backoff`] until it works or
/// shutdown (`None`). An error no retry can cure (credentials or vhost
/// refused, unreadable TLS file) ends the process with exit 1.
pub async fn connect_retry(
    ctx: &Ctx,
    role: &str,
    shutdown: &CancellationToken,
) -> Option<Connection> {
    match warren::amqp::connect_with_backoff(&ctx.cfg.amqp, role, shutdown).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::error!(role, error = %e, "cannot connect to the broker; not retrying");
            let _ = ctx.fatal.set(format!("cannot connect to the broker: {e}"));
            shutdown.cancel();
            None
        }
    }
}

/// Keep the API's publishing connection up: connect, declare the topology,
/// serve, and start over when it drops. Readiness follows this connection.
async fn api_connection(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut first = true;
    loop {
        let Some(conn) = connect_retry(&ctx, "producer", &shutdown).await else {
            return;
        };
        let setup = async {
            warren::topology::declare(&conn, &ctx.topo).await?;
            Publisher::new(&conn, ctx.cfg.amqp.confirm_timeout).await
        };
        match setup.await {
            Ok(publisher) => {
                let blocked = warren::amqp::watch_connection(&conn, ctx.amqp_metrics.clone());
                if let Ok(mut g) = ctx.api_publisher.write() {
                    *g = Some(ApiPublisher {
                        publisher: publisher.clone(),
                        blocked,
                    });
                }
                if !first {
                    ctx.amqp_metrics.reconnects.inc();
                }
                first = false;
                ctx.amqp_metrics.connected.set(1);
                ctx.health.set_ready(true);
                tracing::info!("connected to the broker");
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                    if !conn.status().connected() {
                        tracing::warn!("publishing connection lost; reconnecting");
                        break;
                    }
                }
                ctx.health.set_ready(false);
                ctx.amqp_metrics.connected.set(0);
                if let Ok(mut g) = ctx.api_publisher.write() {
                    *g = None;
                }
                if conn.status().connected() {
                    let _ = publisher.channel().close(200, "shutting down".into()).await;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the topology; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "producer shutting down".into()),
        )
        .await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// SIGHUP: re-read the config file and swap the schedules in. A file that
/// does not validate is rejected whole; the running schedules stay.
async fn reload_on_sighup(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload disabled");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        let Some(path) = ctx.config_path.clone() else {
            tracing::warn!("SIGHUP: no config file to reload (started without --config)");
            continue;
        };
        match config::load_checked(Some(&path)) {
            Ok((new_cfg, schedules)) => {
                reload_tokens(&ctx, &new_cfg);
                let changed = config::restart_only_changes(&ctx.cfg, &new_cfg);
                if !changed.is_empty() {
                    let keys = changed.join(", ");
                    tracing::warn!(keys = %keys, "SIGHUP: {keys} changed; restart to apply");
                }
                apply_schedules(&ctx, schedules);
                ctx.metrics.reload_success.set(1.0);
            }
            Err(e) => {
                ctx.metrics.reload_success.set(0.0);
                tracing::error!(error = %format!("{e:#}"), "SIGHUP: config rejected; keeping the running schedules");
            }
        }
    }
}

/// Swap in the tokens of a reloaded config (tokens file re-read), so a
/// rotation needs no restart. Logs counts, never tokens.
fn reload_tokens(ctx: &Ctx, cfg: &ProducerConfig) {
    match crate::api::Tokens::from_config(&cfg.api) {
        Ok(tokens) => {
            if *ctx.tokens() == tokens {
                return;
            }
            let count = tokens.len();
            match ctx.tokens.write() {
                Ok(mut g) => *g = Arc::new(tokens),
                Err(poisoned) => *poisoned.into_inner() = Arc::new(tokens),
            }
            tracing::info!(tokens = count, "SIGHUP: API tokens reloaded");
        }
        // The file changed again between validation and now.
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: API tokens not reloaded; the previous ones stay")
        }
    }
}

pub fn apply_schedules(ctx: &Ctx, schedules: Vec<Schedule>) {
    let old = ctx.schedules.borrow().clone();
    for s in old.iter() {
        if !schedules
            .iter()
            .any(|n| n.name() == s.name() && n.cfg.enabled)
        {
            ctx.metrics.forget_schedule(s.name());
            if let Ok(mut m) = ctx.status.lock() {
                m.remove(s.name());
            }
        }
    }
    for s in schedules.iter().filter(|s| s.cfg.enabled) {
        ctx.metrics.init_schedule(s.name());
    }
    let names: Vec<&str> = schedules.iter().map(|s| s.name()).collect();
    tracing::info!(schedules = ?names, "schedules in force");
    ctx.schedules.send_replace(Arc::new(schedules));
}

pub async fn run(
    cfg: ProducerConfig,
    config_path: Option<PathBuf>,
    schedules: Vec<Schedule>,
) -> anyhow::Result<()> {
    let registry = Registry::new();
    let amqp_metrics = AmqpMetrics::register(&registry)?;
    let metrics = Metrics::register(&registry)?;
    let health = Health::default();
    let shutdown = warren::shutdown::token();
    let tokens = crate::api::Tokens::from_config(&cfg.api)?;
    if cfg.api.enabled && tokens.is_empty() {
        tracing::warn!("no API tokens configured: every /v1 request will be refused (set api.publish_token / api.read_token)");
    }
    let (tx, _rx) = watch::channel::<ScheduleSet>(Arc::new(Vec::new()));
    let ctx = Arc::new(Ctx {
        topo: Topology::new(&cfg.topology),
        cfg,
        config_path,
        metrics,
        amqp_metrics,
        health: health.clone(),
        schedules: tx,
        status: Mutex::new(HashMap::new()),
        leader: AtomicBool::new(false),
        instance: instance_id(),
        api_publisher: RwLock::new(None),
        tokens: RwLock::new(Arc::new(tokens)),
        fatal: std::sync::OnceLock::new(),
    });
    apply_schedules(&ctx, schedules);

    let tracker = TaskTracker::new();
    tracker.spawn(api_connection(ctx.clone(), shutdown.clone()));
    tracker.spawn(crate::scheduler::run(ctx.clone(), shutdown.clone()));
    tracker.spawn(reload_on_sighup(ctx.clone(), shutdown.clone()));

    let mut router = warren::metrics::ops_router(registry, health);
    if ctx.cfg.api.enabled {
        router = router.merge(crate::api::router(ctx.clone()));
    }
    let (addr, server) =
        warren::metrics::serve(ctx.cfg.http.addr, router, shutdown.clone()).await?;
    tracing::info!(%addr, instance = %ctx.instance, "warren-producer running");

    shutdown.cancelled().await;
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 10s");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    match ctx.fatal.get() {
        Some(why) => Err(anyhow::anyhow!("{why}")),
        None => Ok(()),
    }
}
