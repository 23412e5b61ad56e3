//! [`AckBook`]: coalesces the acks of one consuming channel.
//!
//! One `basic.ack` frame per delivery is what the broker and lapin's I/O
//! thread spend most on in a backlog drain. Deliveries finish out of order,
//! so a finished delivery is acked with `multiple = true` once every delivery
//! before it on the channel has finished too: one frame then settles a whole
//! contiguous run.
//!
//! The rules that keep this safe (a wrong multiple-ack loses a task, a tag
//! acked twice closes the channel):
//!
//! * A tag stays *unfinished* from delivery until it is acked or nacked
//!   through this book; a delivery left unsettled for its session to requeue
//!   (a failed publish) stays unfinished for good, so no multiple-ack ever
//!   covers it.
//! * A multiple-ack is sent only on the highest finished tag below the lowest
//!   unfinished one, so it covers finished deliveries only, each once.
//! * Every frame (ack or nack) leaves through one sender task per channel.
//!   It picks the run to ack when it is free to send, so while one frame is
//!   on its way the next run grows (the busier the channel, the fewer the
//!   frames). A tag being requeued stays unfinished until its nack went out,
//!   so no multiple-ack can overtake the nack.
//! * A finished tag above an unfinished one (a slow task) is acked on its own
//!   after [`FLUSH_AFTER`], so a long task never holds the others' acks (and
//!   prefetch slots, and `consumer_timeout`) hostage; and at once, the
//!   oldest first, as far as more than `spare` (prefetch − concurrency) are
//!   held back, so held acks never take the prefetch slots that deliveries
//!   need to start: a task never waits for the broker because of the
//!   coalescing. Only the excess goes one by one: flushing every held tag
//!   then cost a frame per task in a drain whose workers finish out of
//!   order, where the rest would have gone in the next multiple-ack.
//! * A failed ack or nack closes the channel: the broker then requeues
//!   everything unacked on it, and the worker consumes on a fresh channel.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Acker, Channel};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

/// How long a finished delivery may wait for an earlier one before it is
/// acked on its own.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// Work for the sender besides acking finished runs.
#[derive(Debug)]
enum Frame {
    /// Nack with requeue; the answer goes back (`true`: sent).
    Requeue {
        tag: u64,
        acker: Acker,
        done: oneshot::Sender<bool>,
    },
    /// Ack every deferred tag now; answer once all finished tags went out.
    Flush(oneshot::Sender<()>),
}

/// The bookkeeping alone, without I/O, so its rules are unit-tested.
struct Ledger<A> {
    unfinished: BTreeSet<u64>,
    /// Finished, waiting for an ack, with what acks them.
    ready: BTreeMap<u64, A>,
    /// Most finished tags held back by an unfinished one.
    spare: usize,
}

impl<A> Ledger<A> {
    fn new(spare: usize) -> Self {
        Self {
            unfinished: BTreeSet::new(),
            ready: BTreeMap::new(),
            spare,
        }
    }

    fn delivered(&mut self, tag: u64) {
        self.unfinished.insert(tag);
    }

    /// The finished run that can be acked with one multiple-ack: the highest
    /// ready tag below the lowest unfinished one, and how many it settles.
    fn take_run(&mut self) -> Option<(A, usize)> {
        let below = match self.unfinished.first() {
            Some(&low) => {
                let rest = self.ready.split_off(&low);
                std::mem::replace(&mut self.ready, rest)
            }
            None => std::mem::take(&mut self.ready),
        };
        let n = below.len();
        below.into_iter().next_back().map(|(_, a)| (a, n))
    }

    /// `tag` finished and is to be acked.
    fn finished(&mut self, tag: u64, acker: A) {
        self.unfinished.remove(&tag);
        self.ready.insert(tag, acker);
    }

    /// `tag` was nacked: it no longer holds back the run above it.
    fn released(&mut self, tag: u64) {
        self.unfinished.remove(&tag);
    }

