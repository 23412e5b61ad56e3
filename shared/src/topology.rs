//! Every AMQP object warren uses, as data, and the one idempotent `declare`
//! both roles call at start and after each reconnect; the producer's own
//! objects (its lock, logs, snapshots and control queue) are in [`producer`],
//! declared or checked by the same code ([`declare_objects`]).
//!
//! ```text
//! publish ──► <p>.tasks (topic) ──#──► <p>.route (topic, alternate-exchange <p>.unclaimed)
//!                                        ├─ specific patterns ─► <p>.<queue>
//!                                        └─ nothing matched ─► <p>.unclaimed ─#─► catch-all queue
//! delayed ──► <p>.delay.K (topic) ─bit K=1─► queue <p>.delay.K (TTL 2^K ticks) ─DLX─┐
//!                 └─bit K=0─► <p>.delay.K-1 ◄───────────────────────────────────────┘
//!             <p>.delay.0 … ──► <p>.delivery (topic) ──#──► <p>.delivery.route
//!                 (alternate-exchange <p>.delivery.unclaimed, whose own is <p>.dead)
//!                  └─ *.(25).pattern ─► <p>.<queue>, the same split as above
//! <p>.dead (fanout) ──► queue <p>.dead
//! ```
//!
//! **Why two stages.** A queue bound `#` next to one bound `email.*` on one
//! topic exchange gets a copy of every email task too: it runs twice or is
//! dead-lettered as `no_handler`. So a catch-all binding (exactly `#`) is not
//! made on the routing exchange but on its alternate exchange, which the
//! broker uses only when no other binding matched: a catch-all queue gets
//! what no other queue claims. `<p>.tasks` and `<p>.delivery` keep their
//! original arguments and forward everything (`#`) to the routing stage, so
//! existing deployments upgrade by declaring (no exchange to delete), and the
//! bindings an older warren made on them directly are removed by `declare`.
//! A message nothing claims and no catch-all queue takes is still unroutable
//! (a `mandatory` publish is returned); a delayed one goes to `<p>.dead`.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ExchangeKind};

use crate::config::{QueueType, TopologyConfig};
use crate::delay;
use crate::error::Error;

pub mod producer;

/// A work queue as declared.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkQueue {
    pub name: String,
    pub bindings: Vec<String>,
    /// `None`: see [`crate::config::QueueConfig::max_priority`].
    pub max_priority: Option<u8>,
}

/// Names and definitions of all objects for one prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    prefix: String,
    queue_type: QueueType,
    queues: Vec<WorkQueue>,
    delivery_limit: u32,
    declares: bool,
    /// The task events stream, when this role records events.
    events: Option<EventStream>,
}

pub use crate::config::EventStream;

/// One object to declare, as data.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Exchange {
        name: String,
        kind: ExchangeKind,
        args: FieldTable,
    },
    Queue {
        name: String,
        args: FieldTable,
    },
    QueueBind {
        queue: String,
        exchange: String,
        key: String,
    },
    ExchangeBind {
        destination: String,
        source: String,
        key: String,
    },
    /// A binding an older layout made: removed (a no-op when absent).
    QueueUnbind {
        queue: String,
        exchange: String,
        key: String,
    },
}

/// The binding that makes a queue the catch-all: it gets what no other
/// queue's binding claims.
pub const CATCH_ALL: &str = "#";

impl Topology {
    pub fn new(cfg: &TopologyConfig) -> Self {
        Self {
            prefix: cfg.prefix.clone(),
            queue_type: cfg.queue_type,
            queues: cfg
                .queues
                .iter()
                .map(|q| WorkQueue {
                    name: format!("{}.{}", cfg.prefix, q.name),
                    bindings: q.bindings.clone(),
                    max_priority: q.max_priority,
                })
                .collect(),
            delivery_limit: cfg.delivery_limit,
            declares: cfg.declare,
            events: None,
        }
    }

    /// Declare (or check) the task events stream too. Unlike every other
    /// object it is optional: a conflict or a missing stream is logged and
    /// the role runs on, dropping its events (they never hold a task up).
    pub fn with_events(mut self, events: Option<EventStream>) -> Self {
        self.events = events;
        self
    }

