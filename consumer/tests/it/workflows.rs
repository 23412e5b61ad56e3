//! Workflows end to end: `warren-producer` processes (the coordinator runs
//! on their leader) and an in-process worker whose step handlers record
//! every run, against the real broker.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;
use warren::testing::{self, eventually, Process};
use warren::Task;
use warren_consumer::{ConsumerConfig, Registry, TaskError};

use crate::helpers::*;

const TOKEN: &str = "wf-publish-token-0123456789";

fn producer_bin() -> PathBuf {
    // Built with the workspace; this crate only gets its own binaries' paths.
    PathBuf::from(env!("CARGO_BIN_EXE_warren-consumer")).with_file_name("warren-producer")
}

/// A `warren-producer run` and its HTTP port.
struct Producer {
    process: Process,
    port: u16,
}

fn spawn_producer(cfg: &ConsumerConfig, config: &std::path::Path) -> Producer {
    let port = testing::free_port();
    let process = Process::spawn(
        Command::new(producer_bin())
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("WARREN_AMQP_URL", cfg.amqp.url_list())
            .env("WARREN_TOPOLOGY__PREFIX", &cfg.topology.prefix)
            .env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("WARREN_AMQP__HEARTBEAT", "2s")
            .env("WARREN_LEADER__RETRY_INTERVAL", "200ms")
            .env("WARREN_API__PUBLISH_TOKEN", TOKEN)
            .env("WARREN_LOG_FORMAT", "json")
            .env("RUST_LOG", "info"),
    )
    .expect("spawn warren-producer");
    Producer { process, port }
}

impl Producer {
    /// Until its API answers and is connected (`/readyz`).
    async fn ready(self) -> Self {
        let url = self.url("/readyz");
        eventually(WAIT, "producer ready", || async {
            let r = reqwest::get(url.as_str()).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        self
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_traced(path, body, None).await
    }

    async fn post_traced(&self, path: &str, body: Value, trace: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new().post(self.url(path));
        if let Some(t) = trace {
            req = req.header("traceparent", t);
        }
        let r = req
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST");
        let status = r.status().as_u16();
        let v = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or(Value::Null);
        (status, v)
    }

    async fn get(&self, path: &str) -> Option<(u16, Value)> {
        let r = reqwest::Client::new()
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, serde_json::from_str(&r.text().await.ok()?).ok()?))
    }

    /// Wait until run `id` of `wf` has `status`; the run.
    async fn wait_status(&self, wf: &str, id: &str, status: &str) -> Value {
        let path = format!("/v1/workflows/{wf}/runs/{id}");
        eventually(
            Duration::from_secs(60),
            &format!("run {id} {status}"),
            || async {
                match self.get(&path).await {
                    Some((200, v)) if v["status"] == status => Some(v),
                    _ => None,
                }
            },
        )
        .await
    }

    /// The metrics once `series` reads `value`: the coordinator consumes a
    /// start message on its own time, so a duplicate start may be counted
    /// after the run it repeats has already finished.
    async fn metrics_when(&self, series: &str, value: f64) -> String {
        eventually(
            Duration::from_secs(30),
            &format!("{series} = {value}"),
            || async {
                let m = self.metrics().await;
                (metric(&m, series) == value).then_some(m)
            },
        )
        .await
    }

    async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics")
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// One step run a handler saw: (step header, task id, payload, start, end).
type StepRun = (String, String, Value, Instant, Instant);

/// Every step run the handlers saw.
#[derive(Clone, Default)]
struct Steps {
    log: Arc<Mutex<Vec<StepRun>>>,
    /// Steps that fail permanently while listed.
    failing: Arc<Mutex<HashSet<String>>>,
    /// Steps that wait until `release` turns true.
    held: Arc<Mutex<HashSet<String>>>,
    started: Arc<Mutex<Vec<String>>>,
    release: Arc<watch::Sender<bool>>,
    /// (step, traceparent) of each run.
    traces: Arc<Mutex<Vec<(String, String)>>>,
}

impl Steps {
    fn new() -> Self {
        Self {
            release: Arc::new(watch::channel(false).0),
            ..Default::default()
        }
    }

    /// A registry with a handler for each of `tasks`.
    fn registry(&self, tasks: &[&str]) -> Registry {
        let mut reg = Registry::new();
        for name in tasks {
            let me = self.clone();
            reg.register_fn(*name, move |t: Task| {
                let me = me.clone();
                async move { me.run(t).await }
            })
            .unwrap();
        }
        reg
    }

