//! The consumer's Prometheus metrics. Names are a public contract (dashboards
//! and alerts use them); the `task` label is a registered task name or
//! pattern, or `<unknown>` for anything without a handler, so label values
//! stay bounded whatever arrives.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// `task` label for deliveries without a handler (including undecodable ones).
pub const UNKNOWN_TASK: &str = "<unknown>";

#[derive(Clone)]
pub struct ConsumerMetrics {
    pub deliveries: IntCounterVec,
    pub tasks: IntCounterVec,
    pub duration: HistogramVec,
    pub queue_wait: HistogramVec,
    pub in_flight: IntGauge,
    pub panics: IntCounter,
    pub refused: IntCounterVec,
}

const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

impl ConsumerMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            deliveries: IntCounterVec::new(
                Opts::new(
                    "warren_consumer_deliveries_total",
                    "Deliveries received from the work queues",
                ),
                &["task"],
            )?,
            tasks: IntCounterVec::new(
                Opts::new(
                    "warren_consumer_tasks_total",
                    "Deliveries that left this consumer, by outcome (succeeded, retried, dead_lettered, rejected = poison, parked = not due yet or held back by flow control, requeued = given back unfinished)",
                ),
                &["task", "outcome"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "warren_consumer_task_duration_seconds",
                    "Handler run time per attempt",
                )
                .buckets(BUCKETS.to_vec()),
                &["task"],
            )?,
            queue_wait: HistogramVec::new(
                HistogramOpts::new(
                    "warren_consumer_queue_wait_seconds",
                    "Time from publish to handler start",
                )
                .buckets(BUCKETS.to_vec()),
                &["task"],
            )?,
            in_flight: IntGauge::new(
                "warren_consumer_in_flight",
                "Tasks being handled right now",
            )?,
            panics: IntCounter::new(
                "warren_consumer_panics_total",
                "Panics while handling a delivery outside the handler call (the delivery was given back to its queue)",
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "warren_consumer_refused_total",
                    "Deliveries dead-lettered unrun by security.*, by kind (bad_signature: missing, malformed, unknown key or mismatch; undecryptable)",
                ),
                &["kind"],
            )?,
        };
        for kind in [
            warren::security::open::kind::BAD_SIGNATURE,
            warren::security::open::kind::UNDECRYPTABLE,
        ] {
            m.refused.with_label_values(&[kind]);
        }
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.tasks.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.queue_wait.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.panics.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        Ok(m)
    }

    pub fn outcome(&self, task: &str, outcome: &str) {
        self.tasks.with_label_values(&[task, outcome]).inc();
    }
}
