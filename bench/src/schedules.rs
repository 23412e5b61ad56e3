//! `--scenario schedules`: the producer's scheduler at N schedules.
//!
//! For each N of `--schedules`, a `warren-producer run` (the release binary
//! next to this one) on a throwaway prefix holds N schedules `S * * * * *`
//! with S = i mod 60 (per-minute schedules spread over the seconds, so N/60
//! fire every second), all publishing the task `bench.sched` to one work
//! queue. A plain lapin consumer (no-ack) reads that queue the whole time
//! and, for every tick, takes the fire lag = receive time − the instant in
//! its id (`<schedule>@<RFC 3339 instant>`). Once the producer leads
//! (`warren_producer_leader 1`) and a warm-up has passed, a window of
//! `--seconds` is measured: fires received per second, the producer's CPU
//! (utime + stime from `/proc/<pid>/stat`) per fire, its RSS, and, right
//! after the window, the size of `/metrics` and the time to scrape it. Then
//! the bench waits up to `--drain` seconds for the rest of the window's due
//! instants and checks each fired exactly once (the warm-up before and the
//! drain after keep the window's edges out of it). `schedules check` of the
//! same file is timed before the producer starts.
//!
//! Also: a burst (`--burst` schedules all due at the same second, every
//! 15 s, `--burst-rounds` of them: time from the instant until all are
//! received) and, with `--failover`, two producers and a `kill -9` of the
//! leader (time to the standby's first fire, ids twice, instants missing).
//! With `--peers robfig-cron`, the Go program of `bench/peers/robfig-cron`
//! (robfig/cron v3 holding the same entries, each job publishing its tick
//! with a confirm through amqp091-go) runs the same window and burst, read by
//! the same consumer.
//!
//! Fire counts come from the bench's own consumer, never from the
//! producer's metrics, whose names may change.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, SubsecRound, Timelike, Utc};
use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::io::AsyncBufReadExt;
use warren::config::{QueueType, TopologyConfig};
use warren::topology::{self, Topology};

use crate::latency::Percentiles;
use crate::{cpu_seconds, free_port, sibling_bin, Args};

const TASK: &str = "bench.sched";
/// From leading to the first measured instant.
const WARMUP: Duration = Duration::from_secs(5);
/// The burst schedules' expression: all due at once, four times a minute.
const BURST_CRON: &str = "*/15 * * * * *";
const BURST_PERIOD: i64 = 15;
/// `kill -9` this long into the failover window.
const BEFORE_KILL: Duration = Duration::from_secs(10);
/// How long after the kill the failover window goes on.
const AFTER_KILL: Duration = Duration::from_secs(20);

/// One tick as the bench's consumer saw it.
struct Rec {
    id: String,
    /// Schedule index and instant (ms since the epoch), from the id.
    key: Option<(usize, i64)>,
    /// The publisher's pid, from `app_id` (`<host>:<pid>`).
    pid: Option<u32>,
    at: DateTime<Utc>,
}

type Recs = Arc<Mutex<Vec<Rec>>>;

fn schedule_name(i: usize) -> String {
    format!("sched-{i:06}")
}

/// `(schedule index, instant in ms)` of a tick id `sched-000123@<RFC 3339>`.
fn parse_id(id: &str) -> Option<(usize, i64)> {
    let (name, at) = id.rsplit_once('@')?;
    let i = name.strip_prefix("sched-")?.parse().ok()?;
    let at = DateTime::parse_from_rfc3339(at).ok()?;
    Some((i, at.timestamp_millis()))
}

/// The bench's reader of the work queue: no-ack, so the broker pushes each
/// tick as soon as it is routed.
struct Collector {
    recs: Recs,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    channel: lapin::Channel,
}

impl Collector {
    /// Read every work queue of `t` into one record.
    async fn start(conn: &Connection, t: &Topology) -> Result<Collector> {
        let channel = conn.create_channel().await?;
        let recs: Recs = Arc::default();
        let mut tasks = Vec::new();
        for (i, q) in t.work_queues().iter().enumerate() {
            tasks.push(Self::consume(&channel, &q.name, i, recs.clone()).await?);
        }
        Ok(Collector {
            recs,
            tasks,
            channel,
        })
    }

