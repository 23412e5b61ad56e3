//! The shared dead-letter engine (`warren::dead`) on real dead letters:
//! grouping by fingerprint, inspecting, edit-and-replay, replaying and
//! purging a group, and bounded scans of a queue larger than the limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use warren::dead::{self, Selector};
use warren::envelope::headers;
use warren::Task;
use warren_consumer::{Registry, TaskError};

use crate::helpers::*;

/// Every task a handler was given, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Task>>>);

impl Seen {
    fn all(&self) -> Vec<Task> {
        self.0.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&[Task]) -> bool) {
        warren::testing::eventually(WAIT, what, || async { pred(&self.all()).then_some(()) }).await
    }
}

fn group(task: &str, kind: &str, fingerprint: &str) -> Selector {
    Selector::Group {
        task: task.into(),
        kind: kind.into(),
        fingerprint: fingerprint.into(),
    }
}

/// Two kinds of failure whose reasons differ only in numbers and ids make
/// two groups; one message inspected in full; edited and replayed (same id,
/// then a new one) with the audit header and attempt 1; one group purged
/// while the other stays, then replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_inspect_edit_replay_and_purge_by_group() {
    let fixed = Arc::new(AtomicBool::new(false));
    let seen = Seen::default();
    let mut reg = Registry::new();
    for name in ["t.slow", "t.flaky"] {
        let (fixed, seen) = (fixed.clone(), seen.clone());
        reg.register_fn(name, move |t: Task| {
            let (fixed, seen) = (fixed.clone(), seen.clone());
            async move {
                seen.0.lock().unwrap().push(t.clone());
                let n = serde_json::from_slice::<serde_json::Value>(&t.payload)
                    .ok()
                    .and_then(|v| v["n"].as_i64())
                    .unwrap_or(0);
                match (fixed.load(Ordering::SeqCst), t.name.as_str()) {
                    (true, _) => Ok(()),
                    (false, "t.slow") => Err(TaskError::permanent(format!(
                        "timeout after {n} ms for id {}",
                        uuid::Uuid::new_v4().simple()
                    ))),
                    (false, _) => Err(TaskError::retryable(format!("upstream said 50{n}"))),
                }
            }
        })
        .unwrap();
    }
    let mut cfg = config("deadengine");
    // One attempt: a retryable failure is dead at once, as `exhausted`.
    cfg.retry.default.max_attempts = 1;
    let app = spawn_worker(cfg.clone(), reg).await;
    let slow: Vec<Task> = [1234, 88, 7]
        .iter()
        .map(|n| Task::new("t.slow", &json!({ "n": n })))
        .collect();
    let flaky: Vec<Task> = [2, 3]
        .iter()
        .map(|n| Task::new("t.flaky", &json!({ "n": n })))
        .collect();
    for t in slow.iter().chain(&flaky) {
        app.publish(t).await;
    }
    let dead_queue = app.topo.dead_queue();
    warren::testing::eventually(WAIT, "5 dead", || async {
        (queue_len(&app.conn, &dead_queue).await == 5).then_some(())
    })
    .await;

    // Two groups, largest first; nothing leaves the queue.
    let o = dead::overview(&app.conn, &app.topo, 100).await.unwrap();
    assert_eq!((o.total, o.scanned, o.truncated), (5, 5, false));
    let shape: Vec<(&str, &str, &str, u64)> = o
        .groups
        .iter()
        .map(|g| {
            (
                g.task.as_str(),
                g.kind.as_str(),
                g.fingerprint.as_str(),
                g.count,
            )
        })
        .collect();
    let slow_fp = "timeout after # ms for id <id> — permanent error";
    let flaky_fp = "upstream said # — attempts exhausted (# of #)";
    assert_eq!(
        shape,
        [
            ("t.slow", "permanent", slow_fp, 3),
            ("t.flaky", "exhausted", flaky_fp, 2)
        ],
        "{o:#?}"
    );
    assert!(o.groups[0]
        .example
        .starts_with("permanent error: timeout after "));
    assert!(o.groups[0].oldest.is_some() && o.groups[0].newest.is_some());
    settles_at(&app.conn, &dead_queue, 5).await;
    let in_group = dead::list_where(&app.conn, &app.topo, 100, 100, |t| {
        group("t.flaky", "exhausted", flaky_fp).matches(t)
    })
    .await
    .unwrap();
    assert_eq!(in_group.tasks.len(), 2);

    // Inspect one in full.
    let m = dead::inspect(&app.conn, &app.topo, &slow[0].id, 100)
        .await
        .unwrap()
        .expect("found");
    assert_eq!(
        (m.payload.as_str(), m.payload_base64),
        (r#"{"n":1234}"#, false)
    );
    assert_eq!(m.properties["message_id"], slow[0].id.as_str());
    assert_eq!(m.properties["type"], "t.slow");
    assert_eq!(m.headers[headers::DEAD_KIND], "permanent");
    assert_eq!(m.task.fingerprint, slow_fp);
    assert!(dead::inspect(&app.conn, &app.topo, "no-such-id", 100)
        .await
        .unwrap()
        .is_none());

    // Edit and replay: same id, then a new one.
    fixed.store(true, Ordering::SeqCst);
    let publisher = warren::amqp::Publisher::new(&app.conn, Duration::from_secs(10))
        .await
        .unwrap();
    let r = dead::replay_edited(
        &app.conn,
        &app.topo,
        &slow[0].id,
        br#"{"n":1,"edited":true}"#.to_vec(),
        false,
        "ops-oncall",
        &publisher,
    )
    .await
    .unwrap();
    assert_eq!(r.replayed, vec![slow[0].id.clone()]);
    let r = dead::replay_edited(
        &app.conn,
        &app.topo,
        &slow[1].id,
        br#"{"n":2}"#.to_vec(),
        true,
        "ops-oncall",
        &publisher,
    )
    .await
    .unwrap();
    let new_id = r.replayed[0].clone();
    assert_ne!(new_id, slow[1].id);
    seen.wait_for("both edited tasks ran", |s| {
        s.iter()
            .any(|t| t.id == slow[0].id && t.payload != slow[0].payload)
            && s.iter().any(|t| t.id == new_id)
    })
    .await;
    let all = seen.all();
    for (id, payload) in [
        (&slow[0].id, &br#"{"n":1,"edited":true}"#[..]),
        (&new_id, br#"{"n":2}"#),
    ] {
        let run = all.iter().rfind(|t| &t.id == id).unwrap();
        assert_eq!(run.payload, payload);
        assert_eq!(run.attempt, 1);
        let h = &run.extra_headers;
        assert_eq!(
            warren::envelope::header_str(h, headers::EDITED_BY).as_deref(),
            Some("ops-oncall")
        );
        assert!(warren::envelope::header_str(h, headers::EDITED_AT).is_some());
        assert!(!h.contains_key(headers::DEAD_REASON));
    }
    settles_at(&app.conn, &dead_queue, 3).await;
    let gone = dead::replay_edited(
        &app.conn,
        &app.topo,
        &slow[0].id,
        b"{}".to_vec(),
        false,
        "x",
        &publisher,
    )
    .await;
    assert!(
        matches!(gone, Err(dead::DeadError::NotFound(_))),
        "{gone:?}"
    );
    let bad = dead::replay_edited(
        &app.conn,
        &app.topo,
        &slow[2].id,
        b"{nope".to_vec(),
        false,
        "x",
        &publisher,
    )
    .await;
    assert!(
        matches!(bad, Err(dead::DeadError::Invalid { .. })),
        "{bad:?}"
    );

    // Purge one group: the other stays.
    let n = dead::purge(
        &app.conn,
        &app.topo,
        &group("t.flaky", "exhausted", flaky_fp),
        100,
    )
    .await
    .unwrap();
    assert_eq!(n, 2);
    settles_at(&app.conn, &dead_queue, 1).await;
    let left = dead::overview(&app.conn, &app.topo, 100).await.unwrap();
    assert_eq!(left.groups.len(), 1);
    assert_eq!(
        (left.groups[0].task.as_str(), left.groups[0].count),
        ("t.slow", 1)
    );

    // Replay the group that is left.
    let r = dead::replay(
        &app.conn,
        &app.topo,
        &group("t.slow", "permanent", slow_fp),
        100,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.replayed, vec![slow[2].id.clone()]);
    seen.wait_for("the group's task ran again", |s| {
        s.iter().filter(|t| t.id == slow[2].id).count() == 2
    })
    .await;
    settles_at(&app.conn, &dead_queue, 0).await;
    assert!(seen
        .all()
        .iter()
        .all(|t| !flaky.iter().any(|f| f.id == t.id) || t.attempt == 1));
    assert_eq!(
        seen.all()
            .iter()
            .filter(|t| flaky.iter().any(|f| f.id == t.id))
            .count(),
        2,
        "purged tasks never ran again"
    );
    app.stop().await;
}

/// On a dead queue larger than the scan limit, the overview says how many
/// the broker holds, how many it looked at, and that it stopped early; every
/// message stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_of_a_queue_larger_than_the_scan_limit_is_truncated() {
    let cfg = config("deadtrunc");
    let app = spawn_worker(cfg, Registry::new()).await;
    for i in 0..30 {
        let mut h = FieldTable::default();
        let reason = format!("bad input {i}");
        h.insert(
            headers::DEAD_REASON.into(),
            AMQPValue::LongString(reason.as_str().into()),
        );
        h.insert(
            headers::DEAD_KIND.into(),
            AMQPValue::LongString("permanent".into()),
        );
        let props = BasicProperties::default()
            .with_message_id(format!("m-{i}").into())
            .with_type("t.many".into())
            .with_headers(h);
        app.publisher
            .publish(&app.topo.dead_exchange(), "t.many", props, b"{}")
            .await
            .unwrap();
    }
    let o = dead::overview(&app.conn, &app.topo, 10).await.unwrap();
    assert_eq!((o.total, o.scanned, o.truncated), (30, 10, true));
    assert_eq!(o.groups.len(), 1);
    assert_eq!(
        (o.groups[0].fingerprint.as_str(), o.groups[0].count),
        ("bad input #", 10)
    );
    let l = dead::list_where(&app.conn, &app.topo, 10, 100, |_| true)
        .await
        .unwrap();
    assert_eq!(
        (l.total, l.scanned, l.truncated, l.tasks.len()),
        (30, 10, true, 10)
    );
    // Read at once: a listing answers only once the queue counts again
    // what it held (the broker applies those returns after the close).
    assert_eq!(queue_len(&app.conn, &app.topo.dead_queue()).await, 30);
    app.stop().await;
}
