//! Where run state lives, in two parts whose cost per event does not grow
//! with the number of runs (the same design as the schedule state,
//! [`crate::state`]):
//!
//! * **the log**, the stream `<prefix>.producer.workflows.log`: each
//!   coordinator round appends one [`Record`] holding only the runs it
//!   changed (whole) and the ids it forgot;
//! * **the snapshot**, every run and the log offset it covers, rewritten
//!   every `workflow.compact_every` (when the log grew) to two one-message
//!   queues: `<prefix>.producer.workflows`, which only a new leader reads,
//!   and `<prefix>.producer.workflows.view`, which readers peek — a peek
//!   holds the message for a moment, and on a queue of its own it can never
//!   make a new leader read an empty state.
//!
//! Records replace runs whole, in log order, so reading a record the
//! snapshot already covers changes nothing once the records after it are
//! read too. A new leader reads the snapshot and the log up to a marker of
//! its own ([`crate::state::load`]); every replica follows the view and the
//! log into a [`View`] that answers status requests, at most one round
//! behind the leader.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::Connection;
use serde::{Deserialize, Serialize};
use warren::amqp::{Pending, Publisher};
use warren::topology::producer::{runs_log, runs_snapshot, runs_view};

use super::run::Run;
use crate::state;

/// Every run, as the snapshot queues hold it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunsSnapshot {
    pub v: u32,
    pub writer: String,
    pub written_at: Option<DateTime<Utc>>,
    /// The last log offset this snapshot covers (absent in snapshots
    /// written before the log: read the log from its start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// By run id.
    pub runs: BTreeMap<String, Run>,
}

/// One append to the log: what one coordinator round changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<Run>,
    /// Runs forgotten (past retention).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// When it was written: the `as_of` of status answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    /// A new leader's marker: the log up to here is what it must read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
}

/// The runs in memory, with the finished ones ordered by when they
/// finished so that pruning touches only what it forgets.
#[derive(Debug, Clone, Default)]
pub struct Runs {
    snap: RunsSnapshot,
    finished: BTreeSet<(DateTime<Utc>, String)>,
}

impl From<RunsSnapshot> for Runs {
    fn from(snap: RunsSnapshot) -> Self {
        let finished = snap
            .runs
            .values()
            .filter_map(|r| r.finished_at.map(|f| (f, r.id.clone())))
            .collect();
        Self { snap, finished }
    }
}

impl<'de> Deserialize<'de> for Runs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RunsSnapshot::deserialize(d).map(Runs::from)
    }
}

impl Serialize for Runs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.snap.serialize(s)
    }
}

