//! The command line of `warren-consumer`: what it accepts (`run`, `check`,
//! `dead list|replay|purge`), loading and validating the config every
//! subcommand starts from, and the output of `check`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use warren_consumer::dead::Selector;
use warren_consumer::{handlers, ConsumerConfig, Registry};

#[derive(Debug, Parser)]
#[command(
    name = "warren-consumer",
    version,
    about = "Execute warren tasks from RabbitMQ"
)]
pub struct Cli {
    /// TOML config file (every key is optional; defaults documented in docs/configuration.md).
    #[arg(long, short, env = "WARREN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume and execute tasks (the default).
    Run,
    /// Validate the config (everything `run` checks, handlers included) and
    /// exit: 0 if it is valid, 2 listing the problem otherwise.
    Check,
    /// Inspect, replay or purge dead-lettered tasks.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Declare the topology of the config (exchanges, queues, bindings, and
    /// the producer's own queues, streams and exchange) and
    /// exit: the deployer's step when the roles run with
    /// `topology.declare = false` under users without configure permission.
    Declare,
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
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

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Select {
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
    pub fn selector(&self) -> Selector {
        if self.all {
            Selector::All
        } else if let Some(t) = &self.task {
            Selector::Task(t.clone())
        } else {
            Selector::Ids(self.ids.clone())
        }
    }
}

/// The config and the handlers it names, validated: what `check` reports
/// and what `run` starts with. Every error here is a config error (exit 2).
pub fn load_checked(path: Option<&Path>) -> anyhow::Result<(ConsumerConfig, Registry)> {
    let cfg = ConsumerConfig::load(path, warren::config::process_env())?;
    let registry = handlers::registry_from_config(&cfg.handlers, cfg.worker.task_timeout)
        .with_context(|| warren::config::origin(path))?;
    Ok((cfg, registry))
}

/// `check`'s report on a valid config.
pub fn check(path: Option<&Path>, cfg: &ConsumerConfig, registry: &Registry) {
    warren::outln!(
        "ok: {} handler(s), queues {} ({})",
        registry.names().count(),
        cfg.queue_names().join(", "),
        warren::config::origin(path)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("warren-consumer").chain(args.iter().copied()))
    }

    fn selector(args: &[&str]) -> Selector {
        match parse(args).map(|c| c.command) {
            Ok(Some(Command::Dead(DeadCommand::Replay(s) | DeadCommand::Purge(s)))) => s.selector(),
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn run_is_the_default() {
        assert!(parse(&[]).is_ok_and(|c| c.command.is_none()));
    }

    #[test]
    fn dead_selection_is_one_of_ids_task_or_all() {
        assert_eq!(
            selector(&["dead", "replay", "--id", "a", "b"]),
            Selector::Ids(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            selector(&["dead", "purge", "--task", "email.*"]),
            Selector::Task("email.*".into())
        );
        assert_eq!(selector(&["dead", "purge", "--all"]), Selector::All);
        for refused in [
            &["dead", "replay"][..],
            &["dead", "purge", "--all", "--task", "x"],
        ] {
            let e = parse(refused).expect_err("usage error");
            assert_eq!(e.exit_code(), 2, "{refused:?}");
        }
    }

    #[test]
    fn list_defaults() {
        match parse(&["dead", "list"]).map(|c| c.command) {
            Ok(Some(Command::Dead(DeadCommand::List { limit, json, group }))) => {
                assert_eq!((limit, json, group), (100, false, false));
            }
            other => panic!("{other:?}"),
        }
    }
}
