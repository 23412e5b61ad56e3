//! The producer's Prometheus metrics. Names are a public contract (dashboards
//! and alerts use them); label values are bounded: schedule names from config
//! and the publish sources, never task ids.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// The `event` values of `warren_producer_workflow_runs_total`.
pub const WORKFLOW_RUN_EVENTS: [&str; 6] = [
    "started",
    "succeeded",
    "failed",
    "compensated",
    "compensation_failed",
    "resumed",
];

/// Where a publish came from (the `source` label). `publish` on the command
/// line is a process of its own that serves no metrics, so it has no source.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Schedule,
    Api,
    Console,
    /// Step tasks published by the workflow coordinator.
    Workflow,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Schedule => "schedule",
            Source::Api => "api",
            Source::Console => "console",
            Source::Workflow => "workflow",
        }
    }
}

/// Fire-lag buckets, role-wide and per schedule.
const FIRE_LAG_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Clone)]
pub struct Metrics {
    /// Role-wide: every schedule's fires, lag and misses, in three series
    /// whatever the number of schedules.
    pub fires_all: IntCounter,
    pub fire_lag_all: Histogram,
    pub missed_all: IntCounter,
    /// Per schedule, for the first `metrics.per_schedule_limit` schedules
    /// only (see [`Metrics::tracks`]).
    pub fires: IntCounterVec,
    pub fire_lag: HistogramVec,
    pub missed: IntCounterVec,
    /// Schedules in force, by source (`config`, `api`).
    pub schedules: IntGaugeVec,
    /// The schedules that have series of their own.
    tracked: Arc<Mutex<HashSet<String>>>,
    per_schedule_limit: usize,
    pub published: IntCounterVec,
    pub publish_failures: IntCounterVec,
    pub next_fire: GaugeVec,
    pub last_fire: GaugeVec,
    pub leader: IntGauge,
    pub reload_success: Gauge,
    pub actions: IntCounterVec,
    pub workflow: WorkflowMetrics,
}

/// Workflow runs (docs/workflows.md#metrics): only the leader counts.
#[derive(Clone)]
pub struct WorkflowMetrics {
    pub runs: IntCounterVec,
    pub duration: HistogramVec,
    pub active: IntGauge,
    pub republished: IntCounter,
    pub duplicates: IntCounter,
    pub ignored: IntCounterVec,
}

impl Metrics {
    pub fn register(r: &Registry, per_schedule_limit: usize) -> prometheus::Result<Self> {
        let m = Self {
            fires_all: counter(r, &FIRES_ALL)?,
            fire_lag_all: histogram(r, &FIRE_LAG_ALL, &FIRE_LAG_BUCKETS)?,
            missed_all: counter(r, &MISSED_ALL)?,
            fires: counter_vec(r, &FIRES)?,
            fire_lag: histogram_vec(r, &FIRE_LAG, &FIRE_LAG_BUCKETS)?,
            missed: counter_vec(r, &MISSED)?,
            schedules: int_gauge_vec(r, &SCHEDULES)?,
            tracked: Arc::default(),
            per_schedule_limit,
            published: counter_vec(r, &PUBLISHED)?,
            publish_failures: counter_vec(r, &PUBLISH_FAILURES)?,
            next_fire: gauge_vec(r, &NEXT_FIRE)?,
            last_fire: gauge_vec(r, &LAST_FIRE)?,
            leader: int_gauge(r, &LEADER)?,
            reload_success: gauge(r, &RELOAD_SUCCESS)?,
            actions: counter_vec(r, &ACTIONS)?,
            workflow: WorkflowMetrics::register(r)?,
        };
        m.init_series();
        Ok(m)
    }

    /// Series that exist from the start: at 0 (an alert on `increase()`
    /// then sees the first one too), the reload gauge at 1.
    fn init_series(&self) {
        for source in ["config", "api"] {
            self.schedules.with_label_values(&[source]);
        }
        self.reload_success.set(1.0);
        for s in [
            Source::Schedule,
            Source::Api,
            Source::Console,
            Source::Workflow,
        ] {
            self.published.with_label_values(&[s.label()]);
            self.publish_failures.with_label_values(&[s.label()]);
        }
    }

    /// Whether `name` has series of its own: the first
    /// `per_schedule_limit` schedules do, so that `/metrics` stays small
    /// however many schedules there are.
    pub fn tracks(&self, name: &str) -> bool {
        self.tracked.lock().is_ok_and(|t| t.contains(name))
    }

