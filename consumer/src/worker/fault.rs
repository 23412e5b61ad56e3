//! Fail points at each step of delivery handling, for the fault-injection
//! tests (cargo feature `failpoints`; without it every check is `Ok` and
//! compiles away).
//!
//! A point is named `<topology prefix>/<step>` (see [`point`]), so tests that
//! share a process and a broker never trip each other's points. Configure it
//! with the `fail` crate: `panic` panics at that step, `return(text)` makes
//! the step fail with `text` the way it fails for real (a publish nacked, an
//! ack refused, ...), `1*panic` does so once.

/// A step of delivery handling that a fault can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Decoding the message into a task (an error makes it poison).
    Decode,
    /// Looking up the handler (an error means "no handler").
    Resolve,
    /// The handler run (an error is a retryable task error).
    Run,
    /// Publishing a retry (or parked) copy (an error is a nacked publish).
    RetryPublish,
    /// Publishing a dead-letter copy (an error is a nacked publish).
    DeadPublish,
    /// Acking the delivery (an error is a refused ack).
    Ack,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::Decode,
        Step::Resolve,
        Step::Run,
        Step::RetryPublish,
        Step::DeadPublish,
        Step::Ack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Decode => "decode",
            Step::Resolve => "resolve",
            Step::Run => "run",
            Step::RetryPublish => "retry_publish",
            Step::DeadPublish => "dead_publish",
            Step::Ack => "ack",
        }
    }
}

/// Name of the fail point of `step` for the topology `prefix`.
pub fn point(prefix: &str, step: Step) -> String {
    format!("{prefix}/{}", step.name())
}

/// `Err(text)` when a test made this step fail; panics when it asked for a
/// panic.
#[cfg(feature = "failpoints")]
pub(crate) fn check(prefix: &str, step: Step) -> Result<(), String> {
    match fail::eval(&point(prefix, step), |arg| {
        arg.unwrap_or_else(|| format!("fault injected at {}", step.name()))
    }) {
        Some(text) => Err(text),
        None => Ok(()),
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn check(_prefix: &str, _step: Step) -> Result<(), String> {
    Ok(())
}
