//! `publish --batch`: newline-delimited JSON tasks from stdin, published at
//! the broker's pace.
//!
//! Two stages run side by side so neither waits for the other: a blocking
//! thread reads and validates lines (one reused line buffer, chunks of
//! [`CHUNK`] lines handed over a bounded channel), and the async side keeps
//! up to `window` confirms outstanding *continuously* — it awaits the oldest
//! confirm only when the window is full, never a whole chunk at once, so the
//! broker never idles between chunks. Every task is still confirmed before
//! the command succeeds; a line that is not a task, or a task the broker
//! refused (nack, return, timeout), is reported with its line number and
//! makes the command exit 1.

use std::collections::VecDeque;
use std::io::{BufRead, Read};
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use tokio::sync::mpsc;
use warren::amqp::{Pending, Publisher};
use warren::{Task, Topology};

use crate::request::{RequestError, TaskRequest};

/// Lines per hand-over from the reader thread: big enough that the channel
/// costs nothing per line, small enough that publishing starts at once.
const CHUNK: usize = 512;
/// Chunks the reader may be ahead of the publisher (bounds memory).
const CHUNKS_AHEAD: usize = 8;
/// Read buffer for stdin.
const READ_BUFFER: usize = 256 * 1024;

/// One non-empty input line, validated.
struct Line {
    no: u64,
    parsed: Result<(Task, Duration), RequestError>,
}

/// A publish waiting for its confirm, with what its error report needs.
struct InFlight {
    line: u64,
    task: Task,
    delay: Duration,
    pending: Pending,
}

#[derive(Default)]
struct Tally {
    confirmed: u64,
    failed: u64,
    /// Nacked publishes (line, task, delay), sent again together (see
    /// [`Tally::retry_nacked`]).
    nacked: Vec<(u64, Task, Duration)>,
    /// Records `published` for each confirmed task.
    events: warren::events::Recorder,
}

impl Tally {
    fn confirmed(&mut self, task: &Task) {
        self.confirmed += 1;
        if self.events.enabled() {
            self.events.record(published_event(task));
        }
    }
}

impl Tally {
    async fn settle(&mut self, f: InFlight) {
        let InFlight {
            line,
            task,
            delay,
            pending,
        } = f;
        match pending.confirmed().await {
            Ok(()) => self.confirmed(&task),
            // A nack (a queue leader moving, say) is sent again, same id.
            Err(warren::Error::Nacked { .. }) => self.nacked.push((line, task, delay)),
            Err(e) => self.fail(line, &task, &e),
        }
    }

    fn fail(&mut self, line: u64, task: &Task, e: &warren::Error) {
        self.failed += 1;
        warren::errln!("line {line}: task {} ({}): {e}", task.id, task.name);
    }

    /// Send the nacked tasks again, pipelined as they first went, with the
    /// nack backoff of [`Publisher::publish_tasks`]: one at a time, a
    /// window of them would each wait out a confirm timeout in turn.
    async fn retry_nacked(&mut self, publisher: &Publisher, topo: &Topology, window: usize) {
        if self.nacked.is_empty() {
            return;
        }
        let nacked = std::mem::take(&mut self.nacked);
        let results = publisher
            .publish_tasks(topo, nacked.iter().map(|(_, t, d)| (t, *d)), window)
            .await;
        for ((line, task, _), r) in nacked.iter().zip(results) {
            match r {
                Ok(()) => self.confirmed(task),
                Err(e) => self.fail(*line, task, &e),
            }
        }
    }
}

/// Publish every task of `input`; `Ok` only when all were confirmed.
pub async fn publish<R: Read + Send + 'static>(
    publisher: &Publisher,
    topo: &Topology,
    input: R,
    window: usize,
    events: &warren::events::Recorder,
) -> anyhow::Result<()> {
    let window = window.max(1);
    let (tx, mut rx) = mpsc::channel(CHUNKS_AHEAD);
    let reader = tokio::task::spawn_blocking(move || read(input, &tx));
    let mut tally = Tally {
        events: events.clone(),
        ..Tally::default()
    };
    let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(window);
    while let Some(chunk) = rx.recv().await {
        for Line { no, parsed } in chunk {
            let (task, delay) = match parsed {
                Ok(t) => t,
                Err(e) => {
                    tally.failed += 1;
                    warren::errln!("line {no}: {e}");
                    continue;
                }
            };
            match publisher.send_task(topo, &task, delay).await {
                Ok(pending) => in_flight.push_back(InFlight {
                    line: no,
                    task,
                    delay,
                    pending,
                }),
                Err(e) => {
                    tally.failed += 1;
                    warren::errln!("line {no}: task {} ({}): {e}", task.id, task.name);
                }
            }
            if in_flight.len() >= window {
                if let Some(f) = in_flight.pop_front() {
                    tally.settle(f).await;
                }
                if tally.nacked.len() >= window {
                    tally.retry_nacked(publisher, topo, window).await;
                }
            }
        }
    }
    // Awaited in order: confirms arrive in order, so this costs no more than
    // awaiting them as they come.
    for f in in_flight {
        tally.settle(f).await;
    }
    tally.retry_nacked(publisher, topo, window).await;
    reader
        .await
        .context("the stdin reader stopped")?
        .context("reading stdin")?;
    warren::outln!("{} confirmed, {} failed", tally.confirmed, tally.failed);
    if tally.failed > 0 {
        anyhow::bail!("{} task(s) were not published", tally.failed);
    }
    Ok(())
}

/// The reader thread: lines to validated tasks, in chunks. Stops early if
/// the publisher is gone (its error says why).
fn read<R: Read>(input: R, tx: &mpsc::Sender<Vec<Line>>) -> std::io::Result<()> {
    let mut input = std::io::BufReader::with_capacity(READ_BUFFER, input);
    let mut buf = String::new();
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut no = 0u64;
    loop {
        buf.clear();
        if input.read_line(&mut buf)? == 0 {
            break;
        }
        no += 1;
        let line = buf.trim();
        if line.is_empty() {
            continue;
        }
        let parsed = TaskRequest::from_line(line).and_then(|r| r.into_task(Utc::now()));
        chunk.push(Line { no, parsed });
        if chunk.len() >= CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
            if tx.blocking_send(full).is_err() {
                return Ok(());
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(chunk);
    }
    Ok(())
}

/// A `published` event of a task the command line sent.
pub(crate) fn published_event(task: &warren::Task) -> warren::events::Event {
    warren::events::Event::new(
        &task.id,
        &task.name,
        warren::events::What::Published {
            source: warren::events::Source::Cli,
        },
    )
    .trace(task.trace.as_ref().map(|t| t.trace_id_hex()))
}
