//! Sending a wake-up's ticks: in transactions with the record of the
//! cursors they moved (classic queues), or with confirms (quorum queues, and
//! a transaction that failed); a tick the broker did not take is retried
//! within its grace, then counted as missed.

use std::collections::VecDeque;
use std::time::Duration;

use backon::BackoffBuilder;
use chrono::Utc;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use warren::amqp::{Batch, Pending, Publisher, Returned, Transaction};
use warren::config::QueueType;

use super::{Chunk, Fenced, Term, Tick};
use crate::metrics::Source;
use crate::schedule::ON_TIME;
use crate::state::{self, Record};

/// Ticks in flight at once (unconfirmed) when a wake-up's ticks go out with
/// confirms: on quorum queues, or again after their transaction failed.
const FIRE_WINDOW: usize = 1024;

/// Most ticks in one transaction: a wake-up with more commits them in
/// several, each with the record of its own schedules, so that the first
/// ticks reach their queues while the later ones are sent, and no commit
/// (a catch-up after a failover) comes near the confirm timeout.
pub(super) const TX_TICKS: usize = 256;

/// Transactions committing at once: the broker routes one while the next
/// is sent, and the first ticks reach their queues before the last are
/// written.
const TX_CHANNELS: usize = 4;

/// How long before an instant its ticks are staged: published into their
/// transactions ahead, so that at the instant only the commits go out and
/// the producer's work and the broker's parsing and routing of each tick
/// are done. Nothing is visible before its commit.
pub(super) const STAGE_LEAD: Duration = Duration::from_millis(200);

/// Transactions staged at once for one instant (then committed together).
const STAGE_CHANNELS: usize = 16;

/// A tick as it goes out: exchange, routing key, properties, body.
type Message = (String, String, lapin::BasicProperties, Vec<u8>);

/// A chunk's ticks that could not be built (by their index), e.g. a
/// signing key that fails.
type Unsent = Vec<(usize, warren::Error)>;

/// What became of one chunk: its unsent ticks and its commit.
type ChunkOutcome = (Unsent, Result<Vec<Returned>, warren::Error>);

