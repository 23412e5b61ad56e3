//! Flow control in this process: `limits."<pattern>"` (tasks running at once,
//! tasks started per second) and the circuit breakers of `http` handler
//! entries. The worker asks [`Flow`] before it runs a handler; a task that
//! may not run now is parked through the delay levels keeping its attempt.
//!
//! | module | owns |
//! |---|---|
//! | `rate` | `"50/s"` parsing and the token bucket |
//! | `limit` | one limit: waiting within its share, parking the rest |
//! | `breaker` | one handler's breaker: closed → open → half-open |
//!
//! With no `limits` and no breaker configured, every check is a test of an
//! empty list: no lock, no allocation per delivery.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::config::{ConsumerConfig, HandlerSpec};

mod breaker;
mod limit;
pub mod rate;

pub(crate) use breaker::{Breaker, Pass, Verdict};
pub(crate) use limit::{park_delay, Admission, Limit, Slot};
pub use limit::{HOLD, MIN_PARK};

/// `action` label values of `warren_consumer_limited_total`.
pub mod action {
    /// Waited in this process (up to the hold) before it started.
    pub const WAITED: &str = "waited";
    /// Parked through the delay levels, attempt kept.
    pub const PARKED: &str = "parked";
}

/// The limits and breakers of one worker, shared by all its sessions.
pub(crate) struct Flow {
    /// In config order (exact names are looked up before patterns).
    limits: Vec<Limit>,
    breakers: Vec<Breaker>,
}

impl Flow {
    pub(crate) fn new(cfg: &ConsumerConfig, prom: &Registry) -> anyhow::Result<Self> {
        let limited = IntCounterVec::new(
            Opts::new(
                "warren_consumer_limited_total",
                "Deliveries held back by limits.<limit>, by action (waited = waited in this process, then ran; parked = sent through the delay levels, attempt kept)",
            ),
            &["limit", "action"],
        )?;
        let state = IntGaugeVec::new(
            Opts::new(
                "warren_consumer_breaker_state",
                "Circuit breaker of an http handler entry: 0 closed, 1 open, 2 half-open (one probe in flight)",
            ),
            &["handler"],
        )?;
        let breaker_parked = IntCounterVec::new(
            Opts::new(
                "warren_consumer_breaker_parked_total",
                "Tasks parked (attempt kept) because their handler's circuit breaker was open",
            ),
            &["handler"],
        )?;
        prom.register(Box::new(limited.clone()))?;
        prom.register(Box::new(state.clone()))?;
        prom.register(Box::new(breaker_parked.clone()))?;
        let share = waiting_share(cfg.worker.concurrency, cfg.limits.len());
        let mut limits = Vec::with_capacity(cfg.limits.len());
        for (key, spec) in &cfg.limits {
            let bucket = spec.rate()?.map(|(r, burst)| rate::Bucket::new(r, burst));
            limits.push(Limit::new(
                key.clone(),
                spec.concurrency,
                bucket,
                share,
                &limited,
            ));
        }
        let breakers = cfg
            .handlers
            .iter()
            .filter_map(|(key, spec)| match spec {
                HandlerSpec::Http {
                    breaker: Some(b), ..
                } => Some(Breaker::new(key.clone(), *b, &state, &breaker_parked)),
                _ => None,
            })
            .collect::<Vec<Breaker>>();
        if !limits.is_empty() || !breakers.is_empty() {
            let l: Vec<&str> = limits.iter().map(|l| l.key.as_str()).collect();
            let b: Vec<&str> = breakers.iter().map(|b| b.key.as_str()).collect();
            tracing::info!(limits = ?l, waiting_share = share, breakers = ?b, "flow control (per process)");
        }
        Ok(Self { limits, breakers })
    }

    /// The limit a task name falls under: its exact name, else the first
    /// pattern (in key order) that matches, as for `retry.tasks`.
    pub(crate) fn limit(&self, task: &str) -> Option<&Limit> {
        if self.limits.is_empty() {
            return None;
        }
        self.limits.iter().find(|l| l.key == task).or_else(|| {
            self.limits
                .iter()
                .find(|l| l.pattern && crate::handler::pattern_matches(&l.key, task))
        })
    }

    /// The breaker of the handler entry registered under `handler`.
    pub(crate) fn breaker(&self, handler: &str) -> Option<&Breaker> {
        if self.breakers.is_empty() {
            return None;
        }
        self.breakers.iter().find(|b| b.key == handler)
    }
}

/// How many deliveries may wait for each of `limits` entries. Waiting
/// deliveries hold worker permits: together they get half of the
/// `concurrency` permits, split evenly, yet each entry at least one as long
/// as that still leaves a permit for other tasks.
fn waiting_share(concurrency: usize, limits: usize) -> usize {
    match limits {
        0 => 0,
        n => (concurrency / (2 * n)).max(usize::from(n < concurrency)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{BreakerSpec, LimitSpec};

    #[test]
    fn waiting_never_takes_every_permit() {
        assert_eq!(waiting_share(32, 1), 16);
        assert_eq!(waiting_share(32, 3), 5);
        assert_eq!(waiting_share(32, 20), 1, "20 of 32 permits at most");
        assert_eq!(waiting_share(32, 32), 0);
        assert_eq!(waiting_share(2, 1), 1);
        assert_eq!(
            waiting_share(1, 1),
            0,
            "the only permit is never spent waiting"
        );
        for c in 1..70 {
            for n in 1..70 {
                assert!(waiting_share(c, n) * n < c, "{c} permits, {n} limits");
            }
        }
    }

    fn flow(limits: &[&str]) -> Flow {
        let mut cfg = ConsumerConfig::default();
        for key in limits {
            let spec = LimitSpec {
                concurrency: Some(1),
                ..Default::default()
            };
            cfg.limits.insert((*key).into(), spec);
        }
        cfg.handlers.insert(
            "h".into(),
            HandlerSpec::Http {
                url: "http://127.0.0.1:1/".into(),
                timeout: std::time::Duration::from_secs(1),
                headers: Default::default(),
                breaker: Some(BreakerSpec::default()),
            },
        );
        cfg.handlers.insert("n".into(), HandlerSpec::Noop {});
        Flow::new(&cfg, &Registry::new()).unwrap()
    }

    #[test]
    fn exact_names_win_then_patterns_in_key_order() {
        let f = flow(&["a.*", "a.b", "#"]);
        let key = |t: &str| f.limit(t).map(|l| l.key.as_str());
        assert_eq!(key("a.b"), Some("a.b"));
        assert_eq!(key("a.c"), Some("#"), "\"#\" sorts before \"a.*\"");
        let f = flow(&["a.*", "a.b"]);
        assert_eq!(f.limit("a.c").map(|l| l.key.as_str()), Some("a.*"));
        assert!(f.limit("b.c").is_none());
        assert!(flow(&[]).limit("a.b").is_none());
    }

    #[test]
    fn only_http_entries_with_a_breaker_table_get_one() {
        let f = flow(&[]);
        assert!(f.breaker("h").is_some());
        assert!(f.breaker("n").is_none());
        assert!(f.breaker("other").is_none());
    }
}
