//! What the parts of a running producer share: the config it started with,
//! the topology, metrics and health, the schedules in force (replaced whole
//! on reload) and what each has done, whether this replica leads
//! ([`Leadership`]), the API's publisher while connected and the keys it
//! seals with ([`BrokerLink`]), the API tokens, and why the process must
//! stop.
//!
//! It sits below [`crate::api`], [`crate::scheduler`] and [`crate::app`] and
//! knows none of them: they all read and write through these methods.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex, OnceLock, RwLock};

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, watch};

use warren::metrics::{AmqpMetrics, Health};
use warren::security::Seal;
use warren::Topology;

use crate::auth::TokenStore;
use crate::book::Book;
use crate::config::{ProducerConfig, Schedule};
use crate::control::{self, ControlError, Op};
use crate::metrics::Metrics;
use crate::workflow::Workflow;

mod leadership;
mod link;

pub use leadership::Leadership;
pub use link::{ApiPublisher, BrokerLink};

/// What one schedule looks like from outside (API, metrics).
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub next_fire: Option<DateTime<Utc>>,
    pub last_fired: Option<DateTime<Utc>>,
    /// Paused by an operator (as this replica last heard from the leader).
    pub paused: bool,
}

pub struct Ctx {
    cfg: ProducerConfig,
    config_path: Option<PathBuf>,
    topo: Topology,
    metrics: Metrics,
    amqp_metrics: AmqpMetrics,
    health: Health,
    /// Every schedule in force, from the file and from the API.
    book: Book,
    /// The API's schedules as read from the broker.
    catalog: crate::catalog::Catalog,
    /// Workflow runs as the log says, for status requests.
    runs: crate::workflow::store::View,
    /// Whether the API's schedules were read from the broker yet.
    catalog_loaded: watch::Sender<bool>,
    status: Mutex<HashMap<String, Status>>,
    leadership: Leadership,
    instance: String,
    link: BrokerLink,
    tokens: TokenStore,
    /// Paused schedules: the leader's own set, or what a standby last heard.
    paused: RwLock<BTreeSet<String>>,
    /// Every control event heard (a relayed pause waits for its answer here).
    events: broadcast::Sender<control::Event>,
    /// Replicas heard announcing themselves, and when.
    replicas: Mutex<HashMap<String, (control::Presence, std::time::Instant)>>,
    /// Why the process must stop (exit 1), set once.
    fatal: OnceLock<String>,
    /// `[[workflows]]`, validated (fixed until restart).
    workflows: Vec<Arc<Workflow>>,
    /// Records `published` events (disabled: `events.enabled = false`).
    recorder: warren::events::Recorder,
    /// Every task heard of on the events stream, and live consumers.
    index: crate::tasks::Index,
    index_metrics: Option<crate::tasks::IndexMetrics>,
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
        let cfg_index_size = cfg.events.index_size;
        let leadership = Leadership::new(metrics.leader.clone());
        Self {
            workflows,
            topo: Topology::new(&cfg.topology).with_events(cfg.events.shared().stream()),
            cfg,
            config_path: None,
            metrics,
            amqp_metrics,
            health,
            book: Book::default(),
            catalog,
            runs: crate::workflow::store::View::default(),
            catalog_loaded: watch::channel(false).0,
            status: Mutex::new(HashMap::new()),
            leadership,
            instance: instance_id(),
            link: BrokerLink::default(),
            tokens,
            paused: RwLock::new(BTreeSet::new()),
            events: broadcast::channel(64).0,
            replicas: Mutex::new(HashMap::new()),
            fatal: OnceLock::new(),
            index: crate::tasks::Index::new(cfg_index_size),
            recorder: warren::events::Recorder::disabled(),
            index_metrics: None,
        }
    }

    /// Record task events with `recorder`, and count the index on `metrics`.
    pub fn with_events(
        mut self,
        recorder: warren::events::Recorder,
        metrics: crate::tasks::IndexMetrics,
    ) -> Self {
        self.recorder = recorder;
        self.index_metrics = Some(metrics);
        self
    }

    pub fn events(&self) -> &warren::events::Recorder {
        &self.recorder
    }

    pub fn index(&self) -> &crate::tasks::Index {
        &self.index
    }

    pub fn index_metrics(&self) -> Option<&crate::tasks::IndexMetrics> {
        self.index_metrics.as_ref()
    }

    /// Record that `task` was published by `source` (never waits).
    pub fn published(&self, task: &warren::Task, source: warren::events::Source) {
        if !self.recorder.enabled() {
            return;
        }
        let ev = warren::events::Event::new(
            &task.id,
            &task.name,
            warren::events::What::Published { source },
        )
        .trace(task.trace.as_ref().map(|t| t.trace_id_hex()));
        self.recorder.record(ev);
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
    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// The API's broker link and the keys publishes are sealed with.
    pub fn link(&self) -> &BrokerLink {
        &self.link
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
        &self.instance
    }

    pub fn tokens(&self) -> &TokenStore {
        &self.tokens
    }

    /// The schedules in force now, from both sources.
    pub fn book(&self) -> &Book {
        &self.book
    }

    /// Put the config file's `schedules` in force (start, SIGHUP): series
    /// and status of removed ones are dropped, those of new ones exist from
    /// now on (zero, not absent).
    pub fn apply_schedules(&self, schedules: Vec<Schedule>) {
        for s in schedules.iter().filter(|s| s.cfg.enabled) {
            self.metrics.init_schedule(s.name());
        }
        let count = schedules.len();
        let shown: Vec<String> = schedules
            .iter()
            .take(20)
            .map(|s| s.name().to_owned())
            .collect();
        for gone in self.book.replace_config(schedules) {
            self.forget(&gone);
        }
        self.count_schedules();
        tracing::info!(schedules = count, first = ?shown, "schedules from the config file in force");
    }

    pub fn catalog(&self) -> &crate::catalog::Catalog {
        &self.catalog
    }

    /// The workflow runs this replica follows (every replica does).
    pub fn runs(&self) -> &crate::workflow::store::View {
        &self.runs
    }

    /// Put what reading the catalog's log decided in force.
    pub fn catalog_effect(&self, e: crate::catalog::Effect) {
        match e {
            crate::catalog::Effect::Put(s) => {
                self.put_api_schedule(*s);
            }
            crate::catalog::Effect::Remove(name) => self.remove_api_schedule(&name),
            crate::catalog::Effect::None => {}
        }
    }

    /// Put an API schedule in force (from the catalog); `false` when a
    /// config-file schedule has its name.
    pub fn put_api_schedule(&self, s: Schedule) -> bool {
        if s.cfg.enabled {
            self.metrics.init_schedule(s.name());
        }
        let done = self.book.put_api(s);
        self.count_schedules();
        done
    }

    /// Take an API schedule out of force (from the catalog).
    pub fn remove_api_schedule(&self, name: &str) {
        if self.book.remove_api(name) {
            self.forget(name);
        }
        self.count_schedules();
    }

    fn forget(&self, name: &str) {
        self.metrics.forget_schedule(name);
        if let Ok(mut m) = self.status.lock() {
            m.remove(name);
        }
    }

    fn count_schedules(&self) {
        let (config, api) = self.book.counts();
        let g = &self.metrics.schedules;
        g.with_label_values(&["config"]).set(config as i64);
        g.with_label_values(&["api"]).set(api as i64);
    }

    /// The API's schedules have been read from the broker (each replica,
    /// once, at start).
    pub fn set_catalog_loaded(&self) {
        self.catalog_loaded.send_replace(true);
    }

    /// Resolves once the API's schedules are in the book.
    pub async fn catalog_loaded(&self) {
        let mut rx = self.catalog_loaded.subscribe();
        let _ = rx.wait_for(|loaded| *loaded).await;
    }

    pub fn set_next(&self, name: &str, next: Option<DateTime<Utc>>) {
        // 0 = no further fire (e.g. a 7-field expression whose years are over).
        self.metrics.next_fire(name, next);
        if let Ok(mut m) = self.status.lock() {
            match m.get_mut(name) {
                Some(st) => st.next_fire = next,
                None => {
                    m.entry(name.to_owned()).or_default().next_fire = next;
                }
            }
        }
    }

    pub fn set_last(&self, name: &str, t: DateTime<Utc>) {
        if let Ok(mut m) = self.status.lock() {
            match m.get_mut(name) {
                Some(st) => st.last_fired = Some(t),
                None => {
                    m.entry(name.to_owned()).or_default().last_fired = Some(t);
                }
            }
        }
    }

    pub fn status_of(&self, name: &str) -> Status {
        let mut st = self
            .status
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .unwrap_or_default();
        st.paused = self.is_paused(name);
        st
    }

    pub fn is_paused(&self, name: &str) -> bool {
        self.paused.read().is_ok_and(|p| p.contains(name))
    }

    pub fn paused(&self) -> BTreeSet<String> {
        self.paused.read().map(|p| p.clone()).unwrap_or_default()
    }

    /// Put `paused` in force (the leader, from its snapshot or a request).
    pub fn set_paused(&self, paused: BTreeSet<String>) {
        if let Ok(mut p) = self.paused.write() {
            *p = paused;
        }
    }

    /// A control event from the leader: adopt its paused set (unless this
    /// replica leads: its own set is the truth, and its events come back
    /// through the broker later than it changed it) and wake whoever waits
    /// for the answer to a request.
    /// A replica's announcement (this one's own included: the exchange
    /// fans out to every replica).
    pub fn on_presence(&self, p: control::Presence) {
        if let Ok(mut g) = self.replicas.lock() {
            // One leader at a time: the newest claim wins over an older one
            // from a replica that died without saying so (`kill -9`).
            if p.leader {
                for (other, _) in g.values_mut() {
                    other.leader = false;
                }
            }
            g.insert(p.instance.clone(), (p, std::time::Instant::now()));
        }
    }

    /// Replicas heard within [`control::PRESENCE_TTL`], this one always
    /// first (as it is now), then by name.
    pub fn replicas(&self) -> Vec<control::Presence> {
        let me = control::Presence {
            instance: self.instance.clone(),
            leader: self.leadership.is_leader(),
        };
        let mut others: Vec<control::Presence> = match self.replicas.lock() {
            Ok(mut g) => {
                g.retain(|_, (_, seen)| seen.elapsed() < control::PRESENCE_TTL);
                g.values()
                    .filter(|(p, _)| p.instance != me.instance)
                    .map(|(p, _)| control::Presence {
                        instance: p.instance.clone(),
                        leader: p.leader && !me.leader,
                    })
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        others.sort_by(|a, b| a.instance.cmp(&b.instance));
        let mut out = vec![me];
        out.extend(others);
        out
    }

    pub fn on_event(&self, event: control::Event) {
        if !self.leadership.is_leader() {
            self.set_paused(event.paused.clone());
        }
        let _ = self.events.send(event);
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
        if !self.book.contains(name) {
            return Err(ControlError::NotFound(name.to_owned()));
        }
        let conn = self.link.publisher().ok_or(ControlError::Unavailable)?.conn;
        let req = control::Request {
            id: uuid::Uuid::new_v4().to_string(),
            op,
            schedule: Some(name.to_owned()),
        };
        // Subscribed before sending: the answer cannot slip past.
        let mut rx = self.events.subscribe();
        control::send(&conn, self.topo.prefix(), &req)
            .await
            .map_err(|_| ControlError::Unavailable)?;
        let answer = async {
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.answers.as_deref() == Some(req.id.as_str()) => return Some(ev),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        };
        match tokio::time::timeout(control::REPLY_TIMEOUT, answer).await {
            Ok(Some(ev)) => match ev.error {
                None => Ok(()),
                Some(e) => Err(ControlError::Refused(e)),
            },
            _ => Err(ControlError::NoLeader),
        }
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
