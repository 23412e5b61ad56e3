//! Task events: what happened to each task, recorded by both roles onto the
//! stream `<prefix>.events` (see docs/tasks.md) and read back by every
//! producer replica's index.
//!
//! * An [`Event`] names a task (id, name, queue, trace id) and one step of
//!   its life ([`What`]); it never holds a payload byte. Errors and reasons
//!   are cut to [`MAX_TEXT`] bytes; a kept result to the role's limit.
//! * A [`Recorder`] takes events without ever waiting: `try_send` into a
//!   bounded channel. One task per process drains it, batches up to
//!   [`MAX_BATCH`] events per message (a [`Batch`]) and publishes them on the
//!   role's own connection with confirms. Whatever cannot go — the channel
//!   is full, the stream is missing, the broker refuses or blocks — is
//!   dropped and counted (`warren_events_dropped_total{reason}`): a task
//!   never waits on an event and never fails because of one.
//! * Consumers announce themselves ([`Worker`]) through the same recorder
//!   every [`WORKER_EVERY`]; a worker not heard for [`WORKER_TTL`] is gone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::{BasicProperties, Connection};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::amqp::{Pending, Publisher};
use crate::error::Error;

/// Most events one stream message carries.
pub const MAX_BATCH: usize = 1000;
/// Events waiting to be published; more are dropped (`queue_full`).
pub const CHANNEL_CAPACITY: usize = 32 * 1024;
/// How long the first event of a batch waits for company.
pub const LINGER: Duration = Duration::from_millis(50);
/// Batches awaiting their confirm at once.
const IN_FLIGHT: usize = 16;
/// Longest error or reason text an event keeps (bytes; cut at a char boundary).
pub const MAX_TEXT: usize = 512;
/// How often a consumer announces itself.
pub const WORKER_EVERY: Duration = Duration::from_secs(5);
/// A consumer silent this long is no longer listed (three missed announcements).
pub const WORKER_TTL: Duration = Duration::from_secs(16);

/// Why events were dropped (the `reason` label).
pub mod reason {
    /// The recorder's channel was full (events came faster than they went).
    pub const QUEUE_FULL: &str = "queue_full";
    /// No connection or channel to publish on.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The stream does not exist (the publish was returned).
    pub const MISSING: &str = "missing";
    /// The broker nacked or refused the publish.
    pub const REFUSED: &str = "refused";
    /// No confirm in time (a resource alarm blocks publishers).
    pub const TIMEOUT: &str = "timeout";
    pub const ALL: &[&str] = &[QUEUE_FULL, UNAVAILABLE, MISSING, REFUSED, TIMEOUT];
}

/// One step of one task's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub name: String,
    /// The work queue (consumer events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// When it happened (Unix milliseconds).
    pub at: i64,
    /// W3C trace id (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    #[serde(flatten)]
    pub what: What,
}

/// Who published a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Schedule,
    Api,
    Cli,
    Workflow,
    Console,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Schedule => "schedule",
            Source::Api => "api",
            Source::Cli => "cli",
            Source::Workflow => "workflow",
            Source::Console => "console",
        }
    }
}

/// What happened. Consumer events carry the attempt they belong to; the
/// consumer that ran it is the [`Batch`]'s instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum What {
    Published {
        source: Source,
    },
    Started {
        attempt: u32,
    },
    Retried {
        attempt: u32,
        error: String,
        delay_ms: u64,
        /// When the next attempt is due (Unix milliseconds).
        next_at: i64,
    },
    Succeeded {
        attempt: u32,
        duration_ms: u64,
        /// Kept only for task names listed in the consumer's `results`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<serde_json::Value>,
    },
    Dead {
        attempt: u32,
        kind: String,
        reason: String,
    },
    Requeued {
        attempt: u32,
        why: String,
    },
}

impl Event {
    pub fn new(id: &str, name: &str, what: What) -> Self {
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            queue: None,
            at: Utc::now().timestamp_millis(),
            trace: None,
            what,
        }
    }

    pub fn queue(mut self, queue: &str) -> Self {
        self.queue = Some(queue.to_owned());
        self
    }

    pub fn trace(mut self, trace: Option<String>) -> Self {
        self.trace = trace;
        self
    }

    pub fn when(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_millis(self.at)
    }
}

/// `text` cut to at most `max` bytes at a char boundary.
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A consumer's announcement of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    pub instance: String,
    pub host: String,
    pub queues: Vec<String>,
    pub concurrency: u32,
    /// Tasks running at the announcement.
    pub running: u32,
    /// Attempts that succeeded / failed (retried or dead) since start.
    pub succeeded: u64,
    pub failed: u64,
    /// Unix milliseconds.
    pub at: i64,
}

/// One stream message: events from one process, and maybe its announcement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub v: u32,
    /// `producer` or `consumer`.
    pub role: String,
    pub instance: String,
    pub host: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<Worker>,
}

/// Who records: put on every batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub role: String,
    pub instance: String,
    pub host: String,
}

/// `warren_events_*` of one role.
#[derive(Clone)]
pub struct EventMetrics {
    pub published: IntCounter,
    pub dropped: IntCounterVec,
}

