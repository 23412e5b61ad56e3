//! `noop`: succeeds at once, logging the task at info. For smoke tests,
//! benchmarks and seeing the pipeline work.

use warren::Task;

use crate::handler::{Handler, TaskError};

pub struct Noop;

impl Handler for Noop {
    async fn run(&self, task: Task) -> Result<(), TaskError> {
        tracing::info!(task.id = %task.id, task.name = %task.name, task.attempt = task.attempt, "noop handled task");
        Ok(())
    }
}