    /// Make a schedule's series exist from the start (zero, not absent),
    /// while there is room under the limit.
    pub fn init_schedule(&self, name: &str) {
        let Ok(mut t) = self.tracked.lock() else {
            return;
        };
        if !t.contains(name) {
            if t.len() >= self.per_schedule_limit {
                return;
            }
            t.insert(name.to_owned());
        }
        self.fires.with_label_values(&[name]);
        self.missed.with_label_values(&[name]);
        self.fire_lag.with_label_values(&[name]);
    }

    /// One confirmed fire, `lag` after its instant `t`.
    pub fn fired(&self, name: &str, t: DateTime<Utc>, lag: f64) {
        self.fires_all.inc();
        self.fire_lag_all.observe(lag);
        if self.tracks(name) {
            self.fires.with_label_values(&[name]).inc();
            self.fire_lag.with_label_values(&[name]).observe(lag);
            self.last_fire
                .with_label_values(&[name])
                .set(t.timestamp_millis() as f64 / 1000.0);
        }
    }

    /// `n` instants of `name` that will not fire.
    pub fn missed(&self, name: &str, n: u64) {
        self.missed_all.inc_by(n);
        if self.tracks(name) {
            self.missed.with_label_values(&[name]).inc_by(n);
        }
    }

    /// The next fire of `name` (`None`: never again, shown as 0).
    pub fn next_fire(&self, name: &str, next: Option<DateTime<Utc>>) {
        if self.tracks(name) {
            let v = next.map_or(0.0, |n| n.timestamp_millis() as f64 / 1000.0);
            self.next_fire.with_label_values(&[name]).set(v);
        }
    }

    /// Drop the series of a schedule removed by a reload.
    pub fn forget_schedule(&self, name: &str) {
        if let Ok(mut t) = self.tracked.lock() {
            t.remove(name);
        }
        let _ = self.fires.remove_label_values(&[name]);
        let _ = self.missed.remove_label_values(&[name]);
        let _ = self.fire_lag.remove_label_values(&[name]);
        let _ = self.next_fire.remove_label_values(&[name]);
        let _ = self.last_fire.remove_label_values(&[name]);
    }
}

impl WorkflowMetrics {
    fn register(r: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            runs: counter_vec(r, &WF_RUNS)?,
            duration: histogram_vec(r, &WF_DURATION, &RUN_DURATION_BUCKETS)?,
            active: int_gauge(r, &WF_ACTIVE)?,
            republished: counter(r, &WF_REPUBLISHED)?,
            duplicates: counter(r, &WF_DUPLICATES)?,
            ignored: counter_vec(r, &WF_IGNORED)?,
        })
    }
}

/// One series (or family): its name, help text and label names.
struct Def {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

impl Def {
    fn opts(&self) -> Opts {
        Opts::new(self.name, self.help)
    }

    fn histogram_opts(&self, buckets: &[f64]) -> HistogramOpts {
        HistogramOpts::new(self.name, self.help).buckets(buckets.to_vec())
    }
}

/// Register `c` with `r`, and hand it back.
fn reg<C: Collector + Clone + 'static>(r: &Registry, c: C) -> prometheus::Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, d: &Def) -> prometheus::Result<IntCounter> {
    reg(r, IntCounter::with_opts(d.opts())?)
}

fn counter_vec(r: &Registry, d: &Def) -> prometheus::Result<IntCounterVec> {
    reg(r, IntCounterVec::new(d.opts(), d.labels)?)
}

fn gauge(r: &Registry, d: &Def) -> prometheus::Result<Gauge> {
    reg(r, Gauge::with_opts(d.opts())?)
}

fn gauge_vec(r: &Registry, d: &Def) -> prometheus::Result<GaugeVec> {
    reg(r, GaugeVec::new(d.opts(), d.labels)?)
}

fn int_gauge(r: &Registry, d: &Def) -> prometheus::Result<IntGauge> {
    reg(r, IntGauge::with_opts(d.opts())?)
}

fn int_gauge_vec(r: &Registry, d: &Def) -> prometheus::Result<IntGaugeVec> {
    reg(r, IntGaugeVec::new(d.opts(), d.labels)?)
}

fn histogram(r: &Registry, d: &Def, buckets: &[f64]) -> prometheus::Result<Histogram> {
    reg(r, Histogram::with_opts(d.histogram_opts(buckets))?)
}

fn histogram_vec(r: &Registry, d: &Def, buckets: &[f64]) -> prometheus::Result<HistogramVec> {
    reg(r, HistogramVec::new(d.histogram_opts(buckets), d.labels)?)
}

