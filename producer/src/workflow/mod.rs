//! Workflows: named DAGs of steps, defined in `[[workflows]]`, run by a
//! coordinator on the producer leader (see docs/workflows.md).
//!
//! | module | owns |
//! |---|---|
//! | `definition` | the config entries and their validation (cycles, unknown and unreachable steps) |
//! | `template` | payload templates (`{{input.x}}`, `{{results.<step>}}`, `{{run.id}}`) |
//! | `run` | one run as a pure state machine: readiness, failure, compensation, resume |
//! | `store` | run state in RabbitMQ (a log of changed runs, a compacted snapshot) and the view every replica follows for status requests |
//! | `coordinator` | the leader's loop: events in, changed runs appended, step tasks out, ack |
//!
//! The messages themselves (start, event, resume) are shared with the
//! consumer: [`warren::workflow`].

pub mod coordinator;
pub mod definition;
pub mod run;
pub mod store;
pub mod template;

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use warren::envelope::StepRef;
use warren::trace::TraceContext;
use warren::Task;

pub use definition::{Workflow, WorkflowConfig};

/// `[workflow]`: bounds of the run state the leader keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowSettings {
    /// A finished run stays visible (and a second start with its id is
    /// ignored) this long.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Finished runs kept at most (the oldest go first).
    pub max_finished_runs: usize,
    /// Most messages the coordinator applies per round (one log append).
    pub batch: u16,
    /// How often the leader rewrites the snapshot of every run (when the
    /// log grew); between, each round appends only the runs it changed.
    #[serde(with = "humantime_serde")]
    pub compact_every: Duration,
}

impl Default for WorkflowSettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(24 * 3600),
            max_finished_runs: 1000,
            batch: 256,
            compact_every: Duration::from_secs(15),
        }
    }
}

impl WorkflowSettings {
    /// Every problem of `[workflow]`, keyed by its path.
    pub fn check(&self, p: &mut warren::config::Problems) {
        if self.retention.is_zero() {
            p.push_value("workflow.retention", "0s", "must be positive");
        }
        if self.batch == 0 {
            p.push_value("workflow.batch", 0, "must be at least 1");
        }
        if self.compact_every.is_zero() {
            p.push_value("workflow.compact_every", "0s", "must be positive");
        }
    }
}

/// The start message of the public contract: exchange `<prefix>.workflows`,
/// routing key `start`, `message_id` = the run id.
pub fn start_message(
    workflow: &str,
    input: &serde_json::Value,
    run_id: &str,
    trace: Option<&TraceContext>,
) -> (BasicProperties, Vec<u8>) {
    let body = serde_json::to_vec(&warren::workflow::Start {
        workflow: workflow.to_owned(),
        input: input.clone(),
    })
    .unwrap_or_default();
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(warren::envelope::PERSISTENT)
        .with_message_id(run_id.into());
    if let Some(t) = trace {
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from(warren::trace::TRACEPARENT),
            AMQPValue::LongString(t.traceparent().into()),
        );
        if let Some(s) = &t.state {
            h.insert(
                ShortString::from(warren::trace::TRACESTATE),
                AMQPValue::LongString(s.as_str().into()),
            );
        }
        props = props.with_headers(h);
    }
    (props, body)
}

/// A workflow schedule's fire or manual trigger `id`: start a run with that
/// id, the schedule's payload as its input (confirmed).
pub async fn start_scheduled(
    publisher: &warren::amqp::Publisher,
    topo: &warren::Topology,
    workflow: &str,
    payload: &[u8],
    id: &str,
) -> Result<(), warren::Error> {
    let input: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    let (props, body) = start_message(workflow, &input, id, None);
    publisher
        .publish(
            &topo.workflows_exchange(),
            warren::workflow::START,
            props,
            &body,
        )
        .await
}

/// A resume request (routing key `resume`).
pub fn resume_message(workflow: &str, run: &str) -> (BasicProperties, Vec<u8>) {
    let body = serde_json::to_vec(&warren::workflow::Resume {
        workflow: workflow.to_owned(),
        run: run.to_owned(),
    })
    .unwrap_or_default();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(warren::envelope::PERSISTENT);
    (props, body)
}

/// The task of a due step (or compensation): an ordinary task with the step
/// headers, the step's retry overrides and a child of the run's trace.
pub fn step_task(wf: &Workflow, r: &run::Run, due: &run::Due) -> Task {
    let payload = serde_json::to_vec(&due.payload).unwrap_or_default();
    let mut t = Task::from_raw(due.task.clone(), payload);
    t.id = due.task_id.clone();
    t.step = Some(StepRef {
        workflow: wf.name.clone(),
        run: r.id.clone(),
        step: due.step_header.clone(),
    });
    let root = r
        .traceparent
        .as_deref()
        .and_then(|p| TraceContext::parse(p, r.tracestate.as_deref()));
    t.trace = root.map(|c| c.child());
    if let Some(def) = wf.step(&due.step) {
        t.priority = def.priority;
        t.timeout = def.timeout;
        t.max_attempts = def.retry.max_attempts;
        t.retry = warren::retry::RetryOverrides {
            max_attempts: None,
            ..def.retry
        };
    }
    t
}
