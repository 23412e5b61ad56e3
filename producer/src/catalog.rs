//! The catalog: schedules created at runtime (API, `schedules apply`), kept
//! in RabbitMQ alone.
//!
//! * **The log** is the stream `<prefix>.producer.schedules`: every change is
//!   one [`Change`] record (put with the whole definition, or delete). Any
//!   replica, or the CLI, appends; every replica tails the log and applies
//!   the records in log order, so all of them agree on every outcome.
//! * **Versions** are log offsets: a schedule's version is the offset of the
//!   record that last put it (its `ETag`). A record may carry the version
//!   its writer saw (`If-Match`); it is applied only if that is still the
//!   version when it is read, otherwise every replica refuses it alike — a
//!   writer learns its outcome by reading its own record back.
//! * **The snapshot** is a one-message queue
//!   `<prefix>.producer.schedules.snapshot` holding every definition and the
//!   offset it covers; the leader rewrites it every `scheduler.compact_every`
//!   when the log grew. A replica starts from it and reads the log from the
//!   offset after it up to a marker of its own (then it is loaded), and then
//!   follows the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use warren::amqp::Publisher;
use warren::topology::producer::{catalog_log, catalog_snapshot};

use crate::config::{Schedule, ScheduleConfig};

/// How long a writer waits to read its own record back.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(30);

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    Put {
        def: Box<ScheduleConfig>,
        /// Apply only if the schedule's version is still this (0: only if
        /// it does not exist).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_version: Option<u64>,
        /// Refuse a new schedule past this many (the writer's limit).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<usize>,
        req: String,
    },
    Delete {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_version: Option<u64>,
        req: String,
    },
    /// A reader's marker: the log up to here is what it must read to be
    /// loaded.
    Marker { req: String },
}

impl Change {
    fn req(&self) -> &str {
        match self {
            Change::Put { req, .. } | Change::Delete { req, .. } | Change::Marker { req } => req,
        }
    }
}

/// What became of a change, the same on every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Created {
        version: u64,
    },
    Replaced {
        version: u64,
    },
    Deleted,
    /// `If-Match` did not hold: the version when the record was read.
    Stale {
        current: u64,
    },
    NotFound,
    Full {
        max: usize,
    },
    /// The definition does not compile here (it did where it was written:
    /// the replicas' configs differ, e.g. an unknown workflow).
    Invalid(String),
}

/// One stored definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub def: ScheduleConfig,
    pub version: u64,
    pub updated_at: DateTime<Utc>,
}

/// The snapshot: every definition, and the log offset it covers.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CatalogSnapshot {
    pub offset: Option<u64>,
    pub schedules: Vec<Stored>,
}

/// Compiles a definition as the config file's would be, and knows which
/// workflows exist (the same validation as `[[schedules]]`).
pub type Compile = dyn Fn(&ScheduleConfig) -> Result<Schedule, Vec<String>> + Send + Sync;

/// The catalog as this process has read it.
pub struct Catalog {
    stored: Mutex<HashMap<String, Stored>>,
    /// The last offset applied.
    applied: Mutex<Option<u64>>,
    /// Writers waiting for the outcome of their record, by request id.
    waiting: Mutex<HashMap<String, oneshot::Sender<Resolution>>>,
    compile: Box<Compile>,
}

/// What applying a record does to the schedules in force.
pub enum Effect {
    Put(Box<Schedule>),
    Remove(String),
    None,
}

impl Catalog {
    pub fn new(compile: Box<Compile>) -> Self {
        Self {
            stored: Mutex::default(),
            applied: Mutex::default(),
            waiting: Mutex::default(),
            compile,
        }
    }

    pub fn applied(&self) -> Option<u64> {
        self.applied.lock().ok().and_then(|a| *a)
    }

    pub fn len(&self) -> usize {
        self.stored.lock().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, name: &str) -> Option<Stored> {
        self.stored.lock().ok()?.get(name).cloned()
    }

