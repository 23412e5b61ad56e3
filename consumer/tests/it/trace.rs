//! W3C trace context through the consumer: a task keeps its `traceparent`
//! across retries, dead-lettering and replays; one that came without gets a
//! fresh one it keeps; exec handlers see `TRACEPARENT`, http handlers
//! forward it; task log lines carry `trace_id`; with `otlp`, the attempt's
//! span is exported under the task's trace.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use lapin::BasicProperties;
use serde_json::json;
use warren::dead::{self, Selector};
use warren::envelope::headers;
use warren::testing::eventually;
use warren::trace::TraceContext;
use warren::Task;
use warren_consumer::config::HandlerSpec;
use warren_consumer::handler::TaskError;
use warren_consumer::handlers::registry_from_config;
use warren_consumer::Registry;

use crate::helpers::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const STATE: &str = "congo=t61rcWkgMzE";

/// An exec handler that appends `attempt traceparent tracestate` to
/// `$OUT/<task id>` and fails its first attempt (retryable).
fn recording_exec(out: &Path) -> HandlerSpec {
    HandlerSpec::Exec {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            r#"echo "$WARREN_TASK_ATTEMPT $TRACEPARENT ${TRACESTATE:-none}" >> "$OUT/$WARREN_TASK_ID"; [ "$WARREN_TASK_ATTEMPT" -ge 2 ]"#.into(),
        ],
        permanent_exit_codes: vec![],
        cwd: None,
        env: BTreeMap::from([("OUT".into(), out.display().to_string())]),
        pass_env: Vec::new(),
        timeout: None,
    }
}

/// The lines `recording_exec` wrote for `id`, once there are `n`.
async fn exec_lines(out: &Path, id: &str, n: usize) -> Vec<String> {
    let path = out.join(id);
    eventually(WAIT, &format!("{n} exec runs of {id}"), || async {
        let text = std::fs::read_to_string(&path).ok()?;
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        (lines.len() >= n).then_some(lines)
    })
    .await
}

