//! An ad-hoc task as the CLI (`publish --batch`, one JSON object per line) and
//! the HTTP API (`POST /v1/tasks`) accept it, and its validation into a
//! [`warren::Task`] plus the delay to route it with.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use warren::delay::{MAX_DELAY, MAX_TASK_NAME_LEN};
use warren::trace::TraceContext;
use warren::Task;

/// Why a request is not a task. The messages are part of the API and CLI
/// output (docs/api.md quotes them).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, or JSON of the wrong shape: [`json_error`]'s words.
    #[error("{0}")]
    Json(String),
    #[error("`task` is empty")]
    EmptyName,
    #[error("`task` is longer than {MAX_TASK_NAME_LEN} bytes")]
    NameTooLong,
    #[error("`task` may not contain `*` or `#`")]
    Wildcard,
    #[error("give `delay` or `at`, not both")]
    DelayAndAt,
    #[error("the task would start {} from now, past any representable instant", humantime::format_duration(*.0))]
    Unrepresentable(Duration),
    #[error("`id` must be 1 to 255 bytes")]
    BadId,
    #[error("`traceparent` is not a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all zero)")]
    BadTraceparent,
    #[error("`tracestate` needs a `traceparent`")]
    LoneTracestate,
}

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
    /// W3C trace context of this task; wins over the request's headers.
    #[serde(default)]
    pub traceparent: Option<String>,
    #[serde(default)]
    pub tracestate: Option<String>,
}

impl TaskRequest {
    /// One NDJSON line, with an error that speaks of the line as the user
    /// wrote it (serde's own says "line 1" of a one-line document).
    pub fn from_line(line: &str) -> Result<TaskRequest, RequestError> {
        serde_json::from_str(line).map_err(|e| RequestError::Json(json_error(&e)))
    }

    /// Validate and build the task and its delay, relative to `now`, in a
    /// trace of its own unless the request names one.
    pub fn into_task(self, now: DateTime<Utc>) -> Result<(Task, Duration), RequestError> {
        self.into_task_in(now, None)
    }

    /// [`into_task`](Self::into_task) where `inherited` (the trace of the
    /// HTTP request that carries it) stands in for a missing `traceparent`.
    pub fn into_task_in(
        self,
        now: DateTime<Utc>,
        inherited: Option<&TraceContext>,
    ) -> Result<(Task, Duration), RequestError> {
        let trace = match (&self.traceparent, &self.tracestate) {
            (Some(tp), state) => {
                TraceContext::parse(tp, state.as_deref()).ok_or(RequestError::BadTraceparent)?
            }
            (None, Some(_)) => return Err(RequestError::LoneTracestate),
            (None, None) => inherited.cloned().unwrap_or_else(TraceContext::new_root),
        };
        if self.task.is_empty() {
            return Err(RequestError::EmptyName);
        }
        if self.task.len() > MAX_TASK_NAME_LEN {
            return Err(RequestError::NameTooLong);
        }
        if self.task.contains(['*', '#']) {
            return Err(RequestError::Wildcard);
        }
        let wait = match (self.delay, self.at) {
            (Some(_), Some(_)) => return Err(RequestError::DelayAndAt),
            (Some(d), None) => d,
            (None, Some(at)) => (at - now).to_std().unwrap_or(Duration::ZERO),
            (None, None) => Duration::ZERO,
        };
        // An ETA of any length: the first trip through the delay levels is
        // capped at their range and `x-warren-not-before` keeps the real
        // instant, so a consumer that receives it early parks it again.
        let not_before = if wait.is_zero() {
            None
        } else {
            let ahead = chrono::TimeDelta::from_std(wait)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .ok_or(RequestError::Unrepresentable(wait))?;
            Some(ahead)
        };
        let delay = wait.min(MAX_DELAY);
        let payload = self
            .payload
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        let mut task = Task::new(self.task, &payload);
        if let Some(id) = self.id {
            if id.is_empty() || id.len() > 255 {
                return Err(RequestError::BadId);
            }
            task.id = id;
        }
        task.priority = self.priority;
        task.max_attempts = self.max_attempts;
        task.timeout = self.timeout;
        task.correlation_id = self.correlation_id;
        task.not_before = not_before;
        task.trace = Some(trace);
        Ok((task, delay))
    }
}

/// `(task, delay)` pairs by reference, as `publish_tasks` takes them (a
/// concrete `Vec` keeps the future `Send`).
pub fn pairs(tasks: &[(Task, Duration)]) -> Vec<(&Task, Duration)> {
    tasks.iter().map(|(t, d)| (t, *d)).collect()
}

