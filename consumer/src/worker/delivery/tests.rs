//! Every branch of delivery handling, against a recording [`Broker`]: what is
//! published where with which headers, whether the delivery is acked, given
//! back or left to its session, and that its outcome is counted exactly once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use warren::envelope::{header_i64, header_str, headers};
use warren::{Task, Topology};

use super::{supervise, Incoming};
use crate::config::ConsumerConfig;
use crate::handler::{Registry, TaskError};
use crate::metrics::{ConsumerMetrics, UNKNOWN_TASK};
use crate::outcome::labels;
use crate::worker::broker::{AckResult, Broker};
use crate::worker::Shared;

const NAME: &str = "t.work";
const QUEUE: &str = "warren.default";
const ALL_OUTCOMES: [&str; 6] = [
    labels::SUCCEEDED,
    labels::RETRIED,
    labels::DEAD_LETTERED,
    labels::REJECTED,
    labels::PARKED,
    labels::REQUEUED,
];

/// A message the delivery's handling published.
struct Published {
    exchange: String,
    key: String,
    props: BasicProperties,
    body: Vec<u8>,
}

impl Published {
    fn header(&self, name: &str) -> Option<String> {
        header_str(self.props.headers().as_ref()?, name)
    }

    fn header_int(&self, name: &str) -> Option<i64> {
        header_i64(self.props.headers().as_ref()?, name)
    }

    /// The copy as the next consumer will decode it.
    fn task(&self) -> Task {
        Task::decode(&self.key, &self.props, &self.body, usize::MAX).expect("copy decodes")
    }
}

/// Records what handling does; publish and ack answer as told.
#[derive(Default)]
struct Recorder {
    published: Mutex<Vec<Published>>,
    /// Errors for the next publishes, in order (then they succeed).
    publish_errors: Mutex<VecDeque<warren::Error>>,
    /// How the ack ends (default: acked).
    ack_result: Mutex<Option<AckResult>>,
    panic_on_ack: bool,
    acks: AtomicUsize,
    requeues: AtomicUsize,
    abandoned: AtomicUsize,
}

impl Recorder {
    fn failing_publish(e: warren::Error) -> Self {
        let r = Self::default();
        r.publish_errors.lock().unwrap().push_back(e);
        r
    }

    fn refusing_ack(result: AckResult) -> Self {
        let r = Self::default();
        *r.ack_result.lock().unwrap() = Some(result);
        r
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Vec<Published>> {
        self.published.lock().unwrap()
    }

    fn acks(&self) -> usize {
        self.acks.load(Ordering::SeqCst)
    }

    fn requeues(&self) -> usize {
        self.requeues.load(Ordering::SeqCst)
    }

    fn abandoned(&self) -> usize {
        self.abandoned.load(Ordering::SeqCst)
    }
}

impl Broker for Recorder {
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: &[u8],
    ) -> Result<(), warren::Error> {
        self.published.lock().unwrap().push(Published {
            exchange: exchange.to_owned(),
            key: routing_key.to_owned(),
            props,
            body: body.to_vec(),
        });
        match self.publish_errors.lock().unwrap().pop_front() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn ack(&self) -> AckResult {
        self.acks.fetch_add(1, Ordering::SeqCst);
        assert!(!self.panic_on_ack, "ack exploded");
        self.ack_result
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(AckResult::Acked)
    }

    async fn requeue(&self) {
        self.requeues.fetch_add(1, Ordering::SeqCst);
    }

    fn abandon_session(&self) {
        self.abandoned.fetch_add(1, Ordering::SeqCst);
    }
}

fn nacked() -> warren::Error {
    warren::Error::Nacked {
        exchange: "x".into(),
        routing_key: "k".into(),
    }
}

fn unroutable() -> warren::Error {
    warren::Error::Unroutable {
        exchange: "x".into(),
        routing_key: "k".into(),
        reply: "312 NO_ROUTE".into(),
    }
}

/// What the test handler does.
#[derive(Clone, Copy)]
enum Does {
    Succeed,
    FailRetryable,
    FailPermanently,
    Panic,
    Hang,
}

struct Worker {
    shared: Shared,
    calls: Arc<AtomicUsize>,
}

impl Worker {
    /// A worker with one handler for [`NAME`] that does `does`.
    fn with(does: Does) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut registry = Registry::new();
        let c = calls.clone();
        registry
            .register_fn(NAME, move |_task| {
                c.fetch_add(1, Ordering::SeqCst);
                async move {
                    match does {
                        Does::Succeed => Ok(()),
                        Does::FailRetryable => Err(TaskError::retryable("flaky downstream")),
                        Does::FailPermanently => Err(TaskError::permanent("bad input")),
                        Does::Panic => panic!("kaboom"),
                        Does::Hang => std::future::pending().await,
                    }
                }
            })
            .expect("register");
        Self::from_registry(registry, calls)
    }

