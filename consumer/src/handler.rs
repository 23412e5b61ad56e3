//! What runs a task: the [`Handler`] trait, the [`TaskError`] it returns, and
//! the [`Registry`] that maps task names (or topic patterns) to handlers.
//!
//! ```
//! use warren_consumer::{Handler, Registry, TaskError};
//! use warren::Task;
//!
//! struct Greet;
//! impl Handler for Greet {
//!     async fn run(&self, task: Task) -> Result<(), TaskError> {
//!         let who: String = task.payload_as().map_err(TaskError::permanent)?;
//!         println!("hello {who}");
//!         Ok(())
//!     }
//! }
//!
//! let mut registry = Registry::new();
//! registry.register("greet", Greet).unwrap();
//! assert!(registry.register("greet", Greet).is_err());
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use warren::Task;

/// Whether a failed attempt is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Try again later (through the delay levels), until attempts run out.
    Retryable,
    /// Never going to work: dead-letter at once.
    Permanent,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError {
    pub kind: ErrorKind,
    pub message: String,
    /// Wait at least this long before the next attempt (e.g. HTTP `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl TaskError {
    pub fn retryable(e: impl fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Retryable,
            message: e.to_string(),
            retry_after: None,
        }
    }
    pub fn permanent(e: impl fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            message: e.to_string(),
            retry_after: None,
        }
    }
    pub fn with_retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }
    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

/// Runs tasks of the names it is registered under. Write `run` with `async fn`.
pub trait Handler: Send + Sync + 'static {
    /// Task names (or patterns) this handler serves, for [`Registry::add`].
    /// Handlers registered with [`Registry::register`] may leave it empty.
    fn names(&self) -> Vec<String> {
        Vec::new()
    }

    /// This handler's own time limit per attempt, if it has one. The worker
    /// computes one timeout per attempt — the task's `x-warren-timeout-ms`
    /// header, else this, else `worker.task_timeout` — enforces it, and
    /// passes it to [`run`](Handler::run) in `task.timeout` (always set
    /// there), so a handler that must clean up (kill a child) uses that.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    fn run(&self, task: Task) -> impl Future<Output = Result<(), TaskError>> + Send;
}

/// Object-safe form of [`Handler`], used inside the registry.
pub(crate) type BoxFut = Pin<Box<dyn Future<Output = Result<(), TaskError>> + Send>>;

trait DynHandler: Send + Sync + 'static {
    fn call(self: Arc<Self>, task: Task) -> BoxFut;
    fn own_timeout(&self) -> Option<Duration>;
}

impl<H: Handler> DynHandler for H {
    fn call(self: Arc<Self>, task: Task) -> BoxFut {
        Box::pin(async move { self.run(task).await })
    }
    fn own_timeout(&self) -> Option<Duration> {
        self.timeout()
    }
}

/// A handler from an async closure over the whole [`Task`].
pub struct FnHandler<F>(pub F);

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), TaskError>> + Send,
{
    fn run(&self, task: Task) -> impl Future<Output = Result<(), TaskError>> + Send {
        (self.0)(task)
    }
}

/// A handler from an async closure over a typed payload; a payload that does
/// not deserialize into `P` fails the task permanently.
pub struct TypedHandler<P, F> {
    f: F,
    _p: std::marker::PhantomData<fn() -> P>,
}

impl<P, F, Fut> Handler for TypedHandler<P, F>
where
    P: DeserializeOwned + Send + 'static,
    F: Fn(P, Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), TaskError>> + Send,
{
    async fn run(&self, task: Task) -> Result<(), TaskError> {
        let payload: P = task
            .payload_as()
            .map_err(|e| TaskError::permanent(format!("payload does not fit the handler: {e}")))?;
        (self.f)(payload, task).await
    }
}

/// Refused registration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("a handler for task `{0}` is already registered")]
    Duplicate(String),
    #[error("task name must not be empty (and a handler added with `add` must name at least one)")]
    Empty,
}

#[derive(Clone)]
struct Entry {
    key: String,
    pattern: bool,
    handler: Arc<dyn DynHandler>,
}

/// Task name → handler. A key containing `*` (one word) or `#` (zero or more
/// words) is a topic pattern; exact names win over patterns, and patterns are
/// tried in registration order.
#[derive(Clone, Default)]
pub struct Registry {
    entries: Vec<Entry>,
}

/// A handler found for a task, and the bounded metrics label it reports under
/// (the exact name, or the pattern that matched). Borrowed from the
/// registry: resolving allocates nothing per delivery.
#[derive(Clone, Copy)]
pub struct Resolved<'a> {
    pub label: &'a str,
    handler: &'a Arc<dyn DynHandler>,
}