impl Term<'_> {
    /// Commit each chunk's ticks and record in one transaction, up to
    /// [`TX_CHANNELS`] commits in flight, and count each tick the broker
    /// took; a tick it returned (no queue bound) goes to
    /// [`Term::fire_again`], which counts it missed. When a commit itself
    /// fails, which of its ticks the broker took is unknown: they go out
    /// again with confirms, so a tick is never lost, though one may then
    /// arrive twice under its id.
    ///
    /// With `hold`, the ticks are due at that moment, not yet: up to
    /// [`STAGE_CHANNELS`] transactions are staged now and committed then.
    pub(super) async fn fire_all(
        &mut self,
        chunks: &[Chunk],
        hold: Option<tokio::time::Instant>,
    ) -> Result<(), Fenced> {
        let chunks: Vec<&Chunk> = chunks
            .iter()
            .filter(|c| !c.ticks.is_empty() || !c.record.is_empty())
            .collect();
        if chunks.is_empty() {
            return Ok(());
        }
        if !self.fence.holds() {
            return Err(Fenced);
        }
        if !self.transactional() {
            for c in chunks {
                self.fire_confirmed(&c.ticks, &c.record).await?;
            }
            return Ok(());
        }
        let bodies: Vec<Option<Vec<u8>>> = chunks
            .iter()
            .map(|c| {
                (!c.record.is_empty()).then(|| serde_json::to_vec(&c.record).unwrap_or_default())
            })
            .collect();
        self.logged_bytes += bodies.iter().flatten().map(Vec::len).sum::<usize>();
        let width = if hold.is_some() {
            STAGE_CHANNELS
        } else {
            TX_CHANNELS
        };
        let width = chunks.len().min(width);
        if let Err(e) = self.open_channels(width).await {
            tracing::warn!(error = %e, "could not open the ticks' transaction channel");
            if let Some(at) = hold {
                tokio::time::sleep_until(at).await;
            }
            for c in chunks {
                self.fire_confirmed(&c.ticks, &c.record).await?;
            }
            return Ok(());
        }
        let results = self.commit_chunks(&chunks, &bodies, width, hold).await?;
        for ((chunk, body), (unsent, committed)) in chunks.iter().zip(&bodies).zip(results) {
            self.settle(chunk, body.is_some(), unsent, committed)
                .await?;
        }
        Ok(())
    }

    /// Whether ticks go out in transactions. Not on quorum queues: RabbitMQ
    /// 3.10 drops a transaction's messages that a quorum queue refuses
    /// (`reject-publish` at its length limit) and still answers
    /// `tx.commit-ok` (measured), where a classic queue fails the commit
    /// and a confirm would be a nack. There ticks go out with confirms.
    pub(super) fn transactional(&self) -> bool {
        self.ctx.topo().queue_type() == QueueType::Classic
    }

    /// Keep `n` transaction channels open (one replaced after a failed
    /// commit).
    async fn open_channels(&mut self, n: usize) -> Result<(), warren::Error> {
        for i in 0..n {
            if self.txs.get(i).is_some_and(Transaction::is_open) {
                continue;
            }
            let tx = Transaction::new(self.conn, self.ctx.cfg().amqp.confirm_timeout).await?;
            if i < self.txs.len() {
                let old = std::mem::replace(&mut self.txs[i], tx);
                old.close().await;
            } else {
                self.txs.push(tx);
            }
        }
        Ok(())
    }

    /// Stage and commit every chunk, chunk `i` on channel `i % width`, no
    /// commit before `hold`: each chunk's ticks that could not be built,
    /// and its commit's outcome.
    async fn commit_chunks(
        &self,
        chunks: &[&Chunk],
        bodies: &[Option<Vec<u8>>],
        width: usize,
        hold: Option<tokio::time::Instant>,
    ) -> Result<Vec<ChunkOutcome>, Fenced> {
        let sealed = self.publisher.clone().sealed(self.ctx.link().seal());
        let n = width.min(self.txs.len()).max(1);
        let fence = &self.fence;
        let mut results = Vec::with_capacity(chunks.len());
        let mut in_flight = FuturesOrdered::new();
        let mut staged = 0;
        loop {
            while in_flight.len() < n && staged < chunks.len() {
                let Some(tx) = self.txs.get(staged % n) else {
                    return Err(Fenced);
                };
                let (batch, unsent) =
                    self.stage(tx, &sealed, chunks[staged], bodies[staged].as_deref())?;
                in_flight.push_back(async move {
                    if let Some(at) = hold {
                        tokio::time::sleep_until(at).await;
                        // Dropped uncommitted, a staged batch fires nothing.
                        if !fence.holds() {
                            return None;
                        }
                    }
                    let committed = match batch {
                        Ok(b) => b.commit().await,
                        Err(e) => Err(e),
                    };
                    Some((unsent, committed))
                });
                staged += 1;
                // Send this commit now (once its frames are written), not
                // after the next chunk is staged.
                if let Some(Some(r)) = in_flight.next().now_or_never() {
                    results.push(r.ok_or(Fenced)?);
                }
            }
            match in_flight.next().await {
                Some(r) => results.push(r.ok_or(Fenced)?),
                None => return Ok(results),
            }
        }
    }

    /// Queue one chunk's ticks and record on `tx`.
    fn stage<'t>(
        &self,
        tx: &'t Transaction,
        sealed: &Publisher,
        chunk: &Chunk,
        record: Option<&[u8]>,
    ) -> Result<(Result<Batch<'t>, warren::Error>, Unsent), Fenced> {
        let mut batch = tx.batch();
        let mut unsent = Vec::new();
        for (i, t) in chunk.ticks.iter().enumerate() {
            // A batch dropped here is never committed: nothing of it fires.
            if i % 256 == 255 && !self.fence.holds() {
                return Err(Fenced);
            }
            let sent = self
                .tick_message(sealed, t)
                .and_then(|(ex, key, props, body)| batch.publish(&ex, &key, props, &body));
            if let Err(e) = sent {
                unsent.push((i, e));
            }
        }
        if let Some(body) = record {
            if let Err(e) = batch.publish("", &self.log, state::properties(), body) {
                return Ok((Err(e), unsent));
            }
        }
        if !self.fence.holds() {
            return Err(Fenced);
        }
        crate::scheduler::fault::commit();
        Ok((Ok(batch), unsent))
    }

    /// Count a committed chunk's ticks as fired, or hand them on.
    async fn settle(
        &mut self,
        chunk: &Chunk,
        recorded: bool,
        unsent: Unsent,
        committed: Result<Vec<Returned>, warren::Error>,
    ) -> Result<(), Fenced> {
        let ticks = &chunk.ticks;
        let mut returned = match committed {
            Ok(returned) => returned,
            Err(e) => {
                if !self.publisher.is_open() || !self.fence.holds() {
                    return Err(Fenced);
                }
                tracing::warn!(error = %e, ticks = ticks.len(), "a wake-up's ticks were not committed: sending them again with confirms (one the broker took arrives twice, under its id)");
                return self.fire_confirmed(ticks, &chunk.record).await;
            }
        };
        if recorded {
            if returned.iter().any(|r| r.routing_key == self.log) {
                tracing::warn!(log = %self.log, "could not record the scheduler state: the log was returned unroutable");
            } else {
                self.unsnapshotted += 1;
            }
        }
        let mut unsent = unsent.into_iter().peekable();
        for (i, t) in ticks.iter().enumerate() {
            if unsent.peek().is_some_and(|(j, _)| *j == i) {
                if let Some((_, e)) = unsent.next() {
                    self.fire_again(t, e).await?;
                }
                continue;
            }
            let back = returned
                .iter()
                .position(|r| r.message_id.as_deref() == Some(t.id.as_str()));
            match back.map(|k| returned.swap_remove(k)) {
                None => self.fired(t),
                Some(r) => {
                    let e = warren::Error::Unroutable {
                        exchange: r.exchange,
                        routing_key: r.routing_key,
                        reply: r.reply,
                    };
                    self.fire_again(t, e).await?;
                }
            }
        }
        Ok(())
    }

    /// Publish `ticks` pipelined with confirms, then `record` behind them;
    /// count each confirmed tick, retry a failed one on its own within its
    /// grace. The way out when a transaction cannot be used.
    async fn fire_confirmed(&mut self, ticks: &[Tick], record: &Record) -> Result<(), Fenced> {
        if !self.fence.holds() {
            return Err(Fenced);
        }
        let mut outcomes: Vec<Option<warren::Error>> = Vec::with_capacity(ticks.len());
        let mut in_flight: VecDeque<(usize, Pending)> = VecDeque::new();
        let sealed = self.publisher.clone().sealed(self.ctx.link().seal());
        for (i, t) in ticks.iter().enumerate() {
            if i % 256 == 255 && !self.fence.holds() {
                return Err(Fenced);
            }
            outcomes.push(None);
            match self.send_tick(&sealed, t).await {
                Ok(p) => in_flight.push_back((i, p)),
                Err(e) => outcomes[i] = Some(e),
            }
            if in_flight.len() >= FIRE_WINDOW {
                if let Some((j, p)) = in_flight.pop_front() {
                    outcomes[j] = p.confirmed().await.err();
                }
            }
        }
        let logged = if record.is_empty() {
            None
        } else {
            Some(self.append(record).await)
        };
        for (j, p) in in_flight {
            outcomes[j] = p.confirmed().await.err();
        }
        if let Some(logged) = logged {
            let confirmed = match logged {
                Ok(p) => p.confirmed().await,
                Err(e) => Err(e),
            };
            match confirmed {
                Ok(()) => self.unsnapshotted += 1,
                Err(e) => {
                    tracing::warn!(error = %e, "could not record the scheduler state");
                    if !self.publisher.is_open() || !self.fence.holds() {
                        return Err(Fenced);
                    }
                }
            }
        }
        for (t, failed) in ticks.iter().zip(outcomes) {
            match failed {
                None => self.fired(t),
                Some(e) => self.fire_again(t, e).await?,
            }
        }
        Ok(())
    }

    /// What `t` goes out as: a task, or for a workflow schedule the start
    /// of a run whose id is the fire id.
    fn tick_message(&self, sealed: &Publisher, t: &Tick) -> Result<Message, warren::Error> {
        let s = &t.schedule;
        let id = t.id.clone();
        let (props, body, exchange, key) = match &s.cfg.workflow {
            Some(w) => {
                let input: serde_json::Value =
                    serde_json::from_slice(&s.payload).unwrap_or_default();
                let (p, b) = crate::workflow::start_message(w, &input, &id, None);
                let ex = self.ctx.topo().workflows_exchange();
                (p, b, ex, warren::workflow::START.to_owned())
            }
            None => {
                // Staged ahead, a tick is published when its commit makes
                // it visible: at its instant.
                let stamp = Utc::now().max(t.at);
                let mut task = s.task(id);
                task.timestamp = Some(stamp.timestamp().max(0) as u64);
                let (exchange, key) = self.ctx.topo().route(&task.name, Duration::ZERO);
                let (p, b) = sealed.wire_at(&task, stamp)?;
                (p, b.into_owned(), exchange, key)
            }
        };
        let props = props.with_app_id(self.ctx.instance().into());
        Ok((exchange, key, props, body))
    }

    async fn send_tick(&self, sealed: &Publisher, t: &Tick) -> Result<Pending, warren::Error> {
        let (exchange, key, props, body) = self.tick_message(sealed, t)?;
        self.publisher.send(&exchange, &key, props, &body).await
    }

    fn fired(&self, t: &Tick) {
        let name = t.schedule.name();
        let lag = (Utc::now() - t.at).to_std().unwrap_or(Duration::ZERO);
        let m = self.ctx.metrics();
        m.fired(name, t.at, lag.as_secs_f64());
        m.published
            .with_label_values(&[Source::Schedule.label()])
            .inc();
        self.ctx.timetable().set_last(name, t.at);
        let id = &t.id;
        // A workflow schedule starts a run, not a task.
        let recorder = self.ctx.task_events().recorder();
        if recorder.enabled() && t.schedule.cfg.workflow.is_none() {
            recorder.record(warren::events::Event::new(
                id,
                &t.schedule.cfg.task,
                warren::events::What::Published {
                    source: warren::events::Source::Schedule,
                },
            ));
        }
        tracing::debug!(schedule = name, %id, lag_ms = lag.as_millis() as u64, "fired");
    }

    /// A tick the broker did not confirm: publish it again, alone, with
    /// backoff, until its misfire grace runs out (then it counts as missed).
    async fn fire_again(&self, t: &Tick, mut error: warren::Error) -> Result<(), Fenced> {
        let s = &t.schedule;
        let id = &t.id;
        let grace =
            chrono::TimeDelta::from_std(s.cfg.misfire_grace.max(ON_TIME)).unwrap_or_default();
        let deadline = t.at + grace;
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            self.ctx
                .metrics()
                .publish_failures
                .with_label_values(&[Source::Schedule.label()])
                .inc();
            if !self.publisher.is_open() || !self.fence.holds() {
                tracing::warn!(schedule = s.name(), %id, error = %error, "tick publish failed on the lock connection: stepping down");
                self.fence.step_down();
                return Err(Fenced);
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(5));
            let retry_at = Utc::now() + chrono::TimeDelta::from_std(delay).unwrap_or_default();
            if !error.is_transient() || retry_at > deadline {
                tracing::error!(schedule = s.name(), %id, error = %error, "tick not published: counted as missed");
                self.ctx.metrics().missed(s.name(), 1);
                return Ok(());
            }
            tracing::warn!(schedule = s.name(), %id, error = %error, retry_in_ms = delay.as_millis() as u64, "tick publish failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.fence.lost() => return Err(Fenced),
            }
            if !self.fence.holds() {
                return Err(Fenced);
            }
            let sealed = self.publisher.clone().sealed(self.ctx.link().seal());
            let sent = async { self.send_tick(&sealed, t).await?.confirmed().await };
            match sent.await {
                Ok(()) => {
                    self.fired(t);
                    return Ok(());
                }
                Err(e) => error = e,
            }
        }
    }
}
