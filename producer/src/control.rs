//! How any replica asks the leader to pause or resume a schedule, and how
//! every replica learns which schedules are paused — through RabbitMQ,
//! like the election (see docs/schedules.md, "Pause and resume").
//!
//! * A replica publishes a [`Request`] to the queue `<prefix>.producer.control`
//!   with a per-message TTL of [`REQUEST_TTL`]: a request nobody takes in
//!   time expires instead of applying long after its caller gave up.
//! * Only the leader consumes that queue. It applies the request, writes its
//!   state snapshot (confirmed: the pause survives a failover from then on),
//!   publishes an [`Event`] with the whole paused set and the request's id to
//!   the fanout exchange `<prefix>.producer.events`, and only then acks.
//! * Every replica binds a private queue to that exchange and keeps the
//!   paused set it last heard; the one that relayed the request answers its
//!   caller when the event with its request id arrives, or 503 after
//!   [`REPLY_TIMEOUT`] (no leader, or a leader too slow to be trusted).
//!
//! A leader also publishes the set when its term starts, and a replica asks
//! for it (`sync`) whenever its API connection comes up.
//!
//! Every replica also announces itself on the same exchange every
//! [`PRESENCE_EVERY`] ([`Presence`]: instance, leading or not), so each one
//! knows its peers for the console and `GET /v1/replicas` without the
//! management plugin. A replica not heard for [`PRESENCE_TTL`] is gone.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde::{Deserialize, Serialize};
use warren::topology::producer::{control_exchange, control_queue};

/// A request older than this is dropped by the broker, unapplied.
pub const REQUEST_TTL: Duration = Duration::from_secs(4);
/// How long a relaying replica waits for the leader's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a replica announces itself.
pub const PRESENCE_EVERY: Duration = Duration::from_secs(5);
/// A replica silent this long is no longer listed (three missed announcements).
pub const PRESENCE_TTL: Duration = Duration::from_secs(16);

/// One replica's announcement of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub instance: String,
    pub leader: bool,
}

/// What arrives on the events exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Incoming {
    Presence { presence: Presence },
    Event(Event),
}

/// Announce `me` to every replica on the events channel `ch` (not
/// persistent, expiring with [`PRESENCE_TTL`]: an old announcement is
/// worthless).
pub async fn announce(ch: &Channel, prefix: &str, me: Presence) -> Result<(), lapin::Error> {
    let body = serde_json::to_vec(&Incoming::Presence { presence: me }).unwrap_or_default();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_expiration(PRESENCE_TTL.as_millis().to_string().into());
    ch.basic_publish(
        control_exchange(prefix).as_str().into(),
        "".into(),
        Default::default(),
        &body,
        props,
    )
    .await
    .map(|_| ())
}

/// Why a pause or resume did not happen (or is not known to have happened).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    #[error("no schedule named `{0}`")]
    NotFound(String),
    #[error("not connected to the broker; retry later")]
    Unavailable,
    #[error("no leader answered within {}s; it may still apply the request: check GET /v1/schedules and retry (pause and resume are idempotent)", REPLY_TIMEOUT.as_secs())]
    NoLeader,
    #[error("the leader refused: {0}")]
    Refused(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Pause,
    Resume,
    /// Change nothing; publish the paused set (a replica that just connected).
    Sync,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Answered by the [`Event`] carrying the same id.
    pub id: String,
    pub op: Op,
    #[serde(default)]
    pub schedule: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The request this answers (none: a leader announcing itself).
    #[serde(default)]
    pub answers: Option<String>,
    /// Why the request was not applied.
    #[serde(default)]
    pub error: Option<String>,
    /// Every paused schedule, after the request.
    pub paused: BTreeSet<String>,
    /// The leader's instance name.
    pub leader: String,
}

/// Send `req` to whichever replica leads (expires after [`REQUEST_TTL`]).
pub async fn send(conn: &Connection, prefix: &str, req: &Request) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    let body = serde_json::to_vec(req).unwrap_or_default();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_expiration(REQUEST_TTL.as_millis().to_string().into());
    let res = ch
        .basic_publish(
            "".into(),
            control_queue(prefix).as_str().into(),
            Default::default(),
            &body,
            props,
        )
        .await;
    let _ = ch.close(200, "control sent".into()).await;
    res.map(|_| ())
}

/// A private queue on the events exchange, consumed without acks (events
/// are whole states: a lost one is repaired by the next).
pub async fn subscribe(
    conn: &Connection,
    prefix: &str,
) -> Result<(Channel, Consumer), lapin::Error> {
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().as_str().into(),
        control_exchange(prefix).as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let consumer = ch
        .basic_consume(
            q.name().as_str().into(),
            "producer-events".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((ch, consumer))
}

/// The leader's consumer of the control queue, one request at a time.
pub async fn serve(conn: &Connection, prefix: &str) -> Result<(Channel, Consumer), lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(1, Default::default()).await?;
    let consumer = ch
        .basic_consume(
            control_queue(prefix).as_str().into(),
            "producer-leader".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((ch, consumer))
}

/// Next parsed item of a consumer; `None` when the stream ended (channel or
/// consumer gone). Unparsable bodies are skipped with a warning.
pub async fn next<T: serde::de::DeserializeOwned>(
    consumer: &mut Consumer,
) -> Option<(lapin::message::Delivery, Option<T>)> {
    match consumer.next().await? {
        Ok(d) => {
            let parsed = serde_json::from_slice(&d.data)
                .map_err(
                    |e| tracing::warn!(error = %e, "unreadable producer control message; ignored"),
                )
                .ok();
            Some((d, parsed))
        }
        Err(e) => {
            tracing::warn!(error = %e, "producer control consumer failed");
            None
        }
    }
}

/// What a request does to the paused set; `Err` names what is wrong.
/// How the leader's refusal of an unknown schedule begins.
pub const UNKNOWN_SCHEDULE: &str = "the leader has no schedule named";

pub fn apply(
    paused: &BTreeSet<String>,
    req: &Request,
    known: impl Fn(&str) -> bool,
) -> Result<BTreeSet<String>, String> {
    let mut next = paused.clone();
    match (req.op, &req.schedule) {
        (Op::Sync, _) => {}
        (_, None) => return Err("no schedule named in the request".into()),
        (_, Some(name)) if !known(name) => return Err(format!("{UNKNOWN_SCHEDULE} `{name}`")),
        (Op::Pause, Some(name)) => {
            next.insert(name.clone());
        }
        (Op::Resume, Some(name)) => {
            next.remove(name);
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: Op, s: &str) -> Request {
        Request {
            id: "r".into(),
            op,
            schedule: Some(s.into()),
        }
    }

    #[test]
    fn pause_and_resume_are_idempotent_and_unknown_names_refused() {
        let known = |n: &str| n == "a" || n == "b";
        let none = BTreeSet::new();
        let p = apply(&none, &req(Op::Pause, "a"), known).unwrap_or_default();
        assert_eq!(p, BTreeSet::from(["a".to_owned()]));
        assert_eq!(apply(&p, &req(Op::Pause, "a"), known), Ok(p.clone()));
        assert_eq!(apply(&p, &req(Op::Resume, "b"), known), Ok(p.clone()));
        assert_eq!(apply(&p, &req(Op::Resume, "a"), known), Ok(none.clone()));
        assert!(apply(&p, &req(Op::Pause, "zz"), known).is_err());
        let sync = Request {
            id: "s".into(),
            op: Op::Sync,
            schedule: None,
        };
        assert_eq!(apply(&p, &sync, known), Ok(p.clone()));
    }
}
