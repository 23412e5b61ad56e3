//! The message contract: a [`Task`] and its mapping to and from an AMQP message.
//!
//! The body is the task's JSON payload, untouched. Everything else rides in
//! standard AMQP properties (`message_id`, `type`, `timestamp`, `priority`,
//! `correlation_id`) and in `x-warren-*` headers, so any AMQP client can publish a
//! task with nothing but a routing key and a JSON body. Header names are
//! defined here and nowhere else.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

use crate::delay;
/// The type lives with the policy it overrides; the name stays here too.
pub use crate::retry::RetryOverrides;
use crate::trace::TraceContext;

/// `x-warren-*` header names: the public contract (documented in docs/contract.md).
pub mod headers {
    /// 1-based attempt number of this delivery (absent = 1).
    pub const ATTEMPT: &str = "x-warren-attempt";
    /// Attempts allowed before the task is dead-lettered (overrides config).
    pub const MAX_ATTEMPTS: &str = "x-warren-max-attempts";
    /// Handler timeout in milliseconds (overrides config).
    pub const TIMEOUT_MS: &str = "x-warren-timeout-ms";
    /// RFC 3339 instant before which the task must not run.
    pub const NOT_BEFORE: &str = "x-warren-not-before";
    /// Name of the schedule that fired the task.
    pub const SCHEDULE: &str = "x-warren-schedule";
    /// Text of the error of the previous attempt.
    pub const LAST_ERROR: &str = "x-warren-last-error";
    /// RFC 3339 instant of the first failure.
    pub const FIRST_FAILED_AT: &str = "x-warren-first-failed-at";
    /// Publish instant in Unix milliseconds (the AMQP timestamp has only seconds).
    pub const PUBLISHED_AT_MS: &str = "x-warren-published-at-ms";
    /// Retry policy overrides.
    pub const RETRY_INITIAL_MS: &str = "x-warren-retry-initial-ms";
    pub const RETRY_MULTIPLIER: &str = "x-warren-retry-multiplier";
    pub const RETRY_MAX_MS: &str = "x-warren-retry-max-ms";
    pub const RETRY_JITTER: &str = "x-warren-retry-jitter";
    /// `v1:<key id>:<base64 HMAC-SHA256>` over the canonical form of
    /// [`crate::security::canonical`]; carried through retries untouched.
    pub const SIGNATURE: &str = "x-warren-signature";
    /// Set on dead-lettered copies: why, what kind of failure, when, where from.
    pub const DEAD_REASON: &str = "x-warren-dead-reason";
    pub const DEAD_KIND: &str = "x-warren-dead-kind";
    pub const DEAD_AT: &str = "x-warren-dead-at";
    pub const ORIGINAL_QUEUE: &str = "x-warren-original-queue";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-warren-original-routing-key";
    /// Set on a dead task replayed with an edited payload: who edited it
    /// (an API grant's name) and when (RFC 3339).
    pub const EDITED_BY: &str = "x-warren-edited-by";
    pub const EDITED_AT: &str = "x-warren-edited-at";
    /// A workflow step task: its workflow's name, the run id and the step's
    /// name (all three, or the task is not a step).
    pub const WORKFLOW: &str = "x-warren-workflow";
    pub const RUN: &str = "x-warren-run";
    pub const STEP: &str = "x-warren-step";
    /// W3C trace context, under the names the W3C gives them.
    pub use crate::trace::{TRACEPARENT, TRACESTATE};
}

/// AMQP delivery mode for persistent messages.
pub const PERSISTENT: u8 = 2;
/// Content type of every body warren publishes.
pub const CONTENT_TYPE: &str = "application/json";

