//! `--scenario steady`: a near-empty queue fed at a steady rate, where
//! nothing batches, as most deployments run.
//!
//! For each rate R of `--steady-rates` (default 500, 2,000 and 10,000 tasks/s)
//! and `--runs` rounds (sides alternating), warren's `Publisher` in the bench
//! process sends R tasks/s for `--seconds` (default 10; confirms awaited off
//! the pacing loop) into a running consumer; every 100th task is named
//! `deadletter.bench`, which no handler takes:
//!
//! * warren: `warren-consumer`, default config, `noop` handler for `bench.*`,
//!   log at `error`; the 1 % are dead-lettered (`no_handler`: published to the
//!   dead-letter queue with confirms, then acked);
//! * plain lapin: a consumer process of its own (this binary,
//!   `--scenario plain-consume`), prefetch 64, JSON parsed, acks pipelined;
//!   the 1 % are rejected without requeue (`basic.reject`).
//!
//! Measured from the first publish until the broker's ready count of the
//! queue is back at 0 after the last: the consumer process's CPU per task
//! (`/proc/<pid>/stat`), the broker's (`--broker-pid`), the consumer's RSS
//! at the end and its peak, and the rate the publisher actually kept.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::io::AsyncBufReadExt;
use warren::amqp::Publisher;
use warren::topology::{self, Topology};
use warren::Task;

use crate::meter::{Meter, Watch, POLL};
use crate::table::{self, list, median};
use crate::{consumer_bin, peak_rss_kib, spawn_consumer_with, topo, wait_ready, Args, BODY};

/// Every this many tasks, one goes to no handler (1 %).
const DEAD_EVERY: usize = 100;
const DEAD_NAME: &str = "deadletter.bench";

struct Steady {
    /// Tasks per second the publisher kept.
    kept: f64,
    cpu_us: Option<f64>,
    broker_us: Option<f64>,
    rss_kib: Option<u64>,
    hwm_kib: Option<u64>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    crate::meter::status_kib(&pid.to_string(), "VmRSS:")
}

pub async fn steady_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let seconds = args.seconds.unwrap_or(10.0);
    warren::outln!(
        "steady: {} s at each of [{}] tasks/s, {} rounds a side, 1 % to no handler",
        seconds,
        list(&args.steady_rates, 0),
        args.runs
    );
    for &rate in &args.steady_rates {
        let mut sides: [Vec<Steady>; 2] = [Vec::new(), Vec::new()];
        for run in 0..args.runs {
            for k in 0..2 {
                let side = (run + k) % 2;
                let r = one(conn, args, url, rate, seconds, side == 1).await?;
                warren::outln!(
                    "steady {rate:.0}/s run {run} {}: kept {:.0}/s, CPU/task µs consumer {:.1} broker {:.1}, RSS {:.1} MiB",
                    if side == 0 { "plain lapin" } else { "warren" },
                    r.kept,
                    r.cpu_us.unwrap_or(f64::NAN),
                    r.broker_us.unwrap_or(f64::NAN),
                    r.rss_kib.unwrap_or(0) as f64 / 1024.0
                );
                sides[side].push(r);
            }
        }
        let cpu = |v: &[Steady]| v.iter().filter_map(|s| s.cpu_us).collect::<Vec<_>>();
        let broker = |v: &[Steady]| v.iter().filter_map(|s| s.broker_us).collect::<Vec<_>>();
        let kept = |v: &[Steady]| v.iter().map(|s| s.kept).collect::<Vec<_>>();
        let (pc, wc) = (cpu(&sides[0]), cpu(&sides[1]));
        let ratios = table::ratios(&pc, &wc);
        let rss = sides[1].iter().filter_map(|s| s.rss_kib).max();
        let hwm = sides[1].iter().filter_map(|s| s.hwm_kib).max();
        let prss = sides[0].iter().filter_map(|s| s.rss_kib).max();
        let tag = format!("steady {rate:.0}/s");
        warren::outln!(
            "{tag}: consumer CPU per task µs: plain [{}] median {:.1}; warren [{}] median {:.1}; warren / plain per run [{}], median {:.2}",
            list(&pc, 1),
            median(&pc),
            list(&wc, 1),
            median(&wc),
            list(&ratios, 2),
            median(&ratios)
        );
        warren::outln!(
            "{tag}: broker CPU per task µs: plain median {:.1}; warren median {:.1}; kept rate plain [{}], warren [{}]",
            median(&broker(&sides[0])),
            median(&broker(&sides[1])),
            list(&kept(&sides[0]), 0),
            list(&kept(&sides[1]), 0)
        );
        warren::outln!(
            "{tag}: RSS at the end: warren-consumer {:.1} MiB (peak {:.1}), plain consumer {:.1} MiB",
            rss.unwrap_or(0) as f64 / 1024.0,
            hwm.unwrap_or(0) as f64 / 1024.0,
            prss.unwrap_or(0) as f64 / 1024.0
        );
        table::row(
            args,
            &[
                format!("steady {rate:.0} tasks/s for {seconds} s, 1 % dead-lettered: consumer CPU per task"),
                format!("{:.1} µs", median(&pc)),
                format!("{:.1} µs", median(&wc)),
                table::Spread::of(&ratios).ratio(),
                "≤ 1.2".into(),
                "—".into(),
                "—".into(),
                format!(
                    "broker µs/task: warren {:.1}, plain {:.1}; warren-consumer RSS {:.1} MiB",
                    median(&broker(&sides[1])),
                    median(&broker(&sides[0])),
                    rss.unwrap_or(0) as f64 / 1024.0
                ),
            ],
        )?;
    }
    Ok(())
}

