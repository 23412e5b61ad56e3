//! `warren-bench`: warren's hot paths against a plain lapin loop on the same
//! broker, side by side in one run, so the ratios mean something on a shared
//! machine whose absolute speed drifts.
//!
//! * `publish`: N persistent messages with publisher confirms, 1,000 in flight:
//!   plain `basic_publish` loop vs `warren::amqp::Publisher::publish_tasks`,
//!   `warren-producer publish --batch` and `POST /v1/tasks`; see [`publish`].
//! * `e2e`: a consumer is running; N tasks are published (pipelined confirms)
//!   and the clock stops when the consumer has acked all of them. Plain: a lapin
//!   consumer that acks each delivery without awaiting it in the loop. warren: the
//!   `warren-consumer` binary with a `noop` handler, counted through its
//!   `/metrics`. Also the consumer process's peak RSS.
//! * `drain` (not part of `all`): a pre-filled backlog emptied by a plain
//!   lapin consumer, `warren-consumer` and the peers, at the same prefetch
//!   and at each one's defaults, measured from the broker's queue count;
//!   see [`drain`].
//! * `latency`: enqueue → handler start at a paced 5,000 tasks/s; see
//!   [`latency`].
//! * `delay`: how late delayed tasks arrive through the delay levels (never
//!   early: that is a test's job), 10 tasks each at 250 ms, 1.7 s and 3.3 s.
//! * `schedules` (not part of `all`): the producer's scheduler at N
//!   schedules, a burst, a failover; see [`schedules`].
//! * `workflows` (not part of `all`): the coordinator's steps/s with 100
//!   and with 10,000 active runs; see [`workflows`].
//! * `steady` (not part of `all`): consumer CPU per task at paced rates,
//!   warren against a plain lapin consumer; see [`steady`].
//! * `retry-heavy` (not part of `all`): N tasks failing once then
//!   succeeding, against N succeeding at once; see [`retry`].
//!
//! Runs alternate between the two sides; the report gives each run and the
//! median ratio. Run with `cargo run --release -p warren-bench -- --help`.

mod cluster;
mod drain;
mod index;
mod latency;
mod meter;
mod peers;
mod publish;
mod rebuild;
mod retry;
mod schedules;
mod steady;
mod table;
mod workflows;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection};
use warren::amqp::Publisher;
use warren::config::{AmqpConfig, QueueType, Secret, TopologyConfig};
use warren::topology::{self, Topology};
use warren::Task;

