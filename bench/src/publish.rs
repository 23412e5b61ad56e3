//! `--scenario publish`: N persistent tasks with publisher confirms, four
//! ways, in one interleaved run (the order rotates run by run):
//!
//! * plain lapin: one confirm-mode channel, `mandatory`, a window of
//!   [`WINDOW`] confirms outstanding, bare properties;
//! * library: `warren::amqp::Publisher::publish_tasks`, same window;
//! * CLI: the `warren-producer publish --batch` release binary with N NDJSON
//!   lines piped to its stdin, timed from spawn to exit (process start,
//!   connect and topology declaration included);
//! * API: a running `warren-producer`, `POST /v1/tasks` with JSON arrays of
//!   `--api-batch` tasks, `--api-concurrency` requests in flight (each is
//!   answered only once all its tasks are confirmed, so one at a time leaves
//!   the broker idle between answer and next request), timed from the first
//!   request to the last answer.
//!
//! Reported: each side's rate per run, the median ratio to plain lapin, and
//! for every side the client's CPU per message (`/proc/<pid>/stat` over the
//! side's run: the bench process for the in-process sides, the CLI process
//! from start to exit, the running producer for the API — the bench's own
//! HTTP client not counted — and each peer's whole process) and the broker's
//! (`--broker-pid`).
//!
//! With `--peers`, each run starts with one publish of `--peer-messages`
//! tasks per peer (see [`peers`]): rusty-celery's rate goes to the library
//! row with warren / rusty-celery, Python Celery's to the CLI row.

use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use lapin::Connection;
use tokio::io::AsyncWriteExt;
use warren::topology::{self, Topology};

use crate::meter::{final_cpu, Meter};
use crate::peers;
use crate::table::{self, Spread};
use crate::{free_port, plain_publish, purge, topo, warren_publish, Args, BODY};

/// A publish token for the API side (the producer wants ≥ 16 characters).
const TOKEN: &str = "bench-publish-token-0123456789";

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Plain,
    Library,
    Cli,
    Api,
    /// The plain loop sending warren's properties (one task's, reused):
    /// what the contract costs the broker, apart from warren's code.
    PlainContract,
}

const SIDES: [Side; 5] = [
    Side::Plain,
    Side::Library,
    Side::Cli,
    Side::Api,
    Side::PlainContract,
];

impl Side {
    fn key(self) -> &'static str {
        match self {
            Side::Plain => "plain",
            Side::Library => "library",
            Side::Cli => "cli",
            Side::Api => "api",
            Side::PlainContract => "plain-contract",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Side::Plain => "plain lapin",
            Side::Library => "warren Publisher",
            Side::Cli => "publish --batch (CLI)",
            Side::Api => "POST /v1/tasks",
            Side::PlainContract => "plain lapin, warren's properties",
        }
    }
}

fn ndjson(n: usize) -> Vec<u8> {
    let body = String::from_utf8_lossy(BODY);
    let mut out = Vec::with_capacity(n * (BODY.len() + 40));
    for _ in 0..n {
        out.extend_from_slice(
            format!("{{\"task\":\"bench.noop\",\"payload\":{body}}}\n").as_bytes(),
        );
    }
    out
}

fn api_bodies(n: usize, batch: usize) -> Vec<String> {
    let body = String::from_utf8_lossy(BODY);
    let item = format!("{{\"task\":\"bench.noop\",\"payload\":{body}}}");
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(batch.max(1));
        out.push(format!("[{}]", vec![item.as_str(); k].join(",")));
        left -= k;
    }
    out
}