    fn without_handlers() -> Self {
        Self::from_registry(Registry::new(), Arc::default())
    }

    fn from_registry(registry: Registry, calls: Arc<AtomicUsize>) -> Self {
        Self::from_config(ConsumerConfig::default(), registry, calls)
    }

    fn from_config(cfg: ConsumerConfig, registry: Registry, calls: Arc<AtomicUsize>) -> Self {
        let prom = prometheus::Registry::new();
        let metrics = ConsumerMetrics::register(&prom).expect("fresh registry");
        Self {
            shared: Shared {
                topo: Topology::new(&cfg.topology),
                registry,
                metrics,
                opener: warren::security::Opener::from_config(&cfg.security)
                    .expect("test keys load"),
                flow: crate::flow::Flow::new(&cfg, &prom).expect("flow metrics"),
                life: super::super::life::Life::new(
                    "test".into(),
                    warren::events::Recorder::disabled(),
                    Vec::new(),
                    0,
                ),
                cfg,
            },
            calls,
        }
    }

    fn topo(&self) -> &Topology {
        &self.shared.topo
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Deliver `task` as it arrives under `routing_key`.
    async fn deliver_as(&self, broker: &Recorder, task: &Task, routing_key: &str) {
        self.deliver_raw(broker, routing_key, &task.properties(), &task.payload)
            .await
    }

    /// Deliver `task` straight from the tasks exchange (no delay prefix).
    async fn deliver(&self, broker: &Recorder, task: &Task) {
        self.deliver_as(broker, task, &task.name).await
    }

    async fn deliver_raw(
        &self,
        broker: &Recorder,
        routing_key: &str,
        properties: &BasicProperties,
        body: &[u8],
    ) {
        let msg = Incoming {
            queue: QUEUE,
            routing_key,
            properties,
            body,
            redelivered: false,
        };
        supervise(&self.shared, broker, msg).await
    }

    /// The delivery was counted once under `task` and ended once as
    /// `outcome`, and nothing is left in flight.
    fn assert_counted_once(&self, task: &str, outcome: &str) {
        let m = &self.shared.metrics;
        let tasks = [task, UNKNOWN_TASK, NAME];
        let received: u64 = tasks
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .iter()
            .map(|t| m.deliveries.with_label_values(&[t]).get())
            .sum();
        assert_eq!(received, 1, "deliveries_total over all tasks");
        assert_eq!(m.deliveries.with_label_values(&[task]).get(), 1);
        let mut ended = Vec::new();
        for t in tasks.iter().collect::<std::collections::BTreeSet<_>>() {
            for o in ALL_OUTCOMES {
                let n = m.tasks.with_label_values(&[t, o]).get();
                if n > 0 {
                    ended.push((t.to_string(), o, n));
                }
            }
        }
        assert_eq!(ended, vec![(task.to_owned(), outcome, 1)], "tasks_total");
        assert_eq!(m.in_flight.get(), 0, "in flight");
    }

    fn panics(&self) -> u64 {
        self.shared.metrics.panics.get()
    }
}

fn task() -> Task {
    Task::new(NAME, &json!({ "n": 1 }))
}

/// The key a copy delayed by `delay` arrives under (with its delay prefix).
fn delayed_key(topo: &Topology, delay: Duration) -> String {
    let (_, key) = topo.route(NAME, delay);
    assert_ne!(key, NAME, "a delayed key carries a prefix");
    key
}

fn assert_delayed_copy_of(p: &Published, w: &Worker) {
    assert_ne!(p.exchange, w.topo().dead_exchange());
    assert_ne!(
        p.exchange,
        w.topo().tasks_exchange(),
        "goes via the delay levels"
    );
    assert_ne!(p.key, NAME, "routing key carries the delay");
    assert_eq!(warren::delay::strip_prefix(&p.key), NAME);
}

#[tokio::test]
async fn poison_is_dead_lettered_as_it_came() {
    let w = Worker::with(Does::Succeed);
    let b = Recorder::default();
    let mut h = FieldTable::default();
    h.insert("x-user".into(), AMQPValue::LongString("kept".into()));
    let props = BasicProperties::default().with_headers(h);
    let key = delayed_key(w.topo(), Duration::from_secs(1));
    w.deliver_raw(&b, &key, &props, b"{not json").await;

    let p = b.published();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].exchange, w.topo().dead_exchange());
    assert_eq!(p[0].key, NAME, "dead copy keyed by the task's own key");
    assert_eq!(p[0].body, b"{not json", "body untouched");
    assert_eq!(p[0].props.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        p[0].header(headers::DEAD_KIND).as_deref(),
        Some("invalid_json")
    );
    assert!(p[0]
        .header(headers::DEAD_REASON)
        .is_some_and(|r| r.contains("not valid JSON")));
    assert_eq!(p[0].header(headers::ORIGINAL_QUEUE).as_deref(), Some(QUEUE));
    assert_eq!(
        p[0].header(headers::ORIGINAL_ROUTING_KEY).as_deref(),
        Some(NAME)
    );
    assert!(p[0].header(headers::DEAD_AT).is_some());
    assert_eq!(p[0].header("x-user").as_deref(), Some("kept"));
    assert_eq!((b.acks(), b.requeues(), b.abandoned()), (1, 0, 0));
    assert_eq!(w.calls(), 0);
    w.assert_counted_once(UNKNOWN_TASK, labels::REJECTED);
}

