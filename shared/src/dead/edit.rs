//! One dead message in full (properties, headers, payload) and replaying it
//! with a payload an operator edited: attempts reset, the same id unless a
//! new one is asked for, and `x-warren-edited-by` / `x-warren-edited-at`
//! saying who changed it and when.

use std::time::Duration;

use base64::Engine as _;
use chrono::{SecondsFormat, Utc};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{describe, open_channel, revive, DeadError, DeadTask, ReplayReport, Scan, Tried};
use crate::amqp::Publisher;
use crate::envelope::headers;
use crate::Topology;

/// A dead message as an operator inspects it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadMessage {
    pub task: DeadTask,
    /// The AMQP properties that are set, by their AMQP names
    /// (`message_id`, `type`, `content_type`, `timestamp`...).
    pub properties: Value,
    /// Every header, AMQP values as JSON (byte arrays as base64).
    pub headers: Value,
    /// The body: UTF-8 as is, anything else as base64 (`payload_base64`).
    pub payload: String,
    pub payload_base64: bool,
}

/// The first dead message with message id `id` among the first `scan_limit`
/// (left in the queue), or `None`.
pub async fn inspect(
    conn: &Connection,
    topo: &Topology,
    id: &str,
    scan_limit: usize,
) -> Result<Option<DeadMessage>, DeadError> {
    let ch = conn.create_channel().await.tried(open_channel)?;
    let found = find(&ch, topo, id, scan_limit).await?.map(|d| message(&d));
    ch.close(200, "dead inspect done".into())
        .await
        .tried(|| "close the channel".into())?;
    Ok(found)
}

/// Replay dead task `id` with `payload` (JSON) in place of its body:
/// attempt 1, the same id unless `new_id`, headers `x-warren-edited-by:
/// <editor>` and `x-warren-edited-at`. The copy is confirmed by the broker
/// before the dead one is acked (a crash in between leaves both, never
/// neither). A signature of the old body is dropped: it cannot match. The
/// edited payload is plain JSON, so the copy goes out unencrypted unless
/// `publisher` seals: the producer passes its sealing publisher, so an
/// operator's edit is signed (and encrypted) with the producer's keys.
pub async fn replay_edited(
    conn: &Connection,
    topo: &Topology,
    id: &str,
    payload: Vec<u8>,
    new_id: bool,
    editor: &str,
    publisher: &Publisher,
) -> Result<ReplayReport, DeadError> {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&payload) {
        return Err(DeadError::Invalid {
            id: id.to_owned(),
            why: format!("the new payload is not JSON: {e}"),
        });
    }
    let ch = conn.create_channel().await.tried(open_channel)?;
    let res = async {
        let d = find(&ch, topo, id, usize::MAX)
            .await?
            .ok_or_else(|| DeadError::NotFound(id.to_owned()))?;
        let mut task = revive(d.routing_key.as_str(), &d.properties, &d.data).map_err(|why| {
            DeadError::Invalid {
                id: id.to_owned(),
                why,
            }
        })?;
        task.payload = payload;
        task.content_encoding = None;
        if new_id {
            task.id = uuid::Uuid::new_v4().to_string();
        }
        let mut h = lapin::types::FieldTable::default();
        for (k, v) in task.extra_headers.inner() {
            if k.as_str() != headers::SIGNATURE {
                h.insert(k.clone(), v.clone());
            }
        }
        h.insert(
            headers::EDITED_BY.into(),
            AMQPValue::LongString(editor.into()),
        );
        h.insert(
            headers::EDITED_AT.into(),
            AMQPValue::LongString(
                Utc::now()
                    .to_rfc3339_opts(SecondsFormat::Millis, true)
                    .into(),
            ),
        );
        task.extra_headers = h;
        let mut report = ReplayReport::default();
        match publisher.publish_task(topo, &task, Duration::ZERO).await {
            Ok(()) => {
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .tried(|| format!("remove replayed task `{id}` from the dead queue"))?;
                report.replayed.push(task.id);
            }
            Err(e) => report.failed.push((id.to_owned(), e.to_string())),
        }
        Ok(report)
    }
    .await;
    // Unacked (not found, failed) messages return to the queue here.
    // The publisher is the caller's (the producer's API publisher): open.
    let _ = ch.close(200, "dead edit done".into()).await;
    res
}

/// Scan for the message with id `id`; everything fetched stays unacked.
async fn find(
    ch: &Channel,
    topo: &Topology,
    id: &str,
    scan_limit: usize,
) -> Result<Option<Delivery>, DeadError> {
    let mut scan = Scan::new(ch, topo, scan_limit).await?;
    let mut found = None;
    while let Some(d) = scan.next().await? {
        if d.properties.message_id().as_ref().map(|m| m.as_str()) == Some(id) {
            found = Some(d);
            break;
        }
    }
    // Still unacked, the found one can be acked after the cancel.
    scan.stop().await?;
    Ok(found)
}

fn message(d: &Delivery) -> DeadMessage {
    let (payload, payload_base64) = match std::str::from_utf8(&d.data) {
        Ok(s) => (s.to_owned(), false),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&d.data),
            true,
        ),
    };
    DeadMessage {
        task: describe(d.routing_key.as_str(), &d.properties, &d.data),
        properties: properties(&d.properties),
        headers: d
            .properties
            .headers()
            .as_ref()
            .map_or(Value::Object(Map::new()), |h| {
                to_json(&AMQPValue::FieldTable(h.clone()))
            }),
        payload,
        payload_base64,
    }
}

fn properties(p: &BasicProperties) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), v);
        }
    };
    let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|v| json!(v.as_str()));
    put("message_id", s(p.message_id()));
    put("type", s(p.kind()));
    put("content_type", s(p.content_type()));
    put("content_encoding", s(p.content_encoding()));
    put("correlation_id", s(p.correlation_id()));
    put("reply_to", s(p.reply_to()));
    put("expiration", s(p.expiration()));
    put("user_id", s(p.user_id()));
    put("app_id", s(p.app_id()));
    put("delivery_mode", p.delivery_mode().map(|v| json!(v)));
    put("priority", p.priority().map(|v| json!(v)));
    put("timestamp", p.timestamp().map(|v| json!(v)));
    Value::Object(m)
}

/// An AMQP field value as JSON.
fn to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => {
            json!(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, FieldTable};

    #[test]
    fn amqp_values_become_plain_json() {
        let mut inner = FieldTable::default();
        inner.insert("reason".into(), AMQPValue::LongString("rejected".into()));
        inner.insert("count".into(), AMQPValue::LongLongInt(2));
        let mut t = FieldTable::default();
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(inner)])),
        );
        t.insert("flag".into(), AMQPValue::Boolean(true));
        t.insert("raw".into(), AMQPValue::ByteArray(vec![0u8, 255].into()));
        t.insert("none".into(), AMQPValue::Void);
        assert_eq!(
            to_json(&AMQPValue::FieldTable(t)),
            json!({
                "x-death": [{"reason": "rejected", "count": 2}],
                "flag": true,
                "raw": "AP8=",
                "none": null,
            })
        );
    }

    #[test]
    fn only_set_properties_are_shown() {
        let p = BasicProperties::default()
            .with_message_id("m1".into())
            .with_type("a.b".into())
            .with_delivery_mode(2);
        assert_eq!(
            properties(&p),
            json!({"message_id": "m1", "type": "a.b", "delivery_mode": 2})
        );
    }
}
