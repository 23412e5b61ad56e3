//! Retry policy: how many attempts a task gets and how long it waits between
//! them. Pure arithmetic; the consumer applies it, the delay levels carry it out.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::envelope::RetryOverrides;

/// Exponential backoff: attempt `n` (1-based, the one that just failed) waits
/// `min(initial * multiplier^(n-1), max_delay)`, then a random `±jitter`
/// fraction of that.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Total attempts including the first; 1 disables retries.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    pub multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Fraction in [0, 1]: 0.2 spreads each delay over ±20 %.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The policy with a message's header overrides applied.
    pub fn with_overrides(mut self, max_attempts: Option<u32>, o: &RetryOverrides) -> Self {
        if let Some(v) = max_attempts {
            self.max_attempts = v;
        }
        if let Some(v) = o.initial {
            self.initial_delay = v;
        }
        if let Some(v) = o.multiplier {
            self.multiplier = v;
        }
        if let Some(v) = o.max_delay {
            self.max_delay = v;
        }
        if let Some(v) = o.jitter {
            self.jitter = v;
        }
        self
    }

    /// Whether a task whose attempt `attempt` just failed may run again.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// Delay before the attempt after `attempt`, with `unit` in [0, 1) drawn
    /// by the caller (so tests can pin it; 0.5 means no jitter).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(1024) as i32;
        let base = self.initial_delay.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        let capped = base.min(self.max_delay.as_secs_f64());
        let j = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + j * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        let secs = (capped * factor).min(self.max_delay.as_secs_f64()).max(0.0);
        Duration::try_from_secs_f64(secs).unwrap_or(self.max_delay)
    }

    /// Same as [`delay`](Self::delay) with a random jitter draw.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }

    /// Validation for config loading: the first field out of range, if any.
    /// Callers put the section in front (`retry.default.` + `jitter = 5.0:
    /// must be between 0 and 1`).
    pub fn validate(&self) -> Result<(), Invalid> {
        check_fields(
            Some(self.max_attempts),
            &RetryOverrides {
                initial: Some(self.initial_delay),
                multiplier: Some(self.multiplier),
                max_delay: Some(self.max_delay),
                jitter: Some(self.jitter),
            },
        )
    }
}

/// A retry setting out of range: the field, its value as a person writes it
/// (`5.0`, `1h 30m`), and the rule it breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} = {value}: {rule}")]
pub struct Invalid {
    pub field: &'static str,
    pub value: String,
    pub rule: String,
}

/// Check the fields that are set, each on its own, and `max_delay` against
/// `initial_delay` when both are. For whole policies and for partial ones (a
/// schedule's or a task name's overrides), whose unset fields come from
/// elsewhere.
pub fn check_fields(max_attempts: Option<u32>, o: &RetryOverrides) -> Result<(), Invalid> {
    let bad = |field, value: String, rule: &str| {
        Err(Invalid {
            field,
            value,
            rule: rule.to_owned(),
        })
    };
    if max_attempts == Some(0) {
        return bad("max_attempts", "0".into(), "must be at least 1");
    }
    if let Some(m) = o.multiplier.filter(|m| !(m.is_finite() && *m >= 1.0)) {
        return bad("multiplier", number(m), "must be at least 1");
    }
    if let Some(j) = o.jitter.filter(|j| !(0.0..=1.0).contains(j)) {
        return bad("jitter", number(j), "must be between 0 and 1");
    }
    if let (Some(initial), Some(max)) = (o.initial, o.max_delay) {
        if max < initial {
            return bad(
                "max_delay",
                duration(max),
                &format!(
                    "must not be shorter than initial_delay ({})",
                    duration(initial)
                ),
            );
        }
    }
    Ok(())
}

/// `5.0`, `0.25`: a float as it would be written in TOML.
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        v.to_string()
    }
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_millis(500),
            jitter: 0.0,
        }
    }

    #[test]
    fn grows_exponentially_then_caps() {
        let p = policy();
        let d: Vec<u128> = (1..=5).map(|n| p.delay(n, 0.5).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn attempts_are_bounded() {
        let p = policy();
        assert!(p.may_retry(3));
        assert!(!p.may_retry(4));
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..policy()
        };
        assert_eq!(p.delay(1, 0.0).as_millis(), 50);
        assert_eq!(p.delay(1, 0.5).as_millis(), 100);
        assert!(p.delay(1, 0.999).as_millis() <= 150);
        assert!(
            p.delay(3, 1.0) <= p.max_delay,
            "jitter never exceeds max_delay"
        );
    }

    #[test]
    fn overrides_apply() {
        let o = RetryOverrides {
            initial: Some(Duration::from_secs(2)),
            multiplier: Some(3.0),
            max_delay: Some(Duration::from_secs(100)),
            jitter: Some(0.0),
        };
        let p = policy().with_overrides(Some(9), &o);
        assert_eq!(p.max_attempts, 9);
        assert_eq!(p.delay(3, 0.5), Duration::from_secs(18));
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(u32::MAX, 0.5), p.max_delay);
    }

    #[test]
    fn validation_speaks_of_fields_not_structs() {
        let text = |p: RetryPolicy| p.validate().unwrap_err().to_string();
        assert_eq!(
            text(RetryPolicy {
                jitter: 5.0,
                ..policy()
            }),
            "jitter = 5.0: must be between 0 and 1"
        );
        assert_eq!(
            text(RetryPolicy {
                multiplier: 0.5,
                ..policy()
            }),
            "multiplier = 0.5: must be at least 1"
        );
        assert_eq!(
            text(RetryPolicy {
                initial_delay: Duration::from_secs(90),
                max_delay: Duration::from_secs(60),
                ..policy()
            }),
            "max_delay = 1m: must not be shorter than initial_delay (1m 30s)"
        );
        // Partial overrides are checked field by field.
        let o = RetryOverrides {
            jitter: Some(-0.5),
            ..RetryOverrides::default()
        };
        assert_eq!(
            check_fields(None, &o).unwrap_err().to_string(),
            "jitter = -0.5: must be between 0 and 1"
        );
        assert!(check_fields(None, &RetryOverrides::default()).is_ok());
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = RetryPolicy {
            multiplier: 0.5,
            ..policy()
        };
        assert_eq!(bad.validate().unwrap_err().field, "multiplier");
        assert!(RetryPolicy {
            max_attempts: 0,
            ..policy()
        }
        .validate()
        .is_err());
        assert!(policy().validate().is_ok());
    }
}
