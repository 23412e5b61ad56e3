//! Command line: `run` (default), `schedules check|next|pause|resume`, `publish`,
//! `workflows list|start|status|resume`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand};
use warren::amqp::Publisher;
use warren::topology::producer::Part;
use warren::Topology;

use crate::config::{self, ProducerConfig};
use crate::request::{RequestError, TaskRequest};

mod schedules;
mod tasks;
mod workflows;
pub use schedules::{apply as apply_schedules, delete as delete_schedule};
pub use tasks::{run as tasks, workers, TasksCommand};
pub use workflows::{run as workflows, WorkflowsCommand};

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
    #[error("no schedule named `{0}` in the config or among the API's schedules")]
    Schedule(String),
    #[error("schedule `{0}` is defined in the producer's config file: change it there")]
    ConfigSchedule(String),
    #[error("no workflow named `{0}` in the config")]
    Workflow(String),
    #[error("token hash: the token on stdin is shorter than 16 characters")]
    ShortToken,
    #[error("--traceparent is not a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all zero)")]
    Traceparent,
    #[error("--since {0:?}: expected a duration such as 10m or an RFC 3339 instant")]
    Since(String),
    #[error("--state {0:?}: expected published, running, retrying, succeeded or dead")]
    State(String),
}

/// The process exit code for an error of any subcommand: 2 for a
/// configuration or command line the process refused (every subcommand
/// validates through [`config::load`] / [`config::load_checked`], whose
/// errors are all `ConfigError`s, and `publish` reports its arguments as
/// [`UsageError`]s), 1 for anything that went wrong while running.
pub fn exit_code(e: &anyhow::Error) -> std::process::ExitCode {
    if e.downcast_ref::<tasks::WaitTimedOut>().is_some() {
        return std::process::ExitCode::from(124);
    }
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
    /// API token helpers.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Workflows: list, start, status, resume (docs/workflows.md).
    Workflows {
        #[command(subcommand)]
        command: WorkflowsCommand,
    },
    /// What happened to tasks, from the task events stream (docs/tasks.md).
    Tasks {
        #[command(subcommand)]
        command: TasksCommand,
    },
    /// Consumers heard in the last 16 s: queues, running, counts.
    Workers {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Read a token on stdin and print `sha256:<hex>`, the form a config
    /// may hold instead of the token itself.
    Hash,
}

/// `token hash`: the first line of stdin (trailing newline dropped).
pub fn token_hash() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let token = line.trim_end_matches(['\r', '\n']);
    if token.len() < 16 {
        return Err(UsageError::ShortToken.into());
    }
    warren::outln!("{}", crate::auth::grant::hashed_token(token.as_bytes()));
    Ok(())
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
    /// Pause a schedule on the running producers (through the broker; the
    /// leader records it). Its instants are skipped until `resume`.
    Pause {
        /// Schedule name.
        name: String,
    },
    /// Resume a paused schedule: it fires from its next instant on.
    Resume {
        /// Schedule name.
        name: String,
    },
    /// Create or replace the API's schedules from a file (TOML with
    /// `[[schedules]]`, or JSON), all checked before any is stored.
    Apply {
        /// The file of schedules.
        file: PathBuf,
        /// Show what would be created, updated or left unchanged; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a schedule created through the API or `apply`.
    Delete {
        /// Schedule name.
        name: String,
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
    /// W3C trace context the task joins (e.g. `--traceparent "$TRACEPARENT"`
    /// inside an exec handler); default: a trace of its own.
    #[arg(long)]
    pub traceparent: Option<String>,
    /// Read newline-delimited JSON tasks from stdin (`{"task": ..., "payload": ...}`
    /// per line) and publish them with pipelined confirms.
    #[arg(long, conflicts_with_all = ["payload", "delay", "at", "priority", "max_attempts", "id", "traceparent"])]
    pub batch: bool,
    /// Confirms outstanding at once in --batch mode.
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
}

/// `schedules check`.
pub fn check(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config::Checked {
        schedules,
        workflows,
        ..
    } = config::load_checked(path)?;
    let enabled = schedules.iter().filter(|s| s.cfg.enabled).count();
    warren::outln!(
        "ok: {} schedule(s), {} enabled, {} workflow(s) ({})",
        schedules.len(),
        enabled,
        workflows.len(),
        warren::config::origin(path)
    );
    Ok(())
}

/// `schedules next`.
pub fn next(path: Option<&std::path::Path>, count: usize) -> anyhow::Result<()> {
    let schedules = config::load_checked(path)?.schedules;
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
            s.target()
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

/// `schedules pause|resume NAME`: send the request to the leader over the
/// broker and wait for it to be recorded (exit 1 if no leader answers).
pub async fn pause_or_resume(
    cfg: ProducerConfig,
    schedules: &[config::Schedule],
    name: &str,
    pause: bool,
) -> anyhow::Result<()> {
    use crate::control::{self, Op};
    // Not in the file: it may be an API schedule, which only the leader
    // knows for sure.
    let in_file = schedules.iter().any(|s| s.name() == name);
    let conn = warren::amqp::connect(&cfg.amqp, "producer-cli")
        .await
        .context("connecting to the broker")?;
    let prefix = cfg.topology.prefix.as_str();
    let res = async {
        let topo = warren::Topology::new(&cfg.topology);
        warren::topology::producer::declare(&conn, &topo, &[Part::Control]).await?;
        let (_ch, mut events) = control::subscribe(&conn, prefix).await?;
        let req = control::Request {
            id: uuid::Uuid::new_v4().to_string(),
            op: if pause { Op::Pause } else { Op::Resume },
            schedule: Some(name.to_owned()),
        };
        control::send(&conn, prefix, &req).await?;
        let answer = async {
            while let Some((_, ev)) = control::next::<control::Incoming>(&mut events).await {
                match ev {
                    Some(control::Incoming::Event(ev))
                        if ev.answers.as_deref() == Some(req.id.as_str()) =>
                    {
                        return Some(ev)
                    }
                    _ => {}
                }
            }
            None
        };
        match tokio::time::timeout(control::REPLY_TIMEOUT, answer).await {
            Ok(Some(control::Event { error: None, .. })) => Ok(()),
            Ok(Some(control::Event { error: Some(e), .. }))
                if !in_file && e.starts_with(control::UNKNOWN_SCHEDULE) =>
            {
                Err(UsageError::Schedule(name.to_owned()).into())
            }
            Ok(Some(control::Event { error: Some(e), .. })) => {
                Err(anyhow::anyhow!("the leader refused: {e}"))
            }
            _ => Err(anyhow::anyhow!("{}", control::ControlError::NoLeader)),
        }
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    res.with_context(|| {
        let verb = if pause { "pausing" } else { "resuming" };
        format!("{verb} schedule `{name}`")
    })?;
    warren::outln!("{name}: {}", if pause { "paused" } else { "resumed" });
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
    let topo = Topology::new(&cfg.topology).with_events(cfg.events.shared().stream());
    warren::topology::declare(&conn, &topo)
        .await
        .context("declaring the topology")?;
    // `config::load` validated the keys; reading them again cannot
    // fail but for a file removed meanwhile.
    let seal = warren::security::Seal::from_config(&cfg.security)
        .map_err(|e| warren::config::ConfigError::Invalid {
            origin: "configuration".into(),
            message: e.to_string(),
        })?
        .map(std::sync::Arc::new);
    let publisher = Publisher::new(&conn, cfg.amqp.confirm_timeout)
        .await?
        .sealed(seal);
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
        traceparent: args.traceparent,
        tracestate: None,
    };
    let (task, delay) = req.into_task(Utc::now()).map_err(|e| match e {
        RequestError::BadTraceparent => UsageError::Traceparent,
        e => UsageError::Task(e),
    })?;
    let (conn, publisher, topo) = connect(&cfg).await?;
    let res = publisher.publish_task(&topo, &task, delay).await;
    if res.is_ok() {
        let events = recorder(&cfg, &topo, &conn).await;
        events.record(crate::batch::published_event(&task));
        events.flush(FLUSH_TIMEOUT).await;
    }
    let _ = conn.close(200, "done".into()).await;
    res.with_context(|| format!("publishing task `{}` ({})", task.name, task.id))?;
    crate::api::log_published(&task);
    warren::outln!("{}", task.id);
    Ok(())
}

async fn publish_batch(cfg: ProducerConfig, window: usize) -> anyhow::Result<()> {
    let (conn, publisher, topo) = connect(&cfg).await?;
    let events = recorder(&cfg, &topo, &conn).await;
    let res = crate::batch::publish(&publisher, &topo, std::io::stdin(), window, &events).await;
    events.flush(FLUSH_TIMEOUT).await;
    let _ = conn.close(200, "done".into()).await;
    res
}

/// How long `publish` waits for its task events before it exits.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The task events recorder of a `publish` run (its counters go nowhere:
/// the command serves no metrics).
async fn recorder(
    cfg: &ProducerConfig,
    topo: &Topology,
    conn: &lapin::Connection,
) -> warren::events::Recorder {
    let metrics = warren::events::EventMetrics::register(&prometheus::Registry::new()).ok();
    let Some(metrics) = metrics.filter(|_| cfg.events.enabled) else {
        return warren::events::Recorder::disabled();
    };
    let r = warren::events::Recorder::new(
        topo.events_stream(),
        warren::events::Origin {
            role: "cli".into(),
            instance: format!("{}:{}", warren::config::host_name(), std::process::id()),
            host: warren::config::host_name(),
        },
        metrics,
        cfg.amqp.confirm_timeout,
    );
    r.attach(conn).await;
    r
}
