//! The scheduler: the election loop (candidate → leader → candidate) and, while
//! leading, the fire loop ([`term`]) that sleeps until the next instant on its
//! agenda, applies the misfire plan, publishes the due ticks with confirms on
//! the lock connection and records the cursors ([`crate::state`]).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use lapin::Connection;
use tokio_util::sync::CancellationToken;
use warren::amqp::Publisher;
use warren::topology::producer::{self, Part};

use crate::config::Schedule;
use crate::connection::connect_retry;
use crate::context::Ctx;
use crate::control;
use crate::leader::{self, Attempt, Fence};
use crate::schedule::{self, plan, ON_TIME};
use crate::scheduler::clock::Track;
use crate::scheduler::term::Term;

mod agenda;
mod clock;
mod fault;
mod term;

/// Longest single sleep: guards against wall-clock jumps (NTP steps) while
/// sleeping on the monotonic clock. Not a polling loop: a wake-up with
/// nothing due just sleeps again.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// How long a new leader waits for the API's schedules to be read.
const CATALOG_WAIT: Duration = Duration::from_secs(10);

/// Most overdue instants enumerated per schedule per wake-up.
const MAX_DUE: usize = 100_000;

/// Run the election loop until shutdown.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let lock_queue = producer::lock_queue(ctx.topo().prefix());
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
                ctx.leadership().set(true);
                let term = std::panic::AssertUnwindSafe(lead(&ctx, &conn, &fence, &shutdown));
                let res = term.catch_unwind().await;
                fence.step_down();
                ctx.leadership().set(false);
                let res = match res {
                    Ok(res) => res,
                    Err(panic) => {
                        abandon_leadership(&conn, warren::error::panic_message(&*panic).to_owned())
                            .await
                    }
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

/// What one wake-up decided for one schedule.
struct TickPlan {
    plan: schedule::Plan,
    /// The latest due instant: the cursor moves there.
    latest: DateTime<Utc>,
}

/// The overdue instants of one schedule at `now` and the misfire plan for
/// them; `None` when nothing is due. Pure schedule math, no I/O.
fn plan_tick(s: &Schedule, track: &Track, now: DateTime<Utc>) -> Option<TickPlan> {
    fault::schedule_math(s.name());
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
            panic = warren::error::panic_message(&*panic),
            "schedule computation panicked: this tick is counted as missed; the other schedules go on"
        );
        ctx.metrics().missed(s.name(), 1);
    })
}

async fn lead(
    ctx: &Ctx,
    conn: &Connection,
    fence: &Fence,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    warren::topology::declare(conn, ctx.topo()).await?;
    producer::declare(
        conn,
        ctx.topo(),
        &[Part::Scheduler, Part::Catalog, Part::Control],
    )
    .await?;
    let publisher = Publisher::new(conn, ctx.cfg().amqp.confirm_timeout).await?;
    // The workflow coordinator shares the term: it stops with the fire
    // loop, and a coordinator failure ends the term (step down, start over).
    let term_over = shutdown.child_token();
    let fire_loop = async {
        let r = lead_term(ctx, conn, fence, shutdown, &publisher).await;
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
) -> anyhow::Result<()> {
    // API schedules are part of the book once the catalog is read: a term
    // that started without them would restart their cursors at now. The
    // config file's schedules are not held back for long by it.
    if tokio::time::timeout(CATALOG_WAIT, ctx.timetable().catalog_loaded())
        .await
        .is_err()
    {
        tracing::warn!("the API's schedules are not read yet: firing the config file's; API schedules start when read");
    }
    let term = Term::start(ctx, conn, fence, publisher).await?;
    // Consumed only while leading: requests wait in the queue (or expire)
    // while no replica leads.
    let (_control_channel, mut control) = control::serve(conn, ctx.topo().prefix()).await?;
    announce(ctx, publisher, None, None).await;
    term.run(shutdown, &mut control).await
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
        paused: ctx.timetable().paused(),
        leader: ctx.instance().to_owned(),
    };
    // This replica hears its own events too; apply them here as well in case
    // its API connection is down.
    ctx.on_event(event.clone());
    let body = serde_json::to_vec(&event).unwrap_or_default();
    let props = lapin::BasicProperties::default().with_content_type("application/json".into());
    let exchange = producer::control_exchange(ctx.topo().prefix());
    if let Err(e) = publisher.publish(&exchange, "", props, &body).await {
        tracing::debug!(error = %e, "producer event not delivered (no replica listening?)");
    }
}
