//! Test harness (feature `testing`): a throwaway RabbitMQ node per test run,
//! unique names per test, and waiting on conditions with a deadline.
//!
//! [`broker_url`] returns `WARREN_TEST_AMQP_URL` when set (the test command
//! starts one node for the whole run and sets it), else starts one node for
//! this process through `deploy/broker.sh` (own node name, ports and temp data
//! dir) that stops when the process exits. Fault tests that stop or restart a
//! broker take a [`Node`] of their own.
//!
//! Besides the broker: [`queues`] (queue length, taking messages),
//! [`metrics`] (reading a registry or scraped `/metrics` text), [`process`]
//! (a child process with its log lines captured), [`free_port`].
#![allow(clippy::unwrap_used)]

pub mod metrics;
pub mod process;
pub mod queues;

pub use metrics::{registry_value, scraped_value};
pub use process::Process;
pub use queues::{header, queue_len, settles_at, take, take_one};

use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::Connection;

mod cluster;
pub use cluster::Cluster;

use crate::config::{AmqpConfig, QueueType, Secret, TopologyConfig};
use crate::topology::{Object, Topology};

/// The `deploy/broker.sh` script of this workspace.
pub fn broker_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/broker.sh")
}

/// A RabbitMQ node this process started; stopped on drop.
pub struct Node {
    dir: tempfile::TempDir,
    url: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Node {
    /// Start a node on free loopback ports in a fresh temp dir.
    pub fn start() -> Node {
        Self::start_with(&[])
    }

    /// Start a node that also serves amqps with a throwaway CA
    /// ([`Node::tls_url`], [`Node::ca_file`]).
    pub fn start_tls() -> Node {
        Self::start_with(&["--tls"])
    }

    /// Start a node whose amqps listener requires a client certificate
    /// signed by its CA and accepts EXTERNAL login ([`Node::client_cert`]).
    pub fn start_mtls() -> Node {
        Self::start_with(&["--tls-verify-peer"])
    }

    /// Start a node that also serves AMQP on loopback address `ip` (e.g.
    /// `127.0.0.2`), so a test can cut off the clients of that address alone.
    pub fn start_also_on(ip: &str) -> Node {
        Self::start_with(&["--listen", ip])
    }

    fn start_with(options: &[&str]) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("warren-node-")
            .tempdir()
            .expect("temp dir");
        let name = format!(
            "warren-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("bash")
            .arg(broker_script())
            .args(["start", "--port", "0", "--name", &name, "--watch"])
            .arg(std::process::id().to_string())
            .args(options)
            .arg("--dir")
            .arg(dir.path())
            .output()
            .expect("run deploy/broker.sh");
        assert!(
            out.status.success(),
            "deploy/broker.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        Node { dir, url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The AMQP URL of this node on another address it listens on.
    pub fn url_on(&self, ip: &str) -> String {
        self.url.replacen("127.0.0.1", ip, 1)
    }

    /// The node's AMQP port.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .expect("port in the node URL")
    }

    /// The amqps URL of a node started with [`Node::start_tls`].
    pub fn tls_url(&self) -> String {
        let out = Command::new("bash")
            .arg(broker_script())
            .arg("tls-url")
            .arg("--dir")
            .arg(self.dir.path())
            .output()
            .expect("run deploy/broker.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// PEM of the CA that signed a TLS node's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }

    /// Certificate and key files of a client: `client` (signed by the
    /// node's CA, CN `warren-client`, a user of the node) or `other-client`
    /// (signed by a stranger CA). Nodes started with [`Node::start_mtls`].
    pub fn client_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        let tls = self.dir.path().join("tls");
        (
            tls.join(format!("{name}.pem")),
            tls.join(format!("{name}.key")),
        )
    }

    /// Run `rabbitmqctl` against this node.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(broker_script())
            .arg("ctl")
            .arg("--dir")
            .arg(self.dir.path())
            .args(args)
            .output()
            .expect("run rabbitmqctl")
    }

    /// Stop the broker application (connections drop; the node stays up).
    pub fn stop_app(&self) {
        let o = self.ctl(&["stop_app"]);
        assert!(
            o.status.success(),
            "stop_app: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    pub fn start_app(&self) {
        let o = self.ctl(&["start_app"]);
        assert!(
            o.status.success(),
            "start_app: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(broker_script())
            .arg("stop")
            .arg("--dir")
            .arg(self.dir.path())
            .output();
    }
}

/// The broker every test of this run shares.
pub fn broker_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("WARREN_TEST_AMQP_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            // Leaked on purpose: the node outlives every test of this process
            // and broker.sh's --watch stops it when the process exits.
            let node = Box::leak(Box::new(Node::start()));
            node.url.clone()
        }
    })
}

/// A prefix no other test uses, so tests share a vhost without touching
/// each other's objects.
pub fn unique_prefix(test: &str) -> String {
    format!(
        "wt.{test}.{}.{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// AMQP settings for the shared test broker.
pub fn amqp_config() -> AmqpConfig {
    AmqpConfig {
        url: Some(Secret::new(broker_url())),
        heartbeat: Duration::from_secs(5),
        confirm_timeout: Duration::from_secs(10),
        ..AmqpConfig::default()
    }
}

/// A topology config with a unique prefix and the default queue.
pub fn topology_config(test: &str, queue_type: QueueType) -> TopologyConfig {
    TopologyConfig {
        prefix: unique_prefix(test),
        queue_type,
        ..TopologyConfig::default()
    }
}

pub async fn connect() -> Connection {
    crate::amqp::connect(&amqp_config(), "test")
        .await
        .expect("connect to test broker")
}

/// Whether the queue or exchange `obj` exists (a passive declare on a
/// channel of its own, which a missing object closes).
pub async fn exists(conn: &Connection, obj: &Object) -> bool {
    let Ok(ch) = conn.create_channel().await else {
        return false;
    };
    let found = match crate::topology::passive_declare(&ch, obj).await {
        Some(res) => res.is_ok(),
        None => panic!("only a queue or an exchange can exist: {obj:?}"),
    };
    if found {
        let _ = ch.close(200, "checked".into()).await;
    }
    found
}

/// Delete everything a test declared, the producer's objects included
/// (matters only on a reused broker).
pub async fn delete_topology(conn: &Connection, topo: &Topology) {
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let producer = crate::topology::producer::Part::ALL
        .iter()
        .flat_map(|p| crate::topology::producer::objects(topo.prefix(), topo.queue_type(), *p));
    for obj in topo.objects().into_iter().chain(producer) {
        match obj {
            Object::Queue { name, .. } => {
                let _ = ch
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            Object::Exchange { name, .. } => {
                let _ = ch
                    .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            _ => {}
        }
    }
    // Declared only by roles that record task events.
    let _ = ch
        .queue_delete(
            topo.events_stream().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await;
}

/// Cuts the clients of one loopback address off from a broker port: an
/// nftables table of its own drops both directions of that traffic, silently
/// (no RST), like a pulled cable. Removed on drop. Needs `nft` and root
/// (`deploy/test.sh` installs nftables); `None` outside CI when unavailable.
pub struct CutOff {
    table: String,
}

impl CutOff {
    pub fn new(ip: &str, port: u16) -> Option<CutOff> {
        let table = format!(
            "warren_cut_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {ip} tcp dport {port} drop\n    ip saddr {ip} tcp sport {port} drop\n  }}\n}}\n"
        );
        let res = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("nft stdin")
                    .write_all(script.as_bytes())?;
                child.wait_with_output()
            });
        match res {
            Ok(out) if out.status.success() => Some(CutOff { table }),
            other => {
                let why = match other {
                    Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "nftables is required in CI: {why}"
                );
                eprintln!("nftables unavailable ({why}): skipping the cut-off");
                None
            }
        }
    }

    /// Let the traffic through again.
    pub fn heal(self) {}
}

impl Drop for CutOff {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
    }
}

/// Lint a `/metrics` body with `promtool check metrics`. promtool ships with
/// Debian's `prometheus` package, which `deploy/test.sh` installs; only outside
/// CI (`CI` unset) may a missing promtool skip the lint, and it says so.
pub fn assert_promtool_ok(metrics: &str) {
    use std::io::Write;
    use std::process::Stdio;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not available ({e}): skipped `promtool check metrics`");
            return;
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    };
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(metrics.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a child process
/// that must be told its port up front; prefer binding port 0 in-process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Poll `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
