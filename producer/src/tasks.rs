//! The task index every replica keeps: the events stream `<prefix>.events`
//! (see [`warren::events`]) read from the start of its retention when the
//! replica connects, then live, into a bounded in-memory map of recent
//! tasks answering `GET /v1/tasks...`, the CLI and the console — on a
//! standby as on the leader (docs/tasks.md).
//!
//! Memory per task is kept small: names, queues, consumers and dead kinds
//! are interned (a `u32` each), a canonical UUID id and the trace id are
//! 16 raw bytes each, the first attempt is inline (more: one exact
//! allocation), and a ring of slots in first-seen order is the eviction
//! order, with a hash table of slot numbers (no second copy of the id) to
//! find them.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::RwLock;

use chrono::{DateTime, Utc};
use hashbrown::HashTable;
use serde::Serialize;
use warren::events::{Batch, Event, Source, What, Worker, WORKER_TTL};

/// Stream messages a replica has in flight while it reads: each holds up
/// to 1,000 events (about 110 KiB), so 64 keep the broker ahead of the
/// fold (a rebuild is bound by decoding and folding, not by the wire)
/// while buffering at most ~7 MiB, where 1,000 buffered up to 110 MiB
/// during a rebuild.
const READ_PREFETCH: u16 = 64;

/// Read the events stream into `index`: from after its last offset, from
/// the start of retention without one. `None` when the stream cannot be
/// read (missing, refused); the caller tries again later.
pub async fn follow(
    conn: &lapin::Connection,
    stream: &str,
    index: &Index,
) -> Option<(lapin::Channel, lapin::Consumer)> {
    let tag = format!("warren-producer-tasks.{}", uuid::Uuid::new_v4().simple());
    match crate::state::consume_log(conn, stream, &tag, index.offset(), READ_PREFETCH).await {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::debug!(error = %e, stream, "cannot read the task events stream; trying again later");
            None
        }
    }
}

/// Fold one delivery of the stream in.
pub fn apply_delivery(index: &Index, d: &lapin::message::Delivery) {
    let offset = crate::state::stream_offset(d);
    match warren::events::parse(&d.data) {
        Some(batch) => index.apply(&batch, offset),
        None => {
            tracing::debug!(?offset, "unreadable task events message; skipped");
            index.apply(
                &Batch {
                    v: 1,
                    role: String::new(),
                    instance: String::new(),
                    host: String::new(),
                    events: Vec::new(),
                    worker: None,
                },
                offset,
            );
        }
    }
}

/// `warren_events_index_*`.
#[derive(Clone)]
pub struct IndexMetrics {
    pub tasks: prometheus::IntGauge,
    pub newest_age: prometheus::Gauge,
}

impl IndexMetrics {
    pub fn register(r: &prometheus::Registry) -> prometheus::Result<Self> {
        let m = Self {
            tasks: prometheus::IntGauge::new(
                "warren_events_index_tasks",
                "Tasks in this replica's task index",
            )?,
            newest_age: prometheus::Gauge::new(
                "warren_events_index_newest_age_seconds",
                "Age of the newest event in this replica's task index (-1: none yet)",
            )?,
        };
        r.register(Box::new(m.tasks.clone()))?;
        r.register(Box::new(m.newest_age.clone()))?;
        m.newest_age.set(-1.0);
        Ok(m)
    }

    /// Refresh from `index` (the connection loop calls it often).
    pub fn update(&self, index: &Index) {
        self.tasks.set(index.len() as i64);
        if let Some(t) = index.newest() {
            let age = (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0;
            self.newest_age.set(age);
        }
    }
}

/// A task's state as the index tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Published,
    Running,
    Retrying,
    Succeeded,
    Dead,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Published => "published",
            State::Running => "running",
            State::Retrying => "retrying",
            State::Succeeded => "succeeded",
            State::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "published" => State::Published,
            "running" => State::Running,
            "retrying" => State::Retrying,
            "succeeded" => State::Succeeded,
            "dead" => State::Dead,
            _ => return None,
        })
    }

    pub const ALL: &'static [&'static str] =
        &["published", "running", "retrying", "succeeded", "dead"];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum AttemptState {
    Running,
    Succeeded,
    Retried,
    Dead,
    Requeued,
}

