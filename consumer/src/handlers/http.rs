//! `http`: POSTs the task's JSON payload to a URL fixed in config.
//!
//! 2xx → success. Network errors, timeouts, 5xx, 408 and 429 → retryable;
//! other 4xx → permanent. A `Retry-After` header (seconds or HTTP date) on a
//! retryable response sets the delay before the next attempt. The request
//! carries `X-Warren-Task-Id`, `X-Warren-Task-Name` and `X-Warren-Attempt` so
//! the receiver can deduplicate (delivery is at-least-once), and the task's
//! W3C `traceparent` (and `tracestate`), so the receiver joins its trace.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use warren::Task;

use crate::handler::{Handler, TaskError};

pub struct Http {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl Http {
    pub fn new(
        url: &str,
        timeout: Duration,
        headers: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("header name {k:?}: {e}"))?;
            let value = HeaderValue::from_str(v).map_err(|e| format!("header {k:?} value: {e}"))?;
            h.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .default_headers(h)
            .user_agent(concat!("warren-consumer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Self { client, url })
    }
}

/// Retryable or permanent, by status code.
pub fn classify(status: StatusCode) -> Option<crate::handler::ErrorKind> {
    use crate::handler::ErrorKind::*;
    if status.is_success() {
        None
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Some(Retryable)
    } else {
        Some(Permanent)
    }
}

/// `Retry-After`: delta seconds or an HTTP date.
pub fn parse_retry_after(v: &str, now: DateTime<Utc>) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

impl Handler for Http {
    async fn run(&self, task: Task) -> Result<(), TaskError> {
        let mut req = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-warren-task-id", &task.id)
            .header("x-warren-task-name", &task.name)
            .header("x-warren-attempt", task.attempt.to_string());
        if let Some(t) = &task.trace {
            req = req.header(warren::trace::TRACEPARENT, t.traceparent());
            if let Some(state) = &t.state {
                req = req.header(warren::trace::TRACESTATE, state);
            }
        }
        let resp = req
            .body(task.payload)
            .send()
            .await
            .map_err(|e| TaskError::retryable(format!("POST {}: {e}", self.url)))?;
        let status = resp.status();
        let Some(kind) = classify(status) else {
            // A workflow step's result: a JSON body of bounded size.
            let small = resp
                .content_length()
                .is_some_and(|n| n <= crate::result::READ_LIMIT as u64);
            if crate::result::wants_result() && small {
                if let Ok(body) = resp.bytes().await {
                    if let Some(v) = crate::result::from_json_bytes(&body) {
                        crate::result::set_result(v);
                    }
                }
            }
            return Ok(());
        };
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Utc::now()));
        let body = resp.text().await.unwrap_or_default();
        let snippet: String = body.chars().take(200).collect();
        let msg = format!("POST {} returned {status}: {snippet}", self.url);
        Err(match kind {
            crate::handler::ErrorKind::Permanent => TaskError::permanent(msg),
            crate::handler::ErrorKind::Retryable => {
                let e = TaskError::retryable(msg);
                match retry_after {
                    Some(d) => e.with_retry_after(d),
                    None => e,
                }
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::handler::ErrorKind;

    #[test]
    fn status_classes() {
        assert_eq!(classify(StatusCode::OK), None);
        assert_eq!(classify(StatusCode::NO_CONTENT), None);
        assert_eq!(
            classify(StatusCode::BAD_GATEWAY),
            Some(ErrorKind::Retryable)
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS),
            Some(ErrorKind::Retryable)
        );
        assert_eq!(classify(StatusCode::NOT_FOUND), Some(ErrorKind::Permanent));
        assert_eq!(
            classify(StatusCode::UNPROCESSABLE_ENTITY),
            Some(ErrorKind::Permanent)
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
