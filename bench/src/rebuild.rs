//! The task index against a real events stream (docs/tasks.md#the-index):
//!
//! * `--scenario index-rebuild`: `--index-tasks` tasks' events (published,
//!   started, succeeded: 3 per task) written to a fresh `<prefix>.events`,
//!   batched as the recorder batches them (1,000 events a message, producer
//!   and consumer messages interleaved). Then (1) this process rebuilds an
//!   index from the stream through the producer's own code
//!   (`tasks::follow`, `tasks::apply_delivery`, an ack per message, as the
//!   connection loop does): seconds and RSS growth; (2) a `warren-producer
//!   run` is started on that prefix: seconds from spawn until
//!   `GET /v1/tasks/{last id}` answers `succeeded`, its RSS; (3)
//!   `GET /v1/tasks/{id}` over HTTP for random ids of the million,
//!   one request at a time and 16 at once: p50, p99, max.
//! * `--scenario index-latency`: a `warren-consumer` (noop handler) and a
//!   `warren-producer` on one prefix; tasks published at `--rate` for
//!   `--seconds`; every 100th task's `GET /v1/tasks/{id}` polled every
//!   10 ms until it says `succeeded`: the delay from the `succeeded`
//!   event's instant (recorded as the consumer settles the delivery, just
//!   before its ack) to that answer. The poll interval makes it up to 10 ms
//!   pessimistic.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::{BasicProperties, Connection};
use warren::amqp::Publisher;
use warren::config::{QueueType, TopologyConfig};
use warren::events::{Batch, Event};
use warren::topology::{self, EventStream, Topology};
use warren::Task;
use warren_producer::tasks::Index;

use crate::index::{id, rss_kib, story};
use crate::{consumer_bin, free_port, sibling_bin, Args, BODY};

const TOKEN: &str = "bench-index-token";
/// Events per stream message, as the recorder sends at most.
const PER_MESSAGE: usize = warren::events::MAX_BATCH;

fn topo(name: &str) -> Topology {
    Topology::new(&TopologyConfig {
        prefix: format!("bench.{name}.{}", std::process::id()),
        queue_type: QueueType::Classic,
        ..TopologyConfig::default()
    })
    // The producer's defaults (`events.max_age`, `events.max_bytes`).
    .with_events(Some(EventStream {
        max_age: Duration::from_secs(7 * 86_400),
        max_bytes: 1 << 30,
    }))
}

fn rss_of(pid: u32) -> u64 {
    crate::meter::status_kib(&pid.to_string(), "VmRSS:").unwrap_or(0)
}

fn batch(role: &str, events: Vec<Event>) -> Batch {
    Batch {
        v: 1,
        role: role.into(),
        instance: format!("bench-{role}"),
        host: "bench".into(),
        events,
        worker: None,
    }
}

/// Write `n` tasks' stories; the number of messages written.
async fn write_stream(conn: &Connection, stream: &str, n: usize) -> Result<usize> {
    let publisher = Publisher::new(conn, Duration::from_secs(60)).await?;
    let props = || {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(warren::envelope::PERSISTENT)
    };
    let mut pending = std::collections::VecDeque::new();
    let mut messages = 0;
    let mut bytes = 0;
    let mut i = 0;
    while i < n {
        let end = (i + PER_MESSAGE).min(n);
        let mut published = Vec::with_capacity(end - i);
        let mut run = Vec::with_capacity(2 * (end - i));
        for k in i..end {
            let (p, r) = story(k);
            published.push(p);
            run.extend(r);
        }
        // Full messages, as the recorder sends under load: the producer's
        // events of a chunk, then the consumer's in two.
        let second = run.split_off(run.len() / 2);
        for b in [
            batch("producer", published),
            batch("consumer", run),
            batch("consumer", second),
        ] {
            let body = serde_json::to_vec(&b)?;
            bytes += body.len();
            pending.push_back(publisher.send("", stream, props(), &body).await?);
            messages += 1;
            if pending.len() >= 64 {
                if let Some(p) = pending.pop_front() {
                    p.confirmed().await?;
                }
            }
        }
        i = end;
    }
    for p in pending {
        p.confirmed().await?;
    }
    publisher.channel().close(200, "written".into()).await.ok();
    warren::outln!(
        "index-rebuild: wrote {n} tasks, {} events in {messages} messages ({} MiB) to {stream}",
        3 * n,
        bytes >> 20
    );
    Ok(messages)
}