#[derive(Parser)]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Runs per side.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Broker to use; default: start a throwaway node (deploy/broker.sh).
    #[arg(long, env = "WARREN_BENCH_AMQP_URL")]
    url: Option<String>,
    /// `publish`, `e2e`, `latency`, `delay`, `all`, `drain` (a pre-filled backlog, see
    /// `--max-priority`), `cluster` (quorum queue on a local 3-node cluster
    /// against a classic queue on one node), `schedules` (the producer's
    /// scheduler at `--schedules` N), `workflows` (steps/s at `--active`
    /// runs), `steady` (consumer CPU per task at paced `--steady-rates`),
    /// `retry-heavy` (N tasks failing once, against N succeeding at once),
    /// `index` (the task index in memory), `index-rebuild` (the task index
    /// rebuilt from `--index-tasks` tasks' events on the stream, and
    /// `GET /v1/tasks/{id}` at that size) or `index-latency` (a task's
    /// `succeeded` to the API's answer at `--rate`).
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Prefetch for both consumers.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// The warren-consumer binary (default: next to this one).
    #[arg(long)]
    consumer_bin: Option<PathBuf>,
    /// `drain`: the work queue's `x-max-priority`, one or more settings
    /// measured in the same run (e.g. `0,10`; 0, no priorities, is what a
    /// new default queue gets).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    max_priority: Vec<u8>,
    /// `drain`, `publish`, `steady`, `retry-heavy`, `schedules`: the broker's OS pid (e.g. `$(cat DIR/rabbit.pid)`
    /// of `deploy/broker.sh`), to report its CPU per drained task (per fire)
    /// too. Only meaningful when nothing else uses that broker meanwhile.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// `drain`: one row per prefetch P given, every side at prefetch P
    /// (warren: `prefetch = concurrency = P`), beside the row of each side's
    /// defaults.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    drain_prefetch: Vec<u16>,
    /// The warren-producer binary (default: next to this one).
    #[arg(long)]
    producer_bin: Option<PathBuf>,
    /// `publish`: tasks per `POST /v1/tasks` request (with the default
    /// concurrency, at most 1,000 tasks await their confirms: the plain
    /// loop's window).
    #[arg(long, default_value_t = 250)]
    api_batch: usize,
    /// `publish`: only these sides (`plain`, `library`, `cli`, `api`, and
    /// `plain-contract`: the plain loop sending warren's properties), e.g.
    /// to profile one in a process of its own (`perf stat`); ratios need
    /// `plain` among them.
    #[arg(long, value_delimiter = ',', default_value = "plain,library,cli,api")]
    sides: Vec<String>,
    /// `publish`: `POST /v1/tasks` requests in flight at once.
    #[arg(long, default_value_t = 4)]
    api_concurrency: usize,
    /// `latency`: tasks per second, paced.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// `latency`: how long to publish at `--rate` (default 10); `schedules`:
    /// the measured window at each N (default 60); `workflows`: the measured
    /// window at each `--active` (default 30).
    #[arg(long)]
    seconds: Option<f64>,
    /// `publish`, `drain`: peers measured in the same run: `celery` (Python
    /// Celery, if `python3 -c 'import celery'` works), `rusty-celery` (if
    /// `<peer-dir>/rusty-celery/target/release/rusty-celery-peer` is built);
    /// `schedules`: `robfig-cron` (if `<peer-dir>/robfig-cron/robfig-cron-peer`
    /// is built, `bash bench/peers/robfig-cron/build.sh`).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Tasks per Python Celery run (it publishes about 1k/s with confirms);
    /// rusty-celery runs `--messages`, as warren's sides do.
    #[arg(long, default_value_t = 5000)]
    peer_messages: usize,
    /// Where the peers' script and crate are.
    #[arg(long, default_value = "bench/peers")]
    peer_dir: PathBuf,
    /// `schedules`: numbers of schedules `S * * * * *` (S = i mod 60), one
    /// producer (and peer) run each.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    schedules: Vec<usize>,
    /// `schedules`: after the window, wait this many seconds at most for the
    /// window's due instants still missing.
    #[arg(long, default_value_t = 30)]
    drain: u64,
    /// `schedules`: schedules all due at the same second (every 15 s) for the
    /// burst case; 0: no burst.
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// `schedules`: bursts measured.
    #[arg(long, default_value_t = 3)]
    burst_rounds: usize,
    /// `schedules`: also two producers at each N and a `kill -9` of the
    /// leader.
    #[arg(long)]
    failover: bool,
    /// `schedules`, `workflows`: how long a producer may take to start and
    /// lead (and `schedules check` to finish), seconds.
    #[arg(long, default_value_t = 180)]
    lead_timeout: u64,
    /// `schedules`: run the producers with task events off
    /// (`events.enabled = false`), to tell the scheduler's own memory and
    /// CPU from the task index's.
    #[arg(long)]
    no_events: bool,
    /// `schedules`: spread the ticks over this many work queues (schedule i
    /// publishes `bench.sched.<i mod K>`, one queue bound to each), to see
    /// how much of the fire lag is one queue's own work. warren only.
    #[arg(long, default_value_t = 1)]
    sched_queues: usize,
    /// `workflows`: runs held active (their one step waits in a queue no
    /// consumer reads), one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "100,10000")]
    active: Vec<usize>,
    /// `workflows`: runs of the measured 2-step chain kept in flight.
    #[arg(long, default_value_t = 50)]
    inflight: usize,
    /// `steady`: paced publishing rates, tasks/s, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,10000")]
    steady_rates: Vec<f64>,
    /// `plain-consume` (the plain side of `steady`, run as a process of its
    /// own): the queue to consume.
    #[arg(long)]
    queue: Option<String>,
    /// `index-rebuild`: tasks whose events are written to the stream and
    /// read back.
    #[arg(long, default_value_t = 1_000_000)]
    index_tasks: usize,
    /// Append each scenario's summary as Markdown table rows to this file
    /// (`bench/run.sh` builds the README's table from it).
    #[arg(long)]
    table: Option<PathBuf>,
}