#[tokio::test]
async fn a_delivery_the_security_checks_refuse_is_dead_lettered_unrun() {
    let w = Worker::with(Does::Succeed);
    let b = Recorder::default();
    // Encrypted with a key this worker does not hold.
    let t = task();
    let enc = warren::security::encrypt::encoding("e9");
    let props = t.properties().with_content_encoding(enc.into());
    w.deliver_raw(&b, NAME, &props, b"ciphertext").await;

    let p = b.published();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].exchange, w.topo().dead_exchange());
    assert_eq!(p[0].body, b"ciphertext", "as it came");
    assert_eq!(
        p[0].header(headers::DEAD_KIND).as_deref(),
        Some("undecryptable")
    );
    assert_eq!(w.calls(), 0, "never run");
    let refused = &w.shared.metrics.refused;
    assert_eq!(refused.with_label_values(&["undecryptable"]).get(), 1);
    assert_eq!((b.acks(), b.requeues(), b.abandoned()), (1, 0, 0));
    w.assert_counted_once(UNKNOWN_TASK, labels::REJECTED);
}

#[tokio::test]
async fn an_oversized_body_is_poison_without_being_opened() {
    let mut w = Worker::with(Does::Succeed);
    w.shared.cfg.worker.max_body_bytes = 8;
    let b = Recorder::default();
    // Undecryptable too: the size is checked first.
    let t = task();
    let enc = warren::security::encrypt::encoding("e9");
    let props = t.properties().with_content_encoding(enc.into());
    w.deliver_raw(&b, NAME, &props, &[b'x'; 64]).await;

    let p = b.published();
    assert_eq!(p.len(), 1);
    assert_eq!(
        p[0].header(headers::DEAD_KIND).as_deref(),
        Some("oversized")
    );
    assert_eq!(w.calls(), 0);
    w.assert_counted_once(UNKNOWN_TASK, labels::REJECTED);
}

