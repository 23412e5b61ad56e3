//! Broker restarts and broker-cancelled consumers.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren::testing::{eventually, Node};
use warren::Task;

use crate::helpers::*;

/// Publishes a task every few ms, reconnecting on failure; records what the
/// broker confirmed. Its sleeps pace a load generator and space its retries
/// while the broker is down; no test step waits on them (the test waits on
/// the confirmed count and the worker's health instead).
fn spawn_publisher(
    amqp: warren::config::AmqpConfig,
    topo: warren::Topology,
    confirmed: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let conn = match warren::amqp::connect(&amqp, "test-publisher").await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("test publisher: connect: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match warren::amqp::Publisher::new(&conn, Duration::from_secs(5)).await {
                Ok(p) => {
                    while !stop.is_cancelled() {
                        let t = Task::new("t.flow", &json!({}));
                        if let Err(e) = p.publish_task(&topo, &t, Duration::ZERO).await {
                            eprintln!("test publisher: publish: {e}");
                            break;
                        }
                        confirmed.lock().unwrap().push(t.id);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                Err(e) => {
                    eprintln!("test publisher: channel: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "".into())).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stop_start_recovers_and_runs_every_confirmed_task() {
    let node = Node::start();
    let mut cfg = config("restart");
    cfg.amqp = amqp_for(node.url());
    let (reg, runs) = recording("t.flow");
    let app = spawn_worker(cfg.clone(), reg).await;
    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let pub_task = spawn_publisher(
        cfg.amqp.clone(),
        app.topo.clone(),
        confirmed.clone(),
        stop.clone(),
    );
    let count = || confirmed.lock().unwrap().len();
    eventually(WAIT, "50 tasks confirmed before the restart", || async {
        (count() >= 50).then_some(())
    })
    .await;

    node.stop_app();
    let health = app.health.clone();
    eventually(WAIT, "not ready while the broker is down", || {
        let h = health.clone();
        async move { (!h.is_ready()).then_some(()) }
    })
    .await;
    let before = count();
    node.start_app();

    eventually(Duration::from_secs(60), "ready again", || {
        let h = health.clone();
        async move { h.is_ready().then_some(()) }
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "50 more tasks confirmed after the restart",
        || async { (count() >= before + 50).then_some(()) },
    )
    .await;
    stop.cancel();
    pub_task.await.unwrap();
    let want: HashSet<String> = confirmed.lock().unwrap().iter().cloned().collect();
    eventually(
        Duration::from_secs(60),
        "every confirmed task executed",
        || async {
            let ran: HashSet<String> = runs.0.lock().unwrap().keys().cloned().collect();
            want.is_subset(&ran).then_some(())
        },
    )
    .await;
    assert!(app.counter("warren_amqp_reconnects_total", &[]) >= 1.0);
    assert_eq!(app.counter("warren_amqp_connected", &[]), 1.0);
    // The app's own client connection died with the broker; stop the worker only.
    app.shutdown.cancel();
    drop(app);
    drop(node);
}

#[tokio::test]
async fn broker_cancelled_consumer_is_redeclared_and_resumed() {
    let (reg, runs) = recording("t.flow");
    let app = spawn_worker(config("cancelled"), reg).await;
    let ch = app.conn.create_channel().await.unwrap();
    ch.queue_delete(app.queue().as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // The worker notices, re-declares the queue and consumes again.
    let conn = &app.conn;
    let q = app.queue();
    eventually(WAIT, "queue re-declared", || async {
        let c = conn.create_channel().await.ok()?;
        let r = c
            .queue_declare(
                q.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        let _ = c.close(200, "".into()).await;
        r.ok().filter(|q| q.consumer_count() == 1)
    })
    .await;
    let t = Task::new("t.flow", &json!({}));
    app.publish(&t).await;
    runs.wait_total(1).await;
    assert_eq!(runs.of(&t.id).len(), 1);
    assert!(app.health.is_ready());
    app.stop().await;
}

/// `Worker::run` drives its consume loop as a task of its own; a caller that
/// gives up on it (an aborted task, a lost `select!`) must still stop it, not
/// leave it consuming, detached.
#[tokio::test]
async fn dropping_the_run_future_stops_the_worker() {
    let (reg, _runs) = recording("t.dropped");
    let mut app = spawn_worker(config("dropped"), reg).await;
    if let Some(h) = app.worker.take() {
        h.abort();
        let _ = h.await;
    }
    let conn = &app.conn;
    let q = app.queue();
    eventually(WAIT, "no consumer left on the queue", || async {
        let c = conn.create_channel().await.ok()?;
        let r = c
            .queue_declare(
                q.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        let _ = c.close(200, "".into()).await;
        r.ok().filter(|q| q.consumer_count() == 0)
    })
    .await;
    app.stop().await;
}
