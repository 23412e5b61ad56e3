//! The dead-letter engine: look at, group, inspect, replay (as is or with
//! an edited payload) and purge what sits in `<prefix>.dead`. Safe while
//! consumers run (nobody consumes the dead queue). The consumer's
//! `warren-consumer dead ...` and the producer's `/v1/dead` API both use it.
//!
//! | part | owns |
//! |---|---|
//! | here | [`DeadTask`] (what the dead headers say), [`Selector`], list, a [`Page`] of a filter, [`Search`], replay, purge |
//! | [`fingerprint()`] | a failure reason without its numbers, ids and instants, its cause first |
//! | [`overview()`] | groups by task, kind and fingerprint, from a bounded scan |
//! | [`inspect()`], [`replay_edited()`] | one message in full; replay it with a new payload |
//!
//! Every operation looks at no more than a scan limit of messages (a dead
//! queue can hold 100,000): counts of the whole queue come from the broker
//! (a passive declare), never from reading it all.
//!
//! Messages are fetched with `basic.get` without auto-ack on a channel of our
//! own: what is not acked (everything, for `list`; what does not match, for
//! `replay`/`purge`) returns to the queue when that channel closes, so
//! nothing is lost if the tool dies half-way. A replayed task is published
//! (confirmed) to the task exchange with its attempts reset *before* its dead
//! copy is acked: a crash in between leaves a duplicate, never a loss.

mod edit;
mod fingerprint;
mod overview;

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::amqp::Publisher;
use crate::envelope::{header_i64, header_str, headers};
use crate::topology::pattern_matches;
use crate::{Task, Topology};

pub use edit::{inspect, replay_edited, DeadMessage};
pub use fingerprint::{cause_first, fingerprint};
pub use overview::{overview, Group, Overview};

/// Reason shown for a message that reached the dead queue through the
/// delivery exchange's alternate exchange (no dead headers, no `x-death`).
pub const UNROUTABLE_AFTER_DELAY: &str = "unroutable after delay";

/// One dead message as the tooling shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadTask {
    pub id: Option<String>,
    pub task: String,
    pub reason: String,
    /// [`fingerprint()`] of `reason`: what groups it with its likes.
    pub fingerprint: String,
    pub kind: String,
    pub attempts: Option<i64>,
    pub failed_at: Option<String>,
    pub first_failed_at: Option<String>,
    pub original_queue: Option<String>,
    pub original_routing_key: Option<String>,
    pub last_error: Option<String>,
    pub body_bytes: usize,
}

/// What the dead headers (or the broker's `x-death`) say about a message.
pub fn describe(routing_key: &str, props: &BasicProperties, body: &[u8]) -> DeadTask {
    let empty = FieldTable::default();
    let h = props.headers().as_ref().unwrap_or(&empty);
    let task = props
        .kind()
        .as_ref()
        .map(|t| t.as_str().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| crate::delay::strip_prefix(routing_key).to_owned());
    let x_death = first_x_death(h);
    let (reason, kind) = match (header_str(h, headers::DEAD_REASON), &x_death) {
        (Some(r), _) => (
            r,
            header_str(h, headers::DEAD_KIND).unwrap_or_else(|| "unknown".into()),
        ),
        // Expired out of a delay level, then dropped by the delivery
        // exchange into its alternate exchange: no work queue binds the task.
        (None, Some((reason, queue))) if reason == "expired" && is_delay_level(queue) => {
            (UNROUTABLE_AFTER_DELAY.to_owned(), "unroutable".to_owned())
        }
        (None, Some((reason, queue))) => (
            format!("dead-lettered by the broker ({reason}) from queue {queue}"),
            format!("broker_{reason}"),
        ),
        (None, None) => (UNROUTABLE_AFTER_DELAY.to_owned(), "unroutable".to_owned()),
    };
    DeadTask {
        id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
        task,
        fingerprint: fingerprint(&reason),
        reason,
        kind,
        attempts: header_i64(h, headers::ATTEMPT).or(Some(1)),
        failed_at: header_str(h, headers::DEAD_AT),
        first_failed_at: header_str(h, headers::FIRST_FAILED_AT),
        original_queue: header_str(h, headers::ORIGINAL_QUEUE)
            .or_else(|| x_death.as_ref().map(|(_, q)| q.clone())),
        original_routing_key: header_str(h, headers::ORIGINAL_ROUTING_KEY)
            .or_else(|| Some(routing_key.to_owned())),
        last_error: header_str(h, headers::LAST_ERROR),
        body_bytes: body.len(),
    }
}

