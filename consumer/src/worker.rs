//! The worker: connect, declare, consume, run each delivery in its own task,
//! carry out the [`Action`](crate::outcome::Action) its outcome decides, and
//! survive the broker going away. This module owns the [`Worker`] API and the
//! reconnect loop; the rest lives in submodules:
//!
//! | module | owns |
//! |---|---|
//! | `session` | one connection: consumers, the consume loop, drain |
//! | `delivery` | one delivery as stages (open → resolve → hold if early → admit → attempt → conclude) and the one place its `Finish` is carried out |
//! | `acks` | one channel's acks, coalesced into multiple-acks over contiguous runs |
//! | `broker` | the port a delivery reaches RabbitMQ through (publish, ack, requeue) |
//! | `settle` | the ticket that ends a delivery and counts it exactly once |
//! | `step_event` | a workflow step's outcome event, sent before its ack |
//! | [`fault`] | fail points for the fault-injection tests |
//!
//! * One connection per session; one channel per consumed queue with
//!   per-channel prefetch (`basic_qos`, global = false); one confirm-mode
//!   publisher channel for retries and dead letters.
//! * The consume loop only takes deliveries: it first acquires a semaphore
//!   permit, then moves permit and delivery into a spawned task, so acks and
//!   confirms never serialise the loop and at most `concurrency` tasks run.
//! * Each task keeps its delivery's channel alive and acks only on it, through
//!   the channel's `acks::AckBook` (one `multiple` ack per contiguous run of
//!   finished deliveries); if the channel died meanwhile, the ack is refused
//!   and the broker redelivers.
//! * Every delivery ends through its `settle::Ticket`: acked, or given back
//!   (nack with requeue, else its channel closed, else the session ended).
//!   Each task is supervised: a panic anywhere in handling gives the delivery
//!   back instead of leaving it unacked until the connection closes.
//!   [`fault`] has the fail points the fault-injection tests use.
//! * Connection or channel loss → reconnect with exponential backoff
//!   (`backon`), re-declare, re-consume. A consumer the broker cancelled
//!   (queue deleted) is re-declared and re-consumed on a fresh channel.
//! * Shutdown: `basic.cancel`, wait for running tasks up to the grace, close
//!   the connection (whatever is unacked goes back to its queue).

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren::metrics::{AmqpMetrics, Health};
use warren::Topology;

use crate::config::ConsumerConfig;
use crate::handler::Registry;
use crate::metrics::ConsumerMetrics;

mod acks;
mod broker;
mod delivery;
pub mod fault;
mod life;
mod session;
mod settle;
mod step_event;

pub use delivery::strip_death_headers;
use session::{End, Session};

/// Builds a [`Worker`] from a config and a registry of handlers.
pub struct WorkerBuilder {
    cfg: ConsumerConfig,
    registry: Registry,
    prometheus: Option<prometheus::Registry>,
    health: Option<Health>,
}

impl WorkerBuilder {
    /// The handlers to run (default: none, so every task is dead-lettered
    /// with kind `no_handler`).
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Register metrics here (default: a fresh registry, see [`Worker::prometheus`]).
    pub fn prometheus(mut self, registry: prometheus::Registry) -> Self {
        self.prometheus = Some(registry);
        self
    }

    /// Readiness flag to drive (default: a fresh one, see [`Worker::health`]).
    pub fn health(mut self, health: Health) -> Self {
        self.health = Some(health);
        self
    }

    pub fn build(self) -> anyhow::Result<Worker> {
        let prom = self.prometheus.unwrap_or_default();
        let metrics = ConsumerMetrics::register(&prom)?;
        let amqp_metrics = AmqpMetrics::register(&prom)?;
        let flow = crate::flow::Flow::new(&self.cfg, &prom)?;
        let topo = Topology::new(&self.cfg.topology).with_events(self.cfg.events.stream());
        let instance = format!("{}:{}", warren::config::host_name(), std::process::id());
        let recorder = if self.cfg.events.enabled {
            warren::events::Recorder::new(
                topo.events_stream(),
                warren::events::Origin {
                    role: "consumer".into(),
                    instance: instance.clone(),
                    host: warren::config::host_name(),
                },
                warren::events::EventMetrics::register(&prom)?,
                self.cfg.amqp.confirm_timeout,
            )
        } else {
            warren::events::Recorder::disabled()
        };
        let life = life::Life::new(
            instance,
            recorder,
            self.cfg.results.clone(),
            self.cfg.workflow.max_result_bytes,
        );
        let opener = warren::security::Opener::from_config(&self.cfg.security)?;
        let queues = self.cfg.queue_names();
        anyhow::ensure!(!queues.is_empty(), "no work queue to consume");
        Ok(Worker {
            shared: Arc::new(Shared {
                topo,
                registry: self.registry,
                metrics,
                opener,
                flow,
                life,
                cfg: self.cfg,
            }),
            queues,
            amqp_metrics,
            health: self.health.unwrap_or_default(),
            prom,
        })
    }
}

/// A session that ends sooner than this after it opened is young: the next
/// one waits a while first.
const YOUNG_SESSION: Duration = Duration::from_secs(10);

/// The waits before sessions that follow young ones (e.g. consuming is
/// refused while connecting works), so they never turn into a hot reconnect
/// loop: 200 ms, doubling up to 10 s.
fn young_session_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .without_max_times()
        .build()
}

