//! `--scenario drain`: how fast a pre-filled backlog empties.
//!
//! Each run publishes N persistent ~200-byte tasks with confirms (not timed),
//! then times first-to-last completion for one side:
//!
//! * plain lapin: one consumer loop (prefetch `--drain-plain-prefetch`,
//!   default 64 like warren's default) that parses the JSON and acks each
//!   delivery from a spawned task, i.e. acks pipelined, never awaited in the
//!   loop; the clock runs from the first delivery to the last ack sent.
//! * warren: the `warren-consumer` binary with its **default** worker config
//!   (prefetch 64, concurrency 32) and a `noop` handler, started once the
//!   backlog is in place; completion is read from its `/metrics`
//!   (`warren_consumer_tasks_total`), from the first scrape that shows any
//!   completed task to the one that shows all of them.
//!
//! Sides alternate run by run, and with `--max-priority 10,0` every priority
//! setting of the work queue is measured in the same run too. Reported per
//! side: each run's rate, the median, the warren / plain ratio per run and
//! its median, consumer CPU per task over the timed window (from
//! `/proc/<pid>/stat`; for the plain side the bench process, which does
//! nothing else meanwhile), the broker's too with `--broker-pid`, and the
//! consumer's peak RSS (`VmHWM`). With `--peers`, each run starts with one
//! drain of `--peer-messages` tasks per peer (see [`peers`]); the rows then
//! carry the peers' rates and warren / rusty-celery run by run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use warren::config::{QueueConfig, QueueType, TopologyConfig};
use warren::topology::{self, Topology};

use crate::peers;
use crate::table::{self, list, median, Spread};
use crate::{
    consumer_bin, cpu_seconds, peak_rss_kib, plain_publish_body, start_consumer_with, tasks_done,
    Args,
};

/// A ~200-byte JSON task body, as a typical small task carries.
const BODY: &[u8] = br#"{"user_id":4242,"action":"bench.drain","email":"ada@example.com","tags":["alpha","beta","gamma"],"locale":"en-GB","attempt_note":"a payload of about two hundred bytes, like a typical small task","seq":1234567}"#;

/// How often the warren side's `/metrics` is scraped while it drains.
const SCRAPE_EVERY: Duration = Duration::from_millis(10);

/// One timed drain.
struct Drained {
    /// Tasks per second over the timed window.
    rate: f64,
    /// Consumer CPU per task over the timed window, µs.
    cpu_us: Option<f64>,
    /// Broker CPU per task over the timed window, µs (with `--broker-pid`).
    broker_us: Option<f64>,
    /// Consumer peak RSS, KiB (warren side only: the plain side shares the
    /// bench process).
    rss_kib: Option<u64>,
}

fn topo(tag: &str, max_priority: u8) -> Topology {
    Topology::new(&TopologyConfig {
        prefix: format!("bench.drain{tag}.{}", std::process::id()),
        queue_type: QueueType::Classic,
        queues: vec![QueueConfig {
            max_priority: Some(max_priority),
            ..QueueConfig::default()
        }],
        ..TopologyConfig::default()
    })
}

