//! `warren-consumer [--config FILE] [run]` runs the worker;
//! `warren-consumer check` validates the config;
//! `warren-consumer dead list|replay|purge` manages the dead-letter queue;
//! `warren-consumer declare` declares the topology and exits.
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | arguments, config loading and validation, `check` |
//! | [`app`] | wiring of `run`: worker + HTTP |
//! | [`dead_cli`] | the `dead` subcommands and their output, `declare` |

mod app;
mod cli;
mod dead_cli;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

// Allocation is a large part of the CPU per task; mimalloc costs less than
// glibc's malloc for the many small, short-lived buffers of a delivery
// (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.as_deref();
    // One validation for every subcommand, before anything starts: a config
    // error is exit 2 whether it is found by `check`, `run` or `dead`.
    let (cfg, registry) = match cli::load_checked(path) {
        Ok(c) => c,
        Err(e) => {
            warren::errln!("warren-consumer: {e:#}");
            return ExitCode::from(2);
        }
    };
    let res = match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            cli::check(path, &cfg, &registry);
            return ExitCode::SUCCESS;
        }
        Command::Run => run_runtime(cfg.worker.runtime_threads())
            .and_then(|rt| rt.block_on(app::run(cfg, registry))),
        Command::Dead(cmd) => runtime().and_then(|rt| rt.block_on(dead_cli::run(cfg, cmd))),
        Command::Declare => runtime().and_then(|rt| rt.block_on(dead_cli::declare(cfg))),
    };
    // Lines still queued for the log writer would die with the process.
    warren::telemetry::flush();
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            warren::errln!("warren-consumer: {}", warren::error::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// The worker's runtime: `worker.threads` worker threads.
fn run_runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))
}
