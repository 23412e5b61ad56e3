//! What the parts of a running producer share: the config it started with,
//! the topology, metrics and health, the schedules in force and how each
//! stands ([`Timetable`]), whether this replica leads ([`Leadership`]), the
//! other replicas and the control events among them ([`Replicas`]), the
//! API's publisher while connected and the keys it seals with
//! ([`BrokerLink`]), task events recorded and heard ([`TaskEvents`]), the
//! API tokens, and why the process must stop.
//!
//! Each part is held in an `Arc`: an HTTP handler that needs one part takes
//! just that part as its state (axum's `FromRef`, see [`crate::api`]).
//!
//! It sits below [`crate::api`], [`crate::scheduler`] and [`crate::app`] and
//! knows none of them: they all read and write through these methods.

use std::path::{Path, PathBuf};

use std::sync::{Arc, OnceLock};

use warren::metrics::{AmqpMetrics, Health};
use warren::security::Seal;
use warren::Topology;

use crate::auth::TokenStore;
use crate::config::ProducerConfig;
use crate::control::{self, ControlError, Op};
use crate::metrics::Metrics;
use crate::workflow::Workflow;

mod leadership;
mod link;
mod replicas;
mod task_events;
mod timetable;

pub use leadership::Leadership;
pub use link::{ApiPublisher, BrokerLink};
pub use replicas::Replicas;
pub use task_events::TaskEvents;
pub use timetable::Timetable;

pub struct Ctx {
    cfg: ProducerConfig,
    config_path: Option<PathBuf>,
    topo: Topology,
    metrics: Metrics,
    amqp_metrics: AmqpMetrics,
    health: Health,
    timetable: Arc<Timetable>,
    /// Workflow runs as the log says, for status requests.
    runs: crate::workflow::store::View,
    leadership: Arc<Leadership>,
    replicas: Arc<Replicas>,
    link: Arc<BrokerLink>,
    tokens: TokenStore,
    /// Why the process must stop (exit 1), set once.
    fatal: OnceLock<String>,
    /// `[[workflows]]`, validated (fixed until restart).
    workflows: Vec<Arc<Workflow>>,
    task_events: Arc<TaskEvents>,
}

impl Ctx {
    pub fn new(
        cfg: ProducerConfig,
        workflows: Vec<Arc<Workflow>>,
        metrics: Metrics,
        amqp_metrics: AmqpMetrics,
        health: Health,
        tokens: TokenStore,
    ) -> Self {
        // Every workflow's run series exist from the start, at 0: an alert on
        // `increase()` then sees the first failure too.
        for w in &workflows {
            for event in crate::metrics::WORKFLOW_RUN_EVENTS {
                metrics
                    .workflow
                    .runs
                    .with_label_values(&[w.name.as_str(), event]);
            }
        }
        let catalog = crate::catalog::Catalog::new(api_compiler(&cfg));
        let leadership = Arc::new(Leadership::new(metrics.leader.clone()));
        Self {
            workflows,
            topo: Topology::new(&cfg.topology).with_events(cfg.events.shared().stream()),
            timetable: Arc::new(Timetable::new(catalog, metrics.clone())),
            runs: crate::workflow::store::View::default(),
            replicas: Arc::new(Replicas::new(instance_id(), leadership.clone())),
            leadership,
            link: Arc::default(),
            tokens,
            fatal: OnceLock::new(),
            task_events: Arc::new(TaskEvents::new(cfg.events.index_size)),
            cfg,
            config_path: None,
            metrics,
            amqp_metrics,
            health,
        }
    }

    /// Record task events with `recorder`, and count the index on `metrics`.
    pub fn with_events(
        mut self,
        recorder: warren::events::Recorder,
        metrics: crate::tasks::IndexMetrics,
    ) -> Self {
        self.task_events =
            Arc::new(TaskEvents::new(self.cfg.events.index_size).with(recorder, metrics));
        self
    }

    /// Task events: the recorder of this producer's and the task index.
    pub fn task_events(&self) -> &Arc<TaskEvents> {
        &self.task_events
    }

