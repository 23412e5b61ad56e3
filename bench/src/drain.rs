//! `--scenario drain`: how fast a pre-filled backlog empties.
//!
//! Each run publishes N persistent ~200-byte tasks with confirms (not timed),
//! then lets one side empty the queue:
//!
//! * plain lapin: one consumer loop in the bench process that parses the
//!   JSON and acks each delivery from a spawned task, i.e. acks pipelined,
//!   never awaited in the loop;
//! * warren: the `warren-consumer` binary with a `noop` handler;
//! * the peers of `--peers` (see [`peers`]), which publish their own N tasks
//!   first.
//!
//! Every side is measured the same way ([`meter`]): the broker's ready
//! count of the queue, polled every 100 ms, gives the rate between the first
//! poll that shows the queue shrinking and the last that still shows
//! messages; the CPU of the consumer process (`/proc/<pid>/stat`, with its
//! children) and of the broker (`--broker-pid`) over the same polls, per task.
//! Nothing reads the measured side while it drains.
//!
//! Each setting is a row: `--drain-prefetch P` (one or more) gives every side
//! prefetch P (warren: `prefetch = concurrency = P`); the defaults row gives
//! each side its own default (warren: prefetch 64, concurrency 32; lapin: 64,
//! see [`Setting::plain_prefetch`]; rusty-celery and Python Celery: theirs).
//! A peer whose drain cannot be measured (e.g. a default prefetch so large
//! that its queue's ready count drops to 0 at once) is reported as such.
//! Sides rotate run by run; with `--max-priority 10,0` every priority
//! setting of the work queue is measured too (the peers' queues have no
//! priorities: they run with setting 0 only).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use warren::config::{QueueConfig, QueueType, TopologyConfig};
use warren::topology::{self, Topology};

use crate::meter::{Drained, Watch};
use crate::peers;
use crate::table::{self, list, median, Spread};
use crate::{consumer_bin, peak_rss_kib, plain_publish_body, spawn_consumer_with, Args};

/// A ~200-byte JSON task body, as a typical small task carries.
pub const BODY: &[u8] = br#"{"user_id":4242,"action":"bench.drain","email":"ada@example.com","tags":["alpha","beta","gamma"],"locale":"en-GB","attempt_note":"a payload of about two hundred bytes, like a typical small task","seq":1234567}"#;

/// How long one drain may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);

/// Prefetch of every side, or each side's default.
#[derive(Clone, Copy, PartialEq)]
pub enum Setting {
    Same(u16),
    Defaults,
}

impl Setting {
    fn label(self) -> String {
        match self {
            Setting::Same(p) => format!("prefetch {p} for every side (warren: concurrency {p})"),
            Setting::Defaults => {
                "each side's default config (warren 64 / 32, lapin 64, the peers' own)".into()
            }
        }
    }

    fn short(self) -> String {
        match self {
            Setting::Same(p) => format!("prefetch {p}"),
            Setting::Defaults => "defaults".into(),
        }
    }

    /// lapin's own default is no `basic.qos` (unlimited): the whole backlog
    /// would be handed over at once, which the broker's ready count cannot
    /// follow, and no consumer drains a backlog that way; so 64 in the
    /// defaults row too.
    fn plain_prefetch(self) -> u16 {
        match self {
            Setting::Same(p) => p,
            Setting::Defaults => 64,
        }
    }

    fn warren_worker(self) -> String {
        match self {
            Setting::Same(p) => format!("[worker]\nprefetch = {p}\nconcurrency = {p}\n"),
            Setting::Defaults => String::new(),
        }
    }

