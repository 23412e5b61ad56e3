//! Built-in handlers wired from config, end to end through a worker; and the
//! binary refusing a bad config.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::json;
use warren::envelope::headers;
use warren::Task;
use warren_consumer::config::HandlerSpec;
use warren_consumer::handlers::registry_from_config;

use crate::helpers::*;

/// Request log: (path, task id, attempt, instant).
type Hits = Arc<Mutex<Vec<(String, String, String, Instant)>>>;

async fn hook(
    State(hits): State<Hits>,
    axum::extract::Path(mode): axum::extract::Path<String>,
    h: HeaderMap,
    body: String,
) -> (StatusCode, HeaderMap, String) {
    let get = |k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let attempt = get("x-warren-attempt");
    hits.lock().unwrap().push((
        mode.clone(),
        get("x-warren-task-id"),
        attempt.clone(),
        Instant::now(),
    ));
    assert_eq!(get("content-type"), "application/json");
    assert!(body.starts_with('{'));
    let mut out = HeaderMap::new();
    let status = match (mode.as_str(), attempt.as_str()) {
        ("ok", _) => StatusCode::NO_CONTENT,
        ("flaky", "1") => StatusCode::BAD_GATEWAY,
        ("flaky", _) => StatusCode::OK,
        ("busy", "1") => {
            out.insert("retry-after", "1".parse().unwrap());
            StatusCode::TOO_MANY_REQUESTS
        }
        ("busy", _) => StatusCode::OK,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    (status, out, "said so".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handler_classifies_statuses_and_honours_retry_after() {
    let hits: Hits = Default::default();
    let app = Router::new()
        .route("/{mode}", post(hook))
        .with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut specs = BTreeMap::new();
    for mode in ["ok", "flaky", "busy", "reject"] {
        specs.insert(
            format!("h.{mode}"),
            HandlerSpec::Http {
                url: format!("http://{addr}/{mode}"),
                timeout: Duration::from_secs(5),
                headers: BTreeMap::new(),
                breaker: None,
            },
        );
    }
    // Nothing listens on this port: a network error, retryable.
    specs.insert(
        "h.down".into(),
        HandlerSpec::Http {
            url: "http://127.0.0.1:9/".into(),
            timeout: Duration::from_secs(2),
            headers: BTreeMap::new(),
            breaker: None,
        },
    );
    let mut cfg = config("http");
    cfg.retry.default.max_attempts = 2;
    let reg = registry_from_config(&specs, cfg.worker.task_timeout).unwrap();
    let w = spawn_worker(cfg, reg).await;
    let tasks: Vec<Task> = ["ok", "flaky", "busy", "reject", "down"]
        .iter()
        .map(|m| Task::new(format!("h.{m}"), &json!({"m": m})))
        .collect();
    for t in &tasks {
        w.publish(t).await;
    }
    let dead = w.take_dead(2).await;
    let by_id = |id: &str| {
        dead.iter()
            .find(|d| d.properties.message_id().as_ref().unwrap().as_str() == id)
            .unwrap()
    };
    let reject = by_id(&tasks[3].id);
    assert_eq!(header(reject, headers::DEAD_KIND).unwrap(), "permanent");
    assert!(header(reject, headers::DEAD_REASON)
        .unwrap()
        .contains("422"));
    let down = by_id(&tasks[4].id);
    assert_eq!(header(down, headers::DEAD_KIND).unwrap(), "exhausted");
    assert_eq!(header(down, headers::ATTEMPT).unwrap(), "2");
    warren::testing::eventually(WAIT, "flaky and busy succeed on attempt 2", || async {
        let h = hits.lock().unwrap();
        let n = |m: &str| h.iter().filter(|x| x.0 == m).count();
        (n("ok") == 1 && n("flaky") == 2 && n("busy") == 2 && n("reject") == 1).then_some(())
    })
    .await;
    let h = hits.lock().unwrap().clone();
    let busy: Vec<&Instant> = h.iter().filter(|x| x.0 == "busy").map(|x| &x.3).collect();
    let gap = *busy[1] - *busy[0];
    assert!(
        gap >= Duration::from_secs(1),
        "Retry-After: 1 honoured, waited {gap:?}"
    );
    assert!(h.iter().all(|x| !x.1.is_empty()), "task id sent");
    w.stop().await;
}

#[tokio::test]
async fn bad_config_exits_non_zero_naming_file_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[worker]\nprefetch = 0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren-consumer"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("worker.prefetch") && err.contains('0'),
        "{err}"
    );
    std::fs::write(&path, "[worker]\nprefech = 3\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren-consumer"))
        .env("WARREN_CONFIG", &path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("prefech") && err.contains("line 2"), "{err}");
}

