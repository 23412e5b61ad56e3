//! `tasks get|ls|wait|watch` and `workers`: read the task events stream
//! directly, like the other commands that read the producer's state from
//! the broker (no running producer needed). `get`, `ls` and `wait` read the
//! stream from `--since` (default [`DEFAULT_WINDOW`] back; the stream's
//! timestamp offset, so what was stored well before is never read) up to a
//! marker they append, into the same index a replica keeps
//! ([`crate::tasks`]).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::Subcommand;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use warren::events::{Batch, What};

use super::UsageError;
use crate::config::ProducerConfig;
use crate::tasks::{Index, State, TaskView};

#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// Show one task: state, attempts, result (exit 1 when unknown).
    Get {
        id: String,
        #[arg(long)]
        json: bool,
        /// Read events from this far back (`24h`, `7d`, or an RFC 3339
        /// instant; default 1h).
        #[arg(long)]
        since: Option<String>,
    },
    /// Recent tasks, newest first.
    Ls {
        /// A task name or topic pattern (`email.*`).
        #[arg(long)]
        name: Option<String>,
        /// published, running, retrying, succeeded or dead.
        #[arg(long)]
        state: Option<String>,
        /// Tasks updated since (`10m`, or an RFC 3339 instant); events are
        /// read from there (default 1h back).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Wait until a task ends: exit 0 when it succeeded (its result, if
    /// kept, on stdout), 1 when it was dead-lettered, 124 on timeout.
    Wait {
        id: String,
        #[arg(long, default_value = "30s")]
        timeout: humantime::Duration,
        /// Read past events from this far back (default 1h), then live ones.
        #[arg(long)]
        since: Option<String>,
    },
    /// Print task events as they happen, one line each.
    Watch {
        #[arg(long)]
        json: bool,
    },
}

/// `tasks wait` gave up: exit 124 (as `timeout(1)`).
#[derive(Debug, thiserror::Error)]
#[error("task `{0}` did not finish within {1}")]
pub struct WaitTimedOut(pub String, pub String);

/// `tasks wait`: the task was dead-lettered (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("task `{0}` was dead-lettered: {1}")]
pub struct TaskDead(pub String, pub String);

/// How far back `get`, `ls` and `wait` read the stream without `--since`:
/// the stream keeps up to `events.max_age` (7 days) and `events.max_bytes`,
/// and reading all of it would make every command cost what is stored.
/// "What happened to the task I just sent" is the common question.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);

/// Where to start reading: `--since`, or [`DEFAULT_WINDOW`] back from `now`.
fn window(v: Option<&str>, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    Ok(match since_arg(v)? {
        Some(t) => t,
        None => now - chrono::TimeDelta::from_std(DEFAULT_WINDOW)?,
    })
}

fn since_arg(v: Option<&str>) -> anyhow::Result<Option<DateTime<Utc>>> {
    match v {
        None => Ok(None),
        Some(v) => crate::api::tasks::parse_since(v, Utc::now())
            .map(Some)
            .ok_or_else(|| UsageError::Since(v.to_owned()).into()),
    }
}

async fn connect(cfg: &ProducerConfig) -> anyhow::Result<Connection> {
    Ok(warren::amqp::connect(&cfg.amqp, "producer-cli").await?)
}

/// A consumer of the stream from `from` (x-stream-offset).
async fn consume(
    conn: &Connection,
    stream: &str,
    from: AMQPValue,
) -> anyhow::Result<(Channel, Consumer)> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-stream-offset"), from);
    let c = ch
        .basic_consume(
            stream.into(),
            "warren-producer-cli".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the task events stream `{stream}`: {e}"))?;
    Ok((ch, c))
}

/// The stream's timestamp offset (whole seconds): the broker starts at the
/// chunk written just before `since`, skipping everything older.
fn start_at(since: DateTime<Utc>) -> AMQPValue {
    AMQPValue::Timestamp(u64::try_from(since.timestamp()).unwrap_or(0))
}

/// Append a marker batch (no events) and read into `index` up to it.
async fn read_up(
    conn: &Connection,
    stream: &str,
    since: DateTime<Utc>,
    index: &Index,
) -> anyhow::Result<(Channel, Consumer)> {
    let marker = format!("cli-marker/{}", uuid::Uuid::new_v4());
    let body = serde_json::to_vec(&Batch {
        v: 1,
        role: "cli".into(),
        instance: marker.clone(),
        host: warren::config::host_name(),
        events: Vec::new(),
        worker: None,
    })?;
    let publisher = warren::amqp::Publisher::new(conn, Duration::from_secs(10)).await?;
    let props = BasicProperties::default().with_content_type("application/json".into());
    publisher
        .publish("", stream, props, &body)
        .await
        .map_err(|e| anyhow::anyhow!("cannot append to the task events stream `{stream}`: {e}"))?;
    let _ = publisher.channel().close(200, "marker sent".into()).await;
    let (ch, mut c) = consume(conn, stream, start_at(since)).await?;
    loop {
        let Some(d) = c.next().await else {
            anyhow::bail!("the task events stream consumer ended");
        };
        let d = d?;
        d.acker.ack(BasicAckOptions::default()).await?;
        crate::tasks::apply_delivery(index, &d);
        if warren::events::parse(&d.data).is_some_and(|b| b.instance == marker) {
            return Ok((ch, c));
        }
    }
}

