//! Task visibility (docs/tasks.md) end to end: an in-process worker records
//! events, producer children index them and answer `/v1/tasks...`,
//! `/v1/workers` and `tasks get|ls|wait`, on a standby too and after a
//! restart; events never carry a payload byte and never hold a task up.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use warren::testing::eventually;
use warren::Task;
use warren_consumer::{Registry, TaskError};

use crate::helpers::{Producer, World, PUBLISH_TOKEN, READ_TOKEN};

const WAIT: Duration = Duration::from_secs(60);
/// In every payload, so a test can look for it in the events stream.
const MARKER: &str = "PAYLOAD-MARKER-7f3a";

struct Worker {
    stop: CancellationToken,
    running: tokio::task::JoinHandle<()>,
    prom: prometheus::Registry,
}

impl Worker {
    async fn shut(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.running).await;
    }

    fn metric(&self, name: &str, label: Option<&str>) -> f64 {
        self.prom
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| label.is_none_or(|l| m.get_label().iter().any(|p| p.value() == l)))
            .map(|m| m.get_counter().get_value())
            .sum()
    }
}

/// A worker on `w`: `it.tasks.flaky` fails its first attempt then returns
/// a result, `it.tasks.plain` returns a result nobody keeps, `it.tasks.bad`
/// fails permanently, `it.tasks.slow` sleeps 30 s. Results kept for
/// `it.tasks.flaky` only.
async fn worker(w: &World, grace: Duration) -> Worker {
    worker_with(w, grace, None).await
}

/// [`worker`] with `security` keys; `it.tasks.echo` returns its payload as
/// its result (kept, were it not encrypted).
async fn worker_with(
    w: &World,
    grace: Duration,
    security: Option<warren::security::SecurityConfig>,
) -> Worker {
    let mut cfg = warren_consumer::ConsumerConfig {
        amqp: warren::testing::amqp_config(),
        ..Default::default()
    };
    cfg.amqp.url = Some(warren::config::Secret::new(w.url.as_str()));
    cfg.topology.prefix = w.prefix.clone();
    cfg.http.addr = "127.0.0.1:0".parse().unwrap();
    cfg.retry.default.initial_delay = Duration::from_millis(300);
    cfg.retry.default.jitter = 0.0;
    cfg.worker.drain_grace = grace;
    cfg.results = vec!["it.tasks.flaky".into(), "it.tasks.echo".into()];
    if let Some(s) = security {
        cfg.security = s;
    }
    let mut reg = Registry::new();
    reg.register_fn("it.tasks.echo", |t: Task| async move {
        let v: Value = serde_json::from_slice(&t.payload).unwrap_or(Value::Null);
        warren_consumer::set_result(v);
        Ok(())
    })
    .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    reg.register_fn("it.tasks.flaky", move |_t: Task| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                return Err(TaskError::retryable("first attempt fails"));
            }
            warren_consumer::set_result(json!({"sent": true}));
            Ok(())
        }
    })
    .unwrap();
    reg.register_fn("it.tasks.plain", |_t: Task| async {
        warren_consumer::set_result(json!({"kept": "no"}));
        Ok(())
    })
    .unwrap();
    reg.register_fn("it.tasks.bad", |_t: Task| async {
        Err(TaskError::permanent("refused for good"))
    })
    .unwrap();
    reg.register_fn("it.tasks.slow", |_t: Task| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(())
    })
    .unwrap();
    let prom = prometheus::Registry::new();
    let worker = warren_consumer::Worker::builder(cfg)
        .registry(reg)
        .prometheus(prom.clone())
        .build()
        .unwrap();
    let health = worker.health();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let running = tokio::spawn(async move {
        let _ = worker.run(s).await;
    });
    eventually(WAIT, "worker ready", || async {
        health.is_ready().then_some(())
    })
    .await;
    Worker {
        stop,
        running,
        prom,
    }
}

async fn api(p: &Producer, path: &str) -> (u16, Value) {
    let Ok(resp) = reqwest::Client::new()
        .get(p.url(path))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
    else {
        // Not listening yet (a replica starting).
        return (0, Value::Null);
    };
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body)
}

async fn publish(p: &Producer, task: &str, id: &str) {
    let resp = reqwest::Client::new()
        .post(p.url("/v1/tasks"))
        .bearer_auth(PUBLISH_TOKEN)
        .header("content-type", "application/json")
        .body(json!({"task": task, "id": id, "payload": {"secret": MARKER}}).to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 202, "{:?}", resp.text().await);
}

