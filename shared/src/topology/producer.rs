//! The producer's own objects: their names (each built here, from the
//! prefix) and their definitions, declared by [`declare`] — or, with
//! `topology.declare = false`, only checked — like the rest of the topology.
//!
//! | part | objects |
//! |---|---|
//! | [`Part::Scheduler`] | the stream [`fires_log`] and the snapshot queue [`scheduler_snapshot`] |
//! | [`Part::Catalog`] | the stream [`catalog_log`] and the snapshot queue [`catalog_snapshot`] (the API's schedules) |
//! | [`Part::Control`] | the queue [`control_queue`] and the fanout exchange [`control_exchange`] (pause and resume) |
//! | [`Part::Runs`] | the stream [`runs_log`] and the snapshot queues [`runs_snapshot`] and [`runs_view`] (workflow runs) |
//!
//! The election's lock, [`lock_queue`], is named here but not declared: an
//! exclusive queue belongs to the connection that declared it, so taking
//! the lock *is* declaring it (`producer/src/leader.rs`).

use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ExchangeKind};

use super::{exchange, put, Object, Topology};
use crate::config::QueueType;
use crate::error::Error;

/// The election's lock: an exclusive queue only the leader's connection holds.
pub fn lock_queue(prefix: &str) -> String {
    format!("{prefix}.producer.leader")
}

/// The scheduler's log: one record per wake-up of the cursors it moved.
pub fn fires_log(prefix: &str) -> String {
    format!("{prefix}.producer.fires")
}

/// The scheduler's snapshot: every cursor and the log offset it covers.
pub fn scheduler_snapshot(prefix: &str) -> String {
    format!("{prefix}.producer.state")
}

/// The catalog's log: every change to the API's schedules.
pub fn catalog_log(prefix: &str) -> String {
    format!("{prefix}.producer.schedules")
}

/// The catalog's snapshot: every API schedule and the log offset it covers.
pub fn catalog_snapshot(prefix: &str) -> String {
    format!("{prefix}.producer.schedules.snapshot")
}

/// Pause and resume requests, consumed by the leader.
pub fn control_queue(prefix: &str) -> String {
    format!("{prefix}.producer.control")
}

/// The leader's answers and the replicas' presence, to every replica.
pub fn control_exchange(prefix: &str) -> String {
    format!("{prefix}.producer.events")
}

/// The workflow runs' log: what each coordinator round changed.
pub fn runs_log(prefix: &str) -> String {
    format!("{prefix}.producer.workflows.log")
}

/// The workflow runs' snapshot, which only a new leader reads.
pub fn runs_snapshot(prefix: &str) -> String {
    format!("{prefix}.producer.workflows")
}

/// The same snapshot for readers, who peek it (a peek holds the message).
pub fn runs_view(prefix: &str) -> String {
    format!("{prefix}.producer.workflows.view")
}

/// A group of the producer's objects that one component needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Scheduler,
    Catalog,
    Control,
    Runs,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Scheduler, Part::Catalog, Part::Control, Part::Runs];
}

/// The objects of `part`, in declaration order.
pub fn objects(prefix: &str, qt: QueueType, part: Part) -> Vec<Object> {
    match part {
        Part::Scheduler => vec![
            snapshot(scheduler_snapshot(prefix), qt),
            log(fires_log(prefix)),
        ],
        Part::Catalog => vec![
            log(catalog_log(prefix)),
            snapshot(catalog_snapshot(prefix), qt),
        ],
        Part::Control => vec![
            Object::Queue {
                name: control_queue(prefix),
                args: quorum_if(qt),
            },
            exchange(
                control_exchange(prefix),
                ExchangeKind::Fanout,
                FieldTable::default(),
            ),
        ],
        Part::Runs => vec![
            snapshot(runs_snapshot(prefix), qt),
            snapshot(runs_view(prefix), qt),
            log(runs_log(prefix)),
        ],
    }
}

/// Declare the objects of `parts` (or, with `topology.declare = false`,
/// check that they exist: [`Error::Missing`] names the first that does not).
pub async fn declare(conn: &Connection, topo: &Topology, parts: &[Part]) -> Result<(), Error> {
    let objects: Vec<Object> = parts
        .iter()
        .flat_map(|p| objects(topo.prefix(), topo.queue_type(), *p))
        .collect();
    super::declare_objects(conn, topo, &objects).await
}

fn quorum_if(qt: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if qt == QueueType::Quorum {
        put(
            &mut args,
            "x-queue-type",
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// A one-message queue holding the last snapshot written.
fn snapshot(name: String, qt: QueueType) -> Object {
    let mut args = quorum_if(qt);
    put(&mut args, "x-max-length", AMQPValue::LongInt(1));
    Object::Queue { name, args }
}

/// A log stream. Retention only needs to outlive the next snapshot; a day
/// and 512 MiB leave room for any outage.
fn log(name: String) -> Object {
    let mut args = FieldTable::default();
    put(
        &mut args,
        "x-queue-type",
        AMQPValue::LongString("stream".into()),
    );
    put(&mut args, "x-max-age", AMQPValue::LongString("1D".into()));
    put(
        &mut args,
        "x-max-length-bytes",
        AMQPValue::LongLongInt(512 << 20),
    );
    put(
        &mut args,
        "x-stream-max-segment-size-bytes",
        AMQPValue::LongInt(8 << 20),
    );
    Object::Queue { name, args }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(part: Part) -> Vec<String> {
        objects("w", QueueType::Classic, part)
            .into_iter()
            .map(|o| match o {
                Object::Queue { name, .. } | Object::Exchange { name, .. } => name,
                other => panic!("not a queue or exchange: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn every_part_names_its_objects_from_the_prefix() {
        assert_eq!(
            names(Part::Scheduler),
            ["w.producer.state", "w.producer.fires"]
        );
        assert_eq!(
            names(Part::Catalog),
            ["w.producer.schedules", "w.producer.schedules.snapshot"]
        );
        assert_eq!(
            names(Part::Control),
            ["w.producer.control", "w.producer.events"]
        );
        assert_eq!(
            names(Part::Runs),
            [
                "w.producer.workflows",
                "w.producer.workflows.view",
                "w.producer.workflows.log"
            ]
        );
        assert_eq!(lock_queue("w"), "w.producer.leader");
    }

    #[test]
    fn snapshots_hold_one_message_and_follow_the_queue_type() {
        let quorum = objects("w", QueueType::Quorum, Part::Runs);
        for o in &quorum {
            let Object::Queue { name, args } = o else {
                panic!("{o:?}")
            };
            let t = args.inner().get("x-queue-type");
            if name.ends_with(".log") {
                assert!(super::super::is_stream(args), "{name}");
            } else {
                assert_eq!(t, Some(&AMQPValue::LongString("quorum".into())), "{name}");
                assert_eq!(
                    args.inner().get("x-max-length"),
                    Some(&AMQPValue::LongInt(1))
                );
            }
        }
        let classic = objects("w", QueueType::Classic, Part::Control);
        let Object::Queue { args, .. } = &classic[0] else {
            panic!("{classic:?}")
        };
        assert!(args.inner().is_empty());
    }
}