fn fmt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

fn print_task(t: &TaskView) {
    warren::outln!("id        {}", t.id);
    warren::outln!("name      {}", t.name);
    warren::outln!("state     {}", t.state.as_str());
    if let Some(q) = &t.queue {
        warren::outln!("queue     {q}");
    }
    if let Some(s) = t.source {
        warren::outln!("source    {s}");
    }
    warren::outln!("published {}", fmt_time(t.published_at));
    if let Some(n) = t.next_attempt_at {
        warren::outln!("next      {}", fmt_time(Some(n)));
    }
    if let Some(tr) = &t.trace_id {
        warren::outln!("trace     {tr}");
    }
    for a in &t.attempts {
        let took = a
            .duration_ms
            .map(|d| format!("{d} ms"))
            .unwrap_or_else(|| "-".into());
        warren::outln!(
            "attempt {}  {}  {}  on {}  took {}{}",
            a.attempt,
            a.outcome,
            fmt_time(a.started_at),
            a.consumer.as_deref().unwrap_or("-"),
            took,
            a.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(r) = &t.result {
        warren::outln!("result    {r}");
    }
}

pub async fn run(cfg: ProducerConfig, cmd: TasksCommand) -> anyhow::Result<()> {
    let stream = warren::Topology::new(&cfg.topology).events_stream();
    let index = Index::new(cfg.events.index_size);
    match cmd {
        TasksCommand::Get { id, json, since } => get(&cfg, &stream, &index, &id, json, since).await,
        TasksCommand::Ls {
            name,
            state,
            since,
            limit,
            json,
        } => {
            let state = match state.as_deref() {
                None => None,
                Some(s) => Some(State::parse(s).ok_or_else(|| UsageError::State(s.to_owned()))?),
            };
            let query = crate::tasks::Query {
                name,
                state,
                since: since_arg(since.as_deref())?,
                limit: limit.max(1),
            };
            ls(&cfg, &stream, &index, &query, json).await
        }
        TasksCommand::Wait { id, timeout, since } => {
            wait_for(&cfg, &stream, &index, &id, *timeout, since).await
        }
        TasksCommand::Watch { json } => watch(&cfg, &stream, json).await,
    }
}

/// `tasks get`: the stream read up to now, then one task.
async fn get(
    cfg: &ProducerConfig,
    stream: &str,
    index: &Index,
    id: &str,
    json: bool,
    since: Option<String>,
) -> anyhow::Result<()> {
    let from = window(since.as_deref(), Utc::now())?;
    let conn = connect(cfg).await?;
    let res = read_up(&conn, stream, from, index).await;
    let _ = conn.close(200, "done".into()).await;
    res?;
    let Some(t) = index.get(id) else {
        anyhow::bail!(
            "no task `{id}` in the task events since {} (state unknown; `--since` reads further back)",
            fmt_time(Some(from))
        );
    };
    if json {
        warren::outln!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        print_task(&t);
    }
    Ok(())
}

/// `tasks ls`: the stream read up to now, then the recent tasks `query`
/// selects.
async fn ls(
    cfg: &ProducerConfig,
    stream: &str,
    index: &Index,
    query: &crate::tasks::Query,
    json: bool,
) -> anyhow::Result<()> {
    let from = match query.since {
        Some(t) => t,
        None => window(None, Utc::now())?,
    };
    let conn = connect(cfg).await?;
    let res = read_up(&conn, stream, from, index).await;
    let _ = conn.close(200, "done".into()).await;
    res?;
    let tasks = index.list(query);
    if json {
        warren::outln!("{}", serde_json::to_string_pretty(&tasks)?);
        return Ok(());
    }
    for t in &tasks {
        warren::outln!(
            "{}  {}  {}  {}  attempts {}",
            fmt_time(t.updated_at),
            t.state.as_str(),
            t.name,
            t.id,
            t.attempts.len()
        );
    }
    Ok(())
}

/// `tasks wait`: until task `id` ended or `timeout`; its result printed on
/// success, the exit code's error otherwise.
async fn wait_for(
    cfg: &ProducerConfig,
    stream: &str,
    index: &Index,
    id: &str,
    timeout: std::time::Duration,
    since: Option<String>,
) -> anyhow::Result<()> {
    let from = window(since.as_deref(), Utc::now())?;
    let conn = connect(cfg).await?;
    let res = tokio::time::timeout(timeout, wait(&conn, stream, from, index, id)).await;
    let _ = conn.close(200, "done".into()).await;
    match res {
        Err(_) => Err(WaitTimedOut(
            id.to_owned(),
            humantime::format_duration(timeout).to_string(),
        )
        .into()),
        Ok(Err(e)) => Err(e),
        Ok(Ok(t)) if t.state == State::Dead => {
            let why = t
                .attempts
                .last()
                .and_then(|a| a.error.clone())
                .unwrap_or_default();
            Err(TaskDead(id.to_owned(), why).into())
        }
        Ok(Ok(t)) => {
            if let Some(r) = &t.result {
                warren::outln!("{r}");
            }
            Ok(())
        }
    }
}

/// `tasks watch`: every event from now on, until Ctrl-C.
async fn watch(cfg: &ProducerConfig, stream: &str, json: bool) -> anyhow::Result<()> {
    let conn = connect(cfg).await?;
    let (_ch, mut c) = consume(&conn, stream, AMQPValue::LongString("next".into())).await?;
    let stop = warren::shutdown::token();
    loop {
        let d = tokio::select! {
            _ = stop.cancelled() => break,
            d = c.next() => d,
        };
        let Some(Ok(d)) = d else {
            break;
        };
        d.acker.ack(BasicAckOptions::default()).await?;
        let Some(b) = warren::events::parse(&d.data) else {
            continue;
        };
        for ev in &b.events {
            if json {
                warren::outln!("{}", serde_json::to_string(ev)?);
            } else {
                warren::outln!("{}", watch_line(&b, ev));
            }
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Read up to now, then follow until `id` has ended.
async fn wait(
    conn: &Connection,
    stream: &str,
    since: DateTime<Utc>,
    index: &Index,
    id: &str,
) -> anyhow::Result<TaskView> {
    let (_ch, mut c) = read_up(conn, stream, since, index).await?;
    let ended = |t: &TaskView| matches!(t.state, State::Succeeded | State::Dead);
    if let Some(t) = index.get(id).filter(ended) {
        return Ok(t);
    }
    while let Some(d) = c.next().await {
        let d = d?;
        d.acker.ack(BasicAckOptions::default()).await?;
        crate::tasks::apply_delivery(index, &d);
        if let Some(t) = index.get(id).filter(ended) {
            return Ok(t);
        }
    }
    anyhow::bail!("the task events stream consumer ended")
}

fn watch_line(b: &Batch, ev: &warren::events::Event) -> String {
    let at = fmt_time(ev.when());
    let what = match &ev.what {
        What::Published { source } => format!("published by {}", source.as_str()),
        What::Started { attempt } => format!("started attempt {attempt} on {}", b.instance),
        What::Retried {
            attempt,
            error,
            delay_ms,
            ..
        } => format!("attempt {attempt} failed, retry in {delay_ms} ms: {error}"),
        What::Succeeded {
            attempt,
            duration_ms,
            ..
        } => format!("succeeded on attempt {attempt} in {duration_ms} ms"),
        What::Dead {
            attempt,
            kind,
            reason,
        } => format!("dead after attempt {attempt} ({kind}): {reason}"),
        What::Requeued { attempt, why } => format!("attempt {attempt} requeued: {why}"),
    };
    format!("{at}  {}  {}  {what}", ev.name, ev.id)
}

/// `workers`: consumers heard in the last 16 s (read from 20 s back).
pub async fn workers(cfg: ProducerConfig, json: bool) -> anyhow::Result<()> {
    let topo = warren::Topology::new(&cfg.topology);
    let stream = topo.events_stream();
    let index = Index::new(1000);
    let since = Utc::now() - chrono::TimeDelta::seconds(20);
    let conn = connect(&cfg).await?;
    let res = read_up(&conn, &stream, since, &index).await;
    let _ = conn.close(200, "done".into()).await;
    res?;
    let ws = index.workers(Utc::now());
    if json {
        warren::outln!("{}", serde_json::to_string_pretty(&ws)?);
        return Ok(());
    }
    for w in ws {
        warren::outln!(
            "{}  {}  queues {}  running {}/{}  succeeded {}  failed {}",
            w.instance,
            w.host,
            w.queues.join(","),
            w.running,
            w.concurrency,
            w.succeeded,
            w.failed
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn without_since_the_window_is_an_hour() {
        let now = Utc::now();
        assert_eq!(
            window(None, now).unwrap(),
            now - chrono::TimeDelta::hours(1)
        );
        assert!(window(Some("10m"), now).unwrap() >= now - chrono::TimeDelta::minutes(10));
        assert!(window(Some("soon"), now).is_err());
        assert_eq!(
            start_at(DateTime::from_timestamp(1_800_000_000, 0).unwrap()),
            AMQPValue::Timestamp(1_800_000_000)
        );
    }
}
