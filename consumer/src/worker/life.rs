//! A delivery's life as task events ([`warren::events`]): `started` when its
//! handler is called, then `succeeded`, `retried` or `dead` as its outcome
//! is carried out, or `requeued` when it goes back to its queue unfinished
//! (shutdown past the grace, a panic, a lost connection). Also the tasks
//! running now and the counts this consumer announces every
//! [`WORKER_EVERY`](warren::events::WORKER_EVERY).
//!
//! Recording never waits (see [`warren::events::Recorder`]); with
//! `events.enabled = false` only the running set and the counts are kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use warren::events::{cut, Event, Recorder, What, MAX_TEXT};
use warren::Task;

use crate::outcome::Action;

/// A task being run: what a `requeued` event needs.
struct Run {
    id: String,
    name: String,
    queue: String,
    attempt: u32,
}

pub(crate) struct Life {
    /// `host:pid`, as the events name this consumer.
    instance: String,
    recorder: Recorder,
    results: Vec<String>,
    max_result_bytes: usize,
    next: AtomicU64,
    running: Mutex<HashMap<u64, Run>>,
    succeeded: AtomicU64,
    failed: AtomicU64,
}

/// Held while a handler runs; its drop ends the run. Dropped before
/// [`Running::settled`] (a panic, a connection lost mid-publish), the task
/// was given back: `requeued`.
pub(crate) struct Running<'a> {
    life: &'a Life,
    key: u64,
    settled: bool,
}

impl Life {
    pub(crate) fn new(
        instance: String,
        recorder: Recorder,
        results: Vec<String>,
        max_result_bytes: usize,
    ) -> Self {
        Self {
            instance,
            recorder,
            results,
            max_result_bytes,
            next: AtomicU64::new(0),
            running: Mutex::new(HashMap::new()),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    pub(crate) fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// Whether `name`'s result is kept (the consumer's `results`).
    pub(crate) fn keeps_result(&self, name: &str) -> bool {
        self.recorder.enabled()
            && self
                .results
                .iter()
                .any(|p| warren::topology::pattern_matches(p, name))
    }

    fn event(&self, task: &Task, queue: &str, what: What) -> Event {
        Event::new(&task.id, &task.name, what)
            .queue(queue)
            .trace(task.trace.as_ref().map(|t| t.trace_id_hex()))
    }

    /// The handler of `task` (from `queue`) is about to be called.
    pub(crate) fn started(&self, task: &Task, queue: &str) -> Running<'_> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.running.lock() {
            r.insert(
                key,
                Run {
                    id: task.id.clone(),
                    name: task.name.clone(),
                    queue: queue.to_owned(),
                    attempt: task.attempt,
                },
            );
        }
        if self.recorder.enabled() {
            self.recorder.record(self.event(
                task,
                queue,
                What::Started {
                    attempt: task.attempt,
                },
            ));
        }
        Running {
            life: self,
            key,
            settled: false,
        }
    }

    /// `task` ended its attempt with `action` after `took`. `result`: what
    /// the handler returned, kept when its name is listed in `results` and
    /// the task was not encrypted (`encrypted`: a result of an encrypted
    /// task is never kept in plaintext; docs/tasks.md#results).
    pub(crate) fn finished(
        &self,
        task: &Task,
        queue: &str,
        action: &Action,
        took: Duration,
        result: Option<&serde_json::Value>,
        encrypted: bool,
    ) {
        match action {
            Action::Ack => self.succeeded.fetch_add(1, Ordering::Relaxed),
            _ => self.failed.fetch_add(1, Ordering::Relaxed),
        };
        if !self.recorder.enabled() {
            return;
        }
        let attempt = task.attempt;
        let what = match action {
            Action::Ack => What::Succeeded {
                attempt,
                duration_ms: took.as_millis() as u64,
                result: result
                    .filter(|_| !encrypted && self.keeps_result(&task.name))
                    .filter(|r| r.to_string().len() <= self.max_result_bytes)
                    .cloned(),
            },
            Action::Retry { delay, error } => What::Retried {
                attempt,
                error: cut(error, MAX_TEXT),
                delay_ms: delay.as_millis() as u64,
                next_at: Utc::now().timestamp_millis() + delay.as_millis() as i64,
            },
            Action::DeadLetter { reason, kind, .. } => What::Dead {
                attempt,
                kind: (*kind).to_owned(),
                reason: cut(reason, MAX_TEXT),
            },
        };
        self.recorder.record(self.event(task, queue, what));
    }

    /// `task` was dead-lettered without running (no handler).
    pub(crate) fn dead_unrun(&self, task: &Task, queue: &str, kind: &str, reason: &str) {
        if self.recorder.enabled() {
            self.recorder.record(self.event(
                task,
                queue,
                What::Dead {
                    attempt: task.attempt,
                    kind: kind.to_owned(),
                    reason: cut(reason, MAX_TEXT),
                },
            ));
        }
    }

    fn requeued(&self, run: Run, why: &str) {
        if !self.recorder.enabled() {
            return;
        }
        let ev = Event::new(
            &run.id,
            &run.name,
            What::Requeued {
                attempt: run.attempt,
                why: why.to_owned(),
            },
        )
        .queue(&run.queue);
        self.recorder.record(ev);
    }

    /// Every task still running goes back to its queue (shutdown past the
    /// drain grace): record it, then publish what waits.
    pub(crate) async fn requeue_running(&self, why: &str) {
        let runs: Vec<Run> = self
            .running
            .lock()
            .map(|mut r| r.drain().map(|(_, run)| run).collect())
            .unwrap_or_default();
        for run in runs {
            self.requeued(run, why);
        }
        self.recorder.flush(Duration::from_secs(2)).await;
    }

    /// This consumer as announced.
    pub(crate) fn worker(&self, queues: &[String], concurrency: usize) -> warren::events::Worker {
        warren::events::Worker {
            instance: self.instance.clone(),
            host: warren::config::host_name(),
            queues: queues.to_vec(),
            concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
            running: self
                .running
                .lock()
                .map(|r| r.len() as u32)
                .unwrap_or_default(),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            at: Utc::now().timestamp_millis(),
        }
    }
}

impl Running<'_> {
    /// The attempt's outcome is being carried out (recorded by
    /// [`Life::finished`]).
    pub(crate) fn settled(&mut self) {
        self.settled = true;
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let run = self
            .life
            .running
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&self.key));
        if let (Some(run), false) = (run, self.settled) {
            self.life
                .requeued(run, "given back unfinished (panic or lost connection)");
        }
    }
}
