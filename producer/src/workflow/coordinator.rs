//! The coordinator: while this replica leads, consume `<prefix>.workflows`
//! on the lock connection and drive every run.
//!
//! One round: take the messages available (up to `workflow.batch`), apply
//! them to the runs they name, mark the steps that became ready
//! `publishing`, **append the changed runs to the log (confirmed) before
//! publishing them**, publish them (confirmed), append them again marked
//! `running`, and only then ack the round's messages (`multiple`). A crash
//! anywhere leaves the messages unacked (they come back, and are applied
//! idempotently) and the tasks either unpublished-but-recorded (a new
//! leader publishes every step still `publishing`, counted as republished)
//! or recorded `running`.
//!
//! A round touches only the runs its messages name: its cost does not grow
//! with the number of runs. The whole state is written only by compaction,
//! every `workflow.compact_every` ([`store`]).

use std::collections::{BTreeMap, BTreeSet};
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
use warren::topology::producer::{self, Part};
use warren::trace::TraceContext;
use warren::workflow::{Resume, Start, StepEvent, EVENT, RESUME, START};

use super::run::{Applied, Run, RunStatus};
use super::store::{self, Record, Runs};
use super::{step_task, Workflow};
use crate::context::Ctx;
use crate::leader::Fence;
use crate::state::{self, Tail};

