//! `warren-producer`: the cron producer of warren.
//!
//! | module | owns |
//! |---|---|
//! | [`schedule`] | pure next-fire math: syntaxes, zones, DST rules, misfire plan |
//! | [`config`] | `ProducerConfig` and schedule validation |
//! | [`leader`] | election on an exclusive queue and the fence before each tick |
//! | [`state`] | the last-fire snapshot a new leader resumes from (in RabbitMQ) |
//! | [`scheduler`] | election loop and fire loop |
//! | [`api`] | the `/v1` HTTP API with bearer-token scopes |
//! | [`request`] | ad-hoc task requests (CLI batch lines, API bodies) |
//! | [`cli`] | command line |
//! | [`app`] | wiring of `run` |
//! | [`metrics`] | the producer's Prometheus metrics |

mod api;
mod app;
mod cli;
mod config;
mod leader;
mod metrics;
mod request;
mod schedule;
mod scheduler;
mod state;

use clap::Parser;

use crate::cli::{Cli, Command, SchedulesCommand};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let path = cli.config.as_deref();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Schedules {
            command: SchedulesCommand::Check,
        } => cli::check(path),
        Command::Schedules {
            command: SchedulesCommand::Next { count },
        } => cli::next(path, count),
        Command::Publish(args) => config::load(path).and_then(|cfg| {
            warren::telemetry::init(&cfg.log);
            runtime()?.block_on(cli::publish(cfg, args))
        }),
        Command::Run => config::load_checked(path).and_then(|(cfg, schedules)| {
            warren::telemetry::init(&cfg.log);
            runtime()?.block_on(app::run(cfg, cli.config.clone(), schedules))
        }),
    };
    // Lines still queued for the log writer would die with the process.
    warren::telemetry::flush();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-producer: {e:#}");
            exit_code(&e)
        }
    }
}

/// 2 for a configuration the process refused (every subcommand validates
/// through [`config::load`] / [`config::load_checked`], whose errors are all
/// `ConfigError`s), 1 for anything that went wrong while running.
fn exit_code(e: &anyhow::Error) -> std::process::ExitCode {
    if e.downcast_ref::<warren::config::ConfigError>().is_some() {
        std::process::ExitCode::from(2)
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
