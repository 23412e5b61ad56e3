//! What happens to one delivery, as a pipeline of stages ([`handle`]):
//!
//! | stage | settles the delivery when | else hands on |
//! |---|---|---|
//! | `open` | `security.*` refuses it, or it does not decode: dead-lettered as it came, unrun | the task, its plaintext |
//! | `resolve` | no handler: dead-lettered `no_handler` | the task with its handler |
//! | `hold_if_early` | not due yet: parked until due | the task |
//! | `admit` | an open breaker or a full limit: parked, attempt kept | the task with its flow-control pass and slot |
//! | `attempt` | — | how the handler's run ended (under its timeout, panics caught) |
//! | `conclude` | always: [`decide`] says ack, retry or dead-letter | — |
//!
//! A stage answers a [`Stage`]: `Break` with the [`Finish`] that settles
//! the delivery, or `Continue` with the next stage's input. `carry_out` is
//! the one place a `Finish` is carried out through a [`Broker`] — a copy
//! published (retry, park, dead letter), a workflow step's event, then the
//! ack, or the delivery left to its session — and the delivery's outcome is
//! counted exactly once, through its [`Ticket`].
//!
//! Knows nothing of connections or channels, so every branch is unit-tested
//! here without a broker (see the tests at the bottom).

use std::ops::ControlFlow::{self, Break, Continue};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::Value;
use tracing::Instrument;
use warren::envelope::{headers, rfc3339, PERSISTENT};
use warren::trace::TraceContext;
use warren::Task;

use super::broker::Broker;
use super::fault::{self, Step};
use super::settle::Ticket;
use super::Shared;
use crate::flow::{self, Admission, Breaker, Pass, Slot, Verdict};
use crate::handler::{self, BoxFut, ErrorKind, TaskError};
use crate::metrics::{TaskMetrics, UNKNOWN_TASK};
use crate::outcome::{self, decide, labels, Action, Outcome};

/// The parts of a delivery its handling reads.
pub(super) struct Incoming<'a> {
    /// The work queue it came from.
    pub(super) queue: &'a str,
    /// As delivered: a retried or parked task keeps its delay prefix.
    pub(super) routing_key: &'a str,
    pub(super) properties: &'a BasicProperties,
    pub(super) body: &'a [u8],
    pub(super) redelivered: bool,
}

