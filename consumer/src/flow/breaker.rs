//! The circuit breaker of one `http` handler entry: after `failures`
//! consecutive retryable failures it opens for `cooldown`, during which its
//! tasks are parked instead of sent; then one probe (half-open) decides:
//! success closes it, failure opens it again. [`Machine`] is the pure state
//! machine; [`Breaker`] adds the lock, the gauge and the log lines.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::BreakerSpec;

/// `warren_consumer_breaker_state` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight.
    HalfOpen,
}

impl State {
    fn gauge(&self) -> i64 {
        match self {
            State::Closed { .. } => 0,
            State::Open { .. } => 1,
            State::HalfOpen => 2,
        }
    }
}

/// How an attempt that went through the breaker ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The target answered (2xx, or a 4xx: it is up, the task was wrong).
    Answered,
    /// 5xx, 408, 429, a network error or a timeout.
    Failed,
    /// Says nothing about the target (the handler panicked).
    Neither,
}

/// Admission refused: the breaker is open (or probing) for this much longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub remaining: Duration,
}

#[derive(Debug, Clone)]
pub struct Machine {
    failures: u32,
    cooldown: Duration,
    state: State,
}

impl Machine {
    pub fn new(spec: BreakerSpec) -> Self {
        Self {
            failures: spec.failures.max(1),
            cooldown: spec.cooldown,
            state: State::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// May an attempt go out at `now`? `Ok(true)` when it is the probe.
    pub fn pass(&mut self, now: Instant) -> Result<bool, Refused> {
        match self.state {
            State::Closed { .. } => Ok(false),
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen;
                Ok(true)
            }
            State::Open { until } => Err(Refused {
                remaining: until - now,
            }),
            State::HalfOpen => Err(Refused {
                remaining: Duration::ZERO,
            }),
        }
    }

    /// Record how an admitted attempt ended. Attempts admitted before the
    /// breaker opened say nothing about the probe and are ignored once it is
    /// open.
    pub fn record(&mut self, probe: bool, verdict: Verdict, now: Instant) {
        self.state = match (self.state, probe, verdict) {
            (_, _, Verdict::Neither) if probe => State::Open { until: now },
            (_, _, Verdict::Neither) => return,
            (State::HalfOpen, true, Verdict::Answered) => State::Closed { failures: 0 },
            (State::HalfOpen, true, Verdict::Failed) => State::Open {
                until: now + self.cooldown,
            },
            (State::Closed { .. }, false, Verdict::Answered) => State::Closed { failures: 0 },
            (State::Closed { failures }, false, Verdict::Failed) => {
                let failures = failures.saturating_add(1);
                if failures >= self.failures {
                    State::Open {
                        until: now + self.cooldown,
                    }
                } else {
                    State::Closed { failures }
                }
            }
            _ => return,
        };
    }

    /// The probe was admitted but never sent (its task was parked by a
    /// limit, or handling panicked before the call): the next attempt probes.
    pub fn unused(&mut self, probe: bool, now: Instant) {
        if probe && self.state == State::HalfOpen {
            self.state = State::Open { until: now };
        }
    }
}

/// A [`Machine`] shared by this process's deliveries, reporting its state.
pub(crate) struct Breaker {
    /// The handler entry's config key (`handlers."<key>"`), also the label.
    pub(crate) key: String,
    pub(crate) spec: BreakerSpec,
    machine: Mutex<Machine>,
    gauge: prometheus::IntGauge,
    pub(crate) parked: prometheus::IntCounter,
}

/// An attempt let through: report how it ended with [`Pass::record`];
/// dropped unrecorded, it counts as never sent.
pub(crate) struct Pass<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Pass<'_> {
    pub(crate) fn record(mut self, verdict: Verdict) {
        self.recorded = true;
        self.breaker
            .update(|m, now| m.record(self.probe, verdict, now));
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if !self.recorded && self.probe {
            let probe = self.probe;
            self.breaker.update(|m, now| m.unused(probe, now));
        }
    }
}

impl Breaker {
    pub(crate) fn new(
        key: String,
        spec: BreakerSpec,
        state: &prometheus::IntGaugeVec,
        parked: &prometheus::IntCounterVec,
    ) -> Self {
        let gauge = state.with_label_values(&[key.as_str()]);
        gauge.set(0);
        let parked = parked.with_label_values(&[key.as_str()]);
        Self {
            key,
            spec,
            machine: Mutex::new(Machine::new(spec)),
            gauge,
            parked,
        }
    }

