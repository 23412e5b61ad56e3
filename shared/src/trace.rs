//! W3C trace context (`traceparent`, `tracestate`) as carried by a task.
//!
//! A task keeps its `traceparent` unchanged across retries, delays and
//! replays, so every attempt of one task shares one trace and one parent
//! span. Work a task starts (a workflow's steps) is a [`TraceContext::child`]:
//! the same trace id under a new parent span id.

use std::fmt;

/// AMQP header (and HTTP header) names, exactly as the W3C spells them.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` kept (the W3C's limit for propagation); a longer one
/// is dropped rather than truncated mid-entry.
pub const MAX_TRACESTATE: usize = 512;

/// One position in a trace.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The span this context points at as the parent of what comes next.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// `tracestate`, passed on verbatim.
    pub state: Option<String>,
}

impl TraceContext {
    /// Parse a `traceparent` (and its `tracestate`). `None` for anything the
    /// W3C says to ignore: wrong shape, non-hex, all-zero ids, version `ff`.
    /// A later version is read by its first four fields, as the spec asks.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let tp = traceparent.trim();
        let mut parts = tp.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
            return None;
        }
        if version == "00" && (parts.next().is_some() || tp.len() != 55) {
            return None;
        }
        if trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
            return None;
        }
        if !is_lower_hex(trace) || !is_lower_hex(parent) || !is_lower_hex(flags) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        let mut f = [0u8; 1];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(parent, &mut parent_id).ok()?;
        hex::decode_to_slice(flags, &mut f).ok()?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        let state = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE && s.is_ascii())
            .map(str::to_owned);
        Some(Self {
            trace_id,
            parent_id,
            flags: f[0],
            state,
        })
    }

    /// A new trace (sampled), for work that arrives without one.
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero(),
            parent_id: nonzero(),
            flags: 0x01,
            state: None,
        }
    }

    /// The same trace under a new parent span: what a task hands to the work
    /// it starts.
    pub fn child(&self) -> Self {
        Self {
            parent_id: nonzero(),
            ..self.clone()
        }
    }

    /// The `traceparent` header value (version 00).
    pub fn traceparent(&self) -> String {
        // Every task carries one, so it is written straight into its 55
        // bytes: `format!` over `hex::encode` was ~5 % of a publishing
        // process's CPU.
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let ok = hex::encode_to_slice(self.trace_id, &mut out[3..35]).is_ok()
            && hex::encode_to_slice(self.parent_id, &mut out[36..52]).is_ok()
            && hex::encode_to_slice([self.flags], &mut out[53..55]).is_ok();
        debug_assert!(ok, "the slices fit the ids");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The trace id as 32 lowercase hex digits (what logs show).
    pub fn trace_id_hex(&self) -> String {
        // Task events carry it for every task: no `hex::encode` iterator.
        String::from_utf8_lossy(&hex32(&self.trace_id)).into_owned()
    }

    /// The trace id as a log field: the same 32 hex digits, written only
    /// when a log line or span actually records it (no allocation when the
    /// level filters it out).
    pub fn trace_id_field(&self) -> TraceIdHex<'_> {
        TraceIdHex(&self.trace_id)
    }
}

/// [`TraceContext::trace_id_field`].
pub struct TraceIdHex<'a>(&'a [u8; 16]);

impl fmt::Display for TraceIdHex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&hex32(self.0)).map_err(|_| fmt::Error)?)
    }
}

/// A trace id's 32 lowercase hex digits, on the stack.
fn hex32(id: &[u8; 16]) -> [u8; 32] {
    let mut out = [b'0'; 32];
    // 16 bytes always fill 32 digits.
    let _ = hex::encode_to_slice(id, &mut out);
    out
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let v: [u8; N] = rand::random();
        if v != [0; N] {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_w3c_example() {
        let t = TraceContext::parse(EXAMPLE, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(t.traceparent(), EXAMPLE);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, 1);
        assert_eq!(t.state.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn refuses_what_the_spec_says_to_ignore() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let t = TraceContext::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
            None,
        )
        .unwrap();
        assert_eq!(t.traceparent(), EXAMPLE);
    }

    #[test]
    fn an_oversized_tracestate_is_dropped() {
        let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE);
        let t = TraceContext::parse(EXAMPLE, Some(&long)).unwrap();
        assert_eq!(t.state, None);
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_parent() {
        let root = TraceContext::new_root();
        assert_eq!(
            TraceContext::parse(&root.traceparent(), None),
            Some(root.clone())
        );
        assert_eq!(root.trace_id_field().to_string(), root.trace_id_hex());
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.parent_id, root.parent_id);
        assert_ne!(TraceContext::new_root().trace_id, root.trace_id);
    }
}