    /// Every deferred tag, to be acked one by one.
    fn deferred(&mut self) -> Vec<A> {
        std::mem::take(&mut self.ready).into_values().collect()
    }

    /// The oldest finished tags beyond the spare slots, to be acked one by
    /// one: what brings the held-back count back to `spare`. The rest stay
    /// for the multiple-ack that follows once the hole below them closes.
    fn excess(&mut self) -> Vec<A> {
        let n = self.ready.len().saturating_sub(self.spare);
        std::iter::from_fn(|| self.ready.pop_first().map(|(_, a)| a))
            .take(n)
            .collect()
    }
}

/// Acks of one consuming channel: see the module docs.
pub(crate) struct AckBook {
    channel: Channel,
    ledger: Mutex<Ledger<Acker>>,
    /// Wakes the sender: a delivery finished.
    finished: Arc<Notify>,
    frames: mpsc::UnboundedSender<Frame>,
}

impl AckBook {
    /// A book for `channel`, with its sender task (which ends when the book
    /// is dropped). `spare`: how many finished deliveries may wait for an
    /// earlier one — the prefetch slots that running tasks do not need
    /// (prefetch − concurrency).
    pub(crate) fn new(channel: Channel, spare: usize) -> Arc<Self> {
        Self::flushing_after(channel, spare, FLUSH_AFTER)
    }

