//! The `warren-producer` binary: parse the command line, load the config,
//! call into the library ([`warren_producer`]), and turn the outcome into an
//! exit code: 0 ok, 1 runtime failure, 2 bad configuration or usage, 124
//! `tasks wait` timed out.

use clap::Parser;
use warren_producer::cli::{self, Cli, Command, SchedulesCommand, TokenCommand};
use warren_producer::{config, App};

// Allocation is a large part of the CPU per fire and per task; mimalloc
// costs less than glibc's malloc for the many small, short-lived buffers
// of a publish (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Test builds only: the scheduler's fail points, from `FAILPOINTS`.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let path = cli.config.as_deref();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Schedules {
            command: SchedulesCommand::Check,
        } => cli::check(path),
        Command::Schedules {
            command: SchedulesCommand::Next { count },
        } => cli::next(path, count),
        Command::Schedules {
            command: SchedulesCommand::Pause { name },
        } => pause_or_resume(path, &name, true),
        Command::Schedules {
            command: SchedulesCommand::Resume { name },
        } => pause_or_resume(path, &name, false),
        Command::Schedules {
            command: SchedulesCommand::Apply { file, dry_run },
        } => config::load_checked(path).and_then(|config::Checked { cfg, schedules, .. }| {
            warren::telemetry::init(&cfg.log);
            runtime()?.block_on(cli::apply_schedules(cfg, &schedules, &file, dry_run))
        }),
        Command::Schedules {
            command: SchedulesCommand::Delete { name },
        } => config::load_checked(path).and_then(|config::Checked { cfg, schedules, .. }| {
            warren::telemetry::init(&cfg.log);
            runtime()?.block_on(cli::delete_schedule(cfg, &schedules, &name))
        }),
        Command::Token(TokenCommand::Hash) => cli::token_hash(),
        Command::Workflows { command } => config::load_checked(path).and_then(|checked| {
            warren::telemetry::init(&checked.cfg.log);
            runtime()?.block_on(cli::workflows(checked, command))
        }),
        Command::Tasks { command } => config::load(path).and_then(|cfg| {
            warren::telemetry::init(&cfg.log);
            runtime()?.block_on(cli::tasks(cfg, command))
        }),
        Command::Workers { json } => config::load(path).and_then(|cfg| {
            warren::telemetry::init(&cfg.log);
            runtime()?.block_on(cli::workers(cfg, json))
        }),
        Command::Publish(args) => config::load(path).and_then(|cfg| {
            warren::telemetry::init(&cfg.log);
            // One thread: a publish loop, its confirm sequencer and the
            // confirms' waiters then wake each other without crossing
            // threads (lapin's I/O runs on its own thread either way).
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(cli::publish(cfg, args))
        }),
        Command::Run => config::load_checked(path).and_then(|checked| {
            warren::telemetry::init(&checked.cfg.log);
            runtime()?.block_on(async {
                let app = App::from_checked(checked)
                    .await?
                    .reload_from(cli.config.clone());
                app.run(warren::shutdown::token()).await
            })
        }),
    };
    // Lines still queued for the log writer would die with the process.
    warren::telemetry::flush();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            warren::errln!("warren-producer: {}", warren::error::report(e.as_ref()));
            cli::exit_code(&e)
        }
    }
}

fn pause_or_resume(path: Option<&std::path::Path>, name: &str, pause: bool) -> anyhow::Result<()> {
    let config::Checked { cfg, schedules, .. } = config::load_checked(path)?;
    warren::telemetry::init(&cfg.log);
    runtime()?.block_on(cli::pause_or_resume(cfg, &schedules, name, pause))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
