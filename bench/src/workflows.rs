//! `--scenario workflows`: the coordinator's steps per second, and its
//! process's CPU per step, with few and with many active runs.
//!
//! For each `--active` A, on a throwaway prefix: a `warren-producer run`
//! (the coordinator, on the leader) with two workflows, `hold` (one step,
//! task `bench.hold`) and `chain` (steps `a` → `b`, tasks `bench.wf.a` and
//! `bench.wf.b`), and a `warren-consumer` with a `noop` handler for each
//! of the two (one each, so its metrics tell them apart: they are labelled
//! by handler) that consumes only the `default` queue. `bench.hold` is
//! routed to a queue `hold` that nobody consumes, so A `hold` runs, started
//! with A start messages (the public contract of docs/workflows.md), stay
//! active (their step running) for the whole measurement without taking a
//! consumer's slot. Then `chain` runs are started so that `--inflight` of
//! them are in flight (started, step `b` not yet succeeded, as the
//! consumer's `warren_consumer_tasks_total` says), and after a warm-up a
//! window of `--seconds` counts the steps the consumer completed and the
//! producer's CPU (`/proc/<pid>/stat`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection};
use warren::config::{QueueConfig, QueueType, TopologyConfig};
use warren::testing::scraped_value;
use warren::topology::{self, Topology};

use crate::schedules::{clean_up, loadavg, Proc};
use crate::{check, consumer_bin, cpu_seconds, sibling_bin, start_consumer_with, Args};

const WARMUP: Duration = Duration::from_secs(10);

const TOPOLOGY: &str = r#"[topology]
queues = [
  { name = "default", bindings = ["bench.wf.#"] },
  { name = "hold", bindings = ["bench.hold"] },
]
"#;

const WORKFLOWS: &str = r#"
[[workflows]]
name = "hold"

[[workflows.steps]]
name = "wait"
task = "bench.hold"

[[workflows]]
name = "chain"

[[workflows.steps]]
name = "a"
task = "bench.wf.a"

[[workflows.steps]]
name = "b"
task = "bench.wf.b"
after = ["a"]
"#;

fn wf_topo(active: usize) -> Topology {
    let queue = |name: &str, binding: &str| QueueConfig {
        name: name.into(),
        bindings: vec![binding.into()],
        max_priority: None,
    };
    Topology::new(&TopologyConfig {
        prefix: format!("bench.wf{active}.{}", std::process::id()),
        queue_type: QueueType::Classic,
        queues: vec![queue("default", "bench.wf.#"), queue("hold", "bench.hold")],
        ..TopologyConfig::default()
    })
}

struct Row {
    active: usize,
    /// A start messages published → A runs active.
    hold_took: Duration,
    steps_per_s: f64,
    cpu_per_step_us: Option<f64>,
    runs_active: Option<f64>,
    hwm_kib: Option<u64>,
}

pub async fn workflows_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let secs = args.seconds.unwrap_or(30.0);
    warren::outln!(
        "workflows: 2-step chain (noop steps, warren-consumer), {} runs of it in flight, {secs} s window after a {} s warm-up, with {:?} runs held active; load average {}",
        args.inflight,
        WARMUP.as_secs(),
        args.active,
        loadavg()
    );
    let mut rows = Vec::new();
    for &active in &args.active {
        match one(conn, args, url, active, secs).await {
            Ok(r) => rows.push(r),
            Err(e) => warren::outln!("workflows at {active} active: {e:#}"),
        }
    }
    warren::outln!("workflows: summary (load average {})", loadavg());
    warren::outln!("| runs held active | active at the end | steps/s | producer CPU per step | producer VmHWM | A starts applied in |\n|---|---|---|---|---|---|");
    for r in &rows {
        warren::outln!(
            "| {} | {} | {:.0} | {} | {} MiB | {:.1} s |",
            r.active,
            r.runs_active.map_or("—".into(), |a| format!("{a:.0}")),
            r.steps_per_s,
            r.cpu_per_step_us
                .map_or("—".into(), |us| format!("{us:.0} µs")),
            r.hwm_kib
                .map_or("—".into(), |k| format!("{:.0}", k as f64 / 1024.0)),
            r.hold_took.as_secs_f64()
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        if rows.len() > 1 && first.steps_per_s > 0.0 {
            warren::outln!(
                "workflows: steps/s at {} active / at {} active = {:.2}",
                last.active,
                first.active,
                last.steps_per_s / first.steps_per_s
            );
        }
    }
    Ok(())
}

async fn one(conn: &Connection, args: &Args, url: &str, active: usize, secs: f64) -> Result<Row> {
    let t = wf_topo(active);
    topology::declare(conn, &t).await?;
    let r = measure(conn, args, url, &t, active, secs).await;
    clean_up(conn, &t).await;
    r
}