impl AttemptState {
    fn as_str(self) -> &'static str {
        match self {
            AttemptState::Running => "running",
            AttemptState::Succeeded => "succeeded",
            AttemptState::Retried => "retried",
            AttemptState::Dead => "dead",
            AttemptState::Requeued => "requeued",
        }
    }
}

const NONE: u32 = u32::MAX;

/// One attempt, compact.
#[derive(Debug, Clone)]
struct Attempt {
    /// Unix ms (0: the start was not heard).
    start: i64,
    /// Error (retried), reason (dead) or why (requeued).
    text: Option<Box<str>>,
    consumer: u32,
    /// Dead kind (interned).
    kind: u32,
    duration_ms: u32,
    number: u16,
    outcome: AttemptState,
}

/// A task id: a canonical UUID (what warren's producers and most
/// clients give) in 16 bytes instead of a 36-byte allocation; any other
/// id as text.
#[derive(Debug, Clone)]
enum TaskId {
    Uuid([u8; 16]),
    Text(Box<str>),
}

/// An id to look up or hash: the same for a string and its stored form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key<'a> {
    Uuid([u8; 16]),
    Text(&'a str),
}

impl<'a> Key<'a> {
    fn of(id: &'a str) -> Self {
        match canonical_uuid(id) {
            Some(b) => Key::Uuid(b),
            None => Key::Text(id),
        }
    }
}

impl TaskId {
    fn new(key: Key<'_>) -> Self {
        match key {
            Key::Uuid(b) => TaskId::Uuid(b),
            Key::Text(t) => TaskId::Text(t.into()),
        }
    }

    fn key(&self) -> Key<'_> {
        match self {
            TaskId::Uuid(b) => Key::Uuid(*b),
            TaskId::Text(t) => Key::Text(t),
        }
    }
}

impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskId::Uuid(b) => uuid::Uuid::from_bytes(*b).hyphenated().fmt(f),
            TaskId::Text(t) => f.write_str(t),
        }
    }
}

/// The 16 bytes of `id` when it is a UUID written exactly as it would be
/// printed back (lowercase, hyphenated): only then is the compact form
/// the same id.
fn canonical_uuid(id: &str) -> Option<[u8; 16]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let b = id.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let (mut i, mut n) = (0, 0);
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        out[n] = (nibble(b[i])? << 4) | nibble(b[i + 1])?;
        n += 1;
        i += 2;
    }
    Some(out)
}

/// A task's attempts: the usual one inline, more in one exact allocation.
#[derive(Debug, Clone)]
enum Attempts {
    One(Attempt),
    /// Empty (no allocation) before the first attempt.
    Many(Box<[Attempt]>),
}

