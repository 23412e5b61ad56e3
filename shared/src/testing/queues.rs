//! Looking into queues from a test: how many messages wait, and taking them.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::Connection;

use super::eventually;

/// Ready messages in `queue` (a passive declare: the queue must exist).
pub async fn queue_len(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"));
    let _ = ch.close(200, "done".into()).await;
    q.message_count()
}

/// Wait until `queue` holds `n` ready messages, up to 5 s, and fail naming
/// the count it stayed at. The broker applies what a closed channel gave
/// back a moment after the close returns, so a count read at once from
/// another channel may still miss those messages.
pub async fn settles_at(conn: &Connection, queue: &str, n: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let len = queue_len(conn, queue).await;
        if len == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "queue `{queue}` holds {len} ready messages, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Take (and ack) exactly `n` messages from `queue`, waiting up to `within`
/// for them to arrive.
pub async fn take(conn: &Connection, queue: &str, n: usize, within: Duration) -> Vec<Delivery> {
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let what = format!("message {} of {n} in {queue}", out.len() + 1);
        let d = eventually(within, &what, || {
            let ch = ch.clone();
            async move {
                ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
                    .await
                    .expect("basic_get")
                    .map(|m| m.delivery)
            }
        })
        .await;
        out.push(d);
    }
    let _ = ch.close(200, "done".into()).await;
    out
}

/// Take (and ack) the next message of `queue`, waiting up to `within`.
pub async fn take_one(conn: &Connection, queue: &str, within: Duration) -> Delivery {
    take(conn, queue, 1, within)
        .await
        .pop()
        .expect("take returns what it waited for")
}

/// A header of a delivery as text, whether it was sent as a string or an
/// integer.
pub fn header(d: &Delivery, key: &str) -> Option<String> {
    let h = d.properties.headers().as_ref()?;
    crate::envelope::header_str(h, key)
        .or_else(|| crate::envelope::header_i64(h, key).map(|v| v.to_string()))
}
