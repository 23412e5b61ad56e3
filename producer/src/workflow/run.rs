//! One workflow run as a pure state machine: created by a start, moved by
//! step events and resumes, and [`Run::advance`]d to decide which tasks are
//! due. Everything here is data the coordinator snapshots; nothing does I/O.
//!
//! Rules (docs/workflows.md explains them to users):
//! * a step becomes `publishing` once every step it waits for `succeeded`;
//!   the coordinator records that in a snapshot *before* publishing, and
//!   marks it `running` once the broker confirmed the task;
//! * a `dead` step fails the run: steps not started are `skipped`, started
//!   ones are let finish; then the compensations of succeeded steps run one
//!   at a time, latest-completed first;
//! * an event whose task id is not the step's current one, or for a step
//!   already settled, is a duplicate and changes nothing.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use warren::workflow::{StepEvent, StepOutcome, COMPENSATE_SUFFIX};

use super::definition::Workflow;
use super::template::Inputs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    /// A step died; steps still running are let finish, then compensation
    /// starts. Final when no succeeded step has a compensation.
    Failed,
    Compensating,
    Compensated,
    CompensationFailed,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Compensating => "compensating",
            RunStatus::Compensated => "compensated",
            RunStatus::CompensationFailed => "compensation_failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Publishing,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Compensating,
    Compensated,
}

impl StepState {
    pub fn name(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Publishing => "publishing",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::Compensating => "compensating",
            StepState::Compensated => "compensated",
        }
    }
}

/// Which step failed a run, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub step: String,
    #[serde(default)]
    pub dead_kind: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A task of the run: a step's or a compensation's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    pub task_id: String,
    /// `publishing`, `running`, `succeeded` or `failed`.
    pub state: StepState,
    #[serde(default)]
    pub attempts: u32,
    pub started_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub dead_kind: Option<String>,
}

impl Exec {
    fn new(task_id: String, now: DateTime<Utc>) -> Self {
        Self {
            task_id,
            state: StepState::Publishing,
            attempts: 0,
            started_at: now,
            finished_at: None,
            error: None,
            dead_kind: None,
        }
    }

    fn in_flight(&self) -> bool {
        matches!(self.state, StepState::Publishing | StepState::Running)
    }

    fn settle(&mut self, ev: &StepEvent, now: DateTime<Utc>) {
        self.state = match ev.outcome {
            StepOutcome::Succeeded => StepState::Succeeded,
            StepOutcome::Dead => StepState::Failed,
        };
        self.attempts = ev.attempt;
        self.finished_at = Some(now);
        self.error = ev.error.clone();
        self.dead_kind = ev.dead_kind.clone();
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRun {
    pub name: String,
    pub state: StepState,
    /// Bumped by each resume that reruns this step (part of its task id).
    #[serde(default)]
    pub generation: u32,
    #[serde(default)]
    pub exec: Option<Exec>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub result_dropped: bool,
    /// Completion order within the run (compensations run in reverse).
    #[serde(default)]
    pub completed: Option<u64>,
    #[serde(default)]
    pub compensation: Option<Exec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub workflow: String,
    pub status: RunStatus,
    pub input: Value,
    /// The run's own trace context; every step is a child of it.
    #[serde(default)]
    pub traceparent: Option<String>,
    #[serde(default)]
    pub tracestate: Option<String>,
    pub started_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// How many times it was resumed.
    #[serde(default)]
    pub generation: u32,
    #[serde(default)]
    pub failure: Option<Failure>,
    #[serde(default)]
    pub compensation_failure: Option<Failure>,
    pub steps: Vec<StepRun>,
    #[serde(default)]
    seq: u64,
}

/// What an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already settled, or for an older execution: nothing changed.
    Duplicate,
    /// A step not in this run's workflow.
    Unknown,
    /// The failed step succeeded after all (a dead letter replayed): the
    /// run was resumed with that step succeeded.
    Replayed,
}

/// A task the coordinator must publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    /// The step name in the task's `x-warren-step` header
    /// (`<step>.compensate` for a compensation).
    pub step_header: String,
    /// The configured step it belongs to.
    pub step: String,
    pub task_id: String,
    pub task: String,
    pub payload: Value,
}

