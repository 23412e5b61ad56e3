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
            // The handler's own timeout is long: the worker's must win.
            timeout: Some(Duration::from_secs(120)),
        },
    );
    let mut cfg = config("exec");
    cfg.worker.task_timeout = Duration::from_millis(700);
    cfg.retry.default.max_attempts = 1;
    let reg = registry_from_config(&specs, cfg.worker.task_timeout).unwrap();
    let w = spawn_worker(cfg, reg).await;
    w.publish(&Task::new("x.run", &json!({"go": true}))).await;
    let dead = w.take_dead(1).await;
    assert_eq!(
        header(&dead[0], headers::LAST_ERROR).unwrap(),
        "timed out after 700ms"
    );
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
