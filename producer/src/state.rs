//! What a new leader must know about past fires, kept in RabbitMQ, in two
//! parts whose cost per fire does not grow with the number of schedules:
//!
//! * **the log**, the stream `<prefix>.producer.fires`: each wake-up of the
//!   fire loop appends one small [`Record`] (the cursors of the schedules it
//!   decided, pauses and resumes), pipelined right behind its ticks on the
//!   lock connection, confirmed;
//! * **the snapshot**, the queue `<prefix>.producer.state` holding exactly one
//!   message (`x-max-length = 1`, overflow drops the head): every cursor, the
//!   paused set and the log offset it covers, rewritten when the log since
//!   the last one holds half its size (not per fire; see the fire loop's
//!   `compact_due`).
//!
//! A new leader reads the snapshot with `basic.get` and puts it back
//! (reject and requeue), appends a marker record to the log, and reads the log from
//! the snapshot's offset up to its marker: everything the previous leaders
//! appended comes before it (their connections, and so their locks, are
//! gone). Records merge by maximum (a cursor never moves back), so reading a
//! record twice, or one the snapshot already covers, changes nothing.
//!
//! The names and definitions of the log and snapshot queues, the scheduler's
//! and the others that use these functions, are in
//! [`warren::topology::producer`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};
use warren::amqp::{Pending, Publisher};

/// How long a new leader may take to read the log up to its marker.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub v: u32,
    /// Instance that wrote it (diagnostics).
    pub writer: String,
    pub written_at: Option<DateTime<Utc>>,
    pub schedules: BTreeMap<String, Entry>,
    /// Schedules an operator paused (absent in snapshots of older versions).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub paused: BTreeSet<String>,
    /// The last log offset this snapshot covers (absent before the log:
    /// read the log from its start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// A snapshot that a log of records brings up to date: what [`load`]
/// needs to resume from a one-message snapshot queue and a log stream. The
/// scheduler's state and the workflow runs both are one.
pub trait Fold: Default + serde::de::DeserializeOwned {
    type Record: serde::de::DeserializeOwned + Serialize;
    /// The last log offset folded in (or covered by the snapshot).
    fn offset(&self) -> Option<u64>;
    fn set_offset(&mut self, offset: u64);
    fn fold(&mut self, r: Self::Record);
    fn marker(r: &Self::Record) -> Option<&str>;
    fn marker_record(marker: String) -> Self::Record;
}

impl Fold for Snapshot {
    type Record = Record;
    fn offset(&self) -> Option<u64> {
        self.offset
    }
    fn set_offset(&mut self, offset: u64) {
        self.offset = Some(offset);
    }
    fn fold(&mut self, r: Record) {
        self.merge(r);
    }
    fn marker(r: &Record) -> Option<&str> {
        r.marker.as_deref()
    }
    fn marker_record(marker: String) -> Record {
        Record {
            marker: Some(marker),
            ..Record::default()
        }
    }
}

impl Snapshot {
    /// Fold one log record in: cursors and last fires only move forward.
    pub fn merge(&mut self, r: Record) {
        for (name, e) in r.entries {
            match self.schedules.get_mut(&name) {
                Some(old) => {
                    old.cursor = old.cursor.max(e.cursor);
                    old.last_fired = old.last_fired.max(e.last_fired);
                }
                None => {
                    self.schedules.insert(name, e);
                }
            }
        }
        for name in r.resumed {
            self.paused.remove(&name);
        }
        self.paused.extend(r.paused);
    }
}

/// One append to the log: what one wake-up of the fire loop decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub entries: BTreeMap<String, Entry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paused: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resumed: Vec<String>,
    /// A new leader's marker: the log up to here is what it must read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
}

impl Record {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.paused.is_empty()
            && self.resumed.is_empty()
            && self.marker.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Every fire at or before this instant has been decided.
    #[serde(with = "micros")]
    pub cursor: DateTime<Utc>,
    /// Scheduled instant of the last confirmed fire.
    #[serde(default, with = "micros_opt", skip_serializing_if = "Option::is_none")]
    pub last_fired: Option<DateTime<Utc>>,
}

/// The state's instants are microseconds since the epoch: formatting RFC
/// 3339 text cost about a microsecond per cursor, paid for every cursor in
/// every snapshot (measured at 100,000 schedules). States written before
/// held RFC 3339 text; both read. Microseconds lose nothing a cursor needs:
/// fire instants are whole milliseconds.
mod micros {
    use chrono::{DateTime, Utc};
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(t.timestamp_micros())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        d.deserialize_any(Instant)
    }

    pub(super) struct Instant;

    impl Visitor<'_> for Instant {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("microseconds since the epoch or an RFC 3339 instant")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            DateTime::from_timestamp_micros(v).ok_or_else(|| E::custom("instant out of range"))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            let v = i64::try_from(v).map_err(|_| E::custom("instant out of range"))?;
            self.visit_i64(v)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(E::custom)
        }
    }
}

mod micros_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::micros::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::micros")] DateTime<Utc>);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

