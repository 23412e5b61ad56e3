//! The coordinator: while this replica leads, consume `<prefix>.workflows`
//! on the lock connection and drive every run.
//!
//! One round: take the messages available (up to `workflow.batch`), apply
//! them to the runs in memory, mark the steps that became ready
//! `publishing`, **write the snapshot (confirmed) before publishing them**,
//! publish them (confirmed), record them `running` in a second snapshot, and
//! only then ack the round's messages (`multiple`). A crash anywhere leaves
//! the messages unacked (they come back, and are applied idempotently) and
//! the tasks either unpublished-but-recorded (a new leader publishes every
//! step still `publishing`, counted as republished) or recorded `running`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio_util::sync::CancellationToken;
use warren::amqp::Publisher;
use warren::trace::TraceContext;
use warren::workflow::{Resume, Start, StepEvent, EVENT, RESUME, START};

use super::run::{Applied, Run, RunStatus};
use super::store::{self, Snapshot};
use super::{step_task, Workflow};
use crate::context::Ctx;
use crate::leader::Fence;

/// Run the coordinator until `stop` or the end of the term. An error ends
/// the term (the caller steps down).
pub async fn run(
    ctx: &Ctx,
    conn: &Connection,
    fence: &Fence,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let prefix = ctx.topo().prefix().to_owned();
    store::declare(conn, &prefix, ctx.topo().queue_type()).await?;
    let publisher = Publisher::new(conn, ctx.cfg().amqp.confirm_timeout).await?;
    let mut c = Coordinator {
        ctx,
        fence,
        publisher: publisher.clone().sealed(ctx.seal()),
        snap: store::read(conn, &prefix).await?,
        prefix,
    };
    c.snap.seq += 1;
    c.snap.writer = ctx.instance().to_owned();
    if !c.snap.runs.is_empty() {
        tracing::info!(
            runs = c.snap.runs.len(),
            "resuming workflow runs from the previous leader's state"
        );
    }
    // Steps the previous leader recorded but may not have published: the
    // documented at-least-once corner (a duplicate has the same task id).
    let republish = c.publish_due().await?;
    if republish > 0 {
        tracing::warn!(
            tasks = republish,
            "republished workflow tasks the previous leader had not confirmed"
        );
        ctx.metrics().wf_republished.inc_by(republish as u64);
    }
    c.write().await?;
    c.update_gauges();

    let ch = conn.create_channel().await?;
    let batch = ctx.cfg().workflow.batch;
    ch.basic_qos(batch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            ctx.topo().workflows_queue().as_str().into(),
            "warren-workflow-coordinator".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!("workflow coordinator running");
    let res = async {
        loop {
            let expiry = c.expiry_in();
            let first = tokio::select! {
                d = consumer.next() => d,
                _ = fence.lost() => return Ok(()),
                _ = stop.cancelled() => return Ok(()),
                _ = sleep_or_never(expiry) => {
                    c.expire().await?;
                    continue;
                }
            };
            let Some(first) = first else {
                anyhow::bail!("the workflows queue consumer ended");
            };
            let mut round = vec![first?];
            while round.len() < usize::from(batch) {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => round.push(d),
                    Some(Some(Err(e))) => return Err(e.into()),
                    _ => break,
                }
            }
            c.round(&round).await?;
            if let Some(last) = round.last() {
                last.acker.ack(BasicAckOptions { multiple: true }).await?;
            }
        }
    }
    .await;
    // Only the leader reports active runs.
    ctx.metrics().wf_active.set(0);
    if conn.status().connected() {
        let _ = ch.close(200, "coordinator stopped".into()).await;
        let _ = publisher
            .channel()
            .close(200, "coordinator stopped".into())
            .await;
    }
    res
}

struct Coordinator<'a> {
    ctx: &'a Ctx,
    fence: &'a Fence,
    publisher: Publisher,
    snap: Snapshot,
    prefix: String,
}

/// Sleep for `d`, or forever when there is nothing to wait for.
async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

