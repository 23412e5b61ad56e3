//! One leader term of the fire loop. Its cost per wake-up grows with what is
//! due, not with the number of schedules:
//!
//! * the [`Agenda`] orders schedules by their next instant, so a wake-up
//!   takes off only the due ones;
//! * the ticks due together go out in transactions (up to
//!   [`fire::TX_TICKS`] each) with the log [`Record`] of the cursors they
//!   moved ([`crate::state`]): the broker takes the ticks and their record
//!   together or neither, so a successor never fires a tick again (on
//!   quorum queues with confirms and the record behind them: [`fire`]); a
//!   snapshot of every cursor is written once that log holds half a
//!   snapshot's size;
//! * a change to the schedule book re-plans only the schedule it names.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::options::BasicAckOptions;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use warren::amqp::{Pending, Publisher, Transaction};

use super::agenda::Agenda;
use super::clock::{self, Sample, Step, Track};
use super::{announce, plan_tick_guarded, MAX_SLEEP};
use crate::book::Change;
use crate::config::Schedule;
use crate::context::Ctx;
use crate::control;
use crate::leader::Fence;
use crate::schedule;
use crate::state::{self, Entry, Record, Tail};

mod fire;

/// A snapshot older than this is rewritten whatever the log's size.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(600);

/// Per-schedule state of the fire loop.
struct Cursor {
    /// Which instants are still to be decided.
    track: Track,
    last_fired: Option<DateTime<Utc>>,
    /// The expression it was computed for (a changed expression restarts at
    /// now); empty for a cursor resumed from the state, which adopts the
    /// expression in force.
    key: String,
    /// The definition `key` was last checked against: the same one again
    /// (every fire) needs no new key. A weak reference, so that a freed
    /// definition's address can never pass for it.
    checked: std::sync::Weak<Schedule>,
}

fn spec_key(s: &Schedule) -> String {
    format!(
        "{}|{}|{:?}|{:?}",
        s.cfg.cron, s.cfg.timezone, s.cfg.dst_gap, s.cfg.dst_overlap
    )
}

/// A tick to publish: schedule, instant and its task id.
struct Tick {
    schedule: Arc<Schedule>,
    at: DateTime<Utc>,
    id: String,
}

/// The ticks of one transaction and the record of the cursors they moved.
#[derive(Default)]
struct Chunk {
    ticks: Vec<Tick>,
    record: Record,
}

/// How a term ended (or a step of it).
pub(super) struct Fenced;

pub(super) struct Term<'a> {
    ctx: &'a Ctx,
    conn: &'a lapin::Connection,
    fence: &'a Fence,
    publisher: &'a Publisher,
    /// The ticks' transactional channels, opened when first needed and
    /// again after a failed commit.
    txs: Vec<Transaction>,
    state_queue: String,
    log: String,
    tail: Tail,
    cursors: HashMap<String, Cursor>,
    agenda: Agenda,
    sample: Sample,
    /// Log records appended since the last snapshot, their bytes, and when
    /// that was.
    unsnapshotted: u64,
    logged_bytes: usize,
    snapshot_at: Instant,
    /// Size of the last snapshot written (0 before the first).
    snapshot_bytes: usize,
    /// The catalog offset the last catalog snapshot covered, and when.
    catalog_snapshot: (Option<u64>, Instant),
    /// Schedules that got a fresh cursor since the last record: a
    /// successor must start them where this leader did, not at its own now
    /// (which would skip the instants in between).
    fresh: Vec<String>,
}