/// A running consumer: see the module docs.
pub struct Worker {
    shared: Arc<Shared>,
    queues: Vec<String>,
    amqp_metrics: AmqpMetrics,
    health: Health,
    prom: prometheus::Registry,
}

struct Shared {
    cfg: ConsumerConfig,
    topo: Topology,
    registry: Registry,
    metrics: ConsumerMetrics,
    /// Verifies signatures and decrypts, before any handler runs.
    opener: warren::security::Opener,
    /// Limits and circuit breakers, asked before each handler call.
    flow: crate::flow::Flow,
    /// Task events and what this consumer announces.
    life: life::Life,
}

impl Worker {
    pub fn builder(cfg: ConsumerConfig) -> WorkerBuilder {
        WorkerBuilder {
            cfg,
            registry: Registry::new(),
            prometheus: None,
            health: None,
        }
    }

    /// Ready while connected and consuming.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The metrics registry (serve it with [`warren::metrics::ops_router`]).
    pub fn prometheus(&self) -> prometheus::Registry {
        self.prom.clone()
    }

    pub fn metrics(&self) -> ConsumerMetrics {
        self.shared.metrics.clone()
    }

    /// Consume until `shutdown` is cancelled, then drain. Returns an error only
    /// for problems no reconnect can fix (bad URL, conflicting topology).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // The consume loop runs as a task of the runtime, whoever awaits
        // this: awaited in `block_on` (a binary's main) it would run on the
        // calling thread, outside the runtime's workers, and every delivery's
        // task would wait for a worker thread to be woken before it starts.
        // Spawned, a delivery's task starts on the loop's own worker. Dropping
        // this future still stops the worker, as it did before.
        let looping = tokio::spawn(self.consume_until_shutdown(shutdown));
        match tokio_util::task::AbortOnDropHandle::new(looping).await {
            Ok(res) => res,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(anyhow::anyhow!(
                "the worker's consume loop was cancelled: {e}"
            )),
        }
    }

    async fn consume_until_shutdown(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let sem = Arc::new(Semaphore::new(self.shared.cfg.worker.concurrency));
        let _announcing = self.announce_until(shutdown.clone());
        let mut sessions = 0u64;
        let mut pauses = young_session_backoff();
        let mut pause = None;
        loop {
            if let Some(pause) = pause {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            let Some(session) = self.connect(&shutdown).await? else {
                break;
            };
            let opened = Instant::now();
            sessions += 1;
            if sessions > 1 {
                self.amqp_metrics.reconnects.inc();
            }
            self.amqp_metrics.connected.set(1);
            let (end, session) = self.consume(session, &shutdown, &tracker, &sem).await;
            self.health.set_ready(false);
            match end {
                End::Shutdown => {
                    self.drain(session, &tracker).await;
                    return Ok(());
                }
                End::Refused(e) => {
                    self.close(session, 200, "warren consumer refused").await;
                    return Err(e);
                }
                End::Lost => {
                    tracing::warn!(
                        "connection lost; reconnecting (unacked deliveries will be redelivered)"
                    );
                    self.close(session, 320, "warren consumer reconnecting")
                        .await;
                    pause = if opened.elapsed() < YOUNG_SESSION {
                        pauses.next()
                    } else {
                        pauses = young_session_backoff();
                        None
                    };
                }
            }
        }
        self.health.set_ready(false);
        tracker.close();
        let _ = tokio::time::timeout(self.shared.cfg.worker.drain_grace, tracker.wait()).await;
        Ok(())
    }

    /// End a session that is not drained (refused or lost): finished
    /// tasks' acks go out first (the consuming channels may well be fine: a
    /// publish failure also ends the session), then the connection closes;
    /// its unacked deliveries go back to their queues and late acks from
    /// its tasks are refused.
    async fn close(&self, session: Session, code: u16, why: &str) {
        self.amqp_metrics.connected.set(0);
        session.flush_acks().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), session.conn.close(code, why.into()))
            .await;
    }

    /// Announce this consumer every [`warren::events::WORKER_EVERY`] until
    /// `stop` (or the handle is dropped).
    fn announce_until(&self, stop: CancellationToken) -> tokio_util::task::AbortOnDropHandle<()> {
        let shared = self.shared.clone();
        let queues = self.queues.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut every = tokio::time::interval(warren::events::WORKER_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                let w = shared.life.worker(&queues, shared.cfg.worker.concurrency);
                shared.life.recorder().announce(w);
            }
        }))
    }

    /// Open a session, retrying with backoff; `None` on shutdown.
    async fn connect(&self, shutdown: &CancellationToken) -> anyhow::Result<Option<Session>> {
        let attempt = (|| self.open_session())
            .retry(warren::amqp::connect_backoff())
            .when(|e: &warren::Error| !e.is_fatal())
            .notify(|e, d| {
                tracing::warn!(error = %e, retry_in = ?d, "cannot open AMQP session");
            });
        tokio::select! {
            _ = shutdown.cancelled() => Ok(None),
            r = attempt => Ok(Some(r?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn young_sessions_wait_longer_each_time_up_to_ten_seconds() {
        let ms: Vec<u128> = young_session_backoff()
            .take(9)
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(
            ms,
            [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }
}