/// A [`Snapshot`] as the leader writes it, borrowing what it holds (no
/// copy of every cursor per compaction); the same JSON shape.
#[derive(Serialize)]
pub struct SnapshotRef<'a, E: Serialize> {
    pub v: u32,
    pub writer: &'a str,
    pub written_at: Option<DateTime<Utc>>,
    pub schedules: E,
    #[serde(skip_serializing_if = "none_paused")]
    pub paused: &'a BTreeSet<String>,
    pub offset: Option<u64>,
}

fn none_paused(p: &&BTreeSet<String>) -> bool {
    p.is_empty()
}

/// Read the snapshot without consuming it. A corrupt snapshot reads as empty.
pub async fn read<S: Fold>(conn: &Connection, queue: &str) -> Result<S, lapin::Error> {
    peek(conn, queue, "producer state snapshot").await
}

/// The JSON message of a one-message queue that only the leader reads,
/// put back at once (reject and requeue); the default when the queue is
/// empty or the message unreadable.
pub async fn peek<T: serde::de::DeserializeOwned + Default>(
    conn: &Connection,
    queue: &str,
    what: &str,
) -> Result<T, lapin::Error> {
    get(conn, queue, what, 1).await
}

/// [`peek`] for a queue every replica reads. Another reader may hold the
/// message for a moment (a replica starting at the same time, the CLI),
/// and then the queue looks empty: an empty answer is asked again a few
/// times, about 0.15 s in all, before it counts — a snapshot taken for
/// absent would make a reader start from the log alone, which retention
/// may have cut.
pub async fn peek_shared<T: serde::de::DeserializeOwned + Default>(
    conn: &Connection,
    queue: &str,
    what: &str,
) -> Result<T, lapin::Error> {
    get(conn, queue, what, 4).await
}

async fn get<T: serde::de::DeserializeOwned + Default>(
    conn: &Connection,
    queue: &str,
    what: &str,
    tries: u32,
) -> Result<T, lapin::Error> {
    let ch = conn.create_channel().await?;
    let mut wait = Duration::from_millis(10);
    let mut got = None;
    for left in (0..tries).rev() {
        got = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?;
        if got.is_some() || left == 0 {
            break;
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    let value = match got {
        None => T::default(),
        Some(msg) => {
            let value = serde_json::from_slice::<T>(&msg.delivery.data).unwrap_or_else(|e| {
                tracing::warn!(error = %e, what, "unreadable; starting without it");
                T::default()
            });
            msg.delivery
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await?;
            value
        }
    };
    let _ = ch.close(200, "snapshot read".into()).await;
    Ok(value)
}

/// A consumer of the stream `queue` from the offset after `after` (from
/// its start without one), `prefetch` deliveries in flight.
pub async fn consume_log(
    conn: &Connection,
    queue: &str,
    tag: &str,
    after: Option<u64>,
    prefetch: u16,
) -> Result<(lapin::Channel, lapin::Consumer), lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let from = match after {
        Some(o) => AMQPValue::LongLongInt(i64::try_from(o + 1).unwrap_or(i64::MAX)),
        None => AMQPValue::LongString("first".into()),
    };
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-stream-offset"), from);
    let consumer = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    Ok((ch, consumer))
}

/// The offset of a stream delivery.
pub fn stream_offset(d: &lapin::message::Delivery) -> Option<u64> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(o) => u64::try_from(*o).ok(),
        AMQPValue::LongInt(o) => u64::try_from(*o).ok(),
        AMQPValue::LongUInt(o) => Some(u64::from(*o)),
        _ => None,
    }
}

/// Append `r` to the log without waiting for its confirm.
pub async fn append(
    publisher: &Publisher,
    queue: &str,
    r: &impl Serialize,
) -> Result<Pending, warren::Error> {
    send_raw(publisher, queue, &serde_json::to_vec(r).unwrap_or_default()).await
}

/// The log as this leader keeps reading it after catching up: the offset
/// of the latest record seen, which the next snapshot covers.
pub struct Tail {
    seen: Arc<AtomicU64>,
    channel: lapin::Channel,
}

impl Tail {
    /// Every record at or before this offset was appended before now.
    pub fn offset(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }

    pub async fn close(&self) {
        let _ = self.channel.close(200, "leader term over".into()).await;
    }
}