    pub fn workflows(&self) -> &[Arc<Workflow>] {
        &self.workflows
    }

    pub fn workflow(&self, name: &str) -> Option<Arc<Workflow>> {
        self.workflows.iter().find(|w| w.name == name).cloned()
    }

    /// Seal every task this producer publishes.
    pub fn with_seal(self, seal: Option<Arc<Seal>>) -> Self {
        self.link.set_seal(seal);
        self
    }

    /// Whether this replica leads.
    pub fn leadership(&self) -> &Arc<Leadership> {
        &self.leadership
    }

    /// The API's broker link and the keys publishes are sealed with.
    pub fn link(&self) -> &Arc<BrokerLink> {
        &self.link
    }

    /// The schedules in force and how each stands.
    pub fn timetable(&self) -> &Arc<Timetable> {
        &self.timetable
    }

    /// This replica, the others heard, the control events among them.
    pub fn replicas(&self) -> &Arc<Replicas> {
        &self.replicas
    }

    /// The file SIGHUP re-reads.
    pub fn with_config_path(mut self, path: Option<PathBuf>) -> Self {
        self.config_path = path;
        self
    }

    /// The config the process started with (SIGHUP swaps schedules and
    /// tokens, nothing else).
    pub fn cfg(&self) -> &ProducerConfig {
        &self.cfg
    }

    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    pub fn topo(&self) -> &Topology {
        &self.topo
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn amqp_metrics(&self) -> &AmqpMetrics {
        &self.amqp_metrics
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// This replica's name (`<host>:<pid>`).
    pub fn instance(&self) -> &str {
        self.replicas.instance()
    }

    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }

    /// The workflow runs this replica follows (every replica does).
    pub fn runs(&self) -> &crate::workflow::store::View {
        &self.runs
    }

    /// A control event from the leader: adopt its paused set (unless this
    /// replica leads: its own set is the truth, and its events come back
    /// through the broker later than it changed it) and wake whoever waits
    /// for the answer to a request.
    pub fn on_event(&self, event: control::Event) {
        if !self.leadership.is_leader() {
            self.timetable.set_paused(event.paused.clone());
        }
        self.replicas.on_event(event);
    }

    /// Pause schedule `name` through the leader (see [`crate::control`]):
    /// `Ok` once the leader recorded it in its state snapshot.
    pub async fn pause(&self, name: &str) -> Result<(), ControlError> {
        self.control(Op::Pause, name).await
    }

    /// Resume schedule `name`; its instants while paused are skipped.
    pub async fn resume(&self, name: &str) -> Result<(), ControlError> {
        self.control(Op::Resume, name).await
    }

    async fn control(&self, op: Op, name: &str) -> Result<(), ControlError> {
        if !self.timetable.book().contains(name) {
            return Err(ControlError::NotFound(name.to_owned()));
        }
        let conn = self.link.publisher().ok_or(ControlError::Unavailable)?.conn;
        self.replicas
            .relay(&conn, self.topo.prefix(), op, name)
            .await
    }

    /// Most dead messages one request may read (`api.dead_scan_limit`).
    pub fn dead_scan_limit(&self) -> usize {
        self.cfg.api.dead_scan_limit
    }

    /// Record why the process must stop with exit 1 (the first reason wins).
    pub fn fail(&self, why: String) {
        let _ = self.fatal.set(why);
    }

    pub fn fatal(&self) -> Option<&str> {
        self.fatal.get().map(String::as_str)
    }
}

/// This replica's name in logs, the state snapshot and the `app_id` of ticks:
/// `<host>:<pid>`, unique among replicas even without `$HOSTNAME`.
fn instance_id() -> String {
    format!("{}:{}", warren::config::host_name(), std::process::id())
}

/// How API schedules are checked: exactly as `[[schedules]]` entries of
/// this config (the same function), workflows included.
pub fn api_compiler(cfg: &ProducerConfig) -> Box<crate::catalog::Compile> {
    let workflows: Vec<String> = cfg.workflows.iter().map(|w| w.name.clone()).collect();
    Box::new(move |def| crate::config::compile_one(def, &workflows))
}
