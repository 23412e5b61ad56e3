//! The one function that decides what happens to a delivery after its handler
//! ran: [`decide`] maps an [`Outcome`] and the retry policy to an [`Action`].
//! Pure, so every branch is unit-tested; the worker only carries it out.

use std::time::Duration;

use warren::retry::RetryPolicy;

use crate::handler::{ErrorKind, TaskError};

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed(TaskError),
    TimedOut(Duration),
    Panicked(String),
}

/// What to do with the delivery. Every variant ends with exactly one ack;
/// `Retry` and `DeadLetter` ack only after the new copy is confirmed.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Ack,
    Retry {
        delay: Duration,
        error: String,
    },
    DeadLetter {
        reason: String,
        kind: &'static str,
        error: String,
    },
}

/// Dead-letter kinds (the `x-warren-dead-kind` header) besides the poison
/// kinds of [`warren::envelope::EnvelopeError::kind`].
pub mod kind {
    pub const PERMANENT: &str = "permanent";
    pub const EXHAUSTED: &str = "exhausted";
    pub const NO_HANDLER: &str = "no_handler";
    pub const UNROUTABLE: &str = "unroutable";
}

/// Decide for attempt `attempt` (1-based, the one that just ended) under
/// `policy`; `unit` in [0, 1) is the jitter draw.
pub fn decide(outcome: &Outcome, attempt: u32, policy: &RetryPolicy, unit: f64) -> Action {
    let (error, permanent, retry_after) = match outcome {
        Outcome::Succeeded => return Action::Ack,
        Outcome::Failed(e) => (
            e.message.clone(),
            e.kind == ErrorKind::Permanent,
            e.retry_after,
        ),
        Outcome::TimedOut(d) => (format!("timed out after {}", fmt_duration(*d)), false, None),
        Outcome::Panicked(msg) => (format!("handler panicked: {msg}"), false, None),
    };
    if permanent {
        return Action::DeadLetter {
            reason: format!("permanent error: {error}"),
            kind: kind::PERMANENT,
            error,
        };
    }
    if !policy.may_retry(attempt) {
        return Action::DeadLetter {
            reason: format!(
                "attempts exhausted ({attempt} of {}): {error}",
                policy.max_attempts
            ),
            kind: kind::EXHAUSTED,
            error,
        };
    }
    let backoff = policy.delay(attempt, unit);
    let delay = match retry_after {
        Some(ra) => ra.min(warren::delay::MAX_DELAY),
        None => backoff,
    };
    Action::Retry { delay, error }
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// `outcome` label values of `warren_consumer_tasks_total`: every delivery
/// is counted under exactly one, once it has left this consumer.
pub mod labels {
    /// The handler succeeded; acked.
    pub const SUCCEEDED: &str = "succeeded";
    /// A retry copy was confirmed; acked.
    pub const RETRIED: &str = "retried";
    /// A dead-letter copy was confirmed; acked.
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// Poison (undecodable, no handler): dead-lettered at once; acked.
    pub const REJECTED: &str = "rejected";
    /// Not due yet (`x-warren-not-before`), over a limit or behind an open
    /// circuit breaker: parked in the delay levels, attempt kept; acked.
    pub const PARKED: &str = "parked";
    /// Given back to its queue unfinished (a publish or ack failed, or a
    /// panic outside the handler): the broker delivers it again.
    pub const REQUEUED: &str = "requeued";
}

/// Outcome label for metrics.
pub fn label(action: &Action) -> &'static str {
    match action {
        Action::Ack => labels::SUCCEEDED,
        Action::Retry { .. } => labels::RETRIED,
        Action::DeadLetter { .. } => labels::DEAD_LETTERED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: 0.0,
        }
    }

    #[test]
    fn success_acks() {
        assert_eq!(decide(&Outcome::Succeeded, 1, &policy(), 0.5), Action::Ack);
    }

    #[test]
    fn retryable_errors_back_off_until_exhausted() {
        let o = Outcome::Failed(TaskError::retryable("flaky"));
        let d = |a| match decide(&o, a, &policy(), 0.5) {
            Action::Retry { delay, error } => {
                assert_eq!(error, "flaky");
                delay
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(d(1), Duration::from_millis(100));
        assert_eq!(d(2), Duration::from_millis(200));
        match decide(&o, 3, &policy(), 0.5) {
            Action::DeadLetter { reason, kind, .. } => {
                assert_eq!(kind, kind::EXHAUSTED);
                assert_eq!(reason, "attempts exhausted (3 of 3): flaky");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn permanent_dead_letters_on_first_failure() {
        let o = Outcome::Failed(TaskError::permanent("bad input"));
        assert!(matches!(
            decide(&o, 1, &policy(), 0.5),
            Action::DeadLetter {
                kind: kind::PERMANENT,
                ..
            }
        ));
    }

    #[test]
    fn timeout_and_panic_are_retryable() {
        let t = decide(
            &Outcome::TimedOut(Duration::from_millis(1500)),
            1,
            &policy(),
            0.5,
        );
        assert!(
            matches!(&t, Action::Retry { error, .. } if error == "timed out after 1s 500ms"),
            "{t:?}"
        );
        let p = decide(&Outcome::Panicked("oops".into()), 2, &policy(), 0.5);
        assert!(matches!(&p, Action::Retry { error, .. } if error.contains("panicked: oops")));
        assert_eq!(label(&p), "retried");
    }

    #[test]
    fn retry_after_wins_over_backoff() {
        let o =
            Outcome::Failed(TaskError::retryable("429").with_retry_after(Duration::from_secs(7)));
        assert!(matches!(
            decide(&o, 1, &policy(), 0.5),
            Action::Retry { delay, .. } if delay == Duration::from_secs(7)
        ));
    }
}