#[tokio::test]
async fn task_without_handler_is_dead_lettered_no_handler() {
    let w = Worker::without_handlers();
    let b = Recorder::default();
    let t = task();
    w.deliver(&b, &t).await;

    let p = b.published();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].exchange, w.topo().dead_exchange());
    assert_eq!(
        p[0].header(headers::DEAD_KIND).as_deref(),
        Some("no_handler")
    );
    let reason = format!("no handler for task `{NAME}`");
    assert_eq!(p[0].header(headers::DEAD_REASON), Some(reason.clone()));
    assert_eq!(p[0].header(headers::LAST_ERROR), Some(reason));
    assert_eq!(p[0].header_int(headers::ATTEMPT), Some(1));
    assert_eq!(p[0].task().id, t.id);
    assert_eq!(b.acks(), 1);
    w.assert_counted_once(UNKNOWN_TASK, labels::REJECTED);
}

fn not_due(attempt: u32) -> Task {
    let mut t = task();
    t.attempt = attempt;
    t.not_before = Some(Utc::now() + chrono::Duration::hours(1));
    t
}

#[tokio::test]
async fn task_not_due_is_parked_keeping_its_attempt() {
    let w = Worker::with(Does::Succeed);
    let b = Recorder::default();
    w.deliver(&b, &not_due(2)).await;

    let p = b.published();
    assert_eq!(p.len(), 1);
    assert_delayed_copy_of(&p[0], &w);
    assert_eq!(p[0].task().attempt, 2, "parking is not an attempt");
    assert_eq!(w.calls(), 0, "handler not run early");
    assert_eq!(b.acks(), 1);
    w.assert_counted_once(NAME, labels::PARKED);
}

#[tokio::test]
async fn unroutable_park_is_dead_lettered_with_unchanged_attempt() {
    let w = Worker::with(Does::Succeed);
    let b = Recorder::failing_publish(unroutable());
    w.deliver(&b, &not_due(2)).await;

    let p = b.published();
    assert_eq!(p.len(), 2, "park attempt, then the dead copy");
    assert_eq!(p[1].exchange, w.topo().dead_exchange());
    assert_eq!(
        p[1].header(headers::DEAD_KIND).as_deref(),
        Some("unroutable")
    );
    assert!(p[1]
        .header(headers::DEAD_REASON)
        .is_some_and(|r| r.starts_with("cannot reschedule")));
    assert_eq!(p[1].header_int(headers::ATTEMPT), Some(2));
    assert_eq!((b.acks(), b.requeues(), b.abandoned()), (1, 0, 0));
    w.assert_counted_once(NAME, labels::DEAD_LETTERED);
}

#[tokio::test]
async fn success_is_acked() {
    let w = Worker::with(Does::Succeed);
    let b = Recorder::default();
    w.deliver(&b, &task()).await;

    assert!(b.published().is_empty());
    assert_eq!(w.calls(), 1);
    assert_eq!((b.acks(), b.requeues(), b.abandoned()), (1, 0, 0));
    w.assert_counted_once(NAME, labels::SUCCEEDED);
}

#[tokio::test]
async fn retryable_failure_publishes_the_next_attempt_then_acks() {
    let w = Worker::with(Does::FailRetryable);
    let b = Recorder::default();
    let mut t = task();
    let mut h = FieldTable::default();
    h.insert("x-death".into(), AMQPValue::LongString("broker's".into()));
    h.insert("x-user".into(), AMQPValue::LongString("kept".into()));
    t.extra_headers = h;
    let before = Utc::now();
    w.deliver(&b, &t).await;

    let p = b.published();
    assert_eq!(p.len(), 1);
    assert_delayed_copy_of(&p[0], &w);
    let copy = p[0].task();
    assert_eq!(copy.id, t.id, "same task id across retries");
    assert_eq!(copy.attempt, 2);
    assert_eq!(copy.last_error.as_deref(), Some("flaky downstream"));
    assert!(copy.first_failed_at.is_some_and(|f| f >= trunc_ms(before)));
    assert_eq!(p[0].header("x-death"), None, "death records stripped");
    assert_eq!(p[0].header("x-user").as_deref(), Some("kept"));
    assert_eq!((b.acks(), b.requeues(), b.abandoned()), (1, 0, 0));
    w.assert_counted_once(NAME, labels::RETRIED);
}

/// Headers carry milliseconds.
fn trunc_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).expect("in range")
}

