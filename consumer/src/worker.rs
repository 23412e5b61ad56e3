//! The worker: connect, declare, consume, run each delivery in its own task,
//! carry out the [`Action`](crate::outcome::Action) its outcome decides, and
//! survive the broker going away.
//!
//! * One connection per session; one channel per consumed queue with
//!   per-channel prefetch (`basic_qos`, global = false); one confirm-mode
//!   publisher channel for retries and dead letters.
//! * The consume loop only takes deliveries: it first acquires a semaphore
//!   permit, then moves permit and delivery into a spawned task, so acks and
//!   confirms never serialise the loop and at most `concurrency` tasks run.
//! * Each task keeps its delivery's channel alive and acks only on it; if the
//!   channel died meanwhile, the ack is refused and the broker redelivers.
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

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::Retryable;
use chrono::Utc;
use futures_util::stream::{self, BoxStream, SelectAll};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use warren::amqp::Publisher;
use warren::envelope::{headers, rfc3339, PERSISTENT};
use warren::metrics::{AmqpMetrics, Health};
use warren::{Task, Topology};

use crate::config::ConsumerConfig;
use crate::handler::{Registry, TaskError};
use crate::metrics::{ConsumerMetrics, UNKNOWN_TASK};
use crate::outcome::{self, decide, labels, Action, Outcome};

pub mod fault;
mod settle;

use fault::Step;
use settle::Ticket;

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
        let topo = Topology::new(&self.cfg.topology);
        let queues = self.cfg.queue_names();
        anyhow::ensure!(!queues.is_empty(), "no work queue to consume");
        Ok(Worker {
            shared: Arc::new(Shared {
                topo,
                registry: self.registry,
                metrics,
                cfg: self.cfg,
            }),
            queues,
            amqp_metrics,
            health: self.health.unwrap_or_default(),
            prom,
        })
    }
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
}

/// One connection and what lives on it.
struct Session {
    conn: Connection,
    publisher: Publisher,
    /// Channel and consumer tag per consumed queue (same order as `queues`).
    consumers: Vec<(Channel, ShortString)>,
    /// Cancelled by a task whose publish failed: the session is unusable.
    broken: CancellationToken,
}

// Deliveries move by value: boxing each would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Ev {
    Delivery(usize, lapin::Result<Delivery>),
    Ended(usize),
}

