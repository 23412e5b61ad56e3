//! What happens to one delivery: verify and decrypt it (`security.*`; a
//! refusal is dead-lettered unrun), decode it, find its handler, run it under
//! its timeout, [`decide`] what follows, and carry that out through a
//! [`Broker`] — park, retry, dead-letter, ack or give back — counting the
//! delivery's outcome exactly once.
//!
//! Knows nothing of connections or channels, so every branch is unit-tested
//! here without a broker (see the tests at the bottom).

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::FutureExt;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tracing::Instrument;
use warren::envelope::{headers, rfc3339, PERSISTENT};
use warren::Task;

use super::broker::Broker;
use super::fault::{self, Step};
use super::settle::Ticket;
use super::Shared;
use crate::flow::{self, Admission, Pass, Slot, Verdict};
use crate::handler::{ErrorKind, TaskError};
use crate::metrics::UNKNOWN_TASK;
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
            panic = %panic_message(&*panic),
            routing_key = %warren::delay::strip_prefix(msg.routing_key),
            "panic while handling a delivery; giving it back to its queue"
        );
        Box::pin(ticket.after_panic()).await;
    }
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
    let cfg = &shared.cfg.worker;
    let prefix = shared.topo.prefix();
    let d = Delivered {
        shared,
        msg,
        ticket,
    };
    // Before anything reads the task: a forged or undecryptable delivery is
    // never run, never retried. An oversized body is left to the decode step
    // (poison `oversized`) rather than hashed or decrypted whole.
    let checked = if msg.body.len() > cfg.max_body_bytes {
        Ok(None)
    } else {
        shared
            .opener
            .open(msg.routing_key, msg.properties, msg.body)
    };
    let plaintext = match checked {
        Ok(p) => p,
        Err(refusal) => {
            ticket.received(UNKNOWN_TASK);
            m.refused.with_label_values(&[refusal.kind()]).inc();
            let reason = refusal.to_string();
            tracing::warn!(reason = %reason, kind = refusal.kind(), routing_key = %warren::delay::strip_prefix(msg.routing_key), "delivery refused by security checks; dead-lettering");
            Box::pin(d.dead_letter_raw(&reason, refusal.kind())).await;
            return;
        }
    };
    let decoded = fault::check(prefix, Step::Decode)
        .map_err(|text| (text, "injected"))
        .and_then(|()| {
            Task::decode(
                msg.routing_key,
                msg.properties,
                msg.body,
                cfg.max_body_bytes,
            )
            .and_then(|t| match &plaintext {
                Some(p) => warren::envelope::check_json(p).map(|()| t),
                None => Ok(t),
            })
            .map_err(|e| (e.to_string(), e.kind()))
        });
    // Boxed: the task is moved from here into the handling below and kept
    // there across every await; by value each move would leave another
    // 500-byte slot in this future's state.
    let mut task = match decoded.map(Box::new) {
        Ok(t) => t,
        Err((error, kind)) => {
            ticket.received(UNKNOWN_TASK);
            tracing::warn!(error = %error, kind, routing_key = %msg.routing_key, "poison message; dead-lettering");
            Box::pin(d.dead_letter_raw(&error, kind)).await;
            return;
        }
    };
    // A task from a plain client starts its trace here; every copy made
    // below (retry, park, dead letter) carries it on.
    let trace = task.ensure_trace().clone();
    // The hex is written once, into the span, and only if the span is on.
    let span = tracing::info_span!("task", task.id = %task.id, task.name = %task.name, task.attempt = task.attempt, trace_id = %trace.trace_id_field());
    warren::telemetry::enter_trace(&span, &trace);
    async {
        let resolved = match fault::check(prefix, Step::Resolve) {
            Ok(()) => shared.registry.resolve(&task.name),
            Err(text) => {
                tracing::warn!(error = %text, "handler lookup failed");
                None
            }
        };
        let Some(handler) = resolved else {
            ticket.received(UNKNOWN_TASK);
            tracing::warn!("no handler for this task; dead-lettering");
            let reason = format!("no handler for task `{}`", task.name);
            shared
                .life
                .dead_unrun(&task, msg.queue, outcome::kind::NO_HANDLER, &reason);
            let mut t = *task;
            t.last_error = Some(reason.clone());
            Box::pin(d.dead_letter(t, &reason, outcome::kind::NO_HANDLER, labels::REJECTED)).await;
            return;
        };
        let series = ticket.received(handler.label);
        let now = Utc::now();
        if let Some(nb) = task.not_before {
            if let Ok(wait) = (nb - now).to_std() {
                if wait > warren::delay::RESOLUTION {
                    // Early (published without a delay): park it until due.
                    // Not an attempt: the copy keeps its attempt number.
                    tracing::debug!(wait = ?wait, "not due yet; delaying");
                    Box::pin(d.republish(&task, wait, task.attempt, labels::PARKED)).await;
                    return;
                }
            }
        }
        let Some(Admitted {
            pass,
            slot,
            refused,
        }) = d.admit(&task, handler.label).await
        else {
            return;
        };
        // After any wait for a limit: queue wait runs up to the real start.
        let now = if slot.is_some() { Utc::now() } else { now };
        if let Some(w) = task.queue_wait(now) {
            series.queue_wait(w.as_secs_f64());
        }
        // One timeout per attempt, for every kind of handler: the task's
        // header, else the handler's own, else the worker's default. The
        // handler gets it in `task.timeout` (e.g. exec kills its child then).
        let timeout = task
            .timeout
            .or(handler.timeout())
            .unwrap_or(cfg.task_timeout);
        tracing::debug!(redelivered = msg.redelivered, "task started");
        let started = Instant::now();
        let mut life_run = shared.life.started(&task, msg.queue);
        // Retries and dead letters republish `task` as it came (ciphertext,
        // signature intact); only the handler sees the plaintext.
        let mut attempt = Task::clone(&task);
        attempt.timeout = Some(timeout);
        attempt.trace = Some(warren::telemetry::handler_trace(
            &tracing::Span::current(),
            &trace,
        ));
        if let Some(p) = plaintext {
            attempt.payload = p;
            attempt.content_encoding = None;
        }
        // The handler's future is made here, so the attempt moves straight
        // into it instead of waiting as a second copy of the task in this
        // future's state. Making it runs none of the handler's code (that
        // starts at its first poll, inside the catch and the timeout, like
        // the fail point).
        let running = match refused {
            Some(e) => Err(e),
            None => Ok(handler.call(attempt)),
        };
        let call = async move {
            let running = running?;
            fault::check(prefix, Step::Run).map_err(TaskError::retryable)?;
            running.await
        };
        let run = AssertUnwindSafe(call).catch_unwind();
        let keep = task.step.is_some() || shared.life.keeps_result(&task.name);
        let run = crate::result::capture(keep, run);
        let (finished, result) = match tokio::time::timeout(timeout, run).await {
            Ok((r, result)) => (Ok(r), result),
            Err(e) => (Err(e), None),
        };
        let outcome = match finished {
            Ok(Ok(Ok(()))) => Outcome::Succeeded,
            Ok(Ok(Err(e))) => Outcome::Failed(e),
            Ok(Err(panic)) => Outcome::Panicked(panic_message(&*panic)),
            Err(_) => Outcome::TimedOut(timeout),
        };
        series.duration(started.elapsed().as_secs_f64());
        drop(slot);
        if let Some(pass) = pass {
            pass.record(verdict(&outcome));
        }
        let policy = shared
            .cfg
            .retry
            .policy_for(&task.name)
            .with_overrides(task.max_attempts, &task.retry);
        let action = decide(&outcome, task.attempt, &policy, rand::random::<f64>());
        let counted = outcome::label(&action);
        life_run.settled();
        let encrypted = warren::security::is_encrypted(msg.properties);
        let took = started.elapsed();
        shared
            .life
            .finished(&task, msg.queue, &action, took, result.as_ref(), encrypted);
        match action {
            Action::Ack => {
                tracing::debug!("task succeeded");
                let max = shared.cfg.workflow.max_result_bytes;
                match super::step_event::succeeded(&task, result, max) {
                    Some(ev) => Box::pin(d.step_event_then_ack(&ev, counted)).await,
                    None => d.ack(counted).await,
                }
            }
            Action::Retry { delay, error } => {
                tracing::warn!(error = %error, retry_in = ?delay, "task failed; retrying");
                let done = task.attempt;
                let mut next = task;
                next.attempt = next.attempt.saturating_add(1);
                next.last_error = Some(error);
                next.first_failed_at.get_or_insert(now);
                Box::pin(d.republish(&next, delay, done, counted)).await
            }
            Action::DeadLetter {
                reason,
                kind,
                error,
            } => {
                tracing::warn!(reason = %reason, kind, "task dead-lettered");
                let mut t = *task;
                t.last_error = Some(error);
                t.first_failed_at.get_or_insert(now);
                Box::pin(d.dead_letter(t, &reason, kind, counted)).await
            }
        }
    }
    .instrument(span)
    .await;
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

