//! W3C trace context from the producer: every task it publishes carries a
//! `traceparent` — the API caller's (header, or a task's own field), the
//! CLI's `--traceparent`, else a fresh one per task and per schedule fire —
//! and an exec handler behind the API sees the caller's, unchanged, on
//! every attempt.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren::testing::eventually;
use warren::trace::TraceContext;
use warren_consumer::config::HandlerSpec;

use crate::helpers::{Msg, World, PUBLISH_TOKEN};

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const OWN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const WAIT: Duration = Duration::from_secs(30);

const CFG: &str = r#"
[[schedules]]
name = "tick"
cron = "* * * * * *"
task = "it.tick"
misfire = "skip"
"#;

async fn post(url: &str, traceparent: Option<&str>, body: serde_json::Value) -> u16 {
    let mut req = reqwest::Client::new()
        .post(url)
        .bearer_auth(PUBLISH_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp).header("tracestate", "k=v");
    }
    req.send().await.expect("POST /v1/tasks").status().as_u16()
}

fn trace_of(m: &Msg) -> TraceContext {
    let tp = m.traceparent.as_deref().expect("a traceparent header");
    TraceContext::parse(tp, None).expect("a valid traceparent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_published_task_carries_a_traceparent() {
    let w = World::new("trace_sources").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", CFG);
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let url = p.url("/v1/tasks");

    // A batch under the caller's trace; one task names its own.
    let status = post(
        &url,
        Some(TP),
        json!([{"task": "it.a", "id": "joins"}, {"task": "it.a", "id": "own", "traceparent": OWN}]),
    )
    .await;
    assert_eq!(status, 202);
    // No header: a trace of its own. A bad field: refused, naming it.
    assert_eq!(
        post(&url, None, json!({"task": "it.a", "id": "fresh"})).await,
        202
    );
    assert_eq!(
        post(
            &url,
            None,
            json!({"task": "it.a", "traceparent": "00-nope"})
        )
        .await,
        422
    );
    // The CLI: its flag, else a fresh one; a bad flag is a usage error.
    let cli = |args: &[&str]| {
        let mut all = vec!["publish", "it.cli"];
        all.extend_from_slice(args);
        w.cli(&all, b"")
    };
    assert!(cli(&["--id", "cli-own", "--traceparent", OWN])
        .status
        .success());
    assert!(cli(&["--id", "cli-fresh"]).status.success());
    let bad = cli(&["--traceparent", "junk"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--traceparent"));

    let msgs = rx
        .wait_for(WAIT, "5 published tasks and 2 ticks", |m| {
            m.iter().filter(|m| m.schedule.is_none()).count() >= 5
                && m.iter().filter(|m| m.schedule.is_some()).count() >= 2
        })
        .await;
    let by_id = |id: &str| msgs.iter().find(|m| m.id == id).expect(id).clone();
    assert_eq!(by_id("joins").traceparent.as_deref(), Some(TP));
    assert_eq!(by_id("own").traceparent.as_deref(), Some(OWN));
    assert_eq!(by_id("cli-own").traceparent.as_deref(), Some(OWN));
    let fresh = [trace_of(&by_id("fresh")), trace_of(&by_id("cli-fresh"))];
    let ticks: Vec<TraceContext> = msgs
        .iter()
        .filter(|m| m.schedule.is_some())
        .map(trace_of)
        .collect();
    let ids: HashSet<[u8; 16]> = fresh
        .iter()
        .chain(&ticks)
        .map(|t| t.trace_id)
        .chain([TraceContext::parse(TP, None).unwrap().trace_id])
        .collect();
    assert_eq!(
        ids.len(),
        fresh.len() + ticks.len() + 1,
        "each fresh task and each fire starts a trace of its own"
    );
    // The producer's debug line for an API task names its trace.
    eventually(WAIT, "the publish log line with the trace id", || async {
        p.logs()
            .lines()
            .any(|l| {
                l.contains("task published")
                    && l.contains("joins")
                    && l.contains("4bf92f3577b34da6a3ce929d0e0e4736")
            })
            .then_some(())
    })
    .await;
}

/// The issue's case: a task published through the API with a `traceparent`
/// header fails once and succeeds on retry; its exec handler sees exactly
/// that `traceparent` on both attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_callers_traceparent_reaches_the_exec_handler_on_every_attempt() {
    let w = World::new("trace_e2e").await;
    let out = tempfile::tempdir().unwrap();
    let mut cfg = warren_consumer::ConsumerConfig {
        amqp: warren::testing::amqp_config(),
        ..Default::default()
    };
    cfg.amqp.url = Some(warren::config::Secret::new(w.url.as_str()));
    cfg.topology.prefix = w.prefix.clone();
    cfg.http.addr = "127.0.0.1:0".parse().unwrap();
    cfg.retry.default.initial_delay = Duration::from_millis(100);
    cfg.retry.default.jitter = 0.0;
    let script = r#"echo "$WARREN_TASK_ATTEMPT $TRACEPARENT $TRACESTATE" >> "$OUT/$WARREN_TASK_ID"; [ "$WARREN_TASK_ATTEMPT" -ge 2 ]"#;
    let specs = BTreeMap::from([(
        "it.exec".to_string(),
        HandlerSpec::Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            permanent_exit_codes: vec![],
            cwd: None,
            env: BTreeMap::from([("OUT".into(), out.path().display().to_string())]),
            pass_env: Vec::new(),
            timeout: None,
        },
    )]);
    let registry =
        warren_consumer::handlers::registry_from_config(&specs, cfg.worker.task_timeout).unwrap();
    let worker = warren_consumer::Worker::builder(cfg)
        .registry(registry)
        .build()
        .unwrap();
    let health = worker.health();
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    eventually(WAIT, "worker ready", || async {
        health.is_ready().then_some(())
    })
    .await;

    let pcfg = w.write_config("p.toml", "");
    let p = w.start("producer", &pcfg, &[]);
    p.wait_ready(WAIT).await;
    let status = post(
        &p.url("/v1/tasks"),
        Some(TP),
        json!({"task": "it.exec", "id": "e2e"}),
    )
    .await;
    assert_eq!(status, 202);
    let path = out.path().join("e2e");
    let lines = eventually(WAIT, "two exec attempts", || async {
        let text = std::fs::read_to_string(&path).ok()?;
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    assert_eq!(lines, [format!("1 {TP} k=v"), format!("2 {TP} k=v")]);
    stop.cancel();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("worker stops")
        .expect("worker task")
        .expect("worker result");
}
