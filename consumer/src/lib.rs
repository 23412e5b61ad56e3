//! `warren-consumer`: the worker that executes warren tasks.
//!
//! | module | owns |
//! |---|---|
//! | [`handler`] | the [`Handler`] trait, [`TaskError`], the [`Registry`] of task names |
//! | [`handlers`] | built-in handlers for the binary: `noop`, `sleep`, `http`, `exec` |
//! | [`worker`] | the consume loop, acks, retries, dead letters, drain, reconnect |
//! | [`outcome`] | the pure outcome → action decision |
//! | [`result`] | a workflow step's result: [`set_result`] |
//! | [`config`] | [`ConsumerConfig`]: every key the binary reads; its validation (`config/check.rs`) |
//! | [`flow`] | per-process limits (concurrency, rate) and `http` circuit breakers |
//! | [`metrics`] | `warren_consumer_*` Prometheus metrics |
//! | [`dead`] | dead-letter tooling: list, replay, purge (the shared engine [`warren::dead`]) |
//!
//! A Rust user builds their own worker with their own handlers:
//!
//! ```no_run
//! use warren_consumer::{ConsumerConfig, Registry, TaskError, Worker};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let mut registry = Registry::new();
//! registry.register_typed("email.send", |to: String, _task| async move {
//!     if to.contains('@') { Ok(()) } else { Err(TaskError::permanent("bad address")) }
//! })?;
//! let worker = Worker::builder(ConsumerConfig::default()).registry(registry).build()?;
//! worker.run(warren::shutdown::token()).await
//! # }
//! ```

pub mod config;
pub mod dead;
pub mod flow;
pub mod handler;
pub mod handlers;
pub mod metrics;
pub mod outcome;
pub mod result;
pub mod worker;

pub use config::ConsumerConfig;
pub use handler::{ErrorKind, Handler, Registry, RegistryError, TaskError};
pub use result::set_result;
pub use worker::{Worker, WorkerBuilder};