/// A task: what a handler runs, and what travels with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Stable across retries (`message_id`).
    pub id: String,
    /// Task name (`type`, else the routing key without any delay prefix).
    pub name: String,
    /// Raw JSON body, validated at decode time.
    pub payload: Vec<u8>,
    pub attempt: u32,
    /// `x-warren-max-attempts`. Decoding puts it here, never in
    /// `retry.max_attempts`; when publishing, either may be set (this one
    /// wins).
    pub max_attempts: Option<u32>,
    pub timeout: Option<Duration>,
    pub not_before: Option<DateTime<Utc>>,
    pub priority: Option<u8>,
    pub correlation_id: Option<String>,
    /// AMQP `timestamp` (seconds) refined by [`headers::PUBLISHED_AT_MS`]:
    /// when this copy was published.
    pub published_at: Option<DateTime<Utc>>,
    /// AMQP `timestamp` (Unix seconds) of the first publish, kept by every
    /// republish (a signature covers it). Set when a task is created.
    pub timestamp: Option<u64>,
    /// AMQP `content_type` as first published (`None`: [`CONTENT_TYPE`]).
    pub content_type: Option<String>,
    /// AMQP `content_encoding`, kept by every republish (an encrypted task
    /// carries its key id here, and `payload` is then the ciphertext).
    pub content_encoding: Option<String>,
    pub schedule: Option<String>,
    pub last_error: Option<String>,
    pub first_failed_at: Option<DateTime<Utc>>,
    /// `x-warren-retry-*`: the backoff overrides of this message.
    pub retry: RetryOverrides,
    /// `traceparent` + `tracestate`, kept by every republish. An invalid
    /// `traceparent` is not decoded here (it stays in `extra_headers`).
    pub trace: Option<TraceContext>,
    /// Set on a workflow step's task.
    pub step: Option<StepRef>,
    /// Headers this module does not own (`x-warren-dead-*`, the broker's
    /// `x-death`, users' own), carried through republishes.
    pub extra_headers: FieldTable,
}

/// Which workflow run and step a task is (headers
/// [`headers::WORKFLOW`], [`headers::RUN`], [`headers::STEP`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRef {
    pub workflow: String,
    pub run: String,
    pub step: String,
}

/// Why a message is not a valid task. Each is a poison reason: the message is
/// dead-lettered with this text, never retried.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("body is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("no task name: empty routing key and no `type` property")]
    MissingName,
    #[error("header {header}: expected {expected}, got {got}")]
    BadHeader {
        header: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("task name is {0} bytes, over the {max}-byte limit", max = delay::MAX_TASK_NAME_LEN)]
    NameTooLong(usize),
}

impl EnvelopeError {
    /// Short, bounded label for metrics and the dead-letter `kind` header.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::TooLarge { .. } => "oversized",
            Self::MissingName => "missing_name",
            Self::BadHeader { .. } => "bad_header",
            Self::NameTooLong(_) => "name_too_long",
        }
    }
}

impl Task {
    /// A new first-attempt task with a fresh id. The payload must be JSON.
    pub fn new(name: impl Into<String>, payload: &serde_json::Value) -> Self {
        Self::from_raw(
            name,
            serde_json::to_vec(payload).unwrap_or_else(|_| b"null".to_vec()),
        )
    }

