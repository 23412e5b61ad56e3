//! [`Ticket`]: the one way a delivery leaves this consumer — acked, or given
//! back to its queue — and the once-per-delivery metric accounting, shared by
//! the task that handles the delivery and the supervisor that catches its
//! panics. It settles through a [`Broker`], so it is tested without one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::broker::{AckResult, Broker};
use crate::metrics::{ConsumerMetrics, TaskMetrics, UNKNOWN_TASK};
use crate::outcome::labels as label;

pub(super) struct Ticket<'a, B> {
    broker: &'a B,
    metrics: &'a ConsumerMetrics,
    /// Acked, given back, or left to a session that is being closed.
    settled: AtomicBool,
    /// The series of the `task` label the delivery was counted under, once
    /// counted.
    counted: Mutex<Option<Arc<TaskMetrics>>>,
    /// An outcome was counted.
    finished: AtomicBool,
}

impl<'a, B: Broker> Ticket<'a, B> {
    pub(super) fn new(broker: &'a B, metrics: &'a ConsumerMetrics) -> Self {
        Self {
            broker,
            metrics,
            settled: AtomicBool::new(false),
            counted: Mutex::new(None),
            finished: AtomicBool::new(false),
        }
    }

    /// The broker this delivery settles through (its copies go there too).
    pub(super) fn broker(&self) -> &'a B {
        self.broker
    }

    /// Count the delivery (`deliveries_total`) under `task`; its series,
    /// for the rest of the delivery's metrics.
    pub(super) fn received(&self, task: &str) -> Arc<TaskMetrics> {
        let series = self.metrics.task(task);
        series.delivered();
        if let Ok(mut c) = self.counted.lock() {
            *c = Some(series.clone());
        }
        series
    }

    /// Count how the delivery ended (`tasks_total`), once.
    fn finished(&self, outcome: &str) {
        if self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        let series = self.counted.lock().ok().and_then(|c| c.clone());
        match series {
            Some(s) => s.outcome(outcome),
            None => self.metrics.outcome(UNKNOWN_TASK, outcome),
        }
    }

    fn was_counted(&self) -> bool {
        self.counted.lock().map(|c| c.is_some()).unwrap_or(true)
    }

    /// Ack and count `outcome`; if the ack fails the delivery is given back
    /// (counted `requeued`). `fault` is the ack step's fail point. Giving
    /// back is boxed: its state (a nack, a channel close) would otherwise
    /// sit in every delivery's future.
    pub(super) async fn ack(&self, outcome: &'static str, fault: Result<(), String>) {
        if let Err(text) = fault {
            tracing::warn!(error = %text, "ack failed; giving the delivery back");
            // As if the ack never reached the broker: still unacked.
            return Box::pin(self.give_back()).await;
        }
        match self.broker.ack().await {
            AckResult::Acked => {
                self.settled.store(true, Ordering::SeqCst);
                self.finished(outcome);
            }
            AckResult::ChannelClosed => {
                tracing::info!("channel closed before the ack; the broker will redeliver");
                Box::pin(self.give_back()).await
            }
            AckResult::Failed(e) => {
                tracing::info!(error = %e, "ack failed; the broker will redeliver");
                Box::pin(self.give_back()).await
            }
        }
    }

    /// A publish failed: end the session, whose closing connection requeues
    /// the delivery with everything else unacked on it.
    pub(super) fn left_to_session(&self) {
        self.settled.store(true, Ordering::SeqCst);
        self.finished(label::REQUEUED);
        self.broker.abandon_session();
    }

    /// Return the delivery to its queue (see [`Broker::requeue`]), once.
    pub(super) async fn give_back(&self) {
        if self.settled.swap(true, Ordering::SeqCst) {
            return;
        }
        self.finished(label::REQUEUED);
        self.broker.requeue().await;
    }

    /// After a panic anywhere in handling: make sure the delivery ended and
    /// was counted exactly once.
    pub(super) async fn after_panic(&self) {
        if !self.was_counted() {
            self.received(UNKNOWN_TASK);
        }
        // Settling counts the outcome; a settled delivery was counted.
        self.give_back().await;
    }
}