impl Resolved<'_> {
    pub(crate) fn call(&self, task: Task) -> BoxFut {
        self.handler.clone().call(task)
    }

    /// The handler's own time limit ([`Handler::timeout`]).
    pub fn timeout(&self) -> Option<Duration> {
        self.handler.own_timeout()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `handler` for a task name or pattern; a key registered twice
    /// is refused.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        handler: impl Handler,
    ) -> Result<&mut Self, RegistryError> {
        let key = name.into();
        if key.is_empty() {
            return Err(RegistryError::Empty);
        }
        if self.entries.iter().any(|e| e.key == key) {
            return Err(RegistryError::Duplicate(key));
        }
        let pattern = is_pattern(&key);
        self.entries.push(Entry {
            key,
            pattern,
            handler: Arc::new(handler),
        });
        Ok(self)
    }

    /// Register `handler` under every name its [`Handler::names`] returns.
    pub fn add<H: Handler>(&mut self, handler: H) -> Result<&mut Self, RegistryError> {
        let names = handler.names();
        if names.is_empty() {
            return Err(RegistryError::Empty);
        }
        for n in &names {
            if n.is_empty() {
                return Err(RegistryError::Empty);
            }
            if self.entries.iter().any(|e| e.key == *n) {
                return Err(RegistryError::Duplicate(n.clone()));
            }
        }
        let handler: Arc<dyn DynHandler> = Arc::new(handler);
        for key in names {
            let pattern = is_pattern(&key);
            self.entries.push(Entry {
                key,
                pattern,
                handler: handler.clone(),
            });
        }
        Ok(self)
    }

    /// Register an async closure over the task.
    pub fn register_fn<F, Fut>(
        &mut self,
        name: impl Into<String>,
        f: F,
    ) -> Result<&mut Self, RegistryError>
    where
        F: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        self.register(name, FnHandler(f))
    }

    /// Register an async closure over a typed payload (and the task).
    pub fn register_typed<P, F, Fut>(
        &mut self,
        name: impl Into<String>,
        f: F,
    ) -> Result<&mut Self, RegistryError>
    where
        P: DeserializeOwned + Send + 'static,
        F: Fn(P, Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        self.register(
            name,
            TypedHandler {
                f,
                _p: std::marker::PhantomData,
            },
        )
    }

    /// The handler for `task`, if any.
    pub fn resolve(&self, task: &str) -> Option<Resolved<'_>> {
        let e = self
            .entries
            .iter()
            .find(|e| !e.pattern && e.key == task)
            .or_else(|| {
                self.entries
                    .iter()
                    .find(|e| e.pattern && pattern_matches(&e.key, task))
            })?;
        Some(Resolved {
            label: &e.key,
            handler: &e.handler,
        })
    }

    /// Registered names and patterns, in registration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.key.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn is_pattern(key: &str) -> bool {
    key.split('.').any(|w| w == "*" || w == "#")
}

pub use warren::topology::pattern_matches;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_and_exact_beats_pattern() {
        let mut r = Registry::new();
        r.register_fn("email.*", |_| async { Ok(()) }).unwrap();
        r.register_fn("email.send", |_| async { Ok(()) }).unwrap();
        assert_eq!(
            r.register_fn("email.send", |_| async { Ok(()) }).err(),
            Some(RegistryError::Duplicate("email.send".into()))
        );
        assert_eq!(r.resolve("email.send").unwrap().label, "email.send");
        assert_eq!(r.resolve("email.other").unwrap().label, "email.*");
        assert!(r.resolve("sms.send").is_none());
    }

    struct Multi;
    impl Handler for Multi {
        fn names(&self) -> Vec<String> {
            vec!["a.one".into(), "a.two".into()]
        }
        async fn run(&self, _task: Task) -> Result<(), TaskError> {
            Ok(())
        }
    }

    #[test]
    fn add_uses_the_handlers_own_names() {
        let mut r = Registry::new();
        r.add(Multi).unwrap();
        assert!(r.resolve("a.one").is_some() && r.resolve("a.two").is_some());
        assert_eq!(
            r.add(Multi).err(),
            Some(RegistryError::Duplicate("a.one".into()))
        );
        assert_eq!(r.names().count(), 2, "a refused add registers nothing");
    }

    #[tokio::test]
    async fn typed_handler_rejects_a_payload_of_the_wrong_shape() {
        let mut r = Registry::new();
        r.register_typed("n", |n: u32, _t| async move {
            if n > 0 {
                Ok(())
            } else {
                Err(TaskError::retryable("zero"))
            }
        })
        .unwrap();
        let h = r.resolve("n").unwrap();
        assert!(h.call(Task::new("n", &serde_json::json!(1))).await.is_ok());
        let e = h
            .call(Task::new("n", &serde_json::json!("x")))
            .await
            .unwrap_err();
        assert!(e.is_permanent(), "{e:?}");
    }
}