    /// A new task from already-serialised JSON bytes (not re-validated).
    pub fn from_raw(name: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            id: new_id(),
            name: name.into(),
            payload,
            attempt: 1,
            max_attempts: None,
            timeout: None,
            not_before: None,
            priority: None,
            correlation_id: None,
            published_at: None,
            timestamp: Some(Utc::now().timestamp().max(0) as u64),
            content_type: None,
            content_encoding: None,
            schedule: None,
            last_error: None,
            first_failed_at: None,
            retry: RetryOverrides::default(),
            trace: None,
            step: None,
            extra_headers: FieldTable::default(),
        }
    }

    /// Decode a delivered message. `max_body` bounds the body size. An
    /// encrypted body ([`crate::security::is_encrypted`]) is kept as it is,
    /// unchecked: its JSON is checked once decrypted ([`check_json`]).
    pub fn decode(
        routing_key: &str,
        props: &BasicProperties,
        body: &[u8],
        max_body: usize,
    ) -> Result<Self, EnvelopeError> {
        let name = checked_name(routing_key, props, body, max_body)?;
        let empty = FieldTable::default();
        let h = props.headers().as_ref().unwrap_or(&empty);
        let Linked { trace, step, extra } = Linked::decode(h);
        let (attempt, max_attempts) = attempts(h)?;
        let published_at = match get_u64(h, headers::PUBLISHED_AT_MS)? {
            Some(ms) => Utc.timestamp_millis_opt(ms as i64).single(),
            None => {
                (props.timestamp().map(|s| s as i64)).and_then(|s| Utc.timestamp_opt(s, 0).single())
            }
        };
        let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
        Ok(Self {
            id: text(props.message_id())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(new_id),
            name,
            payload: body.to_vec(),
            attempt,
            max_attempts,
            timeout: get_u64(h, headers::TIMEOUT_MS)?.map(Duration::from_millis),
            not_before: get_time(h, headers::NOT_BEFORE)?,
            priority: *props.priority(),
            correlation_id: text(props.correlation_id()),
            published_at,
            timestamp: *props.timestamp(),
            // Absent and the default are one thing (`None`), as in the
            // canonical form a signature covers.
            content_type: text(props.content_type()).filter(|s| s != CONTENT_TYPE),
            content_encoding: text(props.content_encoding()),
            schedule: get_str(h, headers::SCHEDULE)?,
            last_error: get_str(h, headers::LAST_ERROR)?,
            first_failed_at: get_time(h, headers::FIRST_FAILED_AT)?,
            retry: retry_overrides(h)?,
            trace,
            step,
            extra_headers: extra,
        })
    }

    /// AMQP properties for publishing this task: persistent, JSON, `type` set,
    /// this copy's publish instant stamped now (`x-warren-published-at-ms`),
    /// `timestamp`, content type and encoding as first published.
    pub fn properties(&self) -> BasicProperties {
        self.properties_at(Utc::now())
    }

    /// [`properties`](Self::properties) with `now` as this copy's publish
    /// instant: a scheduled tick staged ahead of its instant is stamped
    /// with the instant, when its transaction makes it visible.
    pub fn properties_at(&self, now: DateTime<Utc>) -> BasicProperties {
        let mut h = self.extra_headers.clone();
        if self.attempt > 1 {
            put(
                &mut h,
                headers::ATTEMPT,
                AMQPValue::LongLongInt(self.attempt as i64),
            );
        }
        if let Some(v) = self.max_attempts.or(self.retry.max_attempts) {
            put(
                &mut h,
                headers::MAX_ATTEMPTS,
                AMQPValue::LongLongInt(v as i64),
            );
        }
        if let Some(v) = self.timeout {
            put(&mut h, headers::TIMEOUT_MS, ms(v));
        }
        if let Some(v) = self.not_before {
            put(&mut h, headers::NOT_BEFORE, time(v));
        }
        if let Some(v) = &self.schedule {
            put(&mut h, headers::SCHEDULE, string(v));
        }
        if let Some(v) = &self.last_error {
            put(&mut h, headers::LAST_ERROR, string(v));
        }
        if let Some(v) = self.first_failed_at {
            put(&mut h, headers::FIRST_FAILED_AT, time(v));
        }
        if let Some(v) = self.retry.initial_delay {
            put(&mut h, headers::RETRY_INITIAL_MS, ms(v));
        }
        if let Some(v) = self.retry.multiplier {
            put(&mut h, headers::RETRY_MULTIPLIER, AMQPValue::Double(v));
        }
        if let Some(v) = self.retry.max_delay {
            put(&mut h, headers::RETRY_MAX_MS, ms(v));
        }
        if let Some(v) = self.retry.jitter {
            put(&mut h, headers::RETRY_JITTER, AMQPValue::Double(v));
        }
        if let Some(t) = &self.trace {
            put(&mut h, headers::TRACEPARENT, string(&t.traceparent()));
            if let Some(state) = &t.state {
                put(&mut h, headers::TRACESTATE, string(state));
            }
        }
        if let Some(s) = &self.step {
            put(&mut h, headers::WORKFLOW, string(&s.workflow));
            put(&mut h, headers::RUN, string(&s.run));
            put(&mut h, headers::STEP, string(&s.step));
        }
        put(
            &mut h,
            headers::PUBLISHED_AT_MS,
            AMQPValue::LongLongInt(now.timestamp_millis()),
        );
        let mut p = BasicProperties::default()
            .with_content_type(self.content_type.as_deref().unwrap_or(CONTENT_TYPE).into())
            .with_delivery_mode(PERSISTENT)
            .with_message_id(self.id.as_str().into())
            .with_type(self.name.as_str().into())
            .with_headers(h);
        if let Some(v) = self.timestamp {
            p = p.with_timestamp(v);
        }
        if let Some(v) = &self.content_encoding {
            p = p.with_content_encoding(v.as_str().into());
        }
        if let Some(v) = self.priority {
            p = p.with_priority(v);
        }
        if let Some(v) = &self.correlation_id {
            p = p.with_correlation_id(v.as_str().into());
        }
        p
    }

    /// Typed view of the payload.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.payload)
    }

    /// How long the task waited between its publish and `now`.
    pub fn queue_wait(&self, now: DateTime<Utc>) -> Option<Duration> {
        self.published_at.and_then(|p| (now - p).to_std().ok())
    }

    /// The task's trace, starting a fresh one if it came without a valid
    /// `traceparent` (a plain AMQP client). An invalid pair is dropped, as
    /// the W3C asks, so the new one is what every later copy carries.
    pub fn ensure_trace(&mut self) -> &TraceContext {
        let is_trace = |k: &str| k == headers::TRACEPARENT || k == headers::TRACESTATE;
        // Most traceless tasks carry no trace header at all: then the table
        // is left as it is, not copied entry by entry.
        if self.trace.is_none()
            && self
                .extra_headers
                .inner()
                .keys()
                .any(|k| is_trace(k.as_str()))
        {
            let mut kept = FieldTable::default();
            for (k, v) in self.extra_headers.inner() {
                if !is_trace(k.as_str()) {
                    kept.insert(k.clone(), v.clone());
                }
            }
            self.extra_headers = kept;
        }
        self.trace.get_or_insert_with(TraceContext::new_root)
    }
}

