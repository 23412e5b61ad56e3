//! `--peers`: other task systems measured in the same run, on the same
//! broker. `celery` is Python Celery through `bench/peers/celery_peer.py`
//! (skipped, with a message, when `python3 -c 'import celery'` fails);
//! `rusty-celery` is not built into warren-bench yet and is reported as not
//! measured.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use lapin::Connection;

use crate::table::Spread;
use crate::Args;

/// Python Celery, when it can run here.
pub struct Celery {
    script: PathBuf,
    n: usize,
    runs: usize,
}

impl Celery {
    /// The peer if `--peers` names it and Python has `celery`.
    pub fn from_args(args: &Args) -> Option<Celery> {
        if args.peers.iter().any(|p| p == "rusty-celery") {
            warren::outln!("peers: rusty-celery not measured (not built into warren-bench; see docs/benchmarks.md)");
        }
        if !args.peers.iter().any(|p| p == "celery") {
            return None;
        }
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
        Some(Celery {
            script: args.peer_dir.join("celery_peer.py"),
            n: args.peer_messages,
            runs: 0,
        })
    }

    /// One run of `mode` (`publish` or `drain`): tasks per second.
    pub async fn run(&mut self, conn: &Connection, url: &str, mode: &str) -> Result<f64> {
        self.runs += 1;
        let queue = format!("bench.celery.{}.{}", std::process::id(), self.runs);
        let out = tokio::process::Command::new("python3")
            .arg(&self.script)
            .args([mode, "--url", url, "--queue", &queue, "-n"])
            .arg(self.n.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("run {}", self.script.display()))?;
        if let Ok(ch) = conn.create_channel().await {
            ch.queue_delete(queue.as_str().into(), Default::default())
                .await
                .ok();
            ch.close(200, "done".into()).await.ok();
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let rate = text
            .lines()
            .filter_map(|l| l.split_once("rate ").map(|(_, r)| r.trim()))
            .find_map(|r| r.parse::<f64>().ok());
        match rate {
            Some(r) => Ok(r),
            None => bail!(
                "Celery peer {mode} gave no rate ({}): {}",
                out.status,
                text.trim()
            ),
        }
    }
}

/// A peer's cell: its spread, or a dash when it did not run.
pub fn cell(rates: &[f64]) -> String {
    if rates.is_empty() {
        "—".into()
    } else {
        Spread::of(rates).to_string()
    }
}