    /// Every stored definition, by name.
    pub fn all(&self) -> BTreeMap<String, Stored> {
        self.stored
            .lock()
            .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// The snapshot of what is applied now.
    pub fn snapshot(&self) -> CatalogSnapshot {
        let (Ok(stored), Ok(applied)) = (self.stored.lock(), self.applied.lock()) else {
            return CatalogSnapshot::default();
        };
        CatalogSnapshot {
            offset: *applied,
            schedules: stored.values().cloned().collect(),
        }
    }

    /// Start from a snapshot: the schedules it holds, to put in force.
    pub fn restore(&self, snap: CatalogSnapshot) -> Vec<Schedule> {
        let mut out = Vec::new();
        let (Ok(mut stored), Ok(mut applied)) = (self.stored.lock(), self.applied.lock()) else {
            return out;
        };
        *applied = snap.offset;
        for s in snap.schedules {
            match self.compiled(&s.def, s.version) {
                Ok(c) => out.push(c),
                Err(e) => {
                    tracing::warn!(schedule = %s.def.name, error = %e, "stored schedule does not compile here; kept out of force")
                }
            }
            stored.insert(s.def.name.clone(), s);
        }
        out
    }

    /// Check a definition as its record would be applied.
    pub fn check(&self, def: &ScheduleConfig) -> Result<Schedule, Vec<String>> {
        (self.compile)(def)
    }

    fn compiled(&self, def: &ScheduleConfig, version: u64) -> Result<Schedule, String> {
        let mut s = (self.compile)(def).map_err(|e| e.join("; "))?;
        s.origin = crate::book::Origin::Api;
        s.version = version;
        Ok(s)
    }

    /// Register interest in the outcome of the record with request id `req`
    /// (before appending it).
    pub fn expect(&self, req: &str) -> oneshot::Receiver<Resolution> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(req.to_owned(), tx);
        }
        rx
    }

    pub fn forget(&self, req: &str) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(req);
        }
    }

    /// Apply the record read at `offset`: the same decision on every
    /// replica. Tells a waiting writer its outcome.
    pub fn apply(&self, offset: u64, change: Change) -> Effect {
        let req = change.req().to_owned();
        let (outcome, effect) = self.decide(offset, change);
        if let Ok(mut a) = self.applied.lock() {
            *a = Some(offset);
        }
        if let Some(tx) = self.waiting.lock().ok().and_then(|mut w| w.remove(&req)) {
            if let Some(o) = outcome {
                let _ = tx.send(o);
            }
        }
        effect
    }

    fn decide(&self, offset: u64, change: Change) -> (Option<Resolution>, Effect) {
        let Ok(mut stored) = self.stored.lock() else {
            return (None, Effect::None);
        };
        match change {
            Change::Marker { .. } => (None, Effect::None),
            Change::Put {
                def,
                if_version,
                max,
                ..
            } => {
                let current = stored.get(&def.name).map(|s| s.version);
                if let Some(want) = if_version {
                    if current.unwrap_or(0) != want {
                        return (
                            Some(Resolution::Stale {
                                current: current.unwrap_or(0),
                            }),
                            Effect::None,
                        );
                    }
                }
                if let (None, Some(max)) = (current, max) {
                    if stored.len() >= max {
                        return (Some(Resolution::Full { max }), Effect::None);
                    }
                }
                let compiled = match self.compiled(&def, offset) {
                    Ok(c) => c,
                    Err(e) => return (Some(Resolution::Invalid(e)), Effect::None),
                };
                let stored_def = Stored {
                    def: *def,
                    version: offset,
                    updated_at: Utc::now(),
                };
                stored.insert(stored_def.def.name.clone(), stored_def);
                let outcome = match current {
                    Some(_) => Resolution::Replaced { version: offset },
                    None => Resolution::Created { version: offset },
                };
                (Some(outcome), Effect::Put(Box::new(compiled)))
            }
            Change::Delete {
                name, if_version, ..
            } => {
                let Some(current) = stored.get(&name).map(|s| s.version) else {
                    return (Some(Resolution::NotFound), Effect::None);
                };
                if if_version.is_some_and(|want| want != current) {
                    return (Some(Resolution::Stale { current }), Effect::None);
                }
                stored.remove(&name);
                (Some(Resolution::Deleted), Effect::Remove(name))
            }
        }
    }
}

fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(warren::envelope::PERSISTENT)
}

/// Append `change` (confirmed).
pub async fn append(
    publisher: &Publisher,
    prefix: &str,
    change: &Change,
) -> Result<(), warren::Error> {
    let body = serde_json::to_vec(change).unwrap_or_default();
    publisher
        .publish("", &catalog_log(prefix), json_props(), &body)
        .await
}