/// `headers` without the broker's dead-lettering records.
pub fn strip_death_headers(headers: &FieldTable) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in headers.inner() {
        let k_ = k.as_str();
        if !(k_ == "x-death" || k_.starts_with("x-first-death-") || k_.starts_with("x-last-death-"))
        {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Decrements the in-flight gauge however the task ends.
struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Runs [`handle`] and catches a panic anywhere in it (decode, resolve,
/// metrics, decide, publish, ack — the handler call has its own catch): the
/// delivery is then given back to its queue, so it never stays in flight
/// until the connection closes.
pub(super) async fn supervise<B: Broker>(shared: &Shared, broker: &B, msg: Incoming<'_>) {
    let m = &shared.metrics;
    let ticket = Ticket::new(broker, m);
    let run = handle(shared, &msg, &ticket);
    if let Err(panic) = AssertUnwindSafe(run).catch_unwind().await {
        m.panics.inc();
        // The message is the panic's own text (code, not payload bytes).
        tracing::error!(
            panic = %warren::error::panic_message(&*panic),
            routing_key = %warren::delay::strip_prefix(msg.routing_key),
            "panic while handling a delivery; giving it back to its queue"
        );
        Box::pin(ticket.after_panic()).await;
    }
}

/// A stage's answer: `Break` settles the delivery with a [`Finish`],
/// `Continue` hands the next stage its input.
type Stage<T> = ControlFlow<Finish, T>;

/// How a delivery is settled; carried out by `Delivered::carry_out`.
enum Finish {
    /// Ack, counting `outcome`.
    Ack(&'static str),
    /// Publish a workflow step's final event (confirmed), then ack.
    StepEvent {
        event: Vec<u8>,
        outcome: &'static str,
    },
    /// Publish `copy` (the next attempt, or the task parked) to come back
    /// after `delay`, then ack. If no queue takes it, it is dead-lettered
    /// as it is now at attempt `attempts_made`.
    Republish {
        copy: Box<Task>,
        delay: Duration,
        attempts_made: u32,
        outcome: &'static str,
    },
    /// Publish `task` to the dead exchange with why, then ack.
    DeadLetter {
        task: Box<Task>,
        reason: String,
        kind: &'static str,
        outcome: &'static str,
    },
    /// Dead-letter the delivery as it came (refused or undecodable), then
    /// ack counting `rejected`.
    DeadLetterAsItCame { reason: String, kind: &'static str },
    /// A publish failed: leave the delivery unacked and end the session, so
    /// the connection closes and the broker redelivers it.
    LeaveToSession(warren::Error),
}

/// Past `open`: the task, boxed because it moves from stage to stage and
/// is kept across every await (by value each move would leave another
/// 500-byte slot in the delivery's future).
struct Opened {
    task: Box<Task>,
    /// The decrypted payload: only the handler sees it; every copy
    /// republishes the task as it came (ciphertext, signature intact).
    plaintext: Option<Vec<u8>>,
    /// Started here for a task from a plain client; every copy carries it.
    trace: TraceContext,
}

/// Past `resolve`: the task with its handler, counted under its label.
struct Found<'a> {
    opened: Opened,
    handler: handler::Resolved<'a>,
    series: Arc<TaskMetrics>,
    /// When its handler was found: what "not due yet" and the queue wait
    /// (without a limit's wait) are measured against.
    seen: DateTime<Utc>,
}

/// Past `admit`: let through by flow control, holding the breaker's pass
/// and the limit's slot until the handler returned.
struct Admitted<'a> {
    found: Found<'a>,
    pass: Option<Pass<'a>>,
    slot: Option<Slot<'a>>,
    /// Kept back by an open breaker past `breaker.max_park`: this attempt
    /// fails with this error instead of calling the handler.
    refused: Option<TaskError>,
}

/// Past `attempt`: how it ended.
struct Attempted<'a> {
    task: Box<Task>,
    /// Its task events' run (see [`super::life`]): settled by `conclude`.
    run: super::life::Running<'a>,
    /// How long the handler took.
    took: Duration,
    outcome: Outcome,
    /// What the handler set with [`crate::result::set_result`].
    result: Option<Value>,
    /// When the attempt started (after any wait for a limit).
    started: DateTime<Utc>,
}

// Every path that publishes (park, retry, dead letter, step event) or gives
// the delivery back is awaited through its own `Box::pin`: a future is as
// large as its largest await point, nested, and those paths made each
// delivery's task an 8 KiB allocation and copy. Boxed, only the deliveries
// that take them pay for their state; a plain success stays small.
async fn handle<B: Broker>(shared: &Shared, msg: &Incoming<'_>, ticket: &Ticket<'_, B>) {
    let m = &shared.metrics;
    m.in_flight.inc();
    let _in_flight = InFlight(m.in_flight.clone());
    let d = Delivered {
        shared,
        msg,
        ticket,
    };
    let opened = match d.open() {
        Continue(opened) => opened,
        Break(finish) => return d.carry_out(finish).await,
    };
    let span = opened.span();
    async {
        let finish = match d.stages(opened).await {
            Continue(attempted) => d.conclude(attempted),
            Break(finish) => finish,
        };
        d.carry_out(finish).await
    }
    .instrument(span)
    .await
}

/// A delivery being handled: every path settles it exactly once through
/// its [`Ticket`] (ack or give back), and acks only after any copy it
/// publishes is confirmed.
struct Delivered<'a, 'b, B> {
    shared: &'a Shared,
    msg: &'a Incoming<'b>,
    ticket: &'a Ticket<'a, B>,
}

/// The stages.
impl<'a, B: Broker> Delivered<'a, '_, B> {
    fn prefix(&self) -> &'a str {
        self.shared.topo.prefix()
    }

    /// The stages between an open task and the end of its attempt.
    async fn stages(&self, opened: Opened) -> Stage<Attempted<'a>> {
        let found = self.resolve(opened)?;
        let due = hold_if_early(found)?;
        let admitted = self.admit(due).await?;
        Continue(self.attempt(admitted).await)
    }

    /// Security checks, then decode. Before anything reads the task: a
    /// forged or undecryptable delivery is never run, never retried. An
    /// oversized body is left to the decode step (poison `oversized`)
    /// rather than hashed or decrypted whole.
    fn open(&self) -> Stage<Opened> {
        let msg = self.msg;
        let plaintext = if msg.body.len() > self.shared.cfg.worker.max_body_bytes {
            None
        } else {
            let opened = self
                .shared
                .opener
                .open(msg.routing_key, msg.properties, msg.body);
            match opened {
                Ok(p) => p,
                Err(refusal) => {
                    self.ticket.received(UNKNOWN_TASK);
                    let kind = refusal.kind();
                    self.shared.metrics.refused.with_label_values(&[kind]).inc();
                    let reason = refusal.to_string();
                    tracing::warn!(reason = %reason, kind, routing_key = %warren::delay::strip_prefix(msg.routing_key), "delivery refused by security checks; dead-lettering");
                    return Break(Finish::DeadLetterAsItCame { reason, kind });
                }
            }
        };
        match self.decode(plaintext.as_deref()) {
            Ok(task) => {
                let mut task = Box::new(task);
                let trace = task.ensure_trace().clone();
                Continue(Opened {
                    task,
                    plaintext,
                    trace,
                })
            }
            Err((reason, kind)) => {
                self.ticket.received(UNKNOWN_TASK);
                tracing::warn!(error = %reason, kind, routing_key = %msg.routing_key, "poison message; dead-lettering");
                Break(Finish::DeadLetterAsItCame { reason, kind })
            }
        }
    }

    /// The task in the delivery (fail point `decode`); an error's text and
    /// its poison kind. An encrypted task's `plaintext` must be JSON too.
    fn decode(&self, plaintext: Option<&[u8]>) -> Result<Task, (String, &'static str)> {
        fault::check(self.prefix(), Step::Decode).map_err(|text| (text, "injected"))?;
        let msg = self.msg;
        let max = self.shared.cfg.worker.max_body_bytes;
        Task::decode(msg.routing_key, msg.properties, msg.body, max)
            .and_then(|t| match plaintext {
                Some(p) => warren::envelope::check_json(p).map(|()| t),
                None => Ok(t),
            })
            .map_err(|e| (e.to_string(), e.kind()))
    }

    /// The task's handler (fail point `resolve`: as if there were none);
    /// the delivery is counted under its label, or under the unknown task.
    fn resolve(&self, opened: Opened) -> Stage<Found<'a>> {
        let handler = match fault::check(self.prefix(), Step::Resolve) {
            Ok(()) => self.shared.registry.resolve(&opened.task.name),
            Err(text) => {
                tracing::warn!(error = %text, "handler lookup failed");
                None
            }
        };
        let Some(handler) = handler else {
            self.ticket.received(UNKNOWN_TASK);
            tracing::warn!("no handler for this task; dead-lettering");
            let reason = format!("no handler for task `{}`", opened.task.name);
            let queue = self.msg.queue;
            (self.shared.life).dead_unrun(&opened.task, queue, outcome::kind::NO_HANDLER, &reason);
            let mut task = opened.task;
            task.last_error = Some(reason.clone());
            return Break(Finish::DeadLetter {
                task,
                reason,
                kind: outcome::kind::NO_HANDLER,
                outcome: labels::REJECTED,
            });
        };
        Continue(Found {
            series: self.ticket.received(handler.label),
            opened,
            handler,
            seen: Utc::now(),
        })
    }

    /// Flow control before the handler runs: the breaker first (asking
    /// costs nothing, and a task that will not be sent must not spend a
    /// limit's slot; a pass dropped unused leaves the breaker as it was),
    /// then the task's limit. A task kept back is parked, attempt kept.
    async fn admit(&self, found: Found<'a>) -> Stage<Admitted<'a>> {
        let flow = &self.shared.flow;
        let pass = match flow.breaker(found.handler.label) {
            None => None,
            Some(b) => match b.pass() {
                Ok(pass) => Some(pass),
                Err(open) => {
                    let error = breaker_open(b, open.remaining, &found.opened.task)?;
                    return Continue(Admitted {
                        found,
                        pass: None,
                        slot: None,
                        refused: Some(error),
                    });
                }
            },
        };
        let slot = match flow.limit(&found.opened.task.name) {
            None => None,
            Some(limit) => match Box::pin(limit.admit()).await {
                Admission::Run(slot) => Some(slot),
                Admission::Park(delay) => {
                    tracing::debug!(limit = %limit.key, park = ?delay, "over its limit; parking");
                    return Break(park(found.opened.task, delay));
                }
            },
        };
        Continue(Admitted {
            found,
            pass,
            slot,
            refused: None,
        })
    }

    /// One run of the handler under its timeout, its panic caught and its
    /// result captured; the breaker hears how it went.
    async fn attempt(&self, admitted: Admitted<'a>) -> Attempted<'a> {
        let Admitted {
            found,
            pass,
            slot,
            refused,
        } = admitted;
        let Found {
            opened,
            handler,
            series,
            seen,
        } = found;
        // After any wait for a limit: queue wait runs up to the real start.
        let now = if slot.is_some() { Utc::now() } else { seen };
        if let Some(w) = opened.task.queue_wait(now) {
            series.queue_wait(w.as_secs_f64());
        }
        // One timeout per attempt, for every kind of handler: the task's
        // header, else the handler's own, else the worker's default. The
        // handler gets it in `task.timeout` (e.g. exec kills its child then).
        let timeout = (opened.task.timeout)
            .or(handler.timeout())
            .unwrap_or(self.shared.cfg.worker.task_timeout);
        tracing::debug!(redelivered = self.msg.redelivered, "task started");
        let clock = Instant::now();
        let run = self.shared.life.started(&opened.task, self.msg.queue);
        // A workflow step's result, or one the consumer's `results` keeps.
        let step = opened.task.step.is_some() || self.shared.life.keeps_result(&opened.task.name);
        let Opened {
            task,
            plaintext,
            trace,
        } = opened;
        // The handler's future is made here, so its copy of the task moves
        // straight into it instead of waiting as a second copy in this
        // future's state. Making it runs none of the handler's code (that
        // starts at its first poll, inside the catch and the timeout).
        let running = match refused {
            Some(e) => Err(e),
            None => Ok(handler.call(handler_copy(&task, &trace, plaintext, timeout))),
        };
        let (outcome, result) = run_handler(self.prefix(), running, timeout, step).await;
        let took = clock.elapsed();
        series.duration(took.as_secs_f64());
        drop(slot);
        if let Some(pass) = pass {
            pass.record(verdict(&outcome));
        }
        Attempted {
            task,
            run,
            took,
            outcome,
            result,
            started: now,
        }
    }

    /// What the attempt's outcome means under the task's retry policy
    /// ([`decide`]), as the [`Finish`] that carries it out.
    fn conclude(&self, attempted: Attempted<'a>) -> Finish {
        let Attempted {
            mut task,
            mut run,
            took,
            outcome,
            result,
            started,
        } = attempted;
        let policy = (self.shared.cfg.retry.policy_for(&task.name))
            .with_overrides(task.max_attempts, &task.retry);
        let action = decide(&outcome, task.attempt, &policy, rand::random::<f64>());
        let counted = outcome::label(&action);
        run.settled();
        let encrypted = warren::security::is_encrypted(self.msg.properties);
        let queue = self.msg.queue;
        (self.shared.life).finished(&task, queue, &action, took, result.as_ref(), encrypted);
        match action {
            Action::Ack => {
                tracing::debug!("task succeeded");
                let max = self.shared.cfg.workflow.max_result_bytes;
                match super::step_event::succeeded(&task, result, max) {
                    Some(event) => Finish::StepEvent {
                        event,
                        outcome: counted,
                    },
                    None => Finish::Ack(counted),
                }
            }
            Action::Retry { delay, error } => {
                tracing::warn!(error = %error, retry_in = ?delay, "task failed; retrying");
                let attempts_made = task.attempt;
                task.attempt = task.attempt.saturating_add(1);
                task.last_error = Some(error);
                task.first_failed_at.get_or_insert(started);
                Finish::Republish {
                    copy: task,
                    delay,
                    attempts_made,
                    outcome: counted,
                }
            }
            Action::DeadLetter {
                reason,
                kind,
                error,
            } => {
                tracing::warn!(reason = %reason, kind, "task dead-lettered");
                task.last_error = Some(error);
                task.first_failed_at.get_or_insert(started);
                Finish::DeadLetter {
                    task,
                    reason,
                    kind,
                    outcome: counted,
                }
            }
        }
    }
}

/// Carrying out a [`Finish`].
impl<B: Broker> Delivered<'_, '_, B> {
    /// The one place a delivery is settled: each publish is confirmed before
    /// the next step (a dead step's event after its dead letter; the ack
    /// last). A copy no queue takes is dead-lettered instead; any other
    /// failed publish leaves the delivery to its session.
    async fn carry_out(&self, mut finish: Finish) {
        loop {
            finish = match finish {
                Finish::Ack(outcome) => return self.ack(outcome).await,
                Finish::LeaveToSession(e) => return self.leave_to_session(&e),
                Finish::StepEvent { event, outcome } => {
                    then_ack(Box::pin(self.publish_step_event(&event)).await, outcome)
                }
                Finish::Republish {
                    mut copy,
                    delay,
                    attempts_made,
                    outcome,
                } => match Box::pin(self.publish_copy(&mut copy, delay)).await {
                    Err(e @ warren::Error::Unroutable { .. }) => {
                        unroutable(copy, attempts_made, &e)
                    }
                    res => then_ack(res, outcome),
                },
                Finish::DeadLetter {
                    task,
                    reason,
                    kind,
                    outcome,
                } => {
                    let res = Box::pin(self.publish_dead_copy(task, &reason, kind)).await;
                    after_dead_letter(res, outcome)
                }
                Finish::DeadLetterAsItCame { reason, kind } => {
                    let res = Box::pin(self.publish_as_it_came(&reason, kind)).await;
                    after_dead_letter(res, labels::REJECTED)
                }
            }
        }
    }

    /// Ack counting `outcome` (fail point `ack`).
    async fn ack(&self, outcome: &'static str) {
        let fault = fault::check(self.prefix(), Step::Ack);
        self.ticket.ack(outcome, fault).await
    }

    /// A publish failed: leave the delivery unacked and end the session, so
    /// the connection closes and the broker redelivers it.
    fn leave_to_session(&self, e: &warren::Error) {
        tracing::warn!(error = %e, "publish failed; delivery left unacked, reconnecting");
        self.ticket.left_to_session();
    }

    /// Publish `copy` to come back after `delay` (fail point
    /// `retry_publish`).
    async fn publish_copy(&self, copy: &mut Task, delay: Duration) -> Result<(), warren::Error> {
        // The broker's own death records must not travel with the copy:
        // RabbitMQ drops a message whose `x-death` already lists a delay
        // level it expires from again (dead-letter cycle detection).
        copy.extra_headers = strip_death_headers(&copy.extra_headers);
        fault::check(self.prefix(), Step::RetryPublish).map_err(|text| injected_nack(&text))?;
        let (exchange, key) = self.shared.topo.route(&copy.name, delay);
        (self.ticket.broker())
            .publish(&exchange, &key, copy.properties(), &copy.payload)
            .await
    }

    /// Publish `task` to the dead exchange with why.
    async fn publish_dead_copy(
        &self,
        mut task: Box<Task>,
        reason: &str,
        kind: &str,
    ) -> Result<Option<Vec<u8>>, warren::Error> {
        let mut h = strip_death_headers(&task.extra_headers);
        self.dead_headers(&mut h, reason, kind);
        // Always present on dead copies (the envelope omits attempt 1).
        h.insert(
            headers::ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(task.attempt)),
        );
        task.extra_headers = h;
        let props = task.properties();
        self.publish_dead(&task.name, props, &task.payload).await
    }

    /// Dead-letter the delivery as it came, plus the dead headers.
    async fn publish_as_it_came(
        &self,
        reason: &str,
        kind: &str,
    ) -> Result<Option<Vec<u8>>, warren::Error> {
        let props = self.msg.properties.clone();
        let mut h = props.headers().clone().unwrap_or_default();
        self.dead_headers(&mut h, reason, kind);
        let props = props.with_headers(h).with_delivery_mode(PERSISTENT);
        let key = warren::delay::strip_prefix(self.msg.routing_key);
        self.publish_dead(key, props, self.msg.body).await
    }

    fn dead_headers(&self, h: &mut FieldTable, reason: &str, kind: &str) {
        let s = |v: &str| AMQPValue::LongString(v.into());
        h.insert(headers::DEAD_REASON.into(), s(reason));
        h.insert(headers::DEAD_KIND.into(), s(kind));
        h.insert(headers::DEAD_AT.into(), s(&rfc3339(Utc::now())));
        h.insert(headers::ORIGINAL_QUEUE.into(), s(self.msg.queue));
        // The task's own key: a retried task arrives with a delay prefix.
        h.insert(
            headers::ORIGINAL_ROUTING_KEY.into(),
            s(warren::delay::strip_prefix(self.msg.routing_key)),
        );
    }

    /// Publish a dead copy (fail point `dead_publish`); the event to send
    /// next when it is a workflow step's.
    async fn publish_dead(
        &self,
        key: &str,
        props: BasicProperties,
        body: &[u8],
    ) -> Result<Option<Vec<u8>>, warren::Error> {
        fault::check(self.prefix(), Step::DeadPublish).map_err(|text| injected_nack(&text))?;
        let event = super::step_event::dead(&props);
        let ex = self.shared.topo.dead_exchange();
        self.ticket.broker().publish(&ex, key, props, body).await?;
        Ok(event)
    }

    /// A workflow step's final outcome, to the workflows exchange.
    async fn publish_step_event(&self, event: &[u8]) -> Result<(), warren::Error> {
        let ex = self.shared.topo.workflows_exchange();
        let props = super::step_event::properties();
        (self.ticket.broker())
            .publish(&ex, warren::workflow::EVENT, props, event)
            .await
    }
}

