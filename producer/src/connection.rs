//! The producer's broker connections: connecting with retries (shared by the
//! API connection here and the lock connection of [`crate::scheduler`]),
//! and keeping the API's publishing connection up. Readiness follows it.

use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use tokio_util::sync::CancellationToken;
use warren::amqp::Publisher;
use warren::topology::producer::Part;

use crate::context::{ApiPublisher, Ctx};
use crate::control;

/// Hear the leader's paused-set events, and ask for the current set now
/// (this replica may have missed changes while disconnected).
async fn listen(ctx: &Ctx, conn: &Connection) -> Option<(lapin::Channel, lapin::Consumer)> {
    let prefix = ctx.topo().prefix();
    let sub = control::subscribe(conn, prefix)
        .await
        .map_err(|e| tracing::warn!(error = %e, "cannot subscribe to producer events"))
        .ok()?;
    let sync = control::Request {
        id: uuid::Uuid::new_v4().to_string(),
        op: control::Op::Sync,
        schedule: None,
    };
    if let Err(e) = control::send(conn, prefix, &sync).await {
        tracing::warn!(error = %e, "cannot ask the leader for the paused schedules");
    }
    Some(sub)
}

/// The next event; never resolves without a subscription (the 250 ms
/// connection check retries it).
async fn next_event(
    events: &mut Option<(lapin::Channel, lapin::Consumer)>,
) -> Option<control::Incoming> {
    let Some((_, consumer)) = events.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match control::next::<control::Incoming>(consumer).await {
            Some((_, Some(ev))) => return Some(ev),
            Some((_, None)) => {}
            None => {
                *events = None;
                return None;
            }
        }
    }
}

/// Read the API's schedules up to now and keep following them (`None`:
/// could not; tried again when the connection comes back).
async fn follow_catalog(
    ctx: &Ctx,
    conn: &Connection,
    publisher: &Publisher,
) -> Option<(lapin::Channel, lapin::Consumer)> {
    let prefix = ctx.topo().prefix();
    let timetable = ctx.timetable();
    let effect = |e| timetable.catalog_effect(e);
    match crate::catalog::follow(conn, publisher, prefix, timetable.catalog(), &effect).await {
        Ok(f) => {
            timetable.set_catalog_loaded();
            tracing::debug!(
                schedules = timetable.catalog().len(),
                "schedule catalog read"
            );
            Some(f)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the schedule catalog");
            None
        }
    }
}

/// The next record of the catalog's log; never resolves without a
/// consumer.
async fn next_delivery(
    feed: &mut Option<(lapin::Channel, lapin::Consumer)>,
) -> Option<lapin::message::Delivery> {
    use futures_util::StreamExt;
    let Some((_, consumer)) = feed.as_mut() else {
        return std::future::pending().await;
    };
    match consumer.next().await {
        Some(Ok(d)) => Some(d),
        _ => {
            *feed = None;
            None
        }
    }
}

/// Start following the workflow runs (`None`: could not; tried again
/// when the connection comes back).
async fn follow_runs(ctx: &Ctx, conn: &Connection) -> Option<(lapin::Channel, lapin::Consumer)> {
    ctx.runs()
        .follow(conn, ctx.topo().prefix())
        .await
        .map_err(|e| tracing::warn!(error = %e, "cannot read the workflow runs"))
        .ok()
}

/// Tell every replica (this one included) who this replica is and whether
/// it leads.
async fn announce(ctx: &Ctx, events: &Option<(lapin::Channel, lapin::Consumer)>) {
    let Some((ch, _)) = events else {
        return;
    };
    let me = control::Presence {
        instance: ctx.instance().to_owned(),
        leader: ctx.leadership().is_leader(),
    };
    if let Err(e) = control::announce(ch, ctx.topo().prefix(), me).await {
        tracing::debug!(error = %e, "cannot announce this replica");
    }
}

