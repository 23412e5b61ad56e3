//! [`Broker`]: the port through which the handling of one delivery reaches
//! RabbitMQ — confirmed publishes (retry, parked and dead-letter copies), the
//! delivery's ack, giving it back, and giving up on the session — and
//! [`LapinBroker`], its implementation on a live session.
//!
//! The per-delivery logic ([`super::delivery`]) talks only to this trait, so
//! every branch of it is unit-tested with a recording broker; the real one is
//! covered by the integration tests.

use std::future::Future;

use std::sync::Arc;

use lapin::{Acker, BasicProperties};
use tokio_util::sync::CancellationToken;
use warren::amqp::Publisher;

use super::acks::AckBook;

/// How an ack attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AckResult {
    Acked,
    /// The delivery's channel closed first: the broker redelivers it.
    ChannelClosed,
    /// The ack was refused or could not be sent (the error's text). The
    /// lapin broker hands acks to its `AckBook` and never answers this (the
    /// book closes the channel instead); the recording broker of the tests does.
    #[allow(dead_code)]
    Failed(String),
}

/// What the handling of one delivery may do to the broker.
pub(crate) trait Broker: Send + Sync {
    /// Publish `body` (mandatory, persistent as `props` say) and wait for the
    /// broker's confirm; an unroutable message is an error.
    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: &[u8],
    ) -> impl Future<Output = Result<(), warren::Error>> + Send;

    /// Ack the delivery.
    fn ack(&self) -> impl Future<Output = AckResult> + Send;

    /// Give the delivery back to its queue, whatever it takes.
    fn requeue(&self) -> impl Future<Output = ()> + Send;

    /// A publish failed: the session is unusable. Ending it closes the
    /// connection, which requeues the delivery with everything unacked.
    fn abandon_session(&self);
}

/// What every delivery of one session reaches the broker through. Shared
/// behind one `Arc`: cloning a publisher (a lapin `Channel`, a bundle of
/// `Arc`s) and a cancellation token (a locked handle count) for every
/// delivery costs more than the delivery's own bookkeeping.
pub(crate) struct Link {
    pub(crate) publisher: Publisher,
    /// Cancelled to end the session.
    pub(crate) broken: CancellationToken,
}

/// [`Broker`] for a delivery of a live session.
pub(crate) struct LapinBroker {
    pub(crate) link: Arc<Link>,
    pub(crate) acker: Acker,
    pub(crate) delivery_tag: u64,
    /// The acks of the channel the delivery came on (acks are valid only
    /// there); it holds that channel.
    pub(crate) acks: Arc<AckBook>,
}

impl Broker for LapinBroker {
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: &[u8],
    ) -> Result<(), warren::Error> {
        self.link
            .publisher
            .publish(exchange, routing_key, props, body)
            .await
    }

    /// Hands the ack to the channel's [`AckBook`], which sends it with the
    /// contiguous run it completes (or on its own shortly after): the task
    /// does not wait for the frame. If the ack then fails, the book closes
    /// the channel and the broker redelivers.
    async fn ack(&self) -> AckResult {
        if self.acks.ack(self.delivery_tag, self.acker.clone()) {
            AckResult::Acked
        } else {
            AckResult::ChannelClosed
        }
    }

    /// Nack with requeue (through the book, so no multiple-ack can overtake
    /// it) while the ack handle is unused; if it was used (an ack of unknown
    /// fate) or the nack fails, close the delivery's channel, which requeues
    /// everything unacked on it (the worker then consumes on a fresh
    /// channel). Never leaves the delivery in flight.
    async fn requeue(&self) {
        if self.acker.usable()
            && self
                .acks
                .requeue(self.delivery_tag, self.acker.clone())
                .await
        {
            return;
        }
        let channel = self.acks.channel();
        if channel.status().connected() {
            tracing::warn!("closing the delivery's channel so the broker requeues it");
            let _ = channel
                .close(200, "warren: delivery given back".into())
                .await;
        }
    }

    fn abandon_session(&self) {
        self.link.broken.cancel();
    }
}