/// The task name of a delivery whose body may be decoded: its `type`
/// property, else its routing key less any delay prefix; the body within
/// `max_body` and, unless encrypted, JSON.
fn checked_name(
    routing_key: &str,
    props: &BasicProperties,
    body: &[u8],
    max_body: usize,
) -> Result<String, EnvelopeError> {
    if body.len() > max_body {
        return Err(EnvelopeError::TooLarge {
            size: body.len(),
            limit: max_body,
        });
    }
    let name = match props.kind() {
        Some(t) if !t.as_str().is_empty() => t.as_str().to_owned(),
        _ => delay::strip_prefix(routing_key).to_owned(),
    };
    if name.is_empty() {
        return Err(EnvelopeError::MissingName);
    }
    if name.len() > delay::MAX_TASK_NAME_LEN {
        return Err(EnvelopeError::NameTooLong(name.len()));
    }
    if !crate::security::is_encrypted(props) {
        check_json(body)?;
    }
    Ok(name)
}

/// What links a task to others: its trace and workflow step, decoded only
/// when whole and valid (anything else travels on untouched, never a
/// reason to refuse a task), and the headers the envelope does not own.
struct Linked {
    trace: Option<TraceContext>,
    step: Option<StepRef>,
    extra: FieldTable,
}

impl Linked {
    fn decode(h: &FieldTable) -> Self {
        let mut extra = FieldTable::default();
        for (k, v) in h {
            if !OWNED.contains(&k.as_str()) && !OWNED_WHEN_VALID.contains(&k.as_str()) {
                extra.insert(k.clone(), v.clone());
            }
        }
        let trace = header_str(h, headers::TRACEPARENT)
            .and_then(|tp| TraceContext::parse(&tp, header_str(h, headers::TRACESTATE).as_deref()));
        let step = match (
            header_str(h, headers::WORKFLOW),
            header_str(h, headers::RUN),
            header_str(h, headers::STEP),
        ) {
            (Some(workflow), Some(run), Some(step)) => Some(StepRef {
                workflow,
                run,
                step,
            }),
            _ => None,
        };
        let undecoded: &[&str] = match (&trace, &step) {
            (None, None) => OWNED_WHEN_VALID,
            (None, Some(_)) => &[headers::TRACEPARENT, headers::TRACESTATE],
            (Some(_), None) => &[headers::WORKFLOW, headers::RUN, headers::STEP],
            (Some(_), Some(_)) => &[],
        };
        for k in undecoded {
            if let Some(v) = h.inner().get(*k) {
                extra.insert(ShortString::from(*k), v.clone());
            }
        }
        Self { trace, step, extra }
    }
}

/// The attempt (1 when absent) and the task's own attempt limit.
fn attempts(h: &FieldTable) -> Result<(u32, Option<u32>), EnvelopeError> {
    let attempt = get_u64(h, headers::ATTEMPT)?.unwrap_or(1);
    let attempt =
        u32::try_from(attempt.max(1)).map_err(|_| bad(headers::ATTEMPT, "u32", attempt))?;
    let max_attempts = get_u64(h, headers::MAX_ATTEMPTS)?
        .map(|v| u32::try_from(v).map_err(|_| bad(headers::MAX_ATTEMPTS, "u32", v)))
        .transpose()?;
    Ok((attempt, max_attempts))
}