const WINDOW: usize = 1000;
const BODY: &[u8] = br#"{"user":42,"action":"bench","tags":["a","b"]}"#;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.scenario == "index" {
        // In this process, no broker.
        return index::index_scenario();
    }
    let _node;
    let url = match &args.url {
        Some(u) => u.clone(),
        None => {
            let node = warren::testing::Node::start();
            let u = node.url().to_owned();
            _node = node;
            u
        }
    };
    let amqp = AmqpConfig {
        url: Some(Secret::new(url.clone())),
        ..AmqpConfig::default()
    };
    let conn = warren::amqp::connect(&amqp, "bench").await?;
    warren::outln!(
        "warren-bench: {} messages x {} runs per side, body {} bytes, window {WINDOW}, prefetch {}",
        args.messages,
        args.runs,
        BODY.len(),
        args.prefetch
    );
    if args.scenario == "publish" || args.scenario == "all" {
        publish::publish_scenario(&conn, &args, &url).await?;
    }
    if args.scenario == "e2e" || args.scenario == "all" {
        e2e_scenario(&conn, &args, &url).await?;
    }
    if args.scenario == "delay" || args.scenario == "all" {
        delay_scenario(&conn).await?;
    }
    if args.scenario == "latency" || args.scenario == "all" {
        latency::latency_scenario(&conn, &args, &url).await?;
    }
    // Not part of `all`: it takes minutes at a useful backlog size.
    if args.scenario == "drain" {
        drain::drain_scenario(&conn, &args, &url).await?;
    }
    if args.scenario == "events" {
        drain::events_scenario(&conn, &args, &url).await?;
    }
    // Not part of `all`: it starts a 3-node cluster of its own.
    if args.scenario == "cluster" {
        cluster::cluster_scenario(&args).await?;
    }
    // Not part of `all`: minutes per N, and the producer at 100,000
    // schedules takes the machine.
    if args.scenario == "schedules" {
        schedules::schedules_scenario(&conn, &args, &url).await?;
    }
    if args.scenario == "workflows" {
        workflows::workflows_scenario(&conn, &args, &url).await?;
    }
    if args.scenario == "steady" {
        steady::steady_scenario(&conn, &args, &url).await?;
    }
    if args.scenario == "plain-consume" {
        steady::plain_consume(&conn, &args).await?;
    }
    if args.scenario == "index-rebuild" {
        rebuild::rebuild_scenario(&conn, &args, &url).await?;
    }
    if args.scenario == "index-latency" {
        rebuild::latency_scenario(&conn, &args, &url).await?;
    }
    if args.scenario == "retry-heavy" {
        retry::retry_scenario(&conn, &args, &url).await?;
    }
    // lapin's close now and then waits forever for a close-ok on a socket
    // it already shut (seen under `perf stat`): the results are out by now.
    tokio::time::timeout(Duration::from_secs(5), conn.close(200, "bye".into()))
        .await
        .ok();
    Ok(())
}

fn topo(name: &str) -> Topology {
    Topology::new(&TopologyConfig {
        prefix: format!("bench.{name}.{}", std::process::id()),
        queue_type: QueueType::Classic,
        ..TopologyConfig::default()
    })
}

fn report(name: &str, plain: &[f64], warren: &[f64]) {
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut ratios: Vec<f64> = plain.iter().zip(warren).map(|(p, w)| w / p).collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    warren::outln!("{name}: plain lapin msgs/s  [{}]", fmt(plain));
    warren::outln!("{name}: warren      msgs/s  [{}]", fmt(warren));
    warren::outln!(
        "{name}: warren / plain per run [{}], median {median:.2}",
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

async fn plain_publish(conn: &Connection, exchange: &str, key: &str, n: usize) -> Result<()> {
    plain_publish_body(conn, exchange, key, n, BODY).await
}

/// The bare properties of the plain lapin side.
fn plain_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

async fn plain_publish_body(
    conn: &Connection,
    exchange: &str,
    key: &str,
    n: usize,
    body: &[u8],
) -> Result<()> {
    plain_publish_with(conn, exchange, key, n, body, &plain_properties()).await
}

/// The plain lapin loop, sending `props` with every message.
async fn plain_publish_with(
    conn: &Connection,
    exchange: &str,
    key: &str,
    n: usize,
    body: &[u8],
    props: &BasicProperties,
) -> Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut pending = VecDeque::with_capacity(WINDOW);
    for _ in 0..n {
        let c = ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props.clone(),
            )
            .await?;
        pending.push_back(c);
        if pending.len() >= WINDOW {
            if let Some(c) = pending.pop_front() {
                check(c.await?)?;
            }
        }
    }
    for c in pending {
        check(c.await?)?;
    }
    ch.close(200, "done".into()).await.ok();
    Ok(())
}

fn check(c: Confirmation) -> Result<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("publish not confirmed: {other:?}"),
    }
}