#[tokio::test]
async fn exec_handler_abandoned_by_the_worker_timeout_loses_its_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("child.pid");
    let mut specs = BTreeMap::new();
    specs.insert(
        "x.run".to_string(),
        HandlerSpec::Exec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "read payload; sh -c 'echo $$ > {}; exec sleep 60' & wait",
                    marker.display()
                ),
            ],
            permanent_exit_codes: vec![],
            cwd: None,
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            // No timeout of its own: the worker's default applies.
            timeout: None,
        },
    );
    let mut cfg = config("exec");
    cfg.worker.task_timeout = Duration::from_millis(700);
    cfg.retry.default.max_attempts = 1;
    let reg = registry_from_config(&specs, cfg.worker.task_timeout).unwrap();
    let w = spawn_worker(cfg, reg).await;
    w.publish(&Task::new("x.run", &json!({"go": true}))).await;
    let dead = w.take_dead(1).await;
    // The worker and the handler enforce the same timeout; either may fire.
    let err = header(&dead[0], headers::LAST_ERROR).unwrap();
    assert!(err.contains("timed out after 700ms"), "{err}");
    let pid: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    warren::testing::eventually(WAIT, "grandchild killed", || async {
        let gone = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat.contains(") Z "),
        };
        gone.then_some(())
    })
    .await;
    w.stop().await;
}

fn exec_spec(script: &str, timeout: Option<Duration>, pass_env: &[&str]) -> HandlerSpec {
    HandlerSpec::Exec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        permanent_exit_codes: vec![],
        cwd: None,
        env: BTreeMap::new(),
        pass_env: pass_env.iter().map(|s| s.to_string()).collect(),
        timeout,
    }
}

