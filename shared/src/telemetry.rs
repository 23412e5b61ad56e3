//! Logging setup: text or JSON lines on stderr, level from `RUST_LOG` or config;
//! text in colour only on a terminal and without `NO_COLOR`.
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
//! With the `otlp` feature and `log.otlp_endpoint` set, warren's spans are
//! also exported over OTLP/HTTP ([`otlp`]); a task's span is then a child of
//! the task's `traceparent` ([`enter_trace`]) and the handler sees that span
//! as its parent ([`handler_trace`]). Without export both are free.
//!
//! Tests call [`init`] too; the second call is a no-op.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing::Metadata;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{LogConfig, LogFormat};
use crate::trace::TraceContext;

#[cfg(feature = "otlp")]
mod otlp;

/// Lines queued for the writer thread before new ones are dropped.
const QUEUE_LINES: usize = 64 * 1024;

static GUARD: OnceLock<Mutex<Option<WorkerGuard>>> = OnceLock::new();

/// Whether spans are exported (set once by [`init`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub fn init(cfg: &LogConfig) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(directives(rust_log.as_deref(), &cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("warren-log")
        .finish(std::io::stderr());
    let payloads = cfg.payloads;
    let no_payloads = filter_fn(move |meta| payloads || !may_hold_payload(meta));
    let ansi = cfg.format == LogFormat::Text
        && colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .log_internal_errors(false);
    let fmt = match cfg.format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let (export, export_error) = export_layer(cfg);
    let exporting = export.is_some();
    let mut layers: Vec<BoxedLayer> =
        vec![fmt.with_filter(no_payloads).with_filter(filter).boxed()];
    if let Some(l) = export {
        layers.push(l.with_filter(filter_fn(exported)).boxed());
    }
    let installed = tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok();
    if installed {
        EXPORTING.store(exporting, Ordering::Relaxed);
        let _ = GUARD.get_or_init(|| Mutex::new(None)).lock().map(|mut g| {
            *g = Some(guard);
        });
        if let Some(e) = export_error {
            tracing::error!(error = %e, "span export is off");
        }
    }
}

/// The filter: `RUST_LOG` when set and valid, else `log.level`, else `info`,
/// with the AMQP client's own lines off unless it names `lapin`. Every
/// error lapin logs (a channel the broker closed, a lost connection) also
/// reaches warren as an error, which warren reports once, in its own words
/// and with what it was doing; lapin's line would be a second, rawer copy.
fn directives(rust_log: Option<&str>, level: &str) -> String {
    let valid = |d: &&str| EnvFilter::try_new(d).is_ok();
    let chosen = rust_log
        .filter(valid)
        .or(Some(level).filter(valid))
        .unwrap_or("info")
        .trim();
    if chosen.contains("lapin") {
        chosen.to_owned()
    } else if chosen.is_empty() {
        "lapin=off".to_owned()
    } else {
        format!("{chosen},lapin=off")
    }
}

/// Colour only for a person at a terminal: a file, a pipe, journald or
/// `docker logs` would keep the escape codes as text. A non-empty `NO_COLOR`
/// turns it off (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

#[cfg(feature = "otlp")]
fn export_layer(cfg: &LogConfig) -> (Option<BoxedLayer>, Option<String>) {
    match otlp::layer(cfg) {
        Ok(l) => (l, None),
        Err(e) => (None, Some(e)),
    }
}

/// Without the feature `log.otlp_endpoint` is refused by validation.
#[cfg(not(feature = "otlp"))]
fn export_layer(_: &LogConfig) -> (Option<BoxedLayer>, Option<String>) {
    (None, None)
}

/// What is exported: warren's own spans, and its warnings and errors as
/// events of the span they happen in (never the AMQP client's dumps).
fn exported(meta: &Metadata<'_>) -> bool {
    meta.target().starts_with("warren")
        && if meta.is_span() {
            *meta.level() <= tracing::Level::INFO
        } else {
            *meta.level() <= tracing::Level::WARN
        }
}

/// Make `span` (created, not yet entered) the child of `trace` in the
/// exported trace. A no-op unless spans are exported.
pub fn enter_trace(span: &tracing::Span, trace: &TraceContext) {
    #[cfg(feature = "otlp")]
    if EXPORTING.load(Ordering::Relaxed) {
        otlp::set_parent(span, trace);
    }
    #[cfg(not(feature = "otlp"))]
    let _ = (span, trace);
}

/// The trace position a handler passes on (exec's `TRACEPARENT`, http's
/// `traceparent`): `span` itself when it is exported, so the handler's own
/// spans hang under this attempt; otherwise the task's own `trace`
/// unchanged, identical on every attempt.
pub fn handler_trace(span: &tracing::Span, trace: &TraceContext) -> TraceContext {
    #[cfg(feature = "otlp")]
    if EXPORTING.load(Ordering::Relaxed) {
        if let Some(t) = otlp::position(span, trace) {
            return t;
        }
    }
    let _ = span;
    trace.clone()
}

/// Flush what is queued (bounded by the writer thread's own timeout). Call
/// once, last thing before the process exits.
pub fn flush() {
    #[cfg(feature = "otlp")]
    otlp::shutdown();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            !colour(false, None),
            "a pipe or a file gets no escape codes"
        );
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(true, Some(OsStr::new("false"))), "any value counts");
        assert!(colour(true, Some(OsStr::new(""))), "empty means unset");
    }

    #[test]
    fn lapin_is_quiet_unless_the_filter_names_it() {
        assert_eq!(directives(None, "info"), "info,lapin=off");
        assert_eq!(directives(Some("debug"), "info"), "debug,lapin=off");
        assert_eq!(
            directives(Some("info,lapin=warn"), "info"),
            "info,lapin=warn"
        );
        assert_eq!(
            directives(None, "warn,lapin::channel=error"),
            "warn,lapin::channel=error"
        );
        // An invalid RUST_LOG falls back to log.level, as before.
        assert_eq!(directives(Some("=bad=="), "warn"), "warn,lapin=off");
        assert_eq!(directives(None, ""), "lapin=off");
        for d in ["info,lapin=off", "lapin=off", "warn,lapin::channel=error"] {
            assert!(EnvFilter::try_new(d).is_ok(), "{d}");
        }
    }
}