/// Whether `queue` is a delay level (`<prefix>.delay.<k>`).
fn is_delay_level(queue: &str) -> bool {
    queue
        .rsplit_once(".delay.")
        .is_some_and(|(_, k)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
}

/// `(reason, queue)` of the newest `x-death` entry.
fn first_x_death(h: &FieldTable) -> Option<(String, String)> {
    let AMQPValue::FieldArray(arr) = h.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(t) = arr.as_slice().first()? else {
        return None;
    };
    Some((
        header_str(t, "reason").unwrap_or_else(|| "unknown".into()),
        header_str(t, "queue").unwrap_or_else(|| "unknown".into()),
    ))
}

/// Which dead messages an operation applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    All,
    Ids(Vec<String>),
    /// A task name or an AMQP topic pattern (`email.*`).
    Task(String),
    /// One group of [`overview()`]: exactly this task, kind and fingerprint.
    Group {
        task: String,
        kind: String,
        fingerprint: String,
    },
}

impl Selector {
    pub fn matches(&self, d: &DeadTask) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => d.id.as_ref().is_some_and(|id| ids.contains(id)),
            Self::Task(t) => pattern_matches(t, &d.task),
            Self::Group {
                task,
                kind,
                fingerprint,
            } => *task == d.task && *kind == d.kind && *fingerprint == d.fingerprint,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeadError {
    /// The broker refused or broke off an operation: what was tried, on
    /// which object, and the broker's reason, on one line.
    #[error("cannot {action}: {}", crate::error::broker_reason(error))]
    Broker { action: String, error: lapin::Error },
    #[error(transparent)]
    Warren(#[from] crate::Error),
    /// No dead message with this id among those looked at.
    #[error("no dead task with id `{0}` in the dead queue")]
    NotFound(String),
    /// The dead message cannot be replayed as a task (bad name, bad body...).
    #[error("dead task `{id}` cannot be replayed: {why}")]
    Invalid { id: String, why: String },
}

impl DeadError {
    /// Worth trying again (connection trouble), as opposed to a wrong request.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Broker { error, .. } => !crate::Error::Amqp(error.clone()).is_refused(),
            Self::Warren(e) => e.is_transient(),
            Self::NotFound(_) | Self::Invalid { .. } => false,
        }
    }
}

/// Says what a failed broker call was trying to do ([`DeadError::Broker`]).
trait Tried<T> {
    fn tried(self, action: impl FnOnce() -> String) -> Result<T, DeadError>;
}

impl<T> Tried<T> for Result<T, lapin::Error> {
    fn tried(self, action: impl FnOnce() -> String) -> Result<T, DeadError> {
        self.map_err(|error| DeadError::Broker {
            action: action(),
            error,
        })
    }
}

fn open_channel() -> String {
    "open a channel".into()
}

/// How many messages the dead queue holds now, as the broker counts them
/// (ready ones: a scan in progress elsewhere hides what it holds unacked).
pub async fn count(conn: &Connection, topo: &Topology) -> Result<u64, DeadError> {
    let ch = conn.create_channel().await.tried(open_channel)?;
    let n = ready(&ch, &topo.dead_queue()).await?;
    ch.close(200, "dead count done".into())
        .await
        .tried(|| "close the channel".into())?;
    Ok(u64::from(n))
}

/// Ready messages in `queue` (a passive declare).
async fn ready(ch: &Channel, queue: &str) -> Result<u32, DeadError> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .tried(|| format!("look up queue `{queue}`"))?;
    Ok(q.message_count())
}

