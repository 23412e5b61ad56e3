//! Fail points in the scheduler, for the fault-injection tests (cargo
//! feature `failpoints`; without it every point compiles to nothing), on the
//! `fail` crate as the consumer's delivery steps are.
//!
//! A test process configures them through the `FAILPOINTS` variable, which
//! the binary reads at start (`fail::FailScenario`):
//! * `scheduler/schedule_math=return(NAME)`: the schedule math of the
//!   schedule `NAME` panics (one schedule's panic must not stop the others);
//! * `scheduler/term=panic`: the leader's fire loop panics outside the
//!   per-schedule guard (the lock must be released for a standby);
//! * `scheduler/commit=return`: the leader dies (abort, no clean-up, like
//!   `kill -9`) once a wake-up's ticks and record are written to the socket
//!   but not committed (they must never reach a queue).

/// Panic in the schedule math of `schedule` when the point names it.
#[cfg(feature = "failpoints")]
pub(super) fn schedule_math(schedule: &str) {
    if fail::eval("scheduler/schedule_math", |arg| arg)
        .flatten()
        .as_deref()
        == Some(schedule)
    {
        panic!("injected fault: scheduler/schedule_math={schedule}");
    }
}

/// Whatever the point `scheduler/term` is set to (`panic`), in the fire loop.
#[cfg(feature = "failpoints")]
pub(super) fn term() {
    fail::fail_point!("scheduler/term");
}

/// Die before the commit when `scheduler/commit` is set: first give lapin's
/// I/O thread time to write what is queued, so that the broker holds the
/// uncommitted ticks.
#[cfg(feature = "failpoints")]
pub(super) fn commit() {
    if fail::eval("scheduler/commit", |_| ()).is_some() {
        std::thread::sleep(std::time::Duration::from_millis(500));
        std::process::abort();
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(super) fn commit() {}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(super) fn schedule_math(_schedule: &str) {}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(super) fn term() {}
