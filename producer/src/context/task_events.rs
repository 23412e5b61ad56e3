//! [`TaskEvents`]: what this producer tells of tasks and hears of them on
//! the events stream: the recorder of its `published` events and the task
//! index with its metrics.

use warren::events::{Event, Recorder, Source, What};

use crate::tasks::{Index, IndexMetrics};

pub struct TaskEvents {
    /// Records `published` events (disabled: `events.enabled = false`).
    recorder: Recorder,
    /// Every task heard of on the events stream, and live consumers.
    index: Index,
    index_metrics: Option<IndexMetrics>,
}

impl TaskEvents {
    /// Recording nothing, an index of `index_size` tasks, not counted.
    pub fn new(index_size: usize) -> Self {
        Self {
            recorder: Recorder::disabled(),
            index: Index::new(index_size),
            index_metrics: None,
        }
    }

    /// Record with `recorder`, and count the index on `metrics`.
    pub fn with(mut self, recorder: Recorder, metrics: IndexMetrics) -> Self {
        self.recorder = recorder;
        self.index_metrics = Some(metrics);
        self
    }

    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn index_metrics(&self) -> Option<&IndexMetrics> {
        self.index_metrics.as_ref()
    }

    /// Record that `task` was published by `source` (never waits).
    pub fn published(&self, task: &warren::Task, source: Source) {
        if !self.recorder.enabled() {
            return;
        }
        let ev = Event::new(&task.id, &task.name, What::Published { source })
            .trace(task.trace.as_ref().map(|t| t.trace_id_hex()));
        self.recorder.record(ev);
    }
}