impl<'a> Term<'a> {
    /// Resume from the previous leaders' state and put every schedule in
    /// force on the agenda.
    pub(super) async fn start(
        ctx: &'a Ctx,
        conn: &'a lapin::Connection,
        fence: &'a Fence,
        publisher: &'a Publisher,
    ) -> anyhow::Result<Term<'a>> {
        let prefix = ctx.topo().prefix();
        let state_queue = warren::topology::producer::scheduler_snapshot(prefix);
        let log = warren::topology::producer::fires_log(prefix);
        let (previous, tail) =
            state::load::<state::Snapshot>(conn, publisher, &state_queue, &log, ctx.instance())
                .await?;
        if !previous.schedules.is_empty() {
            tracing::info!(
                writer = %previous.writer,
                schedules = previous.schedules.len(),
                "resuming from the previous leader's state"
            );
        }
        ctx.timetable().set_paused(previous.paused.clone());
        let sample = Sample::now();
        let cursors = previous
            .schedules
            .iter()
            .map(|(name, e)| {
                let c = Cursor {
                    track: Track::resumed(e.cursor, sample.wall),
                    last_fired: e.last_fired,
                    key: String::new(),
                    checked: std::sync::Weak::new(),
                };
                (name.clone(), c)
            })
            .collect();
        let mut term = Term {
            ctx,
            conn,
            fence,
            publisher,
            txs: Vec::new(),
            state_queue,
            log,
            tail,
            cursors,
            agenda: Agenda::default(),
            sample,
            unsnapshotted: 0,
            logged_bytes: 0,
            snapshot_at: Instant::now(),
            snapshot_bytes: 0,
            catalog_snapshot: (ctx.timetable().catalog().applied(), Instant::now()),
            fresh: Vec::new(),
        };
        term.resync(sample.wall);
        Ok(term)
    }

    /// Fire until the term ends: `Ok` on a lost lock or shutdown.
    pub(super) async fn run(
        mut self,
        shutdown: &CancellationToken,
        control: &mut lapin::Consumer,
    ) -> anyhow::Result<()> {
        let mut feed = self.ctx.timetable().book().subscribe();
        // Changes made between `start` and now.
        self.resync(Utc::now());
        let res = self.run_loop(shutdown, control, &mut feed).await;
        self.tail.close().await;
        for tx in self.txs.drain(..) {
            tx.close().await;
        }
        res
    }

    async fn run_loop(
        &mut self,
        shutdown: &CancellationToken,
        control: &mut lapin::Consumer,
        feed: &mut tokio::sync::broadcast::Receiver<Change>,
    ) -> anyhow::Result<()> {
        loop {
            if self.compact_catalog().await.is_err() || self.record_fresh().await.is_err() {
                return Ok(());
            }
            let lead = self.stage_lead();
            let sleep = self
                .agenda
                .next_at()
                .map(|w| {
                    (w - Utc::now())
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .saturating_sub(lead)
                })
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                change = feed.recv() => {
                    let now = self.observe_clock();
                    match change {
                        Ok(Change::One(name)) => self.place_named(&name, now),
                        Ok(Change::All) | Err(RecvError::Lagged(_)) => {
                            tracing::debug!("many schedules changed: re-planning all");
                            self.resync(now);
                        }
                        Err(RecvError::Closed) => return Ok(()),
                    }
                    continue;
                }
                r = control::next::<control::Request>(control) => {
                    let Some((delivery, req)) = r else {
                        anyhow::bail!("the control queue consumer ended");
                    };
                    if let Some(req) = req {
                        if self.apply_control(req).await.is_err() {
                            return Ok(());
                        }
                    }
                    delivery.acker.ack(BasicAckOptions::default()).await?;
                    continue;
                }
                _ = self.fence.lost() => return Ok(()),
                _ = shutdown.cancelled() => return Ok(()),
            }
            super::fault::term();
            let now = self.observe_clock();
            if self.wake(now).await.is_err() {
                return Ok(());
            }
            if self.compact_due() && self.compact().await.is_err() {
                return Ok(());
            }
        }
    }

    /// Put every schedule of the book on the agenda, and forget cursors of
    /// schedules no longer in it (start, reload, a lagging change feed).
    fn resync(&mut self, now: DateTime<Utc>) {
        let book = self.ctx.timetable().book().all();
        let names: std::collections::HashSet<&str> = book
            .iter()
            .filter(|s| s.cfg.enabled)
            .map(|s| s.name())
            .collect();
        self.cursors.retain(|n, _| names.contains(n.as_str()));
        self.agenda.clear();
        for s in &book {
            self.place(s, now);
        }
    }

    /// Re-plan the schedule `name` after a change to it.
    fn place_named(&mut self, name: &str, now: DateTime<Utc>) {
        match self.ctx.timetable().book().get(name) {
            Some(s) => self.place(&s, now),
            None => {
                self.cursors.remove(name);
                self.agenda.remove(name);
            }
        }
    }

    /// Align the cursor of `s` with its definition and put it on the agenda
    /// at its next instant (off it while disabled or paused).
    fn place(&mut self, s: &Arc<Schedule>, now: DateTime<Utc>) {
        let name = s.name();
        if !s.cfg.enabled {
            self.cursors.remove(name);
            self.agenda.remove(name);
            return;
        }
        match self.cursors.get_mut(name) {
            Some(c) if std::ptr::eq(c.checked.as_ptr(), Arc::as_ptr(s)) => {}
            Some(c) => {
                let key = spec_key(s);
                if !c.key.is_empty() && c.key != key {
                    c.track.advance(now);
                }
                c.key = key;
                c.checked = Arc::downgrade(s);
            }
            None => {
                let c = Cursor {
                    track: Track::fresh(now),
                    last_fired: None,
                    key: spec_key(s),
                    checked: Arc::downgrade(s),
                };
                self.cursors.insert(name.to_owned(), c);
                self.fresh.push(name.to_owned());
            }
        }
        if self.ctx.timetable().is_paused(name) {
            self.agenda.remove(name);
            self.ctx.timetable().set_next(name, None);
            return;
        }
        let Some(c) = self.cursors.get(name) else {
            return;
        };
        // A panic here is reported (and counted) by `plan_tick_guarded` at
        // a wake-up a second later, not in a tight loop.
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.track.next(&s.spec)))
            .unwrap_or(Some(now + chrono::TimeDelta::seconds(1)));
        self.ctx.timetable().set_next(name, next);
        self.agenda.set(name, next);
    }

    /// Read the clocks; on a wall-clock step apply the rules of [`clock`]
    /// and say so. Returns the wall-clock now.
    fn observe_clock(&mut self) -> DateTime<Utc> {
        let now = Sample::now();
        match clock::detect(self.sample, now) {
            Step::None => {}
            Step::Backward(d) => {
                tracing::warn!(
                    step_ms = d.as_millis() as u64,
                    "wall clock stepped back: schedules fire from the new time on; instants already fired are not fired again"
                );
                for c in self.cursors.values_mut() {
                    c.track.stepped_back(now.wall);
                }
                self.sample = now;
                self.resync(now.wall);
            }
            Step::Forward(d) => tracing::warn!(
                step_ms = d.as_millis() as u64,
                "wall clock stepped forward: the instants jumped over are overdue and follow each schedule's misfire policy"
            ),
        }
        self.sample = now;
        now.wall
    }

    /// Decide every schedule due at `now`, publish the ticks that fire,
    /// record the cursors, and put the schedules back on the agenda.
    async fn wake(&mut self, now: DateTime<Utc>) -> Result<(), Fenced> {
        let (now, hold) = self.staged_instant(now);
        let due = self.agenda.pop_due(now);
        if due.is_empty() {
            return Ok(());
        }
        let (chunks, decided) = self.plan_due(due, now);
        let res = self.fire_all(&chunks, hold).await;
        for s in &decided {
            self.place(s, now);
        }
        res
    }

    /// The instant a wake-up decides for, and until when its commits wait:
    /// woken [`fire::STAGE_LEAD`] ahead of the next instant, its ticks are
    /// planned and staged as at that instant, and committed then.
    fn staged_instant(
        &mut self,
        now: DateTime<Utc>,
    ) -> (DateTime<Utc>, Option<tokio::time::Instant>) {
        let lead = self.stage_lead();
        let ahead = self
            .agenda
            .next_at()
            .filter(|w| *w > now)
            .and_then(|w| (w - now).to_std().ok().map(|d| (w, d)))
            .filter(|(_, d)| *d <= lead);
        match ahead {
            Some((w, d)) => (w, Some(tokio::time::Instant::now() + d)),
            None => (now, None),
        }
    }

    /// Plan the ticks of every schedule in `due` as at `now`, in chunks that
    /// each carry the record of the cursors they move, and the schedules
    /// decided (to put back on the agenda).
    fn plan_due(
        &mut self,
        due: Vec<Arc<str>>,
        now: DateTime<Utc>,
    ) -> (Vec<Chunk>, Vec<Arc<Schedule>>) {
        let chunk_ticks = if self.transactional() {
            fire::TX_TICKS
        } else {
            usize::MAX
        };
        let mut chunks = vec![Chunk::default()];
        let mut decided = Vec::with_capacity(due.len());
        for name in due {
            let Some(s) = self.ctx.timetable().book().get(&name) else {
                self.cursors.remove(&*name);
                continue;
            };
            if !s.cfg.enabled || self.ctx.timetable().is_paused(&name) {
                continue;
            }
            let Some(c) = self.cursors.get_mut(&*name) else {
                continue;
            };
            if chunks.last().is_some_and(|k| k.ticks.len() >= chunk_ticks) {
                chunks.push(Chunk::default());
            }
            let Some(chunk) = chunks.last_mut() else {
                continue;
            };
            let plan = match plan_tick_guarded(self.ctx, &s, &c.track, now) {
                Ok(Some(t)) => t,
                Ok(None) => {
                    decided.push(s);
                    continue;
                }
                Err(()) => {
                    c.track.advance(now);
                    chunk.record.entries.insert(name.to_string(), entry(c));
                    decided.push(s);
                    continue;
                }
            };
            let (p, latest) = (plan.plan, plan.latest);
            if p.missed > 0 {
                tracing::warn!(
                    schedule = s.name(),
                    missed = p.missed,
                    firing = p.fire.len(),
                    policy = ?s.cfg.misfire,
                    "overdue fires handled by the misfire policy"
                );
                self.ctx.metrics().missed(s.name(), p.missed);
            }
            // The cursor as it will be once these ticks are committed: the
            // record goes out in the same transaction.
            c.track.advance(latest);
            if let Some(last) = p.fire.last() {
                c.last_fired = Some(*last);
            }
            chunk.record.entries.insert(name.to_string(), entry(c));
            for at in p.fire {
                chunk.ticks.push(Tick {
                    id: schedule::fire_id(s.name(), at),
                    schedule: s.clone(),
                    at,
                });
            }
            decided.push(s);
        }
        (chunks, decided)
    }

    /// How early ticks are staged ahead of their instant: only in
    /// transactions (a confirm-mode publish is visible at once).
    fn stage_lead(&self) -> Duration {
        if self.transactional() {
            fire::STAGE_LEAD
        } else {
            Duration::ZERO
        }
    }

    /// Apply a pause, resume or sync request: append it to the log
    /// (confirmed) before telling anyone, then announce it. A resumed
    /// schedule restarts at now: the instants it was paused over are
    /// skipped, not caught up.
    async fn apply_control(&mut self, req: control::Request) -> Result<(), Fenced> {
        let ctx = self.ctx;
        let before = ctx.timetable().paused();
        let book = ctx.timetable().book();
        let next = match control::apply(&before, &req, |n| book.contains(n)) {
            Ok(next) => next,
            Err(why) => {
                announce(ctx, self.publisher, Some(req.id), Some(why)).await;
                return Ok(());
            }
        };
        if next == before {
            announce(ctx, self.publisher, Some(req.id), None).await;
            return Ok(());
        }
        let now = self.observe_clock();
        let record = Record {
            paused: next.difference(&before).cloned().collect(),
            resumed: before.difference(&next).cloned().collect(),
            ..Record::default()
        };
        if !self.fence.holds() {
            return Err(Fenced);
        }
        let logged = async { self.append(&record).await?.confirmed().await };
        if let Err(e) = logged.await {
            tracing::warn!(error = %e, "could not record a pause or resume in the scheduler state");
            let why = format!("the leader could not record it: {e}");
            announce(ctx, self.publisher, Some(req.id), Some(why)).await;
            return if self.publisher.is_open() && self.fence.holds() {
                Ok(())
            } else {
                Err(Fenced)
            };
        }
        self.unsnapshotted += 1;
        ctx.timetable().set_paused(next);
        for name in record.paused.iter().chain(&record.resumed) {
            if record.resumed.contains(name) {
                if let Some(c) = self.cursors.get_mut(name) {
                    c.track.advance(now);
                }
            }
            self.place_named(name, now);
        }
        tracing::info!(op = ?req.op, schedule = req.schedule.as_deref().unwrap_or(""), "schedule pause state recorded");
        announce(ctx, self.publisher, Some(req.id), None).await;
        Ok(())
    }

    /// The leader keeps the catalog's snapshot current (every replica
    /// starts from it): rewritten when the log grew, at most every
    /// `scheduler.compact_every`.
    async fn compact_catalog(&mut self) -> Result<(), Fenced> {
        let applied = self.ctx.timetable().catalog().applied();
        let (covered, at) = self.catalog_snapshot;
        if applied == covered || at.elapsed() < self.ctx.cfg().scheduler.compact_every {
            return Ok(());
        }
        if !self.fence.holds() {
            return Err(Fenced);
        }
        let prefix = self.ctx.topo().prefix();
        match crate::catalog::compact(self.ctx.timetable().catalog(), self.publisher, prefix).await
        {
            Ok(()) => self.catalog_snapshot = (applied, Instant::now()),
            Err(e) => {
                tracing::warn!(error = %e, "could not write the schedule catalog snapshot");
                self.catalog_snapshot.1 = Instant::now();
            }
        }
        Ok(())
    }

    /// Append the cursors of schedules that started here since the last
    /// record (one record, confirmed).
    async fn record_fresh(&mut self) -> Result<(), Fenced> {
        if self.fresh.is_empty() {
            return Ok(());
        }
        let mut record = Record::default();
        for name in self.fresh.drain(..) {
            if let Some(c) = self.cursors.get(&name) {
                record.entries.insert(name, entry(c));
            }
        }
        if record.is_empty() {
            return Ok(());
        }
        if !self.fence.holds() {
            return Err(Fenced);
        }
        let logged = async { self.append(&record).await?.confirmed().await };
        match logged.await {
            Ok(()) => self.unsnapshotted += 1,
            Err(e) => {
                tracing::warn!(error = %e, "could not record the cursors of new schedules");
                if !self.publisher.is_open() || !self.fence.holds() {
                    return Err(Fenced);
                }
            }
        }
        Ok(())
    }

    /// Append `record` to the log, counting its bytes.
    async fn append(&mut self, record: &Record) -> Result<Pending, warren::Error> {
        let body = serde_json::to_vec(record).unwrap_or_default();
        self.logged_bytes += body.len();
        state::send_raw(self.publisher, &self.log, &body).await
    }

    /// A snapshot is rewritten once the log since the last one holds half
    /// its size (and `compact_every` passed): the work of compacting is then
    /// at most twice the bytes appended, whatever the number of schedules,
    /// and a new leader reads at most one and a half snapshots' worth.
    fn compact_due(&self) -> bool {
        let age = self.snapshot_at.elapsed();
        self.unsnapshotted > 0
            && age >= self.ctx.cfg().scheduler.compact_every
            && (self.logged_bytes * 2 >= self.snapshot_bytes || age >= SNAPSHOT_MAX_AGE)
    }

    /// Write every cursor as one snapshot covering the log up to what the
    /// tail has seen (all of it was appended before this snapshot's state).
    async fn compact(&mut self) -> Result<(), Fenced> {
        let offset = self.tail.offset();
        let paused = self.ctx.timetable().paused();
        let snap = state::SnapshotRef {
            v: 3,
            writer: self.ctx.instance(),
            written_at: Some(Utc::now()),
            schedules: Entries(&self.cursors),
            paused: &paused,
            offset: Some(offset),
        };
        let body = serde_json::to_vec(&snap).unwrap_or_default();
        if !self.fence.holds() {
            return Err(Fenced);
        }
        let sent = async {
            state::send_raw(self.publisher, &self.state_queue, &body)
                .await?
                .confirmed()
                .await
        };
        match sent.await {
            Ok(()) => {
                self.unsnapshotted = 0;
                self.logged_bytes = 0;
                self.snapshot_bytes = body.len();
                self.snapshot_at = Instant::now();
                tracing::debug!(
                    schedules = self.cursors.len(),
                    bytes = body.len(),
                    offset,
                    "scheduler state compacted"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not write the scheduler snapshot");
                // Try again at the next wake-up, not in a loop.
                self.snapshot_at = Instant::now();
                if self.publisher.is_open() && self.fence.holds() {
                    Ok(())
                } else {
                    Err(Fenced)
                }
            }
        }
    }
}

/// Every cursor, serialized as the snapshot's map without copying it.
struct Entries<'a>(&'a HashMap<String, Cursor>);

impl serde::Serialize for Entries<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, c)| (k, entry(c))))
    }
}

/// What the state records of a cursor. After a backward clock step the
/// cursor sits below instants already fired: a successor must not fire
/// those again, hence the high-water mark.
fn entry(c: &Cursor) -> Entry {
    Entry {
        cursor: c.track.high_water(),
        last_fired: c.last_fired,
    }
}
