//! The scheduler: the election loop (candidate → leader → candidate) and, while
//! leading, the fire loop that sleeps until the next instant, applies the
//! misfire plan, publishes each tick with a confirm on the lock connection and
//! records the cursors in the state queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use lapin::options::BasicAckOptions;
use lapin::Connection;
use tokio_util::sync::CancellationToken;
use warren::amqp::Publisher;

use crate::config::{Schedule, ScheduleSet};
use crate::connection::connect_retry;
use crate::context::Ctx;
use crate::control;
use crate::leader::{self, Attempt, Fence};
use crate::metrics::Source;
use crate::schedule::{self, plan, ON_TIME};
use crate::scheduler::clock::{Sample, Step, Track};
use crate::state::{self, Entry, Snapshot};

mod clock;

/// Longest single sleep: guards against wall-clock jumps (NTP steps) while
/// sleeping on the monotonic clock. Not a polling loop: a wake-up with
/// nothing due just sleeps again.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// Most overdue instants enumerated per schedule per wake-up.
const MAX_DUE: usize = 100_000;

/// Run the election loop until shutdown.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let lock_queue = leader::lock_queue(ctx.topo().prefix());
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let Some(conn) = connect_retry(&ctx, "producer-lock", &shutdown).await else {
            return;
        };
        let conn = Arc::new(conn);
        match candidate(&ctx, &conn, &lock_queue, &shutdown).await {
            Ok(true) => {
                let stall = ctx
                    .cfg()
                    .leader
                    .stall_threshold
                    .unwrap_or(ctx.cfg().amqp.heartbeat);
                let fence = Fence::start(conn.clone(), stall, &shutdown);
                tracing::info!(instance = %ctx.instance(), "elected leader: this replica fires the schedules");
                ctx.set_leader(true);
                let term = std::panic::AssertUnwindSafe(lead(&ctx, &conn, &fence, &shutdown));
                let res = term.catch_unwind().await;
                fence.step_down();
                ctx.set_leader(false);
                let res = match res {
                    Ok(res) => res,
                    Err(panic) => abandon_leadership(&conn, panic_text(&panic).to_owned()).await,
                };
                match res {
                    Ok(()) if shutdown.is_cancelled() => {}
                    Ok(()) => tracing::warn!("lost leadership; rejoining as a candidate"),
                    Err(e) if crate::connection::is_permanent(&e) => {
                        crate::connection::give_up(&ctx, &shutdown, "cannot lead", &e);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "leader term ended with an error; rejoining as a candidate")
                    }
                }
            }
            Ok(false) => {}
            Err(e) if crate::connection::is_permanent(&e) => {
                crate::connection::give_up(&ctx, &shutdown, "cannot take part in the election", &e);
            }
            Err(e) => tracing::warn!(error = %e, "lock connection failed; reconnecting"),
        }
        // The lock dies with this connection: never reuse it.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "producer leaving the election".into()),
        )
        .await;
    }
}

/// The leader term panicked outside the per-schedule guard: its state is
/// unknown, so release the lock (close its connection) for a standby and
/// exit non-zero so the supervisor restarts this replica, instead of
/// holding the lock with no fire loop behind it.
async fn abandon_leadership(conn: &Connection, panic: String) -> ! {
    tracing::error!(
        panic,
        "the scheduler panicked: releasing the leader lock and exiting (status 1) so that a standby takes over"
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        conn.close(200, "producer scheduler failed".into()),
    )
    .await;
    // The log writer is a thread: what it still holds dies with an exit.
    warren::telemetry::flush();
    std::process::exit(1)
}