/// A step's task id: `<run>:<step>`, plus `:g<n>` after the n-th resume.
pub fn task_id(run: &str, step_header: &str, generation: u32) -> String {
    if generation == 0 {
        format!("{run}:{step_header}")
    } else {
        format!("{run}:{step_header}:g{generation}")
    }
}

impl Run {
    pub fn new(
        id: String,
        wf: &Workflow,
        input: Value,
        trace: Option<(String, Option<String>)>,
        now: DateTime<Utc>,
    ) -> Self {
        let (traceparent, tracestate) = match trace {
            Some((p, s)) => (Some(p), s),
            None => (None, None),
        };
        Self {
            id,
            workflow: wf.name.clone(),
            status: RunStatus::Running,
            input,
            traceparent,
            tracestate,
            started_at: now,
            finished_at: None,
            generation: 0,
            failure: None,
            compensation_failure: None,
            steps: wf
                .steps
                .iter()
                .map(|s| StepRun {
                    name: s.name.clone(),
                    state: StepState::Pending,
                    generation: 0,
                    exec: None,
                    result: None,
                    result_dropped: false,
                    completed: None,
                    compensation: None,
                })
                .collect(),
            seq: 0,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished_at.is_some()
    }

    fn step_mut(&mut self, name: &str) -> Option<&mut StepRun> {
        self.steps.iter_mut().find(|s| s.name == name)
    }

    pub fn step(&self, name: &str) -> Option<&StepRun> {
        self.steps.iter().find(|s| s.name == name)
    }

    fn anything_in_flight(&self) -> bool {
        self.steps.iter().any(|s| {
            s.exec.as_ref().is_some_and(Exec::in_flight)
                || s.compensation.as_ref().is_some_and(Exec::in_flight)
        })
    }

    /// Apply a step's outcome.
    pub fn apply(&mut self, ev: &StepEvent, now: DateTime<Utc>) -> Applied {
        if let Some(step) = ev.step.strip_suffix(COMPENSATE_SUFFIX) {
            if self.step(step).is_some() {
                return self.apply_compensation(step, ev, now);
            }
        }
        let status = self.status;
        let seq = self.seq + 1;
        let failed_step = self.failure.as_ref().map(|f| f.step.clone());
        let Some(s) = self.step_mut(&ev.step) else {
            return Applied::Unknown;
        };
        let Some(exec) = s.exec.as_mut() else {
            return Applied::Duplicate;
        };
        if exec.task_id != ev.task_id {
            return Applied::Duplicate;
        }
        if !exec.in_flight() {
            // A dead letter of the failed step, replayed and now succeeded:
            // the run continues from there, as a resume would.
            let replayable = exec.state == StepState::Failed
                && s.state == StepState::Failed
                && ev.outcome == StepOutcome::Succeeded
                && failed_step.as_deref() == Some(ev.step.as_str())
                && matches!(
                    status,
                    RunStatus::Failed | RunStatus::Compensated | RunStatus::CompensationFailed
                );
            if replayable && self.resume().is_ok() {
                self.seq += 1;
                let seq = self.seq;
                if let Some(s) = self.step_mut(&ev.step) {
                    let mut exec = Exec::new(ev.task_id.clone(), now);
                    exec.settle(ev, now);
                    s.exec = Some(exec);
                    s.state = StepState::Succeeded;
                    s.result = ev.result.clone();
                    s.result_dropped = ev.result_dropped;
                    s.completed = Some(seq);
                }
                return Applied::Replayed;
            }
            return Applied::Duplicate;
        }
        exec.settle(ev, now);
        match ev.outcome {
            StepOutcome::Succeeded => {
                s.state = StepState::Succeeded;
                s.result = ev.result.clone();
                s.result_dropped = ev.result_dropped;
                s.completed = Some(seq);
                self.seq = seq;
            }
            StepOutcome::Dead => {
                s.state = StepState::Failed;
                if self.status == RunStatus::Running {
                    self.status = RunStatus::Failed;
                    self.failure = Some(Failure {
                        step: ev.step.clone(),
                        dead_kind: ev.dead_kind.clone(),
                        error: ev.error.clone(),
                    });
                    for s in &mut self.steps {
                        if s.state == StepState::Pending {
                            s.state = StepState::Skipped;
                        }
                    }
                }
            }
        }
        Applied::Applied
    }

    fn apply_compensation(&mut self, step: &str, ev: &StepEvent, now: DateTime<Utc>) -> Applied {
        let Some(s) = self.step_mut(step) else {
            return Applied::Unknown;
        };
        let Some(c) = s.compensation.as_mut() else {
            return Applied::Duplicate;
        };
        if c.task_id != ev.task_id || !c.in_flight() {
            return Applied::Duplicate;
        }
        c.settle(ev, now);
        match ev.outcome {
            StepOutcome::Succeeded => s.state = StepState::Compensated,
            StepOutcome::Dead => {
                self.status = RunStatus::CompensationFailed;
                self.finished_at = Some(now);
                self.compensation_failure = Some(Failure {
                    step: step.to_owned(),
                    dead_kind: ev.dead_kind.clone(),
                    error: ev.error.clone(),
                });
            }
        }
        Applied::Applied
    }

    /// Put a failed run back to work: every step not succeeded (failed,
    /// skipped, compensated, or one whose compensation failed) is pending
    /// again under a new generation; succeeded steps keep their result.
    pub fn resume(&mut self) -> Result<(), String> {
        if !matches!(
            self.status,
            RunStatus::Failed | RunStatus::Compensated | RunStatus::CompensationFailed
        ) {
            return Err(format!(
                "run {} is {}: only a failed, compensated or compensation_failed run can be resumed",
                self.id,
                self.status.name()
            ));
        }
        if self.anything_in_flight() {
            return Err(format!(
                "run {} still has tasks running; resume it once they finished",
                self.id
            ));
        }
        self.generation += 1;
        self.status = RunStatus::Running;
        self.failure = None;
        self.compensation_failure = None;
        self.finished_at = None;
        let generation = self.generation;
        for s in &mut self.steps {
            if s.state != StepState::Succeeded {
                s.state = StepState::Pending;
                s.generation = generation;
                s.exec = None;
                s.result = None;
                s.result_dropped = false;
                s.completed = None;
                s.compensation = None;
            }
        }
        Ok(())
    }

    /// Decide what is due now: mark ready steps (or the next compensation)
    /// `publishing`, and finish the run when nothing is left.
    pub fn advance(&mut self, wf: &Workflow, now: DateTime<Utc>) {
        match self.status {
            RunStatus::Running => {
                let done: Vec<String> = self
                    .steps
                    .iter()
                    .filter(|s| s.state == StepState::Succeeded)
                    .map(|s| s.name.clone())
                    .collect();
                let id = self.id.clone();
                for s in &mut self.steps {
                    if s.state != StepState::Pending {
                        continue;
                    }
                    let ready = wf
                        .step(&s.name)
                        .is_some_and(|d| d.after.iter().all(|a| done.contains(a)));
                    if ready {
                        s.state = StepState::Publishing;
                        s.exec = Some(Exec::new(task_id(&id, &s.name, s.generation), now));
                    }
                }
                if self.steps.iter().all(|s| s.state == StepState::Succeeded) {
                    self.status = RunStatus::Succeeded;
                    self.finished_at = Some(now);
                }
            }
            RunStatus::Failed | RunStatus::Compensating => {
                if self.anything_in_flight() {
                    return;
                }
                let next = self
                    .steps
                    .iter()
                    .filter(|s| {
                        s.state == StepState::Succeeded
                            && wf.step(&s.name).is_some_and(|d| d.compensate.is_some())
                    })
                    .max_by_key(|s| s.completed)
                    .map(|s| s.name.clone());
                let id = self.id.clone();
                match next {
                    Some(name) => {
                        self.status = RunStatus::Compensating;
                        if let Some(s) = self.step_mut(&name) {
                            s.state = StepState::Compensating;
                            let header = format!("{name}{COMPENSATE_SUFFIX}");
                            s.compensation =
                                Some(Exec::new(task_id(&id, &header, s.generation), now));
                        }
                    }
                    None => {
                        if self.status == RunStatus::Compensating {
                            self.status = RunStatus::Compensated;
                        }
                        self.finished_at = Some(now);
                    }
                }
            }
            _ => {}
        }
    }

    /// Every task marked `publishing`, with its payload.
    pub fn due(&self, wf: &Workflow) -> Vec<Due> {
        let mut out = Vec::new();
        for s in &self.steps {
            let Some(def) = wf.step(&s.name) else {
                continue;
            };
            if let Some(e) = s.exec.as_ref().filter(|e| e.state == StepState::Publishing) {
                out.push(Due {
                    step_header: s.name.clone(),
                    step: s.name.clone(),
                    task_id: e.task_id.clone(),
                    task: def.task.clone(),
                    payload: self.payload_of(wf, &s.name),
                });
            }
            if let (Some(c), Some(task)) = (
                s.compensation
                    .as_ref()
                    .filter(|c| c.state == StepState::Publishing),
                def.compensate.as_ref(),
            ) {
                out.push(Due {
                    step_header: format!("{}{COMPENSATE_SUFFIX}", s.name),
                    step: s.name.clone(),
                    task_id: c.task_id.clone(),
                    task: task.clone(),
                    payload: json!({"input": self.input, "step": s.name, "result": s.result}),
                });
            }
        }
        out
    }

    /// How many tasks are marked `publishing`.
    pub fn due_count(&self) -> usize {
        self.steps
            .iter()
            .flat_map(|s| [s.exec.as_ref(), s.compensation.as_ref()])
            .flatten()
            .filter(|e| e.state == StepState::Publishing)
            .count()
    }

    /// A task no queue takes: its step (or compensation) ends dead.
    pub fn unroutable(&mut self, task_id: &str, error: &str, now: DateTime<Utc>) {
        let hit = self.steps.iter().find_map(|s| {
            if s.exec.as_ref().is_some_and(|e| e.task_id == task_id) {
                Some(s.name.clone())
            } else if s
                .compensation
                .as_ref()
                .is_some_and(|e| e.task_id == task_id)
            {
                Some(format!("{}{COMPENSATE_SUFFIX}", s.name))
            } else {
                None
            }
        });
        if let Some(step) = hit {
            let ev = StepEvent {
                workflow: self.workflow.clone(),
                run: self.id.clone(),
                step,
                task_id: task_id.to_owned(),
                outcome: StepOutcome::Dead,
                attempt: 0,
                error: Some(error.to_owned()),
                dead_kind: Some("unroutable".into()),
                result: None,
                result_dropped: false,
                at: now,
            };
            self.apply(&ev, now);
        }
    }

    /// Mark a task published (confirmed by the broker).
    pub fn published(&mut self, task_id: &str) {
        for s in &mut self.steps {
            for e in [s.exec.as_mut(), s.compensation.as_mut()]
                .into_iter()
                .flatten()
            {
                if e.task_id == task_id && e.state == StepState::Publishing {
                    e.state = StepState::Running;
                    if s.state == StepState::Publishing {
                        s.state = StepState::Running;
                    }
                }
            }
        }
    }

    /// The payload of a step: its template rendered, or
    /// `{"input": …, "results": {<after step>: <its result>}}`.
    pub fn payload_of(&self, wf: &Workflow, step: &str) -> Value {
        let Some(def) = wf.step(step) else {
            return Value::Null;
        };
        let result = |name: &str| self.step(name).and_then(|s| s.result.as_ref());
        match &def.payload {
            Some(t) => t.render(&Inputs {
                input: &self.input,
                run_id: &self.id,
                result: &result,
            }),
            None => {
                let results: BTreeMap<&str, Value> = def
                    .after
                    .iter()
                    .map(|a| (a.as_str(), result(a).cloned().unwrap_or(Value::Null)))
                    .collect();
                json!({"input": self.input, "results": results})
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::workflow::definition::{compile, WorkflowConfig};

    fn diamond(compensate: bool) -> Workflow {
        let comp = if compensate {
            "compensate='undo'\n"
        } else {
            ""
        };
        #[derive(serde::Deserialize)]
        struct Doc {
            workflows: Vec<WorkflowConfig>,
        }
        let d: Doc = toml::from_str(&format!(
            "[[workflows]]\nname='w'\n\
             [[workflows.steps]]\nname='a'\ntask='t.a'\n{comp}\
             [[workflows.steps]]\nname='b'\ntask='t.b'\nafter=['a']\n{comp}\
             [[workflows.steps]]\nname='c'\ntask='t.c'\nafter=['a']\n{comp}\
             [[workflows.steps]]\nname='d'\ntask='t.d'\nafter=['b','c']\n"
        ))
        .unwrap();
        compile(&d.workflows).unwrap().remove(0)
    }

    fn ev(step: &str, task_id: &str, outcome: StepOutcome, result: Option<Value>) -> StepEvent {
        StepEvent {
            workflow: "w".into(),
            run: "r".into(),
            step: step.into(),
            task_id: task_id.into(),
            outcome,
            attempt: 1,
            error: (outcome == StepOutcome::Dead).then(|| "boom".into()),
            dead_kind: (outcome == StepOutcome::Dead).then(|| "permanent".into()),
            result,
            result_dropped: false,
            at: Utc::now(),
        }
    }

    /// Advance, publish everything due, return the due task ids.
    fn step(run: &mut Run, wf: &Workflow) -> Vec<String> {
        run.advance(wf, Utc::now());
        let due = run.due(wf);
        for d in &due {
            run.published(&d.task_id);
        }
        due.into_iter().map(|d| d.task_id).collect()
    }

    #[test]
    fn diamond_fans_out_and_in_with_results() {
        let wf = diamond(false);
        let mut run = Run::new("r".into(), &wf, json!({"n": 1}), None, Utc::now());
        assert_eq!(step(&mut run, &wf), ["r:a"]);
        assert_eq!(step(&mut run, &wf), Vec::<String>::new());
        run.apply(
            &ev("a", "r:a", StepOutcome::Succeeded, Some(json!(1))),
            Utc::now(),
        );
        assert_eq!(step(&mut run, &wf), ["r:b", "r:c"]);
        run.apply(
            &ev("b", "r:b", StepOutcome::Succeeded, Some(json!("B"))),
            Utc::now(),
        );
        assert!(step(&mut run, &wf).is_empty(), "d waits for c");
        assert_eq!(
            run.apply(&ev("b", "r:b", StepOutcome::Succeeded, None), Utc::now()),
            Applied::Duplicate
        );
        run.apply(
            &ev("c", "r:c", StepOutcome::Succeeded, Some(json!("C"))),
            Utc::now(),
        );
        run.advance(&wf, Utc::now());
        let due = run.due(&wf);
        assert_eq!(due.len(), 1);
        assert_eq!(
            due[0].payload,
            json!({"input": {"n": 1}, "results": {"b": "B", "c": "C"}})
        );
        run.published("r:d");
        run.apply(&ev("d", "r:d", StepOutcome::Succeeded, None), Utc::now());
        run.advance(&wf, Utc::now());
        assert_eq!(run.status, RunStatus::Succeeded);
        assert!(run.is_finished());
    }

    #[test]
    fn a_dead_step_skips_the_rest_and_compensates_in_reverse_order() {
        let wf = diamond(true);
        let mut run = Run::new("r".into(), &wf, json!({}), None, Utc::now());
        step(&mut run, &wf);
        run.apply(&ev("a", "r:a", StepOutcome::Succeeded, None), Utc::now());
        step(&mut run, &wf);
        run.apply(&ev("c", "r:c", StepOutcome::Dead, None), Utc::now());
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.step("d").unwrap().state, StepState::Skipped);
        // b still runs: nothing compensates until it finished.
        assert!(step(&mut run, &wf).is_empty());
        run.apply(&ev("b", "r:b", StepOutcome::Succeeded, None), Utc::now());
        assert_eq!(step(&mut run, &wf), ["r:b.compensate"]);
        assert_eq!(run.status, RunStatus::Compensating);
        assert!(step(&mut run, &wf).is_empty(), "one at a time");
        run.apply(
            &ev(
                "b.compensate",
                "r:b.compensate",
                StepOutcome::Succeeded,
                None,
            ),
            Utc::now(),
        );
        assert_eq!(step(&mut run, &wf), ["r:a.compensate"]);
        run.apply(
            &ev(
                "a.compensate",
                "r:a.compensate",
                StepOutcome::Succeeded,
                None,
            ),
            Utc::now(),
        );
        step(&mut run, &wf);
        assert_eq!(run.status, RunStatus::Compensated);
        let f = run.failure.clone().unwrap();
        assert_eq!(
            (f.step.as_str(), f.dead_kind.as_deref()),
            ("c", Some("permanent"))
        );

        // Resume: a stays succeeded? No: it was compensated, so it reruns.
        run.resume().unwrap();
        assert_eq!(step(&mut run, &wf), ["r:a:g1"]);
    }

    #[test]
    fn resume_reruns_only_what_did_not_succeed() {
        let wf = diamond(false);
        let mut run = Run::new("r".into(), &wf, json!({}), None, Utc::now());
        step(&mut run, &wf);
        run.apply(&ev("a", "r:a", StepOutcome::Succeeded, None), Utc::now());
        step(&mut run, &wf);
        run.apply(&ev("b", "r:b", StepOutcome::Succeeded, None), Utc::now());
        assert!(run.resume().is_err(), "a running run is not resumable");
        run.apply(&ev("c", "r:c", StepOutcome::Dead, None), Utc::now());
        step(&mut run, &wf);
        assert_eq!(run.status, RunStatus::Failed);
        assert!(run.is_finished(), "nothing to compensate: final");
        run.resume().unwrap();
        assert_eq!(step(&mut run, &wf), ["r:c:g1"]);
        // The old execution's late event is stale.
        assert_eq!(
            run.apply(&ev("c", "r:c", StepOutcome::Succeeded, None), Utc::now()),
            Applied::Duplicate
        );
        run.apply(&ev("c", "r:c:g1", StepOutcome::Succeeded, None), Utc::now());
        assert_eq!(step(&mut run, &wf), ["r:d:g1"]);
    }

    #[test]
    fn a_replayed_dead_step_that_succeeds_resumes_the_run() {
        let wf = diamond(false);
        let mut run = Run::new("r".into(), &wf, json!({}), None, Utc::now());
        step(&mut run, &wf);
        run.apply(&ev("a", "r:a", StepOutcome::Dead, None), Utc::now());
        step(&mut run, &wf);
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(
            run.apply(
                &ev("a", "r:a", StepOutcome::Succeeded, Some(json!(5))),
                Utc::now()
            ),
            Applied::Replayed
        );
        assert_eq!(run.status, RunStatus::Running);
        assert_eq!(step(&mut run, &wf), ["r:b:g1", "r:c:g1"]);
        // Any other late event is ignored.
        assert_eq!(
            run.apply(&ev("a", "r:a", StepOutcome::Succeeded, None), Utc::now()),
            Applied::Duplicate
        );
    }

    #[test]
    fn a_dead_compensation_ends_the_run_naming_it() {
        let wf = diamond(true);
        let mut run = Run::new("r".into(), &wf, json!({}), None, Utc::now());
        step(&mut run, &wf);
        run.apply(&ev("a", "r:a", StepOutcome::Succeeded, None), Utc::now());
        step(&mut run, &wf);
        run.apply(&ev("b", "r:b", StepOutcome::Dead, None), Utc::now());
        run.apply(&ev("c", "r:c", StepOutcome::Succeeded, None), Utc::now());
        assert_eq!(step(&mut run, &wf), ["r:c.compensate"]);
        run.apply(
            &ev("c.compensate", "r:c.compensate", StepOutcome::Dead, None),
            Utc::now(),
        );
        assert_eq!(run.status, RunStatus::CompensationFailed);
        assert_eq!(run.compensation_failure.as_ref().unwrap().step, "c");
        assert!(step(&mut run, &wf).is_empty());
    }

    #[test]
    fn an_unroutable_step_fails_the_run_and_compensates() {
        let wf = diamond(true);
        let mut run = Run::new("r".into(), &wf, json!({}), None, Utc::now());
        step(&mut run, &wf);
        run.apply(&ev("a", "r:a", StepOutcome::Succeeded, None), Utc::now());
        run.advance(&wf, Utc::now());
        run.published("r:b");
        run.unroutable("r:c", "no queue takes `t.c`", Utc::now());
        assert_eq!(run.status, RunStatus::Failed);
        let f = run.failure.clone().unwrap();
        assert_eq!(
            (f.step.as_str(), f.dead_kind.as_deref()),
            ("c", Some("unroutable"))
        );
        run.apply(&ev("b", "r:b", StepOutcome::Succeeded, None), Utc::now());
        assert_eq!(step(&mut run, &wf), ["r:b.compensate"]);
    }

    #[test]
    fn snapshot_round_trip() {
        let wf = diamond(true);
        let mut run = Run::new("r".into(), &wf, json!({"x": [1]}), None, Utc::now());
        step(&mut run, &wf);
        let back: Run = serde_json::from_slice(&serde_json::to_vec(&run).unwrap()).unwrap();
        assert_eq!(back, run);
    }
}
