//! `--scenario latency`: enqueue → handler start at a paced rate.
//!
//! Tasks are published at `--rate` per second for `--seconds` (warren's
//! `Publisher`, confirms awaited off the pacing loop) into a running
//! `warren-consumer` with its **default** config and a `noop` handler. The
//! enqueue instant is the wall clock just before each publish; the handler
//! start is the timestamp (µs) of the consumer's own `task started` debug
//! event, emitted right before the handler is called, read from its JSON log
//! with only that module at debug. No consumer code exists for the bench:
//! what is measured is the shipped binary, plus the cost of that one log
//! line per task (which only makes the figure more pessimistic). Same broker
//! and pacing for a plain lapin consumer (prefetch 64, pipelined acks),
//! enqueue → delivery, for comparison. A third side runs the consumer
//! logging at `warn`, as a fleet would, and reads its own queue-wait
//! histogram: the share of tasks started within 5 ms, without the cost of
//! the log line (about a third of the consumer's CPU at this rate).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::io::AsyncBufReadExt;
use warren::amqp::Publisher;
use warren::topology::{self, Topology};
use warren::Task;

use crate::table;
use crate::{consumer_bin, cpu_seconds, free_port, tasks_done, topo, Args, BODY};

/// Start instants by task index, filled by whoever observes the start.
type Starts = Arc<Mutex<HashMap<usize, DateTime<Utc>>>>;

fn index_of(id: &str) -> Option<usize> {
    id.strip_prefix("lat-")?.parse().ok()
}

pub async fn latency_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let seconds = args.seconds.unwrap_or(10.0);
    let n = (args.rate * seconds) as usize;
    warren::outln!(
        "latency: {} tasks/s for {} s ({n} tasks) into a running consumer, {LATENCY_ROUNDS} rounds a side",
        args.rate, seconds
    );
    // Rounds alternate the sides, so load from elsewhere on the machine
    // falls on both; each side's samples are pooled over the rounds.
    let (mut plain, mut warren, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    let (mut quiet_cpu, mut quiet_waits) = (Vec::new(), Vec::new());
    for round in 0..LATENCY_ROUNDS {
        for k in 0..3 {
            match (round + k) % 3 {
                0 => plain.extend(plain_side(conn, args, n).await?),
                1 => {
                    let side = warren_side(conn, args, url, n, true).await?;
                    warren.extend(side.latencies);
                    cpu.extend(side.cpu_us);
                }
                _ => {
                    let side = warren_side(conn, args, url, n, false).await?;
                    quiet_cpu.extend(side.cpu_us);
                    quiet_waits.push(side.within_5ms);
                }
            }
        }
    }
    let n = n * LATENCY_ROUNDS;
    let (plain, warren) = (Percentiles::of(plain), Percentiles::of(warren));
    let report = |who: &str, v: &Percentiles| {
        warren::outln!(
            "latency {who}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} of {n} seen)",
            v.p50,
            v.p99,
            v.max,
            v.seen
        );
    };
    report("plain lapin, enqueue → delivery", &plain);
    report("warren-consumer, enqueue → handler start", &warren);
    warren::outln!(
        "latency warren-consumer CPU per task µs (incl. its JSON debug log): [{}], median {:.1}",
        table::list(&cpu, 1),
        table::median(&cpu)
    );
    let quiet: Vec<f64> = quiet_waits.iter().flatten().map(|s| s * 100.0).collect();
    warren::outln!(
        "latency warren-consumer, log at warn: queue wait ≤ 5 ms (its own histogram; publish instant in whole ms, so up to 1 ms pessimistic) for [{}] % of tasks per round; CPU per task µs [{}], median {:.1}",
        table::list(&quiet, 2),
        table::list(&quiet_cpu, 1),
        table::median(&quiet_cpu)
    );
    table::row(
        args,
        &[
            format!(
                "enqueue → handler start, paced {} tasks/s, {LATENCY_ROUNDS} × {} s (p50 / p99 / max)",
                args.rate, seconds
            ),
            plain.cell(),
            warren.cell(),
            String::new(),
            "p99 ≤ 5 ms".into(),
            "—".into(),
            "—".into(),
            format!(
                "default consumer config; plain: enqueue → delivery; log at warn: {:.1} % within 5 ms (median of rounds)",
                table::median(&quiet)
            ),
        ],
    )?;
    Ok(())
}

pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) seen: usize,
}

/// Rounds per side.
const LATENCY_ROUNDS: usize = 3;

/// Enqueue → start, ms, of every task whose start was seen.
fn latencies(
    published: &[Option<DateTime<Utc>>],
    starts: &HashMap<usize, DateTime<Utc>>,
) -> Vec<f64> {
    starts
        .iter()
        .filter_map(|(i, s)| {
            let p = published.get(*i).copied().flatten()?;
            Some((*s - p).num_microseconds()? as f64 / 1000.0)
        })
        .collect()
}

impl Percentiles {
    pub(crate) fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            ms.get(((ms.len() as f64 * q) as usize).min(ms.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            max: ms.last().copied().unwrap_or(f64::NAN),
            seen: ms.len(),
        }
    }

    fn cell(&self) -> String {
        format!("{:.2} / {:.2} / {:.1} ms", self.p50, self.p99, self.max)
    }
}