impl Coordinator<'_> {
    /// How long until a finished run passes `workflow.retention` (a little
    /// after, so the prune finds it old enough).
    fn expiry_in(&self) -> Option<Duration> {
        let at = self.snap.next_expiry(self.ctx.cfg().workflow.retention)?;
        let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Some(wait + Duration::from_millis(10))
    }

    /// Forget the finished runs past retention, with no message to start a
    /// round: recorded (confirmed) like any round.
    async fn expire(&mut self) -> anyhow::Result<()> {
        let w = &self.ctx.cfg().workflow;
        let before = self.snap.runs.len();
        self.snap
            .prune(Utc::now(), w.retention, w.max_finished_runs);
        if self.snap.runs.len() != before {
            self.write().await?;
            self.update_gauges();
        }
        Ok(())
    }

    fn workflow(&self, name: &str) -> Option<Arc<Workflow>> {
        self.ctx.workflow(name)
    }

    async fn round(&mut self, round: &[Delivery]) -> anyhow::Result<()> {
        let now = Utc::now();
        let before = self.statuses();
        for d in round {
            self.apply(d);
        }
        for r in self.snap.runs.values_mut() {
            if let Some(wf) = self.ctx.workflow(&r.workflow) {
                r.advance(&wf, now);
            }
        }
        self.count_transitions(&before);
        let w = &self.ctx.cfg().workflow;
        self.snap.prune(now, w.retention, w.max_finished_runs);
        self.write().await?;
        // A step nobody can take (unroutable) dies at once, which may make
        // compensations due: a few passes until nothing changes.
        for _ in 0..8 {
            let before = self.statuses();
            if self.publish_due().await? == 0 {
                break;
            }
            for r in self.snap.runs.values_mut() {
                if let Some(wf) = self.ctx.workflow(&r.workflow) {
                    r.advance(&wf, Utc::now());
                }
            }
            self.count_transitions(&before);
            self.write().await?;
            if self.snap.runs.values().all(|r| r.due_count() == 0) {
                break;
            }
        }
        self.update_gauges();
        Ok(())
    }

    fn apply(&mut self, d: &Delivery) {
        let m = self.ctx.metrics();
        match d.routing_key.as_str() {
            START => {
                let Ok(start) = serde_json::from_slice::<Start>(&d.data) else {
                    tracing::warn!("workflow start message is not a JSON {{\"workflow\", \"input\"}} object; dropped");
                    m.wf_ignored.with_label_values(&["invalid"]).inc();
                    return;
                };
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                let Some(wf) = self.workflow(&start.workflow) else {
                    tracing::warn!(workflow = %start.workflow, run = %id, "start of an unknown workflow; dropped");
                    m.wf_ignored.with_label_values(&["unknown_workflow"]).inc();
                    return;
                };
                if self.snap.runs.contains_key(&id) {
                    tracing::info!(workflow = %wf.name, run = %id, "run already known; start ignored");
                    m.wf_ignored.with_label_values(&["duplicate_start"]).inc();
                    return;
                }
                let trace = trace_of(d).unwrap_or_else(TraceContext::new_root);
                let run = Run::new(
                    id.clone(),
                    &wf,
                    start.input,
                    Some((trace.traceparent(), trace.state.clone())),
                    Utc::now(),
                );
                tracing::info!(workflow = %wf.name, run = %id, trace_id = %trace.trace_id_hex(), "workflow run started");
                m.wf_runs.with_label_values(&[&wf.name, "started"]).inc();
                self.snap.runs.insert(id, run);
            }
            EVENT => {
                let Ok(ev) = serde_json::from_slice::<StepEvent>(&d.data) else {
                    tracing::warn!("workflow step event is not valid; dropped");
                    m.wf_ignored.with_label_values(&["invalid"]).inc();
                    return;
                };
                let Some(run) = self.snap.runs.get_mut(&ev.run) else {
                    tracing::info!(run = %ev.run, step = %ev.step, "event for a run not (or no longer) known; ignored");
                    m.wf_ignored.with_label_values(&["unknown_run"]).inc();
                    return;
                };
                match run.apply(&ev, Utc::now()) {
                    Applied::Applied => {
                        tracing::info!(workflow = %run.workflow, run = %run.id, step = %ev.step, outcome = ?ev.outcome, attempt = ev.attempt, "workflow step finished")
                    }
                    Applied::Replayed => {
                        tracing::info!(workflow = %run.workflow, run = %run.id, step = %ev.step, "the failed step succeeded when replayed: run resumed");
                        m.wf_runs
                            .with_label_values(&[&run.workflow, "resumed"])
                            .inc();
                    }
                    Applied::Duplicate => {
                        tracing::info!(workflow = %run.workflow, run = %run.id, step = %ev.step, task_id = %ev.task_id, "duplicate or stale step event ignored");
                        m.wf_duplicates.inc();
                    }
                    Applied::Unknown => {
                        tracing::warn!(workflow = %run.workflow, run = %run.id, step = %ev.step, "event for a step this run does not have; ignored");
                        m.wf_ignored.with_label_values(&["unknown_step"]).inc();
                    }
                }
            }
            RESUME => {
                let Ok(req) = serde_json::from_slice::<Resume>(&d.data) else {
                    m.wf_ignored.with_label_values(&["invalid"]).inc();
                    return;
                };
                let Some(run) = self
                    .snap
                    .runs
                    .get_mut(&req.run)
                    .filter(|r| r.workflow == req.workflow)
                else {
                    tracing::warn!(workflow = %req.workflow, run = %req.run, "resume of an unknown run; ignored");
                    m.wf_ignored.with_label_values(&["unknown_run"]).inc();
                    return;
                };
                match run.resume() {
                    Ok(()) => {
                        tracing::info!(workflow = %run.workflow, run = %run.id, generation = run.generation, "workflow run resumed");
                        m.wf_runs
                            .with_label_values(&[&run.workflow, "resumed"])
                            .inc();
                    }
                    Err(why) => {
                        tracing::warn!(workflow = %run.workflow, run = %run.id, reason = %why, "resume refused");
                        m.wf_ignored.with_label_values(&["not_resumable"]).inc();
                    }
                }
            }
            other => {
                tracing::warn!(routing_key = %other, "message with an unknown routing key on the workflows queue; dropped");
                m.wf_ignored.with_label_values(&["invalid"]).inc();
            }
        }
    }

    /// Count what changed for each run since `before` (status and whether
    /// finished, per run id; absent = started since).
    fn count_transitions(&self, before: &BTreeMap<String, (RunStatus, bool)>) {
        let m = self.ctx.metrics();
        for r in self.snap.runs.values() {
            for event in transitions(before.get(&r.id).copied(), r) {
                m.wf_runs.with_label_values(&[&r.workflow, event]).inc();
            }
            if r.is_finished() && !before.get(&r.id).is_some_and(|b| b.1) {
                let secs = (Utc::now() - r.started_at).to_std().unwrap_or_default();
                m.wf_duration
                    .with_label_values(&[&r.workflow, r.status.name()])
                    .observe(secs.as_secs_f64());
            }
        }
    }

    fn statuses(&self) -> BTreeMap<String, (RunStatus, bool)> {
        self.snap
            .runs
            .values()
            .map(|r| (r.id.clone(), (r.status, r.is_finished())))
            .collect()
    }

    fn update_gauges(&self) {
        let active = self.snap.runs.values().filter(|r| !r.is_finished()).count();
        self.ctx.metrics().wf_active.set(active as i64);
    }

    async fn write(&mut self) -> anyhow::Result<()> {
        if !self.fence.holds() {
            anyhow::bail!("leadership lost before the workflow state was written");
        }
        self.snap.seq += 1;
        self.snap.written_at = Some(Utc::now());
        self.snap.v = 1;
        store::write(&self.publisher, &self.prefix, &self.snap).await?;
        Ok(())
    }

    /// Publish every task marked `publishing` (confirms pipelined), then mark
    /// them `running`. How many were published.
    async fn publish_due(&mut self) -> anyhow::Result<usize> {
        let mut sent = Vec::new();
        for r in self.snap.runs.values() {
            let Some(wf) = self.ctx.workflow(&r.workflow) else {
                continue;
            };
            for due in r.due(&wf) {
                let task = step_task(&wf, r, &due);
                if !self.fence.holds() {
                    anyhow::bail!("leadership lost before publishing workflow steps");
                }
                let pending = self
                    .publisher
                    .send_task(self.ctx.topo(), &task, Duration::ZERO)
                    .await?;
                sent.push((r.id.clone(), due.task_id, task.name, pending));
            }
        }
        let n = sent.len();
        for (run, task_id, name, pending) in sent {
            match pending.confirmed().await {
                Ok(()) => {
                    self.ctx.events().record(warren::events::Event::new(
                        &task_id,
                        &name,
                        warren::events::What::Published {
                            source: warren::events::Source::Workflow,
                        },
                    ));
                    if let Some(r) = self.snap.runs.get_mut(&run) {
                        r.published(&task_id);
                    }
                    self.ctx
                        .metrics()
                        .published
                        .with_label_values(&[crate::metrics::Source::Workflow.label()])
                        .inc();
                }
                Err(e @ warren::Error::Unroutable { .. }) => {
                    // No queue takes this task name: the step cannot run.
                    tracing::error!(run = %run, task_id = %task_id, error = %e, "workflow step unroutable: the step fails");
                    if let Some(r) = self.snap.runs.get_mut(&run) {
                        r.unroutable(&task_id, &e.to_string(), Utc::now());
                    }
                }
                Err(e) => {
                    // Stays `publishing`: the next leader (or term) retries it.
                    tracing::warn!(run = %run, task_id = %task_id, error = %e, "workflow step not published");
                    self.ctx
                        .metrics()
                        .publish_failures
                        .with_label_values(&[crate::metrics::Source::Workflow.label()])
                        .inc();
                    return Err(e.into());
                }
            }
        }
        Ok(n)
    }
}