pub async fn drain_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let bin = consumer_bin(args)?;
    let priorities = &args.max_priority;
    // Per priority setting: plain and warren results, in run order.
    let mut plain: Vec<Vec<Drained>> = priorities.iter().map(|_| Vec::new()).collect();
    let mut warren: Vec<Vec<Drained>> = priorities.iter().map(|_| Vec::new()).collect();
    let mut peers = peers::from_args(args);
    for run in 0..args.runs {
        for peer in &mut peers {
            let rate = peer.run(conn, url, "drain").await?;
            warren::outln!("drain run {run} {}: {rate:.0} msgs/s", peer.name);
        }
        for (pi, &prio) in priorities.iter().enumerate() {
            // Alternate which side goes first, run by run and setting by setting.
            let sides = if (run + pi) % 2 == 0 { [0, 1] } else { [1, 0] };
            for side in sides {
                let t = topo(&format!("{run}{pi}{side}"), prio);
                topology::declare(conn, &t).await?;
                plain_publish_body(conn, &t.tasks_exchange(), "bench.noop", args.messages, BODY)
                    .await?;
                let queue = t.work_queues()[0].name.clone();
                let broker = Meter::new(args.broker_pid);
                let r = if side == 0 {
                    plain_drain(
                        conn,
                        &queue,
                        args.messages,
                        args.drain_plain_prefetch,
                        broker,
                    )
                    .await?
                } else {
                    warren_drain(&bin, url, &t, prio, "", args.messages, broker).await?
                };
                let who = if side == 0 { "plain " } else { "warren" };
                warren::outln!(
                    "drain run {run} max_priority {prio} {who}: {:.0} msgs/s",
                    r.rate
                );
                if side == 0 {
                    plain[pi].push(r);
                } else {
                    warren[pi].push(r);
                }
                warren::testing::delete_topology(conn, &t).await;
            }
        }
    }
    // Memory at a large prefetch, as a fleet tuned for throughput runs it:
    // one more drain, not timed against anything.
    let big = match (args.rss_prefetch, priorities.first()) {
        (0, _) | (_, None) => None,
        (prefetch, Some(&prio)) => {
            let t = topo("rss", prio);
            topology::declare(conn, &t).await?;
            plain_publish_body(conn, &t.tasks_exchange(), "bench.noop", args.messages, BODY)
                .await?;
            let worker = format!("[worker]\nprefetch = {prefetch}\nconcurrency = {prefetch}\n");
            let r = warren_drain(
                &bin,
                url,
                &t,
                prio,
                &worker,
                args.messages,
                Meter::new(None),
            )
            .await?;
            warren::testing::delete_topology(conn, &t).await;
            warren::outln!(
                "drain max_priority {prio}: prefetch = concurrency = {prefetch}: {:.0} msgs/s, consumer CPU per task {:.1} µs, peak RSS {:.1} MiB",
                r.rate,
                r.cpu_us.unwrap_or(f64::NAN),
                r.rss_kib.unwrap_or(0) as f64 / 1024.0
            );
            Some((prefetch, r))
        }
    };
    warren::outln!(
        "drain: {} tasks of {} bytes per run, {} runs per side; plain lapin prefetch {}, warren-consumer default worker config, noop handler",
        args.messages,
        BODY.len(),
        args.runs,
        args.drain_plain_prefetch
    );
    for (pi, prio) in priorities.iter().enumerate() {
        let rate = |v: &[Drained]| v.iter().map(|d| d.rate).collect::<Vec<_>>();
        let (p, w) = (rate(&plain[pi]), rate(&warren[pi]));
        let ratios: Vec<f64> = p.iter().zip(&w).map(|(p, w)| w / p).collect();
        let cpu = |v: &[Drained]| v.iter().filter_map(|d| d.cpu_us).collect::<Vec<_>>();
        let rss = warren[pi].iter().filter_map(|d| d.rss_kib).max();
        warren::outln!(
            "drain max_priority {prio}: plain lapin msgs/s [{}], median {:.0}",
            list(&p, 0),
            median(&p)
        );
        warren::outln!(
            "drain max_priority {prio}: warren      msgs/s [{}], median {:.0}",
            list(&w, 0),
            median(&w)
        );
        warren::outln!(
            "drain max_priority {prio}: warren / plain per run [{}], median {:.2}",
            list(&ratios, 2),
            median(&ratios)
        );
        warren::outln!(
            "drain max_priority {prio}: consumer CPU per task µs: plain [{}] median {:.1}; warren [{}] median {:.1}",
            list(&cpu(&plain[pi]), 1),
            median(&cpu(&plain[pi])),
            list(&cpu(&warren[pi]), 1),
            median(&cpu(&warren[pi]))
        );
        let broker = |v: &[Drained]| v.iter().filter_map(|d| d.broker_us).collect::<Vec<_>>();
        if args.broker_pid.is_some() {
            warren::outln!(
                "drain max_priority {prio}: broker CPU per task µs: plain [{}] median {:.1}; warren [{}] median {:.1}",
                list(&broker(&plain[pi]), 1),
                median(&broker(&plain[pi])),
                list(&broker(&warren[pi]), 1),
                median(&broker(&warren[pi]))
            );
        }
        let vs_rusty = peers::rusty_ratios(&peers, &w);
        if let Some(r) = &vs_rusty {
            warren::outln!(
                "drain max_priority {prio}: warren / rusty-celery per run [{}], median {:.2} (rusty-celery's queue has no priorities)",
                list(r, 2),
                median(r)
            );
        }
        if let Some(kib) = rss {
            warren::outln!(
                "drain max_priority {prio}: warren-consumer peak RSS {:.1} MiB (max over runs)",
                kib as f64 / 1024.0
            );
        }
        let queue = if *prio == 0 {
            "no priorities (the default queue)".to_owned()
        } else {
            format!("`x-max-priority = {prio}`")
        };
        table::row(
            args,
            &[
                format!(
                    "drain a {}k backlog, {queue}, default consumer config, noop",
                    args.messages / 1000
                ),
                Spread::of(&p).to_string(),
                Spread::of(&w).to_string(),
                Spread::of(&ratios).ratio(),
                "≥ 0.8".into(),
                peers::rusty_cell(&peers),
                peers::celery_cell(&peers),
                format!(
                    "{}CPU/task µs: consumer {:.1} (plain {:.1}), broker {}; peak RSS {}",
                    vs_rusty.as_ref().map_or(String::new(), |r| format!(
                        "warren / rusty-celery {} ({}); ",
                        Spread::of(r).ratio(),
                        // The target is for the default queue; on a priority
                        // queue the two do not do the same work.
                        if *prio == 0 {
                            "target ≥ 1.0"
                        } else {
                            "rusty-celery's queue has no priorities"
                        }
                    )),
                    median(&cpu(&warren[pi])),
                    median(&cpu(&plain[pi])),
                    if args.broker_pid.is_some() {
                        format!(
                            "{:.1} (plain {:.1})",
                            median(&broker(&warren[pi])),
                            median(&broker(&plain[pi]))
                        )
                    } else {
                        "—".into()
                    },
                    rss.map_or("—".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
                ) + &match (&big, pi) {
                    (Some((prefetch, r)), 0) => format!(
                        "; at prefetch = concurrency = {prefetch}: peak RSS {:.1} MiB, CPU/task {:.1} µs",
                        r.rss_kib.unwrap_or(0) as f64 / 1024.0,
                        r.cpu_us.unwrap_or(f64::NAN)
                    ),
                    _ => String::new(),
                },
            ],
        )?;
    }
    if priorities.len() > 1 {
        let base = median(&warren[0].iter().map(|d| d.rate).collect::<Vec<_>>());
        for (pi, prio) in priorities.iter().enumerate().skip(1) {
            let m = median(&warren[pi].iter().map(|d| d.rate).collect::<Vec<_>>());
            let pm = median(&plain[pi].iter().map(|d| d.rate).collect::<Vec<_>>());
            let pbase = median(&plain[0].iter().map(|d| d.rate).collect::<Vec<_>>());
            warren::outln!(
                "drain: max_priority {prio} / max_priority {}: warren {:.2}, plain lapin {:.2} (medians)",
                priorities[0],
                m / base,
                pm / pbase
            );
        }
    }
    Ok(())
}

