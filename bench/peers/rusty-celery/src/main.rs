//! rusty-celery (the crates.io `celery` crate) as a peer in warren-bench's
//! runs (`--peers rusty-celery`), the counterpart of `../celery_peer.py`:
//!
//!     rusty-celery-peer publish --url URL --queue Q -n N
//!     rusty-celery-peer drain   --url URL --queue Q -n N
//!
//! Prints `rate <tasks per second>` last. The crate's `AMQPBroker` declares
//! its own durable classic queue and publishes persistent messages, but
//! without publisher confirms (it never selects confirm mode), so `publish`
//! times N `send_task` calls up to the moment the broker reports all N in
//! the queue: the nearest thing to "confirmed" this client offers. `drain`:
//! N tasks are sent first and waited for in the queue (not timed), then the
//! crate's worker runs a no-op task with late acks (its default is to ack
//! *before* the task runs) and prefetch `--prefetch` (default 64; 0: the
//! crate's default); timed from the first task's start to the Nth, as the
//! Python peer does (warren-bench measures the drain from the broker's queue
//! count instead).

// celery 0.5's `#[task]` macro expands to an impl inside a const.
#![allow(non_local_definitions)]

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use celery::prelude::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

/// Tasks the drain must see before it reports.
static TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static SEEN: AtomicUsize = AtomicUsize::new(0);
static FIRST: OnceLock<Instant> = OnceLock::new();

/// The same ~150-byte kwargs as the Python peer's `BODY`.
#[allow(clippy::too_many_arguments)]
#[celery::task(name = "bench.noop")]
fn noop(
    user_id: u64,
    action: String,
    email: String,
    tags: Vec<String>,
    locale: String,
    seq: u64,
) -> TaskResult<()> {
    let _ = (user_id, action, email, tags, locale, seq);
    let seen = SEEN.fetch_add(1, Ordering::SeqCst) + 1;
    let first = *FIRST.get_or_init(Instant::now);
    let n = TARGET.load(Ordering::SeqCst);
    if seen == n {
        // The first task's start opens the window, so n - 1 tasks ran in it.
        let rate = (n.saturating_sub(1)) as f64 / first.elapsed().as_secs_f64();
        say(&format!("rate {rate:.0}"));
        // Like the Python peer's os._exit: the worker has no "stop after N".
        std::process::exit(0);
    }
    Ok(())
}

fn body() -> celery::task::Signature<noop> {
    noop::new(
        4242,
        "bench.drain".into(),
        "ada@example.com".into(),
        vec!["alpha".into(), "beta".into(), "gamma".into()],
        "en-GB".into(),
        1_234_567,
    )
}

/// A line on stdout; a closed stdout is not this process's failure.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

struct Args {
    mode: String,
    url: String,
    queue: String,
    n: usize,
    /// drain: the worker's prefetch; 0: the crate's default.
    prefetch: u16,
}

const USAGE: &str =
    "usage: rusty-celery-peer publish|drain --url URL --queue QUEUE -n N [--prefetch P]";

fn parse_args() -> Result<Args> {
    let mut mode = None;
    let (mut url, mut queue, mut n) = (None, None, None);
    let mut prefetch = 64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--url" => url = it.next(),
            "--queue" => queue = it.next(),
            "-n" => {
                let v = it.next().context("-n needs a number")?;
                n = Some(v.parse::<usize>().with_context(|| format!("-n {v:?}"))?);
            }
            "--prefetch" => {
                let v = it.next().context("--prefetch needs a number")?;
                prefetch = v.parse::<u16>().with_context(|| format!("--prefetch {v:?}"))?;
            }
            "publish" | "drain" if mode.is_none() => mode = Some(a),
            other => bail!("unknown argument {other:?}"),
        }
    }
    match (mode, url, queue, n) {
        (Some(mode), Some(url), Some(queue), Some(n)) if n > 0 => Ok(Args {
            mode,
            url,
            queue,
            n,
            prefetch,
        }),
        _ => bail!("missing or empty argument"),
    }
}

/// Wait until the broker holds `n` ready messages in `queue`.
async fn wait_queued(url: &str, queue: &str, n: usize) -> Result<()> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let conn = Connection::connect(url, props)
        .await
        .context("connect to read the queue's length")?;
    let ch = conn.create_channel().await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = ch
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("queue {queue:?}"))?;
        if q.message_count() as usize >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {} of {n} tasks reached {queue:?}", q.message_count());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    conn.close(200, "done").await.ok();
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let app = if args.prefetch > 0 {
        celery::app!(
            broker = AMQPBroker { args.url.clone() },
            tasks = [noop],
            task_routes = ["*" => args.queue.as_str()],
            default_queue = args.queue.as_str(),
            prefetch_count = args.prefetch,
            acks_late = true,
            heartbeat = Some(60),
        )
        .await
    } else {
        celery::app!(
            broker = AMQPBroker { args.url.clone() },
            tasks = [noop],
            task_routes = ["*" => args.queue.as_str()],
            default_queue = args.queue.as_str(),
            acks_late = true,
            heartbeat = Some(60),
        )
        .await
    }
    .context("connect the celery app")?;
    let start = Instant::now();
    for _ in 0..args.n {
        app.send_task(body()).await.context("send_task")?;
    }
    let sent = start.elapsed();
    wait_queued(&args.url, &args.queue, args.n).await?;
    if args.mode == "publish" {
        let secs = start.elapsed().as_secs_f64();
        say(&format!(
            "sent {} in {:.2} s, all in the queue after {secs:.2} s (no publisher confirms)",
            args.n,
            sent.as_secs_f64()
        ));
        say(&format!("rate {:.0}", args.n as f64 / secs));
        app.close().await.ok();
        return Ok(());
    }
    TARGET.store(args.n, Ordering::SeqCst);
    app.consume_from(&[args.queue.as_str()])
        .await
        .context("consume")?;
    bail!("the worker stopped before {} tasks ran", args.n)
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "rusty-celery-peer: {e:#}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        let _ = writeln!(std::io::stderr(), "rusty-celery-peer: {e:#}");
        std::process::exit(1);
    }
}