#[tokio::test]
async fn retry_keeps_the_first_failure_instant() {
    let w = Worker::with(Does::FailRetryable);
    let b = Recorder::default();
    let mut t = task();
    t.attempt = 2;
    let first = trunc_ms(Utc::now() - chrono::Duration::minutes(5));
    t.first_failed_at = Some(first);
    w.deliver(&b, &t).await;

    let copy = b.published()[0].task();
    assert_eq!(copy.attempt, 3);
    assert_eq!(copy.first_failed_at, Some(first));
    w.assert_counted_once(NAME, labels::RETRIED);
}

#[tokio::test]
async fn unroutable_retry_is_dead_lettered_with_the_attempt_made() {
    let w = Worker::with(Does::FailRetryable);
    let b = Recorder::failing_publish(unroutable());
    w.deliver(&b, &task()).await;

    let p = b.published();
    assert_eq!(p.len(), 2);
    assert_eq!(
        p[1].header(headers::DEAD_KIND).as_deref(),
        Some("unroutable")
    );
    assert_eq!(p[1].header_int(headers::ATTEMPT), Some(1));
    assert_eq!(b.acks(), 1);
    w.assert_counted_once(NAME, labels::DEAD_LETTERED);
}

#[tokio::test]
async fn failed_retry_publish_leaves_the_delivery_to_its_session() {
    let w = Worker::with(Does::FailRetryable);
    let b = Recorder::failing_publish(nacked());
    w.deliver(&b, &task()).await;

    assert_eq!(b.published().len(), 1);
    assert_eq!(b.acks(), 0, "never acked without a confirmed copy");
    assert_eq!(b.abandoned(), 1, "session ended: the broker requeues it");
    assert_eq!(b.requeues(), 0);
    w.assert_counted_once(NAME, labels::REQUEUED);
}

#[tokio::test]
async fn permanent_failure_is_dead_lettered_with_why_and_where_from() {
    let w = Worker::with(Does::FailPermanently);
    let b = Recorder::default();
    let t = task();
    // As a retried task arrives: through the delay levels, with a prefix.
    let key = delayed_key(w.topo(), Duration::from_secs(3));
    w.deliver_as(&b, &t, &key).await;

    let p = b.published();
    assert_eq!(p.len(), 1);
    let d = &p[0];
    assert_eq!(d.exchange, w.topo().dead_exchange());
    assert_eq!(d.key, NAME);
    assert_eq!(d.header(headers::DEAD_KIND).as_deref(), Some("permanent"));
    assert_eq!(
        d.header(headers::DEAD_REASON).as_deref(),
        Some("permanent error: bad input")
    );
    assert_eq!(d.header(headers::ORIGINAL_QUEUE).as_deref(), Some(QUEUE));
    assert_eq!(
        d.header(headers::ORIGINAL_ROUTING_KEY).as_deref(),
        Some(NAME)
    );
    assert_eq!(d.header_int(headers::ATTEMPT), Some(1));
    assert_eq!(d.header(headers::LAST_ERROR).as_deref(), Some("bad input"));
    assert!(d.header(headers::FIRST_FAILED_AT).is_some());
    assert_eq!(d.task().id, t.id);
    assert_eq!(d.body, t.payload);
    assert_eq!((b.acks(), b.requeues(), b.abandoned()), (1, 0, 0));
    w.assert_counted_once(NAME, labels::DEAD_LETTERED);
}

#[tokio::test]
async fn exhausted_retries_are_dead_lettered() {
    let w = Worker::with(Does::FailRetryable);
    let b = Recorder::default();
    let mut t = task();
    t.attempt = 3;
    t.max_attempts = Some(3);
    w.deliver(&b, &t).await;

    let p = b.published();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].exchange, w.topo().dead_exchange());
    assert_eq!(
        p[0].header(headers::DEAD_KIND).as_deref(),
        Some("exhausted")
    );
    assert_eq!(
        p[0].header(headers::DEAD_REASON).as_deref(),
        Some("attempts exhausted (3 of 3): flaky downstream")
    );
    assert_eq!(p[0].header_int(headers::ATTEMPT), Some(3));
    assert_eq!(b.acks(), 1);
    w.assert_counted_once(NAME, labels::DEAD_LETTERED);
}