/// (1): this process, the producer's code path.
async fn rebuild_here(conn: &Connection, stream: &str, n: usize, messages: usize) -> Result<()> {
    let idx = Index::new(n);
    let before = rss_kib();
    let started = Instant::now();
    let (_ch, mut c) = warren_producer::tasks::follow(conn, stream, &idx)
        .await
        .context("cannot read the events stream")?;
    for _ in 0..messages {
        let d = c.next().await.context("the stream consumer ended")??;
        warren_producer::tasks::apply_delivery(&idx, &d);
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    let took = started.elapsed().as_secs_f64();
    let grown = rss_kib().saturating_sub(before);
    ensure!(idx.len() == n, "index holds {} tasks, not {n}", idx.len());
    warren::outln!(
        "index-rebuild: in process (tasks::follow + apply_delivery): {n} tasks in {took:.2} s ({:.0} events/s); RSS +{} MiB = {} bytes/task",
        3.0 * n as f64 / took,
        grown / 1024,
        grown * 1024 / n as u64
    );
    Ok(())
}

/// A `warren-producer run` on `t` with a read token.
struct Producer {
    child: tokio::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Producer {
    fn spawn(args: &Args, url: &str, t: &Topology) -> Result<Producer> {
        let bin = sibling_bin(&args.producer_bin, "warren-producer")?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let child = tokio::process::Command::new(&bin)
            .arg("run")
            .current_dir(dir.path())
            .env("WARREN_AMQP_URL", url)
            .env("WARREN_TOPOLOGY__PREFIX", t.prefix())
            .env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("WARREN_API__READ_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {} run", bin.display()))?;
        Ok(Producer {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// The task's state and `updated_at` (Unix ms), `None` when unknown.
    async fn state(&self, http: &reqwest::Client, id: &str) -> Result<Option<(String, i64)>> {
        let r = http
            .get(format!("{}/v1/tasks/{id}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        if r.status().as_u16() == 404 {
            return Ok(None);
        }
        if !r.status().is_success() {
            bail!("GET /v1/tasks/{id}: {}", r.status());
        }
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
        let state = v["state"].as_str().unwrap_or("").to_owned();
        let updated = v["updated_at"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.timestamp_millis())
            .unwrap_or(0);
        Ok(Some((state, updated)))
    }
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (
        v[v.len() / 2],
        v[(v.len() * 99 / 100).min(v.len() - 1)],
        v[v.len() - 1],
    )
}

/// A cheap deterministic spread over `0..n` (no `rand` in the bench).
fn pick(k: usize, n: usize) -> usize {
    (k.wrapping_mul(2_654_435_761) ^ (k >> 7)) % n
}

/// (3): `GET /v1/tasks/{id}` latencies, ms, `concurrency` at once.
async fn get_latencies(
    p: &Producer,
    n: usize,
    requests: usize,
    concurrency: usize,
) -> Result<Vec<f64>> {
    let http = reqwest::Client::new();
    let mut gets = futures_util::stream::iter((0..requests).map(|k| {
        let http = http.clone();
        let key = id(pick(k, n));
        async move {
            let t = Instant::now();
            let s = p.state(&http, &key).await?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            ensure!(
                s.as_ref().is_some_and(|(s, _)| s == "succeeded"),
                "task {key}: {s:?}"
            );
            Ok(ms)
        }
    }))
    .buffer_unordered(concurrency);
    let mut out = Vec::with_capacity(requests);
    while let Some(ms) = gets.next().await {
        out.push(ms?);
    }
    Ok(out)
}

pub async fn rebuild_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let n = args.index_tasks;
    let t = topo("rebuild");
    topology::declare(conn, &t).await?;
    let stream = t.events_stream();
    let messages = write_stream(conn, &stream, n).await?;
    rebuild_here(conn, &stream, n, messages).await?;
    // (2) the real binary, from spawn.
    let http = reqwest::Client::new();
    let last = id(n - 1);
    let started = Instant::now();
    let p = Producer::spawn(args, url, &t)?;
    loop {
        if let Ok(Some((s, _))) = p.state(&http, &last).await {
            if s == "succeeded" {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("warren-producer did not index {last} within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let rss = rss_of(p.pid());
    warren::outln!(
        "index-rebuild: warren-producer run, spawn to the last of {n} tasks answered: {took:.2} s; RSS {} MiB ({} bytes/task with everything else)",
        rss / 1024,
        rss * 1024 / n as u64
    );
    // (3)
    for concurrency in [1, 4, 16] {
        let requests = 20_000;
        let t0 = Instant::now();
        let lat = get_latencies(&p, n, requests, concurrency).await?;
        let rate = requests as f64 / t0.elapsed().as_secs_f64();
        let (p50, p99, max) = percentiles(lat);
        warren::outln!(
            "index-rebuild: GET /v1/tasks/{{id}} at {n} tasks, {requests} random ids, {concurrency} at once: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms ({rate:.0} req/s)"
        );
    }
    let mut child = p.child;
    child.kill().await.ok();
    let ch = conn.create_channel().await?;
    ch.queue_delete(stream.as_str().into(), Default::default())
        .await
        .ok();
    ch.close(200, "done".into()).await.ok();
    Ok(())
}

pub async fn latency_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let seconds = args.seconds.unwrap_or(30.0);
    let n = (args.rate * seconds) as usize;
    let t = topo("evlat");
    topology::declare(conn, &t).await?;
    let consumer = crate::start_consumer(&consumer_bin(args)?, url, &t, args.prefetch).await?;
    let producer = Producer::spawn(args, url, &t)?;
    crate::wait_ready(&reqwest::Client::new(), &producer.base, "warren-producer").await?;
    warren::outln!(
        "index-latency: {} tasks/s for {seconds} s ({n} tasks), every 100th polled",
        args.rate
    );
    let producer = Arc::new(producer);
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let missing = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publisher = Publisher::new(conn, Duration::from_secs(30)).await?;
    let (tx, confirmer) = crate::meter::confirm_in_order();
    let http = reqwest::Client::new();
    let mut pollers = Vec::new();
    let start = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / args.rate)).await;
        let task = Task::from_raw("bench.evlat", BODY.to_vec());
        tx.send(publisher.send_task(&t, &task, Duration::ZERO).await?)
            .ok();
        if i % 100 != 0 {
            continue;
        }
        let (p, http, samples, missing) = (
            producer.clone(),
            http.clone(),
            samples.clone(),
            missing.clone(),
        );
        let id = task.id.clone();
        pollers.push(tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until {
                if let Ok(Some((s, at))) = p.state(&http, &id).await {
                    if s == "succeeded" {
                        let ms = (Utc::now().timestamp_millis() - at) as f64;
                        if let Ok(mut v) = samples.lock() {
                            v.push(ms);
                        }
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            missing.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
    }
    drop(tx);
    confirmer.await??;
    for p in pollers {
        p.await.ok();
    }
    let v = samples.lock().map(|v| v.clone()).unwrap_or_default();
    let count = v.len();
    let (p50, p99, max) = percentiles(v);
    warren::outln!(
        "index-latency: succeeded event -> GET /v1/tasks/{{id}} says succeeded, {count} samples ({} never within 30 s): p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
        missing.load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(consumer);
    if let Ok(p) = Arc::try_unwrap(producer) {
        let mut child = p.child;
        child.kill().await.ok();
    }
    Ok(())
}
