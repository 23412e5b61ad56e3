//! `publish --batch`: newline-delimited JSON tasks from stdin, published at
//! the broker's pace.
//!
//! Two stages run side by side so neither waits for the other: a blocking
//! thread reads and validates lines (one reused line buffer, chunks of
//! [`CHUNK`] lines handed over a bounded channel), and the async side keeps
//! up to `window` tasks unconfirmed *continuously*, so the broker never
//! idles between chunks:
//!
//! * on classic queues, in AMQP transactions of up to [`TX_TASKS`] tasks,
//!   several committing at once: a commit answers for all its tasks, which
//!   halves the client's CPU per task against a confirm each (see
//!   [`warren::amqp::Transaction`]);
//! * on quorum queues, and after a commit failed, with confirms: RabbitMQ
//!   3.10 drops a transaction's messages that a quorum queue refuses and
//!   still answers the commit, where a confirm is a nack to send again.
//!
//! Every task is still stored by the broker before the command succeeds; a
//! line that is not a task, or a task the broker refused (nack, return,
//! timeout), is reported with its line number and makes the command exit 1.
//! A task whose commit failed is sent again with confirms, same id.

use std::collections::VecDeque;
use std::io::{BufRead, Read};
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use tokio::sync::mpsc;
use warren::amqp::{Pending, Publisher, Returned, Transaction};
use warren::config::QueueType;
use warren::{Task, Topology};

use crate::request::{RequestError, TaskRequest};

/// Lines per hand-over from the reader thread: big enough that the channel
/// costs nothing per line, small enough that publishing starts at once.
const CHUNK: usize = 512;
/// Chunks the reader may be ahead of the publisher (bounds memory).
const CHUNKS_AHEAD: usize = 8;
/// Read buffer for stdin.
const READ_BUFFER: usize = 256 * 1024;
/// Most tasks in one transaction.
const TX_TASKS: usize = 256;

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
    conn: &lapin::Connection,
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
    if topo.queue_type() == QueueType::Classic {
        committed(conn, publisher, topo, &mut rx, window, &mut tally).await;
    }
    confirmed(publisher, topo, &mut rx, window, &mut tally).await;
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

/// A task on its way: its line, the task, its delay.
type Sent = (u64, Task, Duration);

/// The lines of `rx` in transactions of up to [`TX_TASKS`] tasks, as many
/// committing at once as `window` allows. Returns early, leaving the rest of
/// `rx` to [`confirmed`], when a transaction channel cannot be opened or a
/// commit fails (that commit's tasks go to the nacked, sent again).
async fn committed(
    conn: &lapin::Connection,
    publisher: &Publisher,
    topo: &Topology,
    rx: &mut mpsc::Receiver<Vec<Line>>,
    window: usize,
    tally: &mut Tally,
) {
    let size = window.min(TX_TASKS);
    let mut txs = Vec::new();
    for _ in 0..window.div_ceil(size).clamp(1, 16) {
        match Transaction::new(conn, publisher.confirm_timeout()).await {
            Ok(tx) => txs.push(tx),
            Err(_) if !txs.is_empty() => break,
            Err(_) => return,
        }
    }
    let mut in_flight = FuturesOrdered::new();
    let mut staged = 0usize;
    let mut next: Vec<Sent> = Vec::with_capacity(size);
    let mut failed = false;
    let mut input_done = false;
    while !(failed || input_done && next.is_empty() && in_flight.is_empty()) {
        // Fill the next transaction from the input while one is free.
        if !input_done && next.len() < size && in_flight.len() < txs.len() {
            match rx.recv().await {
                Some(chunk) => {
                    for Line { no, parsed } in chunk {
                        match parsed {
                            Ok((task, delay)) => next.push((no, task, delay)),
                            Err(e) => {
                                tally.failed += 1;
                                warren::errln!("line {no}: {e}");
                            }
                        }
                    }
                }
                None => input_done = true,
            }
        }
        while (next.len() >= size || (input_done && !next.is_empty()))
            && in_flight.len() < txs.len()
        {
            let take = next.len().min(size);
            let sent: Vec<Sent> = next.drain(..take).collect();
            let Some(tx) = txs.get(staged % txs.len()) else {
                return;
            };
            staged += 1;
            in_flight.push_back(commit(tx, publisher, topo, sent));
            // Stage it and send its commit now, not when a commit is awaited.
            if let Some(Some((sent, outcome))) = in_flight.next().now_or_never() {
                failed |= settle_commit(tally, sent, outcome);
            }
        }
        let must_wait = in_flight.len() >= txs.len() || input_done;
        if must_wait {
            if let Some((sent, outcome)) = in_flight.next().await {
                failed |= settle_commit(tally, sent, outcome);
            }
        }
    }
    // After a failure: the commits still in flight settle, and what was
    // read but not sent goes out with confirms.
    while let Some((sent, outcome)) = in_flight.next().await {
        settle_commit(tally, sent, outcome);
    }
    tally.nacked.extend(next);
    for tx in &txs {
        tx.close().await;
    }
}

/// Stage `sent` on `tx` and commit it.
async fn commit(
    tx: &Transaction,
    publisher: &Publisher,
    topo: &Topology,
    sent: Vec<Sent>,
) -> (Vec<Sent>, Result<Vec<Returned>, warren::Error>) {
    let mut batch = tx.batch();
    for (_, task, delay) in &sent {
        let (exchange, key) = topo.route(&task.name, *delay);
        let staged = publisher
            .wire(task)
            .and_then(|(props, body)| batch.publish(&exchange, &key, props, &body));
        if let Err(e) = staged {
            // Nothing of this batch is committed: it goes out again.
            return (sent, Err(e));
        }
    }
    let outcome = batch.commit().await;
    (sent, outcome)
}

/// Count a commit's tasks; `true` when it failed (its tasks go out again
/// with confirms).
fn settle_commit(
    tally: &mut Tally,
    sent: Vec<Sent>,
    outcome: Result<Vec<Returned>, warren::Error>,
) -> bool {
    let returned = match outcome {
        Ok(returned) => returned,
        Err(_) => {
            tally.nacked.extend(sent);
            return true;
        }
    };
    for (line, task, _) in sent {
        let back = returned
            .iter()
            .find(|r| r.message_id.as_deref() == Some(task.id.as_str()));
        match back {
            None => tally.confirmed(&task),
            Some(r) => {
                let e = warren::Error::Unroutable {
                    exchange: r.exchange.clone(),
                    routing_key: r.routing_key.clone(),
                    reply: r.reply.clone(),
                };
                tally.fail(line, &task, &e);
            }
        }
    }
    false
}

/// The lines of `rx` with up to `window` confirms outstanding.
async fn confirmed(
    publisher: &Publisher,
    topo: &Topology,
    rx: &mut mpsc::Receiver<Vec<Line>>,
    window: usize,
    tally: &mut Tally,
) {
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
