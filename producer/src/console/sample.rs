//! Queue depths for the overview, sampled on a connection of the console's
//! own (so a slow or failing sample never touches the API's publisher or the
//! scheduler's lock connection): a passive declare per work queue and the
//! dead-letter queue gives ready messages and consumers. A sample is reused
//! for [`FRESH`], so many open browsers cost the broker one round a period.
//!
//! With `console.management_url`, the RabbitMQ management API adds unacked
//! counts and the broker's own publish / deliver rates; without it, the
//! change of depth between two samples is all the console can say.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::context::Ctx;

/// How long one sample is shown before the broker is asked again.
pub const FRESH: Duration = Duration::from_secs(2);

/// A bound on each broker round trip, so a page never hangs on the broker.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct QueueSample {
    pub name: String,
    pub ready: Option<u32>,
    pub consumers: Option<u32>,
    /// Change of `ready` per second since the previous sample.
    pub trend: Option<f64>,
    /// From the management API, when configured.
    pub unacked: Option<u64>,
    pub publish_rate: Option<f64>,
    pub deliver_rate: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub taken: Instant,
    pub queues: Vec<QueueSample>,
    pub dead: Option<u32>,
    /// Why some numbers are missing (broker down, management API refused).
    pub problem: Option<String>,
}

/// The console's own broker connection, opened on first use and again
/// after it dropped; the sampler and the dead-letter workbench share it.
#[derive(Default)]
pub struct ConsoleConnection {
    conn: Mutex<Option<Arc<Connection>>>,
}

impl ConsoleConnection {
    pub async fn connection(&self, ctx: &Ctx) -> Result<Arc<Connection>, String> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let c = warren::amqp::connect(&ctx.cfg().amqp, "console")
            .await
            .map_err(|e| format!("broker: {e}"))?;
        let c = Arc::new(c);
        *g = Some(c.clone());
        Ok(c)
    }
}

struct State {
    channel: Option<Channel>,
    last: Option<Arc<Sample>>,
}

pub struct Sampler {
    state: Mutex<State>,
    http: reqwest::Client,
    /// Set by an action that changed the queues: the next page samples anew.
    outdated: std::sync::atomic::AtomicBool,
}