    async fn run(&self, t: Task) -> Result<(), TaskError> {
        let step = t.step.as_ref().map(|s| s.step.clone()).unwrap_or_default();
        if let Some(c) = &t.trace {
            self.traces
                .lock()
                .unwrap()
                .push((step.clone(), c.traceparent()));
        }
        let began = Instant::now();
        self.started.lock().unwrap().push(step.clone());
        if self.held.lock().unwrap().contains(&step) {
            let mut rx = self.release.subscribe();
            let _ = rx.wait_for(|r| *r).await;
        }
        let payload: Value = serde_json::from_slice(&t.payload).unwrap_or(Value::Null);
        self.log
            .lock()
            .unwrap()
            .push((step.clone(), t.id.clone(), payload, began, Instant::now()));
        if self.failing.lock().unwrap().contains(&step) {
            return Err(TaskError::permanent(format!("{step} refuses")));
        }
        warren_consumer::set_result(json!({ "from": step }));
        Ok(())
    }

    fn runs_of(&self, step: &str) -> Vec<(String, Value, Instant, Instant)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, ..)| s == step)
            .map(|(_, id, p, a, b)| (id.clone(), p.clone(), *a, *b))
            .collect()
    }

    fn order(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.0.clone())
            .collect()
    }
}

const DIAMOND: &str = r#"
[[workflows]]
name = "diamond"
[[workflows.steps]]
name = "a"
task = "wf.a"
[[workflows.steps]]
name = "b"
task = "wf.b"
after = ["a"]
[[workflows.steps]]
name = "c"
task = "wf.c"
after = ["a"]
[[workflows.steps]]
name = "d"
task = "wf.d"
after = ["b", "c"]
"#;

fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let p = dir.path().join("producer.toml");
    std::fs::write(&p, text).unwrap();
    p
}