/// Run the coordinator until `stop` or the end of the term. An error ends
/// the term (the caller steps down).
pub async fn run(
    ctx: &Ctx,
    conn: &Connection,
    fence: &Fence,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let prefix = ctx.topo().prefix().to_owned();
    producer::declare(conn, ctx.topo(), &[Part::Runs]).await?;
    let publisher = Publisher::new(conn, ctx.cfg().amqp.confirm_timeout).await?;
    let (runs, tail) = state::load::<Runs>(
        conn,
        &publisher,
        &producer::runs_snapshot(&prefix),
        &producer::runs_log(&prefix),
        ctx.instance(),
    )
    .await?;
    let mut c = Coordinator {
        ctx,
        fence,
        publisher: publisher.clone().sealed(ctx.link().seal()),
        runs,
        prefix,
        tail,
        touched: BTreeSet::new(),
        before: BTreeMap::new(),
        removed: Vec::new(),
        dirty: true,
    };
    let res = c.serve(conn, stop).await;
    // Only the leader reports active runs.
    ctx.metrics().workflow.active.set(0);
    c.tail.close().await;
    if conn.status().connected() {
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
    runs: Runs,
    prefix: String,
    tail: Tail,
    /// The runs this round changed, to append and to advance.
    touched: BTreeSet<String>,
    /// Their (status, finished) before the round; `None`: started in it.
    before: BTreeMap<String, Option<(RunStatus, bool)>>,
    /// Ids forgotten since the last append.
    removed: Vec<String>,
    /// Whether the log grew since the last compaction.
    dirty: bool,
}

/// Sleep for `d`, or forever when there is nothing to wait for.
async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

impl Coordinator<'_> {
    /// Resume the previous leader's runs, then take rounds until the term
    /// ends.
    async fn serve(&mut self, conn: &Connection, stop: &CancellationToken) -> anyhow::Result<()> {
        self.resume_term().await?;
        let batch = self.ctx.cfg().workflow.batch;
        let ch = conn.create_channel().await?;
        ch.basic_qos(batch, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                self.ctx.topo().workflows_queue().as_str().into(),
                "warren-workflow-coordinator".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!("workflow coordinator running");
        let mut compact = tokio::time::interval(self.ctx.cfg().workflow.compact_every);
        compact.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let res = async {
            loop {
                let first = tokio::select! {
                    d = consumer.next() => d,
                    _ = self.fence.lost() => return Ok(()),
                    _ = stop.cancelled() => return Ok(()),
                    _ = compact.tick() => {
                        self.compact().await?;
                        continue;
                    }
                    _ = sleep_or_never(self.expiry_in()) => {
                        self.expire().await?;
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
                self.round(&round).await?;
                if let Some(last) = round.last() {
                    last.acker.ack(BasicAckOptions { multiple: true }).await?;
                }
            }
        }
        .await;
        if conn.status().connected() {
            let _ = ch.close(200, "coordinator stopped".into()).await;
        }
        res
    }

    /// The start of a term: publish the steps the previous leader recorded
    /// but may not have published — the documented at-least-once corner
    /// (a duplicate has the same task id) — and write a fresh snapshot.
    async fn resume_term(&mut self) -> anyhow::Result<()> {
        if !self.runs.is_empty() {
            tracing::info!(
                runs = self.runs.len(),
                "resuming workflow runs from the previous leader's state"
            );
        }
        let due: Vec<String> = self
            .runs
            .values()
            .filter(|r| r.due_count() > 0)
            .map(|r| r.id.clone())
            .collect();
        for id in due {
            self.touch(&id);
        }
        let republished = self.publish_due().await?;
        if republished > 0 {
            tracing::warn!(
                tasks = republished,
                "republished workflow tasks the previous leader had not confirmed"
            );
            self.ctx
                .metrics()
                .workflow
                .republished
                .inc_by(republished as u64);
        }
        self.append().await?;
        self.touched.clear();
        self.before.clear();
        self.compact().await?;
        self.update_gauges();
        Ok(())
    }

    /// How long until a finished run passes `workflow.retention` (a little
    /// after, so the prune finds it old enough).
    fn expiry_in(&self) -> Option<Duration> {
        let at = self.runs.next_expiry(self.ctx.cfg().workflow.retention)?;
        let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Some(wait + Duration::from_millis(10))
    }

    /// Forget the finished runs past retention, with no message to start a
    /// round: recorded (confirmed) like any round.
    async fn expire(&mut self) -> anyhow::Result<()> {
        self.prune();
        if !self.removed.is_empty() {
            self.append().await?;
            self.update_gauges();
        }
        Ok(())
    }

    fn prune(&mut self) {
        let w = &self.ctx.cfg().workflow;
        let gone = self
            .runs
            .prune(Utc::now(), w.retention, w.max_finished_runs);
        for id in &gone {
            self.touched.remove(id);
        }
        self.removed.extend(gone);
    }

    fn workflow(&self, name: &str) -> Option<Arc<Workflow>> {
        self.ctx.workflow(name)
    }

    /// Remember that run `id` changes in this round (and how it was).
    fn touch(&mut self, id: &str) {
        if !self.touched.contains(id) {
            let was = self.runs.get(id).map(|r| (r.status, r.is_finished()));
            self.before.insert(id.to_owned(), was);
            self.touched.insert(id.to_owned());
        }
    }

    /// Advance every touched run: mark what became due.
    fn advance(&mut self) {
        let now = Utc::now();
        let ids: Vec<String> = self.touched.iter().cloned().collect();
        for id in ids {
            let Some(wf) = self.runs.get(&id).and_then(|r| self.workflow(&r.workflow)) else {
                continue;
            };
            self.runs.update(&id, |r| r.advance(&wf, now));
        }
    }

    async fn round(&mut self, round: &[Delivery]) -> anyhow::Result<()> {
        for d in round {
            self.apply(d);
        }
        self.advance();
        self.count_transitions();
        self.prune();
        self.append().await?;
        // A step nobody can take (unroutable) dies at once, which may make
        // compensations due: a few passes until nothing changes.
        for _ in 0..8 {
            if self.publish_due().await? == 0 {
                break;
            }
            self.advance();
            self.count_transitions();
            self.append().await?;
            if self.touched_due() == 0 {
                break;
            }
        }
        self.touched.clear();
        self.before.clear();
        self.update_gauges();
        Ok(())
    }

    fn touched_due(&self) -> usize {
        self.touched
            .iter()
            .filter_map(|id| self.runs.get(id))
            .map(Run::due_count)
            .sum()
    }

    fn apply(&mut self, d: &Delivery) {
        match d.routing_key.as_str() {
            START => self.start(d),
            EVENT => self.event(d),
            RESUME => self.resume(d),
            other => {
                tracing::warn!(routing_key = %other, "message with an unknown routing key on the workflows queue; dropped");
                self.ignored("invalid");
            }
        }
    }

    fn ignored(&self, why: &str) {
        self.ctx
            .metrics()
            .workflow
            .ignored
            .with_label_values(&[why])
            .inc();
    }

    fn start(&mut self, d: &Delivery) {
        let Ok(start) = serde_json::from_slice::<Start>(&d.data) else {
            tracing::warn!(
                "workflow start message is not a JSON {{\"workflow\", \"input\"}} object; dropped"
            );
            return self.ignored("invalid");
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
            return self.ignored("unknown_workflow");
        };
        if self.runs.contains(&id) {
            tracing::info!(workflow = %wf.name, run = %id, "run already known; start ignored");
            return self.ignored("duplicate_start");
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
        self.ctx
            .metrics()
            .workflow
            .runs
            .with_label_values(&[&wf.name, "started"])
            .inc();
        self.touch(&id);
        self.runs.insert(run);
    }

    fn event(&mut self, d: &Delivery) {
        let Ok(ev) = serde_json::from_slice::<StepEvent>(&d.data) else {
            tracing::warn!("workflow step event is not valid; dropped");
            return self.ignored("invalid");
        };
        if !self.runs.contains(&ev.run) {
            tracing::info!(run = %ev.run, step = %ev.step, "event for a run not (or no longer) known; ignored");
            return self.ignored("unknown_run");
        }
        self.touch(&ev.run);
        let m = self.ctx.metrics();
        self.runs.update(&ev.run, |run| match run.apply(&ev, Utc::now()) {
            Applied::Applied => {
                tracing::info!(workflow = %run.workflow, run = %run.id, step = %ev.step, outcome = ?ev.outcome, attempt = ev.attempt, "workflow step finished")
            }
            Applied::Replayed => {
                tracing::info!(workflow = %run.workflow, run = %run.id, step = %ev.step, "the failed step succeeded when replayed: run resumed");
                m.workflow.runs
                    .with_label_values(&[&run.workflow, "resumed"])
                    .inc();
            }
            Applied::Duplicate => {
                tracing::info!(workflow = %run.workflow, run = %run.id, step = %ev.step, task_id = %ev.task_id, "duplicate or stale step event ignored");
                m.workflow.duplicates.inc();
            }
            Applied::Unknown => {
                tracing::warn!(workflow = %run.workflow, run = %run.id, step = %ev.step, "event for a step this run does not have; ignored");
                m.workflow.ignored.with_label_values(&["unknown_step"]).inc();
            }
        });
    }

    fn resume(&mut self, d: &Delivery) {
        let Ok(req) = serde_json::from_slice::<Resume>(&d.data) else {
            return self.ignored("invalid");
        };
        if self
            .runs
            .get(&req.run)
            .is_none_or(|r| r.workflow != req.workflow)
        {
            tracing::warn!(workflow = %req.workflow, run = %req.run, "resume of an unknown run; ignored");
            return self.ignored("unknown_run");
        }
        self.touch(&req.run);
        let m = self.ctx.metrics();
        self.runs.update(&req.run, |run| match run.resume() {
            Ok(()) => {
                tracing::info!(workflow = %run.workflow, run = %run.id, generation = run.generation, "workflow run resumed");
                m.workflow.runs
                    .with_label_values(&[&run.workflow, "resumed"])
                    .inc();
            }
            Err(why) => {
                tracing::warn!(workflow = %run.workflow, run = %run.id, reason = %why, "resume refused");
                m.workflow.ignored.with_label_values(&["not_resumable"]).inc();
            }
        });
    }

    /// Count what changed for each touched run since the round began, and
    /// take that as the new starting point (passes of one round count
    /// each change once).
    fn count_transitions(&mut self) {
        let m = self.ctx.metrics();
        for id in &self.touched {
            let Some(r) = self.runs.get(id) else {
                continue;
            };
            let before = self.before.get(id).copied().flatten();
            for event in transitions(before, r) {
                m.workflow
                    .runs
                    .with_label_values(&[&r.workflow, event])
                    .inc();
            }
            if r.is_finished() && !before.is_some_and(|b| b.1) {
                let secs = (Utc::now() - r.started_at).to_std().unwrap_or_default();
                m.workflow
                    .duration
                    .with_label_values(&[&r.workflow, r.status.name()])
                    .observe(secs.as_secs_f64());
            }
            self.before
                .insert(id.clone(), Some((r.status, r.is_finished())));
        }
    }

    fn update_gauges(&self) {
        self.ctx
            .metrics()
            .workflow
            .active
            .set(self.runs.active() as i64);
    }

    /// Append the touched runs and the forgotten ids to the log
    /// (confirmed).
    async fn append(&mut self) -> anyhow::Result<()> {
        if self.touched.is_empty() && self.removed.is_empty() {
            return Ok(());
        }
        if !self.fence.holds() {
            anyhow::bail!("leadership lost before the workflow state was written");
        }
        let record = Record {
            runs: self
                .touched
                .iter()
                .filter_map(|id| self.runs.get(id).cloned())
                .collect(),
            removed: std::mem::take(&mut self.removed),
            at: Some(Utc::now()),
            marker: None,
        };
        store::append(&self.publisher, &self.prefix, &record)
            .await?
            .confirmed()
            .await?;
        self.dirty = true;
        Ok(())
    }

    /// Rewrite the snapshot when the log grew since the last one. It covers
    /// the log up to what the tail has read: everything after is read again
    /// on top of it, which ends in the same state.
    async fn compact(&mut self) -> anyhow::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        if !self.fence.holds() {
            anyhow::bail!("leadership lost before the workflow snapshot was written");
        }
        let offset = self.tail.offset();
        self.runs.stamp(self.ctx.instance(), Utc::now(), offset);
        store::compact(&self.publisher, &self.prefix, &self.runs).await?;
        self.dirty = false;
        Ok(())
    }

    /// Publish every task of a touched run marked `publishing` (confirms
    /// pipelined), then mark them `running`. How many were published.
    async fn publish_due(&mut self) -> anyhow::Result<usize> {
        let mut sent = Vec::new();
        for id in &self.touched {
            let Some(r) = self.runs.get(id) else {
                continue;
            };
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
            self.settle(&run, &task_id, &name, pending.confirmed().await)?;
        }
        Ok(n)
    }

    /// Record what the broker said of step task `task_id` of `run`.
    fn settle(
        &mut self,
        run: &str,
        task_id: &str,
        name: &str,
        confirmed: Result<(), warren::Error>,
    ) -> anyhow::Result<()> {
        let source = [crate::metrics::Source::Workflow.label()];
        match confirmed {
            Ok(()) => {
                self.ctx
                    .task_events()
                    .recorder()
                    .record(warren::events::Event::new(
                        task_id,
                        name,
                        warren::events::What::Published {
                            source: warren::events::Source::Workflow,
                        },
                    ));
                self.runs.update(run, |r| r.published(task_id));
                self.ctx
                    .metrics()
                    .published
                    .with_label_values(&source)
                    .inc();
            }
            Err(e @ warren::Error::Unroutable { .. }) => {
                // No queue takes this task name: the step cannot run.
                tracing::error!(run = %run, task_id = %task_id, error = %e, "workflow step unroutable: the step fails");
                self.runs
                    .update(run, |r| r.unroutable(task_id, &e.to_string(), Utc::now()));
            }
            Err(e) => {
                // Stays `publishing`: the next leader (or term) retries it.
                tracing::warn!(run = %run, task_id = %task_id, error = %e, "workflow step not published");
                self.ctx
                    .metrics()
                    .publish_failures
                    .with_label_values(&source)
                    .inc();
                return Err(e.into());
            }
        }
        Ok(())
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
