//! A local RabbitMQ cluster for fault tests (`deploy/broker.sh cluster`):
//! N nodes on loopback addresses of their own, so one node can be killed,
//! restarted or cut off from its peers while clients keep reaching it.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::broker_script;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A cluster this process started; stopped on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    urls: Vec<String>,
}

impl Cluster {
    /// Start `nodes` clustered nodes on a loopback subnet no other test of
    /// this run uses (so a `cut` here never touches another test's nodes).
    pub fn start(nodes: usize) -> Cluster {
        // A boot can fail for reasons outside the code under test (a port
        // taken between its pick and its bind): one more try, then fail.
        match Self::try_start(nodes) {
            Ok(c) => c,
            Err(first) => {
                eprintln!("cluster start failed once, retrying: {first}");
                Self::try_start(nodes).unwrap_or_else(|e| panic!("cluster start failed: {e}"))
            }
        }
    }

    fn try_start(nodes: usize) -> Result<Cluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("warren-cluster-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let subnet = format!("127.{}.{}", 100 + pid % 150, (pid / 150 + seq) % 250);
        let name = format!("warren-t{pid}-{seq}");
        let out = Command::new("bash")
            .arg(broker_script())
            .args(["cluster", "start", "--nodes", &nodes.to_string()])
            .args(["--subnet", &subnet, "--name", &name, "--watch"])
            .arg(pid.to_string())
            .arg("--dir")
            .arg(dir.path())
            .output()
            .map_err(|e| format!("run deploy/broker.sh cluster start: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let last = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let urls: Vec<String> = last.split(',').map(str::to_owned).collect();
        if urls.len() != nodes {
            return Err(format!("URL list: {last}"));
        }
        Ok(Cluster { dir, urls })
    }

    /// Node URLs, node 1 first.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The comma-separated list, as `WARREN_AMQP_URL` takes it.
    pub fn url_list(&self) -> String {
        self.urls.join(",")
    }

    /// 1-based index of the node listening on `host` (`127.x.y.1N`).
    pub fn node_by_host(&self, host: &str) -> Option<usize> {
        self.urls
            .iter()
            .position(|u| u.contains(&format!("@{host}:")))
            .map(|i| i + 1)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(broker_script())
            .arg("cluster")
            .args(args)
            .arg("--dir")
            .arg(self.dir.path())
            .output()
            .expect("run deploy/broker.sh cluster")
    }

    fn must(&self, args: &[&str]) {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "cluster {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `rabbitmqctl` on node `n`.
    pub fn ctl(&self, n: usize, args: &[&str]) -> Output {
        let n = n.to_string();
        let mut all = vec!["ctl", n.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// `kill -9` of node `n`.
    pub fn kill(&self, n: usize) {
        self.must(&["kill", &n.to_string()]);
    }

    /// Boot node `n` again; it rejoins the cluster.
    pub fn restart(&self, n: usize) {
        self.must(&["restart", &n.to_string()]);
    }

    /// Cut node `n` off from the other nodes (clients still reach it).
    pub fn cut(&self, n: usize) {
        self.must(&["cut", &n.to_string()]);
    }

    pub fn heal(&self, n: usize) {
        self.must(&["heal", &n.to_string()]);
    }

    /// The node whose address serves a client connection named with `name`
    /// (asked of node `via`, which must be up).
    pub fn node_of_connection(&self, via: usize, name: &str) -> Option<usize> {
        let o = self.ctl(
            via,
            &[
                "list_connections",
                "name",
                "host",
                "--no-table-headers",
                "-q",
            ],
        );
        String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
            let (conn, host) = l.rsplit_once('\t')?;
            conn.contains(name)
                .then(|| self.node_by_host(host.trim()))
                .flatten()
        })
    }

    /// The node that leads quorum queue `queue` (asked of node `via`).
    pub fn leader_of(&self, via: usize, queue: &str) -> Option<usize> {
        let o = self.ctl(
            via,
            &["list_queues", "name", "leader", "--no-table-headers", "-q"],
        );
        String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
            let (q, leader) = l.split_once('\t')?;
            if q.trim() != queue {
                return None;
            }
            let host = leader.trim().rsplit_once('@')?.1;
            self.node_by_host(host)
        })
    }

    /// Wait until a node reports all `n` nodes running again (asking each
    /// node in turn: a node that was paused may answer slowly).
    pub fn wait_whole(&self, n: usize, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        for via in (1..=n).cycle() {
            let o = self.ctl(via, &["cluster_status", "--formatter", "json"]);
            let running = serde_json::from_slice::<serde_json::Value>(&o.stdout)
                .ok()
                .and_then(|v| v["running_nodes"].as_array().map(Vec::len));
            if running == Some(n) {
                return;
            }
            let last = format!(
                "node {via}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                std::time::Instant::now() < deadline,
                "the cluster did not become whole within {within:?}; last answer from {last}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.run(&["stop"]);
    }
}