async fn warren_publish(conn: &Connection, topo: &Topology, n: usize) -> Result<()> {
    let publisher = Publisher::new(conn, Duration::from_secs(30)).await?;
    let tasks: Vec<Task> = (0..n)
        .map(|_| Task::from_raw("bench.noop", BODY.to_vec()))
        .collect();
    let results = publisher
        .publish_tasks(topo, tasks.iter().map(|t| (t, Duration::ZERO)), WINDOW)
        .await;
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        bail!("warren publish failed: {e}");
    }
    publisher.channel().close(200, "done".into()).await.ok();
    Ok(())
}

async fn purge(conn: &Connection, topo: &Topology) -> Result<()> {
    let ch = conn.create_channel().await?;
    for q in topo.work_queues() {
        ch.queue_purge(q.name.as_str().into(), Default::default())
            .await?;
    }
    Ok(())
}

/// Consume `n` messages; `ready` fires once the broker registered the
/// consumer, so the timed publishing starts against a live consumer.
async fn plain_consume_until(
    conn: &Connection,
    queue: &str,
    n: usize,
    prefetch: u16,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "plain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = ready.send(());
    let mut seen = 0;
    while seen < n {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("plain consumer stalled")?
            .context("consumer ended")??;
        // Parse the JSON as any task queue must, then ack without awaiting in
        // the loop: the fast plain-lapin shape.
        let _: serde_json::Value = serde_json::from_slice(&d.data)?;
        tokio::spawn(async move { d.ack(BasicAckOptions::default()).await });
        seen += 1;
    }
    ch.close(200, "done".into()).await.ok();
    Ok(())
}

struct ConsumerProc {
    child: tokio::process::Child,
    metrics: String,
    base: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_consumer(
    bin: &std::path::Path,
    url: &str,
    t: &Topology,
    prefetch: u16,
) -> Result<ConsumerProc> {
    let config = format!(
        "[worker]\nprefetch = {prefetch}\nconcurrency = {prefetch}\n[log]\nlevel = \"warn\"\n[handlers.\"bench.*\"]\nkind = \"noop\"\n"
    );
    start_consumer_with(bin, url, t, &config).await
}

/// Start `warren-consumer` with `config` (TOML) on topology `t` and wait
/// until it is ready.
async fn start_consumer_with(
    bin: &std::path::Path,
    url: &str,
    t: &Topology,
    config: &str,
) -> Result<ConsumerProc> {
    let proc = spawn_consumer_with(bin, url, t, config, Stdio::inherit())?;
    wait_ready(&reqwest::Client::new(), &proc.base, "warren-consumer").await?;
    Ok(proc)
}

/// Start `warren-consumer` with `config` (TOML) on topology `t`, its stderr
/// (its log) to `stderr`; ready or not.
fn spawn_consumer_with(
    bin: &std::path::Path,
    url: &str,
    t: &Topology,
    config: &str,
    stderr: Stdio,
) -> Result<ConsumerProc> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("consumer.toml");
    std::fs::write(&cfg, config)?;
    let port = free_port()?;
    let child = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .env("WARREN_AMQP_URL", url)
        .env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("WARREN_TOPOLOGY__PREFIX", t.prefix())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let base = format!("http://127.0.0.1:{port}");
    Ok(ConsumerProc {
        child,
        metrics: format!("{base}/metrics"),
        base,
        _dir: dir,
    })
}

/// Sum of `warren_consumer_tasks_total` over all labels.
async fn tasks_done(http: &reqwest::Client, url: &str) -> Result<f64> {
    let text = http.get(url).send().await?.text().await?;
    Ok(warren::testing::scraped_value(&text, "warren_consumer_tasks_total", &[]).unwrap_or(0.0))
}

/// User + system CPU seconds of a process so far (from `/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line, in clock ticks (100 per second).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    meter::status_kib(&pid.to_string(), "VmHWM:")
}

fn consumer_bin(args: &Args) -> Result<PathBuf> {
    sibling_bin(&args.consumer_bin, "warren-consumer")
}

/// `given`, or the binary `name` next to this one.
fn sibling_bin(given: &Option<PathBuf>, name: &str) -> Result<PathBuf> {
    Ok(match given {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name(name),
    })
}

