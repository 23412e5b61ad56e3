//! `--peers`: other task systems measured in the same run, on the same
//! broker, each as a child process that prints `rate <tasks/s>`:
//!
//! * `celery`: Python Celery through `<peer-dir>/celery_peer.py` (skipped,
//!   with a message, when `python3 -c 'import celery'` fails);
//! * `rusty-celery`: the crates.io `celery` crate through the
//!   `rusty-celery-peer` release binary of `<peer-dir>/rusty-celery` (a crate
//!   outside the workspace; skipped, with the build command, when the binary
//!   is missing).
//!
//! Both take `--prefetch P` in `drain` mode (0: their own default), so a
//! drain row can give every side the same prefetch, and another each its
//! default. Their CPU is measured from outside, as warren's is (see
//! [`crate::meter`]); the rate line they print is used for `publish` only.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lapin::Connection;

use crate::meter::{final_cpu, Drained, Meter, Watch};
use crate::table::{self, Spread};
use crate::Args;

/// One peer and the rates of its runs so far.
pub struct Peer {
    /// Its `--peers` name, also its table column.
    pub key: &'static str,
    /// As the report names it.
    pub name: &'static str,
    program: PathBuf,
    /// Arguments before the mode (the Python script).
    lead: Vec<OsString>,
    n: usize,
    /// Rates of the `publish` runs (a drain's are the caller's).
    pub rates: Vec<f64>,
    /// Client and broker CPU per task of each `publish` run, µs.
    pub cpu: Vec<(Option<f64>, Option<f64>)>,
    runs: usize,
}

/// The peers `--peers` names that can run here; a line for each one that
/// cannot, saying why.
pub fn from_args(args: &Args) -> Vec<Peer> {
    let wanted = |key: &str| args.peers.iter().any(|p| p == key);
    let mut peers = Vec::new();
    if wanted("rusty-celery") {
        peers.extend(rusty_celery(args));
    }
    if wanted("celery") {
        peers.extend(python_celery(args));
    }
    peers
}

fn rusty_celery(args: &Args) -> Option<Peer> {
    let dir = args.peer_dir.join("rusty-celery");
    let bin = dir.join("target/release/rusty-celery-peer");
    if !bin.is_file() {
        warren::outln!(
            "peers: rusty-celery skipped: {} not found (build it: cargo build --release --manifest-path {})",
            bin.display(),
            dir.join("Cargo.toml").display()
        );
        return None;
    }
    warren::outln!(
        "peers: rusty-celery (celery crate 0.5), {} tasks a run (--messages), its own durable classic queue (no x-max-priority), late acks, prefetch 64; publishes without confirms",
        args.messages
    );
    Some(Peer {
        key: "rusty-celery",
        name: "rusty-celery",
        program: bin,
        lead: Vec::new(),
        n: args.messages,
        rates: Vec::new(),
        cpu: Vec::new(),
        runs: 0,
    })
}

