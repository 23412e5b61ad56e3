//! Retry policy: how many attempts a task gets and how long it waits between
//! them. Pure arithmetic; the consumer applies it, the delay levels carry it out.
//!
//! [`RetryOverrides`] is the one partial form of a policy, with the same key
//! names wherever a user writes one: a consumer's `retry.tasks."<name>"`, a
//! schedule's `retry = { ... }`, and (as `x-warren-*` headers) a message.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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

/// Some fields of a [`RetryPolicy`]; the unset ones come from the policy it
/// is applied to. Key names are the policy's own, so a per-task override, a
/// schedule's overrides and `retry.default` read alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryOverrides {
    pub max_attempts: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub initial_delay: Option<Duration>,
    pub multiplier: Option<f64>,
    #[serde(with = "humantime_serde")]
    pub max_delay: Option<Duration>,
    pub jitter: Option<f64>,
}

impl RetryOverrides {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `policy` with the fields that are set here replaced.
    pub fn apply(&self, mut policy: RetryPolicy) -> RetryPolicy {
        if let Some(v) = self.max_attempts {
            policy.max_attempts = v;
        }
        if let Some(v) = self.initial_delay {
            policy.initial_delay = v;
        }
        if let Some(v) = self.multiplier {
            policy.multiplier = v;
        }
        if let Some(v) = self.max_delay {
            policy.max_delay = v;
        }
        if let Some(v) = self.jitter {
            policy.jitter = v;
        }
        policy
    }

    /// The one validation of retry settings, for whole policies and partial
    /// ones alike: each field that is set on its own, and `max_delay` against
    /// `initial_delay` when both are. The first problem found, if any.
    /// Callers put the section in front (`retry.default.` + `jitter = 5.0:
    /// must be between 0 and 1`).
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.max_attempts == Some(0) {
            return Err(Invalid::NoAttempts);
        }
        if let Some(m) = self.multiplier.filter(|m| !(m.is_finite() && *m >= 1.0)) {
            return Err(Invalid::Multiplier(m));
        }
        if let Some(j) = self.jitter.filter(|j| !(0.0..=1.0).contains(j)) {
            return Err(Invalid::Jitter(j));
        }
        if let (Some(initial_delay), Some(max_delay)) = (self.initial_delay, self.max_delay) {
            if max_delay < initial_delay {
                return Err(Invalid::MaxBelowInitial {
                    max_delay,
                    initial_delay,
                });
            }
        }
        Ok(())
    }
}

impl From<RetryPolicy> for RetryOverrides {
    /// Every field set: a whole policy, as overrides.
    fn from(p: RetryPolicy) -> Self {
        Self {
            max_attempts: Some(p.max_attempts),
            initial_delay: Some(p.initial_delay),
            multiplier: Some(p.multiplier),
            max_delay: Some(p.max_delay),
            jitter: Some(p.jitter),
        }
    }
}

impl RetryPolicy {
    /// The policy with a message's overrides applied: the `x-warren-retry-*`
    /// headers in `o` and `x-warren-max-attempts` in `max_attempts`, which
    /// wins over `o.max_attempts` (a [`Task`](crate::Task) carries it in its
    /// own field).
    pub fn with_overrides(self, max_attempts: Option<u32>, o: &RetryOverrides) -> Self {
        RetryOverrides {
            max_attempts: max_attempts.or(o.max_attempts),
            ..*o
        }
        .apply(self)
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

    /// Validation for config loading: [`RetryOverrides::validate`] with every
    /// field set.
    pub fn validate(&self) -> Result<(), Invalid> {
        RetryOverrides::from(*self).validate()
    }
}

/// A retry setting out of range. Displays as the field, its value as a
/// person writes it (`5.0`, `1h 30m`) and the rule it breaks; [`field`],
/// [`value`] and [`rule`] give the parts, for callers that put a section in
/// front of the field.
///
/// [`field`]: Invalid::field
/// [`value`]: Invalid::value
/// [`rule`]: Invalid::rule
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error("max_attempts = 0: must be at least 1")]
    NoAttempts,
    #[error("multiplier = {}: must be at least 1", number(*.0))]
    Multiplier(f64),
    #[error("jitter = {}: must be between 0 and 1", number(*.0))]
    Jitter(f64),
    #[error(
        "max_delay = {}: must not be shorter than initial_delay ({})",
        duration(*max_delay),
        duration(*initial_delay)
    )]
    MaxBelowInitial {
        max_delay: Duration,
        initial_delay: Duration,
    },
}

impl Invalid {
    /// The key at fault, as written in a config file.
    pub fn field(&self) -> &'static str {
        match self {
            Self::NoAttempts => "max_attempts",
            Self::Multiplier(_) => "multiplier",
            Self::Jitter(_) => "jitter",
            Self::MaxBelowInitial { .. } => "max_delay",
        }
    }

    /// The value at fault, as written in a config file.
    pub fn value(&self) -> String {
        match self {
            Self::NoAttempts => "0".into(),
            Self::Multiplier(v) | Self::Jitter(v) => number(*v),
            Self::MaxBelowInitial { max_delay, .. } => duration(*max_delay),
        }
    }

    /// The rule the value breaks.
    pub fn rule(&self) -> String {
        let text = self.to_string();
        match text.split_once(": ") {
            Some((_, rule)) => rule.to_owned(),
            None => text,
        }
    }
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
            max_attempts: Some(1),
            initial_delay: Some(Duration::from_secs(2)),
            multiplier: Some(3.0),
            max_delay: Some(Duration::from_secs(100)),
            jitter: Some(0.0),
        };
        let p = policy().with_overrides(Some(9), &o);
        assert_eq!(p.max_attempts, 9, "the message's own max_attempts wins");
        assert_eq!(p.delay(3, 0.5), Duration::from_secs(18));
        assert_eq!(policy().with_overrides(None, &o).max_attempts, 1);
        assert_eq!(RetryOverrides::default().apply(policy()), policy());
        assert_eq!(RetryOverrides::from(policy()).apply(p), policy());
    }

    /// The same keys as `RetryPolicy` (and so as `retry.default`): the
    /// consumer's per-task overrides and a schedule's `retry` table share them.
    #[test]
    fn overrides_read_the_policy_key_names() {
        let o: RetryOverrides = serde_json::from_value(serde_json::json!({
            "max_attempts": 4,
            "initial_delay": "30s",
            "multiplier": 1.5,
            "max_delay": "30m",
            "jitter": 0.1,
        }))
        .unwrap();
        assert_eq!(
            o,
            RetryOverrides {
                max_attempts: Some(4),
                initial_delay: Some(Duration::from_secs(30)),
                multiplier: Some(1.5),
                max_delay: Some(Duration::from_secs(1800)),
                jitter: Some(0.1),
            }
        );
        let e = serde_json::from_value::<RetryOverrides>(serde_json::json!({"initial": "30s"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `initial`"), "{e}");
        assert!(e.contains("initial_delay"), "{e}");
        assert!(RetryOverrides::default().is_empty());
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
            o.validate().unwrap_err().to_string(),
            "jitter = -0.5: must be between 0 and 1"
        );
        assert!(RetryOverrides::default().validate().is_ok());
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = RetryPolicy {
            multiplier: 0.5,
            ..policy()
        };
        let e = bad.validate().unwrap_err();
        assert_eq!(
            (e.field(), e.value(), e.rule().as_str()),
            ("multiplier", "0.5".to_owned(), "must be at least 1")
        );
        assert!(RetryPolicy {
            max_attempts: 0,
            ..policy()
        }
        .validate()
        .is_err());
        assert!(policy().validate().is_ok());
    }
}
