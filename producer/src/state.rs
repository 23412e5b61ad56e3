//! What a new leader must know about past fires, kept in RabbitMQ: the queue
//! `<prefix>.producer.state` holds exactly one message (`x-max-length = 1`,
//! overflow drops the head), the latest snapshot of every schedule's cursor
//! (the last instant already decided: fired or counted as missed) and last
//! confirmed fire, and which schedules an operator paused.
//!
//! Only the leader writes it, on the lock connection, with a confirm, right
//! after the ticks it covers were confirmed; a new leader reads it with
//! `basic.get` and puts it back (reject + requeue). A last-value queue of one
//! message needs no compaction and no plugin, and a single snapshot avoids the
//! trap of a per-fire log where frequent schedules push the records of rare
//! ones out of a length-limited queue.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use lapin::options::{BasicGetOptions, BasicRejectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};
use warren::amqp::{Pending, Publisher};
use warren::config::QueueType;

pub fn state_queue(prefix: &str) -> String {
    format!("{prefix}.producer.state")
}

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Every fire at or before this instant has been decided.
    pub cursor: DateTime<Utc>,
    /// Scheduled instant of the last confirmed fire.
    pub last_fired: Option<DateTime<Utc>>,
}

pub async fn declare(conn: &Connection, queue: &str, qt: QueueType) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(1));
    if qt == QueueType::Quorum {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
    }
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    let _ = ch.close(200, "state queue declared".into()).await;
    Ok(())
}

/// Read the snapshot without consuming it. A corrupt snapshot reads as empty.
pub async fn read(conn: &Connection, queue: &str) -> Result<Snapshot, lapin::Error> {
    let ch = conn.create_channel().await?;
    let got = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?;
    let snap = match got {
        None => Snapshot::default(),
        Some(msg) => {
            let snap = serde_json::from_slice::<Snapshot>(&msg.delivery.data).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "unreadable producer state snapshot; starting without it");
                Snapshot::default()
            });
            msg.delivery
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await?;
            snap
        }
    };
    let _ = ch.close(200, "state read".into()).await;
    Ok(snap)
}

/// Replace the snapshot (confirmed).
pub async fn write(
    publisher: &Publisher,
    queue: &str,
    snap: &Snapshot,
) -> Result<(), warren::Error> {
    send(publisher, queue, snap).await?.confirmed().await
}

/// Send a replacement snapshot without waiting for its confirm.
pub async fn send(
    publisher: &Publisher,
    queue: &str,
    snap: &Snapshot,
) -> Result<Pending, warren::Error> {
    let body = serde_json::to_vec(snap).unwrap_or_default();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(warren::envelope::PERSISTENT);
    publisher.send("", queue, props, &body).await
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
        let t = Utc::now();
        s.schedules.insert(
            "a".into(),
            Entry {
                cursor: t,
                last_fired: Some(t),
            },
        );
        let back: Snapshot = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