#[tokio::test]
async fn failed_dead_letter_publish_leaves_the_delivery_to_its_session() {
    let w = Worker::with(Does::FailPermanently);
    let b = Recorder::failing_publish(nacked());
    w.deliver(&b, &task()).await;

    assert_eq!(b.published().len(), 1);
    assert_eq!((b.acks(), b.requeues(), b.abandoned()), (0, 0, 1));
    w.assert_counted_once(NAME, labels::REQUEUED);
}

#[tokio::test]
async fn refused_ack_gives_the_delivery_back() {
    for refusal in [
        AckResult::ChannelClosed,
        AckResult::Failed("406 PRECONDITION_FAILED".into()),
    ] {
        let w = Worker::with(Does::Succeed);
        let b = Recorder::refusing_ack(refusal.clone());
        w.deliver(&b, &task()).await;

        assert_eq!(
            (b.acks(), b.requeues(), b.abandoned()),
            (1, 1, 0),
            "{refusal:?}"
        );
        w.assert_counted_once(NAME, labels::REQUEUED);
    }
}

#[tokio::test]
async fn handler_panic_is_a_retryable_failure() {
    let w = Worker::with(Does::Panic);
    let b = Recorder::default();
    w.deliver(&b, &task()).await;

    let copy = b.published()[0].task();
    assert_eq!(copy.attempt, 2);
    assert_eq!(copy.last_error.as_deref(), Some("handler panicked: kaboom"));
    assert_eq!(b.acks(), 1);
    assert_eq!(w.panics(), 0, "a handler panic is the task's outcome");
    w.assert_counted_once(NAME, labels::RETRIED);
}

#[tokio::test]
async fn handler_timeout_is_a_retryable_failure() {
    let w = Worker::with(Does::Hang);
    let b = Recorder::default();
    let mut t = task();
    t.timeout = Some(Duration::from_millis(5));
    w.deliver(&b, &t).await;

    let copy = b.published()[0].task();
    assert_eq!(copy.attempt, 2);
    assert_eq!(copy.last_error.as_deref(), Some("timed out after 5ms"));
    assert_eq!(b.acks(), 1);
    w.assert_counted_once(NAME, labels::RETRIED);
}

#[tokio::test]
async fn panic_outside_the_handler_gives_the_delivery_back_once() {
    let w = Worker::with(Does::Succeed);
    let b = Recorder {
        panic_on_ack: true,
        ..Recorder::default()
    };
    w.deliver(&b, &task()).await;

    assert_eq!((b.acks(), b.requeues(), b.abandoned()), (1, 1, 0));
    assert_eq!(w.panics(), 1);
    w.assert_counted_once(NAME, labels::REQUEUED);
}

/// A worker whose handler for [`NAME`] fails retryably, behind an `http`
/// handler entry of the same name whose breaker opens after one failure.
fn behind_a_breaker() -> Worker {
    let mut cfg = ConsumerConfig::default();
    cfg.handlers.insert(
        NAME.into(),
        crate::config::HandlerSpec::Http {
            url: "http://127.0.0.1:9/".into(),
            timeout: Duration::from_secs(1),
            headers: Default::default(),
            breaker: Some(crate::config::BreakerSpec {
                failures: 1,
                cooldown: Duration::from_secs(3600),
                ..Default::default()
            }),
        },
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut registry = Registry::new();
    registry
        .register_fn(NAME, move |_task| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err(TaskError::retryable("503 from the target")) }
        })
        .expect("register");
    Worker::from_config(cfg, registry, calls)
}

#[tokio::test]
async fn an_open_breaker_parks_the_task_keeping_its_attempt_and_says_why() {
    let w = behind_a_breaker();
    let first = Recorder::default();
    w.deliver(&first, &task()).await;
    assert_eq!(
        first.published()[0].task().attempt,
        2,
        "a real failure: retried"
    );

    let b = Recorder::default();
    let mut t = task();
    t.attempt = 2;
    w.deliver(&b, &t).await;
    let p = b.published();
    assert_eq!(p.len(), 1);
    assert_delayed_copy_of(&p[0], &w);
    let copy = p[0].task();
    assert_eq!(copy.attempt, 2, "parking is not an attempt");
    assert!(
        copy.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("circuit open: handler `t.work`")),
        "{:?}",
        copy.last_error
    );
    assert_eq!(w.calls(), 1, "the open breaker sent nothing");
    assert!(copy.first_failed_at.is_some(), "the max_park clock runs");
    assert_eq!(b.acks(), 1);
    let m = &w.shared.metrics;
    assert_eq!(m.tasks.with_label_values(&[NAME, labels::PARKED]).get(), 1);
}

