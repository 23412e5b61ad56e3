//! The shipped binary as child processes: competing consumers, graceful
//! drain on SIGTERM, and `kill -9` mid-task.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use warren::testing::eventually;
use warren::Task;

use crate::helpers::*;

const SLEEP_TOML: &str = r#"
[worker]
concurrency = 8
prefetch = 8
drain_grace = "DRAIN"

[handlers."t.sleep"]
kind = "sleep"
duration = "1s"
"#;

fn sleep_toml(grace: &str) -> String {
    SLEEP_TOML.replace("DRAIN", grace)
}

/// A sleep-handler process that logs "task started" (debug).
fn spawn_sleeper(cfg: &warren_consumer::ConsumerConfig, grace: &str) -> Proc {
    spawn_process_env(
        cfg,
        &sleep_toml(grace),
        &[("RUST_LOG", "info,warren_consumer::worker=debug")],
    )
}

/// Wait until the process runs every one of `tasks`.
async fn wait_started(p: &Proc, tasks: &[Task]) {
    eventually(WAIT, "all tasks started", || async {
        let started: HashSet<String> = p.ids_of("task started").into_iter().collect();
        tasks.iter().all(|t| started.contains(&t.id)).then_some(())
    })
    .await;
}

/// A client-side view of a test prefix, without a worker in this process.
async fn client(
    cfg: &warren_consumer::ConsumerConfig,
) -> (lapin::Connection, warren::amqp::Publisher, warren::Topology) {
    let conn = warren::amqp::connect(&cfg.amqp, "test-client")
        .await
        .expect("connect");
    let topo = warren::Topology::new(&cfg.topology);
    warren::topology::declare(&conn, &topo)
        .await
        .expect("declare");
    let p = warren::amqp::Publisher::new(&conn, Duration::from_secs(10))
        .await
        .expect("publisher");
    (conn, p, topo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_execute_3000_tasks_exactly_once() {
    let cfg = config("three");
    let (conn, publisher, topo) = client(&cfg).await;
    let toml =
        "[worker]\nconcurrency = 64\nprefetch = 128\n[handlers.\"t.noop\"]\nkind = \"noop\"\n";
    let mut procs: Vec<Proc> = (0..3).map(|_| spawn_process(&cfg, toml)).collect();
    for p in &procs {
        p.wait_log("consuming", 1).await;
    }
    let tasks: Vec<Task> = (0..3000)
        .map(|i| Task::new("t.noop", &json!({ "i": i })))
        .collect();
    let results = publisher
        .publish_tasks(&topo, tasks.iter().map(|t| (t, Duration::ZERO)), 500)
        .await;
    assert!(results.iter().all(Result::is_ok), "all 3000 confirmed");
    eventually(Duration::from_secs(120), "3000 tasks handled", || async {
        let n: usize = procs.iter().map(|p| p.handled_ids().len()).sum();
        (n >= 3000).then_some(())
    })
    .await;
    // Stop all three gracefully: anything unacked would go back to the queue.
    for p in &procs {
        p.signal(Signal::SIGTERM);
    }
    for p in &mut procs {
        assert!(p.wait_exit(WAIT).await.success());
    }
    let mut all = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        let ids = p.handled_ids();
        assert!(!ids.is_empty(), "process {i} took part");
        all.extend(ids);
    }
    let unique: HashSet<&String> = all.iter().collect();
    let want: HashSet<&String> = tasks.iter().map(|t| &t.id).collect();
    assert_eq!(all.len(), 3000, "no task ran twice");
    assert_eq!(unique, want, "every task ran");
    assert_eq!(queue_len(&conn, &topo.work_queues()[0].name).await, 0);
    assert_eq!(queue_len(&conn, &topo.dead_queue()).await, 0);
    warren::testing::delete_topology(&conn, &topo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_tasks_and_acks_them() {
    let cfg = config("drain");
    let (conn, publisher, topo) = client(&cfg).await;
    let mut p = spawn_sleeper(&cfg, "20s");
    p.wait_log("consuming", 1).await;
    let tasks: Vec<Task> = (0..4)
        .map(|_| Task::new("t.sleep", &json!({ "sleep_ms": 1500 })))
        .collect();
    for t in &tasks {
        publisher
            .publish_task(&topo, t, Duration::ZERO)
            .await
            .unwrap();
    }
    wait_started(&p, &tasks).await;
    p.signal(Signal::SIGTERM);
    let status = p.wait_exit(WAIT).await;
    assert!(status.success(), "{status:?}");
    let done: HashSet<String> = p.handled_ids().into_iter().collect();
    let want: HashSet<String> = tasks.iter().map(|t| t.id.clone()).collect();
    assert_eq!(done, want, "running tasks finished during the drain");
    // They were acked: nothing returned to the queue after the connection closed.
    assert_eq!(queue_len(&conn, &topo.work_queues()[0].name).await, 0);
    assert!(!p
        .events("draining: consumers cancelled, waiting for running tasks")
        .is_empty());
    warren::testing::delete_topology(&conn, &topo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_past_the_drain_grace_go_to_another_consumer() {
    let cfg = config("grace");
    let (conn, publisher, topo) = client(&cfg).await;
    let mut p = spawn_sleeper(&cfg, "500ms");
    p.wait_log("consuming", 1).await;
    let tasks: Vec<Task> = (0..3)
        .map(|_| Task::new("t.sleep", &json!({ "sleep_ms": 60_000 })))
        .collect();
    for t in &tasks {
        publisher
            .publish_task(&topo, t, Duration::ZERO)
            .await
            .unwrap();
    }
    wait_started(&p, &tasks).await;
    let started = std::time::Instant::now();
    p.signal(Signal::SIGTERM);
    // The tasks sleep 60 s, twice WAIT: exiting within WAIT, with the grace's
    // own log line and no task finished, shows the drain ended at the grace
    // rather than with the tasks. How long it took is printed, not asserted.
    assert!(p.wait_exit(WAIT).await.success());
    eprintln!(
        "drain grace 500 ms: exited {} ms after SIGTERM",
        started.elapsed().as_millis()
    );
    let over = p.events("drain grace over; unfinished tasks return to the queue unacked");
    assert_eq!(over.len(), 1, "the drain ended at the grace");
    assert_eq!(over[0]["unfinished"], 3, "{}", over[0]);
    assert!(
        p.handled_ids().is_empty(),
        "nothing finished within the grace"
    );
    let (reg, runs) = recording("t.sleep");
    let app = spawn_worker(cfg, reg).await;
    runs.wait_total(3).await;
    for t in &tasks {
        assert_eq!(
            runs.of(&t.id).len(),
            1,
            "task {} ran on the second consumer",
            t.id
        );
    }
    drop((conn, publisher, topo));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_task_loses_nothing() {
    let cfg = config("kill9");
    let (conn, publisher, topo) = client(&cfg).await;
    let p = spawn_sleeper(&cfg, "20s");
    p.wait_log("consuming", 1).await;
    let tasks: Vec<Task> = (0..5)
        .map(|_| Task::new("t.sleep", &json!({ "sleep_ms": 60_000 })))
        .collect();
    for t in &tasks {
        publisher
            .publish_task(&topo, t, Duration::ZERO)
            .await
            .unwrap();
    }
    wait_started(&p, &tasks).await;
    p.signal(Signal::SIGKILL);
    let (reg, runs) = recording("t.sleep");
    let app = spawn_worker(cfg, reg).await;
    runs.wait_total(5).await;
    for t in &tasks {
        assert_eq!(runs.of(&t.id).len(), 1, "task {} ran on the survivor", t.id);
    }
    drop(p);
    drop((conn, publisher, topo));
    app.stop().await;
}

/// `worker.threads` sizes the binary's runtime; unset, one thread per two
/// CPUs (at least one). The process logs what its runtime really has.
#[tokio::test]
async fn worker_threads_size_the_runtime() {
    let cfg = config("threads");
    let threads_of = |p: &Proc| -> Vec<u64> {
        p.events("runtime")
            .iter()
            .filter_map(|v| v["threads"].as_u64())
            .collect()
    };
    let set = spawn_process(&cfg, "[worker]\nthreads = 3\n");
    let unset = spawn_process(&cfg, "");
    for p in [&set, &unset] {
        p.wait_log("consuming", 1).await;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert_eq!(threads_of(&set), vec![3]);
    assert_eq!(threads_of(&unset), vec![(cpus / 2).max(1)]);
    drop((set, unset));
    let conn = warren::testing::connect().await;
    warren::testing::delete_topology(&conn, &warren::Topology::new(&cfg.topology)).await;
}