async fn measure(
    conn: &Connection,
    args: &Args,
    url: &str,
    t: &Topology,
    active: usize,
    secs: f64,
) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("producer.toml");
    std::fs::write(
        &cfg,
        format!("[log]\nlevel = \"warn\"\n{TOPOLOGY}{WORKFLOWS}"),
    )?;
    let http = reqwest::Client::new();
    let bin = sibling_bin(&args.producer_bin, "warren-producer")?;
    let mut producer = Proc::producer(&bin, url, t.prefix(), &cfg, dir.path(), "producer", false)?;
    producer
        .wait_leader(&http, Duration::from_secs(args.lead_timeout))
        .await?;
    let base = producer.base.clone().context("producer address")?;
    let consumer = start_consumer_with(
        &consumer_bin(args)?,
        url,
        t,
        &format!(
            "[log]\nlevel = \"warn\"\n{TOPOLOGY}[worker]\nqueues = [\"default\"]\n[handlers.\"bench.wf.a\"]\nkind = \"noop\"\n[handlers.\"bench.wf.b\"]\nkind = \"noop\"\n"
        ),
    )
    .await?;
    let starts = Starter::new(conn, t).await?;
    let started = Instant::now();
    starts.start("hold", active).await?;
    let deadline = Instant::now() + Duration::from_secs(args.lead_timeout);
    while runs_active(&http, &base).await.unwrap_or(0.0) < active as f64 {
        if Instant::now() > deadline {
            bail!(
                "the coordinator did not apply {active} starts within {} s",
                args.lead_timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let hold_took = started.elapsed();
    // Closed loop: keep `inflight` chain runs between start and step b done.
    let mut chains = 0usize;
    let warm_until = Instant::now() + WARMUP;
    let mut window: Option<(Instant, f64, Option<f64>)> = None;
    let end = loop {
        let text = http.get(&consumer.metrics).send().await?.text().await?;
        let ok = |task: &str| {
            scraped_value(
                &text,
                "warren_consumer_tasks_total",
                &[("task", task), ("outcome", "succeeded")],
            )
            .unwrap_or(0.0)
        };
        let (a, b) = (ok("bench.wf.a"), ok("bench.wf.b"));
        let steps = a + b;
        match window {
            None if Instant::now() >= warm_until => {
                window = Some((Instant::now(), steps, cpu_seconds(producer.pid)));
            }
            Some((at, _, _)) if at.elapsed().as_secs_f64() >= secs => {
                break (Instant::now(), steps, cpu_seconds(producer.pid));
            }
            _ => {}
        }
        let in_flight = chains.saturating_sub(b as usize);
        if in_flight < args.inflight {
            starts.start("chain", args.inflight - in_flight).await?;
            chains += args.inflight - in_flight;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (at0, steps0, cpu0) = window.context("no window")?;
    let (at1, steps1, cpu1) = end;
    let steps = steps1 - steps0;
    if steps <= 0.0 {
        bail!(
            "no step completed in the window (consumer metrics: {})",
            consumer.metrics
        );
    }
    let runs_active = runs_active(&http, &base).await;
    let hwm_kib = crate::peak_rss_kib(producer.pid);
    let mut consumer = consumer;
    consumer.child.kill().await.ok();
    producer.kill().await;
    Ok(Row {
        active,
        hold_took,
        steps_per_s: steps / (at1 - at0).as_secs_f64(),
        cpu_per_step_us: match (cpu0, cpu1) {
            (Some(a), Some(b)) if steps > 0.0 => Some((b - a) * 1e6 / steps),
            _ => None,
        },
        runs_active,
        hwm_kib,
    })
}

async fn runs_active(http: &reqwest::Client, base: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    scraped_value(&text, "warren_producer_workflow_runs_active", &[])
}

/// Publishes run starts: `<prefix>.workflows`, routing key `start`, body
/// `{"workflow", "input"}`, persistent, mandatory, confirmed.
struct Starter {
    channel: lapin::Channel,
    exchange: String,
}

impl Starter {
    async fn new(conn: &Connection, t: &Topology) -> Result<Starter> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Starter {
            channel,
            exchange: t.workflows_exchange(),
        })
    }

    /// `n` runs of `workflow`, 1,000 confirms outstanding at most.
    async fn start(&self, workflow: &str, n: usize) -> Result<()> {
        let body = format!(r#"{{"workflow":"{workflow}","input":{{}}}}"#);
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let mut pending = std::collections::VecDeque::new();
        for _ in 0..n {
            let c = self
                .channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    "start".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body.as_bytes(),
                    props.clone(),
                )
                .await?;
            pending.push_back(c);
            if pending.len() >= crate::WINDOW {
                if let Some(c) = pending.pop_front() {
                    check(c.await?)?;
                }
            }
        }
        for c in pending {
            check(c.await?)?;
        }
        Ok(())
    }
}
