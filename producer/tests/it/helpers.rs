//! Harness: run the built `warren-producer` as child processes against the
//! test broker, each test on its own topology prefix, and read what they
//! published from the work queue with a plain lapin consumer.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Connection;
use warren::config::QueueType;
use warren::testing::Process;
use warren::Topology;

pub const BIN: &str = env!("CARGO_BIN_EXE_warren-producer");
pub const PUBLISH_TOKEN: &str = "it-publish-token-0123456789";
pub const READ_TOKEN: &str = "it-read-token-0123456789abc";
pub const ADMIN_TOKEN: &str = "it-admin-token-0123456789ab";

/// One test's world: a unique prefix, its declared topology, a temp dir.
/// On the shared test broker its queues and exchanges are deleted when it
/// drops (see `Drop for World`).
pub struct World {
    pub url: String,
    pub prefix: String,
    pub topo: Topology,
    pub conn: Connection,
    pub dir: tempfile::TempDir,
    /// On a node of the test's own, which goes away with it: nothing to delete.
    shared_broker: bool,
}

impl World {
    pub async fn new(test: &str) -> World {
        let mut w = Self::on(test, warren::testing::broker_url()).await;
        w.shared_broker = true;
        w
    }

    /// A world on a broker of the test's own (see `warren::testing::Node`).
    pub async fn on(test: &str, url: &str) -> World {
        Self::on_with(test, url, QueueType::Classic).await
    }

    /// [`World::on`] with a queue type (quorum on a cluster).
    pub async fn on_with(test: &str, url: &str, queue_type: QueueType) -> World {
        let cfg = warren::testing::topology_config(test, queue_type);
        let topo = Topology::new(&cfg);
        let mut amqp = warren::testing::amqp_config();
        amqp.url = Some(warren::config::Secret::new(url));
        let conn = warren::amqp::connect(&amqp, "test")
            .await
            .expect("connect to the test broker");
        warren::topology::declare(&conn, &topo)
            .await
            .expect("declare topology");
        World {
            url: url.to_owned(),
            prefix: cfg.prefix,
            topo,
            conn,
            dir: tempfile::tempdir().expect("temp dir"),
            shared_broker: false,
        }
    }

    /// A fresh connection for this world (after the broker went away).
    pub async fn reconnect(&mut self) {
        let mut amqp = warren::testing::amqp_config();
        amqp.url = Some(warren::config::Secret::new(self.url.as_str()));
        self.conn = warren::amqp::connect(&amqp, "test")
            .await
            .expect("reconnect to the test broker");
    }

    pub fn work_queue(&self) -> String {
        format!("{}.default", self.prefix)
    }

    pub fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Environment every producer child gets.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("WARREN_AMQP_URL".into(), self.url.clone()),
            ("WARREN_TOPOLOGY__PREFIX".into(), self.prefix.clone()),
            ("WARREN_AMQP__HEARTBEAT".into(), "2s".into()),
            ("WARREN_AMQP__CONFIRM_TIMEOUT".into(), "5s".into()),
            ("WARREN_LEADER__RETRY_INTERVAL".into(), "500ms".into()),
            ("WARREN_API__PUBLISH_TOKEN".into(), PUBLISH_TOKEN.into()),
            ("WARREN_API__READ_TOKEN".into(), READ_TOKEN.into()),
            ("WARREN_API__ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ("RUST_LOG".into(), "info,warren_producer=debug".into()),
        ]
    }

    /// Start `warren-producer run` with this config file.
    pub fn start(&self, label: &str, config: &PathBuf, extra: &[(&str, &str)]) -> Producer {
        let port = free_port();
        let mut cmd = Command::new(BIN);
        cmd.arg("--config").arg(config).arg("run");
        clean_env(&mut cmd);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        cmd.env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let process = Process::spawn(&mut cmd).expect("spawn warren-producer");
        Producer {
            pid: process.pid(),
            process,
            port,
            label: label.into(),
        }
    }

    /// Run `warren-producer` with `args` to completion, feeding `stdin`.
    pub fn cli(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        self.cli_with(args, stdin, &[])
    }

    /// [`World::cli`] with environment overrides.
    pub fn cli_with(
        &self,
        args: &[&str],
        stdin: &[u8],
        env: &[(&str, &str)],
    ) -> std::process::Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        clean_env(&mut cmd);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        cmd.env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn warren-producer");
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().expect("wait warren-producer");
        let _ = writer.join();
        out
    }

    /// Start collecting every message of the work queue.
    pub async fn collect(&self) -> Collector {
        let ch = self.conn.create_channel().await.expect("channel");
        let mut consumer = ch
            .basic_consume(
                self.work_queue().as_str().into(),
                "it".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let msgs: Arc<Mutex<Vec<Msg>>> = Arc::default();
        let sink = msgs.clone();
        tokio::spawn(async move {
            let _ch = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let p = &d.properties;
                let headers = p.headers().clone().unwrap_or_default();
                let msg = Msg {
                    id: p
                        .message_id()
                        .as_ref()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default(),
                    app_id: p.app_id().as_ref().map(|s| s.as_str().to_owned()),
                    name: p.kind().as_ref().map(|s| s.as_str().to_owned()),
                    schedule: warren::envelope::header_str(
                        &headers,
                        warren::envelope::headers::SCHEDULE,
                    ),
                    published_ms: warren::envelope::header_i64(
                        &headers,
                        warren::envelope::headers::PUBLISHED_AT_MS,
                    ),
                    edited_by: warren::envelope::header_str(
                        &headers,
                        warren::envelope::headers::EDITED_BY,
                    ),
                    attempt: warren::envelope::header_i64(
                        &headers,
                        warren::envelope::headers::ATTEMPT,
                    ),
                    traceparent: warren::envelope::header_str(
                        &headers,
                        warren::envelope::headers::TRACEPARENT,
                    ),
                    body: d.data.clone(),
                    received: Utc::now(),
                };
                sink.lock().expect("lock").push(msg);
            }
        });
        Collector { msgs }
    }

    /// Wait until `queue` holds `n` ready messages (see
    /// [`warren::testing::settles_at`]).
    pub async fn settles_at(&self, queue: &str, n: u32) {
        warren::testing::settles_at(&self.conn, queue, n).await
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        warren::testing::queue_len(&self.conn, queue).await
    }
}

