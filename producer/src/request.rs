//! An ad-hoc task as the CLI (`publish --batch`, one JSON object per line) and
//! the HTTP API (`POST /v1/tasks`) accept it, and its validation into a
//! [`warren::Task`] plus the delay to route it with.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use warren::delay::{MAX_DELAY, MAX_TASK_NAME_LEN};
use warren::Task;

/// `{"task": "email.send", "payload": {...}, "delay": "90s", ...}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// Task name (the routing key).
    #[serde(alias = "name")]
    pub task: String,
    /// JSON payload; `{}` when absent.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Task id (`message_id`); a UUID when absent.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub priority: Option<u8>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Handler timeout override, e.g. `"30s"`.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Deliver after this long, e.g. `"90s"` (exclusive with `at`).
    #[serde(default, with = "humantime_serde")]
    pub delay: Option<Duration>,
    /// Deliver at this RFC 3339 instant (exclusive with `delay`).
    #[serde(default)]
    pub at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub correlation_id: Option<String>,
}

impl TaskRequest {
    /// Validate and build the task and its delay, relative to `now`.
    pub fn into_task(self, now: DateTime<Utc>) -> Result<(Task, Duration), String> {
        if self.task.is_empty() {
            return Err("`task` is empty".into());
        }
        if self.task.len() > MAX_TASK_NAME_LEN {
            return Err(format!("`task` is longer than {MAX_TASK_NAME_LEN} bytes"));
        }
        if self.task.contains(['*', '#']) {
            return Err("`task` may not contain `*` or `#`".into());
        }
        let delay = match (self.delay, self.at) {
            (Some(_), Some(_)) => return Err("give `delay` or `at`, not both".into()),
            (Some(d), None) => d,
            (None, Some(at)) => (at - now).to_std().unwrap_or(Duration::ZERO),
            (None, None) => Duration::ZERO,
        };
        if delay > MAX_DELAY {
            return Err(format!(
                "delay {} is longer than the maximum {}",
                humantime::format_duration(delay),
                humantime::format_duration(MAX_DELAY)
            ));
        }
        let payload = self
            .payload
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        let mut task = Task::new(self.task, &payload);
        if let Some(id) = self.id {
            if id.is_empty() || id.len() > 255 {
                return Err("`id` must be 1 to 255 bytes".into());
            }
            task.id = id;
        }
        task.priority = self.priority;
        task.max_attempts = self.max_attempts;
        task.timeout = self.timeout;
        task.correlation_id = self.correlation_id;
        if !delay.is_zero() {
            task.not_before = chrono::TimeDelta::from_std(delay).ok().map(|d| now + d);
        }
        Ok((task, delay))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<(Task, Duration), String> {
        serde_json::from_str::<TaskRequest>(json)
            .map_err(|e| e.to_string())?
            .into_task(Utc::now())
    }

    #[test]
    fn minimal_and_full() {
        let (t, d) = req(r#"{"task":"a.b"}"#).unwrap();
        assert_eq!(t.name, "a.b");
        assert_eq!(t.payload, b"{}");
        assert!(d.is_zero());
        let (t, d) =
            req(r#"{"task":"a","payload":[1],"id":"x","priority":3,"delay":"90s"}"#).unwrap();
        assert_eq!(
            (t.id.as_str(), t.priority, d),
            ("x", Some(3), Duration::from_secs(90))
        );
        assert!(t.not_before.is_some());
    }

    #[test]
    fn rejects() {
        assert!(req(r#"{"task":""}"#).unwrap_err().contains("empty"));
        assert!(
            req(r#"{"task":"a","delay":"1s","at":"2030-01-01T00:00:00Z"}"#)
                .unwrap_err()
                .contains("not both")
        );
        assert!(req(r#"{"task":"a","delay":"100days"}"#)
            .unwrap_err()
            .contains("maximum"));
        assert!(req(r#"{"task":"a","bogus":1}"#)
            .unwrap_err()
            .contains("bogus"));
    }
}
