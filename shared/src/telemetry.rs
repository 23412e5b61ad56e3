//! Logging setup: text or JSON lines on stderr, level from `RUST_LOG` or config.
//!
//! Logging must never wedge a task. Lines go through a bounded, lossy queue to
//! a writer thread ([`tracing_appender::non_blocking`]): a stalled reader
//! (full pipe) drops lines instead of blocking the task that logs, and a closed
//! one (broken pipe) loses them instead of panicking, which is what the fmt
//! layer's own fallback `eprintln!` would do inside whichever task logged.
//!
//! The AMQP client dumps whole messages (a returned message at WARN, every
//! frame at TRACE), task payloads included. Those callsites are filtered out
//! unless `log.payloads = true` asks for them, whatever `RUST_LOG` says.
//!
//! Tests call [`init`] too; the second call is a no-op.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use tracing::Metadata;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{LogConfig, LogFormat};

/// Lines queued for the writer thread before new ones are dropped.
const QUEUE_LINES: usize = 64 * 1024;

static GUARD: OnceLock<Mutex<Option<WorkerGuard>>> = OnceLock::new();

pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("warren-log")
        .finish(std::io::stderr());
    let payloads = cfg.payloads;
    let no_payloads = filter_fn(move |meta| payloads || !may_hold_payload(meta));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .log_internal_errors(false);
    let fmt = match cfg.format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(no_payloads).with_filter(filter))
        .try_init()
        .is_ok();
    if installed {
        let _ = GUARD.get_or_init(|| Mutex::new(None)).lock().map(|mut g| {
            *g = Some(guard);
        });
    }
}

/// Flush what is queued (bounded by the writer thread's own timeout). Call
/// once, last thing before the process exits.
pub fn flush() {
    if let Some(m) = GUARD.get() {
        if let Ok(mut g) = m.lock() {
            drop(g.take());
        }
    }
}

/// Write a line to stderr outside the log: a closed stderr loses it rather
/// than panicking (as `eprintln!` would).
pub fn stderr_line(line: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(line);
    let _ = err.write_all(b"\n");
}

/// Write a line of command output to stdout; a closed stdout (`| head`)
/// loses it rather than panicking (as `println!` would).
pub fn stdout_line(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line);
    let _ = out.write_all(b"\n");
}

/// `println!` for command output that a closed stdout cannot turn into a panic.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::telemetry::stdout_line(format_args!($($arg)*))
    };
}

/// `eprintln!` that a closed stderr cannot turn into a panic.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::telemetry::stderr_line(format_args!($($arg)*))
    };
}

/// Callsites of the AMQP client that print message contents: the returned
/// message dump and the frame dumps (body frames are payload bytes).
fn may_hold_payload(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    if !target.starts_with("lapin") {
        return false;
    }
    target.starts_with("lapin::returned_messages")
        || meta
            .fields()
            .iter()
            .any(|f| matches!(f.name(), "frame" | "frames" | "payload"))
}