enum End {
    Shutdown,
    Lost,
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
        let tracker = TaskTracker::new();
        let sem = Arc::new(Semaphore::new(self.shared.cfg.worker.concurrency));
        let mut sessions = 0u64;
        // Sessions that die young (e.g. consuming is refused while connecting
        // works) must not turn into a hot reconnect loop.
        let mut short_lived = 0u32;
        loop {
            if short_lived > 0 {
                let pause = Duration::from_millis(100)
                    .saturating_mul(1 << short_lived.min(7))
                    .min(Duration::from_secs(10));
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
                End::Lost => {
                    self.amqp_metrics.connected.set(0);
                    short_lived = if opened.elapsed() < Duration::from_secs(10) {
                        short_lived.saturating_add(1)
                    } else {
                        0
                    };
                    tracing::warn!(
                        "connection lost; reconnecting (unacked deliveries will be redelivered)"
                    );
                    // Unacked deliveries of this session go back to their
                    // queues; late acks from its tasks are refused.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        session
                            .conn
                            .close(320, "warren consumer reconnecting".into()),
                    )
                    .await;
                }
            }
        }
        self.health.set_ready(false);
        tracker.close();
        let _ = tokio::time::timeout(self.shared.cfg.worker.drain_grace, tracker.wait()).await;
        Ok(())
    }

    /// Open a session, retrying with backoff; `None` on shutdown.
    async fn connect(&self, shutdown: &CancellationToken) -> anyhow::Result<Option<Session>> {
        let attempt = (|| self.open_session())
            .retry(warren::amqp::connect_backoff())
            .when(|e: &warren::Error| !is_fatal(e))
            .notify(|e, d| {
                tracing::warn!(error = %e, retry_in = ?d, "cannot open AMQP session");
            });
        tokio::select! {
            _ = shutdown.cancelled() => Ok(None),
            r = attempt => Ok(Some(r?)),
        }
    }

    async fn open_session(&self) -> Result<Session, warren::Error> {
        let cfg = &self.shared.cfg;
        let conn = warren::amqp::connect(&cfg.amqp, "warren-consumer").await?;
        let res = async {
            warren::amqp::watch_connection(&conn, self.amqp_metrics.clone());
            warren::topology::declare(&conn, &self.shared.topo).await?;
            let publisher = Publisher::new(&conn, cfg.amqp.confirm_timeout).await?;
            Ok::<_, warren::Error>(publisher)
        }
        .await;
        match res {
            Ok(publisher) => Ok(Session {
                conn,
                publisher,
                consumers: Vec::new(),
                broken: CancellationToken::new(),
            }),
            Err(e) => {
                let _ = conn.close(200, "setup failed".into()).await;
                Err(e)
            }
        }
    }

    async fn start_consumer(
        &self,
        conn: &Connection,
        idx: usize,
    ) -> Result<(Channel, ShortString, BoxStream<'static, Ev>), warren::Error> {
        let queue = &self.queues[idx];
        let ch = conn.create_channel().await?;
        ch.basic_qos(
            self.shared.cfg.worker.prefetch,
            BasicQosOptions { global: false },
        )
        .await?;
        let tag = format!(
            "warren-consumer.{}.{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let s = consumer
            .map(move |d| Ev::Delivery(idx, d))
            .chain(stream::once(async move { Ev::Ended(idx) }))
            .boxed();
        tracing::info!(queue = %queue, prefetch = self.shared.cfg.worker.prefetch, "consuming");
        Ok((ch, tag.as_str().into(), s))
    }

    async fn consume(
        &self,
        mut session: Session,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
        sem: &Arc<Semaphore>,
    ) -> (End, Session) {
        let mut streams: SelectAll<BoxStream<'static, Ev>> = SelectAll::new();
        for idx in 0..self.queues.len() {
            match self.start_consumer(&session.conn, idx).await {
                Ok((ch, tag, s)) => {
                    session.consumers.push((ch, tag));
                    streams.push(s);
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue = %self.queues[idx], "cannot consume");
                    return (End::Lost, session);
                }
            }
        }
        self.health.set_ready(true);
        let queues: Vec<Arc<str>> = self.queues.iter().map(|q| Arc::from(q.as_str())).collect();
        loop {
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return (End::Shutdown, session),
                _ = session.broken.cancelled() => return (End::Lost, session),
                p = sem.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return (End::Shutdown, session),
                },
            };
            let ev = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return (End::Shutdown, session),
                _ = session.broken.cancelled() => return (End::Lost, session),
                ev = streams.next() => ev,
            };
            match ev {
                Some(Ev::Delivery(idx, Ok(delivery))) => {
                    let shared = self.shared.clone();
                    let publisher = session.publisher.clone();
                    let channel = session.consumers[idx].0.clone();
                    let queue = queues[idx].clone();
                    let broken = session.broken.clone();
                    tracker.spawn(async move {
                        let _permit = permit;
                        supervise(shared, publisher, channel, queue, delivery, broken).await;
                    });
                }
                Some(Ev::Delivery(idx, Err(e))) => {
                    tracing::warn!(error = %e, queue = %self.queues[idx], "consumer failed");
                }
                Some(Ev::Ended(idx)) => {
                    if !session.conn.status().connected() {
                        return (End::Lost, session);
                    }
                    // Cancelled by the broker (queue deleted) or its channel
                    // closed: re-declare and consume again on a new channel.
                    tracing::warn!(queue = %self.queues[idx], "consumer ended; re-declaring and re-consuming");
                    self.health.set_ready(false);
                    if let Err(e) =
                        warren::topology::declare(&session.conn, &self.shared.topo).await
                    {
                        tracing::warn!(error = %e, "re-declare failed");
                        return (End::Lost, session);
                    }
                    match self.start_consumer(&session.conn, idx).await {
                        Ok((ch, tag, s)) => {
                            // The old channel closes once its running tasks
                            // (which hold it for their acks) are done.
                            session.consumers[idx] = (ch, tag);
                            streams.push(s);
                            self.health.set_ready(true);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "re-consume failed");
                            return (End::Lost, session);
                        }
                    }
                }
                None => return (End::Lost, session),
            }
        }
    }

    async fn drain(&self, session: Session, tracker: &TaskTracker) {
        let grace = self.shared.cfg.worker.drain_grace;
        for (ch, tag) in &session.consumers {
            if ch.status().connected() {
                let _ = ch
                    .basic_cancel(tag.clone(), BasicCancelOptions::default())
                    .await;
            }
        }
        tracker.close();
        let running = tracker.len();
        tracing::info!(running, grace = ?grace, "draining: consumers cancelled, waiting for running tasks");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                unfinished = tracker.len(),
                "drain grace over; unfinished tasks return to the queue unacked"
            );
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            session
                .conn
                .close(200, "warren consumer shutting down".into()),
        )
        .await;
        self.amqp_metrics.connected.set(0);
        tracing::info!("consumer stopped");
    }
}

