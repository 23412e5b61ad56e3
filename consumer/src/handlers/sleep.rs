//! `sleep`: waits, then succeeds. The payload may say how long with
//! `{"sleep_ms": 1500}` or `{"duration": "1.5s"}`; otherwise the configured
//! duration. For drain tests and benchmarks.

use std::time::Duration;

use warren::Task;

use crate::handler::{Handler, TaskError};

pub struct Sleep {
    default: Duration,
}

impl Sleep {
    pub fn new(default: Duration) -> Self {
        Self { default }
    }

    /// The duration a payload asks for, if any.
    pub fn requested(payload: &serde_json::Value) -> Result<Option<Duration>, String> {
        if let Some(ms) = payload.get("sleep_ms") {
            return ms
                .as_u64()
                .map(|ms| Some(Duration::from_millis(ms)))
                .ok_or_else(|| format!("sleep_ms must be a non-negative integer, got {ms}"));
        }
        if let Some(d) = payload.get("duration") {
            let s = d
                .as_str()
                .ok_or_else(|| format!("duration must be a string like \"2s\", got {d}"))?;
            return humantime::parse_duration(s)
                .map(Some)
                .map_err(|e| format!("duration {s:?}: {e}"));
        }
        Ok(None)
    }
}

impl Handler for Sleep {
    async fn run(&self, task: Task) -> Result<(), TaskError> {
        let payload: serde_json::Value = task.payload_as().map_err(TaskError::permanent)?;
        let d = Self::requested(&payload)
            .map_err(TaskError::permanent)?
            .unwrap_or(self.default);
        tokio::time::sleep(d).await;
        tracing::info!(task.id = %task.id, task.name = %task.name, task.attempt = task.attempt, slept_ms = d.as_millis() as u64, "sleep handled task");
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payload_overrides_config() {
        assert_eq!(
            Sleep::requested(&json!({"sleep_ms": 20})).unwrap(),
            Some(Duration::from_millis(20))
        );
        assert_eq!(
            Sleep::requested(&json!({"duration": "2s"})).unwrap(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(Sleep::requested(&json!({"x": 1})).unwrap(), None);
        assert!(Sleep::requested(&json!({"sleep_ms": "soon"})).is_err());
    }
}
