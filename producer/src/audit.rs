//! The audit trail of mutating requests: one `info` line on the log target
//! `warren::audit` per action (who, what, on what, how it went, how many)
//! and the counter `warren_producer_actions_total{action,result}`.
//!
//! `who` is a grant's name, never its token; `target` names a schedule, a
//! task name or a selection, never a payload.

use crate::metrics::Metrics;

/// The action succeeded.
pub const OK: &str = "ok";
/// The action failed (nothing or not everything was done).
pub const FAILED: &str = "failed";

/// Log and count one action. `action` and `result` are label values: pass
/// the fixed names (`trigger`, `publish`, `pause`, `resume`, `replay`,
/// `replay_edited`, `purge`; [`OK`], [`FAILED`]).
pub fn record(metrics: &Metrics, who: &str, action: &str, target: &str, result: &str, count: u64) {
    tracing::info!(
        target: "warren::audit",
        who,
        action,
        target,
        result,
        count,
        "audit"
    );
    metrics.actions.with_label_values(&[action, result]).inc();
}