    /// [`AckBook::new`] with another deferral: tests that watch the excess
    /// rule at work need a deferral that cannot fire under them.
    fn flushing_after(channel: Channel, spare: usize, flush_after: Duration) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let finished = Arc::new(Notify::new());
        let book = Arc::new(Self {
            channel,
            ledger: Mutex::new(Ledger::new(spare)),
            finished: finished.clone(),
            frames: tx,
        });
        tokio::spawn(send_frames(
            Arc::downgrade(&book),
            finished,
            rx,
            flush_after,
        ));
        book
    }

    /// The channel the deliveries came on.
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Record a delivery; call in delivery order, before handling it.
    pub(crate) fn delivered(&self, tag: u64) {
        self.ledger().delivered(tag);
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger<Acker>> {
        // Every ledger operation completes under the lock without panicking
        // midway: a poisoned lock still holds a consistent ledger.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `tag` finished: the sender acks it with its run, or on its own after
    /// [`FLUSH_AFTER`]. `false` if the channel is gone (the broker
    /// redelivers).
    pub(crate) fn ack(&self, tag: u64, acker: Acker) -> bool {
        if !acker.usable() || !self.channel.status().connected() {
            return false;
        }
        self.ledger().finished(tag, acker);
        // notify_one keeps the wake-up if the sender is busy sending.
        self.finished.notify_one();
        true
    }

    /// Nack `tag` with requeue, before any multiple-ack above it. `false` if
    /// the nack could not be sent (the channel is then closed, which
    /// requeues it too).
    pub(crate) async fn requeue(&self, tag: u64, acker: Acker) -> bool {
        let (done, answer) = oneshot::channel();
        if self
            .frames
            .send(Frame::Requeue { tag, acker, done })
            .is_err()
        {
            return false;
        }
        answer.await.unwrap_or(false)
    }

    /// Ack every finished delivery now and wait until those acks went out
    /// (before closing the connection on shutdown).
    pub(crate) async fn flush(&self) {
        let (done, answer) = oneshot::channel();
        if self.frames.send(Frame::Flush(done)).is_ok() {
            let _ = answer.await;
        }
    }
}

/// The channel's one sender of acks and nacks: see the module docs.
async fn send_frames(
    book: Weak<AckBook>,
    finished: Arc<Notify>,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    flush_after: Duration,
) {
    // A steady stream of finishes must not postpone deferred acks forever.
    let mut next_flush = Instant::now() + flush_after;
    loop {
        let mut flush_deferred = false;
        let frame = tokio::select! {
            biased;
            f = frames.recv() => match f {
                Some(f) => Some(f),
                None => return,
            },
            () = finished.notified() => None,
            () = tokio::time::sleep_until(next_flush) => {
                next_flush = Instant::now() + flush_after;
                flush_deferred = true;
                None
            }
        };
        let Some(book) = book.upgrade() else { return };
        let mut flushed = None;
        let ok = match frame {
            Some(Frame::Requeue { tag, acker, done }) => {
                let requeue = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                let ok = matches!(acker.nack(requeue).await, Ok(true));
                if ok {
                    // Only now may a multiple-ack reach past it.
                    book.ledger().released(tag);
                }
                let _ = done.send(ok);
                ok
            }
            Some(Frame::Flush(done)) => {
                flush_deferred = true;
                flushed = Some(done);
                true
            }
            None => true,
        };
        let ok = ok && ack_run(&book).await;
        let ok = ok
            && if flush_deferred {
                ack_deferred(&book).await
            } else {
                ack_excess(&book).await
            };
        if let Some(done) = flushed {
            let _ = done.send(());
        }
        if !ok {
            // Unknown fate: no later frame may assume it arrived. Closing the
            // channel requeues everything unacked on it.
            if book.channel.status().connected() {
                tracing::warn!(
                    "ack or nack failed; closing the channel so the broker requeues its deliveries"
                );
                let _ = book
                    .channel
                    .close(200, "warren: ack failed, deliveries given back".into())
                    .await;
            }
            return;
        }
    }
}

async fn ack(acker: &Acker, multiple: bool) -> bool {
    matches!(acker.ack(BasicAckOptions { multiple }).await, Ok(true))
}

/// Ack the finished run below the lowest unfinished tag, in one frame.
async fn ack_run(book: &AckBook) -> bool {
    let run = book.ledger().take_run();
    match run {
        Some((acker, n)) => ack(&acker, n > 1).await,
        None => true,
    }
}

/// Ack every finished tag above an unfinished one, each on its own.
async fn ack_deferred(book: &AckBook) -> bool {
    let deferred = book.ledger().deferred();
    ack_each(deferred).await
}

/// Ack on its own each finished tag held back beyond the spare slots.
async fn ack_excess(book: &AckBook) -> bool {
    // Its own statement: the ledger's lock is not held across an await.
    let excess = book.ledger().excess();
    ack_each(excess).await
}

async fn ack_each(ackers: Vec<Acker>) -> bool {
    for acker in ackers {
        if !ack(&acker, false).await {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::Ledger;

    /// Stand-in for an acker: its tag.
    fn ledger(tags: &[u64]) -> Ledger<u64> {
        let mut l = Ledger::new(8);
        for &t in tags {
            l.delivered(t);
        }
        l
    }

    #[test]
    fn in_order_finishes_form_one_run() {
        let mut l = ledger(&[1, 2, 3, 4]);
        l.finished(1, 1);
        l.finished(2, 2);
        l.finished(3, 3);
        // One multiple-ack on 3 settles 1..=3; 4 still runs.
        assert_eq!(l.take_run(), Some((3, 3)));
        assert_eq!(l.take_run(), None);
        l.finished(4, 4);
        assert_eq!(l.take_run(), Some((4, 1)));
        assert!(l.ready.is_empty() && l.unfinished.is_empty());
    }

    #[test]
    fn out_of_order_finishes_wait_for_the_lowest() {
        let mut l = ledger(&[1, 2, 3, 4]);
        l.finished(3, 3);
        l.finished(2, 2);
        assert_eq!(l.take_run(), None);
        l.finished(1, 1);
        assert_eq!(l.take_run(), Some((3, 3)));
    }

    #[test]
    fn a_multiple_ack_never_covers_a_tag_being_requeued_or_left_unsettled() {
        let mut l = ledger(&[1, 2, 3, 4, 5]);
        // 2 is being nacked: the run below it may go, nothing above it yet.
        l.finished(1, 1);
        l.finished(3, 3);
        assert_eq!(l.take_run(), Some((1, 1)));
        assert_eq!(l.take_run(), None);
        // Its nack went out: 3 may go.
        l.released(2);
        assert_eq!(l.take_run(), Some((3, 1)));
        // 4 is left to its session (never finished nor released): 5 waits,
        // and only the deferred flush acks it, on its own.
        l.finished(5, 5);
        assert_eq!(l.take_run(), None);
        assert_eq!(l.deferred(), vec![5]);
        assert_eq!(l.unfinished.iter().copied().collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn a_slow_delivery_holds_back_no_more_than_the_spare_slots() {
        let none: Vec<u64> = Vec::new();
        let mut l = Ledger::new(2);
        for t in 1..=5 {
            l.delivered(t);
        }
        // 1 is slow; 2 and 3 may wait for it (2 spare prefetch slots).
        l.finished(2, 2);
        l.finished(3, 3);
        assert_eq!(l.take_run(), None);
        assert_eq!(l.excess(), none);
        // A third would take a slot a new delivery needs to start: the
        // oldest goes on its own, the others still wait for 1.
        l.finished(4, 4);
        assert_eq!(l.take_run(), None);
        assert_eq!(l.excess(), vec![2]);
        assert_eq!(l.excess(), none);
        // 1 done: one multiple-ack on 4 settles 1, 3 and 4 (2 is no longer
        // outstanding, so the broker skips it).
        l.finished(1, 1);
        assert_eq!(l.take_run(), Some((4, 3)));
        // No spare slots (prefetch <= concurrency): nothing waits.
        let mut l = Ledger::new(0);
        l.delivered(1);
        l.delivered(2);
        l.finished(2, 2);
        assert_eq!(l.excess(), vec![2]);
    }

    #[test]
    fn a_tag_is_acked_once_even_after_a_flush() {
        let mut l = ledger(&[1, 2, 3]);
        l.finished(2, 2);
        assert_eq!(l.deferred(), vec![2]);
        // 2 was acked on its own: no run names it again.
        l.finished(1, 1);
        assert_eq!(l.take_run(), Some((1, 1)));
        l.finished(3, 3);
        assert_eq!(l.take_run(), Some((3, 1)));
    }

    /// A throwaway queue on the test broker holding one-byte messages
    /// `1..=n`, consumed on a channel of its own whose acks an [`AckBook`]
    /// with `spare` slots keeps.
    struct RealQueue {
        conn: lapin::Connection,
        setup: lapin::Channel,
        queue: String,
        ch: lapin::Channel,
        consumer: lapin::Consumer,
        book: std::sync::Arc<super::AckBook>,
    }

    impl RealQueue {
        async fn new(n: u8, spare: usize, flush_after: std::time::Duration) -> Self {
            use lapin::options::{
                BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
            };
            use lapin::types::FieldTable;
            use lapin::BasicProperties;

            let conn = warren::testing::connect().await;
            let queue = format!("warren.test.acks.{}", uuid::Uuid::new_v4().simple());
            let setup = conn.create_channel().await.expect("channel");
            setup
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("declare");
            for i in 1..=n {
                setup
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &[i],
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish");
            }
            let ch = conn.create_channel().await.expect("channel");
            ch.basic_qos(10, BasicQosOptions::default())
                .await
                .expect("qos");
            let consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    "acks-test".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("consume");
            let book = super::AckBook::flushing_after(ch.clone(), spare, flush_after);
            Self {
                conn,
                setup,
                queue,
                ch,
                consumer,
                book,
            }
        }

        /// The next delivery, recorded in the book.
        async fn next(&mut self) -> lapin::message::Delivery {
            use futures_util::StreamExt;
            let d = tokio::time::timeout(std::time::Duration::from_secs(10), self.consumer.next())
                .await
                .expect("a delivery within 10 s")
                .expect("consumer open")
                .expect("delivery");
            self.book.delivered(d.delivery_tag);
            d
        }

        /// The next `n` deliveries, in order.
        async fn take(&mut self, n: usize) -> Vec<lapin::message::Delivery> {
            let mut d = Vec::with_capacity(n);
            for _ in 0..n {
                d.push(self.next().await);
            }
            d
        }

        /// Send what the book holds, then check that the channel survived
        /// every frame (no tag acked twice, none unknown) and that nothing
        /// came back to the queue when it closed.
        async fn finish(self) {
            use lapin::options::{BasicQosOptions, QueueDeleteOptions};

            self.book.flush().await;
            // A synchronous round trip on the channel: it is still open.
            self.ch
                .basic_qos(10, BasicQosOptions::default())
                .await
                .expect("the channel survived every ack");
            self.ch.close(200, "done".into()).await.expect("close");
            assert_eq!(
                warren::testing::queue_len(&self.conn, &self.queue).await,
                0,
                "every delivery acked exactly once"
            );
            let _ = self
                .setup
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = self.conn.close(200, "done".into()).await;
        }
    }

    /// On a real broker: deliveries finish out of order, one is requeued in
    /// the middle of a run. A multiple-ack that swallowed the nack would
    /// settle the requeued delivery (it would never come back) and the late
    /// nack of an unknown tag would close the channel; a tag acked twice
    /// would close it too. So: the requeued task comes back exactly once, the
    /// channel stays open, and nothing is left in the queue.
    #[tokio::test]
    async fn out_of_order_acks_and_a_requeue_on_a_real_channel() {
        let mut q = RealQueue::new(5, 8, super::FLUSH_AFTER).await;
        let d = q.take(5).await;
        let body = |i: usize| d[i].data[0];
        assert_eq!(
            (1..=5).map(|i| body(i - 1)).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        // 4 and 5 finish first, then 1 and 2; 3 is given back last.
        for i in [3, 4, 0, 1] {
            assert!(q.book.ack(d[i].delivery_tag, d[i].acker.clone()));
        }
        assert!(q.book.requeue(d[2].delivery_tag, d[2].acker.clone()).await);
        let again = q.next().await;
        assert_eq!(again.data, vec![3], "the requeued task comes back");
        assert!(again.redelivered);
        assert!(q.book.ack(again.delivery_tag, again.acker.clone()));
        q.finish().await;
    }

    /// On a real broker: a slow delivery holds back more finished ones than
    /// the spare slots, so the oldest excess one is acked on its own; when
    /// the slow one finishes, one multiple-ack settles it and the rest,
    /// reaching over the tag already acked. The channel stays open (no tag
    /// acked twice, none unknown) and nothing is left in the queue.
    #[tokio::test]
    async fn an_excess_ack_then_a_multiple_ack_over_it_on_a_real_channel() {
        use std::time::Duration;

        // One spare slot; the deferral never fires here, or it would ack 3
        // on its own too before the check below saw it held (a race the
        // test lost on a loaded CI machine).
        let mut q = RealQueue::new(4, 1, Duration::from_secs(3600)).await;
        let d = q.take(4).await;
        // 1 is slow; 2 and 3 finish: one more than the spare slot.
        assert!(q.book.ack(d[1].delivery_tag, d[1].acker.clone()));
        assert!(q.book.ack(d[2].delivery_tag, d[2].acker.clone()));
        let tag2 = d[1].delivery_tag;
        let book = q.book.clone();
        warren::testing::eventually(Duration::from_secs(10), "2 acked on its own", || {
            let ready = book.ledger().ready.keys().copied().collect::<Vec<_>>();
            let left = ready == vec![d[2].delivery_tag] && !ready.contains(&tag2);
            async move { left.then_some(()) }
        })
        .await;
        // 1 finishes: a multiple-ack on 3 covers 1 and 3, and 2 (acked).
        assert!(q.book.ack(d[0].delivery_tag, d[0].acker.clone()));
        assert!(q.book.ack(d[3].delivery_tag, d[3].acker.clone()));
        q.finish().await;
    }
}