/// One side at one rate.
async fn one(
    conn: &Connection,
    args: &Args,
    url: &str,
    rate: f64,
    seconds: f64,
    warren_side: bool,
) -> Result<Steady> {
    let t = topo(&format!("steady{}", warren_side as u8));
    topology::declare(conn, &t).await?;
    let queue = t.work_queues()[0].name.clone();
    let (mut child, _keep) = if warren_side {
        let cfg = "[log]\nlevel = \"error\"\n[handlers.\"bench.*\"]\nkind = \"noop\"\n";
        let proc = spawn_consumer_with(&consumer_bin(args)?, url, &t, cfg, Stdio::null())?;
        wait_ready(&reqwest::Client::new(), &proc.base, "warren-consumer").await?;
        (proc.child, Some(proc._dir))
    } else {
        (spawn_plain_consumer(url, &queue).await?, None)
    };
    let pid = child.id().context("the consumer exited at once")?;
    let n = (rate * seconds) as usize;
    let client = Meter::started(Some(pid));
    let broker = Meter::started(args.broker_pid);
    let start = Instant::now();
    paced(conn, &t, rate, n).await?;
    let kept = n as f64 / start.elapsed().as_secs_f64();
    let mut watch = Watch::new(conn, &queue, None, None).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while watch.ready().await? > 0 {
        if Instant::now() > deadline {
            bail!("the consumer did not keep up with {rate}/s");
        }
        tokio::time::sleep(POLL).await;
    }
    watch.close().await;
    let r = Steady {
        kept,
        cpu_us: client.per_task_us(n as f64),
        broker_us: broker.per_task_us(n as f64),
        rss_kib: rss_kib(pid),
        hwm_kib: peak_rss_kib(pid),
    };
    child.kill().await.ok();
    warren::testing::delete_topology(conn, &t).await;
    Ok(r)
}

/// `n` tasks at `rate`/s, every [`DEAD_EVERY`]th to no handler.
async fn paced(conn: &Connection, t: &Topology, rate: f64, n: usize) -> Result<()> {
    let publisher = Publisher::new(conn, Duration::from_secs(30)).await?;
    let (tx, confirmer) = crate::meter::confirm_in_order();
    let start = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        let name = if i % DEAD_EVERY == DEAD_EVERY - 1 {
            DEAD_NAME
        } else {
            "bench.steady"
        };
        let task = Task::from_raw(name, BODY.to_vec());
        tx.send(publisher.send_task(t, &task, Duration::ZERO).await?)
            .ok();
    }
    drop(tx);
    confirmer.await??;
    publisher.channel().close(200, "done".into()).await.ok();
    Ok(())
}

/// This binary as a plain lapin consumer of `queue`, once it consumes.
async fn spawn_plain_consumer(url: &str, queue: &str) -> Result<tokio::process::Child> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "--url",
            url,
            "--scenario",
            "plain-consume",
            "--queue",
            queue,
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the plain consumer")?;
    let out = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await? {
            if l == "consuming" {
                return Ok(true);
            }
        }
        Ok::<_, std::io::Error>(false)
    })
    .await;
    if !matches!(ready, Ok(Ok(true))) {
        bail!("the plain consumer did not start consuming");
    }
    // Keep reading (and dropping) its output so it never blocks on a pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

/// `--scenario plain-consume --queue Q`: consume Q until killed, prefetch
/// `--prefetch` (64 from [`steady_scenario`]); parse each body, reject the
/// tasks named [`DEAD_NAME`] without requeue, ack the rest, acks pipelined.
pub async fn plain_consume(conn: &Connection, args: &Args) -> Result<()> {
    let queue = args.queue.as_deref().context("--queue is needed")?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(64, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "plain-steady".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    warren::outln!("consuming");
    while let Some(d) = consumer.next().await {
        let d = d?;
        let _: serde_json::Value = serde_json::from_slice(&d.data)?;
        let dead = d
            .properties
            .kind()
            .as_ref()
            .is_some_and(|k| k.as_str() == DEAD_NAME);
        tokio::spawn(async move {
            if dead {
                d.reject(BasicRejectOptions { requeue: false }).await
            } else {
                d.ack(BasicAckOptions::default()).await
            }
        });
    }
    Ok(())
}
