//! The event a consumer sends once a workflow step's task has its final
//! outcome (succeeded, or dead-lettered for any reason), to
//! `<prefix>.workflows` with routing key `event`. The delivery is acked only
//! after the event is confirmed: a crash in between runs the step again and
//! sends the event again, which the coordinator recognises as a duplicate.

use chrono::Utc;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::Value;
use warren::envelope::{header_str, headers, PERSISTENT};
use warren::workflow::{StepEvent, StepOutcome};
use warren::Task;

/// The event of a step task that succeeded with `result` (dropped when its
/// JSON is larger than `max_result_bytes`).
pub(super) fn succeeded(
    task: &Task,
    result: Option<Value>,
    max_result_bytes: usize,
) -> Option<Vec<u8>> {
    let step = task.step.as_ref()?;
    let size = result
        .as_ref()
        .map_or(0, |v| serde_json::to_vec(v).map_or(usize::MAX, |b| b.len()));
    let dropped = size > max_result_bytes;
    if dropped {
        tracing::warn!(
            size,
            max_result_bytes,
            "step result over workflow.max_result_bytes: dropped"
        );
    }
    let ev = StepEvent {
        workflow: step.workflow.clone(),
        run: step.run.clone(),
        step: step.step.clone(),
        task_id: task.id.clone(),
        outcome: StepOutcome::Succeeded,
        attempt: task.attempt,
        error: None,
        dead_kind: None,
        result: if dropped { None } else { result },
        result_dropped: dropped,
        at: Utc::now(),
    };
    serde_json::to_vec(&ev).ok()
}

/// The event of a step task being dead-lettered with `props` (the dead
/// copy's properties, dead headers included). `None` when it is no step.
pub(super) fn dead(props: &BasicProperties) -> Option<Vec<u8>> {
    let empty = FieldTable::default();
    let h = props.headers().as_ref().unwrap_or(&empty);
    let attempt = match h.inner().get(headers::ATTEMPT) {
        Some(lapin::types::AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(1),
        _ => 1,
    };
    let ev = StepEvent {
        workflow: header_str(h, headers::WORKFLOW)?,
        run: header_str(h, headers::RUN)?,
        step: header_str(h, headers::STEP)?,
        task_id: props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        outcome: StepOutcome::Dead,
        attempt,
        error: header_str(h, headers::DEAD_REASON),
        dead_kind: header_str(h, headers::DEAD_KIND),
        result: None,
        result_dropped: false,
        at: Utc::now(),
    };
    serde_json::to_vec(&ev).ok()
}

pub(super) fn properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
}
