//! `--scenario retry-heavy`: N tasks that each fail once and succeed on the
//! second attempt, 500 ms later, against the same N succeeding at once.
//!
//! Both sides: a backlog of `--messages` tasks, then `warren-consumer`
//! (default worker config, log at `error`) with an `http` handler posting
//! to a server in the bench process; `retry.default` = 500 ms initial
//! delay, no jitter. The server answers 200, or, for the failing side, 503
//! to a task's first attempt (`X-Warren-Attempt: 1`) and 200 to the next:
//! the retry goes through the delay levels and back. Completion is the
//! consumer's `warren_consumer_tasks_total{outcome="succeeded"}`, read every
//! [`SCRAPE`] (the work queue alone cannot tell: retried tasks wait in the
//! delay levels), the end interpolated between the last two scrapes; the
//! clock starts when the consumer is ready. Reported: tasks/s, consumer
//! and broker (`--broker-pid`) CPU per task.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use lapin::Connection;
use warren::topology;

use crate::drain::BODY;
use crate::meter::Meter;
use crate::table::{self, list, median};
use crate::{consumer_bin, plain_publish_body, spawn_consumer_with, topo, wait_ready, Args};

/// How often the consumer's `/metrics` is read: rarely enough not to load it.
const SCRAPE: Duration = Duration::from_millis(250);

struct Run {
    rate: f64,
    cpu_us: Option<f64>,
    broker_us: Option<f64>,
}

async fn serve() -> Result<u16> {
    let app = axum::Router::new()
        .route("/ok", post(|| async { StatusCode::OK }))
        .route(
            "/fail-once",
            post(|h: HeaderMap| async move {
                match h.get("x-warren-attempt").and_then(|v| v.to_str().ok()) {
                    Some("1") => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::OK,
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}

pub async fn retry_scenario(conn: &Connection, args: &Args, url: &str) -> Result<()> {
    let port = serve().await?;
    let bin = consumer_bin(args)?;
    let n = args.messages;
    let mut sides: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for run in 0..args.runs {
        for k in 0..2 {
            let side = (run + k) % 2;
            let t = topo(&format!("retry{side}"));
            topology::declare(conn, &t).await?;
            plain_publish_body(conn, &t.tasks_exchange(), "bench.retry", n, BODY).await?;
            let path = if side == 0 { "ok" } else { "fail-once" };
            let cfg = format!(
                "[log]\nlevel = \"error\"\n[retry.default]\ninitial_delay = \"500ms\"\njitter = 0.0\nmax_attempts = 3\n[handlers.\"bench.*\"]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/{path}\"\n"
            );
            let mut proc = spawn_consumer_with(&bin, url, &t, &cfg, Stdio::inherit())?;
            let pid = proc.child.id().context("warren-consumer exited at once")?;
            let http = reqwest::Client::new();
            wait_ready(&http, &proc.base, "warren-consumer").await?;
            let client = Meter::started(Some(pid));
            let broker = Meter::started(args.broker_pid);
            let start = Instant::now();
            let deadline = start + Duration::from_secs(600);
            let mut last = (start, 0.0);
            let end = loop {
                tokio::time::sleep(SCRAPE).await;
                let text = http.get(&proc.metrics).send().await?.text().await?;
                let now = Instant::now();
                let done = warren::testing::scraped_value(
                    &text,
                    "warren_consumer_tasks_total",
                    &[("outcome", "succeeded")],
                )
                .unwrap_or(0.0);
                if done >= n as f64 {
                    // Interpolated: the rate was steady between the scrapes.
                    let (t0, d0) = last;
                    let frac = (n as f64 - d0) / (done - d0).max(1.0);
                    break t0 + (now - t0).mul_f64(frac.clamp(0.0, 1.0));
                }
                if now > deadline {
                    bail!("retry-heavy: {done} of {n} succeeded in time");
                }
                last = (now, done);
            };
            let secs = (end - start).as_secs_f64();
            let r = Run {
                rate: n as f64 / secs,
                cpu_us: client.per_task_us(n as f64),
                broker_us: broker.per_task_us(n as f64),
            };
            proc.child.kill().await.ok();
            warren::testing::delete_topology(conn, &t).await;
            warren::outln!(
                "retry-heavy run {run} {}: {:.0} tasks/s, CPU/task µs consumer {:.1} broker {:.1}",
                if side == 0 {
                    "succeed at once"
                } else {
                    "fail once"
                },
                r.rate,
                r.cpu_us.unwrap_or(f64::NAN),
                r.broker_us.unwrap_or(f64::NAN)
            );
            sides[side].push(r);
        }
    }
    let rates = |v: &[Run]| v.iter().map(|r| r.rate).collect::<Vec<_>>();
    let cpu = |v: &[Run]| v.iter().filter_map(|r| r.cpu_us).collect::<Vec<_>>();
    let broker = |v: &[Run]| v.iter().filter_map(|r| r.broker_us).collect::<Vec<_>>();
    let (once, fail) = (rates(&sides[0]), rates(&sides[1]));
    let ratios = table::ratios(&once, &fail);
    for (side, name) in [
        (0, "succeed at once"),
        (1, "fail once, retried after 500 ms"),
    ] {
        let v = &sides[side];
        warren::outln!(
            "retry-heavy {n} tasks, {name}: tasks/s [{}] median {:.0}; CPU per task µs consumer {:.1}, broker {:.1} (medians)",
            list(&rates(v), 0),
            median(&rates(v)),
            median(&cpu(v)),
            median(&broker(v))
        );
    }
    warren::outln!(
        "retry-heavy: fail once / succeed at once, tasks/s per run [{}], median {:.2}",
        list(&ratios, 2),
        median(&ratios)
    );
    table::row(
        args,
        &[
            format!("{n} tasks through an http handler, each failing once (retry after 500 ms), vs succeeding at once"),
            "—".into(),
            format!(
                "{} vs {}",
                table::Spread::of(&fail),
                table::Spread::of(&once)
            ),
            table::Spread::of(&ratios).ratio(),
            "reported".into(),
            "—".into(),
            "—".into(),
            format!(
                "CPU/task µs consumer / broker: failing once {:.1} / {:.1}, at once {:.1} / {:.1}",
                median(&cpu(&sides[1])),
                median(&broker(&sides[1])),
                median(&cpu(&sides[0])),
                median(&broker(&sides[0]))
            ),
        ],
    )?;
    Ok(())
}