/// The task's retry-policy headers (`max_attempts` has a header of its own).
fn retry_overrides(h: &FieldTable) -> Result<RetryOverrides, EnvelopeError> {
    Ok(RetryOverrides {
        max_attempts: None,
        initial_delay: get_u64(h, headers::RETRY_INITIAL_MS)?.map(Duration::from_millis),
        multiplier: get_f64(h, headers::RETRY_MULTIPLIER)?,
        max_delay: get_u64(h, headers::RETRY_MAX_MS)?.map(Duration::from_millis),
        jitter: get_f64(h, headers::RETRY_JITTER)?,
    })
}

/// Headers decoded into typed fields (everything else goes to `extra_headers`).
const OWNED: &[&str] = &[
    headers::ATTEMPT,
    headers::MAX_ATTEMPTS,
    headers::TIMEOUT_MS,
    headers::NOT_BEFORE,
    headers::SCHEDULE,
    headers::LAST_ERROR,
    headers::FIRST_FAILED_AT,
    headers::PUBLISHED_AT_MS,
    headers::RETRY_INITIAL_MS,
    headers::RETRY_MULTIPLIER,
    headers::RETRY_MAX_MS,
    headers::RETRY_JITTER,
];

/// Headers decoded into typed fields only when valid and complete
/// ([`Task::trace`], [`Task::step`]); otherwise kept in `extra_headers`.
const OWNED_WHEN_VALID: &[&str] = &[
    headers::TRACEPARENT,
    headers::TRACESTATE,
    headers::WORKFLOW,
    headers::RUN,
    headers::STEP,
];

/// The body must be JSON (a poison reason otherwise).
pub fn check_json(body: &[u8]) -> Result<(), EnvelopeError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(drop)
        .map_err(|e| EnvelopeError::InvalidJson(e.to_string()))
}

/// A fresh task id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Read a string header; any header value type counts only if it is a string.
pub fn header_str(h: &FieldTable, key: &str) -> Option<String> {
    match h.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Read an integer header of any AMQP integer width.
pub fn header_i64(h: &FieldTable, key: &str) -> Option<i64> {
    as_i64(h.inner().get(key)?)
}

fn as_i64(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(v) => *v as i64,
        AMQPValue::ShortShortUInt(v) => *v as i64,
        AMQPValue::ShortInt(v) => *v as i64,
        AMQPValue::ShortUInt(v) => *v as i64,
        AMQPValue::LongInt(v) => *v as i64,
        AMQPValue::LongUInt(v) => *v as i64,
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::Timestamp(v) => *v as i64,
        _ => return None,
    })
}

/// A header value as a person would write it (never Rust debug text).
fn describe(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => format!("{:?}", s.as_str()),
        AMQPValue::Boolean(b) => format!("{b} (a boolean)"),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::DecimalValue(d) => decimal(d).to_string(),
        AMQPValue::FieldArray(a) => format!("an array of {} values", a.as_slice().len()),
        AMQPValue::FieldTable(t) => format!("a table of {} entries", t.inner().len()),
        AMQPValue::ByteArray(b) => format!("{} raw bytes", b.as_slice().len()),
        AMQPValue::Void => "no value".to_owned(),
        other => as_i64(other).map_or_else(|| "an unsupported value".to_owned(), |i| i.to_string()),
    }
}

/// An AMQP decimal (`value` × 10^-`scale`), which some clients send for
/// numbers like 1.5.
fn decimal(d: &lapin::types::DecimalValue) -> f64 {
    f64::from(d.value) / 10f64.powi(i32::from(d.scale))
}

fn bad(header: &'static str, expected: &'static str, got: impl std::fmt::Display) -> EnvelopeError {
    EnvelopeError::BadHeader {
        header,
        expected,
        got: got.to_string(),
    }
}

/// Integers may come as any AMQP integer or as a decimal string (some clients
/// and UIs only send strings).
fn get_u64(h: &FieldTable, key: &'static str) -> Result<Option<u64>, EnvelopeError> {
    let Some(v) = h.inner().get(key) else {
        return Ok(None);
    };
    let parsed = match v {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            header_str(h, key).and_then(|s| s.trim().parse::<u64>().ok())
        }
        other => as_i64(other).and_then(|i| u64::try_from(i).ok()),
    };
    parsed
        .map(Some)
        .ok_or_else(|| bad(key, "a non-negative integer", describe(v)))
}

