//! Priorities are opt-in per work queue (`max_priority`): a queue that sets
//! it runs higher-priority tasks first; one that leaves it unset gets none
//! when warren creates it and keeps what it has when it exists already.

use std::sync::{Arc, Mutex};

use serde_json::json;
use warren::config::QueueConfig;
use warren::Task;
use warren_consumer::Registry;

use crate::helpers::*;

/// A registry whose `t.prio` handler records each task's `p` in run order.
fn ordered() -> (Registry, Arc<Mutex<Vec<u64>>>) {
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let mut reg = Registry::new();
    reg.register_fn("t.prio", move |t: Task| {
        let o = o.clone();
        async move {
            let p = t.payload_as::<serde_json::Value>().ok();
            let p = p.and_then(|v| v["p"].as_u64()).unwrap_or(u64::MAX);
            o.lock().unwrap().push(p);
            Ok(())
        }
    })
    .unwrap();
    (reg, order)
}

/// Publish tasks of priority 1, 2, 3 (in that order) before any worker runs,
/// then start one that takes a single task at a time.
async fn run_in_order(mut cfg: warren_consumer::ConsumerConfig) -> Vec<u64> {
    cfg.worker.prefetch = 1;
    cfg.worker.concurrency = 1;
    let conn = warren::testing::connect().await;
    let topo = warren::Topology::new(&cfg.topology);
    warren::topology::declare(&conn, &topo)
        .await
        .expect("declare");
    let publisher = warren::amqp::Publisher::new(&conn, std::time::Duration::from_secs(10))
        .await
        .expect("publisher");
    for p in [1u8, 2, 3] {
        let mut t = Task::new("t.prio", &json!({ "p": p }));
        t.priority = Some(p);
        publisher
            .publish_task(&topo, &t, std::time::Duration::ZERO)
            .await
            .expect("publish");
    }
    let (reg, order) = ordered();
    let app = spawn_worker(cfg, reg).await;
    warren::testing::eventually(WAIT, "all three tasks run", || async {
        (order.lock().unwrap().len() == 3).then_some(())
    })
    .await;
    app.stop().await;
    let _ = conn.close(200, "done".into()).await;
    let seen = order.lock().unwrap().clone();
    seen
}

#[tokio::test]
async fn a_queue_with_max_priority_runs_higher_priorities_first() {
    let mut cfg = config("prio_on");
    cfg.topology.queues = vec![QueueConfig {
        max_priority: Some(10),
        ..QueueConfig::default()
    }];
    assert_eq!(run_in_order(cfg).await, vec![3, 2, 1]);
}

#[tokio::test]
async fn the_default_queue_has_no_priorities() {
    // Unset `max_priority` on a queue warren creates: first in, first out.
    assert_eq!(run_in_order(config("prio_off")).await, vec![1, 2, 3]);
}
