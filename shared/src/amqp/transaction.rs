//! A transactional channel (`tx.select`), for messages that must reach the
//! broker together or not at all.
//!
//! RabbitMQ holds a transaction's publishes in the channel until
//! `tx.commit` and routes them all when the commit arrives; a publisher that
//! dies before its commit reaches the broker leaves nothing behind, one that
//! dies after leaves everything. `tx.commit-ok` comes once every message is
//! routed and stored, after the `basic.return` of each unroutable one. The
//! scheduler commits a wake-up's ticks with the log record of the cursors
//! they moved, so that a leader killed mid-burst cannot leave ticks without
//! their record (which made its successor fire them again).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection};

use crate::error::Error;

/// A channel in transaction mode.
pub struct Transaction {
    channel: Channel,
    timeout: Duration,
    /// A batch was dropped uncommitted: its publishes still sit in the
    /// channel's transaction and would go out with the next commit.
    spoiled: AtomicBool,
}

/// A message the broker returned at commit: no queue was bound for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Returned {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    /// The broker's reply code and text, e.g. `312 NO_ROUTE`.
    pub reply: String,
}

/// The publishes of one transaction, not yet committed.
#[must_use = "nothing is published until the batch is committed"]
pub struct Batch<'t> {
    tx: &'t Transaction,
    /// The last publish's write: frames go out in the order they were
    /// queued, so once it is written every earlier one is too.
    last: Option<super::Started>,
    len: usize,
    committed: bool,
}

impl Transaction {
    /// Open a channel on `conn` in transaction mode; `timeout` bounds the
    /// opening and each commit.
    pub async fn new(conn: &Connection, timeout: Duration) -> Result<Self, Error> {
        let open = async {
            let channel = conn.create_channel().await?;
            channel.tx_select().await?;
            Ok::<_, Error>(channel)
        };
        let channel = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| Error::ConnectTimeout(timeout))??;
        Ok(Self {
            channel,
            timeout,
            spoiled: AtomicBool::new(false),
        })
    }

    /// Whether the channel can still be used: not closed (a failed commit
    /// closes it) and no batch was left uncommitted on it.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected() && !self.spoiled.load(Ordering::Relaxed)
    }

    pub fn batch(&self) -> Batch<'_> {
        Batch {
            tx: self,
            last: None,
            len: 0,
            committed: false,
        }
    }

    /// Close the channel; the broker drops whatever it holds uncommitted.
    pub async fn close(&self) {
        if self.channel.status().connected() {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.channel.close(200, "transaction channel done".into()),
            )
            .await;
        }
    }
}

impl Batch<'_> {
    /// Queue a `mandatory` message's frames for lapin's I/O
    /// thread without waiting for the write (one thread round trip per
    /// batch, not per message).
    pub fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<(), Error> {
        let publish =
            super::mandatory_publish(&self.tx.channel, exchange, routing_key, properties, body);
        self.last = Some(super::queue_frames(publish)?);
        self.len += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Commit: `Ok` with the messages returned as unroutable once the
    /// broker routed and stored every other one. On an error (the channel
    /// or connection failed, the broker refused part of it, the timeout)
    /// the outcome is unknown: some of it may have been taken.
    pub async fn commit(mut self) -> Result<Vec<Returned>, Error> {
        let timeout = self.tx.timeout;
        let channel = &self.tx.channel;
        let last = self.last.take();
        let commit = async {
            // A method frame overtakes queued publish frames in lapin: the
            // commit must not leave before the last publish is written.
            if let Some(last) = last {
                last.await?;
            }
            channel.tx_commit().await?;
            // Not in confirm mode, this only hands over the returns, which
            // the broker sent before `tx.commit-ok`.
            let returned = channel.wait_for_confirms().await?;
            Ok::<_, Error>(returned)
        };
        let returned = match tokio::time::timeout(timeout, commit).await {
            Ok(Ok(returned)) => returned,
            failed => {
                // Whatever state the channel is in, it is not a fresh
                // transaction any more.
                self.tx.spoiled.store(true, Ordering::Relaxed);
                return Err(match failed {
                    Ok(Err(e)) => e,
                    _ => Error::ConfirmTimeout(timeout),
                });
            }
        };
        // Until here a dropped commit (its caller gave up) spoils the channel.
        self.committed = true;
        Ok(returned
            .into_iter()
            .map(|r| Returned {
                exchange: r.delivery.exchange.as_str().to_owned(),
                routing_key: r.delivery.routing_key.as_str().to_owned(),
                message_id: r
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned()),
                reply: format!("{} {}", r.reply_code, r.reply_text),
            })
            .collect())
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.committed && self.len > 0 {
            self.tx.spoiled.store(true, Ordering::Relaxed);
        }
    }
}