/// Parked by an open breaker: back after the rest of the cool-down plus up
/// to a quarter of it at random, so the parked tasks do not all return at
/// the instant the probe goes out.
fn breaker_park(remaining: Duration, cooldown: Duration) -> Duration {
    flow::park_delay(remaining + cooldown.mul_f64(rand::random::<f64>() / 4.0))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Let through by flow control: hold both until the handler returned.
struct Admitted<'a> {
    pass: Option<Pass<'a>>,
    slot: Option<Slot<'a>>,
    /// Kept back by an open breaker past `breaker.max_park`: this attempt
    /// fails with this error instead of calling the handler.
    refused: Option<TaskError>,
}

/// A delivery being finished: every path settles it exactly once through
/// its [`Ticket`] (ack or give back), and acks only after any copy it
/// publishes is confirmed.
struct Delivered<'a, 'b, B> {
    shared: &'a Shared,
    msg: &'a Incoming<'b>,
    ticket: &'a Ticket<'a, B>,
}

impl<'a, B: Broker> Delivered<'a, '_, B> {
    fn prefix(&self) -> &str {
        self.shared.topo.prefix()
    }

    /// Flow control before the handler runs: the breaker first (asking
    /// costs nothing, and a task that will not be sent must not spend a
    /// limit's slot; a pass dropped unused leaves the breaker as it was),
    /// then the task's limit. `None`: the task was parked, attempt kept.
    async fn admit(&self, task: &Task, label: &str) -> Option<Admitted<'a>> {
        let flow = &self.shared.flow;
        let pass = match flow.breaker(label) {
            None => None,
            Some(b) => match b.pass() {
                Ok(p) => Some(p),
                Err(refused) => {
                    let error = format!(
                        "circuit open: handler `{label}` failed {} times in a row; sent again after the {} cool-down",
                        b.spec.failures,
                        humantime::format_duration(b.spec.cooldown)
                    );
                    // Kept back for free only so long: then every refusal is
                    // an attempt, and a target that stays down ends in dead
                    // letters once the retry policy runs out.
                    let now = Utc::now();
                    let since = task.first_failed_at.unwrap_or(now);
                    if (now - since).to_std().is_ok_and(|d| d >= b.spec.max_park) {
                        tracing::debug!("circuit breaker open past max_park; failing the attempt");
                        return Some(Admitted {
                            pass: None,
                            slot: None,
                            refused: Some(TaskError::retryable(error)),
                        });
                    }
                    b.parked.inc();
                    let delay = breaker_park(refused.remaining, b.spec.cooldown);
                    tracing::debug!(park = ?delay, "circuit breaker open; parking");
                    let mut parked = task.clone();
                    parked.last_error = Some(error);
                    // Where the max_park clock starts for a task that never ran.
                    parked.first_failed_at.get_or_insert(now);
                    Box::pin(self.republish(&parked, delay, task.attempt, labels::PARKED)).await;
                    return None;
                }
            },
        };
        let slot = match flow.limit(&task.name) {
            None => None,
            Some(limit) => match Box::pin(limit.admit()).await {
                Admission::Run(slot) => Some(slot),
                Admission::Park(delay) => {
                    tracing::debug!(limit = %limit.key, park = ?delay, "over its limit; parking");
                    Box::pin(self.republish(task, delay, task.attempt, labels::PARKED)).await;
                    return None;
                }
            },
        };
        Some(Admitted {
            pass,
            slot,
            refused: None,
        })
    }

    async fn ack(&self, outcome: &'static str) {
        let fault = fault::check(self.prefix(), Step::Ack);
        self.ticket.ack(outcome, fault).await
    }

    /// A publish failed: leave the delivery unacked and end the session, so
    /// the connection closes and the broker redelivers it.
    fn publish_failed(&self, e: &warren::Error) {
        tracing::warn!(error = %e, "publish failed; delivery left unacked, reconnecting");
        self.ticket.left_to_session();
    }

    /// Publish `copy` (a retry copy, or a task parked until due) after
    /// `delay`, then ack counting `outcome`. If no queue takes it, the task
    /// is dead-lettered as it is now: attempt `attempts_made`.
    async fn republish(
        &self,
        copy: &Task,
        delay: Duration,
        attempts_made: u32,
        outcome: &'static str,
    ) {
        // The broker's own death records must not travel with the copy:
        // RabbitMQ drops a message whose `x-death` already lists a delay
        // level it expires from again (dead-letter cycle detection).
        let mut copy = copy.clone();
        copy.extra_headers = strip_death_headers(&copy.extra_headers);
        let res = match fault::check(self.prefix(), Step::RetryPublish) {
            Err(text) => Err(injected_nack(&text)),
            Ok(()) => {
                let (exchange, key) = self.shared.topo.route(&copy.name, delay);
                self.ticket
                    .broker()
                    .publish(&exchange, &key, copy.properties(), &copy.payload)
                    .await
            }
        };
        match res {
            Ok(()) => self.ack(outcome).await,
            Err(e @ warren::Error::Unroutable { .. }) => {
                let reason = format!("cannot reschedule: {e}");
                let mut t = copy;
                t.attempt = attempts_made;
                Box::pin(self.dead_letter(
                    t,
                    &reason,
                    outcome::kind::UNROUTABLE,
                    labels::DEAD_LETTERED,
                ))
                .await
            }
            Err(e) => self.publish_failed(&e),
        }
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

    /// Publish `task` to the dead exchange with why, then ack counting `outcome`.
    async fn dead_letter(&self, mut task: Task, reason: &str, kind: &str, outcome: &'static str) {
        let mut h = strip_death_headers(&task.extra_headers);
        self.dead_headers(&mut h, reason, kind);
        // Always present on dead copies (the envelope omits attempt 1).
        h.insert(
            headers::ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(task.attempt)),
        );
        task.extra_headers = h;
        let props = task.properties();
        self.publish_dead(&task.name, props, &task.payload, outcome)
            .await
    }

    /// Dead-letter an undecodable message as it came, plus the dead headers.
    async fn dead_letter_raw(&self, reason: &str, kind: &str) {
        let props = self.msg.properties.clone();
        let mut h = props.headers().clone().unwrap_or_default();
        self.dead_headers(&mut h, reason, kind);
        let props = props.with_headers(h).with_delivery_mode(PERSISTENT);
        let key = warren::delay::strip_prefix(self.msg.routing_key);
        self.publish_dead(key, props, self.msg.body, labels::REJECTED)
            .await
    }

    async fn publish_dead(
        &self,
        key: &str,
        props: BasicProperties,
        body: &[u8],
        outcome: &'static str,
    ) {
        let ex = self.shared.topo.dead_exchange();
        let res = match fault::check(self.prefix(), Step::DeadPublish) {
            Err(text) => Err(injected_nack(&text)),
            Ok(()) => {
                let event = super::step_event::dead(&props);
                self.ticket
                    .broker()
                    .publish(&ex, key, props, body)
                    .await
                    .map(|()| event)
            }
        };
        match res {
            Ok(Some(ev)) => Box::pin(self.step_event_then_ack(&ev, outcome)).await,
            Ok(None) => self.ack(outcome).await,
            Err(e) => self.publish_failed(&e),
        }
    }

    /// A workflow step's final outcome: its event first (confirmed), then
    /// the ack. If the event cannot be sent the delivery is not acked.
    async fn step_event_then_ack(&self, event: &[u8], outcome: &'static str) {
        let ex = self.shared.topo.workflows_exchange();
        let props = super::step_event::properties();
        match self
            .ticket
            .broker()
            .publish(&ex, warren::workflow::EVENT, props, event)
            .await
        {
            Ok(()) => self.ack(outcome).await,
            Err(e) => self.publish_failed(&e),
        }
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

#[cfg(test)]
mod tests;
