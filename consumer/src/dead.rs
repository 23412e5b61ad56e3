//! Dead-letter tooling: the shared engine [`warren::dead`] (list, group,
//! inspect, replay, purge), re-exported under its old path so code written
//! against `warren_consumer::dead` keeps compiling.

pub use warren::dead::*;
