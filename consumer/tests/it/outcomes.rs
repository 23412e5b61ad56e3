//! Outcome → ack: success, retries with growing delays, exhaustion,
//! permanent errors, timeouts, panics, poison messages; metrics and /readyz.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use warren::envelope::headers;
use warren::testing::eventually;
use warren::Task;
use warren_consumer::{Registry, TaskError};

use crate::helpers::*;

#[tokio::test]
async fn success_acks_each_task_once() {
    let (reg, runs) = recording("t.ok");
    let app = spawn_worker(config("success"), reg).await;
    let tasks: Vec<Task> = (0..20)
        .map(|i| Task::new("t.ok", &json!({ "i": i })))
        .collect();
    for t in &tasks {
        app.publish(t).await;
    }
    runs.wait_total(20).await;
    for t in &tasks {
        assert_eq!(runs.of(&t.id).len(), 1, "task {} ran once", t.id);
    }
    eventually(WAIT, "20 succeeded", || async {
        (app.counter(
            "warren_consumer_tasks_total",
            &[("task", "t.ok"), ("outcome", "succeeded")],
        ) == 20.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        app.counter("warren_consumer_deliveries_total", &[("task", "t.ok")]),
        20.0
    );
    assert_eq!(
        app.counter("warren_consumer_queue_wait_seconds", &[("task", "t.ok")]),
        20.0
    );
    assert_eq!(app.counter("warren_consumer_in_flight", &[]), 0.0);
    assert_eq!(queue_len(&app.conn, &app.queue()).await, 0);
    assert_eq!(queue_len(&app.conn, &app.topo.dead_queue()).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn retry_then_success_with_growing_delays() {
    let runs = Runs::default();
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut reg = Registry::new();
    let (r, errs) = (runs.clone(), errors.clone());
    reg.register_fn("t.flaky", move |t| {
        let (r, errs) = (r.clone(), errs.clone());
        async move {
            r.record(&t);
            errs.lock().unwrap().push(t.last_error.clone());
            if t.attempt < 3 {
                Err(TaskError::retryable(format!("flaky {}", t.attempt)))
            } else {
                Ok(())
            }
        }
    })
    .unwrap();
    let mut cfg = config("retry");
    cfg.retry.default.max_attempts = 5;
    cfg.retry.default.initial_delay = Duration::from_millis(300);
    let app = spawn_worker(cfg, reg).await;
    let task = Task::new("t.flaky", &json!({}));
    app.publish(&task).await;
    runs.wait_total(3).await;
    let seen = runs.of(&task.id);
    let attempts: Vec<u32> = seen.iter().map(|(a, _)| *a).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    let gap1 = seen[1].1 - seen[0].1;
    let gap2 = seen[2].1 - seen[1].1;
    assert!(gap1 >= Duration::from_millis(300), "first backoff {gap1:?}");
    assert!(
        gap2 >= Duration::from_millis(600),
        "second backoff {gap2:?}"
    );
    // Each wait is at least its backoff (300 ms, then 600 ms): the delays grow.
    assert_eq!(
        *errors.lock().unwrap(),
        vec![
            None,
            Some("flaky 1".to_string()),
            Some("flaky 2".to_string())
        ]
    );
    eventually(WAIT, "outcome counters", || async {
        let retried = app.counter(
            "warren_consumer_tasks_total",
            &[("task", "t.flaky"), ("outcome", "retried")],
        );
        let ok = app.counter(
            "warren_consumer_tasks_total",
            &[("task", "t.flaky"), ("outcome", "succeeded")],
        );
        (retried == 2.0 && ok == 1.0).then_some(())
    })
    .await;
    assert_eq!(queue_len(&app.conn, &app.topo.dead_queue()).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn exhaustion_dead_letters_with_headers() {
    let runs = Runs::default();
    let mut reg = Registry::new();
    let r = runs.clone();
    reg.register_fn("t.broken", move |t| {
        let r = r.clone();
        async move {
            r.record(&t);
            Err(TaskError::retryable("still broken"))
        }
    })
    .unwrap();
    let app = spawn_worker(config("exhaust"), reg).await;
    let mut task = Task::new("t.broken", &json!({"x": 1}));
    task.extra_headers
        .insert("x-user-header".into(), AMQPValue::LongString("kept".into()));
    app.publish(&task).await;
    let dead = app.take_dead(1).await;
    let d = &dead[0];
    assert_eq!(runs.of(&task.id).len(), 3, "max_attempts = 3");
    assert_eq!(
        header(d, headers::DEAD_REASON).unwrap(),
        "attempts exhausted (3 of 3): still broken"
    );
    assert_eq!(header(d, headers::DEAD_KIND).unwrap(), "exhausted");
    assert_eq!(header(d, headers::ATTEMPT).unwrap(), "3");
    assert_eq!(header(d, headers::LAST_ERROR).unwrap(), "still broken");
    assert_eq!(header(d, headers::ORIGINAL_QUEUE).unwrap(), app.queue());
    // The task's own key, not the delay-level key the last retry came with.
    assert_eq!(
        header(d, headers::ORIGINAL_ROUTING_KEY).unwrap(),
        "t.broken"
    );
    let first = header(d, headers::FIRST_FAILED_AT).unwrap();
    let at = header(d, headers::DEAD_AT).unwrap();
    let first = chrono::DateTime::parse_from_rfc3339(&first).unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(&at).unwrap();
    assert!(first < at, "{first} before {at}");
    assert_eq!(header(d, "x-user-header").unwrap(), "kept");
    assert_eq!(
        d.properties.message_id().as_ref().unwrap().as_str(),
        task.id
    );
    assert_eq!(d.properties.kind().as_ref().unwrap().as_str(), "t.broken");
    assert_eq!(d.properties.delivery_mode(), &Some(2));
    assert_eq!(d.routing_key.as_str(), "t.broken");
    assert_eq!(d.data, task.payload);
    eventually(WAIT, "dead_lettered counter", || async {
        (app.counter(
            "warren_consumer_tasks_total",
            &[("task", "t.broken"), ("outcome", "dead_lettered")],
        ) == 1.0)
            .then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn header_overrides_max_attempts() {
    let runs = Runs::default();
    let mut reg = Registry::new();
    let r = runs.clone();
    reg.register_fn("t.broken", move |t| {
        let r = r.clone();
        async move {
            r.record(&t);
            Err(TaskError::retryable("no"))
        }
    })
    .unwrap();
    let app = spawn_worker(config("override"), reg).await;
    let mut task = Task::new("t.broken", &json!({}));
    task.max_attempts = Some(2);
    task.retry.initial_delay = Some(Duration::from_millis(100));
    app.publish(&task).await;
    let d = app.take_dead(1).await;
    assert_eq!(header(&d[0], headers::ATTEMPT).unwrap(), "2");
    assert_eq!(runs.of(&task.id).len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn permanent_error_dead_letters_on_first_failure() {
    let runs = Runs::default();
    let mut reg = Registry::new();
    let r = runs.clone();
    reg.register_fn("t.perm", move |t| {
        let r = r.clone();
        async move {
            r.record(&t);
            Err(TaskError::permanent("invalid address"))
        }
    })
    .unwrap();
    let app = spawn_worker(config("permanent"), reg).await;
    let task = Task::new("t.perm", &json!({}));
    app.publish(&task).await;
    let d = app.take_dead(1).await;
    assert_eq!(runs.of(&task.id).len(), 1);
    assert_eq!(header(&d[0], headers::DEAD_KIND).unwrap(), "permanent");
    assert_eq!(
        header(&d[0], headers::DEAD_REASON).unwrap(),
        "permanent error: invalid address"
    );
    assert_eq!(header(&d[0], headers::ATTEMPT).unwrap(), "1");
    app.stop().await;
}

#[tokio::test]
async fn timeout_counts_as_retryable_failure() {
    let runs = Runs::default();
    let mut reg = Registry::new();
    let r = runs.clone();
    reg.register_fn("t.slow", move |t| {
        let r = r.clone();
        async move {
            r.record(&t);
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
    })
    .unwrap();
    let mut cfg = config("timeout");
    cfg.worker.task_timeout = Duration::from_millis(300);
    cfg.retry.default.max_attempts = 2;
    let app = spawn_worker(cfg, reg).await;
    let task = Task::new("t.slow", &json!({}));
    app.publish(&task).await;
    // A second task whose header shortens its own timeout further.
    let mut short = Task::new("t.slow", &json!({}));
    short.timeout = Some(Duration::from_millis(100));
    short.max_attempts = Some(1);
    app.publish(&short).await;
    let dead = app.take_dead(2).await;
    for d in &dead {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .to_owned();
        let err = header(d, headers::LAST_ERROR).unwrap();
        if id == task.id {
            assert_eq!(err, "timed out after 300ms");
            assert_eq!(runs.of(&id).len(), 2);
        } else {
            assert_eq!(id, short.id);
            assert_eq!(err, "timed out after 100ms");
            assert_eq!(runs.of(&id).len(), 1);
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn panic_is_retried_and_the_worker_survives() {
    let runs = Runs::default();
    let mut reg = Registry::new();
    let r = runs.clone();
    reg.register_fn("t.panic", move |t| {
        let r = r.clone();
        async move {
            r.record(&t);
            if t.attempt == 1 {
                panic!("handler bug");
            }
            Ok(())
        }
    })
    .unwrap();
    let app = spawn_worker(config("panic"), reg).await;
    let task = Task::new("t.panic", &json!({}));
    app.publish(&task).await;
    runs.wait_total(2).await;
    eventually(WAIT, "succeeded after panic", || async {
        (app.counter(
            "warren_consumer_tasks_total",
            &[("task", "t.panic"), ("outcome", "succeeded")],
        ) == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        app.counter(
            "warren_consumer_tasks_total",
            &[("task", "t.panic"), ("outcome", "retried")]
        ),
        1.0
    );
    assert!(app.health.is_ready());
    app.stop().await;
}

#[tokio::test]
async fn every_poison_kind_is_dead_lettered_at_once() {
    let (reg, runs) = recording("t.good");
    let mut cfg = config("poison");
    cfg.worker.max_body_bytes = 1024;
    let app = spawn_worker(cfg, reg).await;
    let props = |id: &str| BasicProperties::default().with_message_id(id.into());
    app.publish_raw("t.good", props("json"), b"{not json").await;
    app.publish_raw(
        "t.good",
        props("big"),
        format!("\"{}\"", "x".repeat(2000)).as_bytes(),
    )
    .await;
    app.publish_raw("t.unknown", props("unknown"), b"{}").await;
    let mut h = FieldTable::default();
    h.insert(
        headers::ATTEMPT.into(),
        AMQPValue::LongString("three".into()),
    );
    app.publish_raw("t.good", props("header").with_headers(h), b"{}")
        .await;
    // Poison must not stall the worker: a good task still runs.
    let good = Task::new("t.good", &json!({}));
    app.publish(&good).await;
    let dead = app.take_dead(4).await;
    let mut kinds: Vec<(String, String, String)> = dead
        .iter()
        .map(|d| {
            (
                d.properties
                    .message_id()
                    .as_ref()
                    .unwrap()
                    .as_str()
                    .to_owned(),
                header(d, headers::DEAD_KIND).unwrap(),
                header(d, headers::DEAD_REASON).unwrap(),
            )
        })
        .collect();
    kinds.sort();
    let k: Vec<(&str, &str)> = kinds
        .iter()
        .map(|(i, k, _)| (i.as_str(), k.as_str()))
        .collect();
    assert_eq!(
        k,
        vec![
            ("big", "oversized"),
            ("header", "bad_header"),
            ("json", "invalid_json"),
            ("unknown", "no_handler"),
        ]
    );
    assert!(kinds[0].2.contains("1024-byte limit"), "{kinds:?}");
    assert!(kinds[1].2.contains("x-warren-attempt"), "{kinds:?}");
    assert_eq!(kinds[3].2, "no handler for task `t.unknown`");
    // The undecodable body is kept byte for byte.
    let json = dead
        .iter()
        .find(|d| d.properties.message_id().as_ref().unwrap().as_str() == "json")
        .unwrap();
    assert_eq!(json.data, b"{not json");
    runs.wait_total(1).await;
    eventually(WAIT, "rejected counted under <unknown>", || async {
        (app.counter(
            "warren_consumer_tasks_total",
            &[("task", "<unknown>"), ("outcome", "rejected")],
        ) == 4.0)
            .then_some(())
    })
    .await;
    assert_eq!(runs.total(), 1);
    assert_eq!(queue_len(&app.conn, &app.queue()).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn metrics_pass_promtool_and_readyz_follows_the_worker() {
    let mut reg = Registry::new();
    let n = Arc::new(AtomicU32::new(0));
    let c = n.clone();
    reg.register_fn("t.m", move |_| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    })
    .unwrap();
    let app = spawn_worker(config("metrics"), reg).await;
    let router = warren::metrics::ops_router(app.prom.clone(), app.health.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, _srv) = warren::metrics::serve("127.0.0.1:0".parse().unwrap(), router, stop.clone())
        .await
        .unwrap();
    app.publish(&Task::new("t.m", &json!({}))).await;
    app.publish_raw("t.m", BasicProperties::default(), b"nope")
        .await;
    let _ = app.take_dead(1).await;
    eventually(WAIT, "task ran", || async {
        (n.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let text = eventually(WAIT, "outcomes in /metrics", || async {
        let t = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (t.contains(r#"warren_consumer_tasks_total{outcome="succeeded",task="t.m"} 1"#)
            && t.contains(r#"warren_consumer_tasks_total{outcome="rejected",task="<unknown>"} 1"#))
        .then_some(t)
    })
    .await;
    for name in [
        "warren_consumer_deliveries_total",
        "warren_consumer_task_duration_seconds_bucket",
        "warren_consumer_queue_wait_seconds_bucket",
        "warren_consumer_in_flight",
        "warren_amqp_connected 1",
        "warren_amqp_reconnects_total 0",
        "warren_amqp_blocked 0",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    warren::testing::assert_promtool_ok(&text);
    let health = app.health.clone();
    app.stop().await;
    assert!(!health.is_ready());
    let r = client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    stop.cancel();
}

#[tokio::test]
async fn quorum_queues_run_retry_and_dead_letter() {
    let runs = Runs::default();
    let mut reg = Registry::new();
    let r = runs.clone();
    reg.register_fn("t.q", move |t| {
        let r = r.clone();
        async move {
            r.record(&t);
            Err(TaskError::retryable("again"))
        }
    })
    .unwrap();
    let mut cfg = config("quorum");
    cfg.topology = warren::testing::topology_config("quorum", warren::config::QueueType::Quorum);
    let app = spawn_worker(cfg, reg).await;
    let task = Task::new("t.q", &json!({}));
    app.publish(&task).await;
    let d = app.take_dead(1).await;
    assert_eq!(header(&d[0], headers::DEAD_KIND).unwrap(), "exhausted");
    assert_eq!(runs.of(&task.id).len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn consumes_only_the_selected_queues() {
    let (reg, runs) = {
        let runs = Runs::default();
        let r = runs.clone();
        let mut reg = Registry::new();
        reg.register_fn("email.send", move |t| {
            let r = r.clone();
            async move {
                r.record(&t);
                Ok(())
            }
        })
        .unwrap();
        (reg, runs)
    };
    let mut cfg = config("select");
    cfg.topology.queues.push(warren::config::QueueConfig {
        name: "q.emails".into(),
        bindings: vec!["email.*".into()],
        max_priority: Some(0),
    });
    cfg.worker.queues = vec!["q.emails".into()];
    let app = spawn_worker(cfg, reg).await;
    let t = Task::new("email.send", &json!({}));
    app.publish(&t).await;
    // A task for the unconsumed catch-all queue waits there.
    let other = Task::new("report.daily", &json!({}));
    app.publish(&other).await;
    runs.wait_total(1).await;
    let default = app.topo.work_queues()[0].name.clone();
    eventually(
        WAIT,
        "report waiting in the unconsumed default queue",
        || async { (queue_len(&app.conn, &default).await == 1).then_some(()) },
    )
    .await;
    // The catch-all (`#`) does not get a copy of what `email.*` claims:
    // the one message there is the report.
    let waiting = take(&app.conn, &default, 1).await;
    assert_eq!(waiting[0].routing_key.as_str(), "report.daily");
    assert_eq!(queue_len(&app.conn, &default).await, 0);
    assert_eq!(runs.total(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_task_that_is_not_due_yet_waits_for_its_not_before() {
    let (reg, runs) = recording("t.later");
    let app = spawn_worker(config("notbefore"), reg).await;
    let mut t = Task::new("t.later", &json!({}));
    let start = std::time::Instant::now();
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(800);
    t.not_before = Some(due);
    app.publish(&t).await;
    runs.wait_total(1).await;
    let ran = runs.of(&t.id);
    assert_eq!(ran[0].0, 1, "parking is not an attempt");
    let waited = ran[0].1 - start;
    assert!(waited >= Duration::from_millis(750), "ran after {waited:?}");
    // Two deliveries (parked, then run), each counted under one outcome.
    eventually(WAIT, "parked and succeeded counted", || async {
        let n = |o: &str| {
            app.counter(
                "warren_consumer_tasks_total",
                &[("task", "t.later"), ("outcome", o)],
            )
        };
        (n("parked") == 1.0 && n("succeeded") == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        app.counter("warren_consumer_deliveries_total", &[("task", "t.later")]),
        2.0
    );
    assert_eq!(
        app.counter("warren_consumer_tasks_total", &[("task", "t.later")]),
        2.0
    );
    app.stop().await;
}

#[tokio::test]
async fn a_parked_task_that_cannot_be_rescheduled_is_dead_lettered_with_its_own_attempt() {
    let (reg, runs) = recording("t.park");
    let app = spawn_worker(config("park_unroutable"), reg).await;
    // Without the levels a 0.2–1.5 s wait enters, the park is unroutable.
    let ch = app.conn.create_channel().await.unwrap();
    for level in 1..=3 {
        ch.queue_delete(
            app.topo.level_queue(level).as_str().into(),
            Default::default(),
        )
        .await
        .unwrap();
    }
    let mut t = Task::new("t.park", &json!({}));
    t.attempt = 3;
    t.max_attempts = Some(5);
    t.not_before = Some(chrono::Utc::now() + chrono::Duration::milliseconds(1400));
    app.publish(&t).await;
    let dead = app.take_dead(1).await;
    assert_eq!(header(&dead[0], headers::DEAD_KIND).unwrap(), "unroutable");
    assert_eq!(
        header(&dead[0], headers::ATTEMPT).unwrap(),
        "3",
        "parking is not an attempt: the dead copy keeps attempt 3"
    );
    eventually(WAIT, "counted once, as dead_lettered", || async {
        (app.counter(
            "warren_consumer_tasks_total",
            &[("task", "t.park"), ("outcome", "dead_lettered")],
        ) == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        app.counter("warren_consumer_tasks_total", &[("task", "t.park")]),
        1.0
    );
    assert_eq!(
        app.counter("warren_consumer_deliveries_total", &[("task", "t.park")]),
        1.0
    );
    assert_eq!(runs.total(), 0);
    app.stop().await;
}