#[tokio::test]
async fn past_max_park_an_open_breaker_fails_the_attempt() {
    let w = behind_a_breaker();
    w.deliver(&Recorder::default(), &task()).await;
    let b = Recorder::default();
    let mut t = task();
    t.attempt = 2;
    t.first_failed_at = Some(Utc::now() - chrono::Duration::hours(2));
    w.deliver(&b, &t).await;
    let p = b.published();
    assert_eq!(p.len(), 1);
    assert_delayed_copy_of(&p[0], &w);
    let copy = p[0].task();
    assert_eq!(copy.attempt, 3, "kept back over an hour: an attempt");
    assert!(copy
        .last_error
        .as_deref()
        .is_some_and(|e| e.starts_with("circuit open")));
    assert_eq!(w.calls(), 1, "still nothing sent");
    let m = &w.shared.metrics;
    assert_eq!(m.tasks.with_label_values(&[NAME, labels::RETRIED]).get(), 2);
}

#[tokio::test]
async fn a_task_over_its_limit_is_parked_keeping_its_attempt() {
    // concurrency 1 in the worker leaves no waiting share: parked at once.
    let mut cfg = ConsumerConfig::default();
    cfg.worker.concurrency = 1;
    cfg.limits.insert(
        "t.*".into(),
        crate::config::LimitSpec {
            concurrency: Some(1),
            ..Default::default()
        },
    );
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut registry = Registry::new();
    registry
        .register_fn(NAME, move |_task| {
            c.fetch_add(1, Ordering::SeqCst);
            let g = g.clone();
            async move {
                let _ = g.acquire().await;
                Ok(())
            }
        })
        .expect("register");
    let w = Worker::from_config(cfg, registry, calls);
    let running = Recorder::default();
    let one = task();
    let first = w.deliver(&running, &one);
    tokio::pin!(first);
    assert!(
        futures_util::poll!(&mut first).is_pending(),
        "first one runs"
    );
    assert_eq!(w.calls(), 1);

    let b = Recorder::default();
    let mut t = task();
    t.attempt = 3;
    w.deliver(&b, &t).await;
    {
        let p = b.published();
        assert_eq!(p.len(), 1);
        assert_delayed_copy_of(&p[0], &w);
        assert_eq!(p[0].task().attempt, 3, "parking is not an attempt");
        assert_eq!(b.acks(), 1);
    }
    assert_eq!(w.calls(), 1, "the second did not run");
    gate.add_permits(1);
    first.await;
    assert_eq!(running.acks(), 1);
    let m = &w.shared.metrics;
    assert_eq!(m.tasks.with_label_values(&[NAME, labels::PARKED]).get(), 1);
    assert_eq!(
        m.tasks.with_label_values(&[NAME, labels::SUCCEEDED]).get(),
        1
    );
}

fn step_task() -> Task {
    let mut t = task();
    t.id = "run-1:a".into();
    t.step = Some(warren::envelope::StepRef {
        workflow: "w".into(),
        run: "run-1".into(),
        step: "a".into(),
    });
    t
}

fn event_of(p: &Published) -> warren::workflow::StepEvent {
    serde_json::from_slice(&p.body).expect("a step event")
}

/// A worker whose handler for [`NAME`] sets `result` and succeeds.
fn with_result(result: serde_json::Value) -> Worker {
    let mut registry = Registry::new();
    registry
        .register_fn(NAME, move |_task| {
            let result = result.clone();
            async move {
                crate::result::set_result(result);
                Ok(())
            }
        })
        .expect("register");
    Worker::from_registry(registry, Arc::default())
}