impl Attempts {
    fn as_slice(&self) -> &[Attempt] {
        match self {
            Attempts::One(a) => std::slice::from_ref(a),
            Attempts::Many(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Attempt] {
        match self {
            Attempts::One(a) => std::slice::from_mut(a),
            Attempts::Many(v) => v,
        }
    }

    fn insert(&mut self, i: usize, a: Attempt) {
        // Exactly as long as needed: a `Vec` grown by `insert` would
        // allocate room for four and shrink, leaving holes behind.
        let old = self.as_slice();
        let mut v = Vec::with_capacity(old.len() + 1);
        v.extend_from_slice(&old[..i]);
        v.push(a);
        v.extend_from_slice(&old[i..]);
        *self = if v.len() == 1 {
            match v.pop() {
                Some(a) => Attempts::One(a),
                None => Attempts::Many(Box::new([])),
            }
        } else {
            Attempts::Many(v.into_boxed_slice())
        };
    }
}

#[derive(Debug, Clone)]
struct Entry {
    id: TaskId,
    attempts: Attempts,
    /// What few tasks have, out of line.
    extra: Option<Box<Extra>>,
    published_at: i64,
    /// The last event's instant.
    updated: i64,
    trace: [u8; 16],
    name: u32,
    queue: u32,
    source: Option<Source>,
}

/// The rarer parts of an entry: 16 bytes a task saved where they are absent.
#[derive(Debug, Clone, Default)]
struct Extra {
    /// JSON text of a kept result.
    result: Option<Box<str>>,
    /// When the next attempt is due (retrying).
    next_at: i64,
}

/// Strings stored once, named by number.
#[derive(Default)]
struct Interner {
    by_text: HashMap<Box<str>, u32>,
    texts: Vec<Box<str>>,
}

impl Interner {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.by_text.get(s) {
            return i;
        }
        let i = u32::try_from(self.texts.len()).unwrap_or(NONE);
        self.texts.push(s.into());
        self.by_text.insert(s.into(), i);
        i
    }

    fn find(&self, s: &str) -> Option<u32> {
        self.by_text.get(s).copied()
    }

    fn get(&self, i: u32) -> Option<&str> {
        self.texts.get(i as usize).map(|s| &**s)
    }
}

#[derive(Default)]
struct Inner {
    /// Slot numbers, hashed by their entry's id.
    table: HashTable<u32>,
    /// Ring of slots in first-seen order; `head` is the next to fill.
    slots: Vec<Option<Entry>>,
    head: usize,
    len: usize,
    hasher: std::collections::hash_map::RandomState,
    names: Interner,
    /// Queues, consumers and dead kinds.
    words: Interner,
    workers: HashMap<String, Worker>,
    /// Unix ms of the newest event applied.
    newest: i64,
    offset: Option<u64>,
}

/// See the module docs.
pub struct Index {
    cap: usize,
    inner: RwLock<Inner>,
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskView {
    pub id: String,
    pub name: String,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// While retrying: when the next attempt is due.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub attempts: Vec<AttemptView>,
    /// Kept only for task names the consumers' `results` list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AttemptView {
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// `running`, `succeeded`, `retried`, `dead` or `requeued`.
    pub outcome: &'static str,
    /// The error (retried), the reason (dead) or why (requeued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it was dead-lettered (`failed`, `exhausted`, `no_handler`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// `GET /v1/tasks` filters.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// A task name, or a topic pattern (`email.*`, `report.#`).
    pub name: Option<String>,
    pub state: Option<State>,
    /// Tasks updated at or after this.
    pub since: Option<DateTime<Utc>>,
    pub limit: usize,
}

fn ms(t: i64) -> Option<DateTime<Utc>> {
    (t != 0)
        .then(|| DateTime::from_timestamp_millis(t))
        .flatten()
}

impl Entry {
    fn state(&self) -> State {
        match self.attempts.as_slice().iter().max_by_key(|a| a.number) {
            None => State::Published,
            Some(a) => match a.outcome {
                AttemptState::Running => State::Running,
                AttemptState::Succeeded => State::Succeeded,
                AttemptState::Retried => State::Retrying,
                AttemptState::Dead => State::Dead,
                AttemptState::Requeued => State::Published,
            },
        }
    }

    /// What every event of the task says: its name, queue, trace, time.
    fn describe(&mut self, ev: &Event, name: u32, queue: Option<u32>) {
        if self.name == NONE {
            self.name = name;
        }
        if let Some(q) = queue {
            self.queue = q;
        }
        if self.trace == [0; 16] {
            if let Some(t) = &ev.trace {
                let _ = hex::decode_to_slice(t, &mut self.trace);
            }
        }
        self.updated = self.updated.max(ev.at);
    }