/// Not due yet (published without a delay): parked until due. Not an
/// attempt: the copy keeps its attempt number.
fn hold_if_early(found: Found<'_>) -> Stage<Found<'_>> {
    let not_before = found.opened.task.not_before;
    let wait = not_before.and_then(|nb| (nb - found.seen).to_std().ok());
    match wait {
        Some(wait) if wait > warren::delay::RESOLUTION => {
            tracing::debug!(wait = ?wait, "not due yet; delaying");
            Break(park(found.opened.task, wait))
        }
        _ => Continue(found),
    }
}

/// An open breaker keeps `task` back: parked (attempt kept) until the
/// cool-down is over; but once it was kept back `max_park`, every refusal
/// is an attempt that fails with the error this answers, so a target that
/// stays down ends in dead letters once the retry policy runs out.
fn breaker_open(b: &Breaker, remaining: Duration, task: &Task) -> Stage<TaskError> {
    let error = format!(
        "circuit open: handler `{}` failed {} times in a row; sent again after the {} cool-down",
        b.key,
        b.spec.failures,
        humantime::format_duration(b.spec.cooldown)
    );
    let now = Utc::now();
    let since = task.first_failed_at.unwrap_or(now);
    if (now - since).to_std().is_ok_and(|d| d >= b.spec.max_park) {
        tracing::debug!("circuit breaker open past max_park; failing the attempt");
        return Continue(TaskError::retryable(error));
    }
    b.parked.inc();
    let delay = breaker_park(remaining, b.spec.cooldown);
    tracing::debug!(park = ?delay, "circuit breaker open; parking");
    let mut parked = Box::new(task.clone());
    parked.last_error = Some(error);
    // Where the max_park clock starts for a task that never ran.
    parked.first_failed_at.get_or_insert(now);
    Break(park(parked, delay))
}

/// Parked by an open breaker: back after the rest of the cool-down plus up
/// to a quarter of it at random, so the parked tasks do not all return at
/// the instant the probe goes out.
fn breaker_park(remaining: Duration, cooldown: Duration) -> Duration {
    flow::park_delay(remaining + cooldown.mul_f64(rand::random::<f64>() / 4.0))
}

/// `task` parked for `delay`, keeping its attempt.
fn park(task: Box<Task>, delay: Duration) -> Finish {
    Finish::Republish {
        attempts_made: task.attempt,
        copy: task,
        delay,
        outcome: labels::PARKED,
    }
}

/// The copy of the task its handler gets: the attempt's timeout, the
/// trace as seen from this span, and the plaintext.
fn handler_copy(
    task: &Task,
    trace: &TraceContext,
    plaintext: Option<Vec<u8>>,
    timeout: Duration,
) -> Task {
    let mut attempt = task.clone();
    attempt.timeout = Some(timeout);
    attempt.trace = Some(warren::telemetry::handler_trace(
        &tracing::Span::current(),
        trace,
    ));
    if let Some(p) = plaintext {
        attempt.payload = p;
        attempt.content_encoding = None;
    }
    attempt
}

/// Await the handler's future `running` (or fail at once with its error)
/// under `timeout`, panics caught and its result captured (fail point
/// `run`, inside the catch and the timeout).
async fn run_handler(
    prefix: &str,
    running: Result<BoxFut, TaskError>,
    timeout: Duration,
    step: bool,
) -> (Outcome, Option<Value>) {
    let call = async move {
        let running = running?;
        fault::check(prefix, Step::Run).map_err(TaskError::retryable)?;
        running.await
    };
    let run = crate::result::capture(step, AssertUnwindSafe(call).catch_unwind());
    match tokio::time::timeout(timeout, run).await {
        Ok((Ok(Ok(())), result)) => (Outcome::Succeeded, result),
        Ok((Ok(Err(e)), result)) => (Outcome::Failed(e), result),
        Ok((Err(panic), result)) => (
            Outcome::Panicked(warren::error::panic_message(&*panic).to_owned()),
            result,
        ),
        Err(_) => (Outcome::TimedOut(timeout), None),
    }
}

/// What an attempt's outcome says about its handler's target.
fn verdict(outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::Succeeded => Verdict::Answered,
        Outcome::Failed(e) if e.kind == ErrorKind::Permanent => Verdict::Answered,
        Outcome::Failed(_) | Outcome::TimedOut(_) => Verdict::Failed,
        Outcome::Panicked(_) => Verdict::Neither,
    }
}