impl state::Fold for Runs {
    type Record = Record;
    fn offset(&self) -> Option<u64> {
        self.snap.offset
    }
    fn set_offset(&mut self, offset: u64) {
        self.snap.offset = Some(offset);
    }
    fn fold(&mut self, r: Record) {
        if r.at.is_some() {
            self.snap.written_at = r.at;
        }
        for run in r.runs {
            self.insert(run);
        }
        for id in &r.removed {
            self.remove(id);
        }
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

impl Runs {
    pub fn len(&self) -> usize {
        self.snap.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.snap.runs.is_empty()
    }

    /// Runs not finished.
    pub fn active(&self) -> usize {
        self.snap.runs.len() - self.finished.len()
    }

    pub fn get(&self, id: &str) -> Option<&Run> {
        self.snap.runs.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.snap.runs.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.snap.runs.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &Run> {
        self.snap.runs.values()
    }

    /// When the latest change was written (the last record read, or the
    /// snapshot).
    pub fn as_of(&self) -> Option<DateTime<Utc>> {
        self.snap.written_at
    }

    /// Add or replace a run.
    pub fn insert(&mut self, run: Run) {
        let id = run.id.clone();
        let after = run.finished_at;
        let before = self.snap.runs.insert(id.clone(), run);
        self.reindex(id, before.and_then(|r| r.finished_at), after);
    }

    pub fn remove(&mut self, id: &str) {
        if let Some(r) = self.snap.runs.remove(id) {
            if let Some(f) = r.finished_at {
                self.finished.remove(&(f, id.to_owned()));
            }
        }
    }

    /// Change run `id` in place (keeping the finished order right).
    pub fn update<R>(&mut self, id: &str, f: impl FnOnce(&mut Run) -> R) -> Option<R> {
        let run = self.snap.runs.get_mut(id)?;
        let before = run.finished_at;
        let out = f(run);
        let after = run.finished_at;
        self.reindex(id.to_owned(), before, after);
        Some(out)
    }

    fn reindex(&mut self, id: String, before: Option<DateTime<Utc>>, after: Option<DateTime<Utc>>) {
        if before == after {
            return;
        }
        if let Some(b) = before {
            self.finished.remove(&(b, id.clone()));
        }
        if let Some(a) = after {
            self.finished.insert((a, id));
        }
    }

    /// Forget finished runs older than `retention`, then the oldest
    /// finished ones beyond `max_finished`; active runs are always kept.
    /// The ids forgotten.
    pub fn prune(
        &mut self,
        now: DateTime<Utc>,
        retention: Duration,
        max_finished: usize,
    ) -> Vec<String> {
        let horizon = now - chrono::TimeDelta::from_std(retention).unwrap_or_default();
        let mut gone = Vec::new();
        while let Some((at, _)) = self.finished.first() {
            if *at >= horizon && self.finished.len() <= max_finished {
                break;
            }
            if let Some((_, id)) = self.finished.pop_first() {
                self.snap.runs.remove(&id);
                gone.push(id);
            }
        }
        gone
    }

    /// When the oldest finished run passes `retention`: the coordinator
    /// prunes then even when no message arrives, so an idle coordinator
    /// forgets runs on time.
    pub fn next_expiry(&self, retention: Duration) -> Option<DateTime<Utc>> {
        let (oldest, _) = self.finished.first()?;
        Some(*oldest + chrono::TimeDelta::from_std(retention).unwrap_or_default())
    }

    /// Stamp the snapshot before it is written.
    pub fn stamp(&mut self, writer: &str, at: DateTime<Utc>, offset: u64) {
        self.snap.v = 1;
        self.snap.writer = writer.to_owned();
        self.snap.written_at = Some(at);
        self.snap.offset = Some(offset);
    }
}

/// Append what a round changed (not waiting for the confirm).
pub async fn append(
    publisher: &Publisher,
    prefix: &str,
    record: &Record,
) -> Result<Pending, warren::Error> {
    state::append(publisher, &runs_log(prefix), record).await
}

/// Rewrite both snapshot queues with `runs` (confirmed).
pub async fn compact(
    publisher: &Publisher,
    prefix: &str,
    runs: &Runs,
) -> Result<(), warren::Error> {
    let body = serde_json::to_vec(runs).unwrap_or_default();
    let state = state::send_raw(publisher, &runs_snapshot(prefix), &body).await?;
    let view = state::send_raw(publisher, &runs_view(prefix), &body).await?;
    state.confirmed().await?;
    if let Err(e) = view.confirmed().await {
        tracing::warn!(error = %e, "workflow status view not updated");
    }
    Ok(())
}

/// The runs as every replica sees them, for status requests: the view
/// snapshot and the log after it, followed as it grows.
#[derive(Default)]
pub struct View {
    runs: RwLock<Runs>,
    loaded: AtomicBool,
}

impl View {
    /// Whether the snapshot has been read (before, every run looks
    /// unknown).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// Read access for a moment (never held across an await).
    pub fn read<R>(&self, f: impl FnOnce(&Runs) -> R) -> R {
        let runs = self.runs.read().unwrap_or_else(|p| p.into_inner());
        f(&runs)
    }

    fn replace(&self, runs: Runs) {
        *self.runs.write().unwrap_or_else(|p| p.into_inner()) = runs;
        self.loaded.store(true, Ordering::SeqCst);
    }

    fn fold(&self, offset: Option<u64>, r: Record) {
        use state::Fold;
        let mut runs = self.runs.write().unwrap_or_else(|p| p.into_inner());
        if let (Some(o), Some(a)) = (offset, runs.offset()) {
            if o <= a {
                return;
            }
        }
        if let Some(o) = offset {
            runs.set_offset(o);
        }
        runs.fold(r);
    }

    /// Apply one delivery of the log.
    pub fn apply_delivery(&self, d: &lapin::message::Delivery) {
        match serde_json::from_slice::<Record>(&d.data) {
            Ok(r) => self.fold(state::stream_offset(d), r),
            Err(e) => tracing::warn!(error = %e, "unreadable workflow log record; skipped"),
        }
    }

    /// Start from the view snapshot and return a consumer of the log after
    /// it, to be fed to [`View::apply_delivery`].
    pub async fn follow(
        &self,
        conn: &Connection,
        prefix: &str,
    ) -> Result<(lapin::Channel, lapin::Consumer), lapin::Error> {
        let runs: Runs =
            state::peek_shared(conn, &runs_view(prefix), "workflow status view").await?;
        let after = state::Fold::offset(&runs);
        self.replace(runs);
        state::consume_log(
            conn,
            &runs_log(prefix),
            "warren-producer-workflows",
            after,
            1000,
        )
        .await
    }
}

/// The runs as of now, for a one-off reader (the CLI): the view snapshot
/// and the log after it, read until a record written after the call began
/// or the log is quiet for 300 ms.
pub async fn read_once(conn: &Connection, prefix: &str) -> Result<Runs, lapin::Error> {
    let began = Utc::now();
    let view = View::default();
    let (ch, mut consumer) = view.follow(conn, prefix).await?;
    loop {
        match tokio::time::timeout(Duration::from_millis(300), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let _ = d.acker.ack(BasicAckOptions::default()).await;
                view.apply_delivery(&d);
                if view.read(|r| r.as_of().is_some_and(|t| t >= began)) {
                    break;
                }
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = ch.close(200, "workflow state read".into()).await;
    Ok(view.runs.into_inner().unwrap_or_else(|p| p.into_inner()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::Fold;
    use crate::workflow::run::RunStatus;

    fn run(id: &str, finished: Option<i64>) -> Run {
        let wf: crate::workflow::Workflow =
            crate::workflow::definition::compile(&[toml::from_str(
                "name = \"w\"\n[[steps]]\nname = \"a\"\ntask = \"t.a\"\n",
            )
            .unwrap()])
            .unwrap()
            .remove(0);
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let mut r = Run::new(id.into(), &wf, serde_json::json!({}), None, t(0));
        if let Some(f) = finished {
            r.finished_at = Some(t(f));
            r.status = RunStatus::Succeeded;
        }
        r
    }

    /// Records replace runs whole, in log order: a replayed prefix
    /// followed by the rest ends where the writer ended.
    #[test]
    fn records_replace_runs_and_forget_removed_ones() {
        let mut runs = Runs::default();
        runs.fold(Record {
            runs: vec![run("a", None), run("b", None)],
            ..Record::default()
        });
        runs.fold(Record {
            runs: vec![run("a", Some(5))],
            removed: vec!["b".into()],
            ..Record::default()
        });
        assert_eq!(runs.len(), 1);
        assert_eq!(runs.active(), 0);
        assert!(runs.get("a").unwrap().is_finished());
        let back: Runs = serde_json::from_slice(&serde_json::to_vec(&runs).unwrap()).unwrap();
        assert_eq!(back.snap, runs.snap);
        assert_eq!(back.finished, runs.finished);
    }

    #[test]
    fn prune_forgets_the_oldest_finished_runs_only() {
        let mut runs = Runs::default();
        for (i, f) in [Some(10), Some(20), None, Some(30)].into_iter().enumerate() {
            runs.insert(run(&format!("r{i}"), f));
        }
        let now = DateTime::from_timestamp(1_800_000_000 + 100, 0).unwrap();
        // Retention 85 s: r0 (finished at +10) is past it.
        let gone = runs.prune(now, Duration::from_secs(85), 10);
        assert_eq!(gone, vec!["r0".to_owned()]);
        // At most one finished run: r1 goes, r3 (newest) and r2 (active) stay.
        let gone = runs.prune(now, Duration::from_secs(3600), 1);
        assert_eq!(gone, vec!["r1".to_owned()]);
        assert!(runs.contains("r2") && runs.contains("r3"));
        assert_eq!(
            runs.next_expiry(Duration::from_secs(10)),
            Some(DateTime::from_timestamp(1_800_000_000 + 40, 0).unwrap())
        );
        // A run that finishes through `update` is ordered with the rest.
        runs.update("r2", |r| r.finished_at = Some(now));
        assert_eq!(runs.active(), 0);
        let gone = runs.prune(now, Duration::from_secs(3600), 1);
        assert_eq!(gone, vec!["r3".to_owned()]);
    }
}