fn get_f64(h: &FieldTable, key: &'static str) -> Result<Option<f64>, EnvelopeError> {
    let Some(v) = h.inner().get(key) else {
        return Ok(None);
    };
    let parsed = match v {
        AMQPValue::Float(f) => Some(*f as f64),
        AMQPValue::Double(f) => Some(*f),
        AMQPValue::DecimalValue(d) => Some(decimal(d)),
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            header_str(h, key).and_then(|s| s.trim().parse::<f64>().ok())
        }
        other => as_i64(other).map(|i| i as f64),
    };
    parsed
        .filter(|f| f.is_finite() && *f >= 0.0)
        .map(Some)
        .ok_or_else(|| bad(key, "a non-negative number", describe(v)))
}

fn get_str(h: &FieldTable, key: &'static str) -> Result<Option<String>, EnvelopeError> {
    match h.inner().get(key) {
        None => Ok(None),
        Some(v) => header_str(h, key)
            .map(Some)
            .ok_or_else(|| bad(key, "a string", describe(v))),
    }
}

fn get_time(h: &FieldTable, key: &'static str) -> Result<Option<DateTime<Utc>>, EnvelopeError> {
    let Some(v) = h.inner().get(key) else {
        return Ok(None);
    };
    header_str(h, key)
        .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
        .map(|t| Some(t.with_timezone(&Utc)))
        .ok_or_else(|| bad(key, "an RFC 3339 instant", describe(v)))
}