/// Tests declare `World` first, so it drops last: the producers it started
/// are gone by then and cannot declare the topology again.
impl Drop for World {
    fn drop(&mut self) {
        if !self.shared_broker {
            return;
        }
        let (url, topo) = (self.url.clone(), self.topo.clone());
        // Drop cannot await and runs inside the test's runtime: clean up on
        // a thread with a runtime and a connection of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), delete_all(&url, &topo)).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Delete a test's topology, the producer's objects included (the leader's
/// lock queue is exclusive and went with its connection).
async fn delete_all(url: &str, topo: &Topology) {
    let mut amqp = warren::testing::amqp_config();
    amqp.url = Some(warren::config::Secret::new(url));
    let Ok(conn) = warren::amqp::connect(&amqp, "test-cleanup").await else {
        return;
    };
    warren::testing::delete_topology(&conn, topo).await;
    let _ = conn.close(200, "test done".into()).await;
}

fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("WARREN_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A message read from the work queue.
#[derive(Debug, Clone)]
pub struct Msg {
    pub id: String,
    pub app_id: Option<String>,
    pub name: Option<String>,
    pub schedule: Option<String>,
    pub published_ms: Option<i64>,
    /// `x-warren-edited-by` of a dead task replayed with a new payload.
    pub edited_by: Option<String>,
    pub attempt: Option<i64>,
    /// W3C `traceparent` header.
    pub traceparent: Option<String>,
    pub body: Vec<u8>,
    pub received: DateTime<Utc>,
}

impl Msg {
    /// The scheduled instant encoded in a tick id `<schedule>@<RFC 3339>`.
    pub fn instant(&self) -> Option<DateTime<Utc>> {
        let (_, t) = self.id.rsplit_once('@')?;
        DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    pub fn sent_by(&self, pid: u32) -> bool {
        self.app_id
            .as_deref()
            .is_some_and(|a| a.ends_with(&format!(":{pid}")))
    }
}

#[derive(Clone)]
pub struct Collector {
    msgs: Arc<Mutex<Vec<Msg>>>,
}

impl Collector {
    pub fn all(&self) -> Vec<Msg> {
        self.msgs.lock().expect("lock").clone()
    }

    pub fn of_schedule(&self, schedule: &str) -> Vec<Msg> {
        self.all()
            .into_iter()
            .filter(|m| m.schedule.as_deref() == Some(schedule))
            .collect()
    }

    pub async fn wait_for<F>(&self, timeout: Duration, what: &str, mut pred: F) -> Vec<Msg>
    where
        F: FnMut(&[Msg]) -> bool,
    {
        let c = self.clone();
        warren::testing::eventually(timeout, what, || {
            let all = c.all();
            let ok = pred(&all);
            async move { ok.then_some(all) }
        })
        .await
    }
}

/// Ids seen more than once.
pub fn duplicates(msgs: &[Msg]) -> Vec<String> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for m in msgs {
        *seen.entry(&m.id).or_default() += 1;
    }
    let mut d: Vec<String> = seen
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id.to_owned())
        .collect();
    d.sort();
    d
}

/// A running producer (`warren::testing::Process`, its log lines captured);
/// killed (SIGKILL) on drop.
pub struct Producer {
    pub process: Process,
    pub pid: u32,
    pub port: u16,
    pub label: String,
}

impl Producer {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn logs(&self) -> String {
        self.process.lines().join("\n")
    }

    pub fn signal(&self, sig: &str) {
        self.process.signal(sig)
    }

    pub async fn metrics(&self) -> Option<String> {
        let resp = reqwest::get(self.url("/metrics")).await.ok()?;
        resp.text().await.ok()
    }

    /// Value of an unlabelled or exactly-labelled sample, e.g.
    /// `warren_producer_schedule_missed_fires_total{schedule="a"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().await?;
        text.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    pub async fn wait_leader(&self, timeout: Duration, want: bool) {
        let what = format!(
            "{} to report warren_producer_leader {}",
            self.label, want as u8
        );
        warren::testing::eventually(timeout, &what, || async {
            let v = self.metric("warren_producer_leader").await?;
            ((v == 1.0) == want).then_some(())
        })
        .await
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        warren::testing::eventually(timeout, "producer /readyz", || async {
            let r = reqwest::get(self.url("/readyz")).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
    }

    pub fn kill9(&mut self) -> Instant {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
        Instant::now()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The process prints its last lines itself; say whose they are.
        if std::thread::panicking() {
            eprintln!("---- producer {} (pid {}) ----", self.label, self.pid);
        }
    }
}