async fn cleanup(app: crate::helpers::App) {
    let prefix = app.topo.prefix().to_owned();
    if let Ok(ch) = app.conn.create_channel().await {
        for q in [
            "workflows",
            "producer.workflows",
            "producer.workflows.view",
            "producer.workflows.log",
            "producer.state",
            "producer.control",
        ] {
            let _ = ch
                .queue_delete(format!("{prefix}.{q}").as_str().into(), Default::default())
                .await;
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_runs_each_step_once_and_fans_in_results() {
    let cfg = config("wf_diamond");
    let steps = Steps::new();
    let app = spawn_worker(
        cfg.clone(),
        steps.registry(&["wf.a", "wf.b", "wf.c", "wf.d"]),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_producer(&cfg, &write_config(&dir, DIAMOND))
        .ready()
        .await;
    // The caller's trace: the run is its child, each step a child of the run.
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (code, v) = p
        .post_traced(
            "/v1/workflows/diamond/runs",
            json!({"input": {"day": 3}, "id": "run-1"}),
            Some(caller),
        )
        .await;
    assert_eq!((code, &v["run"]), (202, &json!("run-1")), "{v}");
    // The same run id again (a client retry): one run.
    let (code, _) = p
        .post(
            "/v1/workflows/diamond/runs",
            json!({"input": {"day": 4}, "id": "run-1"}),
        )
        .await;
    assert_eq!(code, 202);
    let run = p.wait_status("diamond", "run-1", "succeeded").await;

    for s in ["a", "b", "c", "d"] {
        let runs = steps.runs_of(s);
        assert_eq!(runs.len(), 1, "step {s} ran once: {:?}", steps.order());
        assert_eq!(runs[0].0, format!("run-1:{s}"), "deterministic task id");
    }
    let (_, d_payload, d_start, _) = steps.runs_of("d").remove(0);
    for s in ["b", "c"] {
        assert!(
            steps.runs_of(s)[0].3 <= d_start,
            "d started after {s} finished"
        );
    }
    assert_eq!(
        d_payload,
        json!({"input": {"day": 3}, "results": {"b": {"from": "b"}, "c": {"from": "c"}}})
    );
    assert_eq!(run["input"], json!({"day": 3}));
    let traces = steps.traces.lock().unwrap().clone();
    assert_eq!(traces.len(), 4);
    let parents: HashSet<&str> = traces.iter().map(|(_, t)| &t[36..52]).collect();
    assert_eq!(parents.len(), 4, "each step its own span: {traces:?}");
    for (s, t) in &traces {
        assert_eq!(&t[3..35], &caller[3..35], "{s} in the caller's trace");
        assert_ne!(&t[36..52], &caller[36..52], "{s} is not the caller's span");
    }
    assert_eq!(run["steps"][3]["result"], json!({"from": "d"}));
    assert_eq!(run["steps"][0]["state"], "succeeded");
    assert_eq!(run["steps"][0]["exec"]["attempts"], 1);
    let m = p
        .metrics_when(
            "warren_producer_workflow_messages_ignored_total{reason=\"duplicate_start\"}",
            1.0,
        )
        .await;
    assert_eq!(
        metric(
            &m,
            "warren_producer_workflow_runs_total{event=\"succeeded\",workflow=\"diamond\"}"
        ),
        1.0
    );
    testing::assert_promtool_ok(&m);
    // Unknown workflow and bad input are refused.
    assert_eq!(p.post("/v1/workflows/nope/runs", json!({})).await.0, 404);
    assert_eq!(
        p.post("/v1/workflows/diamond/runs", json!({"inptu": 1}))
            .await
            .0,
        400
    );
    cleanup(app).await;
}

const SAGA: &str = r#"
[[workflows]]
name = "saga"
[[workflows.steps]]
name = "a"
task = "wf.a"
compensate = "wf.undo"
[[workflows.steps]]
name = "b"
task = "wf.b"
after = ["a"]
compensate = "wf.undo"
[[workflows.steps]]
name = "c"
task = "wf.c"
after = ["b"]
[[workflows.steps]]
name = "d"
task = "wf.d"
after = ["c"]
max_attempts = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_step_compensates_in_reverse_order_and_resume_finishes_the_run() {
    let cfg = config("wf_saga");
    let steps = Steps::new();
    steps.failing.lock().unwrap().insert("d".into());
    let app = spawn_worker(
        cfg.clone(),
        steps.registry(&["wf.a", "wf.b", "wf.c", "wf.d", "wf.undo"]),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_producer(&cfg, &write_config(&dir, SAGA))
        .ready()
        .await;
    let (code, _) = p
        .post(
            "/v1/workflows/saga/runs",
            json!({"input": {"order": 7}, "id": "s1"}),
        )
        .await;
    assert_eq!(code, 202);
    let run = p.wait_status("saga", "s1", "compensated").await;
    assert_eq!(run["failure"]["step"], "d", "{run}");
    assert_eq!(run["failure"]["dead_kind"], "permanent", "{run}");
    assert!(
        run["failure"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("d refuses"),
        "{run}"
    );
    assert_eq!(
        steps.order(),
        ["a", "b", "c", "d", "b.compensate", "a.compensate"],
        "compensations latest first, c has none"
    );
    let (_, comp, ..) = steps.runs_of("b.compensate").remove(0);
    assert_eq!(
        comp,
        json!({"input": {"order": 7}, "step": "b", "result": {"from": "b"}})
    );
    let states: BTreeMap<String, String> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().into(),
                s["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(states["a"], "compensated");
    assert_eq!(states["c"], "succeeded");
    assert_eq!(states["d"], "failed");

    // Fixed: resume. c (succeeded, nothing undone) does not run again.
    steps.failing.lock().unwrap().clear();
    let (code, v) = p.post("/v1/workflows/saga/runs/s1/resume", json!({})).await;
    assert_eq!(code, 202, "{v}");
    let run = p.wait_status("saga", "s1", "succeeded").await;
    assert_eq!(steps.runs_of("c").len(), 1, "{:?}", steps.order());
    for s in ["a", "b", "d"] {
        let runs = steps.runs_of(s);
        assert_eq!(runs.len(), 2, "{s}: {:?}", steps.order());
        assert_eq!(
            runs[1].0,
            format!("s1:{s}:g1"),
            "a new generation's task id"
        );
    }
    assert_eq!(run["generation"], 1);
    // A succeeded run is not resumable.
    assert_eq!(
        p.post("/v1/workflows/saga/runs/s1/resume", json!({}))
            .await
            .0,
        409
    );
    let m = p.metrics().await;
    for event in ["started", "failed", "compensated", "resumed", "succeeded"] {
        let series =
            format!("warren_producer_workflow_runs_total{{event=\"{event}\",workflow=\"saga\"}}");
        assert_eq!(metric(&m, &series), 1.0, "{series}");
    }
    let series = "warren_producer_workflow_run_duration_seconds_count{result=\"compensated\",workflow=\"saga\"}";
    assert_eq!(metric(&m, series), 1.0, "{series}");
    cleanup(app).await;
}

const CHAIN: &str = r#"
[[workflows]]
name = "chain"
[[workflows.steps]]
name = "a"
task = "wf.a"
[[workflows.steps]]
name = "b"
task = "wf.b"
after = ["a"]
[[workflows.steps]]
name = "c"
task = "wf.c"
after = ["b"]
"#;

fn is_coordinating(p: &Producer) -> bool {
    !p.process.events("workflow coordinator running").is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_run_is_replaced_and_every_step_runs_once() {
    let cfg = config("wf_failover");
    let steps = Steps::new();
    steps.held.lock().unwrap().insert("b".into());
    let app = spawn_worker(cfg.clone(), steps.registry(&["wf.a", "wf.b", "wf.c"])).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, CHAIN);
    let mut replicas = vec![
        spawn_producer(&cfg, &path).ready().await,
        spawn_producer(&cfg, &path).ready().await,
    ];
    let leader = eventually(WAIT, "a coordinator", || {
        let found = replicas.iter().position(is_coordinating);
        async move { found }
    })
    .await;
    let (code, _) = replicas[leader]
        .post("/v1/workflows/chain/runs", json!({"id": "f1"}))
        .await;
    assert_eq!(code, 202);
    // b is running (held by the handler) and recorded as such when the
    // coordinator dies. (Killed between publishing b and recording it, the
    // successor would publish b again: the documented, counted corner.)
    eventually(WAIT, "step b running", || async {
        steps
            .started
            .lock()
            .unwrap()
            .contains(&"b".to_owned())
            .then_some(())
    })
    .await;
    let path = "/v1/workflows/chain/runs/f1";
    eventually(WAIT, "b recorded running", || async {
        let (_, v) = replicas[leader].get(path).await?;
        (v["steps"][1]["state"] == "running").then_some(())
    })
    .await;
    let mut dead = replicas.remove(leader);
    dead.process.child.kill().unwrap();
    dead.process.child.wait().unwrap();
    let standby = replicas.remove(0);
    eventually(WAIT, "the standby coordinates", || {
        let yes = is_coordinating(&standby);
        async move { yes.then_some(()) }
    })
    .await;
    steps.release.send_replace(true);
    standby.wait_status("chain", "f1", "succeeded").await;
    for s in ["a", "b", "c"] {
        assert_eq!(steps.runs_of(s).len(), 1, "{s}: {:?}", steps.order());
    }
    let m = standby.metrics().await;
    assert_eq!(
        metric(&m, "warren_producer_workflow_steps_republished_total"),
        0.0
    );
    cleanup(app).await;
}

/// A new coordinator resumes from the last snapshot and the log after it:
/// runs finished before a compaction stay known, a run changed after it
/// goes on, and every step still runs once. A standby answers status
/// from the runs it follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_coordinator_resumes_from_the_snapshot_and_the_log_after_it() {
    let cfg = config("wf_compact");
    let steps = Steps::new();
    let app = spawn_worker(cfg.clone(), steps.registry(&["wf.a", "wf.b", "wf.c"])).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[workflow]\ncompact_every = \"1s\"\n{CHAIN}");
    let path = write_config(&dir, &text);
    let mut replicas = vec![
        spawn_producer(&cfg, &path).ready().await,
        spawn_producer(&cfg, &path).ready().await,
    ];
    let leader = eventually(WAIT, "a coordinator", || {
        let found = replicas.iter().position(is_coordinating);
        async move { found }
    })
    .await;
    let standby = 1 - leader;
    for id in ["s1", "s2", "s3"] {
        let (code, _) = replicas[leader]
            .post("/v1/workflows/chain/runs", json!({ "id": id }))
            .await;
        assert_eq!(code, 202);
    }
    for id in ["s1", "s2", "s3"] {
        replicas[standby]
            .wait_status("chain", id, "succeeded")
            .await;
    }
    // Past a compaction (every second here): s1..s3 are in the snapshot.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    steps.held.lock().unwrap().insert("b".into());
    let (code, _) = replicas[leader]
        .post("/v1/workflows/chain/runs", json!({"id": "s4"}))
        .await;
    assert_eq!(code, 202);
    eventually(WAIT, "s4's b recorded running", || async {
        let (_, v) = replicas[standby].get("/v1/workflows/chain/runs/s4").await?;
        (v["steps"][1]["state"] == "running").then_some(())
    })
    .await;
    let mut dead = replicas.remove(leader);
    dead.process.child.kill().unwrap();
    dead.process.child.wait().unwrap();
    let next = replicas.remove(0);
    eventually(WAIT, "the standby coordinates", || {
        let yes = is_coordinating(&next);
        async move { yes.then_some(()) }
    })
    .await;
    steps.release.send_replace(true);
    next.wait_status("chain", "s4", "succeeded").await;
    for id in ["s1", "s2", "s3"] {
        next.wait_status("chain", id, "succeeded").await;
    }
    for s in ["a", "b", "c"] {
        assert_eq!(steps.runs_of(s).len(), 4, "{s}: {:?}", steps.order());
    }
    // A one-off reader (the CLI) reads the snapshot and the log after it.
    for id in ["s1", "s4"] {
        let out = Command::new(producer_bin())
            .arg("--config")
            .arg(&path)
            .args(["workflows", "status", "chain", id])
            .env("WARREN_AMQP_URL", cfg.amqp.url_list())
            .env("WARREN_TOPOLOGY__PREFIX", &cfg.topology.prefix)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("status    succeeded"), "{id}: {text}");
    }
    let m = next.metrics().await;
    assert_eq!(
        metric(&m, "warren_producer_workflow_steps_republished_total"),
        0.0
    );
    cleanup(app).await;
}

/// The pika example of docs/workflows.md, as written.
fn pika_example() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/workflows.md"))
        .unwrap();
    let code = doc.split("```python\n").nth(1).expect("python block");
    code.split("```").next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_pika_start_message_runs_a_workflow_once() {
    let python = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|py| {
            Command::new(py)
                .args(["-c", "import pika"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("python3 with pika (deploy/test.sh installs python3-pika)");
    let cfg = config("wf_pika");
    let steps = Steps::new();
    let app = spawn_worker(
        cfg.clone(),
        steps.registry(&["wf.a", "wf.b", "wf.c", "wf.d"]),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_producer(&cfg, &write_config(&dir, DIAMOND))
        .ready()
        .await;
    let script = dir.path().join("start.py");
    std::fs::write(&script, pika_example()).unwrap();
    for _ in 0..2 {
        let out = Command::new(python)
            .arg(&script)
            .env("AMQP_URL", cfg.amqp.url_list())
            .env("WARREN_WORKFLOWS_EXCHANGE", app.topo.workflows_exchange())
            .env("WARREN_WORKFLOW", "diamond")
            .env("RUN_ID", "py-1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "py-1");
    }
    let run = p.wait_status("diamond", "py-1", "succeeded").await;
    assert_eq!(run["input"], json!({"day": "2026-03-08"}));
    assert_eq!(steps.runs_of("a").len(), 1, "started twice, ran once");
    cleanup(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_starts_runs_named_by_its_fire_ids() {
    let cfg = config("wf_schedule");
    let steps = Steps::new();
    let app = spawn_worker(
        cfg.clone(),
        steps.registry(&["wf.a", "wf.b", "wf.c", "wf.d"]),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{DIAMOND}\n[[schedules]]\nname = \"every-second\"\ncron = \"* * * * * *\"\n\
         workflow = \"diamond\"\npayload = {{ from = \"cron\" }}\n"
    );
    let path = write_config(&dir, &text);
    let p = spawn_producer(&cfg, &path).ready().await;
    let run = eventually(
        Duration::from_secs(60),
        "a scheduled run succeeded",
        || async {
            let (_, v) = p.get("/v1/workflows/diamond/runs").await?;
            v["runs"]
                .as_array()?
                .iter()
                .find(|r| r["status"] == "succeeded")
                .cloned()
        },
    )
    .await;
    let id = run["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("every-second@"), "{id}");
    let full = p.wait_status("diamond", &id, "succeeded").await;
    assert_eq!(full["input"], json!({"from": "cron"}));
    // Each step task of that run ran once, under the run's id.
    assert_eq!(
        steps
            .runs_of("d")
            .iter()
            .filter(|r| r.0 == format!("{id}:d"))
            .count(),
        1
    );
    // A manual trigger starts a run too, under the trigger's id.
    let (code, v) = p
        .post("/v1/schedules/every-second/trigger", json!({}))
        .await;
    assert_eq!(code, 202, "{v}");
    let manual = v["id"].as_str().unwrap().to_owned();
    assert!(manual.starts_with("every-second@manual-"), "{manual}");
    p.wait_status("diamond", &manual, "succeeded").await;
    // The CLI shows the same run.
    let out = Command::new(producer_bin())
        .arg("--config")
        .arg(&path)
        .args(["workflows", "status", "diamond", &id])
        .env("WARREN_AMQP_URL", cfg.amqp.url_list())
        .env("WARREN_TOPOLOGY__PREFIX", &cfg.topology.prefix)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("status    succeeded"), "{text}");
    assert!(text.contains(&format!("{id}:d")), "{text}");
    cleanup(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_failed_steps_dead_letter_resumes_the_run() {
    let cfg = config("wf_replay");
    let steps = Steps::new();
    steps.failing.lock().unwrap().insert("b".into());
    let app = spawn_worker(cfg.clone(), steps.registry(&["wf.a", "wf.b", "wf.c"])).await;
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_producer(&cfg, &write_config(&dir, CHAIN))
        .ready()
        .await;
    assert_eq!(
        p.post("/v1/workflows/chain/runs", json!({"id": "r2"}))
            .await
            .0,
        202
    );
    let run = p.wait_status("chain", "r2", "failed").await;
    assert_eq!(run["failure"]["step"], "b", "{run}");
    assert_eq!(run["steps"][2]["state"], "skipped", "{run}");
    // Fixed, then the dead letter replayed from the workbench: the same task
    // id runs again, and its success resumes the run.
    steps.failing.lock().unwrap().clear();
    let (code, v) = p.post("/v1/dead/replay", json!({"ids": ["r2:b"]})).await;
    assert_eq!(code, 200, "{v}");
    let run = p.wait_status("chain", "r2", "succeeded").await;
    let b: Vec<String> = steps.runs_of("b").into_iter().map(|r| r.0).collect();
    assert_eq!(b, ["r2:b", "r2:b"]);
    assert_eq!(steps.runs_of("a").len(), 1);
    assert_eq!(steps.runs_of("c").len(), 1);
    assert_eq!(run["steps"][2]["exec"]["task_id"], "r2:c:g1", "{run}");
    let m = p.metrics().await;
    assert_eq!(
        metric(
            &m,
            "warren_producer_workflow_runs_total{event=\"resumed\",workflow=\"chain\"}"
        ),
        1.0
    );
    cleanup(app).await;
}

/// A finished run is forgotten `workflow.retention` after it finished even
/// when no other run makes the coordinator save its state: its status is
/// gone and a start with the same id runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_coordinator_forgets_finished_runs_on_time() {
    let cfg = config("wf_retention");
    let steps = Steps::new();
    let app = spawn_worker(
        cfg.clone(),
        steps.registry(&["wf.a", "wf.b", "wf.c", "wf.d"]),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[workflow]\nretention = \"3s\"\n{DIAMOND}");
    let p = spawn_producer(&cfg, &write_config(&dir, &text))
        .ready()
        .await;
    let start = json!({"input": {}, "id": "idle-1"});
    assert_eq!(
        p.post("/v1/workflows/diamond/runs", start.clone()).await.0,
        202
    );
    p.wait_status("diamond", "idle-1", "succeeded").await;
    let finished = Instant::now();
    // Nothing else happens: the coordinator must act on its own.
    eventually(Duration::from_secs(20), "run idle-1 forgotten", || async {
        matches!(
            p.get("/v1/workflows/diamond/runs/idle-1").await,
            Some((404, _))
        )
        .then_some(())
    })
    .await;
    assert!(
        finished.elapsed() >= Duration::from_secs(2),
        "forgotten before its retention ran out"
    );
    assert_eq!(p.post("/v1/workflows/diamond/runs", start).await.0, 202);
    p.wait_status("diamond", "idle-1", "succeeded").await;
    assert_eq!(
        steps.runs_of("a").len(),
        2,
        "the same id ran again after expiry"
    );
    cleanup(app).await;
}