pub async fn publish_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let bin = crate::sibling_bin(&args.producer_bin, "warren-producer")?;
    let t = topo("publish");
    topology::declare(conn, &t).await?;
    if let Some(bad) = args
        .sides
        .iter()
        .find(|s| !SIDES.iter().any(|side| side.key() == s.as_str()))
    {
        bail!("--sides: unknown side {bad:?} (plain, library, cli, api, plain-contract)");
    }
    let chosen = |side: Side| args.sides.iter().any(|s| s == side.key());
    let input = ndjson(args.messages);
    let bodies = api_bodies(args.messages, args.api_batch);
    let api = match chosen(Side::Api) {
        true => Some(Api::start(&bin, url, &t).await?),
        false => None,
    };
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); SIDES.len()];
    // Client and broker CPU per message, µs, per side.
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); SIDES.len()];
    let mut broker_cpu: Vec<Vec<f64>> = vec![Vec::new(); SIDES.len()];
    let mut peers = peers::from_args(args);
    for run in 0..args.runs {
        for peer in &mut peers {
            let rate = peer.run(conn, url, "publish", args.broker_pid).await?;
            warren::outln!("publish run {run} {}: {rate:.0} msgs/s", peer.name);
        }
        for k in 0..SIDES.len() {
            let i = (run + k) % SIDES.len();
            let side = SIDES[i];
            if !chosen(side) {
                continue;
            }
            purge(conn, &t).await?;
            // The client: this process, or the producer behind the API (the
            // CLI's is read when it exits).
            let client = Meter::started(match (side, &api) {
                (Side::Api, Some(api)) => api.child.id(),
                _ => Some(std::process::id()),
            });
            let broker = Meter::started(args.broker_pid);
            let start = Instant::now();
            let mut cli_cpu = None;
            match (side, &api) {
                (Side::Plain, _) => {
                    plain_publish(conn, &t.tasks_exchange(), "bench.noop", args.messages).await?
                }
                (Side::Library, _) => warren_publish(conn, &t, args.messages).await?,
                (Side::Cli, _) => {
                    cli_cpu = cli_publish(&bin, url, &t, &input, args.messages).await?
                }
                (Side::Api, Some(api)) => api.publish(&bodies, args.api_concurrency).await?,
                (Side::Api, None) => continue,
                (Side::PlainContract, _) => {
                    // The CLI and the API start a trace per task: the same
                    // properties include its `traceparent`.
                    let mut task = warren::Task::from_raw("bench.noop", BODY.to_vec());
                    task.trace = Some(warren::trace::TraceContext::new_root());
                    let (exchange, key) = t.route(&task.name, std::time::Duration::ZERO);
                    crate::plain_publish_with(
                        conn,
                        &exchange,
                        &key,
                        args.messages,
                        BODY,
                        &task.properties(),
                    )
                    .await?
                }
            }
            let rate = args.messages as f64 / start.elapsed().as_secs_f64();
            let n = args.messages as f64;
            broker_cpu[i].extend(broker.per_task_us(n));
            match side {
                Side::Cli => cpu[i].extend(cli_cpu.map(|s| s * 1e6 / n)),
                _ => cpu[i].extend(client.per_task_us(n)),
            }
            warren::outln!("publish run {run} {}: {rate:.0} msgs/s", side.name());
            rates[i].push(rate);
        }
    }
    if let Some(api) = api {
        api.stop().await;
    }
    warren::testing::delete_topology(conn, &t).await;
    if !chosen(Side::Plain) {
        return Ok(());
    }

    let plain = &rates[0];
    for (i, side) in SIDES
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, s)| chosen(**s))
    {
        let ratios = table::ratios(plain, &rates[i]);
        warren::outln!(
            "publish: {}: {}, / plain lapin per run [{}], median {:.2}",
            side.name(),
            Spread::of(&rates[i]),
            table::list(&ratios, 2),
            table::median(&ratios)
        );
    }
    warren::outln!("publish: plain lapin {}", Spread::of(plain));
    // The target's yardstick: the same loop sending the same properties,
    // run by run (each round runs every side once, so a round's ratio
    // compares sides that met the same load).
    let contract = SIDES
        .iter()
        .position(|s| *s == Side::PlainContract)
        .filter(|_| chosen(Side::PlainContract));
    if let Some(contract) = contract {
        for (i, side) in SIDES
            .iter()
            .enumerate()
            .filter(|(_, s)| chosen(**s) && matches!(s, Side::Library | Side::Cli | Side::Api))
        {
            let ratios = table::ratios(&rates[contract], &rates[i]);
            warren::outln!(
                "publish: {} / plain lapin with warren's properties per run [{}], median {:.2}",
                side.name(),
                table::list(&ratios, 2),
                table::median(&ratios)
            );
        }
    }
    let cpu_cell = |i: usize| {
        let f = |v: &[f64]| {
            if v.is_empty() {
                "—".to_owned()
            } else {
                format!("{:.1}", table::median(v))
            }
        };
        format!("{} / {}", f(&cpu[i]), f(&broker_cpu[i]))
    };
    for (i, side) in SIDES.iter().enumerate().filter(|(_, s)| chosen(**s)) {
        warren::outln!(
            "publish: {}: CPU per message µs, client / broker (medians): {}",
            side.name(),
            cpu_cell(i)
        );
    }
    let peer_cpu: Vec<String> = peers
        .iter()
        .filter(|p| !p.cpu.is_empty())
        .map(|p| {
            let c: Vec<f64> = p.cpu.iter().filter_map(|c| c.0).collect();
            let b: Vec<f64> = p.cpu.iter().filter_map(|c| c.1).collect();
            format!(
                "{} {:.1} / {}",
                p.name,
                table::median(&c),
                if b.is_empty() {
                    "—".to_owned()
                } else {
                    format!("{:.1}", table::median(&b))
                }
            )
        })
        .collect();
    for line in &peer_cpu {
        warren::outln!("publish: peer CPU per message µs, client (whole process) / broker: {line}");
    }
    for (i, side) in SIDES
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, s)| chosen(**s))
    {
        let ratios = table::ratios(plain, &rates[i]);
        let note = match side {
            Side::Cli => "process start included",
            Side::Api => "each answer waits for its confirms",
            Side::PlainContract => {
                "the same loop as plain lapin: what the contract's properties cost the broker"
            }
            _ => "",
        };
        // rusty-celery's `send_task` is an in-process library call too.
        let vs_rusty = match side {
            Side::Library => peers::rusty_ratios(&peers, &rates[i]),
            _ => None,
        };
        if let Some(r) = &vs_rusty {
            warren::outln!(
                "publish: warren Publisher / rusty-celery per run [{}], median {:.2} (rusty-celery: no confirms, timed until all are in its queue)",
                table::list(r, 2),
                table::median(r)
            );
        }
        // The target's yardstick, for the CLI and the API: the plain loop
        // sending the same properties, run by run.
        let note = match contract.filter(|_| matches!(side, Side::Cli | Side::Api)) {
            Some(c) => format!(
                "/ plain lapin with warren's properties {}, client CPU {}× its; {note}",
                Spread::of(&table::ratios(&rates[c], &rates[i])).ratio(),
                if cpu[c].is_empty() || cpu[i].is_empty() {
                    "—".to_owned()
                } else {
                    format!("{:.2}", table::median(&cpu[i]) / table::median(&cpu[c]))
                }
            ),
            None => note.to_owned(),
        };
        let note = match &vs_rusty {
            Some(r) => format!(
                "warren / rusty-celery {} (rusty-celery publishes without confirms: timed until all are in its queue)",
                Spread::of(r).ratio()
            ),
            None => note.to_owned(),
        };
        let note = format!(
            "CPU/msg µs client / broker: this side {}, plain lapin {}{}{}",
            cpu_cell(i),
            cpu_cell(0),
            match side {
                Side::Library | Side::Cli => peer_cpu
                    .iter()
                    .filter(|l| l.starts_with(if *side == Side::Library {
                        "rusty"
                    } else {
                        "Python"
                    }))
                    .map(|l| format!(", {l}"))
                    .collect::<String>(),
                _ => String::new(),
            },
            if note.is_empty() {
                String::new()
            } else {
                format!("; {note}")
            }
        );
        table::row(
            args,
            &[
                format!(
                    "publish {} msgs with confirms: {}{}",
                    args.messages,
                    side.name(),
                    if *side == Side::Api {
                        format!(
                            ", batches of {}, {} in flight",
                            args.api_batch, args.api_concurrency
                        )
                    } else {
                        String::new()
                    }
                ),
                Spread::of(plain).to_string(),
                Spread::of(&rates[i]).to_string(),
                Spread::of(&ratios).ratio(),
                if matches!(side, Side::Library | Side::PlainContract) {
                    String::new()
                } else {
                    "≥ 0.95 × plain lapin with warren's properties (note)".into()
                },
                match side {
                    Side::Library => peers::rusty_cell(&peers),
                    _ => String::new(),
                },
                if *side == Side::Cli {
                    peers::celery_cell(&peers)
                } else {
                    String::new()
                },
                note,
            ],
        )?;
    }
    Ok(())
}

