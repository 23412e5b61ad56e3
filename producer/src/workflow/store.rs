//! Where run state lives: like the schedule state ([`crate::state`]), a
//! last-value queue of one message, `<prefix>.producer.workflows`, holding
//! every active run and the finished ones still retained. Only the leader
//! writes it (on the lock connection, confirmed) and only a new leader reads
//! it (`basic.get`, then reject + requeue).
//!
//! The same snapshot also goes to `<prefix>.producer.workflows.view`, which
//! every replica peeks to answer status requests. A peek holds that message
//! unacked for a moment: on a queue of its own it can never make a new
//! leader read an empty state.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};
use warren::amqp::{Pending, Publisher};

use super::run::Run;

pub fn state_queue(prefix: &str) -> String {
    format!("{prefix}.producer.workflows")
}

pub fn view_queue(prefix: &str) -> String {
    format!("{prefix}.producer.workflows.view")
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub v: u32,
    pub writer: String,
    pub written_at: Option<DateTime<Utc>>,
    /// Increases with every write of a term (a peek that finds two copies
    /// keeps the newer).
    #[serde(default)]
    pub seq: u64,
    /// By run id.
    pub runs: BTreeMap<String, Run>,
}

impl Snapshot {
    /// Drop finished runs older than `retention`, then the oldest finished
    /// ones beyond `max_finished`. Active runs are always kept.
    pub fn prune(&mut self, now: DateTime<Utc>, retention: Duration, max_finished: usize) {
        let horizon = now - chrono::TimeDelta::from_std(retention).unwrap_or_default();
        self.runs
            .retain(|_, r| r.finished_at.is_none_or(|f| f >= horizon));
        let mut finished: Vec<(DateTime<Utc>, String)> = self
            .runs
            .values()
            .filter_map(|r| r.finished_at.map(|f| (f, r.id.clone())))
            .collect();
        if finished.len() > max_finished {
            finished.sort();
            for (_, id) in &finished[..finished.len() - max_finished] {
                self.runs.remove(id);
            }
        }
    }

    /// When the oldest finished run passes `retention`: the coordinator
    /// prunes then even when no message arrives, so an idle coordinator
    /// forgets runs on time.
    pub fn next_expiry(&self, retention: Duration) -> Option<DateTime<Utc>> {
        let oldest = self.runs.values().filter_map(|r| r.finished_at).min()?;
        Some(oldest + chrono::TimeDelta::from_std(retention).unwrap_or_default())
    }
}

pub async fn declare(
    conn: &Connection,
    prefix: &str,
    qt: warren::config::QueueType,
) -> Result<(), lapin::Error> {
    crate::state::declare(conn, &state_queue(prefix), qt).await?;
    crate::state::declare(conn, &view_queue(prefix), qt).await
}

/// Every message in `queue` (at most `max`), given back at once: the
/// snapshot with the highest `seq`. A corrupt snapshot reads as empty.
async fn get(conn: &Connection, queue: &str, max: usize) -> Result<Snapshot, lapin::Error> {
    let ch = conn.create_channel().await?;
    let mut best: Option<Snapshot> = None;
    let mut held = Vec::new();
    for _ in 0..max {
        let Some(msg) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let more = msg.message_count > 0;
        match serde_json::from_slice::<Snapshot>(&msg.delivery.data) {
            Ok(s) if best.as_ref().is_none_or(|b| s.seq >= b.seq) => best = Some(s),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, queue, "unreadable workflow snapshot; ignoring it")
            }
        }
        held.push(msg.delivery.acker.clone());
        if !more {
            break;
        }
    }
    for acker in held {
        acker.reject(BasicRejectOptions { requeue: true }).await?;
    }
    let _ = ch.close(200, "workflow state read".into()).await;
    Ok(best.unwrap_or_default())
}

/// The snapshot a new leader resumes from.
pub async fn read(conn: &Connection, prefix: &str) -> Result<Snapshot, lapin::Error> {
    get(conn, &state_queue(prefix), 1).await
}

/// The latest snapshot, for status requests on any replica. Another reader
/// may hold the message for a moment (then the queue looks empty): an empty
/// answer is asked again a few times, about 0.2 s in all, before it counts.
pub async fn peek(conn: &Connection, prefix: &str) -> Result<Snapshot, lapin::Error> {
    let mut wait = Duration::from_millis(10);
    for _ in 0..4 {
        let snap = get(conn, &view_queue(prefix), 2).await?;
        if snap.written_at.is_some() {
            return Ok(snap);
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    get(conn, &view_queue(prefix), 2).await
}

/// Write `snap` to both queues; the two confirms.
pub async fn send(
    publisher: &Publisher,
    prefix: &str,
    snap: &Snapshot,
) -> Result<(Pending, Pending), warren::Error> {
    let body = serde_json::to_vec(snap).unwrap_or_default();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(warren::envelope::PERSISTENT);
    let state = publisher
        .send("", &state_queue(prefix), props.clone(), &body)
        .await?;
    let view = publisher
        .send("", &view_queue(prefix), props, &body)
        .await?;
    Ok((state, view))
}

/// Write `snap` and wait for the state queue's confirm (the view's too).
pub async fn write(
    publisher: &Publisher,
    prefix: &str,
    snap: &Snapshot,
) -> Result<(), warren::Error> {
    let (state, view) = send(publisher, prefix, snap).await?;
    state.confirmed().await?;
    if let Err(e) = view.confirmed().await {
        tracing::warn!(error = %e, "workflow status view not updated");
    }
    Ok(())
}
