//! OTLP/HTTP span export (feature `otlp`, key `log.otlp_endpoint`).
//!
//! Only warren's own spans are exported: the consumer's per-task span (whose
//! parent is the task's `traceparent`) and what runs inside it. Export runs
//! on the SDK's batch thread with a blocking HTTP client, so a slow or dead
//! collector never holds up a task; spans it cannot take are dropped.

use std::sync::{Mutex, OnceLock};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::LogConfig;
use crate::trace::TraceContext;

static PROVIDER: OnceLock<Mutex<Option<SdkTracerProvider>>> = OnceLock::new();

/// The exporting layer, or `None` when `log.otlp_endpoint` is not set.
pub(super) fn layer<S>(cfg: &LogConfig) -> Result<Option<Box<dyn Layer<S> + Send + Sync>>, String>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let Some(url) = cfg.otlp_traces_url() else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let service = cfg
        .otlp_service_name
        .clone()
        .unwrap_or_else(|| binary_name().unwrap_or_else(|| "warren".into()));
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer("warren");
    let _ = PROVIDER
        .get_or_init(|| Mutex::new(None))
        .lock()
        .map(|mut p| *p = Some(provider));
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_tracked_inactivity(false);
    Ok(Some(Box::new(layer)))
}

/// Export what is still queued; called once as the process exits.
pub(super) fn shutdown() {
    if let Some(m) = PROVIDER.get() {
        if let Some(p) = m.lock().ok().and_then(|mut p| p.take()) {
            let _ = p.shutdown();
        }
    }
}

/// Make `span` (not yet entered) a child of the task's trace position.
pub(super) fn set_parent(span: &tracing::Span, t: &TraceContext) {
    let state = t
        .state
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let remote = SpanContext::new(
        TraceId::from_bytes(t.trace_id),
        SpanId::from_bytes(t.parent_id),
        TraceFlags::new(t.flags),
        true,
        state,
    );
    let cx = opentelemetry::Context::new().with_remote_span_context(remote);
    let _ = span.set_parent(cx);
}

/// The trace position of `span` as exported, or `None` when it is not
/// (not sampled, or filtered out).
pub(super) fn position(span: &tracing::Span, t: &TraceContext) -> Option<TraceContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() || sc.trace_id().to_bytes() != t.trace_id {
        return None;
    }
    Some(TraceContext {
        trace_id: t.trace_id,
        parent_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
        state: t.state.clone(),
    })
}

fn binary_name() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.file_stem()?.to_string_lossy().into_owned())
}