impl EventMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            published: IntCounter::new(
                "warren_events_published_total",
                "Task events the broker confirmed on the events stream",
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "warren_events_dropped_total",
                    "Task events dropped instead of delaying a task, by reason",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.dropped.clone()))?;
        for r in reason::ALL {
            m.dropped.with_label_values(&[r]);
        }
        Ok(m)
    }

    fn drop_n(&self, reason: &str, n: usize) {
        self.dropped.with_label_values(&[reason]).inc_by(n as u64);
    }
}

enum Item {
    Event(Event),
    Worker(Worker),
    Flush(oneshot::Sender<()>),
}

struct Inner {
    tx: mpsc::Sender<Item>,
    /// Taken by the first [`Recorder::attach`], which starts the publishing
    /// task (inside the runtime).
    start: Mutex<Option<mpsc::Receiver<Item>>>,
    /// The confirm channel on the role's current connection.
    publisher: watch::Sender<Option<Publisher>>,
    stream: String,
    origin: Origin,
    metrics: EventMetrics,
    confirm_timeout: Duration,
    /// Cuts the batch's linger short: a flush waits for nothing (a CLI's
    /// exit, a role's shutdown).
    hurry: tokio::sync::Notify,
}

/// Records events without ever waiting; see the module docs. Cheap to
/// clone. [`Recorder::disabled`] records nothing.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Option<Arc<Inner>>,
}