fn python_celery(args: &Args) -> Option<Peer> {
    let importable = std::process::Command::new("python3")
        .args(["-c", "import celery"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        warren::outln!("peers: Python Celery skipped: `python3 -c 'import celery'` failed (pip install celery)");
        return None;
    }
    warren::outln!(
        "peers: Python Celery, {} tasks a run, its own durable classic queue (no x-max-priority), solo pool, late acks, prefetch 64",
        args.peer_messages
    );
    Some(Peer {
        key: "celery",
        name: "Python Celery",
        program: "python3".into(),
        lead: vec![args.peer_dir.join("celery_peer.py").into()],
        n: args.peer_messages,
        rates: Vec::new(),
        cpu: Vec::new(),
        runs: 0,
    })
}

impl Peer {
    fn queue(&mut self) -> String {
        self.runs += 1;
        format!("bench.{}.{}.{}", self.key, std::process::id(), self.runs)
    }

    fn command(
        &self,
        mode: &str,
        url: &str,
        queue: &str,
        prefetch: u16,
    ) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.program);
        c.args(&self.lead)
            .args([mode, "--url", url, "--queue", queue, "-n"])
            .arg(self.n.to_string());
        if mode == "drain" {
            c.args(["--prefetch", &prefetch.to_string()]);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// One run of `mode` (`publish` or `drain`) on a fresh queue, deleted
    /// afterwards; its own rate (tasks per second) is kept and returned, and
    /// its CPU per task (the whole process, start-up included) and the
    /// broker's over the run.
    pub async fn run(
        &mut self,
        conn: &Connection,
        url: &str,
        mode: &str,
        broker_pid: Option<u32>,
    ) -> Result<f64> {
        let queue = self.queue();
        let broker = Meter::started(broker_pid);
        let mut child = self
            .command(mode, url, &queue, 0)
            .spawn()
            .with_context(|| format!("run {}", self.program.display()))?;
        let pid = child.id();
        let text = output_text(&mut child).await;
        // Read before the child is reaped: a zombie keeps its CPU times.
        let cpu = match pid {
            Some(pid) => final_cpu(pid).await,
            None => None,
        };
        let status = child.wait().await?;
        let broker_us = broker.per_task_us(self.n as f64);
        delete_queue(conn, &queue).await;
        match parse_rate(&text) {
            Some(r) => {
                self.rates.push(r);
                self.cpu
                    .push((cpu.map(|s| s * 1e6 / self.n as f64), broker_us));
                Ok(r)
            }
            None => bail!(
                "{} peer {mode} gave no rate ({status}): {}",
                self.name,
                text.trim()
            ),
        }
    }

    /// One drain, measured as warren's sides are: the peer publishes its N
    /// tasks, then consumes them at `prefetch` (0: its default) while the
    /// broker's ready count of its queue is polled ([`Watch::drain`]); its
    /// own rate line is not used.
    pub async fn drain(
        &mut self,
        conn: &Connection,
        url: &str,
        prefetch: u16,
        broker_pid: Option<u32>,
    ) -> Result<Drained> {
        let queue = self.queue();
        let mut child = self
            .command("drain", url, &queue, prefetch)
            .spawn()
            .with_context(|| format!("run {}", self.program.display()))?;
        let mut watch = Watch::new(conn, &queue, child.id(), broker_pid).await?;
        let window = watch
            .drain_until(Duration::from_secs(300), async {
                // A peer exits once it has run its N tasks (maybe before a
                // poll sees the queue empty); one that failed, at once.
                child.wait().await.ok();
            })
            .await;
        watch.close().await;
        let done = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
        if done.is_err() {
            child.kill().await.ok();
        }
        delete_queue(conn, &queue).await;
        let text = output_text(&mut child).await;
        let window =
            window.with_context(|| format!("{} peer drain: {}", self.name, text.trim()))?;
        Ok(Drained::of(&window, None))
    }
}

/// Everything a finished (or killed) child wrote.
async fn output_text(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    if let (Some(mut o), Some(mut e)) = (child.stdout.take(), child.stderr.take()) {
        let _ = tokio::join!(o.read_to_end(&mut out), e.read_to_end(&mut err));
    }
    format!(
        "{}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    )
}

async fn delete_queue(conn: &Connection, queue: &str) {
    if let Ok(ch) = conn.create_channel().await {
        ch.queue_delete(queue.into(), Default::default()).await.ok();
        ch.close(200, "done".into()).await.ok();
    }
}

/// The first `rate <tasks/s>` of a peer's output, also behind a log prefix
/// (Python Celery's worker prints it through its logger).
fn parse_rate(text: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.split_once("rate ").map(|(_, r)| r))
        .find_map(|r| r.trim().parse::<f64>().ok())
}

/// The peer named `key`, if it ran.
pub fn find<'a>(peers: &'a [Peer], key: &str) -> Option<&'a Peer> {
    peers.iter().find(|p| p.key == key && !p.rates.is_empty())
}

/// The `rusty-celery` column: its spread, or "not measured".
pub fn rusty_cell(peers: &[Peer]) -> String {
    find(peers, "rusty-celery").map_or("not measured".into(), |p| Spread::of(&p.rates).to_string())
}