/// After a publish: ack once it is confirmed.
fn then_ack(published: Result<(), warren::Error>, outcome: &'static str) -> Finish {
    match published {
        Ok(()) => Finish::Ack(outcome),
        Err(e) => Finish::LeaveToSession(e),
    }
}

/// After a dead letter: a workflow step's event next, else the ack.
fn after_dead_letter(
    published: Result<Option<Vec<u8>>, warren::Error>,
    outcome: &'static str,
) -> Finish {
    match published {
        Ok(Some(event)) => Finish::StepEvent { event, outcome },
        Ok(None) => Finish::Ack(outcome),
        Err(e) => Finish::LeaveToSession(e),
    }
}

/// No queue took a retry or parked copy: dead-letter it as it is now, at
/// the attempt made.
fn unroutable(mut copy: Box<Task>, attempts_made: u32, e: &warren::Error) -> Finish {
    copy.attempt = attempts_made;
    Finish::DeadLetter {
        task: copy,
        reason: format!("cannot reschedule: {e}"),
        kind: outcome::kind::UNROUTABLE,
        outcome: labels::DEAD_LETTERED,
    }
}

/// A publish the `failpoints` tests made fail, as the broker would: a nack.
fn injected_nack(text: &str) -> warren::Error {
    tracing::warn!(error = %text, "publish failed (fault injected)");
    warren::Error::Nacked {
        exchange: "(fault injected)".into(),
        routing_key: String::new(),
    }
}

impl Opened {
    /// The delivery's span, entered into the task's trace. The hex is
    /// written once, into the span, and only if the span is on.
    fn span(&self) -> tracing::Span {
        let task = &self.task;
        let span = tracing::info_span!("task", task.id = %task.id, task.name = %task.name, task.attempt = task.attempt, trace_id = %self.trace.trace_id_field());
        warren::telemetry::enter_trace(&span, &self.trace);
        span
    }
}

#[cfg(test)]
mod tests;