impl Recorder {
    /// Records nothing (`events.enabled = false`).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// A recorder publishing to `stream` once [`Recorder::attach`]ed.
    pub fn new(
        stream: String,
        origin: Origin,
        metrics: EventMetrics,
        confirm_timeout: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        Self {
            inner: Some(Arc::new(Inner {
                tx,
                start: Mutex::new(Some(rx)),
                publisher: watch::channel(None).0,
                stream,
                origin,
                metrics,
                confirm_timeout,
                hurry: tokio::sync::Notify::new(),
            })),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Publish on a channel of `conn` from now on (call again after each
    /// reconnect). If no channel opens, events are dropped until the next.
    pub async fn attach(&self, conn: &Connection) {
        let Some(inner) = &self.inner else { return };
        let publisher = Publisher::new(conn, inner.confirm_timeout)
            .await
            .map_err(|e| tracing::warn!(error = %e, "cannot open the task events channel; events are dropped until the next connection"))
            .ok();
        inner.publisher.send_replace(publisher);
        let rx = inner.start.lock().ok().and_then(|mut s| s.take());
        if let Some(rx) = rx {
            tokio::spawn(run(inner.clone(), rx));
        }
    }

    /// Record `ev`, or drop and count it: never waits.
    pub fn record(&self, ev: Event) {
        if let Some(inner) = &self.inner {
            inner.offer(Item::Event(ev));
        }
    }

    /// Announce this consumer.
    pub fn announce(&self, w: Worker) {
        if let Some(inner) = &self.inner {
            inner.offer(Item::Worker(w));
        }
    }

    /// Publish whatever is waiting and wait for its confirm, at most
    /// `timeout` (before a role closes its connection on shutdown).
    pub async fn flush(&self, timeout: Duration) {
        let Some(inner) = &self.inner else { return };
        let (tx, rx) = oneshot::channel();
        let sent = tokio::time::timeout(timeout, inner.tx.send(Item::Flush(tx))).await;
        inner.hurry.notify_one();
        if matches!(sent, Ok(Ok(()))) {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
    }
}

impl Inner {
    fn offer(&self, item: Item) {
        match self.tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Item::Event(_)))
            | Err(mpsc::error::TrySendError::Closed(Item::Event(_))) => {
                self.metrics.drop_n(reason::QUEUE_FULL, 1)
            }
            Err(_) => {}
        }
    }
}

/// The publishing task: batch, publish, count.
async fn run(inner: Arc<Inner>, mut rx: mpsc::Receiver<Item>) {
    let mut current = inner.publisher.subscribe();
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut batch = Batch {
        v: 1,
        role: inner.origin.role.clone(),
        instance: inner.origin.instance.clone(),
        host: inner.origin.host.clone(),
        events: Vec::new(),
        worker: None,
    };
    while let Some(first) = rx.recv().await {
        let mut flushes = Vec::new();
        let take = |item: Item, b: &mut Batch, f: &mut Vec<oneshot::Sender<()>>| match item {
            Item::Event(e) => b.events.push(e),
            Item::Worker(w) => b.worker = Some(w),
            Item::Flush(tx) => f.push(tx),
        };
        take(first, &mut batch, &mut flushes);
        // One sleep per batch, not a timer per event: what comes meanwhile
        // waits in the channel and rides along. A flush does not wait, nor
        // does a batch that is lingering when one arrives (a stale wake-up
        // left by a flush taken first only ends one later linger early).
        if flushes.is_empty() && rx.len() < MAX_BATCH {
            tokio::select! {
                () = tokio::time::sleep(LINGER) => {}
                () = inner.hurry.notified() => {}
            }
        }
        while flushes.is_empty() && batch.events.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => take(item, &mut batch, &mut flushes),
                Err(_) => break,
            }
        }
        let n = batch.events.len();
        if n == 0 && batch.worker.is_none() {
            flushes.into_iter().for_each(|f| {
                let _ = f.send(());
            });
            continue;
        }
        let publisher = current.borrow_and_update().clone();
        let sent = send(&inner, publisher.as_ref(), &batch).await;
        batch.events.clear();
        batch.worker = None;
        match sent {
            Err(reason) => inner.metrics.drop_n(reason, n),
            Ok(pending) if !flushes.is_empty() => {
                settle(&inner.metrics, pending, n).await;
            }
            Ok(pending) => {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let metrics = inner.metrics.clone();
                tokio::spawn(async move {
                    settle(&metrics, pending, n).await;
                    drop(slot);
                });
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// Count a batch by its confirm.
async fn settle(metrics: &EventMetrics, pending: Pending, n: usize) {
    match pending.confirmed().await {
        Ok(()) => metrics.published.inc_by(n as u64),
        Err(e) => metrics.drop_n(drop_reason(&e), n),
    }
}

fn drop_reason(e: &Error) -> &'static str {
    match e {
        Error::Unroutable { .. } => reason::MISSING,
        Error::Nacked { .. } => reason::REFUSED,
        Error::ConfirmTimeout(_) => reason::TIMEOUT,
        Error::Amqp(a) if Error::Amqp(a.clone()).is_refused() => reason::REFUSED,
        _ => reason::UNAVAILABLE,
    }
}

/// Start publishing `batch`; `Err` is the reason it was dropped.
async fn send(
    inner: &Inner,
    publisher: Option<&Publisher>,
    batch: &Batch,
) -> Result<Pending, &'static str> {
    let Some(p) = publisher.filter(|p| p.is_open()) else {
        return Err(reason::UNAVAILABLE);
    };
    let body = serde_json::to_vec(batch).map_err(|_| reason::REFUSED)?;
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(crate::envelope::PERSISTENT);
    p.send("", &inner.stream, props, &body)
        .await
        .map_err(|e| drop_reason(&e))
}

/// Parse one stream message; `None` when it is not a batch warren reads.
pub fn parse(body: &[u8]) -> Option<Batch> {
    serde_json::from_slice(body).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_with_short_tags() {
        let ev = Event::new(
            "t1",
            "email.send",
            What::Retried {
                attempt: 1,
                error: "boom".into(),
                delay_ms: 1000,
                next_at: 5,
            },
        )
        .queue("warren.default");
        let text = serde_json::to_string(&ev).unwrap();
        assert!(text.contains(r#""k":"retried""#), "{text}");
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, ev);
        let b = Batch {
            v: 1,
            role: "consumer".into(),
            instance: "h:1".into(),
            host: "h".into(),
            events: vec![ev],
            worker: None,
        };
        assert_eq!(parse(&serde_json::to_vec(&b).unwrap()), Some(b));
        assert_eq!(parse(b"not json"), None);
    }

    #[test]
    fn texts_are_cut_at_char_boundaries() {
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("ééé", 3), "é…");
    }

    /// A recorder never attached to a connection, and its counters.
    fn unattached(role: &str) -> (Recorder, EventMetrics) {
        let m = EventMetrics::register(&Registry::new()).unwrap();
        let origin = Origin {
            role: role.into(),
            instance: "i".into(),
            host: "h".into(),
        };
        let r = Recorder::new("s".into(), origin, m.clone(), Duration::from_secs(5));
        (r, m)
    }

    #[tokio::test]
    async fn a_full_channel_drops_and_counts_without_waiting() {
        // Never attached: nothing drains the channel.
        let (r, m) = unattached("consumer");
        for i in 0..CHANNEL_CAPACITY + 10 {
            r.record(Event::new(
                &i.to_string(),
                "n",
                What::Started { attempt: 1 },
            ));
        }
        assert_eq!(m.dropped.with_label_values(&[reason::QUEUE_FULL]).get(), 10);
        Recorder::disabled().record(Event::new("x", "n", What::Started { attempt: 1 }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_does_not_wait_out_the_linger_of_the_batch_it_ends() {
        let (r, m) = unattached("producer-cli");
        // The publishing task without a connection: its batches are
        // dropped as `unavailable`, which is enough to see when it sends.
        let inner = r.inner.clone().unwrap();
        let rx = inner.start.lock().unwrap().take().unwrap();
        tokio::spawn(run(inner, rx));
        r.record(Event::new("1", "n", What::Started { attempt: 1 }));
        // The task takes the event and starts its linger.
        tokio::task::yield_now().await;
        // Paused time jumps to the next timer when all tasks wait, so a
        // flush that waited for the linger would take all of it here.
        let t0 = tokio::time::Instant::now();
        r.flush(Duration::from_secs(5)).await;
        assert!(t0.elapsed() < LINGER, "flush took {:?}", t0.elapsed());
        assert_eq!(m.dropped.with_label_values(&[reason::UNAVAILABLE]).get(), 1);
    }
}