/// The `Celery` column: its spread, or a dash when it did not run.
pub fn celery_cell(peers: &[Peer]) -> String {
    find(peers, "celery").map_or("—".into(), |p| Spread::of(&p.rates).to_string())
}

/// `warren / rusty-celery` run by run (runs interleave, so run i of both saw
/// the same machine), when rusty-celery ran.
pub fn rusty_ratios(peers: &[Peer], warren: &[f64]) -> Option<Vec<f64>> {
    find(peers, "rusty-celery").map(|p| table::ratios(&p.rates, warren))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use clap::Parser;

    use super::*;

    fn args(peer_dir: &std::path::Path) -> Args {
        Args::parse_from([
            "warren-bench".as_ref(),
            "--peers".as_ref(),
            "rusty-celery".as_ref(),
            "--messages".as_ref(),
            "7".as_ref(),
            "--peer-dir".as_ref(),
            peer_dir.as_os_str(),
        ])
    }

    #[test]
    fn the_rate_line_is_found_among_others() {
        let out = "sent 5000 in 0.04 s, all in the queue after 0.22 s (no publisher confirms)\nrate 22646\n";
        assert_eq!(parse_rate(out), Some(22646.0));
        assert_eq!(parse_rate("Traceback: no rate here"), None);
        let celery = "[2026-11-26 11:14:32,533: WARNING/MainProcess] rate 4779\n";
        assert_eq!(parse_rate(celery), Some(4779.0));
    }

    #[test]
    fn rusty_celery_without_its_binary_is_skipped_and_not_measured() {
        let dir = tempfile::tempdir().expect("temp dir");
        let peers = from_args(&args(dir.path()));
        assert!(peers.is_empty());
        assert_eq!(rusty_cell(&peers), "not measured");
        assert!(rusty_ratios(&peers, &[1.0]).is_none());
    }

    #[test]
    fn rusty_celery_cells_and_ratios_come_from_its_runs() {
        let peer = Peer {
            key: "rusty-celery",
            name: "rusty-celery",
            program: "unused".into(),
            lead: Vec::new(),
            n: 1,
            rates: vec![10_000.0, 20_000.0],
            cpu: Vec::new(),
            runs: 0,
        };
        let peers = [peer];
        assert_eq!(rusty_cell(&peers), "20.0k/s (10.0k–20.0k)");
        assert_eq!(celery_cell(&peers), "—");
        assert_eq!(
            rusty_ratios(&peers, &[15_000.0, 10_000.0]),
            Some(vec![1.5, 0.5])
        );
    }

    /// A stand-in for the built peer binary: what warren-bench passes it and
    /// reads back, against the real broker (the peer crate itself is never
    /// built by the workspace's tests).
    #[tokio::test]
    async fn a_built_rusty_celery_peer_runs_with_the_celery_peer_cli() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin_dir = dir.path().join("rusty-celery/target/release");
        std::fs::create_dir_all(&bin_dir).expect("bin dir");
        let argv = dir.path().join("argv");
        let bin = bin_dir.join("rusty-celery-peer");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho \"$@\" > '{}'\necho rate 1234\n",
                argv.display()
            ),
        )
        .expect("write stand-in");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        let mut peers = from_args(&args(dir.path()));
        assert_eq!(peers.len(), 1);
        let url = warren::testing::broker_url();
        let amqp = warren::config::AmqpConfig {
            url: Some(warren::config::Secret::new(url.to_owned())),
            ..Default::default()
        };
        let conn = warren::amqp::connect(&amqp, "bench-peers-test")
            .await
            .expect("connect");
        let rate = peers[0]
            .run(&conn, url, "publish", None)
            .await
            .expect("peer run");
        assert_eq!(rate, 1234.0);
        assert_eq!(peers[0].rates, vec![1234.0]);
        let seen = std::fs::read_to_string(&argv).expect("argv written");
        let queue = format!("bench.rusty-celery.{}.1", std::process::id());
        assert_eq!(
            seen.trim(),
            format!("publish --url {url} --queue {queue} -n 7")
        );
        conn.close(200, "done".into()).await.ok();
    }
}
