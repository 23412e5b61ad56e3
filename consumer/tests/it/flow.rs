//! Flow control against a real broker: a rate limit holds its tasks to
//! their rate without holding back other tasks on the same queue, a
//! concurrency limit caps running tasks, an `http` handler's circuit breaker
//! opens on a failing server, keeps away from it for the cool-down and
//! closes on a good probe; bad `limits` and `breaker` values exit 2.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::json;
use warren::testing::eventually;
use warren::Task;
use warren_consumer::config::{BreakerSpec, HandlerSpec, LimitSpec};
use warren_consumer::handlers::registry_from_config;
use warren_consumer::{Registry, TaskError};

use crate::cli::exits;
use crate::helpers::*;

/// Each test's deadline for a whole backlog (400 tasks at 20/s take 20 s).
const BACKLOG: Duration = Duration::from_secs(120);

fn register_recording(reg: &mut Registry, name: &str, runs: &Runs) {
    let r = runs.clone();
    reg.register_fn(name, move |t| {
        let r = r.clone();
        async move {
            r.record(&t);
            Ok(())
        }
    })
    .unwrap();
}

/// The worker's metrics as `/metrics` serves them hold `names` and pass
/// `promtool check metrics`.
fn assert_metrics_lint(app: &App, names: &[&str]) {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&app.prom.gather())
        .unwrap();
    for name in names {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    warren::testing::assert_promtool_ok(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_paces_its_tasks_and_holds_back_no_other_task() {
    let mut cfg = config("rate");
    cfg.limits.insert(
        "r.limited".into(),
        LimitSpec {
            rate: Some("20/s".into()),
            ..Default::default()
        },
    );
    let (limited, other) = (Runs::default(), Runs::default());
    let mut reg = Registry::new();
    register_recording(&mut reg, "r.limited", &limited);
    register_recording(&mut reg, "r.other", &other);
    let app = spawn_worker(cfg, reg).await;
    for i in 0..400 {
        app.publish(&Task::new("r.limited", &json!({ "i": i })))
            .await;
    }
    for i in 0..20 {
        app.publish(&Task::new("r.other", &json!({ "i": i }))).await;
    }
    // Published behind the whole flood, they still run long before it is
    // through: waiting limited tasks hold only a share of the worker.
    other.wait_total(20).await;
    let started = limited.total();
    assert!(
        started < 300,
        "the other tasks ran only after {started} of 400 limited ones"
    );
    let l = limited.clone();
    eventually(BACKLOG, "400 limited tasks started", || {
        let l = l.clone();
        async move { (l.total() >= 400).then_some(()) }
    })
    .await;
    let log = limited.0.lock().unwrap().clone();
    assert_eq!(log.len(), 400, "each limited task ran");
    assert!(log.values().all(|runs| runs.len() == 1), "once each");
    let mut starts: Vec<Instant> = log.values().map(|r| r[0].1).collect();
    starts.sort();
    // Ten seconds of steady state, after the first burst of deliveries.
    let from = starts[0] + Duration::from_secs(2);
    let to = from + Duration::from_secs(10);
    let in_window = starts.iter().filter(|t| **t >= from && **t < to).count();
    eprintln!("rate limit 20/s: {in_window} tasks started in a 10 s window");
    assert!(
        (180..=220).contains(&in_window),
        "{in_window} started in 10 s at 20/s"
    );
    let limit = [("limit", "r.limited")];
    let parked = app.counter(
        "warren_consumer_limited_total",
        &[limit[0], ("action", "parked")],
    );
    assert!(parked > 0.0, "a flood this size is parked, not all held");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_caps_running_tasks_and_all_complete() {
    let mut cfg = config("concurrency");
    cfg.limits.insert(
        "c.*".into(),
        LimitSpec {
            concurrency: Some(2),
            ..Default::default()
        },
    );
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let runs = Runs::default();
    let mut reg = Registry::new();
    let (r, m, log) = (running.clone(), most.clone(), runs.clone());
    reg.register_fn("c.sleep", move |t| {
        let (r, m, log) = (r.clone(), m.clone(), log.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            // The handler's own work: long enough for runs to overlap.
            tokio::time::sleep(Duration::from_millis(100)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            log.record(&t);
            Ok::<(), TaskError>(())
        }
    })
    .unwrap();
    let app = spawn_worker(cfg, reg).await;
    let tasks: Vec<Task> = (0..30)
        .map(|i| Task::new("c.sleep", &json!({ "i": i })))
        .collect();
    for t in &tasks {
        app.publish(t).await;
    }
    let r = runs.clone();
    eventually(BACKLOG, "30 tasks done", || {
        let r = r.clone();
        async move { (r.total() >= 30).then_some(()) }
    })
    .await;
    for t in &tasks {
        assert_eq!(runs.of(&t.id).len(), 1, "each task once");
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "at most 2 at once, and 2 used"
    );
    let waited = app.counter(
        "warren_consumer_limited_total",
        &[("limit", "c.*"), ("action", "waited")],
    );
    assert!(waited > 0.0, "tasks waited for the limit");
    assert_metrics_lint(
        &app,
        &[r#"warren_consumer_limited_total{action="waited",limit="c.*"}"#],
    );
    app.stop().await;
}

/// Requests seen: (arrival, task id, status answered).
type Seen = Arc<Mutex<Vec<(Instant, String, u16)>>>;

/// Fails the first `failing` requests with 500, then answers 204.
async fn flaky_target(State((seen, failing)): State<(Seen, usize)>, h: HeaderMap) -> StatusCode {
    let id = h
        .get("x-warren-task-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut seen = seen.lock().unwrap();
    let status = if seen.len() < failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    };
    seen.push((Instant::now(), id, status.as_u16()));
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_on_failures_keeps_away_for_the_cooldown_and_closes_on_a_good_probe() {
    const FAILURES: usize = 3;
    const COOLDOWN: Duration = Duration::from_secs(2);
    // Three failures open it; the first probe fails too, the second succeeds.
    let seen: Seen = Default::default();
    let server = Router::new()
        .route("/", post(flaky_target))
        .with_state((seen.clone(), FAILURES + 1));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, server).await });

    let mut cfg = config("breaker");
    // One task at a time: no request can be in flight when the breaker opens.
    cfg.worker.concurrency = 1;
    cfg.retry.default.max_attempts = 10;
    let mut specs = BTreeMap::new();
    specs.insert(
        "b.call".to_string(),
        HandlerSpec::Http {
            url: format!("http://{addr}/"),
            timeout: Duration::from_secs(5),
            headers: BTreeMap::new(),
            breaker: Some(BreakerSpec {
                failures: FAILURES as u32,
                cooldown: COOLDOWN,
                ..Default::default()
            }),
        },
    );
    cfg.handlers = specs.clone();
    let reg = registry_from_config(&specs, cfg.worker.task_timeout).unwrap();
    let mut app = spawn_worker(cfg, reg).await;
    let state = |app: &App| app.counter("warren_consumer_breaker_state", &[("handler", "b.call")]);
    assert_eq!(state(&app), 0.0, "closed at start");
    let tasks: Vec<Task> = (0..10)
        .map(|i| Task::new("b.call", &json!({ "i": i })))
        .collect();
    for t in &tasks {
        app.publish(t).await;
    }
    eventually(WAIT, "breaker open", || async {
        (state(&app) == 1.0).then_some(())
    })
    .await;
    let s = seen.clone();
    eventually(BACKLOG, "every task answered 204", || {
        let s = s.clone();
        let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
        async move {
            let s = s.lock().unwrap();
            ids.iter()
                .all(|id| s.iter().any(|(_, i, st)| i == id && *st == 204))
                .then_some(())
        }
    })
    .await;
    eventually(WAIT, "breaker closed", || async {
        (state(&app) == 0.0).then_some(())
    })
    .await;
    app.halt().await;
    let seen = seen.lock().unwrap().clone();
    // Open after the third failure: nothing reached the server for the
    // cool-down, then one probe (failed: open again), then the next probe.
    for (before, probe) in [(FAILURES - 1, FAILURES), (FAILURES, FAILURES + 1)] {
        let gap = seen[probe].0 - seen[before].0;
        assert!(
            gap >= COOLDOWN,
            "request {probe} came {gap:?} after request {before}, within the cool-down"
        );
    }
    let mut ok: HashMap<&str, usize> = HashMap::new();
    for (_, id, st) in &seen {
        if *st == 204 {
            *ok.entry(id.as_str()).or_default() += 1;
        }
    }
    for t in &tasks {
        assert_eq!(
            ok.get(t.id.as_str()),
            Some(&1),
            "task {} succeeded once",
            t.id
        );
    }
    assert_eq!(queue_len(&app.conn, &app.topo.dead_queue()).await, 0);
    let parked = app.counter(
        "warren_consumer_breaker_parked_total",
        &[("handler", "b.call")],
    );
    assert!(parked > 0.0, "tasks were parked while it was open");
    assert_metrics_lint(
        &app,
        &[
            r#"warren_consumer_breaker_state{handler="b.call"} 0"#,
            "warren_consumer_breaker_parked_total",
        ],
    );
    app.stop().await;
}

#[test]
fn bad_limits_and_breakers_exit_2_in_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[limits.\"email.*\"]\nrate = \"fast\"\n",
            "limits.\"email.*\".rate = \"fast\": expected tasks per second",
        ),
        (
            "[limits.\"email.*\"]\nconcurrency = 0\n",
            "limits.\"email.*\".concurrency = 0: must be within 1..=100000",
        ),
        (
            "[handlers.h]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\n[handlers.h.breaker]\nfailures = 0\n",
            "handlers.\"h\".breaker.failures = 0",
        ),
    ];
    for (i, (text, names)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        for cmd in ["check", "run"] {
            let out = exits(&["--config", &path, cmd], &[]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{text} {cmd}: {err}");
            assert!(err.contains(names), "{text} {cmd}: {err}");
        }
    }
}