    pub(crate) fn pass(&self) -> Result<Pass<'_>, Refused> {
        let probe = self.update(|m, now| m.pass(now))?;
        Ok(Pass {
            breaker: self,
            probe,
            recorded: false,
        })
    }

    /// Apply `f` under the lock; log and publish a change of state.
    fn update<T>(&self, f: impl FnOnce(&mut Machine, Instant) -> T) -> T {
        let mut m = match self.machine.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let before = m.state();
        let out = f(&mut m, Instant::now());
        let after = m.state();
        drop(m);
        if before.gauge() != after.gauge() {
            self.gauge.set(after.gauge());
            self.log(before, after);
        }
        out
    }

    fn log(&self, before: State, after: State) {
        let handler = self.key.as_str();
        let cooldown = humantime::format_duration(self.spec.cooldown).to_string();
        match (before, after) {
            (State::Closed { .. }, State::Open { .. }) => tracing::warn!(
                handler,
                failures = self.spec.failures,
                cooldown,
                "circuit breaker open: its tasks are parked until the cool-down is over"
            ),
            (_, State::HalfOpen) => {
                tracing::info!(handler, "circuit breaker half-open: one probe goes out")
            }
            (State::HalfOpen, State::Open { .. }) => tracing::warn!(
                handler,
                cooldown,
                "circuit breaker probe failed (or was not sent): open again"
            ),
            (_, State::Closed { .. }) => {
                tracing::info!(handler, "circuit breaker closed: the probe succeeded")
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine::new(BreakerSpec {
            failures: 3,
            cooldown: Duration::from_secs(10),
            ..Default::default()
        })
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut m = machine();
        let t0 = Instant::now();
        for v in [Verdict::Failed, Verdict::Failed, Verdict::Answered] {
            assert_eq!(m.pass(t0), Ok(false));
            m.record(false, v, t0);
        }
        assert_eq!(m.state(), State::Closed { failures: 0 }, "an answer resets");
        m.record(false, Verdict::Failed, t0);
        m.record(false, Verdict::Neither, t0);
        m.record(false, Verdict::Failed, t0);
        assert_eq!(
            m.state(),
            State::Closed { failures: 2 },
            "a panic says nothing"
        );
        m.record(false, Verdict::Failed, t0);
        assert_eq!(m.state(), State::Open { until: t0 + 10 * S });
        assert_eq!(m.pass(t0 + 4 * S), Err(Refused { remaining: 6 * S }));
    }

    #[test]
    fn one_probe_after_the_cooldown_decides() {
        let mut m = machine();
        let t0 = Instant::now();
        for _ in 0..3 {
            m.record(false, Verdict::Failed, t0);
        }
        let t1 = t0 + 10 * S;
        assert_eq!(m.pass(t1), Ok(true), "the probe");
        assert_eq!(m.state(), State::HalfOpen);
        assert!(m.pass(t1).is_err(), "only one probe at a time");
        // A late answer to an attempt admitted before the opening is ignored.
        m.record(false, Verdict::Answered, t1);
        assert_eq!(m.state(), State::HalfOpen);
        m.record(true, Verdict::Failed, t1);
        assert_eq!(m.state(), State::Open { until: t1 + 10 * S }, "re-opened");
        let t2 = t1 + 10 * S;
        assert_eq!(m.pass(t2), Ok(true));
        m.record(true, Verdict::Answered, t2);
        assert_eq!(m.state(), State::Closed { failures: 0 });
    }

    #[test]
    fn an_unsent_probe_lets_the_next_attempt_probe() {
        let mut m = machine();
        let t0 = Instant::now();
        for _ in 0..3 {
            m.record(false, Verdict::Failed, t0);
        }
        let t1 = t0 + 10 * S;
        assert_eq!(m.pass(t1), Ok(true));
        m.unused(true, t1);
        assert_eq!(m.pass(t1), Ok(true));
        m.record(true, Verdict::Neither, t1);
        assert_eq!(m.pass(t1), Ok(true), "a panicked probe proves nothing");
    }

    #[test]
    fn gauge_follows_the_state() {
        let state = prometheus::IntGaugeVec::new(prometheus::Opts::new("s", "s"), &["handler"])
            .expect("metric");
        let parked = prometheus::IntCounterVec::new(prometheus::Opts::new("p", "p"), &["handler"])
            .expect("metric");
        let b = Breaker::new(
            "h".into(),
            BreakerSpec {
                failures: 1,
                cooldown: Duration::ZERO,
                ..Default::default()
            },
            &state,
            &parked,
        );
        let g = || state.with_label_values(&["h"]).get();
        assert_eq!(g(), 0);
        b.pass().expect("closed").record(Verdict::Failed);
        assert_eq!(g(), 1);
        let probe = b.pass().expect("cool-down over");
        assert_eq!(g(), 2);
        drop(probe);
        assert_eq!(g(), 1, "unsent probe: open, due at once");
        b.pass().expect("probe").record(Verdict::Answered);
        assert_eq!(g(), 0);
    }
}