/// `GET /v1/tasks/{id}` once its state is `state`.
async fn task_in(p: &Producer, id: &str, state: &str) -> Value {
    eventually(
        WAIT,
        &format!("task {id} {state} on {}", p.label),
        || async {
            let (status, t) = api(p, &format!("/v1/tasks/{id}")).await;
            (status == 200 && t["state"] == state).then_some(t)
        },
    )
    .await
}

/// Every message body of the events stream, from its start.
async fn stream_bodies(w: &World) -> Vec<Vec<u8>> {
    let ch = w.conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let mut c = ch
        .basic_consume(
            format!("{}.events", w.prefix).as_str().into(),
            "it-events".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), c.next()).await {
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
        out.push(d.data);
    }
    let _ = ch.close(200, "read".into()).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_story_retry_success_dead_result_and_standby() {
    let w = World::new("tasks-story").await;
    let cfg = w.write_config("p.toml", "");
    let a = w.start("a", &cfg, &[]);
    a.wait_leader(WAIT, true).await;
    a.wait_ready(WAIT).await;
    let b = w.start("b", &cfg, &[]);
    b.wait_ready(WAIT).await;
    let wk = worker(&w, Duration::from_secs(5)).await;

    publish(&a, "it.tasks.flaky", "story-1").await;
    publish(&a, "it.tasks.plain", "story-2").await;
    publish(&a, "it.tasks.bad", "story-3").await;

    // Retried, then succeeded, its result kept: asked of the standby.
    let t = task_in(&b, "story-1", "succeeded").await;
    assert_eq!(t["name"], "it.tasks.flaky");
    assert_eq!(t["source"], "api", "{t}");
    assert_eq!(t["queue"], format!("{}.default", w.prefix));
    assert_eq!(t["trace_id"].as_str().map(str::len), Some(32), "{t}");
    let attempts = t["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{t}");
    assert_eq!(attempts[0]["outcome"], "retried");
    assert_eq!(attempts[0]["error"], "first attempt fails");
    assert_eq!(attempts[1]["outcome"], "succeeded");
    assert!(attempts[1]["consumer"].as_str().is_some(), "{t}");
    assert_eq!(t["result"], json!({"sent": true}));
    let (status, r) = api(&b, "/v1/tasks/story-1/result").await;
    assert_eq!((status, &r["result"]), (200, &json!({"sent": true})));

    // Not listed in `results`: succeeded, nothing kept.
    let t = task_in(&a, "story-2", "succeeded").await;
    assert!(t.get("result").is_none(), "{t}");
    let (status, r) = api(&a, "/v1/tasks/story-2/result").await;
    assert_eq!(
        (status, r["error"].clone()),
        (404, json!("no_result")),
        "{r}"
    );

    // Dead-lettered, with the kind and reason.
    let t = task_in(&b, "story-3", "dead").await;
    assert_eq!(t["attempts"][0]["kind"], "permanent", "{t}");
    assert!(
        t["attempts"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("refused for good"),
        "{t}"
    );

    // Lists, filters, unknown ids and bad queries.
    let (_, l) = api(&b, "/v1/tasks?state=dead&name=it.tasks.*").await;
    let ids: Vec<_> = l["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    assert_eq!(ids, [json!("story-3")], "{l}");
    let (status, e) = api(&b, "/v1/tasks/nope").await;
    assert_eq!((status, e["state"].clone()), (404, json!("unknown")), "{e}");
    let (status, e) = api(&b, "/v1/tasks?state=finished").await;
    assert_eq!(
        (status, e["parameter"].clone()),
        (400, json!("state")),
        "{e}"
    );

    // Workers: this consumer, heard on both replicas.
    let ws = eventually(WAIT, "the worker listed", || async {
        let (_, v) = api(&b, "/v1/workers").await;
        let ws = v["workers"].as_array()?.clone();
        (!ws.is_empty() && ws[0]["succeeded"].as_u64()? >= 2).then_some(ws)
    })
    .await;
    assert_eq!(ws[0]["queues"], json!([format!("{}.default", w.prefix)]));

    // No payload byte anywhere in the stream.
    let bodies = stream_bodies(&w).await;
    assert!(!bodies.is_empty());
    for body in &bodies {
        let text = String::from_utf8_lossy(body);
        assert!(!text.contains(MARKER), "payload in an event: {text}");
    }
    assert!(wk.metric("warren_events_published_total", None) > 0.0);
    wk.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_requeue_is_told_and_the_index_is_rebuilt_after_a_restart() {
    let w = World::new("tasks-requeue").await;
    let cfg = w.write_config("p.toml", "");
    let mut a = w.start("a", &cfg, &[]);
    a.wait_leader(WAIT, true).await;
    // Leading is not serving: the API answers once its own connection is up.
    a.wait_ready(WAIT).await;
    let wk = worker(&w, Duration::from_millis(300)).await;
    publish(&a, "it.tasks.slow", "slow-1").await;
    task_in(&a, "slow-1", "running").await;
    // Shutdown past the grace: the task goes back to its queue.
    wk.shut().await;
    let t = task_in(&a, "slow-1", "published").await;
    assert_eq!(t["attempts"][0]["outcome"], "requeued", "{t}");
    assert!(
        t["attempts"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("shutdown"),
        "{t}"
    );

    // A new replica process rebuilds the index from the stream.
    a.kill9();
    let a2 = w.start("a2", &cfg, &[]);
    let t = task_in(&a2, "slow-1", "published").await;
    assert_eq!(t["source"], "api", "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_deleted_under_load_tasks_still_succeed_and_drops_are_counted() {
    let w = World::new("tasks-deleted").await;
    let cfg = w.write_config("p.toml", "");
    let a = w.start("a", &cfg, &[]);
    a.wait_ready(WAIT).await;
    let wk = worker(&w, Duration::from_secs(5)).await;
    let ch = w.conn.create_channel().await.unwrap();
    ch.queue_delete(
        format!("{}.events", w.prefix).as_str().into(),
        Default::default(),
    )
    .await
    .unwrap();
    let n = 200;
    let p = warren::amqp::Publisher::new(&w.conn, Duration::from_secs(10))
        .await
        .unwrap();
    for i in 0..n {
        let t = Task::new("it.tasks.plain", &json!({"i": i}));
        p.publish_task(&w.topo, &t, Duration::ZERO).await.unwrap();
    }
    eventually(WAIT, "every task succeeded", || async {
        let done = wk.metric("warren_consumer_tasks_total", Some("succeeded"));
        (done >= f64::from(n)).then_some(())
    })
    .await;
    eventually(WAIT, "the dropped events counted", || async {
        let dropped = wk.metric("warren_events_dropped_total", Some("missing"));
        (dropped >= f64::from(n)).then_some(())
    })
    .await;
    wk.shut().await;
}

/// Run the CLI off the test's runtime threads.
async fn cli(w: &World, args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let (bin, env) = (crate::helpers::BIN, w.env());
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(&args).env_clear().env("PATH", "/usr/bin:/bin");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env("RUST_LOG", "warn")
            .output()
            .expect("run warren-producer")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_wait_exit_codes_get_ls_and_workers_from_the_cli() {
    let w = World::new("tasks-cli").await;
    let wk = worker(&w, Duration::from_secs(5)).await;
    let payload = json!({"secret": MARKER}).to_string();
    for (task, id) in [("it.tasks.flaky", "cli-1"), ("it.tasks.bad", "cli-2")] {
        let out = cli(&w, &["publish", task, "--id", id, "--payload", &payload]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = cli(&w, &["tasks", "wait", "cli-1", "--timeout", "60s"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        serde_json::from_str::<Value>(stdout.trim()).ok(),
        Some(json!({"sent": true}))
    );
    let out = cli(&w, &["tasks", "wait", "cli-2", "--timeout", "60s"]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&w, &["tasks", "wait", "never-published", "--timeout", "2s"]).await;
    assert_eq!(
        out.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = cli(&w, &["tasks", "get", "cli-1", "--json"]).await;
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (t["state"].clone(), t["source"].clone()),
        (json!("succeeded"), json!("cli"))
    );
    let out = cli(&w, &["tasks", "get", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    let out = cli(&w, &["tasks", "ls", "--state", "dead"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cli-2") && !text.contains("cli-1"), "{text}");
    let out = cli(&w, &["tasks", "ls", "--state", "finished"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = eventually(WAIT, "the worker listed by `workers`", || async {
        let out = cli(&w, &["workers", "--json"]).await;
        let ws: Value = serde_json::from_slice(&out.stdout).ok()?;
        (ws.as_array()?.len() == 1).then_some(ws)
    })
    .await;
    assert_eq!(
        out[0]["concurrency"].as_u64().map(|c| c > 0),
        Some(true),
        "{out}"
    );
    wk.shut().await;
}

/// `get`, `ls` and `wait` read the stream from their window (the stream's
/// timestamp offset), not from its start: events stored before it are not
/// read at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_the_stream_from_its_window_only() {
    let w = World::new("tasks-window").await;
    let wk = worker(&w, Duration::from_secs(5)).await;
    let out = cli(&w, &["publish", "it.tasks.plain", "--id", "win-1"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&w, &["tasks", "wait", "win-1", "--timeout", "60s"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The default window (an hour) holds it; `get` appends its marker, a
    // later chunk: the broker starts a timestamp offset at the chunk just
    // before the instant, which is then that marker, not the task's events.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = cli(&w, &["tasks", "get", "win-1", "--json"]).await;
    let t: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(t["state"], json!("succeeded"), "{t}");
    // The stream's timestamps are the broker's, in whole seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let out = cli(&w, &["tasks", "get", "win-1", "--since", "2s"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--since"), "{err}");
    let out = cli(
        &w,
        &["tasks", "wait", "win-1", "--since", "2s", "--timeout", "2s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(124));
    let out = cli(&w, &["tasks", "ls", "--json"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("win-1"), "{text}");
    let out = cli(&w, &["tasks", "ls", "--since", "2s", "--json"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("win-1"), "{text}");
    wk.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_tasks_result_and_payload_never_reach_the_stream() {
    let w = World::new("tasks-sealed").await;
    let keys = crate::security::keys(&w, "k1", true);
    let cfg = w.write_config("p.toml", &keys);
    let p = w.start("p", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let consumer_keys: warren::security::SecurityConfig = toml::from_str(
        keys.replace("[security]", "")
            .replace("sign_with = \"k1\"", "")
            .replace("encrypt_with = \"e1\"", "")
            .replace("[[security.keys]]", "[[keys]]")
            .as_str(),
    )
    .unwrap();
    let wk = worker_with(&w, Duration::from_secs(5), Some(consumer_keys)).await;
    publish(&p, "it.tasks.echo", "sealed-1").await;
    let t = task_in(&p, "sealed-1", "succeeded").await;
    assert!(
        t.get("result").is_none(),
        "an encrypted task's result kept: {t}"
    );
    for body in stream_bodies(&w).await {
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains(MARKER), "plaintext in an event: {text}");
    }
    wk.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_watch_prints_events_as_they_happen() {
    use std::io::BufRead;
    let w = World::new("tasks-watch").await;
    let wk = worker(&w, Duration::from_secs(5)).await;
    let mut cmd = std::process::Command::new(crate::helpers::BIN);
    cmd.args(["tasks", "watch", "--json"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (k, v) in w.env() {
        cmd.env(k, v);
    }
    let mut watch = cmd.spawn().expect("run tasks watch");
    let out = watch.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // `watch` starts at the stream's end: publish until it has seen one.
    let mut seen = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        for i in 0.. {
            let id = format!("watched-{i}");
            let out = cli(&w, &["publish", "it.tasks.plain", "--id", &id]).await;
            assert!(out.status.success());
            let until = tokio::time::Instant::now() + Duration::from_secs(3);
            while let Ok(Some(line)) = tokio::time::timeout_at(until, rx.recv()).await {
                let ev: Value = serde_json::from_str(&line).unwrap();
                seen.push(ev["k"].as_str().unwrap_or("").to_owned());
                if ev["id"] == id && ev["k"] == "succeeded" {
                    return;
                }
            }
        }
    })
    .await;
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(found.is_ok(), "no succeeded event watched; saw {seen:?}");
    assert!(seen.iter().any(|k| k == "started"), "{seen:?}");
    wk.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_past_the_drain_grace_is_told_as_a_requeue() {
    let w = World::new("tasks-sigterm").await;
    let cfg = w.write_config("p.toml", "");
    let p = w.start("p", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let ccfg = w.write_config(
        "c.toml",
        "[worker]\ndrain_grace = \"300ms\"\n[handlers.\"it.tasks.slow\"]\nkind = \"sleep\"\nduration = \"30s\"\n",
    );
    let bin = crate::browser::binary("warren-consumer");
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("--config").arg(ccfg).arg("run");
    for (k, v) in w.env() {
        if !k.starts_with("WARREN_API") && !k.starts_with("WARREN_LEADER") {
            cmd.env(k, v);
        }
    }
    cmd.env(
        "WARREN_HTTP_ADDR",
        format!("127.0.0.1:{}", crate::helpers::free_port()),
    );
    let consumer = warren::testing::Process::spawn(&mut cmd).expect("start warren-consumer");
    publish(&p, "it.tasks.slow", "term-1").await;
    task_in(&p, "term-1", "running").await;
    consumer.signal("TERM");
    let t = task_in(&p, "term-1", "published").await;
    assert_eq!(t["attempts"][0]["outcome"], "requeued", "{t}");
}