    async fn consume(
        channel: &lapin::Channel,
        queue: &str,
        i: usize,
        sink: Recs,
    ) -> Result<tokio::task::JoinHandle<()>> {
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("bench-schedules-{i}").into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let at = Utc::now();
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let pid = d
                    .properties
                    .app_id()
                    .as_ref()
                    .and_then(|a| a.as_str().rsplit_once(':')?.1.parse().ok());
                let key = parse_id(&id);
                if let Ok(mut v) = sink.lock() {
                    v.push(Rec { id, key, pid, at });
                }
            }
        }))
    }

    /// Apply `f` to what was received so far.
    fn with<T>(&self, f: impl FnOnce(&[Rec]) -> T) -> Result<T> {
        let v = self
            .recs
            .lock()
            .map_err(|_| anyhow::anyhow!("collector poisoned"))?;
        Ok(f(&v))
    }

    async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.channel.close(200, "done".into()).await.ok();
    }
}

/// Schedules `0..n` whose index is due at second `sec` of a minute.
fn due_at(n: usize, sec: u32) -> usize {
    let sec = sec as usize;
    n / 60 + usize::from(sec < n % 60)
}

/// Instants `[t0, t1)` (whole seconds) × the schedules due at each.
fn due_in(n: usize, t0: DateTime<Utc>, t1: DateTime<Utc>) -> usize {
    let mut due = 0;
    let mut t = t0;
    while t < t1 {
        due += due_at(n, t.second());
        t += chrono::Duration::seconds(1);
    }
    due
}

/// Distinct `(schedule, instant)` of ticks with an instant in `[t0, t1)`.
fn made_in(recs: &[Rec], t0: DateTime<Utc>, t1: DateTime<Utc>) -> usize {
    let (a, b) = (t0.timestamp_millis(), t1.timestamp_millis());
    recs.iter()
        .filter_map(|r| r.key)
        .filter(|(_, at)| (a..b).contains(at))
        .collect::<HashSet<_>>()
        .len()
}

/// Ids received more than once.
fn duplicates(recs: &[Rec]) -> usize {
    duplicate_ids(recs).len()
}

/// The ids received more than once, sorted.
fn duplicate_ids(recs: &[Rec]) -> Vec<String> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for r in recs {
        *seen.entry(&r.id).or_default() += 1;
    }
    let mut twice: Vec<String> = seen
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id.to_owned())
        .collect();
    twice.sort();
    twice
}

/// Receive time − instant, ms, of the ticks with an instant in `[t0, t1)`.
fn lags_in(recs: &[Rec], t0: DateTime<Utc>, t1: DateTime<Utc>) -> Vec<f64> {
    let (a, b) = (t0.timestamp_millis(), t1.timestamp_millis());
    recs.iter()
        .filter_map(|r| {
            let (_, at) = r.key?;
            (a..b)
                .contains(&at)
                .then(|| (r.at.timestamp_micros() - at * 1000) as f64 / 1000.0)
        })
        .collect()
}

/// The first whole second at least `after` from now.
fn whole_second_after(after: Duration) -> DateTime<Utc> {
    let t = Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
    t.trunc_subsecs(0) + chrono::Duration::seconds(1)
}