/// A page of dead tasks: those of the first `scanned` messages that matched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listing {
    /// Messages in the dead queue (the broker's count).
    pub total: u64,
    /// Messages looked at.
    pub scanned: u64,
    /// The scan stopped at its limit before the end of the queue.
    pub truncated: bool,
    pub tasks: Vec<DeadTask>,
}

/// Up to `limit` dead tasks matching `keep` among the first `scan_limit`
/// messages, oldest first, all left in the queue.
pub async fn list_where(
    conn: &Connection,
    topo: &Topology,
    scan_limit: usize,
    limit: usize,
    keep: impl Fn(&DeadTask) -> bool,
) -> Result<Listing, DeadError> {
    let total = count(conn, topo).await?;
    let ch = conn.create_channel().await.tried(open_channel)?;
    let mut scan = Scan::new(&ch, topo, scan_limit).await?;
    let mut tasks = Vec::new();
    while tasks.len() < limit {
        let Some(d) = scan.next().await? else { break };
        let t = describe(d.routing_key.as_str(), &d.properties, &d.data);
        if keep(&t) {
            tasks.push(t);
        }
    }
    let scanned = scan.seen as u64;
    scan.finish(conn, scanned as usize, "dead list done")
        .await?;
    Ok(Listing {
        total,
        scanned,
        truncated: scanned < total,
        tasks,
    })
}

/// One page of the dead tasks a filter selects, with how many it selects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    /// Messages in the dead queue (the broker's count).
    pub total: u64,
    /// Messages looked at.
    pub scanned: u64,
    /// The scan stopped at its limit before the end of the queue.
    pub truncated: bool,
    /// Messages among those looked at that the filter selects.
    pub matched: u64,
    /// The selected ones from `skip` on, at most `take`, oldest first.
    pub tasks: Vec<DeadTask>,
}

/// The dead tasks `keep` selects among the first `scan_limit` messages
/// (it sees each message's body too): all counted, those from `skip` to
/// `skip + take` returned, every message left in the queue.
pub async fn page_where(
    conn: &Connection,
    topo: &Topology,
    scan_limit: usize,
    skip: usize,
    take: usize,
    keep: impl Fn(&DeadTask, &[u8]) -> bool,
) -> Result<Page, DeadError> {
    let total = count(conn, topo).await?;
    let ch = conn.create_channel().await.tried(open_channel)?;
    let mut scan = Scan::new(&ch, topo, scan_limit).await?;
    let mut matched = 0usize;
    let mut tasks = Vec::new();
    while let Some(d) = scan.next().await? {
        let t = describe(d.routing_key.as_str(), &d.properties, &d.data);
        if keep(&t, &d.data) {
            if matched >= skip && tasks.len() < take {
                tasks.push(t);
            }
            matched += 1;
        }
    }
    let scanned = scan.seen as u64;
    scan.finish(conn, scanned as usize, "dead page done")
        .await?;
    Ok(Page {
        total: total.max(scanned),
        scanned,
        truncated: scanned < total,
        matched: matched as u64,
        tasks,
    })
}

/// A search of the dead letters: a message matches when the text occurs,
/// ignoring ASCII case, in its id, task name, failure kind, reason or
/// payload (a task id is found by its id).
#[derive(Debug, Clone, PartialEq)]
pub struct Search(String);

impl Search {
    /// `None` for a blank query.
    pub fn new(query: &str) -> Option<Self> {
        let q = query.trim();
        (!q.is_empty()).then(|| Self(q.to_owned()))
    }

    pub fn text(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, t: &DeadTask, body: &[u8]) -> bool {
        let q = self.0.as_bytes();
        let has = |hay: &[u8]| {
            hay.len() >= q.len() && hay.windows(q.len()).any(|w| w.eq_ignore_ascii_case(q))
        };
        t.id.as_deref().is_some_and(|id| has(id.as_bytes()))
            || has(t.task.as_bytes())
            || has(t.kind.as_bytes())
            || has(t.reason.as_bytes())
            || has(body)
    }
}

