//! One AMQP session of the worker — a connection, its confirm-mode publisher
//! and one consuming channel per work queue — and its consume loop: take a
//! delivery only once a concurrency permit is free, hand it to a supervised
//! task ([`super::delivery`]), re-consume a queue whose consumer the broker
//! cancelled, and drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, SelectAll};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren::amqp::Publisher;

use super::acks::AckBook;
use super::broker::{LapinBroker, Link};
use super::delivery::{self, Incoming};
use super::Worker;

/// One connection and what lives on it.
pub(super) struct Session {
    pub(super) conn: Connection,
    /// The publisher, and the token a task whose publish failed cancels
    /// (the session is then unusable).
    link: Arc<Link>,
    /// Channel, consumer tag and acks per consumed queue (same order as
    /// `queues`).
    consumers: Vec<(Channel, ShortString, Arc<AckBook>)>,
}

// Deliveries move by value: boxing each would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Ev {
    Delivery(usize, lapin::Result<Delivery>),
    Ended(usize),
}

/// The deliveries of every consumer of a session, merged.
type Events = SelectAll<BoxStream<'static, Ev>>;

/// Wait for a free concurrency permit, then for the next event; `Err` when
/// shutdown comes or the session breaks first.
async fn next_event(
    session: &Session,
    shutdown: &CancellationToken,
    sem: &Arc<Semaphore>,
    streams: &mut Events,
) -> Result<(OwnedSemaphorePermit, Option<Ev>), End> {
    let permit = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Err(End::Shutdown),
        _ = session.link.broken.cancelled() => return Err(End::Lost),
        p = sem.clone().acquire_owned() => p.map_err(|_| End::Shutdown)?,
    };
    let ev = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Err(End::Shutdown),
        _ = session.link.broken.cancelled() => return Err(End::Lost),
        ev = streams.next() => ev,
    };
    Ok((permit, ev))
}

/// Why a session's consume loop returned.
pub(super) enum End {
    Shutdown,
    Lost,
    /// The broker refused something no reconnect changes (ACCESS_REFUSED
    /// on consuming a queue): the worker stops with this error.
    Refused(anyhow::Error),
}

impl Session {
    /// Send the acks of finished tasks that are still deferred or queued in
    /// the channels' [`AckBook`]s: call before closing the connection, or
    /// those deliveries run again.
    pub(super) async fn flush_acks(&self) {
        for (_, _, acks) in &self.consumers {
            let _ = tokio::time::timeout(Duration::from_secs(5), acks.flush()).await;
        }
    }
}

impl Worker {
    /// Connect, declare the topology and open the publisher.
    pub(super) async fn open_session(&self) -> Result<Session, warren::Error> {
        let cfg = &self.shared.cfg;
        let conn = warren::amqp::connect(&cfg.amqp, "warren-consumer").await?;
        let res = async {
            warren::amqp::watch_connection(&conn, self.amqp_metrics.clone());
            warren::topology::declare(&conn, &self.shared.topo).await?;
            let publisher = Publisher::new(&conn, cfg.amqp.confirm_timeout).await?;
            self.shared.life.recorder().attach(&conn).await;
            Ok::<_, warren::Error>(publisher)
        }
        .await;
        match res {
            Ok(publisher) => Ok(Session {
                conn,
                link: Arc::new(Link {
                    publisher,
                    broken: CancellationToken::new(),
                }),
                consumers: Vec::new(),
            }),
            Err(e) => {
                let _ = conn.close(200, "setup failed".into()).await;
                Err(e)
            }
        }
    }