fn put(h: &mut FieldTable, key: &str, v: AMQPValue) {
    h.insert(ShortString::from(key), v);
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn time(t: DateTime<Utc>) -> AMQPValue {
    string(&rfc3339(t))
}

fn ms(d: Duration) -> AMQPValue {
    AMQPValue::LongLongInt(d.as_millis().min(i64::MAX as u128) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn full_task() -> Task {
        let mut extra = FieldTable::default();
        extra.insert("x-user-thing".into(), AMQPValue::LongString("kept".into()));
        Task {
            id: "abc-123".into(),
            name: "email.send".into(),
            payload: br#"{"to":"a@b.c"}"#.to_vec(),
            attempt: 3,
            max_attempts: Some(7),
            timeout: Some(Duration::from_millis(2500)),
            not_before: Some(Utc.timestamp_millis_opt(1_700_000_000_123).unwrap()),
            priority: Some(5),
            correlation_id: Some("corr".into()),
            published_at: None,
            timestamp: Some(1_700_000_000),
            content_type: Some("application/vnd.x+json".into()),
            content_encoding: Some("gzip".into()),
            schedule: Some("nightly".into()),
            last_error: Some("boom".into()),
            first_failed_at: Some(Utc.timestamp_millis_opt(1_700_000_000_000).unwrap()),
            retry: RetryOverrides {
                max_attempts: None,
                initial_delay: Some(Duration::from_millis(200)),
                multiplier: Some(3.0),
                max_delay: Some(Duration::from_secs(60)),
                jitter: Some(0.25),
            },
            trace: TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("congo=t61rcWkgMzE"),
            ),
            step: Some(StepRef {
                workflow: "report".into(),
                run: "r-1".into(),
                step: "export".into(),
            }),
            extra_headers: extra,
        }
    }

    #[test]
    fn round_trips_every_property_and_header() {
        let t = full_task();
        let props = t.properties();
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/vnd.x+json")
        );
        let fresh = Task::new("a", &serde_json::json!({})).properties();
        assert_eq!(
            fresh.content_type().as_ref().map(|s| s.as_str()),
            Some(CONTENT_TYPE)
        );
        assert!(fresh.timestamp().is_some(), "a new task is stamped");
        let back = Task::decode("some.other.key", &props, &t.payload, MAX).unwrap();
        let published = back.published_at.expect("publish time stamped");
        assert!((Utc::now() - published).num_seconds().abs() < 5);
        assert_eq!(
            Task {
                published_at: None,
                ..back
            },
            t
        );
    }

    /// docs/contract.md: a retry republishes the covered properties as
    /// they came, an empty `content_type` included (it signs as empty,
    /// unlike an absent one).
    #[test]
    fn content_type_absent_empty_or_set_survives_a_republish() {
        for sent in [None, Some(""), Some(CONTENT_TYPE), Some("text/plain")] {
            let mut props = BasicProperties::default()
                .with_message_id("i".into())
                .with_timestamp(1);
            if let Some(ct) = sent {
                props = props.with_content_type(ct.into());
            }
            let mut t = Task::decode("a", &props, b"{}", MAX).unwrap();
            t.attempt = 2;
            let again = t.properties();
            let canonical = |p: &BasicProperties| {
                crate::security::canonical::Fields::of("a", p, b"{}")
                    .unwrap()
                    .to_bytes()
            };
            assert_eq!(canonical(&again), canonical(&props), "{sent:?}");
            assert_eq!(
                again.content_type().as_ref().map(|s| s.as_str()),
                Some(sent.unwrap_or(CONTENT_TYPE)),
                "{sent:?}"
            );
        }
    }

    #[test]
    fn invalid_trace_and_partial_step_headers_travel_untouched() {
        let mut h = FieldTable::default();
        h.insert(
            headers::TRACEPARENT.into(),
            AMQPValue::LongString("junk".into()),
        );
        h.insert(
            headers::TRACESTATE.into(),
            AMQPValue::LongString("a=b".into()),
        );
        h.insert(headers::RUN.into(), AMQPValue::LongString("r-9".into()));
        let props = BasicProperties::default().with_headers(h.clone());
        let t = Task::decode("a", &props, b"{}", MAX).unwrap();
        assert_eq!((t.trace.clone(), t.step.clone()), (None, None));
        let again = t.properties();
        let again = again.headers().as_ref().unwrap();
        for k in [headers::TRACEPARENT, headers::TRACESTATE, headers::RUN] {
            assert_eq!(again.inner().get(k), h.inner().get(k), "{k}");
        }
    }

    #[test]
    fn a_task_without_a_valid_trace_gets_one_that_replaces_the_invalid_pair() {
        let mut h = FieldTable::default();
        h.insert(
            headers::TRACEPARENT.into(),
            AMQPValue::LongString("junk".into()),
        );
        h.insert(
            headers::TRACESTATE.into(),
            AMQPValue::LongString("a=b".into()),
        );
        let props = BasicProperties::default().with_headers(h);
        let mut t = Task::decode("a", &props, b"{}", MAX).unwrap();
        let fresh = t.ensure_trace().clone();
        let again = Task::decode("a", &t.properties(), b"{}", MAX).unwrap();
        assert_eq!(again.trace, Some(fresh.clone()));
        assert!(!again.extra_headers.contains_key(headers::TRACESTATE));
        // A valid one is kept as it is.
        let mut again = again;
        assert_eq!(again.ensure_trace(), &fresh);
    }

    #[test]
    fn a_traceless_task_keeps_its_other_headers_when_it_gets_a_trace() {
        let mut h = FieldTable::default();
        h.insert("x-custom".into(), AMQPValue::LongString("v".into()));
        let props = BasicProperties::default().with_headers(h);
        let mut t = Task::decode("a", &props, b"{}", MAX).unwrap();
        let fresh = t.ensure_trace().clone();
        assert!(t.extra_headers.contains_key("x-custom"));
        let again = Task::decode("a", &t.properties(), b"{}", MAX).unwrap();
        assert_eq!(again.trace, Some(fresh));
        assert!(again.extra_headers.contains_key("x-custom"));
    }

    #[test]
    fn plain_client_message_is_a_task() {
        let props = BasicProperties::default();
        let t = Task::decode("report.daily", &props, br#"{"day":"mon"}"#, MAX).unwrap();
        assert_eq!(t.name, "report.daily");
        assert_eq!(t.attempt, 1);
        assert!(!t.id.is_empty());
        assert_eq!(t.max_attempts, None);
        assert_eq!(t.published_at, None);
        let again = Task::decode("report.daily", &props, b"{}", MAX).unwrap();
        assert_ne!(t.id, again.id, "a generated id is fresh per decode");
    }

    #[test]
    fn type_wins_over_delayed_routing_key() {
        let key = delay::routing_key(Duration::from_secs(2), "a.b");
        let t = Task::decode(&key, &BasicProperties::default(), b"1", MAX).unwrap();
        assert_eq!(t.name, "a.b");
        let props = BasicProperties::default().with_type("real.name".into());
        let t = Task::decode(&key, &props, b"1", MAX).unwrap();
        assert_eq!(t.name, "real.name");
    }

    #[test]
    fn string_integers_are_accepted() {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPT.into(), AMQPValue::LongString("4".into()));
        h.insert(headers::MAX_ATTEMPTS.into(), AMQPValue::ShortShortUInt(9));
        let props = BasicProperties::default().with_headers(h);
        let t = Task::decode("t", &props, b"{}", MAX).unwrap();
        assert_eq!((t.attempt, t.max_attempts), (4, Some(9)));
    }

    /// Header values are described as a person would write them, and an
    /// AMQP decimal (what some clients send for 1.5) counts as a number.
    #[test]
    fn header_errors_speak_of_values_not_structs() {
        let p = BasicProperties::default();
        let with = |k: &str, v: AMQPValue| {
            let mut h = FieldTable::default();
            h.insert(k.into(), v);
            p.clone().with_headers(h)
        };
        let d = lapin::types::DecimalValue {
            scale: 1,
            value: 15,
        };
        let t = Task::decode(
            "t",
            &with(headers::RETRY_MULTIPLIER, AMQPValue::DecimalValue(d)),
            b"{}",
            MAX,
        )
        .unwrap();
        assert_eq!(t.retry.multiplier, Some(1.5));
        let e = Task::decode(
            "t",
            &with(headers::ATTEMPT, AMQPValue::DecimalValue(d)),
            b"{}",
            MAX,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "header x-warren-attempt: expected a non-negative integer, got 1.5"
        );
        let e = Task::decode(
            "t",
            &with(headers::ATTEMPT, AMQPValue::Boolean(true)),
            b"{}",
            MAX,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "header x-warren-attempt: expected a non-negative integer, got true (a boolean)"
        );
        let e = Task::decode(
            "t",
            &with(
                headers::NOT_BEFORE,
                AMQPValue::FieldTable(FieldTable::default()),
            ),
            b"{}",
            MAX,
        )
        .unwrap_err()
        .to_string();
        assert!(e.ends_with("got a table of 0 entries"), "{e}");
        assert!(!e.contains('{'), "{e}");
    }

    #[test]
    fn poison_kinds_are_named() {
        let p = BasicProperties::default();
        let e = Task::decode("t", &p, b"{not json", MAX).unwrap_err();
        assert_eq!(e.kind(), "invalid_json");
        let e = Task::decode("t", &p, &[b' '; 11], 10).unwrap_err();
        assert_eq!(
            e,
            EnvelopeError::TooLarge {
                size: 11,
                limit: 10
            }
        );
        assert_eq!(
            Task::decode("", &p, b"{}", MAX).unwrap_err(),
            EnvelopeError::MissingName
        );
        let mut h = FieldTable::default();
        h.insert(
            headers::ATTEMPT.into(),
            AMQPValue::LongString("three".into()),
        );
        let e = Task::decode("t", &p.clone().with_headers(h), b"{}", MAX).unwrap_err();
        assert!(e.to_string().contains("x-warren-attempt"), "{e}");
        let mut h = FieldTable::default();
        h.insert(
            headers::NOT_BEFORE.into(),
            AMQPValue::LongString("tomorrow".into()),
        );
        let e = Task::decode("t", &p.clone().with_headers(h), b"{}", MAX).unwrap_err();
        assert_eq!(e.kind(), "bad_header");
        let long = "x".repeat(delay::MAX_TASK_NAME_LEN + 1);
        assert_eq!(
            Task::decode(&long, &p, b"{}", MAX).unwrap_err().kind(),
            "name_too_long"
        );
    }

    /// A schedule copies its whole `retry` table, `max_attempts` included,
    /// into a task: that still becomes `x-warren-max-attempts`.
    #[test]
    fn max_attempts_in_the_overrides_becomes_the_header() {
        let mut t = Task::new("a", &serde_json::json!({}));
        t.retry.max_attempts = Some(6);
        let back = Task::decode("a", &t.properties(), &t.payload, MAX).unwrap();
        assert_eq!(back.max_attempts, Some(6));
        assert_eq!(back.retry.max_attempts, None, "decoded into one place");
        t.max_attempts = Some(2);
        let back = Task::decode("a", &t.properties(), &t.payload, MAX).unwrap();
        assert_eq!(back.max_attempts, Some(2), "the field wins");
    }

    #[test]
    fn first_attempt_has_no_attempt_header() {
        let t = Task::new("a", &serde_json::json!({"k": 1}));
        let props = t.properties();
        let h = props.headers().clone().unwrap_or_default();
        assert!(!h.contains_key(headers::ATTEMPT));
        assert_eq!(t.payload_as::<serde_json::Value>().unwrap()["k"], 1);
    }
}