/// Up to `limit` dead tasks, oldest first, left in the queue.
pub async fn list(
    conn: &Connection,
    topo: &Topology,
    limit: usize,
) -> Result<Vec<DeadTask>, DeadError> {
    let ch = conn.create_channel().await.tried(open_channel)?;
    let mut scan = Scan::new(&ch, topo, limit).await?;
    let mut out = Vec::new();
    while let Some(d) = scan.next().await? {
        out.push(describe(d.routing_key.as_str(), &d.properties, &d.data));
    }
    // Closing the channel returns every fetched message to the queue.
    scan.finish(conn, out.len(), "dead list done").await?;
    Ok(out)
}

/// One pass over what the dead queue holds when the pass starts, delivered
/// unacked: tasks dead-lettered meanwhile (a replayed task failing again) are
/// not seen twice, and whatever the caller does not ack goes back to the queue
/// when the channel closes.
///
/// Deliveries stream through a consumer whose prefetch is the scan limit, so
/// the broker sends no more than the scan may look at: one `basic.get` per
/// message would cost a round trip each (measured on a debug build with
/// 20,000 dead letters: an overview of 10,000 took ~5 s with `basic.get`,
/// 0.7-1.1 s consuming; of 1,000, 0.9-1.3 s against 0.07-0.15 s).
struct Scan<'a> {
    ch: &'a Channel,
    consumer: lapin::Consumer,
    queue: String,
    /// Messages this pass may look at: the limit, or what was ready at the start.
    limit: usize,
    seen: usize,
}

/// How long a scan waits for a delivery before asking the broker whether
/// anything is still ready (another scan may hold the rest, unacked).
const SCAN_IDLE: Duration = Duration::from_millis(200);

/// Longest wait for the queue to count again what a closed scan held.
const RETURN_WAIT: Duration = Duration::from_secs(1);

impl<'a> Scan<'a> {
    async fn new(ch: &'a Channel, topo: &Topology, limit: usize) -> Result<Self, DeadError> {
        let queue = topo.dead_queue();
        let ready = ready(ch, &queue).await?;
        let limit = limit.min(ready as usize);
        // 0 = unlimited (basic.qos counts in u16): only for scans of more
        // than 65,535, which read the whole queue anyway.
        let prefetch = u16::try_from(limit.max(1)).unwrap_or(0);
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .tried(|| format!("set the prefetch for reading queue `{queue}`"))?;
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "warren-dead-scan".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .tried(|| format!("read queue `{queue}`"))?;
        Ok(Self {
            ch,
            consumer,
            queue,
            limit,
            seen: 0,
        })
    }

    /// Stop the deliveries before the caller closes the channel (a delivery
    /// arriving on a closing channel makes lapin log an error).
    async fn stop(self) -> Result<(), DeadError> {
        self.ch
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
            .await
            .tried(|| format!("stop reading queue `{}`", self.queue))?;
        Ok(())
    }

    /// Stop, close the channel (the broker returns what this pass holds
    /// unacked: `kept` messages) and wait, up to [`RETURN_WAIT`], until the
    /// queue counts them again. The broker applies the returns of a closed
    /// channel a moment after the close is answered (seen on classic
    /// queues too); without the wait, a count
    /// or a scan right after this one (the next page, the total shown next to
    /// it) misses them.
    async fn finish(self, conn: &Connection, kept: usize, what: &str) -> Result<(), DeadError> {
        let (ch, queue) = (self.ch, self.queue.clone());
        self.stop().await?;
        let held_back = ready(ch, &queue).await?;
        ch.close(200, what.into())
            .await
            .tried(|| "close the channel".into())?;
        if kept == 0 {
            return Ok(());
        }
        let want = u64::from(held_back) + kept as u64;
        let look = conn.create_channel().await.tried(open_channel)?;
        let deadline = tokio::time::Instant::now() + RETURN_WAIT;
        // Another reader may hold some of them meanwhile: then the count
        // never gets there, and the wait ends at its deadline.
        while u64::from(ready(&look, &queue).await?) < want
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = look.close(200, "dead count done".into()).await;
        Ok(())
    }

