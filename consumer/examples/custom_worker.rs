//! A worker binary with your own Rust handler:
//! `cargo run -p warren-consumer --example custom_worker`.
//! Reads the same config as `warren-consumer` (`WARREN_CONFIG`, `WARREN_*`).

use serde::Deserialize;
use warren_consumer::{ConsumerConfig, Registry, TaskError, Worker};

#[derive(Deserialize)]
struct Email {
    to: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::var_os("WARREN_CONFIG").map(std::path::PathBuf::from);
    let cfg = ConsumerConfig::load(path.as_deref(), warren::config::process_env())?;
    warren::telemetry::init(&cfg.log);

    let mut registry = Registry::new();
    registry.register_typed("email.send", |email: Email, task| async move {
        if !email.to.contains('@') {
            return Err(TaskError::permanent("not an email address")); // → dead letter
        }
        tracing::info!(to = %email.to, attempt = task.attempt, "sending");
        Ok(()) // → ack; Err(TaskError::retryable(..)) → retry with backoff
    })?;

    let worker = Worker::builder(cfg).registry(registry).build()?;
    worker.run(warren::shutdown::token()).await
}