impl Sampler {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                channel: None,
                last: None,
            }),
            http: reqwest::Client::builder()
                .timeout(ASK_TIMEOUT)
                .build()
                .unwrap_or_default(),
            outdated: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The queues changed (a replay, a purge): the next [`Self::get`]
    /// asks the broker, so the page after an action shows its effect.
    pub fn outdate(&self) {
        self.outdated
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The latest sample, taken now if the last one is older than [`FRESH`]
    /// or `fresh` is asked. Concurrent callers wait for one sample instead
    /// of each taking one.
    pub async fn get(&self, ctx: &Ctx, conn: &ConsoleConnection, fresh: bool) -> Arc<Sample> {
        let mut st = self.state.lock().await;
        let fresh = fresh
            || self
                .outdated
                .swap(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(last) = st.last.as_ref().filter(|_| !fresh) {
            if last.taken.elapsed() < FRESH {
                return last.clone();
            }
        }
        let sample = Arc::new(self.take(ctx, conn, &mut st).await);
        st.last = Some(sample.clone());
        sample
    }

    async fn take(&self, ctx: &Ctx, conn: &ConsoleConnection, st: &mut State) -> Sample {
        let topo = ctx.topo();
        let previous = st.last.clone();
        let mut problem = None;
        let mut queues = Vec::new();
        for q in topo.work_queues() {
            let (ready, consumers) = match depth(ctx, conn, st, &q.name).await {
                Ok(d) => (Some(d.0), Some(d.1)),
                Err(e) => {
                    problem.get_or_insert(e);
                    (None, None)
                }
            };
            let trend = previous.as_ref().and_then(|p| {
                let before = p.queues.iter().find(|s| s.name == q.name)?.ready?;
                let now = ready?;
                let secs = p.taken.elapsed().as_secs_f64();
                (secs > 0.0).then(|| (f64::from(now) - f64::from(before)) / secs)
            });
            queues.push(QueueSample {
                name: q.name.clone(),
                ready,
                consumers,
                trend,
                unacked: None,
                publish_rate: None,
                deliver_rate: None,
            });
        }
        let dead = match depth(ctx, conn, st, &topo.dead_queue()).await {
            Ok(d) => Some(d.0),
            Err(e) => {
                problem.get_or_insert(e);
                None
            }
        };
        if let Some(url) = &ctx.cfg().console.management_url {
            if let Err(e) = self.management(ctx, url.expose(), &mut queues).await {
                problem.get_or_insert(e);
            }
        }
        Sample {
            taken: Instant::now(),
            queues,
            dead,
            problem,
        }
    }

    /// Rates and unacked counts from the management API, one request for
    /// every queue of the vhost.
    async fn management(
        &self,
        ctx: &Ctx,
        base: &str,
        queues: &mut [QueueSample],
    ) -> Result<(), String> {
        let (base, user, pass) = split_userinfo(base);
        let vhost = vhost_of(&ctx.cfg().amqp.url_list());
        let url = format!(
            "{}/api/queues/{}?columns=name,messages_unacknowledged,message_stats",
            base.trim_end_matches('/'),
            percent_encode(&vhost)
        );
        let mut req = self.http.get(url);
        if let Some(user) = user {
            req = req.basic_auth(user, pass);
        }
        let answer = req
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("management API: {}", e.without_url()))?;
        let bytes = answer
            .bytes()
            .await
            .map_err(|e| format!("management API: {}", e.without_url()))?;
        let list: Vec<MgmtQueue> = serde_json::from_slice(&bytes)
            .map_err(|e| format!("management API: unexpected answer: {e}"))?;
        let by_name: HashMap<&str, &MgmtQueue> =
            list.iter().map(|q| (q.name.as_str(), q)).collect();
        for q in queues {
            if let Some(m) = by_name.get(q.name.as_str()) {
                q.unacked = m.messages_unacknowledged;
                let stats = m.message_stats.as_ref();
                q.publish_rate = stats
                    .and_then(|s| s.publish_details.as_ref())
                    .map(|d| d.rate);
                q.deliver_rate = stats
                    .and_then(|s| s.deliver_get_details.as_ref())
                    .map(|d| d.rate);
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct MgmtQueue {
    name: String,
    messages_unacknowledged: Option<u64>,
    message_stats: Option<MgmtStats>,
}

#[derive(Deserialize)]
struct MgmtStats {
    publish_details: Option<MgmtRate>,
    deliver_get_details: Option<MgmtRate>,
}

#[derive(Deserialize)]
struct MgmtRate {
    rate: f64,
}

/// Ready messages and consumers of `queue`, (re)opening the console's
/// connection and channel as needed. A failed declare closes the channel
/// (404 for a missing queue), so the next call opens a new one.
async fn depth(
    ctx: &Ctx,
    conn: &ConsoleConnection,
    st: &mut State,
    queue: &str,
) -> Result<(u32, u32), String> {
    let result = tokio::time::timeout(ASK_TIMEOUT, async {
        let ch = channel(ctx, conn, st).await?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("queue `{queue}`: {e}"))?;
        Ok((q.message_count(), q.consumer_count()))
    })
    .await
    .unwrap_or_else(|_| Err("the broker did not answer in time".into()));
    if result.is_err() {
        st.channel = None;
    }
    result
}

async fn channel(ctx: &Ctx, conn: &ConsoleConnection, st: &mut State) -> Result<Channel, String> {
    if let Some(ch) = &st.channel {
        if ch.status().connected() {
            return Ok(ch.clone());
        }
    }
    let conn = conn.connection(ctx).await?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("broker: {e}"))?;
    st.channel = Some(ch.clone());
    Ok(ch)
}

/// `http://user:pass@host:15672/` → (`http://host:15672/`, user, pass).
fn split_userinfo(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None, None);
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((info, host)) => {
            let (user, pass) = match info.split_once(':') {
                Some((u, p)) => (u.to_owned(), Some(p.to_owned())),
                None => (info.to_owned(), None),
            };
            (format!("{scheme}://{host}{path}"), Some(user), pass)
        }
        None => (url.to_owned(), None, None),
    }
}

/// The vhost an AMQP URL names (`/` when it names none).
fn vhost_of(amqp_url: &str) -> String {
    let first = amqp_url.split(',').next().unwrap_or("");
    let rest = first.split_once("://").map_or(first, |(_, r)| r);
    let path = rest.find('/').map_or("", |i| &rest[i + 1..]);
    let path = path.split('?').next().unwrap_or("");
    if path.is_empty() {
        "/".into()
    } else {
        percent_decode(path)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn management_url_and_vhost() {
        assert_eq!(
            split_userinfo("http://ops:s3cret@mq:15672/"),
            (
                "http://mq:15672/".into(),
                Some("ops".into()),
                Some("s3cret".into())
            )
        );
        assert_eq!(
            split_userinfo("http://mq:15672"),
            ("http://mq:15672".into(), None, None)
        );
        assert_eq!(vhost_of("amqp://g:g@h:5672/%2f"), "/");
        assert_eq!(vhost_of("amqp://h:5672"), "/");
        assert_eq!(vhost_of("amqp://h/prod?heartbeat=5"), "prod");
        assert_eq!(percent_encode("/"), "%2F");
    }
}