    /// What event `ev` changes in the task's attempts (`consumer`: the
    /// interned instance that sent it; `kind`: the interned dead kind).
    fn fold(&mut self, ev: &Event, consumer: u32, kind: u32) {
        match &ev.what {
            What::Published { source } => {
                self.published_at = ev.at;
                self.source = Some(*source);
            }
            What::Started { attempt } => {
                let a = self.attempt(*attempt, ev.at);
                // A redelivery of a requeued attempt runs it again; a
                // late start of a finished one changes nothing.
                if a.outcome == AttemptState::Requeued && ev.at >= a.start {
                    a.outcome = AttemptState::Running;
                    a.text = None;
                }
                if a.outcome == AttemptState::Running {
                    a.start = ev.at;
                    a.consumer = consumer;
                }
            }
            What::Retried {
                attempt,
                error,
                next_at,
                ..
            } => {
                let a = self.attempt(*attempt, ev.at);
                a.duration_ms = u32::try_from(ev.at - a.start).unwrap_or(0);
                a.outcome = AttemptState::Retried;
                a.text = Some(error.as_str().into());
                a.consumer = consumer;
                self.extra.get_or_insert_default().next_at = *next_at;
            }
            What::Succeeded {
                attempt,
                duration_ms,
                result,
            } => {
                let a = self.attempt(*attempt, ev.at);
                a.duration_ms = u32::try_from(*duration_ms).unwrap_or(u32::MAX);
                a.outcome = AttemptState::Succeeded;
                a.consumer = consumer;
                if let Some(r) = result {
                    self.extra.get_or_insert_default().result = Some(r.to_string().into());
                }
            }
            What::Dead {
                attempt, reason, ..
            } => {
                let a = self.attempt(*attempt, ev.at);
                if a.start != ev.at && a.outcome == AttemptState::Running {
                    a.duration_ms = u32::try_from(ev.at - a.start).unwrap_or(0);
                }
                a.outcome = AttemptState::Dead;
                a.text = Some(reason.as_str().into());
                a.kind = kind;
                if consumer != NONE {
                    a.consumer = consumer;
                }
            }
            What::Requeued { attempt, why } => {
                let a = self.attempt(*attempt, ev.at);
                if a.outcome == AttemptState::Running && ev.at >= a.start {
                    a.outcome = AttemptState::Requeued;
                    a.text = Some(why.as_str().into());
                }
            }
        }
    }

    /// The attempt numbered `n`, added when new (kept sorted).
    fn attempt(&mut self, n: u32, at: i64) -> &mut Attempt {
        let n = u16::try_from(n).unwrap_or(u16::MAX);
        let pos = match self
            .attempts
            .as_slice()
            .binary_search_by_key(&n, |a| a.number)
        {
            Ok(i) => i,
            Err(i) => {
                self.attempts.insert(
                    i,
                    Attempt {
                        start: at,
                        text: None,
                        consumer: NONE,
                        kind: NONE,
                        duration_ms: 0,
                        number: n,
                        outcome: AttemptState::Running,
                    },
                );
                i
            }
        };
        &mut self.attempts.as_mut_slice()[pos]
    }
}

impl Index {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            inner: RwLock::new(Inner::default()),
        }
    }

    /// Fold one stream message in.
    pub fn apply(&self, batch: &Batch, offset: Option<u64>) {
        let Ok(mut g) = self.inner.write() else {
            return;
        };
        let inner = &mut *g;
        if offset.is_some() {
            inner.offset = offset;
        }
        if let Some(w) = &batch.worker {
            inner.hear_worker(w);
        }
        let consumer = if batch.role == "consumer" {
            inner.words.id(&batch.instance)
        } else {
            NONE
        };
        for ev in &batch.events {
            inner.newest = inner.newest.max(ev.at);
            let name = inner.names.id(&ev.name);
            let queue = ev.queue.as_deref().map(|q| inner.words.id(q));
            let kind = match &ev.what {
                What::Dead { kind, .. } => inner.words.id(kind),
                _ => NONE,
            };
            let slot = inner.slot_of(&ev.id, self.cap);
            let Some(e) = inner.slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            e.describe(ev, name, queue);
            e.fold(ev, consumer, kind);
        }
    }

    pub fn get(&self, id: &str) -> Option<TaskView> {
        let g = self.inner.read().ok()?;
        let slot = g.find(Key::of(id))?;
        g.slots.get(slot)?.as_ref().map(|e| g.view(e))
    }

