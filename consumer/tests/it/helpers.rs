//! Starting workers (in-process or as child processes) and looking at queues.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::{BasicProperties, Connection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren::amqp::Publisher;
use warren::config::{QueueType, Secret};
use warren::retry::RetryPolicy;
use warren::testing::{self, eventually};
use warren::{Task, Topology};
use warren_consumer::{ConsumerConfig, Registry, Worker};

pub const WAIT: Duration = Duration::from_secs(30);

/// A config for one test: unique prefix, fast retries, ephemeral HTTP port.
pub fn config(test: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig {
        amqp: testing::amqp_config(),
        topology: testing::topology_config(test, QueueType::Classic),
        ..Default::default()
    };
    c.http.addr = "127.0.0.1:0".parse().unwrap();
    c.retry.default = RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_millis(200),
        multiplier: 2.0,
        max_delay: Duration::from_secs(5),
        jitter: 0.0,
    };
    c.worker.task_timeout = Duration::from_secs(10);
    c.worker.drain_grace = Duration::from_secs(5);
    c
}

/// A worker running in this process, plus a client connection to poke it.
pub struct App {
    pub topo: Topology,
    pub conn: Connection,
    pub publisher: Publisher,
    pub prom: prometheus::Registry,
    pub health: warren::metrics::Health,
    pub shutdown: CancellationToken,
    pub worker: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_worker(cfg: ConsumerConfig, registry: Registry) -> App {
    warren::telemetry::init(&warren::config::LogConfig {
        level: "warn".into(),
        ..Default::default()
    });
    let conn = warren::amqp::connect(&cfg.amqp, "test-client")
        .await
        .expect("connect test client");
    let worker = Worker::builder(cfg.clone())
        .registry(registry)
        .build()
        .expect("build worker");
    let prom = worker.prometheus();
    let health = worker.health();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    let h = health.clone();
    eventually(WAIT, "worker ready", || {
        let h = h.clone();
        async move { h.is_ready().then_some(()) }
    })
    .await;
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .expect("publisher");
    App {
        topo: Topology::new(&cfg.topology),
        conn,
        publisher,
        prom,
        health,
        shutdown,
        worker: Some(handle),
    }
}

impl App {
    pub fn queue(&self) -> String {
        self.topo.work_queues()[0].name.clone()
    }

    pub async fn publish(&self, task: &Task) {
        self.publisher
            .publish_task(&self.topo, task, Duration::ZERO)
            .await
            .expect("publish task");
    }

    /// Publish raw bytes with the given routing key and properties.
    pub async fn publish_raw(&self, key: &str, props: BasicProperties, body: &[u8]) {
        self.publisher
            .publish(&self.topo.tasks_exchange(), key, props, body)
            .await
            .expect("publish raw");
    }

    /// Take (and ack) exactly `n` messages from the dead queue.
    pub async fn take_dead(&self, n: usize) -> Vec<Delivery> {
        take(&self.conn, &self.topo.dead_queue(), n).await
    }

    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.prom, name, labels)
    }

    /// Stop the worker (drain, close its connection) but keep the topology,
    /// so the test can look at what is left in the queues.
    pub async fn halt(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.worker.take() {
            tokio::time::timeout(WAIT, h)
                .await
                .expect("worker stops in time")
                .expect("worker task")
                .expect("worker result");
        }
    }

    pub async fn stop(mut self) {
        self.halt().await;
        testing::delete_topology(&self.conn, &self.topo).await;
        let _ = self.conn.close(200, "test done".into()).await;
    }
}

// The generic helpers live in `warren::testing`; these keep the names and
// signatures the consumer's tests were written against.

/// Take (and ack) exactly `n` messages from `queue`, waiting for them.
pub async fn take(conn: &Connection, queue: &str, n: usize) -> Vec<Delivery> {
    testing::take(conn, queue, n, WAIT).await
}

/// Ready messages in `queue`.
pub async fn queue_len(conn: &Connection, queue: &str) -> u32 {
    testing::queue_len(conn, queue).await
}

