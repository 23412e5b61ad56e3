//! Fault injection (feature `failpoints`): a panic or an error at each step
//! of delivery handling — decode, resolve, run, retry publish, dead-letter
//! publish, ack — and every delivery still ends acked (run), retried, dead-
//! lettered or back in its queue and then processed: none lost, none left in
//! flight, each counted under exactly one outcome.
//!
//! Fail points are process-global; each test holds a `fail::FailScenario`
//! (which serialises them when a runner shares a process) and the points are
//! named after the test's own topology prefix.

use std::time::Duration;

use fail::FailScenario;
use serde_json::json;
use warren::envelope::headers;
use warren::testing::eventually;
use warren::Task;
use warren_consumer::worker::fault::{point, Step};
use warren_consumer::{Registry, TaskError};

use crate::helpers::*;

const NAME: &str = "f.task";

/// What the test handler does, so that the faulty step is reached.
#[derive(Clone, Copy)]
enum Handler {
    Succeeds,
    /// Fails attempt 1 (retryable), succeeds after: reaches the retry publish.
    FailsOnce,
    /// Always fails permanently: reaches the dead-letter publish.
    FailsPermanently,
}

/// Where a task of the case ends.
#[derive(Clone, Copy, PartialEq, Debug)]
enum End {
    Processed,
    Dead,
}

fn registry(h: Handler) -> Registry {
    let mut reg = Registry::new();
    reg.register_fn(NAME, move |t| async move {
        match h {
            Handler::Succeeds => Ok(()),
            Handler::FailsOnce if t.attempt == 1 => Err(TaskError::retryable("first try fails")),
            Handler::FailsOnce => Ok(()),
            Handler::FailsPermanently => Err(TaskError::permanent("never works")),
        }
    })
    .unwrap();
    reg
}

/// One task with a panic injected once at `step`, then one with an error
/// injected once; each must end as `ends` says.
async fn fault_at(step: Step, handler: Handler, ends: [End; 2]) {
    let scenario = FailScenario::setup();
    let mut cfg = config(&format!("fault_{}", step.name()));
    cfg.retry.default.initial_delay = Duration::from_millis(100);
    let name = point(&cfg.topology.prefix, step);
    let mut app = spawn_worker(cfg, registry(handler)).await;
    let mut processed = 0.0;
    let mut earlier: Vec<String> = Vec::new();
    for (action, end) in ["1*panic(injected panic)", "1*return(injected error)"]
        .into_iter()
        .zip(ends)
    {
        fail::cfg(&name, action).unwrap();
        let task = Task::new(NAME, &json!({ "action": action }));
        app.publish(&task).await;
        earlier.push(task.id.clone());
        match end {
            End::Dead => {
                // The previous task's delivery may still have been settling
                // (dead copy routed, confirm and ack not yet back) when this
                // task's injected failure ended the session: it is then
                // redelivered and dead-lettered again — the at-least-once
                // corner. Such a copy may come first; nothing else may.
                let dead = loop {
                    let d = app.take_dead(1).await.remove(0);
                    let id = d.properties.message_id().as_ref().unwrap().to_string();
                    if id == task.id {
                        break d;
                    }
                    assert!(
                        earlier.contains(&id),
                        "{action}: a dead copy of no task of this test: {id}"
                    );
                };
                assert!(header(&dead, headers::DEAD_KIND).is_some());
            }
            End::Processed => {
                processed += 1.0;
                eventually(WAIT, &format!("{action}: task processed"), || async {
                    (app.counter(
                        "warren_consumer_tasks_total",
                        &[("task", NAME), ("outcome", "succeeded")],
                    ) == processed)
                        .then_some(())
                })
                .await;
            }
        }
        fail::remove(&name);
    }
    // Every delivery left the consumer and was counted exactly once.
    eventually(WAIT, "every delivery counted under one outcome", || async {
        let delivered = app.counter("warren_consumer_deliveries_total", &[]);
        let finished = app.counter("warren_consumer_tasks_total", &[]);
        let in_flight = app.counter("warren_consumer_in_flight", &[]);
        (delivered == finished && in_flight == 0.0).then_some(())
    })
    .await;
    let panics = app.counter("warren_consumer_panics_total", &[]);
    // A panic in the handler call is the handler's (retried), not the worker's.
    let want = if step == Step::Run { 0.0 } else { 1.0 };
    assert_eq!(panics, want, "panics outside the handler");
    // Nothing was left unacked: stopping the worker returns nothing.
    app.halt().await;
    assert_eq!(queue_len(&app.conn, &app.queue()).await, 0, "work queue");
    assert_eq!(
        queue_len(&app.conn, &app.topo.dead_queue()).await,
        0,
        "dead queue"
    );
    app.stop().await;
    scenario.teardown();
}

#[tokio::test]
async fn fault_at_decode() {
    // Panic: given back, then decoded fine. Error: poison, dead-lettered.
    fault_at(Step::Decode, Handler::Succeeds, [End::Processed, End::Dead]).await;
}

#[tokio::test]
async fn fault_at_resolve() {
    // Panic: given back, then resolved. Error: no handler, dead-lettered.
    fault_at(
        Step::Resolve,
        Handler::Succeeds,
        [End::Processed, End::Dead],
    )
    .await;
}

#[tokio::test]
async fn fault_at_run() {
    // Both are failed attempts: retried, then succeed.
    fault_at(
        Step::Run,
        Handler::Succeeds,
        [End::Processed, End::Processed],
    )
    .await;
}

#[tokio::test]
async fn fault_at_retry_publish() {
    // Panic: given back. Error (nacked): the session closes. Either way the
    // delivery comes back, fails once more, is retried and succeeds.
    fault_at(
        Step::RetryPublish,
        Handler::FailsOnce,
        [End::Processed, End::Processed],
    )
    .await;
}

#[tokio::test]
async fn fault_at_dead_letter_publish() {
    // Given back (panic) or session closed (nack): dead-lettered next time.
    fault_at(
        Step::DeadPublish,
        Handler::FailsPermanently,
        [End::Dead, End::Dead],
    )
    .await;
}

#[tokio::test]
async fn fault_at_ack() {
    // The ack never happened: given back, run again, acked.
    fault_at(
        Step::Ack,
        Handler::Succeeds,
        [End::Processed, End::Processed],
    )
    .await;
}
