//! Measuring every side the same way: CPU from `/proc/<pid>/stat`
//! (utime + stime, a process and its descendants) over a window, divided by
//! the tasks in it; completion from the broker's own count of a queue's ready
//! messages, polled every [`POLL`] (a passive `queue.declare`), never from
//! the measured side.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use crate::cpu_seconds;

/// How often a drain's queue is polled: slow enough not to load the broker
/// or anyone else, fast enough for a few samples in a one-second drain.
/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`); `pid`
/// is a number or `self`.
pub fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Await the confirms of paced publishes off the pacing loop, in order:
/// send each `Pending` to the returned sender; the task ends with the first
/// failed confirm, or when the sender is dropped.
pub fn confirm_in_order() -> (
    tokio::sync::mpsc::UnboundedSender<warren::amqp::Pending>,
    tokio::task::JoinHandle<Result<(), warren::Error>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<warren::amqp::Pending>();
    let confirmer = tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            p.confirmed().await?;
        }
        Ok(())
    });
    (tx, confirmer)
}

pub const POLL: Duration = Duration::from_millis(100);

/// CPU seconds of `pid` and every process below it (a Python worker may
/// fork; a shell may exec), from `/proc`; for this process, its own only
/// (the consumers and producers it starts are sides of their own).
pub fn tree_cpu(pid: u32) -> Option<f64> {
    let own = cpu_seconds(pid)?;
    if pid == std::process::id() {
        return Some(own);
    }
    let mut sum = own;
    for child in children(pid) {
        sum += tree_cpu(child).unwrap_or(0.0);
    }
    Some(sum)
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The CPU seconds a child spent in all, read once it has exited but before
/// it is reaped (a zombie keeps its final utime and stime in `/proc`). The
/// caller must not wait for the child before this returns.
pub async fn final_cpu(pid: u32) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
        if state == "Z" || state == "X" {
            return cpu_seconds(pid);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// CPU seconds of an optional process (the broker, a client), from a start
/// point.
#[derive(Clone, Copy)]
pub struct Meter {
    pid: Option<u32>,
    start: Option<f64>,
}

impl Meter {
    pub fn new(pid: Option<u32>) -> Self {
        Self { pid, start: None }
    }

    /// Started now.
    pub fn started(pid: Option<u32>) -> Self {
        let mut m = Self::new(pid);
        m.start();
        m
    }

    pub fn start(&mut self) {
        self.start = self.pid.and_then(tree_cpu);
    }

    /// µs per task since [`Meter::start`].
    pub fn per_task_us(&self, tasks: f64) -> Option<f64> {
        let now = tree_cpu(self.pid?)?;
        Some((now - self.start?) * 1e6 / tasks)
    }
}

/// One poll of a queue.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    pub ready: u32,
    pub client: Option<f64>,
    pub broker: Option<f64>,
}

/// Polls one queue's ready count, with the CPU of the client and the broker
/// read at the same instant.
pub struct Watch<'c> {
    conn: &'c Connection,
    ch: Channel,
    queue: String,
    /// The queue was found once (a peer declares its own queue itself).
    seen: bool,
    pub client: Option<u32>,
    pub broker: Option<u32>,
}

impl<'c> Watch<'c> {
    pub async fn new(
        conn: &'c Connection,
        queue: &str,
        client: Option<u32>,
        broker: Option<u32>,
    ) -> Result<Watch<'c>> {
        Ok(Watch {
            conn,
            ch: conn.create_channel().await?,
            queue: queue.to_owned(),
            seen: false,
            client,
            broker,
        })
    }

    /// The queue's ready count; 0 while a queue never seen does not exist
    /// yet (the broker closes the channel on the failed passive declare).
    pub async fn ready(&mut self) -> Result<u32> {
        let q = match self
            .ch
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(q) => q,
            Err(_) if !self.seen => {
                self.ch = self.conn.create_channel().await?;
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        self.seen = true;
        Ok(q.message_count())
    }

    pub async fn sample(&mut self) -> Result<Sample> {
        let ready = self.ready().await?;
        Ok(Sample {
            at: Instant::now(),
            ready,
            client: self.client.and_then(tree_cpu),
            broker: self.broker.and_then(tree_cpu),
        })
    }

    /// Poll until the queue, having been filled (its count stopped
    /// growing), is empty; the drain is measured between the first poll that
    /// shows it shrinking and the last poll that still shows messages, both
    /// well inside the drain (so start-up and the tail are left out the same
    /// way for every side).
    pub async fn drain(&mut self, timeout: Duration) -> Result<DrainWindow> {
        self.drain_until(timeout, std::future::pending::<()>())
            .await
    }

    /// [`Watch::drain`], also ending when `stop` completes (a peer that
    /// exits after its last task, leaving its unacked prefetch to the
    /// queue again).
    pub async fn drain_until(
        &mut self,
        timeout: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<DrainWindow> {
        let deadline = Instant::now() + timeout;
        let mut samples: Vec<Sample> = Vec::new();
        tokio::pin!(stop);
        loop {
            let s = self.sample().await?;
            let done = s.ready == 0 && samples.iter().any(|p| p.ready > 0);
            samples.push(s);
            if done {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "queue {} not drained in {timeout:?} ({} left)",
                    self.queue,
                    s.ready
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = &mut stop => break,
            }
        }
        DrainWindow::of(&samples).ok_or_else(|| {
            anyhow::anyhow!(
                "the drain was over in fewer than three polls ({} ms apart): use more --messages",
                POLL.as_millis()
            )
        })
    }

    pub async fn close(self) {
        self.ch.close(200, "done".into()).await.ok();
    }
}

/// What the broker's counts say about one drain.
#[derive(Clone, Copy, Debug)]
pub struct DrainWindow {
    pub tasks: f64,
    pub secs: f64,
    pub client_us: Option<f64>,
    pub broker_us: Option<f64>,
}

impl DrainWindow {
    /// From the first sample below its predecessor (the drain has begun) to
    /// the last with messages left (it has not ended).
    pub fn of(samples: &[Sample]) -> Option<DrainWindow> {
        let a = (1..samples.len()).find(|&i| samples[i].ready < samples[i - 1].ready)?;
        let b = samples.iter().rposition(|s| s.ready > 0)?;
        if b <= a {
            return None;
        }
        let (a, b) = (&samples[a], &samples[b]);
        let tasks = f64::from(a.ready - b.ready);
        let per = |x: Option<f64>, y: Option<f64>| Some((y? - x?) * 1e6 / tasks);
        Some(DrainWindow {
            tasks,
            secs: (b.at - a.at).as_secs_f64(),
            client_us: per(a.client, b.client),
            broker_us: per(a.broker, b.broker),
        })
    }

    pub fn rate(&self) -> f64 {
        self.tasks / self.secs
    }
}

/// One timed drain.
#[derive(Clone, Copy)]
pub struct Drained {
    /// Tasks per second over the measured window.
    pub rate: f64,
    /// Consumer CPU per task over the window, µs.
    pub cpu_us: Option<f64>,
    /// Broker CPU per task over the window, µs (with `--broker-pid`).
    pub broker_us: Option<f64>,
    /// Consumer peak RSS, KiB (warren side only: the plain side shares the
    /// bench process).
    pub rss_kib: Option<u64>,
}

impl Drained {
    pub fn of(w: &DrainWindow, rss_kib: Option<u64>) -> Drained {
        Drained {
            rate: w.rate(),
            cpu_us: w.client_us,
            broker_us: w.broker_us,
            rss_kib,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ms: u64, ready: u32, cpu: f64) -> Sample {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        Sample {
            at: *BASE.get_or_init(Instant::now) + Duration::from_millis(ms),
            ready,
            client: Some(cpu),
            broker: Some(cpu * 2.0),
        }
    }

    #[test]
    fn the_window_leaves_out_the_filling_the_start_and_the_tail() {
        // Filling (a peer publishes first), flat, draining, empty.
        let v = [
            s(0, 100, 0.0),
            s(100, 1000, 0.1),
            s(200, 1000, 0.2),
            s(300, 900, 0.3),
            s(400, 500, 0.5),
            s(500, 100, 0.7),
            s(600, 0, 0.9),
        ];
        let w = DrainWindow::of(&v).expect("a window");
        assert_eq!(w.tasks, 800.0);
        assert!((w.secs - 0.2).abs() < 1e-9);
        assert!((w.rate() - 4000.0).abs() < 1e-6);
        assert!((w.client_us.expect("client") - 0.4e6 / 800.0).abs() < 1e-6);
        assert!((w.broker_us.expect("broker") - 0.8e6 / 800.0).abs() < 1e-6);
    }

    #[test]
    fn a_drain_seen_by_fewer_than_three_polls_gives_no_window() {
        assert!(DrainWindow::of(&[s(0, 1000, 0.0), s(100, 0, 0.1)]).is_none());
        assert!(DrainWindow::of(&[s(0, 1000, 0.0), s(100, 10, 0.1), s(200, 0, 0.2)]).is_none());
    }

    #[test]
    fn the_cpu_of_a_process_tree_includes_its_children_but_ours_only_us() {
        // A shell whose busy loop runs in a child of its own.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "(i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 5) & wait",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn sh");
        std::thread::sleep(Duration::from_millis(1500));
        let own = cpu_seconds(child.id()).expect("shell cpu");
        let tree = tree_cpu(child.id()).expect("tree cpu");
        child.kill().ok();
        child.wait().ok();
        assert!(tree > own + 0.05, "tree {tree} s, shell alone {own} s");
        let us = std::process::id();
        assert_eq!(tree_cpu(us), cpu_seconds(us));
    }
}