fn trace_of(d: &Delivery) -> Option<TraceContext> {
    let h = d.properties.headers().as_ref()?;
    let get = |k: &str| warren::envelope::header_str(h, k);
    TraceContext::parse(
        &get(warren::trace::TRACEPARENT)?,
        get(warren::trace::TRACESTATE).as_deref(),
    )
}

/// The `event` labels of `warren_producer_workflow_runs_total` for a run that
/// was `before` (status, finished; `None`: not known) and is `now`.
/// (`started` and `resumed` are counted where they happen.)
fn transitions(before: Option<(RunStatus, bool)>, now: &Run) -> Vec<&'static str> {
    let was = before.map(|b| b.0);
    let mut out = Vec::new();
    if was == Some(now.status) {
        return out;
    }
    let failed_now = now.failure.is_some() && now.status != RunStatus::Running;
    if failed_now && matches!(was, None | Some(RunStatus::Running)) {
        out.push("failed");
    }
    match now.status {
        RunStatus::Succeeded => out.push("succeeded"),
        RunStatus::Compensated => out.push("compensated"),
        RunStatus::CompensationFailed => out.push("compensation_failed"),
        _ => {}
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::workflow::run::Failure;

    fn run(status: RunStatus, failed: bool) -> Run {
        let mut r: Run = serde_json::from_value(serde_json::json!({
            "id": "r", "workflow": "w", "status": "running", "input": null,
            "started_at": "2026-01-01T00:00:00Z", "steps": []
        }))
        .unwrap();
        r.status = status;
        if failed {
            r.failure = Some(Failure {
                step: "a".into(),
                dead_kind: None,
                error: None,
            });
        }
        r
    }

    #[test]
    fn a_failure_is_counted_once_even_when_compensation_starts_in_the_same_round() {
        let running = Some((RunStatus::Running, false));
        assert_eq!(
            transitions(running, &run(RunStatus::Compensating, true)),
            ["failed"]
        );
        assert_eq!(
            transitions(running, &run(RunStatus::Compensated, true)),
            ["failed", "compensated"]
        );
        assert_eq!(
            transitions(
                Some((RunStatus::Compensating, false)),
                &run(RunStatus::Compensated, true)
            ),
            ["compensated"]
        );
        assert_eq!(
            transitions(running, &run(RunStatus::Failed, true)),
            ["failed"]
        );
        assert!(transitions(
            Some((RunStatus::Failed, false)),
            &run(RunStatus::Failed, true)
        )
        .is_empty());
        assert_eq!(
            transitions(None, &run(RunStatus::Succeeded, false)),
            ["succeeded"]
        );
        assert!(transitions(running, &run(RunStatus::Running, false)).is_empty());
    }
}
