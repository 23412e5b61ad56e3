//! What the console does to the world: publish tasks (a trigger, the
//! publish form, later replays) through the API's publisher, counted under
//! `source="console"`, and the audit record of each action.

use std::time::Duration;

use warren::Task;

use crate::context::Ctx;
use crate::metrics::Source;
use crate::request::pairs;

/// Publish `tasks` and wait for their confirms; the ids on success, or
/// what went wrong in words for the page.
pub async fn publish(ctx: &Ctx, tasks: &[(Task, Duration)]) -> Result<Vec<String>, String> {
    let p = ctx
        .link()
        .publisher()
        .ok_or("not connected to the broker; retry in a moment")?;
    if p.blocked.is_blocked() {
        return Err("the broker is blocking publishers (resource alarm); retry later".into());
    }
    let publish = p.publisher.publish_tasks(ctx.topo(), pairs(tasks), 256);
    let source = Source::Console;
    let Some(results) = p
        .unless_blocked(ctx.metrics(), source, tasks.len(), publish)
        .await
    else {
        return Err("the broker started blocking publishers (resource alarm); retry later".into());
    };
    let mut ids = Vec::new();
    let mut first_error = None;
    for ((task, _), r) in tasks.iter().zip(results) {
        match r {
            Ok(()) => {
                ctx.task_events()
                    .published(task, warren::events::Source::Console);
                ids.push(task.id.clone())
            }
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    count(ctx, ids.len(), tasks.len() - ids.len());
    match first_error {
        None => Ok(ids),
        Some(e) => Err(format!(
            "{} of {} tasks were not confirmed: {e}",
            tasks.len() - ids.len(),
            tasks.len()
        )),
    }
}

fn count(ctx: &Ctx, ok: usize, failed: usize) {
    let m = ctx.metrics();
    let label = [Source::Console.label()];
    m.published.with_label_values(&label).inc_by(ok as u64);
    m.publish_failures
        .with_label_values(&label)
        .inc_by(failed as u64);
}

/// The audit line and counter of one action ([`crate::audit`]): who (the
/// grant's name), what, on what, how many. Never a payload or a token.
pub fn audit(ctx: &Ctx, who: &str, action: &str, target: &str, count: usize, ok: bool) {
    let result = if ok {
        crate::audit::OK
    } else {
        crate::audit::FAILED
    };
    crate::audit::record(ctx.metrics(), who, action, target, result, count as u64);
}