async fn e2e_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let bin = consumer_bin(args)?;
    let http = reqwest::Client::new();
    let (mut plain, mut warren) = (Vec::new(), Vec::new());
    let mut rss = Vec::new();
    let mut consumer_cpu = Vec::new();
    for run in 0..args.runs {
        for side in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let t = topo(&format!("e2e{run}{side}"));
            topology::declare(conn, &t).await?;
            let queue = t.work_queues()[0].name.clone();
            if side == 0 {
                let (consumer, consuming) = {
                    let conn2 = warren::amqp::connect(
                        &AmqpConfig {
                            url: Some(Secret::new(url)),
                            ..AmqpConfig::default()
                        },
                        "bench-plain",
                    )
                    .await?;
                    let n = args.messages;
                    let prefetch = args.prefetch;
                    let (ready, consuming) = tokio::sync::oneshot::channel();
                    let task = tokio::spawn(async move {
                        let r = plain_consume_until(&conn2, &queue, n, prefetch, ready).await;
                        conn2.close(200, "done".into()).await.ok();
                        r
                    });
                    (task, consuming)
                };
                if consuming.await.is_err() {
                    // It stopped before consuming: its error says why.
                    consumer.await??;
                    bail!("the plain consumer stopped before consuming");
                }
                let start = Instant::now();
                plain_publish(conn, &t.tasks_exchange(), "bench.noop", args.messages).await?;
                consumer.await??;
                plain.push(args.messages as f64 / start.elapsed().as_secs_f64());
            } else {
                let mut proc = start_consumer(&bin, url, &t, args.prefetch).await?;
                let start = Instant::now();
                warren_publish(conn, &t, args.messages).await?;
                let deadline = Instant::now() + Duration::from_secs(120);
                while tasks_done(&http, &proc.metrics).await? < args.messages as f64 {
                    if Instant::now() > deadline {
                        bail!("warren-consumer did not finish the run");
                    }
                    // Rarely: reading /metrics costs the consumer CPU.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                warren.push(args.messages as f64 / start.elapsed().as_secs_f64());
                if let Some(pid) = proc.child.id() {
                    rss.extend(peak_rss_kib(pid));
                    consumer_cpu.extend(cpu_seconds(pid).map(|s| s * 1e6 / args.messages as f64));
                }
                proc.child.kill().await.ok();
            }
            warren::testing::delete_topology(conn, &t).await;
        }
    }
    report("e2e", &plain, &warren);
    consumer_cpu.sort_by(f64::total_cmp);
    if let Some(us) = consumer_cpu.get(consumer_cpu.len() / 2) {
        warren::outln!(
            "e2e: warren-consumer process CPU per task (incl. start-up), median {us:.1} µs"
        );
    }
    if let Some(max) = rss.iter().max() {
        warren::outln!(
            "e2e: warren-consumer peak RSS {:.1} MiB (max over runs)",
            *max as f64 / 1024.0
        );
    }
    Ok(())
}

async fn delay_scenario(conn: &Connection) -> Result<()> {
    let t = topo("delay");
    topology::declare(conn, &t).await?;
    let publisher = Publisher::new(conn, Duration::from_secs(30)).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            t.work_queues()[0].name.as_str().into(),
            "delay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let delays = [250u64, 1700, 3300];
    let mut sent = std::collections::HashMap::new();
    for i in 0..10 {
        for ms in delays {
            let task = Task::from_raw(
                "bench.delay",
                format!("{{\"ms\":{ms},\"i\":{i}}}").into_bytes(),
            );
            let at = Instant::now();
            publisher
                .publish_task(&t, &task, Duration::from_millis(ms))
                .await?;
            sent.insert(task.id.clone(), (ms, at));
        }
        tokio::time::sleep(Duration::from_millis(37)).await;
    }
    let mut late: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for _ in 0..sent.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .context("delayed task did not arrive")?
            .context("consumer ended")??;
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let (ms, at) = sent.get(&id).copied().context("unknown message")?;
        let lateness = at.elapsed().as_secs_f64() * 1000.0 - ms as f64;
        late.entry(ms).or_default().push(lateness);
        d.ack(BasicAckOptions::default()).await?;
    }
    for (ms, mut v) in late {
        v.sort_by(f64::total_cmp);
        warren::outln!(
            "delay {ms} ms: lateness (from publish start) min {:.0} ms, median {:.0} ms, max {:.0} ms",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    }
    warren::testing::delete_topology(conn, &t).await;
    Ok(())
}

/// Wait (up to 30 s) until a warren process started by the bench answers
/// `/readyz` with a success.
pub(crate) async fn wait_ready(http: &reqwest::Client, base: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{what} did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