    async fn next(&mut self) -> Result<Option<Delivery>, DeadError> {
        use futures_util::StreamExt as _;
        while self.seen < self.limit {
            match tokio::time::timeout(SCAN_IDLE, self.consumer.next()).await {
                Ok(Some(d)) => {
                    self.seen += 1;
                    return Ok(Some(d.tried(|| format!("read queue `{}`", self.queue))?));
                }
                Ok(None) => return Ok(None),
                Err(_) => {
                    // Nothing came: stop once nothing is ready any more.
                    if ready(self.ch, &self.queue).await? == 0 {
                        return Ok(None);
                    }
                }
            }
        }
        Ok(None)
    }
}
/// Result of a replay.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    pub replayed: Vec<String>,
    /// `(id, why)` of selected messages that could not be replayed (kept).
    pub failed: Vec<(String, String)>,
}

/// Headers a replayed copy must not carry.
fn is_dead_header(k: &str) -> bool {
    k.starts_with("x-warren-dead-")
        || k == headers::ORIGINAL_QUEUE
        || k == headers::ORIGINAL_ROUTING_KEY
        || k.starts_with("x-death")
        || k.starts_with("x-first-death")
        || k.starts_with("x-last-death")
}

/// The task a dead message becomes when replayed: same id, name, payload and
/// user headers; attempts and failure history reset.
pub fn revive(routing_key: &str, props: &BasicProperties, body: &[u8]) -> Result<Task, String> {
    let mut t = Task::decode(routing_key, props, body, usize::MAX).map_err(|e| e.to_string())?;
    t.attempt = 1;
    t.last_error = None;
    t.first_failed_at = None;
    let mut h = FieldTable::default();
    for (k, v) in t.extra_headers.inner() {
        if !is_dead_header(k.as_str()) {
            h.insert(k.clone(), v.clone());
        }
    }
    t.extra_headers = h;
    Ok(t)
}

/// Republish the selected dead tasks (confirmed, attempts reset) and remove
/// them from the dead queue. Looks at up to `limit` messages.
pub async fn replay(
    conn: &Connection,
    topo: &Topology,
    selector: &Selector,
    limit: usize,
    confirm_timeout: Duration,
) -> Result<ReplayReport, DeadError> {
    let publisher = Publisher::new(conn, confirm_timeout).await?;
    let ch = conn.create_channel().await.tried(open_channel)?;
    let mut report = ReplayReport::default();
    let mut scan = Scan::new(&ch, topo, limit).await?;
    while let Some(delivery) = scan.next().await? {
        let d = &delivery;
        let info = describe(d.routing_key.as_str(), &d.properties, &d.data);
        if !selector.matches(&info) {
            continue;
        }
        let id = info.id.clone().unwrap_or_default();
        let task = match revive(d.routing_key.as_str(), &d.properties, &d.data) {
            Ok(t) => t,
            Err(e) => {
                report.failed.push((id, format!("not a valid task: {e}")));
                continue;
            }
        };
        match publisher.publish_task(topo, &task, Duration::ZERO).await {
            Ok(()) => {
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .tried(|| format!("remove replayed task `{id}` from the dead queue"))?;
                report.replayed.push(id);
            }
            Err(e) => report.failed.push((id, e.to_string())),
        }
    }
    let kept = scan.seen - report.replayed.len();
    scan.finish(conn, kept, "dead replay done").await?;
    let _ = publisher
        .channel()
        .close(200, "dead replay done".into())
        .await;
    Ok(report)
}