pub async fn settles_at(conn: &Connection, queue: &str, n: u32) {
    testing::settles_at(conn, queue, n).await
}

/// Sum of a metric's samples whose labels include `labels`.
pub fn metric_value(prom: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    testing::registry_value(prom, name, labels)
}

pub fn header(d: &Delivery, key: &str) -> Option<String> {
    testing::header(d, key)
}

/// Runs of a test handler: task id → attempts seen with their start instants.
#[derive(Clone, Default)]
pub struct Runs(pub Arc<Mutex<RunLog>>);

pub type RunLog = HashMap<String, Vec<(u32, Instant)>>;

impl Runs {
    pub fn record(&self, t: &Task) {
        self.0
            .lock()
            .unwrap()
            .entry(t.id.clone())
            .or_default()
            .push((t.attempt, Instant::now()));
    }
    pub fn total(&self) -> usize {
        self.0.lock().unwrap().values().map(Vec::len).sum()
    }
    pub fn of(&self, id: &str) -> Vec<(u32, Instant)> {
        self.0.lock().unwrap().get(id).cloned().unwrap_or_default()
    }
    pub async fn wait_total(&self, n: usize) {
        let me = self.clone();
        eventually(WAIT, &format!("{n} handler runs"), || {
            let me = me.clone();
            async move { (me.total() >= n).then_some(()) }
        })
        .await;
    }
}

/// A `warren-consumer` child process with its log lines captured (a
/// [`testing::Process`], plus the temp dir holding its config file).
pub struct Proc {
    process: testing::Process,
    _dir: tempfile::TempDir,
}

impl Deref for Proc {
    type Target = testing::Process;
    fn deref(&self) -> &testing::Process {
        &self.process
    }
}

impl DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut testing::Process {
        &mut self.process
    }
}

/// Start the binary with `toml` as its config file; waits until it consumes.
pub fn spawn_process(cfg: &ConsumerConfig, toml: &str) -> Proc {
    spawn_process_env(cfg, toml, &[])
}

/// [`spawn_process`] with extra environment (e.g. `RUST_LOG`).
pub fn spawn_process_env(cfg: &ConsumerConfig, toml: &str, env: &[(&str, &str)]) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consumer.toml");
    std::fs::write(&path, toml).unwrap();
    let process = testing::Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_warren-consumer"))
            .arg("--config")
            .arg(&path)
            .env("WARREN_AMQP_URL", cfg.amqp.url_list())
            .env("WARREN_TOPOLOGY__PREFIX", &cfg.topology.prefix)
            .env("WARREN_HTTP_ADDR", "127.0.0.1:0")
            .env("WARREN_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied()),
    )
    .expect("spawn warren-consumer");
    Proc { process, _dir: dir }
}

impl Proc {
    pub async fn wait_log(&self, msg: &str, n: usize) {
        self.process.wait_log(msg, n, WAIT).await
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        self.process.signal(sig.as_str())
    }

    /// Task ids the child's handlers finished (from its logs).
    pub fn handled_ids(&self) -> Vec<String> {
        let mut ids = self.ids_of("noop handled task");
        ids.extend(self.ids_of("sleep handled task"));
        ids
    }

    /// Task ids of the log events `msg` (event or span field `task.id`).
    pub fn ids_of(&self, msg: &str) -> Vec<String> {
        self.process.field_of(msg, "task.id")
    }
}

/// AMQP config pointing at `url` (for a dedicated node).
pub fn amqp_for(url: &str) -> warren::config::AmqpConfig {
    warren::config::AmqpConfig {
        url: Some(Secret::new(url)),
        ..testing::amqp_config()
    }
}

/// A registry that records every run of `name` and succeeds at once.
pub fn recording(name: &str) -> (Registry, Runs) {
    let runs = Runs::default();
    let r = runs.clone();
    let mut reg = Registry::new();
    reg.register_fn(name, move |t| {
        let r = r.clone();
        async move {
            r.record(&t);
            Ok(())
        }
    })
    .unwrap();
    (reg, runs)
}