/// What a new leader resumes from: the snapshot with the log folded in,
/// read up to a marker it appended itself; and the log's [`Tail`].
pub async fn load<S: Fold>(
    conn: &Connection,
    publisher: &Publisher,
    state_queue: &str,
    log: &str,
    instance: &str,
) -> anyhow::Result<(S, Tail)> {
    let mut snap: S = read(conn, state_queue).await?;
    let marker = format!("{instance}/{}", uuid::Uuid::new_v4());
    append(publisher, log, &S::marker_record(marker.clone()))
        .await?
        .confirmed()
        .await?;
    let (ch, mut consumer) =
        consume_log(conn, log, "warren-producer-state", snap.offset(), 1000).await?;
    let mut records = 0u64;
    let read_up = async {
        loop {
            let Some(d) = consumer.next().await else {
                anyhow::bail!("the state log consumer ended while catching up");
            };
            let d = d?;
            d.acker.ack(BasicAckOptions::default()).await?;
            if let Some(o) = stream_offset(&d) {
                snap.set_offset(o);
            }
            match serde_json::from_slice::<S::Record>(&d.data) {
                Ok(r) if S::marker(&r) == Some(marker.as_str()) => return Ok(()),
                Ok(r) => {
                    records += 1;
                    snap.fold(r);
                }
                Err(e) => tracing::warn!(error = %e, log, "unreadable log record; skipped"),
            }
        }
    };
    tokio::time::timeout(CATCH_UP_TIMEOUT, read_up)
        .await
        .map_err(|_| anyhow::anyhow!("reading the log {log} timed out"))??;
    tracing::debug!(records, offset = ?snap.offset(), log, "log read");
    let seen = Arc::new(AtomicU64::new(snap.offset().unwrap_or(0)));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            if let Some(o) = stream_offset(&d) {
                s.store(o, Ordering::SeqCst);
            }
            if d.acker.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
        }
    });
    Ok((snap, Tail { seen, channel: ch }))
}

/// Send JSON `body` to `queue`, persistent, without waiting for its
/// confirm.
pub async fn send_raw(
    publisher: &Publisher,
    queue: &str,
    body: &[u8],
) -> Result<Pending, warren::Error> {
    publisher.send("", queue, properties(), body).await
}

/// The properties of a state message (snapshot or log record).
pub fn properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(warren::envelope::PERSISTENT)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trip() {
        let mut s = Snapshot {
            v: 1,
            writer: "h:1".into(),
            ..Default::default()
        };
        let t = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
        s.schedules.insert(
            "a".into(),
            Entry {
                cursor: t,
                last_fired: Some(t),
            },
        );
        s.schedules.insert(
            "b".into(),
            Entry {
                cursor: t,
                last_fired: None,
            },
        );
        let back: Snapshot = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    /// What the leader writes borrowed reads back as a [`Snapshot`].
    #[test]
    fn a_borrowed_snapshot_reads_as_a_snapshot() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let entries: BTreeMap<String, Entry> = [(
            "a".to_owned(),
            Entry {
                cursor: t,
                last_fired: Some(t),
            },
        )]
        .into();
        let paused: BTreeSet<String> = ["a".to_owned()].into();
        let out = SnapshotRef {
            v: 3,
            writer: "h:1",
            written_at: Some(t),
            schedules: &entries,
            paused: &paused,
            offset: Some(7),
        };
        let back: Snapshot = serde_json::from_slice(&serde_json::to_vec(&out).unwrap()).unwrap();
        let want = Snapshot {
            v: 3,
            writer: "h:1".into(),
            written_at: Some(t),
            schedules: entries,
            paused,
            offset: Some(7),
        };
        assert_eq!(back, want);
    }

    /// States written before held RFC 3339 text: a new leader reads them.
    #[test]
    fn entries_of_older_versions_read() {
        let old = r#"{"v":2,"writer":"h:1","written_at":"2027-01-15T08:00:00Z",
            "schedules":{"a":{"cursor":"2027-01-15T08:00:00.500Z","last_fired":"2027-01-15T08:00:00Z"},
                         "b":{"cursor":1800000000000000,"last_fired":null}}}"#;
        let s: Snapshot = serde_json::from_str(old).unwrap();
        let at = |t: &str| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc);
        assert_eq!(s.schedules["a"].cursor, at("2027-01-15T08:00:00.500Z"));
        assert_eq!(
            s.schedules["a"].last_fired,
            Some(at("2027-01-15T08:00:00Z"))
        );
        assert_eq!(
            s.schedules["b"].cursor,
            DateTime::from_timestamp(1_800_000_000, 0).unwrap()
        );
        assert_eq!(s.schedules["b"].last_fired, None);
        let bad = r#"{"cursor":"yesterday"}"#;
        assert!(serde_json::from_str::<Entry>(bad).is_err());
    }

    /// Records fold in by maximum, in any order and any number of times:
    /// a new leader may read a record the snapshot already covers.
    #[test]
    fn records_merge_forward_only_and_idempotently() {
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let rec = |c: i64, f: Option<i64>| Record {
            entries: [(
                "a".to_owned(),
                Entry {
                    cursor: t(c),
                    last_fired: f.map(t),
                },
            )]
            .into(),
            ..Record::default()
        };
        let mut s = Snapshot::default();
        s.merge(rec(20, Some(20)));
        s.merge(rec(10, Some(10)));
        s.merge(rec(20, Some(20)));
        assert_eq!(s.schedules["a"].cursor, t(20));
        assert_eq!(s.schedules["a"].last_fired, Some(t(20)));
        s.merge(Record {
            paused: vec!["a".into()],
            ..Record::default()
        });
        assert!(s.paused.contains("a"));
        s.merge(Record {
            resumed: vec!["a".into()],
            ..Record::default()
        });
        assert!(s.paused.is_empty());
    }
}
