//! A workflow step's result: small JSON a handler hands to the steps after
//! it, without any change to the [`Handler`](crate::Handler) trait. The
//! worker runs each handler inside a task-local slot; [`set_result`] fills
//! it. The `exec` handler sets its stdout when that is one JSON document,
//! the `http` handler a JSON response body. The worker carries the result in
//! the step's event, up to `workflow.max_result_bytes` (larger: dropped and
//! flagged, see docs/workflows.md#results).

use std::future::Future;
use std::sync::Mutex;

use serde_json::Value;

/// Most bytes a built-in handler reads from stdout or a response body for a
/// result; anything longer is not taken as one.
pub const READ_LIMIT: usize = 1024 * 1024;

struct Slot {
    /// Whether the running task is a workflow step (anyone reads the result).
    step: bool,
    value: Mutex<Option<Value>>,
}

tokio::task_local! {
    static SLOT: Slot;
}

/// Set the result of the task this handler runs. Returns `false` (and
/// keeps nothing) outside a handler run by the worker.
pub fn set_result(value: Value) -> bool {
    SLOT.try_with(|s| {
        if let Ok(mut g) = s.value.lock() {
            *g = Some(value);
        }
    })
    .is_ok()
}

/// Whether the task this handler runs is a workflow step: a handler may skip
/// computing a result nobody reads.
pub fn wants_result() -> bool {
    SLOT.try_with(|s| s.step).unwrap_or(false)
}

/// Run `f` with a fresh slot; its output and the result it set.
pub(crate) async fn capture<F: Future>(step: bool, f: F) -> (F::Output, Option<Value>) {
    let slot = Slot {
        step,
        value: Mutex::new(None),
    };
    // The slot lives in the scope's future and is taken back from it: no
    // shared allocation per task.
    let mut scoped = std::pin::pin!(SLOT.scope(slot, f));
    let out = scoped.as_mut().await;
    let value = scoped
        .as_mut()
        .take_value()
        .and_then(|s| s.value.into_inner().ok())
        .flatten();
    (out, value)
}

/// `bytes` as a result when they are one JSON document.
pub(crate) fn from_json_bytes(bytes: &[u8]) -> Option<Value> {
    if bytes.len() > READ_LIMIT || bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_slot_is_per_run() {
        assert!(!set_result(Value::Null), "outside a run");
        let (n, v) = capture(true, async {
            assert!(wants_result());
            set_result(serde_json::json!({"a": 1}));
            7
        })
        .await;
        assert_eq!((n, v), (7, Some(serde_json::json!({"a": 1}))));
        let (_, v) = capture(false, async { assert!(!wants_result()) }).await;
        assert_eq!(v, None);
        assert_eq!(from_json_bytes(b" [1] \n"), Some(serde_json::json!([1])));
        assert_eq!(from_json_bytes(b"hello"), None);
        assert_eq!(from_json_bytes(b"\n"), None);
    }
}