async fn cli_publish(
    bin: &std::path::Path,
    url: &str,
    t: &Topology,
    input: &[u8],
    n: usize,
) -> Result<Option<f64>> {
    let mut child = tokio::process::Command::new(bin)
        .args(["publish", "--batch"])
        .env("WARREN_AMQP_URL", url)
        .env("WARREN_TOPOLOGY__PREFIX", t.prefix())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let data = input.to_vec();
    let writer = tokio::spawn(async move {
        let r = stdin.write_all(&data).await;
        drop(stdin);
        r
    });
    let pid = child.id();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    if let (Some(mut o), Some(mut e)) = (child.stdout.take(), child.stderr.take()) {
        use tokio::io::AsyncReadExt;
        let (a, b) = tokio::join!(o.read_to_end(&mut out), e.read_to_end(&mut err));
        a?;
        b?;
    }
    // Read before the child is reaped: a zombie keeps its CPU times.
    let cpu = match pid {
        Some(pid) => final_cpu(pid).await,
        None => None,
    };
    let status = child.wait().await?;
    writer.await??;
    let stdout = String::from_utf8_lossy(&out);
    if !status.success() || stdout.trim() != format!("{n} confirmed, 0 failed") {
        bail!(
            "publish --batch failed ({status}): {} {}",
            stdout.trim(),
            String::from_utf8_lossy(&err).trim()
        );
    }
    Ok(cpu)
}