#[tokio::test]
async fn timeout_header_lengthens_an_exec_handlers_configured_timeout() {
    let mut specs = BTreeMap::new();
    specs.insert(
        "x.slow".to_string(),
        exec_spec("sleep 2", Some(Duration::from_secs(1)), &[]),
    );
    let mut cfg = config("exec_timeout");
    cfg.retry.default.max_attempts = 1;
    let reg = registry_from_config(&specs, cfg.worker.task_timeout).unwrap();
    let w = spawn_worker(cfg, reg).await;
    let mut longer = Task::new("x.slow", &json!({}));
    longer.timeout = Some(Duration::from_millis(4000));
    let plain = Task::new("x.slow", &json!({}));
    w.publish(&longer).await;
    w.publish(&plain).await;
    let dead = w.take_dead(1).await;
    assert_eq!(
        dead[0].properties.message_id().as_ref().unwrap().as_str(),
        plain.id,
        "only the task without the header times out"
    );
    let err = header(&dead[0], headers::LAST_ERROR).unwrap();
    assert!(err.contains("timed out after 1s"), "{err}");
    warren::testing::eventually(WAIT, "the 4 s task succeeded", || async {
        (w.counter(
            "warren_consumer_tasks_total",
            &[("task", "x.slow"), ("outcome", "succeeded")],
        ) == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(queue_len(&w.conn, &w.topo.dead_queue()).await, 0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_handlers_do_not_inherit_warren_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let dump = |name: &str| dir.path().join(format!("{name}.env"));
    // Written whole, then renamed: the test never reads half a dump.
    let script = |name: &str| {
        let f = dump(name);
        format!("env > {0}.tmp && mv {0}.tmp {0}", f.display())
    };
    let toml = format!(
        "[handlers.\"env.plain\"]\nkind = \"exec\"\nargv = [\"/bin/sh\", \"-c\", {plain:?}]\n\
         [handlers.\"env.opted\"]\nkind = \"exec\"\nargv = [\"/bin/sh\", \"-c\", {opted:?}]\n\
         pass_env = [\"SECRET_X\", \"WARREN_AMQP_URL\"]\n",
        plain = script("plain"),
        opted = script("opted"),
    );
    let cfg = config("exec_env");
    let url = cfg.amqp.url_list();
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, pw)| pw.to_owned())
        .expect("the test broker URL has a password");
    let p = spawn_process_env(&cfg, &toml, &[("SECRET_X", "1")]);
    p.wait_log("consuming", 1).await;
    let conn = warren::amqp::connect(&cfg.amqp, "test-client")
        .await
        .unwrap();
    let topo = warren::Topology::new(&cfg.topology);
    let publisher = warren::amqp::Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    for name in ["env.plain", "env.opted"] {
        publisher
            .publish_task(&topo, &Task::new(name, &json!({})), Duration::ZERO)
            .await
            .unwrap();
    }
    let read = |name: &str| {
        let path = dump(name);
        async move { std::fs::read_to_string(path).ok() }
    };
    let plain = warren::testing::eventually(WAIT, "plain env dump", || read("plain")).await;
    let opted = warren::testing::eventually(WAIT, "opted env dump", || read("opted")).await;
    let has = |dump: &str, var: &str| dump.lines().any(|l| l.starts_with(&format!("{var}=")));
    assert!(!has(&plain, "WARREN_AMQP_URL"), "{plain}");
    assert!(!has(&plain, "SECRET_X"), "{plain}");
    assert!(!plain.contains(&format!(":{password}@")), "password leaked");
    assert!(
        plain
            .lines()
            .all(|l| !l.starts_with("WARREN_") || l.starts_with("WARREN_TASK_")),
        "{plain}"
    );
    assert!(
        has(&plain, "PATH") && has(&plain, "WARREN_TASK_ID"),
        "{plain}"
    );
    assert!(
        has(&opted, "SECRET_X") && has(&opted, "WARREN_AMQP_URL"),
        "{opted}"
    );
    drop(p);
    warren::testing::delete_topology(&conn, &topo).await;
    let _ = conn.close(200, "test done".into()).await;
}

/// As a workflow step, the `http` handler's JSON response body is the step's
/// result, carried in the step's event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handler_json_response_is_a_steps_result() {
    let app = Router::new().route(
        "/json",
        post(|| async {
            (
                [("content-type", "application/json")],
                r#"{"url":"s3://r/1"}"#,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut specs = BTreeMap::new();
    specs.insert(
        "h.json".to_owned(),
        HandlerSpec::Http {
            url: format!("http://{addr}/json"),
            timeout: Duration::from_secs(5),
            headers: BTreeMap::new(),
            breaker: None,
        },
    );
    let cfg = config("http_result");
    let reg = registry_from_config(&specs, cfg.worker.task_timeout).unwrap();
    let w = spawn_worker(cfg, reg).await;
    let mut t = Task::new("h.json", &json!({}));
    t.step = Some(warren::envelope::StepRef {
        workflow: "w".into(),
        run: "r".into(),
        step: "upload".into(),
    });
    w.publish(&t).await;
    let ev = warren::testing::take_one(&w.conn, &w.topo.workflows_queue(), WAIT).await;
    let ev: warren::workflow::StepEvent = serde_json::from_slice(&ev.data).unwrap();
    assert_eq!(ev.task_id, t.id);
    assert_eq!(ev.result, Some(json!({"url": "s3://r/1"})));
    w.stop().await;
}