/// CPU seconds of an optional process (the broker), from a start point.
#[derive(Clone, Copy)]
struct Meter {
    pid: Option<u32>,
    start: Option<f64>,
}

impl Meter {
    fn new(pid: Option<u32>) -> Self {
        Self { pid, start: None }
    }

    fn start(&mut self) {
        self.start = self.pid.and_then(cpu_seconds);
    }

    /// µs per task since [`Meter::start`].
    fn per_task_us(&self, tasks: f64) -> Option<f64> {
        let now = cpu_seconds(self.pid?)?;
        Some((now - self.start?) * 1e6 / tasks)
    }
}

/// Drain `n` deliveries with a plain lapin consumer on its own channel.
async fn plain_drain(
    conn: &Connection,
    queue: &str,
    n: usize,
    prefetch: u16,
    mut broker: Meter,
) -> Result<Drained> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "plain-drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let acked = Arc::new(AtomicUsize::new(0));
    let all_acked = Arc::new(tokio::sync::Notify::new());
    let mut first: Option<(Instant, Option<f64>)> = None;
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("plain consumer stalled")?
            .context("consumer ended")??;
        if first.is_none() {
            broker.start();
            first = Some((Instant::now(), cpu_seconds(std::process::id())));
        }
        let _: serde_json::Value = serde_json::from_slice(&d.data)?;
        let (acked, all_acked) = (acked.clone(), all_acked.clone());
        tokio::spawn(async move {
            if d.ack(BasicAckOptions::default()).await.is_ok()
                && acked.fetch_add(1, Ordering::SeqCst) + 1 == n
            {
                // notify_one keeps the wake-up if nobody waits yet.
                all_acked.notify_one();
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(60), all_acked.notified())
        .await
        .context("plain consumer: not every ack went out")?;
    let Some((start, cpu0)) = first else {
        bail!("nothing to drain");
    };
    let secs = start.elapsed().as_secs_f64();
    let cpu_us = cpu_seconds(std::process::id())
        .zip(cpu0)
        .map(|(b, a)| (b - a) * 1e6 / n as f64);
    let broker_us = broker.per_task_us(n as f64);
    ch.close(200, "done".into()).await.ok();
    Ok(Drained {
        rate: n as f64 / secs,
        cpu_us,
        broker_us,
        rss_kib: None,
    })
}

/// Start `warren-consumer` on the filled queue and time it emptying it.
async fn warren_drain(
    bin: &std::path::Path,
    url: &str,
    t: &Topology,
    max_priority: u8,
    worker: &str,
    n: usize,
    mut broker: Meter,
) -> Result<Drained> {
    // The default worker config (unless `worker` says otherwise); only the
    // work queue's priority setting (so the consumer's declaration matches
    // ours), log level and handler.
    let cfg = format!(
        "[[topology.queues]]\nname = \"default\"\nbindings = [\"#\"]\nmax_priority = {max_priority}\n[log]\nlevel = \"warn\"\n[handlers.\"bench.*\"]\nkind = \"noop\"\n{worker}"
    );
    let mut proc = start_consumer_with(bin, url, t, &cfg).await?;
    let pid = proc.child.id().context("warren-consumer exited at once")?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut first: Option<(Instant, f64, Option<f64>)> = None;
    let target = n as f64;
    loop {
        let done = tasks_done(&http, &proc.metrics).await?;
        let now = Instant::now();
        if first.is_none() && done > 0.0 {
            if done >= target {
                bail!("warren-consumer drained everything before the first scrape: use more --messages");
            }
            broker.start();
            first = Some((now, done, cpu_seconds(pid)));
        }
        if done >= target {
            break;
        }
        if now > deadline {
            bail!("warren-consumer did not finish the drain ({done} of {n})");
        }
        tokio::time::sleep(SCRAPE_EVERY).await;
    }
    let Some((start, done0, cpu0)) = first else {
        bail!("no completion seen");
    };
    let counted = target - done0;
    let rate = counted / start.elapsed().as_secs_f64();
    let cpu_us = cpu_seconds(pid)
        .zip(cpu0)
        .map(|(b, a)| (b - a) * 1e6 / counted);
    let broker_us = broker.per_task_us(counted);
    let rss_kib = peak_rss_kib(pid);
    proc.child.kill().await.ok();
    Ok(Drained {
        rate,
        cpu_us,
        broker_us,
        rss_kib,
    })
}

/// `--scenario events`: the same backlog drain by `warren-consumer` with
/// task events on (the default) and off (`events.enabled = false`),
/// alternating run by run on the same broker (docs/tasks.md). Prints each
/// drain and the on/off ratio per run; with events on, each task records
/// `started` and `succeeded` on `<prefix>.events`.
pub async fn events_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let bin = consumer_bin(args)?;
    let mut ratios = Vec::new();
    for run in 0..args.runs {
        let mut rates = [0.0f64; 2];
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let t = topo(&format!("ev{run}{side}"), 0)
                .with_events(warren::config::EventsConfig::default().stream());
            topology::declare(conn, &t).await?;
            plain_publish_body(conn, &t.tasks_exchange(), "bench.noop", args.messages, BODY)
                .await?;
            let extra = if side == 0 {
                ""
            } else {
                "[events]\nenabled = false\n"
            };
            let r = warren_drain(
                &bin,
                url,
                &t,
                0,
                extra,
                args.messages,
                Meter::new(args.broker_pid),
            )
            .await?;
            let who = if side == 0 {
                "events on "
            } else {
                "events off"
            };
            warren::outln!(
                "events run {run} {who}: {:.0} msgs/s, consumer {} µs/task, broker {} µs/task",
                r.rate,
                r.cpu_us.map_or("?".into(), |c| format!("{c:.1}")),
                r.broker_us.map_or("?".into(), |c| format!("{c:.1}")),
            );
            rates[side] = r.rate;
            warren::testing::delete_topology(conn, &t).await;
        }
        ratios.push(rates[0] / rates[1]);
        warren::outln!("events run {run}: on / off = {:.2}", rates[0] / rates[1]);
    }
    ratios.sort_by(f64::total_cmp);
    if let Some(m) = ratios.get(ratios.len() / 2) {
        warren::outln!("events: on / off median {m:.2} over {} runs", ratios.len());
    }
    Ok(())
}
