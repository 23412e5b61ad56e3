//! The consumer's Prometheus metrics. Names are a public contract (dashboards
//! and alerts use them); the `task` label is a registered task name or
//! pattern, or `<unknown>` for anything without a handler, so label values
//! stay bounded whatever arrives.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::outcome::labels;

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
    /// Handles of each `task` label seen so far (bounded like the labels).
    by_task: Arc<RwLock<HashMap<String, Arc<TaskMetrics>>>>,
}

/// The series of one `task` label. `with_label_values` hashes the labels and
/// takes a lock on every call; a delivery looks its label up here once and
/// uses the handles. Each series is created on first use, so `/metrics`
/// shows the same series as without the cache.
pub struct TaskMetrics {
    label: String,
    vecs: TaskVecs,
    deliveries: OnceLock<IntCounter>,
    queue_wait: OnceLock<Histogram>,
    duration: OnceLock<Histogram>,
    succeeded: OnceLock<IntCounter>,
}

/// The vectors a [`TaskMetrics`] takes its series from (not the whole
/// [`ConsumerMetrics`], whose map holds the `TaskMetrics`).
struct TaskVecs {
    deliveries: IntCounterVec,
    tasks: IntCounterVec,
    duration: HistogramVec,
    queue_wait: HistogramVec,
}

impl TaskMetrics {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn delivered(&self) {
        self.deliveries
            .get_or_init(|| self.vecs.deliveries.with_label_values(&[&self.label]))
            .inc();
    }

    pub fn queue_wait(&self, seconds: f64) {
        self.queue_wait
            .get_or_init(|| self.vecs.queue_wait.with_label_values(&[&self.label]))
            .observe(seconds);
    }

    pub fn duration(&self, seconds: f64) {
        self.duration
            .get_or_init(|| self.vecs.duration.with_label_values(&[&self.label]))
            .observe(seconds);
    }

    /// Count how a delivery left (`tasks_total`); the common outcome has its
    /// handle, the rare ones are looked up.
    pub fn outcome(&self, outcome: &str) {
        if outcome == labels::SUCCEEDED {
            self.succeeded
                .get_or_init(|| {
                    self.vecs
                        .tasks
                        .with_label_values(&[&self.label, labels::SUCCEEDED])
                })
                .inc();
        } else {
            self.vecs
                .tasks
                .with_label_values(&[&self.label, outcome])
                .inc();
        }
    }
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
            by_task: Arc::default(),
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

    /// The handles of `task`'s series (see [`TaskMetrics`]).
    pub fn task(&self, task: &str) -> Arc<TaskMetrics> {
        // A poisoned map still holds valid handles.
        if let Some(t) = self
            .by_task
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(task)
        {
            return t.clone();
        }
        let mut map = self.by_task.write().unwrap_or_else(|p| p.into_inner());
        map.entry(task.to_owned())
            .or_insert_with(|| {
                Arc::new(TaskMetrics {
                    label: task.to_owned(),
                    vecs: TaskVecs {
                        deliveries: self.deliveries.clone(),
                        tasks: self.tasks.clone(),
                        duration: self.duration.clone(),
                        queue_wait: self.queue_wait.clone(),
                    },
                    deliveries: OnceLock::new(),
                    queue_wait: OnceLock::new(),
                    duration: OnceLock::new(),
                    succeeded: OnceLock::new(),
                })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(registry: &Registry) -> Vec<String> {
        let mut names: Vec<String> = registry
            .gather()
            .iter()
            .filter(|f| !f.get_metric().is_empty())
            .map(|f| f.name().to_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn cached_handles_count_in_the_labelled_series_and_create_them_on_first_use() {
        let registry = Registry::new();
        let m = ConsumerMetrics::register(&registry).expect("register");
        let t = m.task("email.send");
        assert!(
            Arc::ptr_eq(&t, &m.task("email.send")),
            "one lookup per label"
        );
        t.delivered();
        // Of the labelled series, only what was used shows up, as with
        // `with_label_values`.
        let by_task = |r: &Registry| {
            series(r)
                .into_iter()
                .filter(|n| {
                    !n.contains("in_flight") && !n.contains("panics") && !n.contains("refused")
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(by_task(&registry), vec!["warren_consumer_deliveries_total"]);
        t.outcome(labels::SUCCEEDED);
        t.outcome(labels::SUCCEEDED);
        t.outcome(labels::RETRIED);
        t.duration(0.002);
        let get = |o: &str| m.tasks.with_label_values(&["email.send", o]).get();
        assert_eq!((get("succeeded"), get("retried")), (2, 1));
        assert_eq!(m.deliveries.with_label_values(&["email.send"]).get(), 1);
        assert_eq!(
            m.duration
                .with_label_values(&["email.send"])
                .get_sample_count(),
            1
        );
        assert_eq!(
            m.queue_wait
                .with_label_values(&["email.send"])
                .get_sample_count(),
            0
        );
    }
}
