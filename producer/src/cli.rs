//! Command line: `run` (default), `schedules check|next`, `publish`.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand};
use warren::amqp::Publisher;
use warren::Topology;

use crate::config::{self, ProducerConfig};
use crate::request::{RequestError, TaskRequest};

/// What the user wrote on the command line cannot work (exit 2, like a bad
/// config): the payload is not JSON or its file cannot be read, the task is
/// invalid. Failures while publishing stay runtime failures (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("reading the payload from {path}: {error}")]
    PayloadFile { path: String, error: std::io::Error },
    #[error("--payload is not valid JSON: {0}")]
    PayloadJson(serde_json::Error),
    #[error("{0}")]
    Task(RequestError),
}

/// The process exit code for an error of any subcommand: 2 for a
/// configuration or command line the process refused (every subcommand
/// validates through [`config::load`] / [`config::load_checked`], whose
/// errors are all `ConfigError`s, and `publish` reports its arguments as
/// [`UsageError`]s), 1 for anything that went wrong while running.
pub fn exit_code(e: &anyhow::Error) -> std::process::ExitCode {
    if e.downcast_ref::<warren::config::ConfigError>().is_some()
        || e.downcast_ref::<UsageError>().is_some()
    {
        std::process::ExitCode::from(2)
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "warren-producer",
    version,
    about = "warren's cron producer: schedules, leader election, ad-hoc publishing"
)]
pub struct Cli {
    /// Config file (TOML). Without one, defaults and WARREN_* environment apply.
    #[arg(long, env = "WARREN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the scheduler and the HTTP API (the default).
    Run,
    /// Validate or preview the schedules of a config.
    Schedules {
        #[command(subcommand)]
        command: SchedulesCommand,
    },
    /// Publish one task (or many with --batch) and wait for the broker's confirm.
    Publish(PublishArgs),
}

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// Validate the config; exit non-zero listing every error.
    Check,
    /// Print the upcoming fire instants of each schedule (UTC and local).
    Next {
        /// How many instants per schedule.
        #[arg(long, default_value_t = 5)]
        count: usize,
    },
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Task name (routing key), e.g. `email.send`.
    #[arg(required_unless_present = "batch", conflicts_with = "batch")]
    pub task: Option<String>,
    /// JSON payload, `@file` to read it from a file, or `-` for stdin.
    #[arg(long)]
    pub payload: Option<String>,
    /// Deliver after this long (e.g. `90s`, `1h 30m`).
    #[arg(long, conflicts_with = "at")]
    pub delay: Option<humantime::Duration>,
    /// Deliver at this RFC 3339 instant.
    #[arg(long)]
    pub at: Option<DateTime<Utc>>,
    #[arg(long)]
    pub priority: Option<u8>,
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Task id (default: a fresh UUID).
    #[arg(long)]
    pub id: Option<String>,
    /// Read newline-delimited JSON tasks from stdin (`{"task": ..., "payload": ...}`
    /// per line) and publish them with pipelined confirms.
    #[arg(long, conflicts_with_all = ["payload", "delay", "at", "priority", "max_attempts", "id"])]
    pub batch: bool,
    /// Confirms outstanding at once in --batch mode.
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
}

/// `schedules check`.
pub fn check(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let (_, schedules) = config::load_checked(path)?;
    let enabled = schedules.iter().filter(|s| s.cfg.enabled).count();
    warren::outln!(
        "ok: {} schedule(s), {} enabled ({})",
        schedules.len(),
        enabled,
        warren::config::origin(path)
    );
    Ok(())
}

/// `schedules next`.
pub fn next(path: Option<&std::path::Path>, count: usize) -> anyhow::Result<()> {
    let (_, schedules) = config::load_checked(path)?;
    let now = Utc::now();
    let mut out = std::io::stdout().lock();
    for s in &schedules {
        let state = if s.cfg.enabled { "" } else { " [disabled]" };
        writeln!(
            out,
            "{}  `{}`  {}  → {}{state}",
            s.name(),
            s.cfg.cron,
            s.cfg.timezone,
            s.cfg.task
        )?;
        let tz = s.spec.tz();
        let mut cur = now;
        for _ in 0..count {
            let Some(t) = s.spec.next_after(cur) else {
                writeln!(out, "  (no further fires)")?;
                break;
            };
            writeln!(
                out,
                "  {}  {}",
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                t.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z (%:z)")
            )?;
            cur = t;
        }
    }
    Ok(())
}

fn read_payload(arg: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let text = match arg {
        None => return Ok(serde_json::Value::Object(Default::default())),
        Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the payload from stdin")?;
            s
        }
        Some(a) if a.starts_with('@') => {
            std::fs::read_to_string(&a[1..]).map_err(|error| UsageError::PayloadFile {
                path: a[1..].to_owned(),
                error,
            })?
        }
        Some(a) => a.to_owned(),
    };
    Ok(serde_json::from_str(&text).map_err(UsageError::PayloadJson)?)
}

async fn connect(cfg: &ProducerConfig) -> anyhow::Result<(lapin::Connection, Publisher, Topology)> {
    let conn = warren::amqp::connect(&cfg.amqp, "producer-cli")
        .await
        .context("connecting to the broker")?;
    let topo = Topology::new(&cfg.topology);
    warren::topology::declare(&conn, &topo)
        .await
        .context("declaring the topology")?;
    let publisher = Publisher::new(&conn, cfg.amqp.confirm_timeout).await?;
    Ok((conn, publisher, topo))
}

/// `publish`.
pub async fn publish(cfg: ProducerConfig, args: PublishArgs) -> anyhow::Result<()> {
    if args.batch {
        return publish_batch(cfg, args.window).await;
    }
    let req = TaskRequest {
        task: args.task.unwrap_or_default(),
        payload: Some(read_payload(args.payload.as_deref())?),
        id: args.id,
        priority: args.priority,
        max_attempts: args.max_attempts,
        timeout: None,
        delay: args.delay.map(Into::into),
        at: args.at,
        correlation_id: None,
    };
    let (task, delay) = req.into_task(Utc::now()).map_err(UsageError::Task)?;
    let (conn, publisher, topo) = connect(&cfg).await?;
    let res = publisher.publish_task(&topo, &task, delay).await;
    let _ = conn.close(200, "done".into()).await;
    res.with_context(|| format!("publishing task `{}` ({})", task.name, task.id))?;
    warren::outln!("{}", task.id);
    Ok(())
}

async fn publish_batch(cfg: ProducerConfig, window: usize) -> anyhow::Result<()> {
    let (conn, publisher, topo) = connect(&cfg).await?;
    let res = crate::batch::publish(&publisher, &topo, std::io::stdin(), window).await;
    let _ = conn.close(200, "done".into()).await;
    res
}