    /// `<prefix>.events`, the task events stream.
    pub fn events_stream(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Whether [`declare`] declares (`topology.declare`) or only checks.
    pub fn declares(&self) -> bool {
        self.declares
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.prefix)
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn delivery_exchange(&self) -> String {
        format!("{}.delivery", self.prefix)
    }
    /// Where work queues bind their specific patterns (behind `tasks`).
    pub fn route_exchange(&self) -> String {
        format!("{}.route", self.prefix)
    }
    /// Workflow starts, step events and resumes (a direct exchange; see
    /// [`crate::workflow`]).
    pub fn workflows_exchange(&self) -> String {
        format!("{}.workflows", self.prefix)
    }
    /// The coordinator's queue, bound to [`Self::workflows_exchange`].
    pub fn workflows_queue(&self) -> String {
        format!("{}.workflows", self.prefix)
    }
    /// Alternate exchange of [`Self::route_exchange`]: the catch-all queue's.
    pub fn unclaimed_exchange(&self) -> String {
        format!("{}.unclaimed", self.prefix)
    }
    /// The routing stage behind `delivery`, for delayed tasks.
    pub fn delivery_route_exchange(&self) -> String {
        format!("{}.delivery.route", self.prefix)
    }
    /// Alternate exchange of [`Self::delivery_route_exchange`].
    pub fn delivery_unclaimed_exchange(&self) -> String {
        format!("{}.delivery.unclaimed", self.prefix)
    }
    pub fn level_exchange(&self, level: u32) -> String {
        format!("{}.delay.{level}", self.prefix)
    }
    pub fn level_queue(&self, level: u32) -> String {
        format!("{}.delay.{level}", self.prefix)
    }
    pub fn work_queues(&self) -> &[WorkQueue] {
        &self.queues
    }

    /// Whether [`declare`] uses the work queue `name` as it exists instead of
    /// declaring its arguments: a classic queue whose `max_priority` is unset,
    /// which an older warren declared with `x-max-priority = 10` (the broker
    /// refuses to redeclare a queue with other arguments).
    pub fn adopts_existing(&self, name: &str) -> bool {
        self.queue_type == QueueType::Classic
            && self
                .queues
                .iter()
                .any(|q| q.name == name && q.max_priority.is_none())
    }
    /// Full name of a configured work queue given its short or full name.
    pub fn work_queue(&self, name: &str) -> Option<&WorkQueue> {
        let full = format!("{}.{name}", self.prefix);
        self.queues
            .iter()
            .find(|q| q.name == name || q.name == full)
    }

    /// Objects whose failure to declare only costs task events.
    fn is_optional(&self, obj: &Object) -> bool {
        matches!(obj, Object::Queue { name, .. } if self.events.is_some() && *name == self.events_stream())
    }

    /// Exchange and routing key that deliver `task` after `delay`.
    pub fn route(&self, task: &str, delay: Duration) -> (String, String) {
        let task = delay::strip_prefix(task);
        match delay::entry_level(delay) {
            None => (self.tasks_exchange(), task.to_owned()),
            Some(level) => (self.level_exchange(level), delay::routing_key(delay, task)),
        }
    }

    fn queue_args(&self) -> FieldTable {
        let mut a = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            put(
                &mut a,
                "x-queue-type",
                AMQPValue::LongString("quorum".into()),
            );
            // Quorum dead-lettering is at-most-once unless both are set.
            put(
                &mut a,
                "x-dead-letter-strategy",
                AMQPValue::LongString("at-least-once".into()),
            );
            put(
                &mut a,
                "x-overflow",
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        a
    }

    /// Everything to declare, in dependency order.
    pub fn objects(&self) -> Vec<Object> {
        let mut out = Vec::new();
        self.dead_objects(&mut out);
        self.routing_exchanges(&mut out);
        let old_bindings = self.work_queue_objects(&mut out);
        // Forward only once the queues are bound behind the routing stage.
        out.push(Object::ExchangeBind {
            destination: self.route_exchange(),
            source: self.tasks_exchange(),
            key: "#".into(),
        });
        out.push(Object::ExchangeBind {
            destination: self.delivery_route_exchange(),
            source: self.delivery_exchange(),
            key: "#".into(),
        });
        // The direct bindings of the one-stage layout would deliver a second
        // copy; removed once the new path is in place (no gap in routing).
        out.extend(old_bindings);
        self.delay_levels(&mut out);
        self.workflow_objects(&mut out);
        self.events_objects(&mut out);
        // Exchange-to-exchange bindings need both ends declared first.
        for level in 0..delay::LEVELS {
            out.push(Object::ExchangeBind {
                destination: self.level_next(level),
                source: self.level_exchange(level),
                key: delay::level_pattern(level, false),
            });
        }
        out
    }

    /// The dead exchange and the dead queue behind it.
    fn dead_objects(&self, out: &mut Vec<Object>) {
        out.push(exchange(
            self.dead_exchange(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        ));
        out.push(Object::Queue {
            name: self.dead_queue(),
            args: self.queue_args(),
        });
        out.push(Object::QueueBind {
            queue: self.dead_queue(),
            exchange: self.dead_exchange(),
            key: String::new(),
        });
    }

    /// The exchanges a task passes before its work queue, undelayed and
    /// delayed.
    fn routing_exchanges(&self, out: &mut Vec<Object>) {
        // Undelayed: tasks ─#─► route (AE unclaimed). Nothing behind
        // `unclaimed`: unclaimed and no catch-all queue stays unroutable.
        out.push(exchange(
            self.unclaimed_exchange(),
            ExchangeKind::Topic,
            FieldTable::default(),
        ));
        out.push(exchange(
            self.route_exchange(),
            ExchangeKind::Topic,
            with_alternate(self.unclaimed_exchange()),
        ));
        out.push(exchange(
            self.tasks_exchange(),
            ExchangeKind::Topic,
            FieldTable::default(),
        ));
        // Delayed: delivery ─#─► delivery.route (AE delivery.unclaimed, AE
        // dead). A delayed task whose name no queue binds any more would
        // otherwise be dropped (classic) or stall its level forever (quorum,
        // at-least-once): it goes to the dead queue instead. `delivery` keeps
        // the dead exchange as its own alternate, as declared before.
        out.push(exchange(
            self.delivery_unclaimed_exchange(),
            ExchangeKind::Topic,
            with_alternate(self.dead_exchange()),
        ));
        out.push(exchange(
            self.delivery_route_exchange(),
            ExchangeKind::Topic,
            with_alternate(self.delivery_unclaimed_exchange()),
        ));
        out.push(exchange(
            self.delivery_exchange(),
            ExchangeKind::Topic,
            with_alternate(self.dead_exchange()),
        ));
    }

    /// The work queues and their bindings behind the routing exchanges;
    /// the one-stage layout's bindings to remove, once these are in place.
    fn work_queue_objects(&self, out: &mut Vec<Object>) -> Vec<Object> {
        let mut old_bindings = Vec::new();
        for q in &self.queues {
            out.push(Object::Queue {
                name: q.name.clone(),
                args: self.work_queue_args(q),
            });
            for b in &q.bindings {
                let (now, delayed) = if b == CATCH_ALL {
                    (
                        self.unclaimed_exchange(),
                        self.delivery_unclaimed_exchange(),
                    )
                } else {
                    (self.route_exchange(), self.delivery_route_exchange())
                };
                out.push(Object::QueueBind {
                    queue: q.name.clone(),
                    exchange: now,
                    key: b.clone(),
                });
                out.push(Object::QueueBind {
                    queue: q.name.clone(),
                    exchange: delayed,
                    key: delay::delivery_pattern(b),
                });
                old_bindings.push(Object::QueueUnbind {
                    queue: q.name.clone(),
                    exchange: self.tasks_exchange(),
                    key: b.clone(),
                });
                old_bindings.push(Object::QueueUnbind {
                    queue: q.name.clone(),
                    exchange: self.delivery_exchange(),
                    key: delay::delivery_pattern(b),
                });
            }
        }
        old_bindings
    }

    fn work_queue_args(&self, q: &WorkQueue) -> FieldTable {
        let mut args = self.queue_args();
        put(
            &mut args,
            "x-dead-letter-exchange",
            AMQPValue::LongString(self.dead_exchange().into()),
        );
        if self.queue_type == QueueType::Quorum && self.delivery_limit > 0 {
            put(
                &mut args,
                "x-delivery-limit",
                AMQPValue::LongLongInt(self.delivery_limit.into()),
            );
        }
        match q.max_priority {
            Some(p) if p > 0 && self.queue_type == QueueType::Classic => {
                put(&mut args, "x-max-priority", AMQPValue::ShortShortUInt(p))
            }
            _ => {}
        }
        args
    }

    /// Where a delay level's queue expires its messages to: the level
    /// below, or from level 0 the delivery exchange.
    fn level_next(&self, level: u32) -> String {
        if level == 0 {
            self.delivery_exchange()
        } else {
            self.level_exchange(level - 1)
        }
    }

    /// Each delay level's exchange and queue (its bindings to the next
    /// level come last, see [`Topology::objects`]).
    fn delay_levels(&self, out: &mut Vec<Object>) {
        for level in 0..delay::LEVELS {
            out.push(exchange(
                self.level_exchange(level),
                ExchangeKind::Topic,
                FieldTable::default(),
            ));
            let mut args = self.queue_args();
            put(
                &mut args,
                "x-message-ttl",
                AMQPValue::LongLongInt(delay::level_ttl_ms(level) as i64),
            );
            put(
                &mut args,
                "x-dead-letter-exchange",
                AMQPValue::LongString(self.level_next(level).into()),
            );
            out.push(Object::Queue {
                name: self.level_queue(level),
                args,
            });
            out.push(Object::QueueBind {
                queue: self.level_queue(level),
                exchange: self.level_exchange(level),
                key: delay::level_pattern(level, true),
            });
        }
    }

    /// Workflows: one direct exchange and the coordinator's queue.
    fn workflow_objects(&self, out: &mut Vec<Object>) {
        out.push(exchange(
            self.workflows_exchange(),
            ExchangeKind::Direct,
            FieldTable::default(),
        ));
        out.push(Object::Queue {
            name: self.workflows_queue(),
            args: self.queue_args(),
        });
        for key in crate::workflow::KEYS {
            out.push(Object::QueueBind {
                queue: self.workflows_queue(),
                exchange: self.workflows_exchange(),
                key: (*key).to_owned(),
            });
        }
    }

    /// The task events stream, when events are on (docs/tasks.md).
    fn events_objects(&self, out: &mut Vec<Object>) {
        if let Some(ev) = &self.events {
            let mut args = FieldTable::default();
            put(
                &mut args,
                "x-queue-type",
                AMQPValue::LongString("stream".into()),
            );
            put(
                &mut args,
                "x-max-age",
                AMQPValue::LongString(format!("{}s", ev.max_age.as_secs().max(1)).into()),
            );
            put(
                &mut args,
                "x-max-length-bytes",
                AMQPValue::LongLongInt(i64::try_from(ev.max_bytes).unwrap_or(i64::MAX)),
            );
            // Retention drops whole segments: small ones keep it close to
            // the limits on a small stream.
            put(
                &mut args,
                "x-stream-max-segment-size-bytes",
                AMQPValue::LongInt(
                    i32::try_from((ev.max_bytes / 16).clamp(1 << 20, 64 << 20)).unwrap_or(1 << 20),
                ),
            );
            out.push(Object::Queue {
                name: self.events_stream(),
                args,
            });
        }
    }
}

fn exchange(name: String, kind: ExchangeKind, args: FieldTable) -> Object {
    Object::Exchange { name, kind, args }
}

/// Arguments naming `ae` the alternate exchange.
fn with_alternate(ae: String) -> FieldTable {
    let mut args = FieldTable::default();
    put(
        &mut args,
        "alternate-exchange",
        AMQPValue::LongString(ae.into()),
    );
    args
}

fn put(t: &mut FieldTable, k: &str, v: AMQPValue) {
    t.insert(ShortString::from(k), v);
}

/// Declare every object, idempotently. A conflicting pre-existing object
/// yields [`Error::TopologyConflict`] naming it and the argument that differs.
/// With `topology.declare = false`, only [`check`]s.
pub async fn declare(conn: &Connection, topo: &Topology) -> Result<(), Error> {
    declare_objects(conn, topo, &topo.objects()).await
}

/// [`declare`] for `objects` of `topo` (the producer's own, for example):
/// each declared, or with `topology.declare = false` only checked.
pub async fn declare_objects(
    conn: &Connection,
    topo: &Topology,
    objects: &[Object],
) -> Result<(), Error> {
    if !topo.declares() {
        return check_objects(conn, topo, objects).await;
    }
    // Own channel: a failed declare closes it, and the caller's channels
    // must survive that.
    let mut ch = conn.create_channel().await?;
    let mut new_streams = Vec::new();
    for obj in objects {
        if let Object::Queue { name, args } = obj {
            if is_stream(args) {
                match passive_queue(&ch, name).await {
                    Ok(()) => {}
                    Err(e) if not_found(&e) => {
                        ch = conn.create_channel().await?;
                        new_streams.push(name.as_str());
                    }
                    Err(e) => return Err(Error::Amqp(e)),
                }
            }
            if topo.adopts_existing(name) {
                match passive_queue(&ch, name).await {
                    Ok(()) => {
                        tracing::debug!(queue = %name, "work queue exists; used as declared (max_priority unset)");
                        continue;
                    }
                    // A refused passive declare closed the channel.
                    Err(e) if not_found(&e) => ch = conn.create_channel().await?,
                    Err(e) => return Err(Error::Amqp(e)),
                }
            }
        }
        if let Err(e) = declare_one(&ch, obj).await {
            if topo.is_optional(obj) {
                tracing::warn!(error = %conflict(obj, e), "task events will be dropped");
                ch = conn.create_channel().await?;
                continue;
            }
            return Err(conflict(obj, e));
        }
    }
    let _ = ch.close(200, "topology declared".into()).await;
    // Only a stream this created can still lack its writer.
    for name in new_streams {
        stream_ready(conn, name).await;
    }
    Ok(())
}

/// Longest wait for a new stream to get its writer.
const NEW_STREAM_WAIT: Duration = Duration::from_secs(10);

/// Wait until the stream `name` has a running writer, up to
/// [`NEW_STREAM_WAIT`]. RabbitMQ 3.10 crashes a channel that publishes to a
/// stream before its writer was announced (`osiris_writer:write` with no
/// writer, `function_clause`) and closes that whole connection with
/// INTERNAL_ERROR: a first leader lost its lock that way in the test suite,
/// 0.5 s after creating the stream on a busy machine. A consumer on a stream
/// without a running member on this node is refused with a channel error
/// instead (PRECONDITION_FAILED), so subscribing on a throwaway channel tells
/// when the writer runs; a short pause then covers the queue record's
/// update, which follows it. Paid once per stream, by whoever creates it.
async fn stream_ready(conn: &Connection, name: &str) {
    use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
    let deadline = tokio::time::Instant::now() + NEW_STREAM_WAIT;
    loop {
        let Ok(ch) = conn.create_channel().await else {
            return;
        };
        let mut args = FieldTable::default();
        put(
            &mut args,
            "x-stream-offset",
            AMQPValue::LongString("next".into()),
        );
        let subscribed = async {
            ch.basic_qos(1, BasicQosOptions::default()).await?;
            ch.basic_consume(
                name.into(),
                "warren-stream-probe".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
        };
        match subscribed.await {
            Ok(c) => {
                let _ = ch
                    .basic_cancel(c.tag(), BasicCancelOptions::default())
                    .await;
                let _ = ch.close(200, "stream ready".into()).await;
                // The consume check reads the coordinator's members; the
                // record a publishing channel reads is updated right after.
                tokio::time::sleep(Duration::from_millis(250)).await;
                return;
            }
            Err(e) => {
                tracing::debug!(stream = %name, error = %e, "new stream not ready yet");
                if !conn.status().connected() || tokio::time::Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether queue arguments make a stream.
pub fn is_stream(args: &FieldTable) -> bool {
    matches!(
        args.inner().get("x-queue-type"),
        Some(AMQPValue::LongString(t)) if t.as_bytes() == b"stream"
    )
}

/// Declare one object (durable), or bind or unbind.
async fn declare_one(ch: &lapin::Channel, obj: &Object) -> Result<(), lapin::Error> {
    match obj {
        Object::Exchange { name, kind, args } => {
            let durable = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            ch.exchange_declare(name.as_str().into(), kind.clone(), durable, args.clone())
                .await
        }
        Object::Queue { name, args } => {
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            ch.queue_declare(name.as_str().into(), durable, args.clone())
                .await
                .map(|_| ())
        }
        Object::QueueBind {
            queue,
            exchange,
            key,
        } => {
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
        Object::QueueUnbind {
            queue,
            exchange,
            key,
        } => {
            ch.queue_unbind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await
        }
        Object::ExchangeBind {
            destination,
            source,
            key,
        } => {
            ch.exchange_bind(
                destination.as_str().into(),
                source.as_str().into(),
                key.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
    }
}

/// Check, with passive declares, that every exchange and queue of `topo`
/// exists: what a broker user without configure permission can do (RabbitMQ
/// checks no permission on a passive declare). Bindings cannot be checked
/// this way; a missing one shows as an unroutable publish. A missing object
/// yields [`Error::Missing`] naming it.
pub async fn check(conn: &Connection, topo: &Topology) -> Result<(), Error> {
    check_objects(conn, topo, &topo.objects()).await
}

/// [`check`] for `objects` of `topo`.
pub async fn check_objects(
    conn: &Connection,
    topo: &Topology,
    objects: &[Object],
) -> Result<(), Error> {
    let mut ch = conn.create_channel().await?;
    for obj in objects {
        let Some(res) = passive_declare(&ch, obj).await else {
            continue;
        };
        if let Err(e) = res {
            if topo.is_optional(obj) {
                tracing::warn!(error = %crate::error::broker_reason(&e), stream = %topo.events_stream(), "the task events stream is missing; task events will be dropped");
                ch = conn.create_channel().await?;
                continue;
            }
            if not_found(&e) {
                let object = describe(obj);
                return Err(Error::Missing { object });
            }
            return Err(conflict(obj, e));
        }
        // A refused passive declare closes the channel; none was refused.
        if !ch.status().connected() {
            ch = conn.create_channel().await?;
        }
    }
    let _ = ch.close(200, "topology checked".into()).await;
    Ok(())
}

/// Whether `name` exists, whatever its arguments (a passive declare; a
/// missing queue closes `ch`).
/// A passive declare of `obj` (a missing one closes `ch`); `None` for
/// what is not a queue or an exchange.
pub async fn passive_declare(
    ch: &lapin::Channel,
    obj: &Object,
) -> Option<Result<(), lapin::Error>> {
    Some(match obj {
        Object::Exchange { name, kind, .. } => {
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            ch.exchange_declare(
                name.as_str().into(),
                kind.clone(),
                passive,
                FieldTable::default(),
            )
            .await
        }
        Object::Queue { name, .. } => passive_queue(ch, name).await,
        _ => return None,
    })
}

async fn passive_queue(ch: &lapin::Channel, name: &str) -> Result<(), lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(name.into(), passive, FieldTable::default())
        .await
        .map(|_| ())
}

fn not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if p.kind() == &AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

fn conflict(obj: &Object, e: lapin::Error) -> Error {
    let text = match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_message().as_str().to_owned(),
        _ => return Error::Amqp(e),
    };
    let object = describe(obj);
    match inequivalent_arg(&text) {
        Some(argument) => Error::TopologyConflict {
            object,
            argument,
            detail: text,
        },
        None => Error::Declare {
            object,
            detail: text,
        },
    }
}

/// An object as error messages name it.
fn describe(obj: &Object) -> String {
    match obj {
        Object::Exchange { name, .. } => format!("exchange `{name}`"),
        Object::Queue { name, .. } => format!("queue `{name}`"),
        Object::QueueBind {
            queue,
            exchange,
            key,
        } => {
            format!("binding of queue `{queue}` to `{exchange}` with `{key}`")
        }
        Object::ExchangeBind {
            destination,
            source,
            key,
        } => {
            format!("binding of exchange `{destination}` to `{source}` with `{key}`")
        }
        Object::QueueUnbind {
            queue,
            exchange,
            key,
        } => {
            format!("removing the old binding of queue `{queue}` to `{exchange}` with `{key}`")
        }
    }
}

/// The argument named in RabbitMQ's `inequivalent arg 'x'` refusal.
fn inequivalent_arg(text: &str) -> Option<String> {
    let rest = text.split_once("inequivalent arg '")?.1;
    Some(rest.split_once('\'')?.0.to_owned())
}

/// AMQP topic matching: words split on `.`, `*` = exactly one word, `#` = zero
/// or more words.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[&str], n: &[&str]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((&"#", rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((w, rest)) => match n.split_first() {
                Some((nw, nrest)) => (*w == "*" || w == nw) && go(rest, nrest),
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let n: Vec<&str> = name.split('.').collect();
    go(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        assert!(pattern_matches("a.*", "a.b"));
        assert!(!pattern_matches("a.*", "a.b.c"));
        assert!(pattern_matches("a.#", "a"));
        assert!(pattern_matches("a.#", "a.b.c"));
        assert!(pattern_matches("#", "anything.at.all"));
        assert!(pattern_matches("*.send", "email.send"));
        assert!(!pattern_matches("email.send", "email.sent"));
    }
    use crate::config::QueueConfig;

    fn topo(qt: QueueType) -> Topology {
        Topology::new(&TopologyConfig {
            prefix: "t".into(),
            queue_type: qt,
            queues: vec![
                QueueConfig::default(),
                QueueConfig {
                    name: "q.emails".into(),
                    bindings: vec!["email.*".into()],
                    max_priority: Some(0),
                },
                QueueConfig {
                    name: "q.urgent".into(),
                    bindings: vec!["urgent.*".into()],
                    max_priority: Some(10),
                },
            ],
            delivery_limit: 20,
            declare: true,
        })
    }

    #[test]
    fn routes_zero_delay_straight_to_tasks() {
        let t = topo(QueueType::Classic);
        assert_eq!(
            t.route("a.b", Duration::ZERO),
            ("t.tasks".into(), "a.b".into())
        );
        let (ex, key) = t.route("a.b", Duration::from_millis(1700));
        assert_eq!(ex, "t.delay.4");
        assert!(key.ends_with(".a.b"));
    }

    #[test]
    fn every_level_dead_letters_one_level_down() {
        let t = topo(QueueType::Classic);
        let objs = t.objects();
        for level in 0..delay::LEVELS {
            let q = objs
                .iter()
                .find_map(|o| match o {
                    Object::Queue { name, args } if *name == t.level_queue(level) => {
                        Some(args.clone())
                    }
                    _ => None,
                })
                .expect("level queue");
            let dlx = q.inner().get("x-dead-letter-exchange").cloned();
            let want = if level == 0 {
                t.delivery_exchange()
            } else {
                t.level_exchange(level - 1)
            };
            assert_eq!(dlx, Some(AMQPValue::LongString(want.into())));
            assert_eq!(
                q.inner().get("x-message-ttl"),
                Some(&AMQPValue::LongLongInt(delay::level_ttl_ms(level) as i64))
            );
        }
    }

    #[test]
    fn quorum_gets_at_least_once_dead_lettering_and_no_priority() {
        let t = topo(QueueType::Quorum);
        for o in t.objects() {
            if let Object::Queue { args, name } = o {
                assert_eq!(
                    args.inner().get("x-dead-letter-strategy"),
                    Some(&AMQPValue::LongString("at-least-once".into())),
                    "{name}"
                );
                assert!(!args.contains_key("x-max-priority"));
            }
        }
        let work = t.objects().into_iter().find_map(|o| match o {
            Object::Queue { name, args } if name == "t.default" => Some(args),
            _ => None,
        });
        assert_eq!(
            work.and_then(|a| a.inner().get("x-delivery-limit").cloned()),
            Some(AMQPValue::LongLongInt(20)),
            "quorum work queues bound redeliveries"
        );
        let c = topo(QueueType::Classic);
        let prio = |queue: &str| {
            c.objects().into_iter().find_map(|o| match o {
                Object::Queue { name, args } if name == queue => {
                    Some(args.inner().get("x-max-priority").cloned())
                }
                _ => None,
            })
        };
        // Priorities are opt-in: unset and 0 declare none, a number declares it.
        assert_eq!(prio("t.default"), Some(None));
        assert_eq!(prio("t.q.emails"), Some(None));
        assert_eq!(
            prio("t.q.urgent"),
            Some(Some(AMQPValue::ShortShortUInt(10)))
        );
        assert!(c.adopts_existing("t.default"));
        assert!(!c.adopts_existing("t.q.emails"));
        assert!(!c.adopts_existing("t.q.urgent"));
        assert!(!c.adopts_existing("t.dead"));
    }

    #[test]
    fn the_workflows_queue_takes_starts_events_and_resumes_of_its_direct_exchange() {
        let t = topo(QueueType::Quorum);
        let objs = t.objects();
        assert!(objs.iter().any(|o| matches!(o,
            Object::Exchange { name, kind: ExchangeKind::Direct, .. } if *name == t.workflows_exchange())));
        assert!(objs.iter().any(|o| matches!(o,
            Object::Queue { name, args } if *name == t.workflows_queue()
                && args.inner().get("x-queue-type").is_some())));
        let keys: Vec<&str> = objs
            .iter()
            .filter_map(|o| match o {
                Object::QueueBind {
                    queue,
                    exchange,
                    key,
                } if *queue == t.workflows_queue() && *exchange == t.workflows_exchange() => {
                    Some(key.as_str())
                }
                _ => None,
            })
            .collect();
        assert_eq!(keys, ["start", "event", "resume"]);
    }

    #[test]
    fn the_catch_all_binds_behind_the_alternate_exchange_only() {
        let t = topo(QueueType::Classic);
        let binds: Vec<(String, String, String)> = t
            .objects()
            .into_iter()
            .filter_map(|o| match o {
                Object::QueueBind {
                    queue,
                    exchange,
                    key,
                } if !queue.contains(".delay.")
                    && queue != t.dead_queue()
                    && queue != t.workflows_queue()
                    && queue != "t.q.urgent" =>
                {
                    Some((queue, exchange, key))
                }
                _ => None,
            })
            .collect();
        let b = |q: &str, x: String, k: String| (q.to_owned(), x, k);
        assert_eq!(
            binds,
            vec![
                b("t.default", t.unclaimed_exchange(), "#".into()),
                b(
                    "t.default",
                    t.delivery_unclaimed_exchange(),
                    delay::delivery_pattern("#")
                ),
                b("t.q.emails", t.route_exchange(), "email.*".into()),
                b(
                    "t.q.emails",
                    t.delivery_route_exchange(),
                    delay::delivery_pattern("email.*")
                ),
            ]
        );
        let args = |name: String| {
            t.objects().into_iter().find_map(|o| match o {
                Object::Exchange { name: n, args, .. } if n == name => Some(args),
                _ => None,
            })
        };
        let ae =
            |name: String| args(name).and_then(|a| a.inner().get("alternate-exchange").cloned());
        let s = |v: String| Some(AMQPValue::LongString(v.into()));
        assert_eq!(ae(t.tasks_exchange()), None, "the front door is unchanged");
        assert_eq!(ae(t.route_exchange()), s(t.unclaimed_exchange()));
        assert_eq!(
            ae(t.unclaimed_exchange()),
            None,
            "unclaimed stays unroutable"
        );
        assert_eq!(ae(t.delivery_exchange()), s(t.dead_exchange()));
        assert_eq!(
            ae(t.delivery_route_exchange()),
            s(t.delivery_unclaimed_exchange())
        );
        assert_eq!(ae(t.delivery_unclaimed_exchange()), s(t.dead_exchange()));
    }

    #[test]
    fn parses_broker_refusal() {
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 't.default' in vhost '/': received the value '10' of type 'byte' but current value is '5' of type 'signedint'";
        assert_eq!(inequivalent_arg(text).as_deref(), Some("x-max-priority"));
        assert_eq!(inequivalent_arg("NOT_FOUND - no exchange"), None);
    }
}
