//! `warren-consumer [--config FILE] [run]` runs the worker;
//! `warren-consumer dead list|replay|purge` manages the dead-letter queue.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use warren_consumer::dead::{self, Selector};
use warren_consumer::{handlers, ConsumerConfig, Registry, Worker};

#[derive(Parser)]
#[command(
    name = "warren-consumer",
    version,
    about = "Execute warren tasks from RabbitMQ"
)]
struct Cli {
    /// TOML config file (every key is optional; defaults documented in the README).
    #[arg(long, short, env = "WARREN_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume and execute tasks (the default).
    Run,
    /// Validate the config (everything `run` checks, handlers included) and
    /// exit: 0 if it is valid, 2 listing the problem otherwise.
    Check,
    /// Inspect, replay or purge dead-lettered tasks.
    #[command(subcommand)]
    Dead(DeadCommand),
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List dead tasks (they stay in the queue).
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Count by task and reason instead of listing.
        #[arg(long)]
        group: bool,
    },
    /// Republish dead tasks with attempts reset, then remove them.
    Replay(Select),
    /// Delete dead tasks.
    Purge(Select),
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Select {
    /// Task id(s) (the AMQP message_id).
    #[arg(long = "id", num_args = 1..)]
    ids: Vec<String>,
    /// Task name or topic pattern (`email.*`).
    #[arg(long)]
    task: Option<String>,
    /// Every dead task.
    #[arg(long)]
    all: bool,
}

impl Select {
    fn selector(&self) -> Selector {
        if self.all {
            Selector::All
        } else if let Some(t) = &self.task {
            Selector::Task(t.clone())
        } else {
            Selector::Ids(self.ids.clone())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One validation for every subcommand, before anything starts: a config
    // error is exit 2 whether it is found by `check`, `run` or `dead`.
    let (cfg, registry) = match load_checked(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-consumer: {e:#}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Check = command {
        println!(
            "ok: {} handler(s), queues {} ({})",
            registry.names().count(),
            cfg.queue_names().join(", "),
            warren::config::origin(cli.config.as_deref())
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-consumer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        match command {
            Command::Run => run(cfg, registry).await,
            Command::Check => Ok(()),
            Command::Dead(cmd) => dead_cmd(cfg, cmd).await,
        }
    });
    // Lines still queued for the log writer would die with the process.
    warren::telemetry::flush();
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-consumer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The config and the handlers it names, validated: what `check` reports
/// and what `run` starts with.
fn load_checked(path: Option<&Path>) -> anyhow::Result<(ConsumerConfig, Registry)> {
    let cfg = ConsumerConfig::load(path, warren::config::process_env())?;
    let registry = handlers::registry_from_config(&cfg.handlers, cfg.worker.task_timeout)
        .with_context(|| warren::config::origin(path))?;
    Ok((cfg, registry))
}

async fn run(cfg: ConsumerConfig, registry: Registry) -> anyhow::Result<()> {
    warren::telemetry::init(&cfg.log);
    if registry.is_empty() {
        tracing::warn!(
            "no handlers configured: every task will be dead-lettered with kind `no_handler`"
        );
    } else {
        let names: Vec<&str> = registry.names().collect();
        tracing::info!(handlers = ?names, "handlers registered");
    }
    if cfg.worker.task_timeout >= std::time::Duration::from_secs(30 * 60) {
        tracing::warn!(
            task_timeout = %humantime::format_duration(cfg.worker.task_timeout),
            "task_timeout reaches RabbitMQ's default consumer_timeout (30 min): raise consumer_timeout on the broker or deliveries will be requeued mid-task"
        );
    }
    let shutdown = warren::shutdown::token();
    warren::shutdown::ignore_hangup("warren-consumer");
    let addr = cfg.http.addr;
    let worker = Worker::builder(cfg).registry(registry).build()?;
    let router = warren::metrics::ops_router(worker.prometheus(), worker.health());
    let http_stop = tokio_util::sync::CancellationToken::new();
    let (_, server) = warren::metrics::serve(addr, router, http_stop.clone())
        .await
        .with_context(|| format!("cannot serve HTTP on {addr}"))?;
    let res = worker.run(shutdown).await;
    http_stop.cancel();
    let _ = server.await;
    res
}

async fn dead_cmd(cfg: ConsumerConfig, cmd: DeadCommand) -> anyhow::Result<()> {
    warren::telemetry::init(&warren::config::LogConfig {
        level: "warn".into(),
        ..cfg.log.clone()
    });
    let topo = warren::Topology::new(&cfg.topology);
    let conn = warren::amqp::connect(&cfg.amqp, "warren-consumer-dead")
        .await
        .context("connecting to the broker")?;
    warren::topology::declare(&conn, &topo).await?;
    let res = async {
        match cmd {
            DeadCommand::List { limit, json, group } => {
                let tasks = dead::list(&conn, &topo, limit).await?;
                if group {
                    let mut groups: std::collections::BTreeMap<(String, String), usize> =
                        Default::default();
                    for t in &tasks {
                        *groups
                            .entry((t.task.clone(), t.reason.clone()))
                            .or_default() += 1;
                    }
                    println!("{:>6}  {:<30} REASON", "COUNT", "TASK");
                    for ((task, reason), n) in groups {
                        println!("{n:>6}  {task:<30} {reason}");
                    }
                } else if json {
                    for t in &tasks {
                        println!("{}", serde_json::to_string(t)?);
                    }
                } else {
                    println!(
                        "{:<38} {:<24} {:>8} {:<24} REASON",
                        "ID", "TASK", "ATTEMPTS", "FAILED AT"
                    );
                    for t in &tasks {
                        println!(
                            "{:<38} {:<24} {:>8} {:<24} {}",
                            t.id.as_deref().unwrap_or("-"),
                            t.task,
                            t.attempts
                                .map(|a| a.to_string())
                                .unwrap_or_else(|| "-".into()),
                            t.failed_at.as_deref().unwrap_or("-"),
                            t.reason
                        );
                    }
                    eprintln!("{} dead task(s) shown", tasks.len());
                }
            }
            DeadCommand::Replay(sel) => {
                let r = dead::replay(
                    &conn,
                    &topo,
                    &sel.selector(),
                    usize::MAX,
                    cfg.amqp.confirm_timeout,
                )
                .await?;
                for id in &r.replayed {
                    println!("replayed {id}");
                }
                for (id, why) in &r.failed {
                    eprintln!("kept {id}: {why}");
                }
                eprintln!("{} replayed, {} kept", r.replayed.len(), r.failed.len());
                anyhow::ensure!(r.failed.is_empty(), "some tasks could not be replayed");
            }
            DeadCommand::Purge(sel) => {
                let n = dead::purge(&conn, &topo, &sel.selector(), usize::MAX).await?;
                println!("purged {n}");
            }
        }
        anyhow::Ok(())
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    res
}
