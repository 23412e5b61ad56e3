//! `workflows list|start|status|resume`: the same messages and the same
//! snapshot the HTTP API uses (see `crate::api` and docs/workflows.md).

use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Subcommand;

use super::UsageError;
use crate::config::{Checked, ProducerConfig};
use crate::workflow::run::{Run, RunStatus};
use crate::workflow::{self, store, Workflow};

#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// List the workflows of the config and their steps.
    List,
    /// Start a run (the start message any AMQP client may send); prints its id.
    Start {
        /// Workflow name.
        name: String,
        /// The run's input: JSON, `@file`, or `-` for stdin.
        #[arg(long)]
        input: Option<String>,
        /// Run id (default: a fresh UUID). A known id starts nothing.
        #[arg(long)]
        run_id: Option<String>,
    },
    /// Show a run: its status and every step's state, attempts and timings.
    Status {
        name: String,
        run_id: String,
        /// Print the run as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume a failed (or compensated) run: steps that did not succeed run again.
    Resume { name: String, run_id: String },
}

fn definition<'a>(wfs: &'a [Arc<Workflow>], name: &str) -> anyhow::Result<&'a Workflow> {
    wfs.iter()
        .find(|w| w.name == name)
        .map(|w| &**w)
        .ok_or_else(|| UsageError::Workflow(name.to_owned()).into())
}

pub async fn run(checked: Checked, cmd: WorkflowsCommand) -> anyhow::Result<()> {
    let Checked {
        cfg,
        workflows: wfs,
        ..
    } = checked;
    match cmd {
        WorkflowsCommand::List => {
            list(&wfs);
            Ok(())
        }
        WorkflowsCommand::Start {
            name,
            input,
            run_id,
        } => start(&cfg, definition(&wfs, &name)?, input, run_id).await,
        WorkflowsCommand::Status { name, run_id, json } => {
            let wf = definition(&wfs, &name)?;
            let run = fetch(&cfg, &name, &run_id).await?;
            if json {
                warren::outln!("{}", serde_json::to_string_pretty(&run)?);
            } else {
                print_table(wf, &run);
            }
            Ok(())
        }
        WorkflowsCommand::Resume { name, run_id } => {
            definition(&wfs, &name)?;
            resume(&cfg, &name, &run_id).await
        }
    }
}

/// `workflows list`: each workflow and its steps.
fn list(wfs: &[Arc<Workflow>]) {
    for w in wfs {
        warren::outln!("{}", w.name);
        for s in &w.steps {
            let after = if s.after.is_empty() {
                String::new()
            } else {
                format!("  after {}", s.after.join(", "))
            };
            let comp = s
                .compensate
                .as_ref()
                .map(|c| format!("  compensate {c}"))
                .unwrap_or_default();
            warren::outln!("  {}  → {}{after}{comp}", s.name, s.task);
        }
    }
}

/// `workflows start`: send the start message, print the run id.
async fn start(
    cfg: &ProducerConfig,
    wf: &Workflow,
    input: Option<String>,
    run_id: Option<String>,
) -> anyhow::Result<()> {
    let input = match input {
        None => serde_json::Value::Null,
        Some(a) => super::read_payload(Some(&a))?,
    };
    let id = run_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (props, body) = workflow::start_message(&wf.name, &input, &id, None);
    let what = || format!("starting a run of `{}`", wf.name);
    send(cfg, warren::workflow::START, props, &body, what).await?;
    warren::outln!("{id}");
    Ok(())
}

/// `workflows resume`: only a finished run that did not succeed.
async fn resume(cfg: &ProducerConfig, name: &str, run_id: &str) -> anyhow::Result<()> {
    let run = fetch(cfg, name, run_id).await?;
    let resumable = matches!(
        run.status,
        RunStatus::Failed | RunStatus::Compensated | RunStatus::CompensationFailed
    ) && run.is_finished();
    if !resumable {
        anyhow::bail!(
            "run `{run_id}` is {}: only a finished failed, compensated or compensation_failed run can be resumed",
            run.status.name()
        );
    }
    let (props, body) = workflow::resume_message(name, run_id);
    let what = || format!("resuming run `{run_id}`");
    send(cfg, warren::workflow::RESUME, props, &body, what).await?;
    warren::outln!("{run_id}: resume requested");
    Ok(())
}

/// Publish one message to the workflows exchange on a connection of its
/// own; a refused publish is reported as `what` failed.
async fn send(
    cfg: &ProducerConfig,
    key: &str,
    props: lapin::BasicProperties,
    body: &[u8],
    what: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let (conn, publisher, topo) = super::connect(cfg).await?;
    let res = publisher
        .publish(&topo.workflows_exchange(), key, props, body)
        .await;
    let _ = conn.close(200, "done".into()).await;
    res.with_context(what)
}

async fn fetch(cfg: &ProducerConfig, name: &str, id: &str) -> anyhow::Result<Run> {
    let conn = warren::amqp::connect(&cfg.amqp, "producer-cli")
        .await
        .context("connecting to the broker")?;
    let runs = store::read_once(&conn, &cfg.topology.prefix).await;
    let _ = conn.close(200, "done".into()).await;
    let runs = runs.context("reading the workflow state")?;
    runs.get(id)
        .filter(|r| r.workflow == name)
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no run `{id}` of workflow `{name}` (not started yet, unknown, or past workflow.retention)"
            )
        })
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".into(),
        |t| t.to_rfc3339_opts(SecondsFormat::Millis, true),
    )
}

fn print_table(wf: &Workflow, run: &Run) {
    warren::outln!("run       {}", run.id);
    warren::outln!("workflow  {}", wf.name);
    warren::outln!("status    {}", run.status.name());
    warren::outln!("started   {}", time(Some(run.started_at)));
    warren::outln!("finished  {}", time(run.finished_at));
    if let Some(f) = &run.failure {
        warren::outln!(
            "failed    step {} ({}): {}",
            f.step,
            f.dead_kind.as_deref().unwrap_or("-"),
            f.error.as_deref().unwrap_or("-")
        );
    }
    if let Some(f) = &run.compensation_failure {
        warren::outln!(
            "compensation of {} failed: {}",
            f.step,
            f.error.as_deref().unwrap_or("-")
        );
    }
    warren::outln!("");
    warren::outln!(
        "{:<20} {:<13} {:>8} {:<26} {:<26} {}",
        "STEP",
        "STATE",
        "ATTEMPTS",
        "STARTED",
        "FINISHED",
        "TASK ID"
    );
    for s in &run.steps {
        let (attempts, started, finished, id) = match &s.exec {
            Some(e) => (
                e.attempts.to_string(),
                time(Some(e.started_at)),
                time(e.finished_at),
                e.task_id.clone(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        warren::outln!(
            "{:<20} {:<13} {:>8} {:<26} {:<26} {}",
            s.name,
            s.state.name(),
            attempts,
            started,
            finished,
            id
        );
        if let Some(e) = s.exec.as_ref().and_then(|e| e.error.as_ref()) {
            warren::outln!("{:<20} error: {e}", "");
        }
        if let Some(c) = &s.compensation {
            warren::outln!(
                "{:<20} compensation {} ({}){}",
                "",
                c.state.name(),
                c.task_id,
                c.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    }
}
