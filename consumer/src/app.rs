//! `warren-consumer run`: logging, the worker with the configured handlers,
//! and the HTTP listener for `/metrics`, `/healthz` and `/readyz`, until a
//! shutdown signal.

use anyhow::Context;
use warren_consumer::{ConsumerConfig, Registry, Worker};

pub async fn run(cfg: ConsumerConfig, registry: Registry) -> anyhow::Result<()> {
    warren::telemetry::init(&cfg.log);
    if registry.is_empty() {
        tracing::warn!(
            "no handlers configured: every task will be dead-lettered with kind `no_handler`"
        );
    } else {
        let names: Vec<&str> = registry.names().collect();
        tracing::info!(handlers = ?names, "handlers registered");
    }
    // Ids and the mode only: which tasks this fleet will refuse.
    let keys: Vec<&str> = cfg.security.keys.iter().map(|k| k.id.as_str()).collect();
    tracing::info!(verify = cfg.security.verify_mode().name(), keys = ?keys, "security");
    // What the runtime really has, whatever asked for it (`worker.threads`).
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(threads, "runtime");
    if cfg.worker.task_timeout >= std::time::Duration::from_secs(30 * 60) {
        tracing::warn!(
            task_timeout = %humantime::format_duration(cfg.worker.task_timeout),
            "task_timeout reaches RabbitMQ's default consumer_timeout (30 min): raise consumer_timeout on the broker or deliveries will be requeued mid-task"
        );
    }
    let shutdown = warren::shutdown::token();
    warren::shutdown::ignore_hangup("warren-consumer");
    let addr = cfg.http.addr;
    let worker = Worker::builder(cfg).registry(registry).build()?;
    let router = warren::metrics::ops_router(worker.prometheus(), worker.health());
    let http_stop = tokio_util::sync::CancellationToken::new();
    let (_, server) = warren::metrics::serve(addr, router, http_stop.clone())
        .await
        .with_context(|| format!("cannot serve HTTP on {addr}"))?;
    let res = worker.run(shutdown).await;
    http_stop.cancel();
    let _ = server.await;
    res
}
