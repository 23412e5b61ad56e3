//! Leader election through RabbitMQ alone, and the fence every scheduled
//! publish passes.
//!
//! Each replica keeps one *lock connection* (never auto-recovered) and tries,
//! every `leader.retry_interval`, to declare the exclusive queue
//! `<prefix>.producer.leader` on it. The broker lets exactly one connection
//! hold an exclusive queue (others get 405 RESOURCE_LOCKED) and deletes it the
//! moment that connection closes: at once on `kill -9` (the kernel resets the
//! socket), after about three heartbeats when the holder goes silent.
//!
//! The holder fires ticks *on that same connection*, with confirms, so a tick
//! is only ever confirmed while the broker still counts the connection, and
//! therefore the lock, as alive. Before each publish the [`Fence`] checks that
//! the connection is open, that nothing reported an error on it, and that this
//! process's own runtime did not stall (SIGSTOP, VM pause) for longer than the
//! stall threshold since its last check; any doubt is treated as loss of
//! leadership: the connection is dropped and the replica starts over as a
//! candidate on a fresh connection.
//!
//! What a new leader must know about past fires lives in RabbitMQ too: see
//! [`crate::state`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, Event};
use tokio_util::sync::CancellationToken;

/// Outcome of one attempt to take the lock.
pub enum Attempt {
    Acquired,
    HeldElsewhere,
}

/// Try once to take the lock on `conn`.
pub async fn try_acquire(conn: &Connection, queue: &str) -> Result<Attempt, lapin::Error> {
    let ch = conn.create_channel().await?;
    let res = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match res {
        Ok(_) => {
            let _ = ch.close(200, "lock taken".into()).await;
            Ok(Attempt::Acquired)
        }
        Err(e) => match e.kind() {
            // RESOURCE_LOCKED: another connection holds it. The broker closed
            // this channel; the connection stays usable.
            lapin::ErrorKind::ProtocolError(p) if p.get_id() == 405 => Ok(Attempt::HeldElsewhere),
            _ => Err(e),
        },
    }
}

/// Proof of leadership for one term, checked right before each publish.
#[derive(Clone)]
pub struct Fence {
    conn: Arc<Connection>,
    lost: CancellationToken,
    base: Instant,
    beat_ms: Arc<AtomicU64>,
    stall: Duration,
}

impl Fence {
    /// Start a term on `conn`: watches the connection and the runtime's
    /// liveness until the term ends (`lost` is cancelled).
    pub fn start(conn: Arc<Connection>, stall: Duration, parent: &CancellationToken) -> Self {
        let fence = Self {
            conn,
            lost: parent.child_token(),
            base: Instant::now(),
            beat_ms: Arc::new(AtomicU64::new(0)),
            stall,
        };
        // Watchdog: a gap between two beats longer than the stall threshold
        // means this process did not run for that long; the broker may have
        // dropped the lock meanwhile. Cancel *before* refreshing the beat so
        // that `holds` can never see a fresh beat and an uncancelled token
        // after a stall.
        let f = fence.clone();
        tokio::spawn(async move {
            let tick = (f.stall / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = f.lost.cancelled() => break,
                    _ = tokio::time::sleep(tick) => {}
                }
                let now = f.elapsed_ms();
                let prev = f.beat_ms.load(Ordering::SeqCst);
                if now.saturating_sub(prev) > f.stall.as_millis() as u64 {
                    tracing::warn!(
                        stalled_ms = now - prev,
                        "this process did not run for longer than the stall threshold: stepping down"
                    );
                    f.lost.cancel();
                    break;
                }
                if !f.conn.status().connected() {
                    tracing::warn!("lock connection is no longer open: stepping down");
                    f.lost.cancel();
                    break;
                }
                f.beat_ms.store(now, Ordering::SeqCst);
            }
        });
        let f = fence.clone();
        let mut events = fence.conn.events_listener();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = f.lost.cancelled() => break,
                    ev = events.next() => match ev {
                        // lapin reports a channel closed by the broker (a 404
                        // of a passive declare on a fresh broker, say) on the
                        // connection's event stream too. The lock lives as long
                        // as the connection: only a connection error costs it.
                        Some(Event::Error(e)) if f.conn.status().connected() => {
                            tracing::debug!(error = %e, "a channel on the lock connection failed; the lock holds");
                        }
                        Some(Event::Error(e)) => {
                            tracing::warn!(error = %e, "lock connection failed: stepping down");
                            f.lost.cancel();
                            break;
                        }
                        Some(_) => {}
                        None => {
                            f.lost.cancel();
                            break;
                        }
                    }
                }
            }
        });
        fence
    }

    fn elapsed_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Whether this replica may publish a tick right now.
    pub fn holds(&self) -> bool {
        let beat = self.beat_ms.load(Ordering::SeqCst);
        let fresh = self.elapsed_ms().saturating_sub(beat) <= self.stall.as_millis() as u64;
        fresh && !self.lost.is_cancelled() && self.conn.status().connected()
    }

    /// Give up leadership (e.g. after a failed publish on the lock connection).
    pub fn step_down(&self) {
        self.lost.cancel();
    }

    /// Resolves when the term ends.
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }
}