/// serde_json's reason without its position suffix, in words for people; a
/// syntax error says the column (the caller knows the line).
pub fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let msg = e.to_string();
    let reason = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
    let reason = match reason {
        "expected ident" => "a bare word where a JSON value should be (quote strings)",
        "expected value" => "a JSON value was expected",
        "key must be a string" => "an object key must be a quoted string",
        r => r,
    };
    match e.classify() {
        Category::Syntax | Category::Eof => {
            format!("not valid JSON at column {}: {reason}", e.column())
        }
        Category::Data | Category::Io => reason.to_owned(),
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
            .map_err(|e| e.to_string())
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

    /// Past the levels' range (~38.8 days) the first trip is capped and the
    /// not-before instant is exact: the consumer parks it again on arrival.
    #[test]
    fn eta_of_any_length() {
        let now = Utc::now();
        let at = now + chrono::TimeDelta::days(400);
        let json = format!(r#"{{"task":"a","at":"{}"}}"#, at.to_rfc3339());
        let (t, d) = serde_json::from_str::<TaskRequest>(&json)
            .unwrap()
            .into_task(now)
            .unwrap();
        assert_eq!(d, MAX_DELAY);
        // RFC 3339 text keeps nanoseconds: the instant survives exactly.
        assert_eq!(t.not_before, Some(at));
        let (t, d) = req(r#"{"task":"a","delay":"100days"}"#).unwrap();
        assert_eq!(d, MAX_DELAY);
        let ahead = t.not_before.unwrap() - Utc::now();
        assert!(ahead > chrono::TimeDelta::days(99), "{ahead}");
        let (t, d) = req(r#"{"task":"a","delay":"10s"}"#).unwrap();
        assert_eq!(d, Duration::from_secs(10));
        assert!(t.not_before.is_some());
    }

    #[test]
    fn trace_from_the_body_else_inherited_else_fresh() {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let inherited = TraceContext::parse(TP, None).unwrap();
        let parse = |json: &str| serde_json::from_str::<TaskRequest>(json).unwrap();
        let (t, _) = parse(r#"{"task":"a"}"#)
            .into_task_in(Utc::now(), Some(&inherited))
            .unwrap();
        assert_eq!(t.trace.as_ref(), Some(&inherited));
        let body = r#"{"task":"a","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","tracestate":"k=v"}"#;
        let (t, _) = parse(body)
            .into_task_in(Utc::now(), Some(&inherited))
            .unwrap();
        let own = t.trace.unwrap();
        assert_eq!(own.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(own.state.as_deref(), Some("k=v"));
        let (a, _) = req(r#"{"task":"a"}"#).unwrap();
        let (b, _) = req(r#"{"task":"a"}"#).unwrap();
        assert_ne!(a.trace.unwrap().trace_id, b.trace.unwrap().trace_id);
        assert_eq!(
            req(r#"{"task":"a","traceparent":"00-xyz"}"#).unwrap_err(),
            RequestError::BadTraceparent.to_string()
        );
        assert_eq!(
            req(r#"{"task":"a","tracestate":"k=v"}"#).unwrap_err(),
            "`tracestate` needs a `traceparent`"
        );
    }

    #[test]
    fn line_errors_speak_of_the_line() {
        let line_error = |l: &str| TaskRequest::from_line(l).unwrap_err().to_string();
        let e = line_error(r#"{"task": tru}"#);
        assert_eq!(
            e,
            "not valid JSON at column 13: a bare word where a JSON value should be (quote strings)"
        );
        let e = line_error("{task: 1}");
        assert!(
            e.starts_with("not valid JSON at column 2: an object key must be a quoted string"),
            "{e}"
        );
        let e = line_error(r#"{"task":"a","bogus":1}"#);
        assert!(e.starts_with("unknown field `bogus`"), "{e}");
        assert!(!e.contains("line 1"), "{e}");
    }

    /// API bodies, CLI errors and docs/api.md quote these words.
    #[test]
    fn messages_stay_word_for_word() {
        assert_eq!(req(r#"{"task":""}"#).unwrap_err(), "`task` is empty");
        assert_eq!(
            req(&format!(r#"{{"task":"{}"}}"#, "a".repeat(300))).unwrap_err(),
            format!("`task` is longer than {MAX_TASK_NAME_LEN} bytes")
        );
        assert_eq!(
            req(r#"{"task":"a.*"}"#).unwrap_err(),
            "`task` may not contain `*` or `#`"
        );
        assert_eq!(
            req(r#"{"task":"a","delay":"1s","at":"2030-01-01T00:00:00Z"}"#).unwrap_err(),
            "give `delay` or `at`, not both"
        );
        assert_eq!(
            req(r#"{"task":"a","delay":"1000000000years"}"#).unwrap_err(),
            "the task would start 1000000000years from now, past any representable instant"
        );
        assert_eq!(
            req(r#"{"task":"a","id":""}"#).unwrap_err(),
            "`id` must be 1 to 255 bytes"
        );
    }

    #[test]
    fn rejects() {
        assert!(req(r#"{"task":""}"#).unwrap_err().contains("empty"));
        assert!(
            req(r#"{"task":"a","delay":"1s","at":"2030-01-01T00:00:00Z"}"#)
                .unwrap_err()
                .contains("not both")
        );
        assert!(req(r#"{"task":"a","delay":"1000000000years"}"#)
            .unwrap_err()
            .contains("representable"));
        assert!(req(r#"{"task":"a","bogus":1}"#)
            .unwrap_err()
            .contains("bogus"));
    }
}
