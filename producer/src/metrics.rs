//! The producer's Prometheus metrics. Names are a public contract (dashboards
//! and alerts use them); label values are bounded: schedule names from config
//! and the two publish sources, never task ids.

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
};

/// Where a publish came from (the `source` label). `publish` on the command
/// line is a process of its own that serves no metrics, so it has no source.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    Schedule,
    Api,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Schedule => "schedule",
            Source::Api => "api",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    pub fires: IntCounterVec,
    pub fire_lag: HistogramVec,
    pub missed: IntCounterVec,
    pub published: IntCounterVec,
    pub publish_failures: IntCounterVec,
    pub next_fire: GaugeVec,
    pub last_fire: GaugeVec,
    pub leader: IntGauge,
    pub reload_success: Gauge,
    pub actions: IntCounterVec,
}

impl Metrics {
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            fires: IntCounterVec::new(
                Opts::new(
                    "warren_producer_fires_total",
                    "Scheduled fires published and confirmed by the broker",
                ),
                &["schedule"],
            )?,
            fire_lag: HistogramVec::new(
                HistogramOpts::new(
                    "warren_producer_fire_lag_seconds",
                    "Time from a fire's scheduled instant to the broker's confirm",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0,
                ]),
                &["schedule"],
            )?,
            missed: IntCounterVec::new(
                Opts::new(
                    "warren_producer_missed_fires_total",
                    "Scheduled fires not published (misfire policy, grace exceeded or publish failed)",
                ),
                &["schedule"],
            )?,
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
        };
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
        m.reload_success.set(1.0);
        for s in [Source::Schedule, Source::Api] {
            m.published.with_label_values(&[s.label()]);
            m.publish_failures.with_label_values(&[s.label()]);
        }
        Ok(m)
    }

    /// Make a schedule's series exist from the start (zero, not absent).
    pub fn init_schedule(&self, name: &str) {
        self.fires.with_label_values(&[name]);
        self.missed.with_label_values(&[name]);
        self.fire_lag.with_label_values(&[name]);
    }

    /// Drop the series of a schedule removed by a reload.
    pub fn forget_schedule(&self, name: &str) {
        let _ = self.fires.remove_label_values(&[name]);
        let _ = self.missed.remove_label_values(&[name]);
        let _ = self.fire_lag.remove_label_values(&[name]);
        let _ = self.next_fire.remove_label_values(&[name]);
        let _ = self.last_fire.remove_label_values(&[name]);
    }
}