async fn sleep_until(t: DateTime<Utc>) {
    if let Ok(d) = (t - Utc::now()).to_std() {
        tokio::time::sleep(d).await;
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    crate::meter::status_kib(&pid.to_string(), field)
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("—".into(), |k| format!("{:.0}", k as f64 / 1024.0))
}

/// A producer's config: `n` schedules, `cron` for all of them, or
/// `S * * * * *` with S = i mod 60 when `None`.
/// `--no-events`, for every producer config this scenario writes.
static NO_EVENTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
/// `--sched-queues`, for every config and topology this scenario makes.
static QUEUES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn queues() -> usize {
    QUEUES.get().copied().unwrap_or(1).max(1)
}

/// The task schedule `i` publishes: one queue's, or one of `--sched-queues`.
fn task_of(i: usize) -> String {
    match queues() {
        1 => TASK.to_owned(),
        k => format!("{TASK}.{}", i % k),
    }
}

/// The work queues of a run: one for every task, or one per task of
/// [`task_of`].
fn queue_configs() -> Vec<warren::config::QueueConfig> {
    match queues() {
        1 => TopologyConfig::default().queues,
        k => (0..k)
            .map(|j| warren::config::QueueConfig {
                name: format!("q{j}"),
                bindings: vec![format!("{TASK}.{j}")],
                ..Default::default()
            })
            .collect(),
    }
}

fn config_text(n: usize, cron: Option<&str>) -> String {
    let mut s = String::with_capacity(n * 80 + 64);
    s.push_str("[log]\nlevel = \"warn\"\n");
    if NO_EVENTS.get().copied().unwrap_or(false) {
        s.push_str("[events]\nenabled = false\n");
    }
    if queues() > 1 {
        for q in queue_configs() {
            s.push_str(&format!(
                "\n[[topology.queues]]\nname = \"{}\"\nbindings = [\"{}\"]\n",
                q.name, q.bindings[0]
            ));
        }
    }
    for i in 0..n {
        let expr = cron.map_or_else(|| format!("{} * * * * *", i % 60), str::to_owned);
        s.push_str(&format!(
            "\n[[schedules]]\nname = \"{}\"\ncron = \"{expr}\"\ntask = \"{}\"\n",
            schedule_name(i),
            task_of(i)
        ));
    }
    s
}

fn sched_topo(name: &str) -> Topology {
    Topology::new(&TopologyConfig {
        prefix: format!("bench.{name}.{}", std::process::id()),
        queue_type: QueueType::Classic,
        queues: queue_configs(),
        ..TopologyConfig::default()
    })
}

/// Children get only the environment the bench gives them.
pub(crate) fn clean_env(cmd: &mut tokio::process::Command) {
    for (k, _) in std::env::vars() {
        if k.starts_with("WARREN_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
}

/// A scheduler process the bench started: a `warren-producer` or the peer.
pub(crate) struct Proc {
    pub(crate) child: tokio::process::Child,
    pub(crate) pid: u32,
    /// `http://127.0.0.1:<port>` of a producer.
    pub(crate) base: Option<String>,
    log: PathBuf,
    label: String,
}

impl Proc {
    /// A `warren-producer run` with `config` on `prefix`, stderr to a log
    /// in `dir`. `fast`: heartbeat 2 s and a standby retry of 500 ms, as in
    /// the failover tests.
    pub(crate) fn producer(
        bin: &Path,
        url: &str,
        prefix: &str,
        config: &Path,
        dir: &Path,
        label: &str,
        fast: bool,
    ) -> Result<Proc> {
        let port = free_port()?;
        let log = dir.join(format!("{label}.log"));
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("--config").arg(config).arg("run");
        clean_env(&mut cmd);
        cmd.env("WARREN_AMQP_URL", url)
            .env("WARREN_TOPOLOGY__PREFIX", prefix)
            .env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn");
        if fast {
            cmd.env("WARREN_AMQP__HEARTBEAT", "2s")
                .env("WARREN_LEADER__RETRY_INTERVAL", "500ms");
        }
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} run", bin.display()))?;
        let pid = child.id().context("no pid")?;
        Ok(Proc {
            child,
            pid,
            base: Some(format!("http://127.0.0.1:{port}")),
            log,
            label: label.into(),
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn failed(&mut self, what: &str) -> anyhow::Error {
        let status = match self.child.try_wait() {
            Ok(Some(st)) => format!(" (exited: {st})"),
            _ => String::new(),
        };
        anyhow::anyhow!(
            "{} {what}{status}; its log:\n{}",
            self.label,
            self.log_tail()
        )
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait until the producer reports `warren_producer_leader 1`.
    pub(crate) async fn wait_leader(
        &mut self,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Result<()> {
        let base = self.base.clone().context("not a producer")?;
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited() {
                return Err(self.failed("exited before leading"));
            }
            let scrape = Instant::now();
            if let Ok(r) = http.get(format!("{base}/metrics")).send().await {
                if let Ok(text) = r.text().await {
                    if warren::testing::scraped_value(&text, "warren_producer_leader", &[])
                        == Some(1.0)
                    {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(self.failed(&format!("did not lead within {timeout:?}")));
            }
            // At 100,000 schedules `/metrics` is tens of MB: polling it
            // back to back would slow the start being measured.
            tokio::time::sleep(Duration::from_millis(250).max(scrape.elapsed() * 2)).await;
        }
    }

    /// Wait until the producer answers `/readyz` with a success.
    pub(crate) async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Result<()> {
        let base = self.base.clone().context("not a producer")?;
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited() {
                return Err(self.failed("exited before it was ready"));
            }
            if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(self.failed(&format!("was not ready within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `kill -9`, and reap it.
    pub(crate) async fn kill(&mut self) {
        self.child.kill().await.ok();
    }
}

/// Who holds the schedules.
#[derive(Clone)]
enum Side {
    Warren(PathBuf),
    /// The robfig/cron peer binary.
    Robfig(PathBuf),
}

impl Side {
    fn label(&self) -> &'static str {
        match self {
            Side::Warren(_) => "warren-producer",
            Side::Robfig(_) => "robfig/cron v3 + amqp091-go",
        }
    }

    /// Start holding `n` schedules (`cron` for all, or the spread
    /// per-minute ones) on `t`; returns once it leads (warren) or has
    /// started its cron (peer).
    async fn start(
        &self,
        url: &str,
        t: &Topology,
        dir: &Path,
        n: usize,
        cron: Option<&str>,
        lead_timeout: Duration,
    ) -> Result<Proc> {
        match self {
            Side::Warren(bin) => {
                let cfg = dir.join("producer.toml");
                std::fs::write(&cfg, config_text(n, cron))?;
                let mut p = Proc::producer(bin, url, t.prefix(), &cfg, dir, "producer", false)?;
                p.wait_leader(&reqwest::Client::new(), lead_timeout).await?;
                Ok(p)
            }
            Side::Robfig(bin) => {
                let log = dir.join("robfig.log");
                let mut cmd = tokio::process::Command::new(bin);
                cmd.arg("-url")
                    .arg(url)
                    .arg("-exchange")
                    .arg(t.tasks_exchange())
                    .arg("-key")
                    .arg(TASK)
                    .arg("-n")
                    .arg(n.to_string());
                if let Some(c) = cron {
                    cmd.arg("-spec").arg(c);
                }
                cmd.stdout(Stdio::piped())
                    .stderr(std::fs::File::create(&log)?)
                    .kill_on_drop(true);
                let mut child = cmd
                    .spawn()
                    .with_context(|| format!("start {}", bin.display()))?;
                let pid = child.id().context("no pid")?;
                let stdout = child.stdout.take().context("no stdout")?;
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                let ready = tokio::time::timeout(lead_timeout, async {
                    while let Ok(Some(l)) = lines.next_line().await {
                        if l.trim() == "ready" {
                            return true;
                        }
                    }
                    false
                })
                .await;
                let mut p = Proc {
                    child,
                    pid,
                    base: None,
                    log,
                    label: "robfig-cron-peer".into(),
                };
                if ready != Ok(true) {
                    return Err(p.failed("did not start its cron"));
                }
                Ok(p)
            }
        }
    }
}

/// What one window at N schedules measured.
struct Row {
    who: &'static str,
    n: usize,
    startup: Duration,
    fires_per_s: f64,
    lag: Percentiles,
    made: usize,
    due: usize,
    dups: usize,
    cpu_per_fire_us: Option<f64>,
    /// CPU seconds per second of the window.
    cpu_busy: Option<f64>,
    /// The broker's CPU per fire (`--broker-pid`).
    broker_us: Option<f64>,
    hwm_kib: Option<u64>,
    rss_kib: Option<u64>,
    /// `/metrics` bytes and scrape time.
    metrics: Option<(usize, Duration)>,
    check: Option<String>,
}

impl Row {
    fn print(&self) {
        let mut cpu = self
            .cpu_per_fire_us
            .map_or("—".into(), |us| format!("{us:.0} µs"));
        if let Some(busy) = self.cpu_busy {
            cpu.push_str(&format!(" ({:.0} % of a core)", busy * 100.0));
        }
        let metrics = self.metrics.map_or("—".into(), |(bytes, took)| {
            format!(
                "{:.2} MB in {:.0} ms",
                bytes as f64 / 1e6,
                took.as_secs_f64() * 1000.0
            )
        });
        let broker = self
            .broker_us
            .map_or("—".into(), |us| format!("{us:.0} µs"));
        warren::outln!(
            "| {} | {} | {:.2} s | {:.0} | {} | {} / {} | {} | {cpu} | {broker} | {} / {} MiB | {metrics} | {} |",
            self.who,
            self.n,
            self.startup.as_secs_f64(),
            self.fires_per_s,
            lag_cell(&self.lag),
            self.made,
            self.due,
            self.dups,
            mib(self.hwm_kib),
            mib(self.rss_kib),
            self.check.as_deref().unwrap_or("—"),
        );
    }
}

fn lag_cell(p: &Percentiles) -> String {
    if p.seen == 0 {
        return "—".into();
    }
    let f = |ms: f64| {
        if ms >= 10_000.0 {
            format!("{:.0} s", ms / 1000.0)
        } else if ms >= 1000.0 {
            format!("{:.1} s", ms / 1000.0)
        } else {
            format!("{ms:.0} ms")
        }
    };
    format!("{} / {} / {}", f(p.p50), f(p.p99), f(p.max))
}

const TABLE_HEAD: &str = "| scheduler | schedules | start → leading | fires/s | fire lag p50 / p99 / max | made / due | ids twice | CPU per fire | broker CPU per fire | RSS VmHWM / VmRSS | `/metrics` | `schedules check` |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

pub async fn schedules_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let _ = NO_EVENTS.set(args.no_events);
    let _ = QUEUES.set(args.sched_queues);
    if args.sched_queues > 1 && !args.peers.is_empty() {
        anyhow::bail!("--sched-queues applies to warren only: drop --peers");
    }
    let secs = args.seconds.unwrap_or(60.0);
    let producer = Side::Warren(sibling_bin(&args.producer_bin, "warren-producer")?);
    let mut sides = vec![producer.clone()];
    if args.peers.iter().any(|p| p == "robfig-cron") {
        match robfig_bin(args) {
            Some(bin) => sides.push(Side::Robfig(bin)),
            None => warren::outln!(
                "schedules: robfig-cron peer not built ({}/robfig-cron/robfig-cron-peer missing; bash bench/peers/robfig-cron/build.sh): not measured",
                args.peer_dir.display()
            ),
        }
    }
    warren::outln!(
        "schedules: {:?} schedules `S * * * * *` (S = i mod 60), {secs} s window after a {} s warm-up, up to {} s drain; load average {}",
        args.schedules,
        WARMUP.as_secs(),
        args.drain,
        loadavg()
    );
    warren::outln!("{TABLE_HEAD}");
    let mut rows = Vec::new();
    for &n in &args.schedules {
        for side in &sides {
            match window_run(conn, args, url, side, n, secs).await {
                Ok(r) => {
                    r.print();
                    rows.push(r);
                }
                Err(e) => warren::outln!("schedules: {} at {n}: {e:#}", side.label()),
            }
        }
    }
    if args.burst > 0 {
        for side in &sides {
            if let Err(e) = burst_run(conn, args, url, side).await {
                warren::outln!("schedules burst: {}: {e:#}", side.label());
            }
        }
    }
    if args.failover {
        for &n in &args.schedules {
            if let Err(e) = failover_run(conn, url, &producer, n, args).await {
                warren::outln!("schedules failover at {n}: {e:#}");
            }
        }
    }
    warren::outln!("schedules: summary (load average {})", loadavg());
    warren::outln!("{TABLE_HEAD}");
    for r in &rows {
        r.print();
    }
    Ok(())
}

fn robfig_bin(args: &Args) -> Option<PathBuf> {
    let bin = args.peer_dir.join("robfig-cron").join("robfig-cron-peer");
    bin.is_file().then_some(bin)
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// Delete the run's topology and the producer's own objects.
pub(crate) async fn clean_up(conn: &Connection, t: &Topology) {
    warren::testing::delete_topology(conn, t).await;
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    for q in ["state", "control", "leader", "workflows", "workflows.view"] {
        let name = format!("{}.producer.{q}", t.prefix());
        ch.queue_delete(name.as_str().into(), Default::default())
            .await
            .ok();
    }
    let events = format!("{}.producer.events", t.prefix());
    ch.exchange_delete(events.as_str().into(), Default::default())
        .await
        .ok();
    ch.close(200, "done".into()).await.ok();
}

/// `warren-producer --config FILE schedules check`: wall time, or why not.
async fn time_check(bin: &Path, config: &Path, timeout: Duration) -> String {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .args(["schedules", "check"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    clean_env(&mut cmd);
    let start = Instant::now();
    match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => format!("> {:.0} s (stopped)", timeout.as_secs_f64()),
        Ok(Err(e)) => format!("failed to run: {e}"),
        Ok(Ok(out)) if !out.status.success() => format!(
            "failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(Ok(_)) => format!("{:.2} s", start.elapsed().as_secs_f64()),
    }
}

/// Wait until every `(schedule, instant)` due in `[t0, t1)` was received,
/// or `limit` passed.
async fn drain(
    c: &Collector,
    n: usize,
    t0: DateTime<Utc>,
    t1: DateTime<Utc>,
    limit: Duration,
) -> Result<()> {
    let due = due_in(n, t0, t1);
    let deadline = Instant::now() + limit;
    while c.with(|r| made_in(r, t0, t1))? < due && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

async fn window_run(
    conn: &Connection,
    args: &Args,
    url: &str,
    side: &Side,
    n: usize,
    secs: f64,
) -> Result<Row> {
    let t = sched_topo(&format!("sched{n}"));
    topology::declare(conn, &t).await?;
    let dir = tempfile::tempdir()?;
    let check = match side {
        Side::Warren(bin) => {
            let cfg = dir.path().join("check.toml");
            std::fs::write(&cfg, config_text(n, None))?;
            Some(time_check(bin, &cfg, Duration::from_secs(args.lead_timeout)).await)
        }
        Side::Robfig(_) => None,
    };
    let c = Collector::start(conn, &t).await?;
    let spawned = Instant::now();
    let r = async {
        let mut p = side
            .start(
                url,
                &t,
                dir.path(),
                n,
                None,
                Duration::from_secs(args.lead_timeout),
            )
            .await?;
        let startup = spawned.elapsed();
        let t0 = whole_second_after(WARMUP);
        let t1 = t0 + chrono::Duration::milliseconds((secs * 1000.0) as i64);
        sleep_until(t0).await;
        let cpu0 = cpu_seconds(p.pid);
        let broker0 = args.broker_pid.and_then(cpu_seconds);
        sleep_until(t1).await;
        let cpu1 = cpu_seconds(p.pid);
        let broker1 = args.broker_pid.and_then(cpu_seconds);
        let (hwm_kib, rss_kib) = (status_kib(p.pid, "VmHWM:"), status_kib(p.pid, "VmRSS:"));
        let window = (t1 - t0).num_milliseconds() as f64 / 1000.0;
        let received = c.with(|recs| recs.iter().filter(|r| r.at >= t0 && r.at < t1).count())?;
        let metrics = match &p.base {
            Some(base) => {
                let start = Instant::now();
                let body = reqwest::get(format!("{base}/metrics"))
                    .await?
                    .bytes()
                    .await?;
                Some((body.len(), start.elapsed()))
            }
            None => None,
        };
        if p.exited() {
            return Err(p.failed("exited during the window"));
        }
        drain(&c, n, t0, t1, Duration::from_secs(args.drain)).await?;
        p.kill().await;
        let (lags, made, dups) =
            c.with(|r| (lags_in(r, t0, t1), made_in(r, t0, t1), duplicates(r)))?;
        Ok(Row {
            who: side.label(),
            n,
            startup,
            fires_per_s: received as f64 / window,
            lag: Percentiles::of(lags),
            made,
            due: due_in(n, t0, t1),
            dups,
            cpu_per_fire_us: match (cpu0, cpu1) {
                (Some(a), Some(b)) if received > 0 => Some((b - a) * 1e6 / received as f64),
                _ => None,
            },
            broker_us: match (broker0, broker1) {
                (Some(a), Some(b)) if received > 0 => Some((b - a) * 1e6 / received as f64),
                _ => None,
            },
            cpu_busy: match (cpu0, cpu1) {
                (Some(a), Some(b)) => Some((b - a) / window),
                _ => None,
            },
            hwm_kib,
            rss_kib,
            metrics,
            check: check.clone(),
        })
    }
    .await;
    c.stop().await;
    clean_up(conn, &t).await;
    r
}

/// `--burst` schedules all due at the same second, every 15 s: from the
/// instant until all of them were received.
async fn burst_run(conn: &Connection, args: &Args, url: &str, side: &Side) -> Result<()> {
    let m = args.burst;
    let t = sched_topo("burst");
    topology::declare(conn, &t).await?;
    let dir = tempfile::tempdir()?;
    let c = Collector::start(conn, &t).await?;
    let r = async {
        let mut p = side
            .start(
                url,
                &t,
                dir.path(),
                m,
                Some(BURST_CRON),
                Duration::from_secs(args.lead_timeout),
            )
            .await?;
        // The first instant at least 2 s after leading.
        let soon = whole_second_after(Duration::from_secs(2)).timestamp();
        let first = soon + (BURST_PERIOD - soon.rem_euclid(BURST_PERIOD)) % BURST_PERIOD;
        let instants: Vec<i64> = (0..args.burst_rounds as i64)
            .map(|k| (first + k * BURST_PERIOD) * 1000)
            .collect();
        let last = instants.last().copied().unwrap_or(first * 1000);
        let all_in = |recs: &[Rec]| {
            recs.iter()
                .filter_map(|r| r.key)
                .filter(|(_, at)| *at == last)
                .count()
                >= m
        };
        let deadline = Instant::now()
            + Duration::from_millis(
                (last - Utc::now().timestamp_millis()).max(0) as u64 + BURST_PERIOD as u64 * 1000,
            );
        while !c.with(all_in)? && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let cpu = cpu_seconds(p.pid);
        p.kill().await;
        c.with(|recs| {
            for at in &instants {
                let mut lags: Vec<f64> = recs
                    .iter()
                    .filter(|r| r.key.is_some_and(|(_, a)| a == *at))
                    .map(|r| (r.at.timestamp_micros() - at * 1000) as f64 / 1000.0)
                    .collect();
                lags.sort_by(f64::total_cmp);
                let got = lags.len();
                let first = lags.first().copied().unwrap_or(f64::NAN);
                let all = lags.last().copied().unwrap_or(f64::NAN);
                warren::outln!(
                    "schedules burst: {}: {m} schedules due at {}: {got} of {m} received; first after {first:.0} ms, {} after {all:.0} ms",
                    side.label(),
                    DateTime::<Utc>::from_timestamp_millis(*at).map_or_else(String::new, |t| t.format("%H:%M:%S").to_string()),
                    if got >= m { "all" } else { "the last seen" },
                );
            }
        })?;
        if let Some(cpu) = cpu {
            warren::outln!(
                "schedules burst: {}: process CPU {cpu:.2} s since start ({} rounds)",
                side.label(),
                instants.len()
            );
        }
        Ok(())
    }
    .await;
    c.stop().await;
    clean_up(conn, &t).await;
    r
}

/// Two producers holding `n` schedules; `kill -9` of the leader.
async fn failover_run(
    conn: &Connection,
    url: &str,
    side: &Side,
    n: usize,
    args: &Args,
) -> Result<()> {
    let Side::Warren(bin) = side else {
        bail!("failover is measured for warren-producer only");
    };
    let t = sched_topo(&format!("failover{n}"));
    topology::declare(conn, &t).await?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("producer.toml");
    std::fs::write(&cfg, config_text(n, None))?;
    let c = Collector::start(conn, &t).await?;
    let http = reqwest::Client::new();
    let lead_timeout = Duration::from_secs(args.lead_timeout);
    let r = async {
        let mut leader = Proc::producer(bin, url, t.prefix(), &cfg, dir.path(), "leader", true)?;
        leader.wait_leader(&http, lead_timeout).await?;
        let mut standby =
            Proc::producer(bin, url, t.prefix(), &cfg, dir.path(), "standby", true)?;
        standby.wait_ready(&http, lead_timeout).await?;
        let t0 = whole_second_after(WARMUP);
        sleep_until(t0 + chrono::Duration::from_std(BEFORE_KILL)?).await;
        let killed = Utc::now();
        leader.kill().await;
        let t1 = (killed + chrono::Duration::from_std(AFTER_KILL)?).trunc_subsecs(0);
        sleep_until(t1).await;
        drain(&c, n, t0, t1, Duration::from_secs(args.drain)).await?;
        let standby_alive = !standby.exited();
        standby.kill().await;
        let (first, made, dups, dead_after) = c.with(|recs| {
            let first = recs
                .iter()
                .filter(|r| r.pid == Some(standby.pid))
                .map(|r| r.at)
                .min();
            let dead_after = recs
                .iter()
                .filter(|r| r.pid == Some(leader.pid) && r.at > killed + chrono::Duration::milliseconds(100))
                .count();
            // Each id twice, with who sent each copy and when.
            let dups: Vec<String> = duplicate_ids(recs)
                .into_iter()
                .map(|id| {
                    let copies: Vec<String> = recs
                        .iter()
                        .filter(|r| r.id == id)
                        .map(|r| {
                            let who = match r.pid {
                                Some(p) if p == leader.pid => "leader",
                                Some(p) if p == standby.pid => "standby",
                                _ => "?",
                            };
                            format!("{who} {:+.2} s", (r.at - killed).num_milliseconds() as f64 / 1000.0)
                        })
                        .collect();
                    format!("{id}: {}", copies.join(", "))
                })
                .collect();
            (first, made_in(recs, t0, t1), dups, dead_after)
        })?;
        let due = due_in(n, t0, t1);
        warren::outln!(
            "schedules failover: {n} schedules, heartbeat 2 s, kill -9 of the leader {} s into the window: standby's first fire {} after the kill; ids twice {}{}; made / due in the window {made} / {due} (missing {}); received from the killed leader after the kill {dead_after}{}",
            BEFORE_KILL.as_secs(),
            first.map_or("never".into(), |f| format!("{:.2} s", (f - killed).num_milliseconds() as f64 / 1000.0)),
            dups.len(),
            if dups.is_empty() {
                String::new()
            } else {
                format!(" [{}]", dups.iter().take(5).cloned().collect::<Vec<_>>().join("; "))
            },
            due.saturating_sub(made),
            if standby_alive { "" } else { "; the standby exited" },
        );
        Ok(())
    }
    .await;
    c.stop().await;
    clean_up(conn, &t).await;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_counts_follow_i_mod_60() {
        assert_eq!(due_at(120, 0), 2);
        assert_eq!(due_at(61, 0), 2);
        assert_eq!(due_at(61, 1), 1);
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(due_in(1000, t0, t0 + chrono::Duration::seconds(60)), 1000);
        assert_eq!(due_in(10, t0, t0 + chrono::Duration::seconds(5)), 5);
    }

    #[test]
    fn a_tick_received_twice_counts_once_as_made_and_once_as_twice() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let rec = |id: &str, late_ms: i64| Rec {
            id: id.into(),
            key: parse_id(id),
            pid: None,
            at: parse_id(id)
                .and_then(|(_, at)| DateTime::from_timestamp_millis(at + late_ms))
                .unwrap(),
        };
        let recs = [
            rec("sched-000000@2026-01-01T00:00:00Z", 5),
            rec("sched-000000@2026-01-01T00:00:00Z", 700),
            rec("sched-000001@2026-01-01T00:00:01Z", 20),
            // Outside the window [t0, t0 + 2 s).
            rec("sched-000002@2026-01-01T00:00:02Z", 1),
        ];
        let t1 = t0 + chrono::Duration::seconds(2);
        assert_eq!(made_in(&recs, t0, t1), 2);
        assert_eq!(duplicates(&recs), 1);
        assert_eq!(lags_in(&recs, t0, t1), vec![5.0, 700.0, 20.0]);
    }

    #[test]
    fn tick_ids_parse() {
        assert_eq!(
            parse_id("sched-000123@2026-01-01T00:00:01Z"),
            Some((123, 1_767_225_601_000))
        );
        assert_eq!(parse_id("other@2026-01-01T00:00:01Z"), None);
        assert_eq!(parse_id("sched-000001@manual-x"), None);
    }
}