/// `warren_producer_workflow_run_duration_seconds`: 0.1 s to a day.
const RUN_DURATION_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

// Every series of the producer's own (the AMQP ones are `warren::metrics`).
const FIRES_ALL: Def = Def {
    name: "warren_producer_fires_total",
    help: "Scheduled fires published and confirmed by the broker, all schedules",
    labels: &[],
};

const FIRE_LAG_ALL: Def = Def {
    name: "warren_producer_fire_lag_seconds",
    help: "Time from a fire's scheduled instant to the broker's confirm, all schedules",
    labels: &[],
};

const MISSED_ALL: Def = Def {
    name: "warren_producer_missed_fires_total",
    help: "Scheduled fires not published (misfire policy, grace exceeded or publish failed), all schedules",
    labels: &[],
};

const FIRES: Def = Def {
    name: "warren_producer_schedule_fires_total",
    help: "Scheduled fires published and confirmed, per schedule (the first metrics.per_schedule_limit schedules)",
    labels: &["schedule"],
};

const FIRE_LAG: Def = Def {
    name: "warren_producer_schedule_fire_lag_seconds",
    help: "Time from a fire's scheduled instant to the broker's confirm, per schedule (the first metrics.per_schedule_limit schedules)",
    labels: &["schedule"],
};

const MISSED: Def = Def {
    name: "warren_producer_schedule_missed_fires_total",
    help: "Scheduled fires not published, per schedule (the first metrics.per_schedule_limit schedules)",
    labels: &["schedule"],
};

const SCHEDULES: Def = Def {
    name: "warren_producer_schedules",
    help: "Schedules in force, by source (config, api)",
    labels: &["source"],
};

const PUBLISHED: Def = Def {
    name: "warren_producer_published_total",
    help: "Tasks published and confirmed, by source",
    labels: &["source"],
};

const PUBLISH_FAILURES: Def = Def {
    name: "warren_producer_publish_failures_total",
    help: "Task publishes that failed (nack, return, timeout, connection loss), by source",
    labels: &["source"],
};

const NEXT_FIRE: Def = Def {
    name: "warren_producer_next_fire_timestamp_seconds",
    help: "Unix time of each schedule's next fire",
    labels: &["schedule"],
};

const LAST_FIRE: Def = Def {
    name: "warren_producer_last_fire_timestamp_seconds",
    help: "Unix time of the scheduled instant of each schedule's last confirmed fire",
    labels: &["schedule"],
};

const LEADER: Def = Def {
    name: "warren_producer_leader",
    help: "1 while this replica is the active scheduler",
    labels: &[],
};

const RELOAD_SUCCESS: Def = Def {
    name: "warren_producer_config_last_reload_successful",
    help: "1 if the last schedule reload (SIGHUP) succeeded, 0 if it was rejected",
    labels: &[],
};

const ACTIONS: Def = Def {
    name: "warren_producer_actions_total",
    help: "Mutating API requests (trigger, publish, pause, resume, replay, purge), by result",
    labels: &["action", "result"],
};

const WF_RUNS: Def = Def {
    name: "warren_producer_workflow_runs_total",
    help: "Workflow run transitions (started, succeeded, failed, compensated, compensation_failed, resumed), by workflow",
    labels: &["workflow", "event"],
};

const WF_DURATION: Def = Def {
    name: "warren_producer_workflow_run_duration_seconds",
    help: "Time from a run's start to its end, by workflow and final status",
    labels: &["workflow", "result"],
};

const WF_ACTIVE: Def = Def {
    name: "warren_producer_workflow_runs_active",
    help: "Workflow runs not finished (on the leader; 0 elsewhere)",
    labels: &[],
};

const WF_REPUBLISHED: Def = Def {
    name: "warren_producer_workflow_steps_republished_total",
    help: "Step tasks a new leader published again because the previous one had recorded but not confirmed them (possible duplicates)",
    labels: &[],
};

const WF_DUPLICATES: Def = Def {
    name: "warren_producer_workflow_duplicate_events_total",
    help: "Step events for a step already settled or an older execution, ignored",
    labels: &[],
};

const WF_IGNORED: Def = Def {
    name: "warren_producer_workflow_messages_ignored_total",
    help: "Workflow messages ignored, by reason (duplicate_start, unknown_workflow, unknown_run, unknown_step, not_resumable, invalid)",
    labels: &["reason"],
};