/// A running `warren-producer` whose API the bench posts to.
struct Api {
    child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start(bin: &std::path::Path, url: &str, t: &Topology) -> Result<Api> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let child = tokio::process::Command::new(bin)
            .arg("run")
            .current_dir(dir.path())
            .env("WARREN_AMQP_URL", url)
            .env("WARREN_TOPOLOGY__PREFIX", t.prefix())
            .env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("WARREN_API__PUBLISH_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {} run", bin.display()))?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        crate::wait_ready(&http, &base, "warren-producer").await?;
        Ok(Api {
            child,
            base,
            http,
            _dir: dir,
        })
    }

    /// Post every body, `concurrency` requests in flight.
    async fn publish(&self, bodies: &[String], concurrency: usize) -> Result<()> {
        let url = format!("{}/v1/tasks", self.base);
        let mut posts = futures_util::stream::iter(bodies.iter().map(|body| {
            let req = self
                .http
                .post(&url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body.clone());
            async move {
                let r = req.send().await?;
                if r.status().as_u16() != 202 {
                    bail!("POST /v1/tasks: {} {}", r.status(), r.text().await?);
                }
                Ok(())
            }
        }))
        .buffer_unordered(concurrency.max(1));
        while let Some(r) = posts.next().await {
            r?;
        }
        Ok(())
    }

    async fn stop(mut self) {
        self.child.kill().await.ok();
    }
}