fn traced(name: &str, tp: &str, state: Option<&str>) -> Task {
    let mut t = Task::new(name, &json!({"k": 1}));
    t.trace = TraceContext::parse(tp, state);
    assert!(t.trace.is_some());
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_sees_the_same_traceparent_on_every_attempt_and_a_plain_message_gets_one() {
    let out = tempfile::tempdir().unwrap();
    let specs = BTreeMap::from([("t.exec".to_string(), recording_exec(out.path()))]);
    let cfg = config("trace-exec");
    let reg = registry_from_config(&specs, cfg.worker.task_timeout).unwrap();
    let w = spawn_worker(cfg, reg).await;

    let task = traced("t.exec", TP, Some(STATE));
    w.publish(&task).await;
    let lines = exec_lines(out.path(), &task.id, 2).await;
    assert_eq!(
        lines,
        [format!("1 {TP} {STATE}"), format!("2 {TP} {STATE}")],
        "the published traceparent, unchanged, on both attempts"
    );

    // A plain client's message: no headers at all.
    let id = "plain-1";
    let props = BasicProperties::default().with_message_id(id.into());
    w.publish_raw("t.exec", props, b"{}").await;
    let lines = exec_lines(out.path(), id, 2).await;
    let first: Vec<&str> = lines[0].split(' ').collect();
    let second: Vec<&str> = lines[1].split(' ').collect();
    assert_eq!((first[0], second[0]), ("1", "2"));
    assert!(
        TraceContext::parse(first[1], None).is_some(),
        "a valid fresh traceparent: {lines:?}"
    );
    assert_eq!(first[1], second[1], "the retry keeps it");
    assert_eq!((first[2], second[2]), ("none", "none"));
    w.stop().await;
}

type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

async fn record_trace(State(seen): State<Seen>, h: HeaderMap) -> &'static str {
    let get = |k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned()
    };
    seen.lock().unwrap().push((
        get("x-warren-task-id"),
        get("traceparent"),
        get("tracestate"),
    ));
    "ok"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handler_forwards_traceparent_and_tracestate() {
    let seen: Seen = Seen::default();
    let app = Router::new()
        .route("/hook", post(record_trace))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let specs = BTreeMap::from([(
        "t.http".to_string(),
        HandlerSpec::Http {
            url: format!("http://{addr}/hook"),
            timeout: Duration::from_secs(5),
            // A configured header of the same name does not win.
            headers: BTreeMap::from([("traceparent".into(), "from-config".into())]),
            breaker: None,
        },
    )]);
    let cfg = config("trace-http");
    let reg = registry_from_config(&specs, cfg.worker.task_timeout).unwrap();
    let w = spawn_worker(cfg, reg).await;
    let task = traced("t.http", TP, Some(STATE));
    w.publish(&task).await;
    let got = eventually(WAIT, "the hook is called", || async {
        seen.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(got, (task.id.clone(), TP.to_string(), STATE.to_string()));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_replays_keep_the_trace() {
    let traces: Arc<Mutex<Vec<Option<TraceContext>>>> = Arc::default();
    let fixed = Arc::new(AtomicBool::new(false));
    let mut reg = Registry::new();
    let (t2, f2) = (traces.clone(), fixed.clone());
    reg.register_fn("t.dead", move |t: Task| {
        let (traces, fixed) = (t2.clone(), f2.clone());
        async move {
            traces.lock().unwrap().push(t.trace.clone());
            if fixed.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(TaskError::permanent("not yet"))
            }
        }
    })
    .unwrap();
    let w = spawn_worker(config("trace-dead"), reg).await;
    let dead_queue = w.topo.dead_queue();
    let runs = |n: usize| {
        let traces = traces.clone();
        async move {
            eventually(WAIT, &format!("{n} runs"), || async {
                let t = traces.lock().unwrap().clone();
                (t.len() >= n).then_some(t)
            })
            .await
        }
    };
    let dead_once = || async {
        eventually(WAIT, "one dead letter", || async {
            (queue_len(&w.conn, &dead_queue).await == 1).then_some(())
        })
        .await
    };

    // From a plain client: the consumer's fresh trace is the one kept.
    let id = "plain-dead";
    let props = BasicProperties::default().with_message_id(id.into());
    w.publish_raw("t.dead", props, b"{}").await;
    let first = runs(1).await[0].clone().expect("a trace for the handler");
    dead_once().await;
    let m = dead::inspect(&w.conn, &w.topo, id, 100)
        .await
        .unwrap()
        .expect("dead copy");
    assert_eq!(
        m.headers[headers::TRACEPARENT],
        first.traceparent().as_str()
    );

    let r = dead::replay(
        &w.conn,
        &w.topo,
        &Selector::All,
        100,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.replayed, [id]);
    assert_eq!(runs(2).await[1].as_ref(), Some(&first), "plain replay");
    dead_once().await;

    fixed.store(true, Ordering::SeqCst);
    let publisher = warren::amqp::Publisher::new(&w.conn, Duration::from_secs(10))
        .await
        .unwrap();
    let r = dead::replay_edited(
        &w.conn,
        &w.topo,
        id,
        br#"{"edited":true}"#.to_vec(),
        true,
        "ops",
        &publisher,
    )
    .await
    .unwrap();
    assert_eq!(r.replayed.len(), 1);
    assert_eq!(
        runs(3).await[2].as_ref(),
        Some(&first),
        "edited replay under a new id"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_log_lines_carry_the_trace_id() {
    let cfg = config("trace-log");
    let toml = "[handlers.\"t.noop\"]\nkind = \"noop\"\n";
    let p = spawn_process(&cfg, toml);
    p.wait_log("consuming", 1).await;
    let conn = warren::amqp::connect(&cfg.amqp, "test-client")
        .await
        .unwrap();
    let topo = warren::Topology::new(&cfg.topology);
    let publisher = warren::amqp::Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    let task = traced("t.noop", TP, None);
    publisher
        .publish_task(&topo, &task, Duration::ZERO)
        .await
        .unwrap();
    p.wait_log("noop handled task", 1).await;
    let line = p
        .events("noop handled task")
        .into_iter()
        .find(|v| v["task.id"] == task.id.as_str())
        .expect("the task's log line");
    assert_eq!(
        line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{line}"
    );
    warren::testing::delete_topology(&conn, &topo).await;
    let _ = conn.close(200, "test done".into()).await;
}

/// The collector stand-in: every body POSTed to `/v1/traces`.
#[cfg(feature = "otlp")]
async fn collect(State(bodies): State<Arc<Mutex<Vec<Vec<u8>>>>>, body: axum::body::Bytes) {
    bodies.lock().unwrap().push(body.to_vec());
}

#[cfg(feature = "otlp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exports_the_attempt_span_under_the_tasks_trace() {
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(bodies.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let out = tempfile::tempdir().unwrap();
    let cfg = config("trace-otlp");
    let toml = format!(
        "[log]\notlp_endpoint = \"http://{addr}\"\notlp_service_name = \"it-consumer\"\n\
         [handlers.\"t.exec\"]\nkind = \"exec\"\nargv = [\"/bin/sh\", \"-c\", \
         'echo \"$TRACEPARENT\" >> \"$OUT/$WARREN_TASK_ID\"']\nenv = {{ OUT = \"{}\" }}\n",
        out.path().display()
    );
    // Export every 100 ms rather than the SDK's 5 s.
    let p = spawn_process_env(&cfg, &toml, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    p.wait_log("consuming", 1).await;
    let conn = warren::amqp::connect(&cfg.amqp, "test-client")
        .await
        .unwrap();
    let topo = warren::Topology::new(&cfg.topology);
    let publisher = warren::amqp::Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    let task = traced("t.exec", TP, None);
    publisher
        .publish_task(&topo, &task, Duration::ZERO)
        .await
        .unwrap();
    let seen = exec_lines(out.path(), &task.id, 1).await;
    let handed = TraceContext::parse(&seen[0], None).expect("a valid TRACEPARENT");
    let sent = task.trace.clone().unwrap();
    assert_eq!(handed.trace_id, sent.trace_id, "the task's trace");
    assert_ne!(
        handed.parent_id, sent.parent_id,
        "with export on, the exported attempt span is the exec's parent"
    );
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    eventually(WAIT, "an export with the task's span", || async {
        let b = bodies.lock().unwrap();
        b.iter()
            .any(|b| {
                contains(b, &sent.trace_id)
                    && contains(b, &handed.parent_id)
                    && contains(b, &sent.parent_id)
                    && contains(b, b"it-consumer")
            })
            .then_some(())
    })
    .await;
    warren::testing::delete_topology(&conn, &topo).await;
    let _ = conn.close(200, "test done".into()).await;
}
