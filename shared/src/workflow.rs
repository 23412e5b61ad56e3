//! The workflow messages both roles exchange through `<prefix>.workflows`
//! (a direct exchange and a queue of that name, see [`crate::topology`]):
//! a run's start (the public contract, routing key [`START`]), a step's
//! outcome reported by a consumer ([`EVENT`]) and an operator's resume
//! ([`RESUME`]). The coordinator on the producer leader consumes them all.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Routing key of a start message.
pub const START: &str = "start";
/// Routing key of a step outcome sent by a consumer.
pub const EVENT: &str = "event";
/// Routing key of a resume request.
pub const RESUME: &str = "resume";
/// Every routing key the workflows queue is bound with.
pub const KEYS: &[&str] = &[START, EVENT, RESUME];

/// Suffix of a compensation's step name (`<step>.compensate`).
pub const COMPENSATE_SUFFIX: &str = ".compensate";

/// Body of a start message. The run id is the message's `message_id`
/// (generated when absent); a `traceparent` header makes the run a child of
/// the caller's trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Start {
    pub workflow: String,
    #[serde(default)]
    pub input: serde_json::Value,
}

/// Body of a resume request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    pub workflow: String,
    pub run: String,
}

/// How a step's task ended, as far as the workflow cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    Succeeded,
    /// Dead-lettered: exhausted, permanent, bad signature, poison.
    Dead,
}

/// Body of a step outcome event (routing key [`EVENT`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEvent {
    pub workflow: String,
    pub run: String,
    pub step: String,
    pub task_id: String,
    pub outcome: StepOutcome,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_kind: Option<String>,
    /// The handler's result (JSON), when it set one within the cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The handler set a result larger than the consumer's
    /// `workflow.max_result_bytes`: it was dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub result_dropped: bool,
    pub at: DateTime<Utc>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn event_round_trip_and_field_names() {
        let e = StepEvent {
            workflow: "w".into(),
            run: "r".into(),
            step: "a".into(),
            task_id: "r:a".into(),
            outcome: StepOutcome::Dead,
            attempt: 3,
            error: Some("boom".into()),
            dead_kind: Some("exhausted".into()),
            result: None,
            result_dropped: false,
            at: Utc::now(),
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["outcome"], "dead");
        assert_eq!(v["dead_kind"], "exhausted");
        assert!(v.get("result").is_none());
        let back: StepEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let s: Start = serde_json::from_str(r#"{"workflow":"w"}"#).unwrap();
        assert_eq!(s.input, serde_json::Value::Null);
    }
}