/// Connect with [`warren::amqp::connect_with_backoff`] until it works or
/// shutdown (`None`). An error no retry can cure (credentials or vhost
/// refused, unreadable TLS file) stops the producer with exit 1: it is
/// recorded in `ctx` and `stop` is cancelled.
pub async fn connect_retry(ctx: &Ctx, role: &str, stop: &CancellationToken) -> Option<Connection> {
    match warren::amqp::connect_with_backoff(&ctx.cfg().amqp, role, stop).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::error!(role, error = %e, "cannot connect to the broker; not retrying");
            ctx.fail(format!("cannot connect to the broker: {e}"));
            stop.cancel();
            None
        }
    }
}

/// Whether a setup error is one no reconnect fixes: the broker refused an
/// operation to this user (ACCESS_REFUSED names the resource and the
/// permission), or an object this role may not declare is missing.
pub fn is_permanent(e: &anyhow::Error) -> bool {
    if let Some(w) = e.downcast_ref::<warren::Error>() {
        return w.is_fatal();
    }
    e.downcast_ref::<lapin::Error>()
        .is_some_and(|l| warren::Error::Amqp(l.clone()).is_refused())
}

/// Stop the producer (exit 1) over an error no retry fixes.
pub fn give_up(ctx: &Ctx, stop: &CancellationToken, what: &str, e: &anyhow::Error) {
    // The broker's reason in its own words, once: the exit line says it.
    let reason = warren::error::report(e.as_ref());
    tracing::debug!(error = %reason, "{what}; not retrying");
    ctx.fail(format!("{what}: {reason}"));
    stop.cancel();
}

/// How often a replica tries again to read a task events stream it could not.
const TASKS_RETRY: Duration = Duration::from_secs(3);

/// Serve while the API connection is up: follow the catalog, hear and
/// announce replicas, until shutdown or the connection drops.
async fn serve(
    ctx: &Ctx,
    conn: &Connection,
    publisher: &Publisher,
    stop: &CancellationToken,
    mut catalog: Option<(lapin::Channel, lapin::Consumer)>,
) {
    let mut events = listen(ctx, conn).await;
    let mut runs = follow_runs(ctx, conn).await;
    let mut presence = tokio::time::interval(control::PRESENCE_EVERY);
    let stream = ctx.topo().events_stream();
    let index = ctx.task_events().index();
    let timetable = ctx.timetable();
    let mut tasks = crate::tasks::follow(conn, &stream, index).await;
    let mut tasks_tried = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if let Some(m) = ctx.task_events().index_metrics() {
                    m.update(index);
                }
                // A missing stream may be declared later (by a consumer).
                if tasks.is_none() && tasks_tried.elapsed() >= TASKS_RETRY {
                    tasks = crate::tasks::follow(conn, &stream, index).await;
                    tasks_tried = std::time::Instant::now();
                }
            }
            d = next_delivery(&mut tasks) => {
                if task_event(index, d, conn, &stream).await {
                    tasks_tried = std::time::Instant::now();
                }
            }
            _ = presence.tick() => announce(ctx, &events).await,
            // Replicas list the new leader at once, not at the
            // next periodic announcement.
            _ = ctx.leadership().changed() => announce(ctx, &events).await,
            d = next_delivery(&mut catalog) => match d {
                Some(d) => {
                    crate::catalog::apply_delivery(timetable.catalog(), &d, &|e| timetable.catalog_effect(e));
                    let _ = d.acker.ack(lapin::options::BasicAckOptions::default()).await;
                }
                None => {
                    tracing::warn!("schedule catalog consumer ended; reading it again");
                    catalog = follow_catalog(ctx, conn, publisher).await;
                }
            },
            d = next_delivery(&mut runs) => match d {
                Some(d) => {
                    ctx.runs().apply_delivery(&d);
                    let _ = d.acker.ack(lapin::options::BasicAckOptions::default()).await;
                }
                None => {
                    tracing::warn!("workflow runs consumer ended; reading them again");
                    runs = follow_runs(ctx, conn).await;
                }
            },
            ev = next_event(&mut events) => match ev {
                Some(control::Incoming::Event(ev)) => ctx.on_event(ev),
                Some(control::Incoming::Presence { presence }) => ctx.replicas().on_presence(presence),
                None => {
                    tracing::warn!("producer events subscription ended; subscribing again");
                    events = listen(ctx, conn).await;
                }
            },
        }
        if !conn.status().connected() {
            tracing::warn!("publishing connection lost; reconnecting");
            break;
        }
    }
}

