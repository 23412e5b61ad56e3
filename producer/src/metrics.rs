//! The producer's Prometheus metrics. Names are a public contract (dashboards
//! and alerts use them); label values are bounded: schedule names from config
//! and the publish sources, never task ids.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
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
    /// Workflow runs (docs/workflows.md#metrics): only the leader counts.
    pub wf_runs: IntCounterVec,
    pub wf_duration: HistogramVec,
    pub wf_active: IntGauge,
    pub wf_republished: IntCounter,
    pub wf_duplicates: IntCounter,
    pub wf_ignored: IntCounterVec,
}

impl Metrics {
    pub fn register(r: &Registry, per_schedule_limit: usize) -> prometheus::Result<Self> {
        let m = Self {
            fires_all: IntCounter::new(
                "warren_producer_fires_total",
                "Scheduled fires published and confirmed by the broker, all schedules",
            )?,
            fire_lag_all: Histogram::with_opts(
                HistogramOpts::new(
                    "warren_producer_fire_lag_seconds",
                    "Time from a fire's scheduled instant to the broker's confirm, all schedules",
                )
                .buckets(FIRE_LAG_BUCKETS.to_vec()),
            )?,
            missed_all: IntCounter::new(
                "warren_producer_missed_fires_total",
                "Scheduled fires not published (misfire policy, grace exceeded or publish failed), all schedules",
            )?,
            fires: IntCounterVec::new(
                Opts::new(
                    "warren_producer_schedule_fires_total",
                    "Scheduled fires published and confirmed, per schedule (the first metrics.per_schedule_limit schedules)",
                ),
                &["schedule"],
            )?,
            fire_lag: HistogramVec::new(
                HistogramOpts::new(
                    "warren_producer_schedule_fire_lag_seconds",
                    "Time from a fire's scheduled instant to the broker's confirm, per schedule (the first metrics.per_schedule_limit schedules)",
                )
                .buckets(FIRE_LAG_BUCKETS.to_vec()),
                &["schedule"],
            )?,
            missed: IntCounterVec::new(
                Opts::new(
                    "warren_producer_schedule_missed_fires_total",
                    "Scheduled fires not published, per schedule (the first metrics.per_schedule_limit schedules)",
                ),
                &["schedule"],
            )?,
            schedules: IntGaugeVec::new(
                Opts::new(
                    "warren_producer_schedules",
                    "Schedules in force, by source (config, api)",
                ),
                &["source"],
            )?,
            tracked: Arc::default(),
            per_schedule_limit,
            published: IntCounterVec::new(
                Opts::new(
                    "warren_producer_published_total",
                    "Tasks published and confirmed, by source",
                ),
                &["source"],
            )?,
            publish_failures: IntCounterVec::new(
                Opts::new(
                    "warren_producer_publish_failures_total",
                    "Task publishes that failed (nack, return, timeout, connection loss), by source",
                ),
                &["source"],
            )?,
            next_fire: GaugeVec::new(
                Opts::new(
                    "warren_producer_next_fire_timestamp_seconds",
                    "Unix time of each schedule's next fire",
                ),
                &["schedule"],
            )?,
            last_fire: GaugeVec::new(
                Opts::new(
                    "warren_producer_last_fire_timestamp_seconds",
                    "Unix time of the scheduled instant of each schedule's last confirmed fire",
                ),
                &["schedule"],
            )?,
            leader: IntGauge::new(
                "warren_producer_leader",
                "1 while this replica is the active scheduler",
            )?,
            reload_success: Gauge::new(
                "warren_producer_config_last_reload_successful",
                "1 if the last schedule reload (SIGHUP) succeeded, 0 if it was rejected",
            )?,
            actions: IntCounterVec::new(
                Opts::new(
                    "warren_producer_actions_total",
                    "Mutating API requests (trigger, publish, pause, resume, replay, purge), by result",
                ),
                &["action", "result"],
            )?,
            wf_runs: IntCounterVec::new(
                Opts::new(
                    "warren_producer_workflow_runs_total",
                    "Workflow run transitions (started, succeeded, failed, compensated, compensation_failed, resumed), by workflow",
                ),
                &["workflow", "event"],
            )?,
            wf_duration: HistogramVec::new(
                HistogramOpts::new(
                    "warren_producer_workflow_run_duration_seconds",
                    "Time from a run's start to its end, by workflow and final status",
                )
                .buckets(vec![
                    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
                ]),
                &["workflow", "result"],
            )?,
            wf_active: IntGauge::new(
                "warren_producer_workflow_runs_active",
                "Workflow runs not finished (on the leader; 0 elsewhere)",
            )?,
            wf_republished: IntCounter::new(
                "warren_producer_workflow_steps_republished_total",
                "Step tasks a new leader published again because the previous one had recorded but not confirmed them (possible duplicates)",
            )?,
            wf_duplicates: IntCounter::new(
                "warren_producer_workflow_duplicate_events_total",
                "Step events for a step already settled or an older execution, ignored",
            )?,
            wf_ignored: IntCounterVec::new(
                Opts::new(
                    "warren_producer_workflow_messages_ignored_total",
                    "Workflow messages ignored, by reason (duplicate_start, unknown_workflow, unknown_run, unknown_step, not_resumable, invalid)",
                ),
                &["reason"],
            )?,
        };
        r.register(Box::new(m.fires_all.clone()))?;
        r.register(Box::new(m.fire_lag_all.clone()))?;
        r.register(Box::new(m.missed_all.clone()))?;
        r.register(Box::new(m.schedules.clone()))?;
        for source in ["config", "api"] {
            m.schedules.with_label_values(&[source]);
        }
        r.register(Box::new(m.fires.clone()))?;
        r.register(Box::new(m.fire_lag.clone()))?;
        r.register(Box::new(m.missed.clone()))?;
        r.register(Box::new(m.published.clone()))?;
        r.register(Box::new(m.publish_failures.clone()))?;
        r.register(Box::new(m.next_fire.clone()))?;
        r.register(Box::new(m.last_fire.clone()))?;
        r.register(Box::new(m.leader.clone()))?;
        r.register(Box::new(m.reload_success.clone()))?;
        r.register(Box::new(m.actions.clone()))?;
        r.register(Box::new(m.wf_runs.clone()))?;
        r.register(Box::new(m.wf_duration.clone()))?;
        r.register(Box::new(m.wf_active.clone()))?;
        r.register(Box::new(m.wf_republished.clone()))?;
        r.register(Box::new(m.wf_duplicates.clone()))?;
        r.register(Box::new(m.wf_ignored.clone()))?;
        m.reload_success.set(1.0);
        for s in [
            Source::Schedule,
            Source::Api,
            Source::Console,
            Source::Workflow,
        ] {
            m.published.with_label_values(&[s.label()]);
            m.publish_failures.with_label_values(&[s.label()]);
        }
        Ok(m)
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