/// Append `change` and wait until this process's tail has applied it.
pub async fn write(
    catalog: &Catalog,
    publisher: &Publisher,
    prefix: &str,
    change: Change,
) -> Result<Resolution, WriteError> {
    let req = change.req().to_owned();
    let rx = catalog.expect(&req);
    if let Err(e) = append(publisher, prefix, &change).await {
        catalog.forget(&req);
        return Err(WriteError::Broker(e));
    }
    match tokio::time::timeout(READ_BACK_TIMEOUT, rx).await {
        Ok(Ok(o)) => Ok(o),
        _ => {
            catalog.forget(&req);
            Err(WriteError::NotReadBack)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the broker did not take the change: {0}")]
    Broker(warren::Error),
    #[error("the change was stored but this replica has not read it back yet; read the schedule to see it")]
    NotReadBack,
}

/// Replace the snapshot with what `catalog` holds (confirmed).
pub async fn compact(
    catalog: &Catalog,
    publisher: &Publisher,
    prefix: &str,
) -> Result<(), warren::Error> {
    let body = serde_json::to_vec(&catalog.snapshot()).unwrap_or_default();
    publisher
        .publish("", &catalog_snapshot(prefix), json_props(), &body)
        .await
}

/// A consumer of the log from where `catalog` stands (the snapshot first
/// when it has applied nothing yet), up to a marker of its own: returns
/// the consumer, still following the log, with everything before the
/// marker applied through `effect`.
pub async fn follow(
    conn: &Connection,
    publisher: &Publisher,
    prefix: &str,
    catalog: &Catalog,
    effect: &(dyn Fn(Effect) + Sync),
) -> anyhow::Result<(lapin::Channel, lapin::Consumer)> {
    if catalog.applied().is_none() {
        for s in catalog.restore(
            crate::state::peek_shared(conn, &catalog_snapshot(prefix), "schedule catalog snapshot")
                .await?,
        ) {
            effect(Effect::Put(Box::new(s)));
        }
    }
    let marker = uuid::Uuid::new_v4().to_string();
    append(
        publisher,
        prefix,
        &Change::Marker {
            req: marker.clone(),
        },
    )
    .await?;
    let (ch, mut consumer) = crate::state::consume_log(
        conn,
        &catalog_log(prefix),
        "warren-producer-catalog",
        catalog.applied(),
        2000,
    )
    .await?;
    loop {
        let Some(d) = consumer.next().await else {
            anyhow::bail!("the schedule catalog consumer ended while loading");
        };
        let d = d?;
        if apply_delivery(catalog, &d, effect).as_deref() == Some(marker.as_str()) {
            d.acker.ack(BasicAckOptions::default()).await?;
            return Ok((ch, consumer));
        }
        d.acker.ack(BasicAckOptions::default()).await?;
    }
}

/// Apply one delivery of the log; the marker's id if it was one.
pub fn apply_delivery(
    catalog: &Catalog,
    d: &lapin::message::Delivery,
    effect: &(dyn Fn(Effect) + Sync),
) -> Option<String> {
    let offset = crate::state::stream_offset(d)?;
    if catalog.applied().is_some_and(|a| offset <= a) {
        return None;
    }
    match serde_json::from_slice::<Change>(&d.data) {
        Ok(change) => {
            let marker = match &change {
                Change::Marker { req } => Some(req.clone()),
                _ => None,
            };
            effect(catalog.apply(offset, change));
            marker
        }
        Err(e) => {
            tracing::warn!(error = %e, offset, "unreadable schedule catalog record; skipped");
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::new(Box::new(|def: &ScheduleConfig| {
            crate::config::compile_schedules(std::slice::from_ref(def))
                .map(|mut v| v.remove(0))
                .map_err(|p| p.iter().map(ToString::to_string).collect())
        }))
    }

    fn def(name: &str, cron: &str) -> ScheduleConfig {
        toml::from_str(&format!(
            "name = \"{name}\"\ncron = \"{cron}\"\ntask = \"t\"\n"
        ))
        .unwrap()
    }

    fn put(name: &str, if_version: Option<u64>, req: &str) -> Change {
        Change::Put {
            def: Box::new(def(name, "* * * * * *")),
            if_version,
            max: Some(2),
            req: req.into(),
        }
    }

    #[test]
    fn versions_are_offsets_and_if_match_is_decided_in_log_order() {
        let c = catalog();
        let mut a = c.expect("a");
        assert!(matches!(
            c.apply(10, put("x", Some(0), "a")),
            Effect::Put(_)
        ));
        assert_eq!(a.try_recv().unwrap(), Resolution::Created { version: 10 });
        // Two writers saw version 10; the first in the log wins.
        let (mut b, mut d) = (c.expect("b"), c.expect("d"));
        c.apply(11, put("x", Some(10), "b"));
        c.apply(12, put("x", Some(10), "d"));
        assert_eq!(b.try_recv().unwrap(), Resolution::Replaced { version: 11 });
        assert_eq!(d.try_recv().unwrap(), Resolution::Stale { current: 11 });
        assert_eq!(c.get("x").unwrap().version, 11);
    }

    #[test]
    fn limits_deletes_and_bad_definitions() {
        let c = catalog();
        c.apply(1, put("a", None, "1"));
        c.apply(2, put("b", None, "2"));
        let mut full = c.expect("3");
        c.apply(3, put("c", None, "3"));
        assert_eq!(full.try_recv().unwrap(), Resolution::Full { max: 2 });
        // Replacing an existing one is not held back by the limit.
        assert!(matches!(c.apply(4, put("a", None, "4")), Effect::Put(_)));
        let mut gone = c.expect("5");
        let del = Change::Delete {
            name: "a".into(),
            if_version: Some(4),
            req: "5".into(),
        };
        assert!(matches!(c.apply(5, del), Effect::Remove(n) if n == "a"));
        assert_eq!(gone.try_recv().unwrap(), Resolution::Deleted);
        let mut bad = c.expect("6");
        let broken = Change::Put {
            def: Box::new(def("z", "not cron")),
            if_version: None,
            max: None,
            req: "6".into(),
        };
        assert!(matches!(c.apply(6, broken), Effect::None));
        assert!(matches!(bad.try_recv().unwrap(), Resolution::Invalid(_)));
        assert_eq!(c.applied(), Some(6));
    }

    #[test]
    fn a_snapshot_restores_definitions_and_offset() {
        let c = catalog();
        c.apply(7, put("a", None, "1"));
        let snap = serde_json::to_vec(&c.snapshot()).unwrap();
        let back = catalog();
        let restored = back.restore(serde_json::from_slice(&snap).unwrap());
        assert_eq!(restored.len(), 1);
        assert_eq!(restored[0].version, 7);
        assert_eq!(back.applied(), Some(7));
    }
}