/// Publish `n` tasks `lat-<i>` at `rate`/s; returns each one's enqueue
/// instant. Confirms are awaited by a separate task so a slow confirm never
/// delays the next publish.
async fn paced_publish(
    conn: &Connection,
    t: &Topology,
    rate: f64,
    n: usize,
) -> Result<Vec<Option<DateTime<Utc>>>> {
    let publisher = Publisher::new(conn, Duration::from_secs(30)).await?;
    let (tx, confirmer) = crate::meter::confirm_in_order();
    let mut published = vec![None; n];
    let start = tokio::time::Instant::now();
    for (i, slot) in published.iter_mut().enumerate() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let mut task = Task::from_raw("bench.latency", BODY.to_vec());
        task.id = format!("lat-{i}");
        *slot = Some(Utc::now());
        let pending = publisher.send_task(t, &task, Duration::ZERO).await?;
        tx.send(pending).ok();
    }
    drop(tx);
    confirmer.await??;
    publisher.channel().close(200, "done".into()).await.ok();
    Ok(published)
}

async fn plain_side(conn: &Connection, args: &Args, n: usize) -> Result<Vec<f64>> {
    let t = topo("latency-plain");
    topology::declare(conn, &t).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(64, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            t.work_queues()[0].name.as_str().into(),
            "latency".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let starts: Starts = Arc::default();
    let seen = starts.clone();
    let consuming = tokio::spawn(async move {
        for _ in 0..n {
            let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(60), consumer.next()).await
            else {
                break;
            };
            let at = Utc::now();
            if let Some(i) = d
                .properties
                .message_id()
                .as_ref()
                .and_then(|s| index_of(s.as_str()))
            {
                if let Ok(mut m) = seen.lock() {
                    m.insert(i, at);
                }
            }
            tokio::spawn(async move { d.ack(BasicAckOptions::default()).await });
        }
    });
    let published = paced_publish(conn, &t, args.rate, n).await?;
    consuming.await?;
    ch.close(200, "done".into()).await.ok();
    warren::testing::delete_topology(conn, &t).await;
    let starts = starts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok(latencies(&published, &starts))
}

/// What one run of the warren side saw.
struct WarrenRun {
    /// Enqueue → handler start, ms, from the debug log (empty without it).
    latencies: Vec<f64>,
    /// The consumer's CPU µs per task over the paced window.
    cpu_us: Option<f64>,
    /// Share of the tasks whose `warren_consumer_queue_wait_seconds` was
    /// within its 5 ms bucket.
    within_5ms: Option<f64>,
}

/// `debug_log`: read each start from the consumer's JSON debug log; without
/// it the consumer logs at `warn` (as a production fleet would) and only its
/// own queue-wait histogram tells.
async fn warren_side(
    conn: &Connection,
    args: &Args,
    url: &str,
    n: usize,
    debug_log: bool,
) -> Result<WarrenRun> {
    let t = topo("latency-warren");
    topology::declare(conn, &t).await?;
    let bin = consumer_bin(args)?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("consumer.toml");
    std::fs::write(
        &cfg,
        "[log]\nformat = \"json\"\n[handlers.\"bench.*\"]\nkind = \"noop\"\n",
    )?;
    let port = free_port()?;
    let mut child = tokio::process::Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .env("WARREN_AMQP_URL", url)
        .env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("WARREN_TOPOLOGY__PREFIX", t.prefix())
        .env(
            "RUST_LOG",
            if debug_log {
                "warn,warren_consumer::worker::delivery=debug"
            } else {
                "warn"
            },
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let starts: Starts = Arc::default();
    let seen = starts.clone();
    let reader = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some((i, at)) = started(&line) {
                if let Ok(mut m) = seen.lock() {
                    m.insert(i, at);
                }
            }
        }
    });
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("warren-consumer did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id();
    let cpu_before = pid.and_then(cpu_seconds);
    let published = paced_publish(conn, &t, args.rate, n).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while tasks_done(&http, &metrics).await? < n as f64 {
        if Instant::now() > deadline {
            bail!("warren-consumer did not finish the paced tasks");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_us = match (cpu_before, pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some((b - a) * 1e6 / n as f64),
        _ => None,
    };
    let scraped = http.get(&metrics).send().await?.text().await?;
    let within_5ms = within(&scraped, "0.005");
    // The log writer is a thread of its own: give it the lines it holds.
    let want = if debug_log { n } else { 0 };
    let deadline = Instant::now() + Duration::from_secs(10);
    while starts.lock().map_or(0, |m| m.len()) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.ok();
    reader.abort();
    warren::testing::delete_topology(conn, &t).await;
    let starts = starts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok(WarrenRun {
        latencies: latencies(&published, &starts),
        cpu_us,
        within_5ms,
    })
}

/// Share of the queue-wait observations in the bucket `le` (summed over
/// the `task` labels) of a `/metrics` text.
fn within(text: &str, le: &str) -> Option<f64> {
    let sum = |pick: &dyn Fn(&str) -> bool| -> f64 {
        text.lines()
            .filter(|l| pick(l))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let bucket = format!("le=\"{le}\"");
    let inside = sum(&|l: &str| {
        l.starts_with("warren_consumer_queue_wait_seconds_bucket") && l.contains(&bucket)
    });
    let all = sum(&|l: &str| l.starts_with("warren_consumer_queue_wait_seconds_count"));
    (all > 0.0).then(|| inside / all)
}

/// `(task index, timestamp)` of a `task started` JSON log line.
fn started(line: &str) -> Option<(usize, DateTime<Utc>)> {
    if !line.contains("task started") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let at = v
        .get("timestamp")?
        .as_str()?
        .parse::<DateTime<Utc>>()
        .ok()?;
    let id = v.get("span")?.get("task.id")?.as_str()?;
    Some((index_of(id)?, at))
}