    /// 0: the peer's own default.
    fn peer_prefetch(self) -> u16 {
        match self {
            Setting::Same(p) => p,
            Setting::Defaults => 0,
        }
    }
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

/// The runs of one side in one (priority, setting) cell.
#[derive(Default)]
struct Runs(Vec<Drained>);

impl Runs {
    fn rates(&self) -> Vec<f64> {
        self.0.iter().map(|d| d.rate).collect()
    }
    fn cpu(&self) -> Vec<f64> {
        self.0.iter().filter_map(|d| d.cpu_us).collect()
    }
    fn broker(&self) -> Vec<f64> {
        self.0.iter().filter_map(|d| d.broker_us).collect()
    }
    /// `median µs client / median µs broker`.
    fn cpu_cell(&self) -> String {
        let f = |v: Vec<f64>| {
            if v.is_empty() {
                "—".to_owned()
            } else {
                format!("{:.1}", median(&v))
            }
        };
        format!("{} / {}", f(self.cpu()), f(self.broker()))
    }
}

pub async fn drain_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let bin = consumer_bin(args)?;
    let mut settings: Vec<Setting> = args
        .drain_prefetch
        .iter()
        .map(|&p| Setting::Same(p))
        .collect();
    settings.push(Setting::Defaults);
    let combos: Vec<(u8, Setting)> = args
        .max_priority
        .iter()
        .flat_map(|&p| settings.iter().map(move |&s| (p, s)))
        .collect();
    let mut peers = peers::from_args(args);
    // Per combo: plain, warren, then one per peer.
    let mut runs: Vec<Vec<Runs>> = combos
        .iter()
        .map(|_| (0..2 + peers.len()).map(|_| Runs::default()).collect())
        .collect();
    for run in 0..args.runs {
        for (ci, &(prio, setting)) in combos.iter().enumerate() {
            let sides = if prio == 0 { 2 + peers.len() } else { 2 };
            for k in 0..sides {
                // Rotate which side goes first, run by run and cell by cell.
                let side = (run + ci + k) % sides;
                let r = match side {
                    0 | 1 => {
                        let t = topo(&format!("{run}{ci}{side}"), prio);
                        topology::declare(conn, &t).await?;
                        plain_publish_body(
                            conn,
                            &t.tasks_exchange(),
                            "bench.noop",
                            args.messages,
                            BODY,
                        )
                        .await?;
                        let r = if side == 0 {
                            plain_drain(conn, &t, args, setting.plain_prefetch()).await
                        } else {
                            warren_drain(&bin, conn, url, &t, prio, &setting.warren_worker(), args)
                                .await
                        };
                        warren::testing::delete_topology(conn, &t).await;
                        r?
                    }
                    p => {
                        let peer = &mut peers[p - 2];
                        match peer
                            .drain(conn, url, setting.peer_prefetch(), args.broker_pid)
                            .await
                        {
                            Ok(r) => r,
                            Err(e) => {
                                warren::outln!(
                                    "drain run {run} {} {}: not measured: {e:#}",
                                    setting.short(),
                                    peer.name
                                );
                                continue;
                            }
                        }
                    }
                };
                let who = match side {
                    0 => "plain lapin",
                    1 => "warren",
                    p => peers[p - 2].name,
                };
                warren::outln!(
                    "drain run {run} max_priority {prio} {} {who}: {:.0} msgs/s, CPU/task µs client {:.1} broker {:.1}",
                    setting.short(),
                    r.rate,
                    r.cpu_us.unwrap_or(f64::NAN),
                    r.broker_us.unwrap_or(f64::NAN)
                );
                runs[ci][side].0.push(r);
            }
        }
    }
    warren::outln!(
        "drain: {} tasks of {} bytes per run, {} runs per side, noop handlers; rate and CPU from the broker's ready count polled every {} ms",
        args.messages,
        BODY.len(),
        args.runs,
        crate::meter::POLL.as_millis()
    );
    for (ci, &(prio, setting)) in combos.iter().enumerate() {
        let r = &runs[ci];
        let (p, w) = (r[0].rates(), r[1].rates());
        let ratios = table::ratios(&p, &w);
        let tag = format!("drain max_priority {prio} {}", setting.short());
        warren::outln!(
            "{tag}: plain lapin msgs/s [{}], median {:.0}",
            list(&p, 0),
            median(&p)
        );
        warren::outln!(
            "{tag}: warren      msgs/s [{}], median {:.0}",
            list(&w, 0),
            median(&w)
        );
        warren::outln!(
            "{tag}: warren / plain per run [{}], median {:.2}",
            list(&ratios, 2),
            median(&ratios)
        );
        let mut cpu_note = vec![
            format!("warren {}", r[1].cpu_cell()),
            format!("plain {}", r[0].cpu_cell()),
        ];
        let mut rusty = "—".to_owned();
        let mut celery = "—".to_owned();
        let mut vs_rusty = None;
        if prio == 0 {
            for (pi, peer) in peers.iter().enumerate() {
                let pr = &r[2 + pi];
                if pr.0.is_empty() {
                    continue;
                }
                let rates = pr.rates();
                warren::outln!(
                    "{tag}: {} msgs/s [{}], median {:.0}",
                    peer.name,
                    list(&rates, 0),
                    median(&rates)
                );
                cpu_note.push(format!("{} {}", peer.name, pr.cpu_cell()));
                let cell = Spread::of(&rates).to_string();
                if peer.key == "rusty-celery" {
                    rusty = cell;
                    let rr = table::ratios(&rates, &w);
                    warren::outln!(
                        "{tag}: warren / rusty-celery per run [{}], median {:.2}",
                        list(&rr, 2),
                        median(&rr)
                    );
                    vs_rusty = Some(rr);
                } else {
                    celery = cell;
                }
            }
        }
        warren::outln!(
            "{tag}: CPU per task µs, client / broker (medians): {}",
            cpu_note.join("; ")
        );
        let rss = r[1].0.iter().filter_map(|d| d.rss_kib).max();
        if let Some(kib) = rss {
            warren::outln!(
                "{tag}: warren-consumer peak RSS {:.1} MiB (max over runs)",
                kib as f64 / 1024.0
            );
        }
        let queue = if prio == 0 {
            "no priorities".to_owned()
        } else {
            format!("`x-max-priority = {prio}`")
        };
        table::row(
            args,
            &[
                format!(
                    "drain a {}k backlog, {queue}, {}, noop",
                    args.messages / 1000,
                    setting.label()
                ),
                Spread::of(&p).to_string(),
                Spread::of(&w).to_string(),
                Spread::of(&ratios).ratio(),
                if setting == Setting::Defaults && prio == 0 {
                    "≥ 0.9 (≥ 1.0 × rusty-celery)".into()
                } else {
                    String::new()
                },
                rusty,
                celery,
                format!(
                    "{}CPU/task µs client / broker: {}; warren peak RSS {}",
                    vs_rusty.as_ref().map_or(String::new(), |rr| format!(
                        "warren / rusty-celery {}; ",
                        Spread::of(rr).ratio()
                    )),
                    cpu_note.join(", "),
                    rss.map_or("—".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
                ),
            ],
        )?;
    }
    Ok(())
}

/// Drain the work queue of `t` with a plain lapin consumer on its own channel,
/// in this process (nothing else runs in it meanwhile but the watch).
async fn plain_drain(
    conn: &Connection,
    t: &Topology,
    args: &Args,
    prefetch: u16,
) -> Result<Drained> {
    let queue = t.work_queues()[0].name.clone();
    let n = args.messages;
    let ch = conn.create_channel().await?;
    if prefetch > 0 {
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    }
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "plain-drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut watch = Watch::new(conn, &queue, Some(std::process::id()), args.broker_pid).await?;
    let consuming = tokio::spawn(async move {
        let acked = Arc::new(AtomicUsize::new(0));
        let all_acked = Arc::new(tokio::sync::Notify::new());
        for _ in 0..n {
            let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
                .await
                .context("plain consumer stalled")?
                .context("consumer ended")??;
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
        Ok::<_, anyhow::Error>(())
    });
    let window = watch.drain(DRAIN_TIMEOUT).await;
    consuming.await??;
    watch.close().await;
    ch.close(200, "done".into()).await.ok();
    Ok(Drained::of(&window?, None))
}

/// Start `warren-consumer` on the filled queue and watch it empty it.
async fn warren_drain(
    bin: &std::path::Path,
    conn: &Connection,
    url: &str,
    t: &Topology,
    max_priority: u8,
    worker: &str,
    args: &Args,
) -> Result<Drained> {
    // The default worker config (unless `worker` says otherwise); only the
    // work queue's priority setting (so the consumer's declaration matches
    // ours), log level and handler.
    let cfg = format!(
        "[[topology.queues]]\nname = \"default\"\nbindings = [\"#\"]\nmax_priority = {max_priority}\n[log]\nlevel = \"warn\"\n[handlers.\"bench.*\"]\nkind = \"noop\"\n{worker}"
    );
    let mut proc = spawn_consumer_with(bin, url, t, &cfg, std::process::Stdio::inherit())?;
    let pid = proc.child.id().context("warren-consumer exited at once")?;
    let queue = t.work_queues()[0].name.clone();
    // Watched from before the consumer connects, so that a short drain still
    // spans several polls.
    let mut watch = Watch::new(conn, &queue, Some(pid), args.broker_pid).await?;
    let http = reqwest::Client::new();
    let (window, ready) = tokio::join!(
        watch.drain(DRAIN_TIMEOUT),
        crate::wait_ready(&http, &proc.base, "warren-consumer")
    );
    ready?;
    watch.close().await;
    let rss_kib = peak_rss_kib(pid);
    proc.child.kill().await.ok();
    Ok(Drained::of(&window?, rss_kib))
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
            let r = warren_drain(&bin, conn, url, &t, 0, extra, args).await?;
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