/// Errors a reconnect cannot fix.
fn is_fatal(e: &warren::Error) -> bool {
    e.is_refused()
        || matches!(
            e,
            warren::Error::Url(_)
                | warren::Error::Tls(_)
                | warren::Error::TopologyConflict { .. }
                | warren::Error::Declare { .. }
        )
}

/// `headers` without the broker's dead-lettering records.
pub fn strip_death_headers(headers: &FieldTable) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in headers.inner() {
        let k_ = k.as_str();
        if !(k_ == "x-death" || k_.starts_with("x-first-death-") || k_.starts_with("x-last-death-"))
        {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Decrements the in-flight gauge however the task ends.
struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Runs [`handle`] and catches a panic anywhere in it (decode, resolve,
/// metrics, decide, publish, ack — the handler call has its own catch): the
/// delivery is then given back to its queue, so it never stays in flight
/// until the connection closes.
async fn supervise(
    shared: Arc<Shared>,
    publisher: Publisher,
    channel: Channel,
    queue: Arc<str>,
    delivery: Delivery,
    broken: CancellationToken,
) {
    let m = shared.metrics.clone();
    let ticket = Ticket::new(delivery.acker.clone(), channel, m.clone());
    let run = handle(&shared, &publisher, &queue, &delivery, &broken, &ticket);
    if let Err(panic) = AssertUnwindSafe(run).catch_unwind().await {
        m.panics.inc();
        // The message is the panic's own text (code, not payload bytes).
        tracing::error!(
            panic = %panic_message(&*panic),
            routing_key = %warren::delay::strip_prefix(delivery.routing_key.as_str()),
            "panic while handling a delivery; giving it back to its queue"
        );
        ticket.after_panic().await;
    }
}

async fn handle(
    shared: &Shared,
    publisher: &Publisher,
    queue: &str,
    delivery: &Delivery,
    broken: &CancellationToken,
    ticket: &Ticket,
) {
    let m = &shared.metrics;
    m.in_flight.inc();
    let _in_flight = InFlight(m.in_flight.clone());
    let cfg = &shared.cfg.worker;
    let prefix = shared.topo.prefix();
    let d = Delivered {
        shared,
        publisher,
        queue,
        delivery,
        broken,
        ticket,
    };
    let decoded = fault::check(prefix, Step::Decode)
        .map_err(|text| (text, "injected"))
        .and_then(|()| {
            Task::decode(
                delivery.routing_key.as_str(),
                &delivery.properties,
                &delivery.data,
                cfg.max_body_bytes,
            )
            .map_err(|e| (e.to_string(), e.kind()))
        });
    let task = match decoded {
        Ok(t) => t,
        Err((error, kind)) => {
            ticket.received(UNKNOWN_TASK);
            tracing::warn!(error = %error, kind, routing_key = %delivery.routing_key, "poison message; dead-lettering");
            d.dead_letter_raw(&error, kind).await;
            return;
        }
    };
    let span = tracing::info_span!("task", task.id = %task.id, task.name = %task.name, task.attempt = task.attempt);
    async {
        let resolved = match fault::check(prefix, Step::Resolve) {
            Ok(()) => shared.registry.resolve(&task.name),
            Err(text) => {
                tracing::warn!(error = %text, "handler lookup failed");
                None
            }
        };
        let Some(handler) = resolved else {
            ticket.received(UNKNOWN_TASK);
            tracing::warn!("no handler for this task; dead-lettering");
            let reason = format!("no handler for task `{}`", task.name);
            let mut t = task;
            t.last_error = Some(reason.clone());
            d.dead_letter(t, &reason, outcome::kind::NO_HANDLER, labels::REJECTED)
                .await;
            return;
        };
        let label = handler.label.as_str();
        ticket.received(label);
        let now = Utc::now();
        if let Some(nb) = task.not_before {
            if let Ok(wait) = (nb - now).to_std() {
                if wait > warren::delay::RESOLUTION {
                    // Early (published without a delay): park it until due.
                    // Not an attempt: the copy keeps its attempt number.
                    tracing::debug!(wait = ?wait, "not due yet; delaying");
                    d.republish(&task, wait, task.attempt, labels::PARKED).await;
                    return;
                }
            }
        }
        if let Some(w) = task.queue_wait(now) {
            m.queue_wait
                .with_label_values(&[label])
                .observe(w.as_secs_f64());
        }
        // One timeout per attempt, for every kind of handler: the task's
        // header, else the handler's own, else the worker's default. The
        // handler gets it in `task.timeout` (e.g. exec kills its child then).
        let timeout = task
            .timeout
            .or(handler.timeout())
            .unwrap_or(cfg.task_timeout);
        tracing::debug!(redelivered = delivery.redelivered, "task started");
        let started = Instant::now();
        let mut attempt = task.clone();
        attempt.timeout = Some(timeout);
        let call = async {
            fault::check(prefix, Step::Run).map_err(TaskError::retryable)?;
            handler.call(attempt).await
        };
        let run = AssertUnwindSafe(call).catch_unwind();
        let outcome = match tokio::time::timeout(timeout, run).await {
            Ok(Ok(Ok(()))) => Outcome::Succeeded,
            Ok(Ok(Err(e))) => Outcome::Failed(e),
            Ok(Err(panic)) => Outcome::Panicked(panic_message(&*panic)),
            Err(_) => Outcome::TimedOut(timeout),
        };
        m.duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        let policy = shared
            .cfg
            .retry
            .policy_for(&task.name)
            .with_overrides(task.max_attempts, &task.retry);
        let action = decide(&outcome, task.attempt, &policy, rand::random::<f64>());
        let counted = outcome::label(&action);
        match action {
            Action::Ack => {
                tracing::debug!("task succeeded");
                d.ack(counted).await
            }
            Action::Retry { delay, error } => {
                tracing::warn!(error = %error, retry_in = ?delay, "task failed; retrying");
                let done = task.attempt;
                let mut next = task;
                next.attempt = next.attempt.saturating_add(1);
                next.last_error = Some(error);
                next.first_failed_at.get_or_insert(now);
                d.republish(&next, delay, done, counted).await
            }
            Action::DeadLetter {
                reason,
                kind,
                error,
            } => {
                tracing::warn!(reason = %reason, kind, "task dead-lettered");
                let mut t = task;
                t.last_error = Some(error);
                t.first_failed_at.get_or_insert(now);
                d.dead_letter(t, &reason, kind, counted).await
            }
        }
    }
    .instrument(span)
    .await;
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// A delivery being finished: every path settles it exactly once through
/// its [`Ticket`] (ack or give back), and acks only after any copy it
/// publishes is confirmed.
struct Delivered<'a> {
    shared: &'a Shared,
    publisher: &'a Publisher,
    queue: &'a str,
    delivery: &'a Delivery,
    broken: &'a CancellationToken,
    ticket: &'a Ticket,
}

impl Delivered<'_> {
    fn prefix(&self) -> &str {
        self.shared.topo.prefix()
    }

    async fn ack(&self, outcome: &'static str) {
        let fault = fault::check(self.prefix(), Step::Ack);
        self.ticket.ack(outcome, fault).await
    }

    /// A publish failed: leave the delivery unacked and end the session, so
    /// the connection closes and the broker redelivers it.
    fn publish_failed(&self, e: &warren::Error) {
        tracing::warn!(error = %e, "publish failed; delivery left unacked, reconnecting");
        self.ticket.left_to_session();
        self.broken.cancel();
    }

    /// Publish `copy` (a retry copy, or a task parked until due) after
    /// `delay`, then ack counting `outcome`. If no queue takes it, the task
    /// is dead-lettered as it is now: attempt `attempts_made`.
    async fn republish(
        &self,
        copy: &Task,
        delay: Duration,
        attempts_made: u32,
        outcome: &'static str,
    ) {
        let topo = &self.shared.topo;
        // The broker's own death records must not travel with the copy:
        // RabbitMQ drops a message whose `x-death` already lists a delay
        // level it expires from again (dead-letter cycle detection).
        let mut copy = copy.clone();
        copy.extra_headers = strip_death_headers(&copy.extra_headers);
        let res = match fault::check(self.prefix(), Step::RetryPublish) {
            Err(text) => Err(injected_nack(&text)),
            Ok(()) => match self.publisher.send_task(topo, &copy, delay).await {
                Ok(p) => p.confirmed().await,
                Err(e) => Err(e),
            },
        };
        match res {
            Ok(()) => self.ack(outcome).await,
            Err(e @ warren::Error::Unroutable { .. }) => {
                let reason = format!("cannot reschedule: {e}");
                let mut t = copy;
                t.attempt = attempts_made;
                self.dead_letter(t, &reason, outcome::kind::UNROUTABLE, labels::DEAD_LETTERED)
                    .await
            }
            Err(e) => self.publish_failed(&e),
        }
    }

    fn dead_headers(&self, h: &mut FieldTable, reason: &str, kind: &str) {
        let s = |v: &str| AMQPValue::LongString(v.into());
        h.insert(headers::DEAD_REASON.into(), s(reason));
        h.insert(headers::DEAD_KIND.into(), s(kind));
        h.insert(headers::DEAD_AT.into(), s(&rfc3339(Utc::now())));
        h.insert(headers::ORIGINAL_QUEUE.into(), s(self.queue));
        // The task's own key: a retried task arrives with a delay prefix.
        h.insert(
            headers::ORIGINAL_ROUTING_KEY.into(),
            s(warren::delay::strip_prefix(
                self.delivery.routing_key.as_str(),
            )),
        );
    }

    /// Publish `task` to the dead exchange with why, then ack counting `outcome`.
    async fn dead_letter(&self, mut task: Task, reason: &str, kind: &str, outcome: &'static str) {
        let mut h = strip_death_headers(&task.extra_headers);
        self.dead_headers(&mut h, reason, kind);
        // Always present on dead copies (the envelope omits attempt 1).
        h.insert(
            headers::ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(task.attempt)),
        );
        task.extra_headers = h;
        let props = task.properties();
        self.publish_dead(&task.name, props, &task.payload, outcome)
            .await
    }

    /// Dead-letter an undecodable message as it came, plus the dead headers.
    async fn dead_letter_raw(&self, reason: &str, kind: &str) {
        let props = self.delivery.properties.clone();
        let mut h = props.headers().clone().unwrap_or_default();
        self.dead_headers(&mut h, reason, kind);
        let props = props.with_headers(h).with_delivery_mode(PERSISTENT);
        let key = warren::delay::strip_prefix(self.delivery.routing_key.as_str()).to_owned();
        self.publish_dead(&key, props, &self.delivery.data, labels::REJECTED)
            .await
    }

    async fn publish_dead(
        &self,
        key: &str,
        props: BasicProperties,
        body: &[u8],
        outcome: &'static str,
    ) {
        let ex = self.shared.topo.dead_exchange();
        let res = match fault::check(self.prefix(), Step::DeadPublish) {
            Err(text) => Err(injected_nack(&text)),
            Ok(()) => self.publisher.publish(&ex, key, props, body).await,
        };
        match res {
            Ok(()) => self.ack(outcome).await,
            Err(e) => self.publish_failed(&e),
        }
    }
}

/// A publish the `failpoints` tests made fail, as the broker would: a nack.
fn injected_nack(text: &str) -> warren::Error {
    tracing::warn!(error = %text, "publish failed (fault injected)");
    warren::Error::Nacked {
        exchange: "(fault injected)".into(),
        routing_key: String::new(),
    }
}