/// Wait until this connection holds the lock (`Ok(true)`), shutdown
/// (`Ok(false)`), or the connection fails.
async fn candidate(
    ctx: &Ctx,
    conn: &Connection,
    lock_queue: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    if !ctx.cfg().leader.enabled {
        return Ok(true);
    }
    let mut logged = false;
    loop {
        match leader::try_acquire(conn, lock_queue).await? {
            Attempt::Acquired => return Ok(true),
            Attempt::HeldElsewhere => {
                if !logged {
                    tracing::info!("standby: another replica holds the scheduler lock");
                    logged = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(ctx.cfg().leader.retry_interval) => {}
        }
    }
}

/// Per-schedule state of the fire loop.
struct Cursor {
    /// Which instants are still to be decided.
    track: Track,
    last_fired: Option<DateTime<Utc>>,
    /// The expression it was computed for (a changed expression restarts at now).
    key: String,
}

fn spec_key(s: &Schedule) -> String {
    format!(
        "{}|{}|{:?}|{:?}",
        s.cfg.cron, s.cfg.timezone, s.cfg.dst_gap, s.cfg.dst_overlap
    )
}

fn set_cursor(
    cursors: &mut HashMap<String, Cursor>,
    name: &str,
    cursor: DateTime<Utc>,
    last_fired: Option<DateTime<Utc>>,
) {
    if let Some(c) = cursors.get_mut(name) {
        c.track.advance(cursor);
        c.last_fired = last_fired;
    }
}

fn snapshot(ctx: &Ctx, cursors: &HashMap<String, Cursor>) -> Snapshot {
    Snapshot {
        v: 1,
        writer: ctx.instance().to_owned(),
        written_at: Some(Utc::now()),
        schedules: cursors
            .iter()
            .map(|(k, c)| {
                (
                    k.clone(),
                    Entry {
                        // After a backward clock step the cursor sits below
                        // instants already fired: a successor must not
                        // fire those again.
                        cursor: c.track.high_water(),
                        last_fired: c.last_fired,
                    },
                )
            })
            .collect(),
        paused: ctx.paused(),
    }
}

/// What one wake-up decided for one schedule.
struct TickPlan {
    plan: schedule::Plan,
    /// The latest due instant: the cursor moves there.
    latest: DateTime<Utc>,
}

/// The overdue instants of one schedule at `now` and the misfire plan for
/// them; `None` when nothing is due. Pure schedule math, no I/O.
fn plan_tick(s: &Schedule, track: &Track, now: DateTime<Utc>) -> Option<TickPlan> {
    #[cfg(feature = "fault-injection")]
    fault::maybe_panic(s.name());
    if track.next(&s.spec)? > now {
        return None;
    }
    // Overdue instants older than grace can never fire: count them
    // without listing them all.
    let horizon = s.cfg.misfire_grace.max(ON_TIME) + Duration::from_secs(1);
    let window_start = now - chrono::TimeDelta::from_std(horizon).unwrap_or_default();
    let mut earlier = 0u64;
    let mut from = track.cursor;
    if from < window_start {
        earlier = s
            .spec
            .fires_between(from, window_start, 10_000)
            .into_iter()
            .filter(|t| !track.skips(*t))
            .count() as u64;
        from = window_start;
    }
    let mut due = s.spec.fires_between(from, now, MAX_DUE);
    let latest = *due.last()?;
    due.retain(|t| !track.skips(*t));
    let plan = plan(
        s.cfg.misfire,
        s.cfg.misfire_grace,
        s.cfg.max_catch_up,
        &due,
        earlier,
        now,
    );
    Some(TickPlan { plan, latest })
}

/// `plan_tick`, surviving a panic in it: a bug in the schedule math of one
/// schedule must not stop the others (nor take the leader lock down with
/// the task). The instants due now count as missed, and the cursor moves
/// on, so a panic costs one wake-up of one schedule, loudly.
fn plan_tick_guarded(
    ctx: &Ctx,
    s: &Schedule,
    track: &Track,
    now: DateTime<Utc>,
) -> Result<Option<TickPlan>, ()> {
    let run = std::panic::AssertUnwindSafe(|| plan_tick(s, track, now));
    std::panic::catch_unwind(run).map_err(|panic| {
        tracing::error!(
            schedule = s.name(),
            panic = panic_text(&panic),
            "schedule computation panicked: this tick is counted as missed; the other schedules go on"
        );
        ctx.metrics().missed.with_label_values(&[s.name()]).inc();
    })
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Test-only faults, compiled in with the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
mod fault {
    /// Panic in the schedule math of the schedule named by
    /// `WARREN_FAULT_PANIC_SCHEDULE`.
    pub fn maybe_panic(schedule: &str) {
        if std::env::var("WARREN_FAULT_PANIC_SCHEDULE").is_ok_and(|n| n == schedule) {
            panic!("injected fault: WARREN_FAULT_PANIC_SCHEDULE={schedule}");
        }
    }

    /// Panic in the leader term (outside the per-schedule guard) when
    /// `WARREN_FAULT_PANIC_TERM` is set.
    pub fn maybe_panic_term() {
        if std::env::var_os("WARREN_FAULT_PANIC_TERM").is_some() {
            panic!("injected fault: WARREN_FAULT_PANIC_TERM");
        }
    }
}

enum FireOutcome {
    Published,
    Missed,
    Fenced,
}

async fn lead(
    ctx: &Ctx,
    conn: &Connection,
    fence: &Fence,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    warren::topology::declare(conn, ctx.topo()).await?;
    let state_queue = state::state_queue(ctx.topo().prefix());
    state::declare(conn, &state_queue, ctx.topo().queue_type()).await?;
    control::declare(conn, ctx.topo().prefix(), ctx.topo().queue_type()).await?;
    let publisher = Publisher::new(conn, ctx.cfg().amqp.confirm_timeout).await?;
    // The workflow coordinator shares the term: it stops with the fire
    // loop, and a coordinator failure ends the term (step down, start over).
    let term_over = shutdown.child_token();
    let fire_loop = async {
        let r = lead_term(ctx, conn, fence, shutdown, &publisher, &state_queue).await;
        term_over.cancel();
        r
    };
    let coordinator = async {
        let r = crate::workflow::coordinator::run(ctx, conn, fence, &term_over).await;
        if let Err(e) = &r {
            tracing::warn!(error = %e, "workflow coordinator failed: stepping down");
            fence.step_down();
        }
        r
    };
    let (res, wf) = tokio::join!(fire_loop, coordinator);
    let res = res.and(wf);
    // Close the tick channel before the caller closes the connection: a
    // channel dropped while its connection closes makes lapin log an error.
    if publisher.is_open() {
        let _ = publisher
            .channel()
            .close(200, "leader term over".into())
            .await;
    }
    res
}

async fn lead_term(
    ctx: &Ctx,
    conn: &Connection,
    fence: &Fence,
    shutdown: &CancellationToken,
    publisher: &Publisher,
    state_queue: &str,
) -> anyhow::Result<()> {
    let previous = state::read(conn, state_queue).await?;
    if !previous.schedules.is_empty() {
        tracing::info!(
            writer = %previous.writer,
            schedules = previous.schedules.len(),
            "resuming from the previous leader's state"
        );
    }
    ctx.set_paused(previous.paused.clone());
    // Consumed only while leading: requests wait in the queue (or expire)
    // while no replica leads.
    let (_control_channel, mut control) = control::serve(conn, ctx.topo().prefix()).await?;
    announce(ctx, publisher, None, None).await;
    let mut rx = ctx.subscribe_schedules();
    let mut cursors: HashMap<String, Cursor> = HashMap::new();
    let mut sample = Sample::now();
    for (name, e) in &previous.schedules {
        cursors.insert(
            name.clone(),
            Cursor {
                track: Track::resumed(e.cursor, sample.wall),
                last_fired: e.last_fired,
                key: String::new(),
            },
        );
    }
    let mut first = true;
    loop {
        let set: ScheduleSet = rx.borrow_and_update().clone();
        let now = observe_clock(&mut sample, &mut cursors);
        // Align cursors with the schedules in force.
        cursors.retain(|name, _| set.iter().any(|s| s.name() == name && s.cfg.enabled));
        for s in set.iter().filter(|s| s.cfg.enabled) {
            let key = spec_key(s);
            match cursors.get_mut(s.name()) {
                Some(c) if first && c.key.is_empty() => c.key = key,
                Some(c) if c.key != key => {
                    c.track.advance(now);
                    c.key = key;
                }
                Some(_) => {}
                None => {
                    cursors.insert(
                        s.name().to_owned(),
                        Cursor {
                            track: Track::fresh(now),
                            last_fired: None,
                            key,
                        },
                    );
                }
            }
        }
        first = false;
        // Next instant per schedule.
        let mut wake: Option<DateTime<Utc>> = None;
        for s in set.iter().filter(|s| s.cfg.enabled) {
            let Some(c) = cursors.get(s.name()) else {
                continue;
            };
            if ctx.is_paused(s.name()) {
                ctx.set_next(s.name(), None);
                continue;
            }
            // A panic here is reported by `plan_tick_guarded` on the next wake.
            let next =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.track.next(&s.spec)))
                    .unwrap_or_default();
            ctx.set_next(s.name(), next);
            if let Some(n) = next {
                wake = Some(wake.map_or(n, |w| w.min(n)));
            }
        }
        let sleep = wake
            .map(|w| (w - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            r = rx.changed() => {
                if r.is_err() { return Ok(()); }
                tracing::info!("schedules reloaded");
                continue;
            }
            r = control::next::<control::Request>(&mut control) => {
                let Some((delivery, req)) = r else {
                    anyhow::bail!("the control queue consumer ended");
                };
                if let Some(req) = req {
                    let now = observe_clock(&mut sample, &mut cursors);
                    if !apply_control(ctx, fence, publisher, state_queue, &set, &mut cursors, req, now).await {
                        return Ok(());
                    }
                }
                delivery.acker.ack(BasicAckOptions::default()).await?;
                continue;
            }
            _ = fence.lost() => return Ok(()),
            _ = shutdown.cancelled() => return Ok(()),
        }
        #[cfg(feature = "fault-injection")]
        fault::maybe_panic_term();
        let now = observe_clock(&mut sample, &mut cursors);
        // Whether some cursor moved past what the last snapshot sent says.
        let mut dirty = false;
        for s in set.iter().filter(|s| s.cfg.enabled) {
            let Some(c) = cursors.get_mut(s.name()) else {
                continue;
            };
            if ctx.is_paused(s.name()) {
                continue;
            }
            let last_fired_before = c.last_fired;
            let tick = match plan_tick_guarded(ctx, s, &c.track, now) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(()) => {
                    c.track.advance(now);
                    dirty = true;
                    continue;
                }
            };
            let (p, latest) = (tick.plan, tick.latest);
            let mut last_fired = last_fired_before;
            if p.missed > 0 {
                tracing::warn!(
                    schedule = s.name(),
                    missed = p.missed,
                    firing = p.fire.len(),
                    policy = ?s.cfg.misfire,
                    "overdue fires handled by the misfire policy"
                );
                ctx.metrics()
                    .missed
                    .with_label_values(&[s.name()])
                    .inc_by(p.missed);
            }
            let fired_latest = p.fire.last() == Some(&latest);
            for t in p.fire {
                // The snapshot as it will be once this tick is confirmed,
                // pipelined right behind the tick, so that a crash can hardly
                // fall between the two (a new leader would re-fire the tick,
                // under the same id).
                set_cursor(&mut cursors, s.name(), t, Some(t));
                let snap = snapshot(ctx, &cursors);
                match fire(ctx, publisher, fence, s, t, state_queue, &snap).await {
                    FireOutcome::Published => last_fired = Some(t),
                    FireOutcome::Missed => dirty = true,
                    FireOutcome::Fenced => return Ok(()),
                }
                set_cursor(&mut cursors, s.name(), t, last_fired);
            }
            set_cursor(&mut cursors, s.name(), latest, last_fired);
            dirty = dirty || !fired_latest;
        }
        if dirty {
            let snap = snapshot(ctx, &cursors);
            if !fence.holds() {
                return Ok(());
            }
            if let Err(e) = state::write(publisher, state_queue, &snap).await {
                tracing::warn!(error = %e, "could not record the scheduler state");
                if !publisher.is_open() || !fence.holds() {
                    return Ok(());
                }
            }
        }
    }
}

/// Apply a pause, resume or sync request: record the new paused set in the
/// state snapshot (confirmed) before telling anyone, then announce it. A
/// resumed schedule restarts at `now`: the instants it was paused over are
/// skipped, not caught up. `false` when leadership was lost meanwhile.
#[allow(clippy::too_many_arguments)]
async fn apply_control(
    ctx: &Ctx,
    fence: &Fence,
    publisher: &Publisher,
    state_queue: &str,
    set: &ScheduleSet,
    cursors: &mut HashMap<String, Cursor>,
    req: control::Request,
    now: DateTime<Utc>,
) -> bool {
    let before = ctx.paused();
    let next = match control::apply(&before, &req, |n| set.iter().any(|s| s.name() == n)) {
        Ok(next) => next,
        Err(why) => {
            announce(ctx, publisher, Some(req.id), Some(why)).await;
            return true;
        }
    };
    if next == before {
        announce(ctx, publisher, Some(req.id), None).await;
        return true;
    }
    for resumed in before.difference(&next) {
        if let Some(c) = cursors.get_mut(resumed) {
            c.track.advance(now);
        }
    }
    ctx.set_paused(next);
    if !fence.holds() {
        ctx.set_paused(before);
        return false;
    }
    if let Err(e) = state::write(publisher, state_queue, &snapshot(ctx, cursors)).await {
        tracing::warn!(error = %e, "could not record a pause or resume in the scheduler state");
        ctx.set_paused(before);
        let why = format!("the leader could not record it: {e}");
        announce(ctx, publisher, Some(req.id), Some(why)).await;
        return publisher.is_open() && fence.holds();
    }
    tracing::info!(op = ?req.op, schedule = req.schedule.as_deref().unwrap_or(""), "schedule pause state recorded");
    announce(ctx, publisher, Some(req.id), None).await;
    true
}

/// Tell every replica the paused set (and answer request `answers`).
async fn announce(
    ctx: &Ctx,
    publisher: &Publisher,
    answers: Option<String>,
    error: Option<String>,
) {
    let event = control::Event {
        answers,
        error,
        paused: ctx.paused(),
        leader: ctx.instance().to_owned(),
    };
    // This replica hears its own events too; apply them here as well in case
    // its API connection is down.
    ctx.on_event(event.clone());
    let body = serde_json::to_vec(&event).unwrap_or_default();
    let props = lapin::BasicProperties::default().with_content_type("application/json".into());
    let exchange = control::events_exchange(ctx.topo().prefix());
    if let Err(e) = publisher.publish(&exchange, "", props, &body).await {
        tracing::debug!(error = %e, "producer event not delivered (no replica listening?)");
    }
}

/// Read the clocks; on a wall-clock step apply the rules of [`clock`] and
/// say so. Returns the wall-clock now.
fn observe_clock(sample: &mut Sample, cursors: &mut HashMap<String, Cursor>) -> DateTime<Utc> {
    let now = Sample::now();
    match clock::detect(*sample, now) {
        Step::None => {}
        Step::Backward(d) => {
            tracing::warn!(
                step_ms = d.as_millis() as u64,
                "wall clock stepped back: schedules fire from the new time on; instants already fired are not fired again"
            );
            for c in cursors.values_mut() {
                c.track.stepped_back(now.wall);
            }
        }
        Step::Forward(d) => tracing::warn!(
            step_ms = d.as_millis() as u64,
            "wall clock stepped forward: the instants jumped over are overdue and follow each schedule's misfire policy"
        ),
    }
    *sample = now;
    now.wall
}

/// Publish one tick, retrying transient failures with backoff until the
/// misfire grace runs out. Checks leadership right before every attempt.
async fn fire(
    ctx: &Ctx,
    publisher: &Publisher,
    fence: &Fence,
    s: &Schedule,
    t: DateTime<Utc>,
    state_queue: &str,
    snap: &Snapshot,
) -> FireOutcome {
    let id = schedule::fire_id(s.name(), t);
    let task = s.task(id.clone());
    let trace_id = task
        .trace
        .as_ref()
        .map(|t| t.trace_id_hex())
        .unwrap_or_default();
    let grace = chrono::TimeDelta::from_std(s.cfg.misfire_grace.max(ON_TIME)).unwrap_or_default();
    let deadline = t + grace;
    let (exchange, key) = ctx.topo().route(&task.name, Duration::ZERO);
    let mut backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        if !fence.holds() {
            return FireOutcome::Fenced;
        }
        let sent = async {
            // Signed and encrypted with the keys in force now
            // (`security.*`, reloaded on SIGHUP).
            let (props, body, exchange, key) = match &s.cfg.workflow {
                // A workflow schedule starts a run whose id is the fire id.
                Some(w) => {
                    let input: serde_json::Value =
                        serde_json::from_slice(&s.payload).unwrap_or_default();
                    let (p, b) = crate::workflow::start_message(w, &input, &id, None);
                    let ex = ctx.topo().workflows_exchange();
                    (p, b, ex, warren::workflow::START.to_owned())
                }
                None => {
                    let (p, b) = publisher.clone().sealed(ctx.seal()).wire(&task)?;
                    (p, b.into_owned(), exchange.clone(), key.clone())
                }
            };
            let props = props.with_app_id(ctx.instance().into());
            let tick = publisher.send(&exchange, &key, props, &body).await?;
            let state = state::send(publisher, state_queue, snap).await;
            tick.confirmed().await?;
            Ok::<_, warren::Error>(state)
        };
        match sent.await {
            Ok(state) => {
                match state {
                    Ok(p) => {
                        if let Err(e) = p.confirmed().await {
                            tracing::warn!(error = %e, "could not record the scheduler state");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not record the scheduler state"),
                }
                let lag = (Utc::now() - t).to_std().unwrap_or(Duration::ZERO);
                ctx.metrics().fires.with_label_values(&[s.name()]).inc();
                ctx.metrics()
                    .fire_lag
                    .with_label_values(&[s.name()])
                    .observe(lag.as_secs_f64());
                ctx.metrics()
                    .published
                    .with_label_values(&[Source::Schedule.label()])
                    .inc();
                ctx.metrics()
                    .last_fire
                    .with_label_values(&[s.name()])
                    .set(t.timestamp_millis() as f64 / 1000.0);
                ctx.set_last(s.name(), t);
                tracing::debug!(schedule = s.name(), %id, trace_id = %trace_id, lag_ms = lag.as_millis() as u64, "fired");
                return FireOutcome::Published;
            }
            Err(e) => {
                ctx.metrics()
                    .publish_failures
                    .with_label_values(&[Source::Schedule.label()])
                    .inc();
                if !publisher.is_open() || !fence.holds() {
                    tracing::warn!(schedule = s.name(), %id, trace_id = %trace_id, error = %e, "tick publish failed on the lock connection: stepping down");
                    fence.step_down();
                    return FireOutcome::Fenced;
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                let retry_at = Utc::now() + chrono::TimeDelta::from_std(delay).unwrap_or_default();
                if !e.is_transient() || retry_at > deadline {
                    tracing::error!(schedule = s.name(), %id, trace_id = %trace_id, error = %e, "tick not published: counted as missed");
                    ctx.metrics().missed.with_label_values(&[s.name()]).inc();
                    return FireOutcome::Missed;
                }
                tracing::warn!(schedule = s.name(), %id, trace_id = %trace_id, error = %e, retry_in_ms = delay.as_millis() as u64, "tick publish failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = fence.lost() => return FireOutcome::Fenced,
                }
            }
        }
    }
}
