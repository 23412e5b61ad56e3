//! `warren`: the contract and the plumbing both roles share.
//!
//! | module | owns |
//! |---|---|
//! | [`envelope`] | the message contract: [`Task`] ⇄ AMQP properties and `x-warren-*` headers |
//! | [`topology`] | every exchange, queue and binding, declared idempotently (or only checked); [`topology::producer`]: the producer's own queues, streams and exchange |
//! | [`delay`] | plugin-free delay levels: delay ⇄ routing-key bits |
//! | [`retry`] | retry policy: attempts and backoff delays |
//! | [`security`] | signed and encrypted tasks: keys, HMAC signatures, AES-GCM payloads |
//! | [`config`] | shared config sections, the defaults < file < env loader, and [`config::Problems`]: every validation problem at once, keyed by config path |
//! | [`amqp`] | connecting and confirmed, pipelined publishing |
//! | [`error`] | the shared [`Error`] (worth retrying?), error reports, a caught panic's text |
//! | [`dead`] | the dead-letter engine: groups by fingerprint, inspect, replay (edited), purge |
//! | [`events`] | task events: what happened to each task, batched onto a stream, never in a task's way |
//! | [`metrics`] | `/metrics`, `/healthz`, `/readyz` and connection metrics |
//! | [`telemetry`] | log setup |
//! | [`trace`] | W3C trace context carried by tasks |
//! | [`workflow`] | the workflow start, event and resume messages |
//! | [`shutdown`] | SIGINT/SIGTERM → cancellation |
//! | `testing` | (feature `testing`) throwaway broker nodes for tests |

pub mod amqp;
pub mod config;
pub mod dead;
pub mod delay;
pub mod envelope;
pub mod error;
pub mod events;
pub mod metrics;
pub mod retry;
pub mod security;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
pub mod trace;
pub mod workflow;

pub use envelope::Task;
pub use error::Error;
pub use topology::Topology;