    async fn start_consumer(
        &self,
        conn: &Connection,
        idx: usize,
    ) -> Result<(Channel, ShortString, BoxStream<'static, Ev>), warren::Error> {
        let queue = &self.queues[idx];
        let ch = conn.create_channel().await?;
        ch.basic_qos(
            self.shared.cfg.worker.prefetch,
            BasicQosOptions { global: false },
        )
        .await?;
        let tag = format!(
            "warren-consumer.{}.{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let s = consumer
            .map(move |d| Ev::Delivery(idx, d))
            .chain(stream::once(async move { Ev::Ended(idx) }))
            .boxed();
        tracing::info!(queue = %queue, prefetch = self.shared.cfg.worker.prefetch, "consuming");
        Ok((ch, tag.as_str().into(), s))
    }

    /// Prefetch slots beyond what running tasks hold: how many finished
    /// deliveries the [`AckBook`] may hold back without delaying a start.
    fn spare_prefetch(&self) -> usize {
        let w = &self.shared.cfg.worker;
        usize::from(w.prefetch).saturating_sub(w.concurrency)
    }

    /// Consume on `session` until shutdown or until the session is lost.
    pub(super) async fn consume(
        &self,
        mut session: Session,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
        sem: &Arc<Semaphore>,
    ) -> (End, Session) {
        let mut streams = match self.start_consumers(&mut session).await {
            Ok(streams) => streams,
            Err(end) => return (end, session),
        };
        self.health.set_ready(true);
        let queues: Vec<Arc<str>> = self.queues.iter().map(|q| Arc::from(q.as_str())).collect();
        loop {
            let next = next_event(&session, shutdown, sem, &mut streams).await;
            let (permit, ev) = match next {
                Ok(next) => next,
                Err(end) => return (end, session),
            };
            match ev {
                Some(Ev::Delivery(idx, Ok(d))) => {
                    let queue = queues[idx].clone();
                    self.spawn_delivery(&session, idx, queue, d, permit, tracker);
                }
                Some(Ev::Delivery(idx, Err(e))) => {
                    tracing::warn!(error = %e, queue = %self.queues[idx], "consumer failed");
                }
                Some(Ev::Ended(idx)) => {
                    if let Err(end) = self.reconsume(&mut session, idx, &mut streams).await {
                        return (end, session);
                    }
                }
                None => return (End::Lost, session),
            }
        }
    }

    /// A consumer on every queue of this worker, each on its own channel
    /// with its own [`AckBook`]; their deliveries merged into one stream.
    async fn start_consumers(&self, session: &mut Session) -> Result<Events, End> {
        let mut streams = Events::new();
        for idx in 0..self.queues.len() {
            match self.start_consumer(&session.conn, idx).await {
                Ok((ch, tag, s)) => {
                    let book = AckBook::new(ch.clone(), self.spare_prefetch());
                    session.consumers.push((ch, tag, book));
                    streams.push(s);
                }
                // Said once, by the exit line (`warren-consumer: cannot
                // consume queue …: ACCESS_REFUSED - …`), not also logged.
                Err(e) if e.is_fatal() => {
                    let why = format!(
                        "cannot consume queue `{}` (a consumer's broker user needs read permission on its queues)",
                        self.queues[idx]
                    );
                    return Err(End::Refused(anyhow::Error::from(e).context(why)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue = %self.queues[idx], "cannot consume");
                    return Err(End::Lost);
                }
            }
        }
        Ok(streams)
    }

    /// Hand delivery `d` of queue `idx` to a supervised task that owns
    /// `permit` until it is done.
    fn spawn_delivery(
        &self,
        session: &Session,
        idx: usize,
        queue: Arc<str>,
        d: Delivery,
        permit: OwnedSemaphorePermit,
        tracker: &TaskTracker,
    ) {
        let shared = self.shared.clone();
        // The task keeps the delivery's channel alive and acks only on it;
        // if it died meanwhile the ack is refused and the broker redelivers.
        let acks = session.consumers[idx].2.clone();
        // In delivery order, before any task can finish.
        acks.delivered(d.delivery_tag);
        // Taken apart, so its acker moves instead of being cloned.
        let Delivery {
            delivery_tag,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
            ..
        } = d;
        let broker = LapinBroker {
            link: session.link.clone(),
            acker,
            delivery_tag,
            acks,
        };
        // Boxed: tokio copies a task's future into its cell and its output
        // over it, and this one is kilobytes (the delivery and the whole
        // handling state machine).
        tracker.spawn(Box::pin(async move {
            let _permit = permit;
            let msg = Incoming {
                queue: &queue,
                routing_key: routing_key.as_str(),
                properties: &properties,
                body: &data,
                redelivered,
            };
            delivery::supervise(&shared, &broker, msg).await;
        }));
    }

    /// The consumer of queue `idx` ended: unless the connection is gone,
    /// it was cancelled by the broker (queue deleted) or its channel
    /// closed, so re-declare and consume again on a new channel.
    async fn reconsume(
        &self,
        session: &mut Session,
        idx: usize,
        streams: &mut Events,
    ) -> Result<(), End> {
        if !session.conn.status().connected() {
            return Err(End::Lost);
        }
        tracing::warn!(queue = %self.queues[idx], "consumer ended; re-declaring and re-consuming");
        self.health.set_ready(false);
        if let Err(e) = warren::topology::declare(&session.conn, &self.shared.topo).await {
            tracing::warn!(error = %e, "re-declare failed");
            return Err(End::Lost);
        }
        match self.start_consumer(&session.conn, idx).await {
            Ok((ch, tag, s)) => {
                // The old channel closes once its running tasks (which hold
                // it for their acks) are done.
                let book = AckBook::new(ch.clone(), self.spare_prefetch());
                session.consumers[idx] = (ch, tag, book);
                streams.push(s);
                self.health.set_ready(true);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "re-consume failed");
                Err(End::Lost)
            }
        }
    }

    /// Shutdown: cancel the consumers, wait for running tasks up to the
    /// grace, close the connection (whatever is unacked goes back).
    pub(super) async fn drain(&self, session: Session, tracker: &TaskTracker) {
        let grace = self.shared.cfg.worker.drain_grace;
        for (ch, tag, _) in &session.consumers {
            if ch.status().connected() {
                let _ = ch
                    .basic_cancel(tag.clone(), BasicCancelOptions::default())
                    .await;
            }
        }
        tracker.close();
        let running = tracker.len();
        tracing::info!(running, grace = ?grace, "draining: consumers cancelled, waiting for running tasks");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                unfinished = tracker.len(),
                "drain grace over; unfinished tasks return to the queue unacked"
            );
        }
        session.flush_acks().await;
        // Recorded (and published) before the connection closes.
        self.shared
            .life
            .requeue_running("shutdown: still running after the drain grace")
            .await;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            session
                .conn
                .close(200, "warren consumer shutting down".into()),
        )
        .await;
        self.amqp_metrics.connected.set(0);
        tracing::info!("consumer stopped");
    }
}
