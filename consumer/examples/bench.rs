//! Backlog drain benchmark: pre-fill N tasks, then time one in-process worker
//! draining them with a handler that does nothing.
//!
//! `WARREN_AMQP_URL=... cargo run --release -p warren-consumer --example bench -- 50000`
//! Uses its own throwaway prefix and deletes it afterwards.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use warren::{Task, Topology};
use warren_consumer::{ConsumerConfig, Registry, Worker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let mut cfg = ConsumerConfig::load(None, warren::config::process_env())?;
    cfg.topology.prefix = format!("bench.{}", std::process::id());
    let topo = Topology::new(&cfg.topology);
    let conn = warren::amqp::connect(&cfg.amqp, "bench").await?;
    warren::topology::declare(&conn, &topo).await?;
    let publisher = warren::amqp::Publisher::new(&conn, Duration::from_secs(30)).await?;
    let tasks: Vec<Task> = (0..n)
        .map(|i| Task::new("bench.noop", &serde_json::json!({ "i": i })))
        .collect();
    let t0 = Instant::now();
    let res = publisher
        .publish_tasks(&topo, tasks.iter().map(|t| (t, Duration::ZERO)), 1000)
        .await;
    anyhow::ensure!(res.iter().all(Result::is_ok), "publish failed");
    let publish = t0.elapsed();

    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let mut registry = Registry::new();
    registry.register_fn("bench.noop", move |_| {
        let d = d.clone();
        async move {
            d.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    })?;
    let worker = Worker::builder(cfg).registry(registry).build()?;
    let prom = worker.prometheus();
    let stop = tokio_util::sync::CancellationToken::new();
    let t1 = Instant::now();
    let handle = tokio::spawn(worker.run(stop.clone()));
    let acked = || {
        prom.gather()
            .iter()
            .filter(|f| f.name() == "warren_consumer_tasks_total")
            .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
            .sum::<f64>() as usize
    };
    while acked() < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = t1.elapsed();
    stop.cancel();
    handle.await??;
    warren::testing::delete_topology(&conn, &topo).await;
    println!(
        "published {n} in {publish:.2?} ({:.0}/s); drained in {drain:.2?} ({:.0}/s, includes connect)",
        n as f64 / publish.as_secs_f64(),
        n as f64 / drain.as_secs_f64()
    );
    Ok(())
}