#[tokio::test]
async fn a_succeeded_step_sends_its_event_with_the_result_then_acks() {
    let w = with_result(json!({"rows": 3}));
    let b = Recorder::default();
    w.deliver(&b, &step_task()).await;
    let ev = {
        let p = b.published();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].exchange, w.topo().workflows_exchange());
        assert_eq!(p[0].key, warren::workflow::EVENT);
        assert_eq!(p[0].props.delivery_mode(), &Some(2), "persistent");
        event_of(&p[0])
    };
    assert_eq!(
        (ev.run.as_str(), ev.step.as_str(), ev.task_id.as_str()),
        ("run-1", "a", "run-1:a")
    );
    assert_eq!(ev.outcome, warren::workflow::StepOutcome::Succeeded);
    assert_eq!(ev.result, Some(json!({"rows": 3})));
    assert_eq!(b.acks(), 1);
    w.assert_counted_once(NAME, labels::SUCCEEDED);
    // A plain task sends no event.
    let b = Recorder::default();
    w.deliver(&b, &task()).await;
    assert!(b.published().is_empty());
}

#[tokio::test]
async fn a_result_over_the_cap_is_dropped_and_flagged() {
    let mut w = with_result(json!("x".repeat(100)));
    w.shared.cfg.workflow.max_result_bytes = 50;
    let b = Recorder::default();
    w.deliver(&b, &step_task()).await;
    let ev = event_of(&b.published()[0]);
    assert_eq!((ev.result, ev.result_dropped), (None, true));
    assert_eq!(b.acks(), 1);
}

#[tokio::test]
async fn a_dead_step_sends_a_dead_event_after_its_dead_letter() {
    let w = Worker::with(Does::FailPermanently);
    let b = Recorder::default();
    w.deliver(&b, &step_task()).await;
    let p = b.published();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].exchange, w.topo().dead_exchange());
    assert_eq!(p[1].exchange, w.topo().workflows_exchange());
    let ev = event_of(&p[1]);
    assert_eq!(ev.outcome, warren::workflow::StepOutcome::Dead);
    assert_eq!(ev.dead_kind.as_deref(), Some("permanent"));
    assert!(ev.error.is_some_and(|e| e.contains("bad input")));
    assert_eq!(ev.task_id, "run-1:a");
    assert_eq!(b.acks(), 1);
}

#[tokio::test]
async fn a_step_whose_event_cannot_be_sent_is_not_acked() {
    // E.g. the consumer's broker user may not write to the workflows exchange.
    let w = Worker::with(Does::Succeed);
    let b = Recorder::failing_publish(nacked());
    w.deliver(&b, &step_task()).await;
    assert_eq!(b.published().len(), 1, "the event was tried");
    assert_eq!(b.acks(), 0, "not acked: the broker redelivers it");
    assert_eq!(b.abandoned(), 1);
}

#[tokio::test]
async fn a_poison_step_message_still_reports_its_step_dead() {
    let w = Worker::with(Does::Succeed);
    let b = Recorder::default();
    let props = step_task().properties();
    w.deliver_raw(&b, NAME, &props, b"{not json").await;
    let p = b.published();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].exchange, w.topo().dead_exchange());
    let ev = event_of(&p[1]);
    assert_eq!(ev.outcome, warren::workflow::StepOutcome::Dead);
    assert_eq!(ev.dead_kind.as_deref(), Some("invalid_json"));
    assert_eq!((ev.run.as_str(), ev.task_id.as_str()), ("run-1", "run-1:a"));
    assert_eq!(b.acks(), 1);
}

/// Every delivery's task is one allocation of this future and one copy of
/// it into the heap: the paths that publish or give the delivery back are
/// boxed where they are awaited, and the task is held boxed, so a plain
/// success does not carry their state (it was 4.3 KiB here, 8 KiB in the
/// release build, before).
#[test]
fn a_deliverys_future_stays_small() {
    let w = Worker::without_handlers();
    let broker = Recorder::default();
    let props = BasicProperties::default();
    let msg = Incoming {
        queue: QUEUE,
        routing_key: NAME,
        properties: &props,
        body: b"{}",
        redelivered: false,
    };
    let size = std::mem::size_of_val(&supervise(&w.shared, &broker, msg));
    assert!(size <= 3 * 1024, "a delivery's future is {size} bytes");
}