/// Delete the selected dead tasks; returns how many.
pub async fn purge(
    conn: &Connection,
    topo: &Topology,
    selector: &Selector,
    limit: usize,
) -> Result<u64, DeadError> {
    let ch = conn.create_channel().await.tried(open_channel)?;
    let n = if *selector == Selector::All {
        u64::from(
            ch.queue_purge(
                topo.dead_queue().as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await
            .tried(|| format!("purge queue `{}`", topo.dead_queue()))?,
        )
    } else {
        let mut n = 0;
        let scan_ch = conn.create_channel().await.tried(open_channel)?;
        let mut scan = Scan::new(&scan_ch, topo, limit).await?;
        while let Some(delivery) = scan.next().await? {
            let d = &delivery;
            if selector.matches(&describe(d.routing_key.as_str(), &d.properties, &d.data)) {
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .tried(|| format!("purge a message of queue `{}`", topo.dead_queue()))?;
                n += 1;
            }
        }
        let kept = scan.seen - n as usize;
        scan.finish(conn, kept, "dead purge done").await?;
        n
    };
    ch.close(200, "dead purge done".into())
        .await
        .tried(|| "close the channel".into())?;
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn with(h: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in h {
            t.insert((*k).into(), v.clone());
        }
        BasicProperties::default()
            .with_message_id("m1".into())
            .with_headers(t)
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    #[test]
    fn reason_from_dead_headers_x_death_or_alternate_exchange() {
        let p = with(&[
            (headers::DEAD_REASON, s("permanent error: no")),
            (headers::DEAD_KIND, s("permanent")),
            (headers::ATTEMPT, AMQPValue::LongLongInt(3)),
        ]);
        let d = describe("a.b", &p, b"{}");
        assert_eq!(
            (d.reason.as_str(), d.kind.as_str()),
            ("permanent error: no", "permanent")
        );
        assert_eq!(d.attempts, Some(3));

        let mut death = FieldTable::default();
        death.insert("reason".into(), s("rejected"));
        death.insert("queue".into(), s("warren.default"));
        let arr = FieldArray::from(vec![AMQPValue::FieldTable(death)]);
        let d = describe(
            "a.b",
            &with(&[("x-death", AMQPValue::FieldArray(arr))]),
            b"{}",
        );
        assert!(
            d.reason.contains("rejected") && d.reason.contains("warren.default"),
            "{d:?}"
        );

        let mut death = FieldTable::default();
        death.insert("reason".into(), s("expired"));
        death.insert("queue".into(), s("warren.delay.3"));
        let arr = FieldArray::from(vec![AMQPValue::FieldTable(death)]);
        let d = describe(
            "a.b",
            &with(&[("x-death", AMQPValue::FieldArray(arr))]),
            b"{}",
        );
        assert_eq!(d.reason, UNROUTABLE_AFTER_DELAY);

        let key = crate::delay::routing_key(Duration::from_secs(1), "lost.task");
        let d = describe(&key, &BasicProperties::default(), b"{}");
        assert_eq!(d.reason, UNROUTABLE_AFTER_DELAY);
        assert_eq!(d.task, "lost.task");
    }

    #[test]
    fn a_search_finds_ids_names_reasons_and_payload_text_ignoring_case() {
        let p = with(&[
            (headers::DEAD_REASON, s("permanent error: Card DECLINED")),
            (headers::DEAD_KIND, s("permanent")),
        ]);
        let d = describe("billing.charge", &p, b"{}");
        let body = br#"{"customer": "Ada Lovelace"}"#;
        let hit = |q: &str| Search::new(q).unwrap().matches(&d, body);
        for q in ["m1", "billing.ch", "PERMANENT", "card declined", "ada love"] {
            assert!(hit(q), "{q}");
        }
        for q in [
            "m2",
            "email",
            "Grace",
            "a longer query than any field holds at all",
        ] {
            assert!(!hit(q), "{q}");
        }
        assert!(Search::new("  ").is_none());
        assert_eq!(Search::new(" m1 ").unwrap().text(), "m1");
    }

    #[test]
    fn revive_resets_attempts_and_strips_dead_headers() {
        let p = with(&[
            (headers::DEAD_REASON, s("x")),
            (headers::ATTEMPT, AMQPValue::LongLongInt(5)),
            (headers::LAST_ERROR, s("boom")),
            (headers::ORIGINAL_QUEUE, s("q")),
            ("x-user", s("kept")),
        ])
        .with_type("a.b".into());
        let t = revive("a.b", &p, b"{}").unwrap();
        assert_eq!(
            (t.attempt, t.id.as_str(), t.last_error.clone()),
            (1, "m1", None)
        );
        assert!(!t.extra_headers.contains_key(headers::DEAD_REASON));
        assert!(!t.extra_headers.contains_key(headers::ORIGINAL_QUEUE));
        assert!(t.extra_headers.contains_key("x-user"));
        assert!(revive("a.b", &p, b"{nope").is_err());
    }
}