    /// Recent tasks matching `q`, the most recently first seen first.
    pub fn list(&self, q: &Query) -> Vec<TaskView> {
        let Ok(g) = self.inner.read() else {
            return Vec::new();
        };
        let exact = q
            .name
            .as_deref()
            .filter(|n| !n.contains(['*', '#']))
            .map(|n| g.names.find(n));
        if exact == Some(None) {
            return Vec::new();
        }
        let since = q.since.map(|t| t.timestamp_millis()).unwrap_or(i64::MIN);
        let n = g.slots.len();
        let mut out = Vec::new();
        for k in 1..=n {
            if out.len() >= q.limit {
                break;
            }
            let i = (g.head + n - k) % n;
            let Some(e) = &g.slots[i] else { continue };
            if e.updated < since {
                continue;
            }
            match (exact, q.name.as_deref()) {
                (Some(Some(id)), _) if e.name != id => continue,
                (None, Some(p)) => {
                    let name = g.names.get(e.name).unwrap_or("");
                    if !warren::topology::pattern_matches(p, name) {
                        continue;
                    }
                }
                _ => {}
            }
            if q.state.is_some_and(|s| s != e.state()) {
                continue;
            }
            out.push(g.view(e));
        }
        out
    }

    /// Consumers heard within [`WORKER_TTL`] of `now`.
    pub fn workers(&self, now: DateTime<Utc>) -> Vec<Worker> {
        let Ok(g) = self.inner.read() else {
            return Vec::new();
        };
        let cutoff = now.timestamp_millis() - WORKER_TTL.as_millis() as i64;
        let mut out: Vec<Worker> = g
            .workers
            .values()
            .filter(|w| w.at >= cutoff)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.instance.cmp(&b.instance));
        out
    }

    pub fn len(&self) -> usize {
        self.inner.read().map(|g| g.len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The newest event's instant.
    pub fn newest(&self) -> Option<DateTime<Utc>> {
        self.inner.read().ok().and_then(|g| ms(g.newest))
    }

    /// The last stream offset applied.
    pub fn offset(&self) -> Option<u64> {
        self.inner.read().ok().and_then(|g| g.offset)
    }

    /// Forget the offset (the stream was deleted: a new one starts at 0).
    pub fn reset_offset(&self) {
        if let Ok(mut g) = self.inner.write() {
            g.offset = None;
        }
    }
}

impl Inner {
    /// A consumer's announcement.
    fn hear_worker(&mut self, w: &Worker) {
        self.newest = self.newest.max(w.at);
        // Restarted consumers come back as new instances: forget the
        // long silent ones.
        let forget = w.at - 60 * WORKER_TTL.as_millis() as i64;
        self.workers.retain(|_, old| old.at >= forget);
        self.workers.insert(w.instance.clone(), w.clone());
    }

    fn hash(&self, key: Key<'_>) -> u64 {
        self.hasher.hash_one(key)
    }

    fn find(&self, key: Key<'_>) -> Option<usize> {
        let h = self.hash(key);
        let slots = &self.slots;
        self.table
            .find(h, |&s| {
                slots
                    .get(s as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|e| e.id.key() == key)
            })
            .map(|&s| s as usize)
    }

    /// The slot of `id`, taking the oldest slot when new.
    fn slot_of(&mut self, id: &str, cap: usize) -> usize {
        let key = Key::of(id);
        if let Some(s) = self.find(key) {
            return s;
        }
        // Filling up, slots are pushed; full, `head` (the oldest) goes round.
        let slot = if self.slots.len() < cap {
            self.slots.push(None);
            self.slots.len() - 1
        } else {
            let s = self.head;
            self.head = (s + 1) % cap;
            s
        };
        if let Some(old) = self.slots[slot].take() {
            let h = self.hash(old.id.key());
            if let Ok(found) = self.table.find_entry(h, |&s| s as usize == slot) {
                found.remove();
            }
            self.len -= 1;
        }
        self.slots[slot] = Some(Entry {
            id: TaskId::new(key),
            attempts: Attempts::Many(Box::new([])),
            extra: None,
            published_at: 0,
            updated: 0,
            trace: [0; 16],
            name: NONE,
            queue: NONE,
            source: None,
        });
        self.len += 1;
        let h = self.hash(key);
        let hasher = &self.hasher;
        let slots = &self.slots;
        self.table.insert_unique(h, slot as u32, |&s| {
            slots
                .get(s as usize)
                .and_then(Option::as_ref)
                .map(|e| hasher.hash_one(e.id.key()))
                .unwrap_or(0)
        });
        slot
    }

    fn view(&self, e: &Entry) -> TaskView {
        let state = e.state();
        TaskView {
            id: e.id.to_string(),
            name: self.names.get(e.name).unwrap_or("").to_owned(),
            state,
            queue: self.words.get(e.queue).map(str::to_owned),
            source: e.source.map(Source::as_str),
            published_at: ms(e.published_at),
            updated_at: ms(e.updated),
            next_attempt_at: (state == State::Retrying)
                .then(|| e.extra.as_ref().and_then(|x| ms(x.next_at)))
                .flatten(),
            trace_id: (e.trace != [0; 16]).then(|| hex::encode(e.trace)),
            attempts: e
                .attempts
                .as_slice()
                .iter()
                .map(|a| AttemptView {
                    attempt: u32::from(a.number),
                    consumer: self.words.get(a.consumer).map(str::to_owned),
                    started_at: ms(a.start),
                    duration_ms: (a.outcome != AttemptState::Running
                        && a.outcome != AttemptState::Requeued)
                        .then_some(u64::from(a.duration_ms)),
                    outcome: a.outcome.as_str(),
                    error: a.text.as_deref().map(str::to_owned),
                    kind: self.words.get(a.kind).map(str::to_owned),
                })
                .collect(),
            result: e
                .extra
                .as_ref()
                .and_then(|x| x.result.as_deref())
                .and_then(|r| serde_json::from_str(r).ok()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use warren::events::Event;

    fn batch(role: &str, events: Vec<Event>) -> Batch {
        Batch {
            v: 1,
            role: role.into(),
            instance: format!("{role}-1"),
            host: "h".into(),
            events,
            worker: None,
        }
    }

    fn ev(id: &str, at: i64, what: What) -> Event {
        let mut e = Event::new(id, "email.send", what).queue("warren.default");
        e.at = at;
        e
    }

    #[test]
    fn a_retry_then_success_in_any_order() {
        let idx = Index::new(10);
        let consumer = vec![
            ev("a", 2, What::Started { attempt: 1 }),
            ev(
                "a",
                3,
                What::Retried {
                    attempt: 1,
                    error: "boom".into(),
                    delay_ms: 100,
                    next_at: 103,
                },
            ),
        ];
        idx.apply(&batch("consumer", consumer), Some(1));
        let t = idx.get("a").unwrap();
        assert_eq!(t.state, State::Retrying);
        assert_eq!(t.next_attempt_at, ms(103));
        // The producer's batch arrives late: the state stays.
        idx.apply(
            &batch(
                "producer",
                vec![ev(
                    "a",
                    1,
                    What::Published {
                        source: Source::Api,
                    },
                )],
            ),
            Some(2),
        );
        idx.apply(
            &batch(
                "consumer",
                vec![
                    ev("a", 104, What::Started { attempt: 2 }),
                    ev(
                        "a",
                        110,
                        What::Succeeded {
                            attempt: 2,
                            duration_ms: 6,
                            result: Some(serde_json::json!({"ok": true})),
                        },
                    ),
                ],
            ),
            Some(3),
        );
        let t = idx.get("a").unwrap();
        assert_eq!(t.state, State::Succeeded);
        assert_eq!(t.source, Some("api"));
        assert_eq!(t.attempts.len(), 2);
        assert_eq!(t.attempts[0].error.as_deref(), Some("boom"));
        assert_eq!(t.attempts[1].consumer.as_deref(), Some("consumer-1"));
        assert_eq!(t.result, Some(serde_json::json!({"ok": true})));
        assert_eq!(idx.offset(), Some(3));
        // Reading the same messages again changes nothing.
        let before = idx.get("a");
        idx.apply(
            &batch("consumer", vec![ev("a", 104, What::Started { attempt: 2 })]),
            None,
        );
        assert_eq!(idx.get("a"), before);
    }

    #[test]
    fn the_oldest_task_is_evicted_and_lists_filter() {
        let idx = Index::new(3);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            idx.apply(
                &batch(
                    "producer",
                    vec![ev(
                        id,
                        i as i64 + 1,
                        What::Published {
                            source: Source::Cli,
                        },
                    )],
                ),
                None,
            );
        }
        assert_eq!(idx.len(), 3);
        assert!(idx.get("a").is_none());
        assert!(idx.get("d").is_some());
        let all = idx.list(&Query {
            limit: 10,
            ..Query::default()
        });
        let ids: Vec<_> = all.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["d", "c", "b"]);
        idx.apply(
            &batch(
                "consumer",
                vec![ev(
                    "c",
                    9,
                    What::Dead {
                        attempt: 1,
                        kind: "failed".into(),
                        reason: "bad".into(),
                    },
                )],
            ),
            None,
        );
        let dead = idx.list(&Query {
            state: Some(State::Dead),
            name: Some("email.*".into()),
            limit: 10,
            ..Query::default()
        });
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].attempts[0].kind.as_deref(), Some("failed"));
        assert!(idx
            .list(&Query {
                name: Some("other".into()),
                limit: 10,
                ..Query::default()
            })
            .is_empty());
        // Many more: the ring keeps exactly the newest three.
        for i in 0..100 {
            idx.apply(
                &batch(
                    "producer",
                    vec![ev(
                        &format!("x{i}"),
                        100 + i,
                        What::Published {
                            source: Source::Cli,
                        },
                    )],
                ),
                None,
            );
        }
        assert_eq!(idx.len(), 3);
        assert!(idx.get("x99").is_some() && idx.get("x96").is_none());
    }

    #[test]
    fn ids_come_back_exactly_as_given() {
        let idx = Index::new(10);
        let ids = [
            "0190f7a2-1b2c-7d5e-8f90-0123456789ab",
            "0190F7A2-1B2C-7D5E-8F90-0123456789AB",
            "0190f7a21b2c7d5e8f900123456789ab",
            "0190f7a2-1b2c-7d5e-8f90-0123456789ag",
            "order-123",
            "",
        ];
        for id in ids {
            idx.apply(
                &batch("consumer", vec![ev(id, 1, What::Started { attempt: 1 })]),
                None,
            );
        }
        assert_eq!(idx.len(), ids.len());
        for id in ids {
            assert_eq!(idx.get(id).unwrap().id, id);
        }
        assert!(idx.get("0190f7a2-1b2c-7d5e-8f90-0123456789ac").is_none());
        assert_eq!(
            canonical_uuid("0190f7a2-1b2c-7d5e-8f90-0123456789ab").unwrap()[15],
            0xab
        );
        assert!(canonical_uuid("0190f7a2x1b2c-7d5e-8f90-0123456789ab").is_none());
    }

    #[test]
    fn many_attempts_stay_in_order() {
        let idx = Index::new(10);
        for n in [3, 1, 2] {
            idx.apply(
                &batch(
                    "consumer",
                    vec![ev("m", n, What::Started { attempt: n as u32 })],
                ),
                None,
            );
        }
        let t = idx.get("m").unwrap();
        let numbers: Vec<_> = t.attempts.iter().map(|a| a.attempt).collect();
        assert_eq!(numbers, [1, 2, 3]);
        assert_eq!(t.state, State::Running);
    }

    #[test]
    fn a_requeued_attempt_runs_again() {
        let idx = Index::new(10);
        idx.apply(
            &batch(
                "consumer",
                vec![
                    ev("r", 1, What::Started { attempt: 1 }),
                    ev(
                        "r",
                        2,
                        What::Requeued {
                            attempt: 1,
                            why: "shutdown".into(),
                        },
                    ),
                ],
            ),
            None,
        );
        assert_eq!(idx.get("r").unwrap().state, State::Published);
        idx.apply(
            &batch("consumer", vec![ev("r", 3, What::Started { attempt: 1 })]),
            None,
        );
        assert_eq!(idx.get("r").unwrap().state, State::Running);
    }
}
