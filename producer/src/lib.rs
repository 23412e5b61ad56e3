//! `warren-producer` as a library: the cron producer of warren. The binary
//! (`main.rs`) only parses the command line, loads the config and calls in
//! here; tests build an [`App`] in process the same way.
//!
//! | module | owns |
//! |---|---|
//! | [`app`] | [`App`]: build (validate, bind), run, orderly shutdown |
//! | `api` | the `/v1` HTTP handlers; their router state `ApiState` hands each the part of `Ctx` it needs |
//! | `audit` | the audit line and counter of every mutating request |
//! | `auth` | bearer tokens, scopes as types, the `RequireScope` extractor |
//! | `console` | the operator console under `/ui/` (sign-ins, pages) |
//! | `error` | the JSON error body of every `/v1` answer |
//! | `scheduler` | election loop and fire loop (`term`: one leader term; `agenda`: next instants in a heap) |
//! | `book` | the schedules in force from both sources, by name, and a feed of what changed |
//! | `catalog` | the API's schedules in RabbitMQ: a change log on a stream, versions, snapshot |
//! | `reload` | SIGHUP: schedules and API tokens swapped at runtime |
//! | `connection` | broker connections: retries, the API's publisher |
//! | `context` | `Ctx`, the state the parts above share (below all of them), made of `Timetable` (schedules in force and how each stands), `Leadership`, `Replicas` (replicas heard, control events), `BrokerLink` and `TaskEvents` (recorder, task index), each in an `Arc` a handler may take alone |
//! | `control` | pause/resume requests to the leader, paused-set events to every replica |
//! | `leader` | election on an exclusive queue and the fence before each tick |
//! | `state` | log-and-snapshot state (append, compact, load) and the scheduler's: what a new leader resumes from; the queues themselves are named and declared in [`warren::topology::producer`] |
//! | [`request`] | ad-hoc task requests (CLI batch lines, API bodies) |
//! | [`cli`] | command line: `run`, `schedules check|next`, `publish` |
//! | `batch` | `publish --batch`: NDJSON from stdin at the broker's pace |
//! | [`config`] | `ProducerConfig`, token files, schedule validation |
//! | `schedule` | pure next-fire math: syntaxes, zones, DST rules, misfire plan |
//! | `metrics` | the producer's Prometheus metrics |
//! | `tasks` | the task index: the events stream folded into recent tasks and live workers |
//! | [`workflow`] | workflows: definitions, run state machine, the leader's coordinator |
//!
//! Dependencies point down this table (from `app` to `context` and the
//! pure modules below it); nothing below `app` knows it, and `api`,
//! `console` and `scheduler` meet only in `context`.

pub mod app;
pub mod cli;
pub mod config;
pub mod request;

mod api;
mod audit;
mod auth;
mod batch;
mod book;
mod catalog;
mod connection;
mod console;
mod context;
mod control;
mod error;
mod jwt;
mod leader;
mod metrics;
mod reload;
mod schedule;
mod scheduler;
mod state;
pub mod tasks;
pub mod workflow;

pub use app::App;