/// Apply one message of the task events stream; `true` when its consumer
/// ended on a live connection (read again from the start, after
/// [`TASKS_RETRY`]).
async fn task_event(
    index: &crate::tasks::Index,
    d: Option<lapin::message::Delivery>,
    conn: &Connection,
    stream: &str,
) -> bool {
    match d {
        Some(d) => {
            crate::tasks::apply_delivery(index, &d);
            let _ = d
                .acker
                .ack(lapin::options::BasicAckOptions::default())
                .await;
            false
        }
        None if conn.status().connected() => {
            // The broker cancels the consumer of a deleted stream; a new one
            // starts again at offset 0.
            tracing::warn!(stream = %stream, "task events stream consumer ended; reading it again from its start");
            index.reset_offset();
            true
        }
        None => false,
    }
}

/// Longest wait between two tries to set up the topology.
const SETUP_RETRY_MAX: Duration = Duration::from_secs(10);

/// Waits between tries to set up the topology after a transient error
/// (the broker under an alarm, a node restarting): 0.5 s doubling to 10 s,
/// jittered so that replicas do not retry in step.
fn setup_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(SETUP_RETRY_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Keep the API's publishing connection up: connect, declare the topology,
/// serve, and start over when it drops.
pub async fn api_connection(ctx: Arc<Ctx>, stop: CancellationToken) {
    let mut first = true;
    let mut setup_retry = setup_backoff();
    loop {
        let Some(conn) = connect_retry(&ctx, "producer", &stop).await else {
            return;
        };
        let conn = Arc::new(conn);
        let setup = async {
            warren::topology::declare(&conn, ctx.topo()).await?;
            let parts = [Part::Control, Part::Catalog, Part::Runs];
            warren::topology::producer::declare(&conn, ctx.topo(), &parts).await?;
            Publisher::new(&conn, ctx.cfg().amqp.confirm_timeout).await
        };
        match setup.await {
            Ok(publisher) => {
                setup_retry = setup_backoff();
                let blocked = warren::amqp::watch_connection(&conn, ctx.amqp_metrics().clone());
                ctx.task_events().recorder().attach(&conn).await;
                ctx.link().set_publisher(Some(ApiPublisher {
                    publisher: publisher.clone(),
                    blocked,
                    conn: conn.clone(),
                }));
                if !first {
                    ctx.amqp_metrics().reconnects.inc();
                }
                first = false;
                ctx.amqp_metrics().connected.set(1);
                // Ready once the API's schedules are read: a replica
                // answering before would miss them.
                let catalog = follow_catalog(&ctx, &conn, &publisher).await;
                ctx.health().set_ready(true);
                tracing::info!("connected to the broker");
                serve(&ctx, &conn, &publisher, &stop, catalog).await;
                ctx.health().set_ready(false);
                ctx.amqp_metrics().connected.set(0);
                ctx.link().set_publisher(None);
                if conn.status().connected() {
                    ctx.task_events()
                        .recorder()
                        .flush(Duration::from_secs(2))
                        .await;
                    let _ = publisher.channel().close(200, "shutting down".into()).await;
                }
            }
            Err(e) if e.is_fatal() => {
                give_up(&ctx, &stop, "cannot set up the topology", &e.into());
            }
            Err(e) => {
                let wait = setup_retry.next().unwrap_or(SETUP_RETRY_MAX);
                tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot set up the topology; retrying");
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, "producer shutting down".into()),
        )
        .await;
        if stop.is_cancelled() {
            return;
        }
    }
}
