//! Connecting to the broker and publishing with confirms, for both roles.
//!
//! Every publish is persistent, `mandatory`, on a confirm-mode channel, and is
//! reported as done only once the broker acked it; a nack, a return (no queue
//! bound) or a confirm that does not come within the timeout is an error.
//! Publishing is pipelined: [`Publisher::send`] returns a [`Pending`] confirm,
//! so callers keep many in flight and await them later.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event,
    PublisherConfirm,
};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{check_amqp_url, redact_url, AmqpConfig, AuthMechanism, UrlProblem};
use crate::envelope::Task;
use crate::error::Error;
use crate::metrics::AmqpMetrics;
use crate::security::Seal;
use crate::topology::Topology;

mod transaction;
pub use transaction::{Batch, Returned, Transaction};

/// Connect with the configured heartbeat (unless the URL sets one) and a
/// connection name that shows up in the management UI.
///
/// With several nodes (a cluster), they are tried in a fresh random order,
/// so a fleet spreads over the cluster and a dead node costs one short
/// timeout, not the connection; the first that accepts wins.
pub async fn connect(cfg: &AmqpConfig, role: &str) -> Result<Connection, Error> {
    let mut nodes = cfg.endpoints();
    if nodes.is_empty() {
        return Err(Error::Url("no broker URL configured".into()));
    }
    rand::seq::SliceRandom::shuffle(nodes.as_mut_slice(), &mut rand::rng());
    let timeout = if nodes.len() > 1 {
        NODE_CONNECT_TIMEOUT
    } else {
        CONNECT_TIMEOUT
    };
    let mut failure: Option<Error> = None;
    for url in nodes {
        match connect_to(cfg, url, role, timeout).await {
            Ok(conn) => {
                tracing::info!(role, node = node_of(url), "connected to the broker");
                return Ok(conn);
            }
            Err(e) => {
                tracing::debug!(role, node = node_of(url), error = %e, "broker node did not accept the connection");
                // A refusal that no retry fixes (credentials, vhost, a bad
                // URL) is what the caller must hear about, not a timeout.
                if failure.as_ref().is_none_or(Error::is_transient) {
                    failure = Some(e);
                }
            }
        }
    }
    Err(failure.unwrap_or(Error::ChannelGone))
}

/// One attempt on a single node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// One attempt on one node of several: a node that is down or cut off must
/// not hold up the others for long.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `host:port` of a broker URL, for logs (never the user info).
pub fn node_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

async fn connect_to(
    cfg: &AmqpConfig,
    url: &str,
    role: &str,
    timeout: Duration,
) -> Result<Connection, Error> {
    // Config loading validates the URL already; this keeps library callers
    // from ever seeing lapin's parse error, which quotes the whole URL.
    let mut uri: AMQPUri = match check_amqp_url(url) {
        Err(UrlProblem::NoScheme) => {
            return Err(Error::Url(
                "expected amqp://[user[:password]@]host[:port][/vhost]".into(),
            ))
        }
        Err(UrlProblem::Other(why)) => {
            return Err(Error::Url(format!("{} ({why})", redact_url(url))))
        }
        Ok(()) => url
            .parse()
            .map_err(|_| Error::Url(format!("{} is not valid", redact_url(url))))?,
    };
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(cfg.heartbeat.as_secs().clamp(1, u16::MAX as u64) as u16);
    }
    let name = cfg.connection_name.clone().unwrap_or_else(|| {
        format!(
            "{role}@{}:{}",
            crate::config::host_name(),
            std::process::id()
        )
    });
    let props = ConnectionProperties::default().with_connection_name(name.into());
    if cfg.auth_mechanism == AuthMechanism::External {
        uri.query.auth_mechanism = Some(SASLMechanism::External);
    }
    let tls = tls_config(cfg)?;
    let runtime = lapin::runtime::default_runtime()?;
    let uri_scheme = uri.scheme.clone();
    tokio::time::timeout(
        timeout,
        Connection::connect_uri_with_config(uri, props, tls, runtime),
    )
    .await
    .map_err(|_| Error::ConnectTimeout(timeout))?
    .map_err(|e| match tls_refusal(&e) {
        Some(why) => Error::Tls(why),
        None if uri_scheme == AMQPScheme::AMQPS && reset(&e) => Error::TlsReset(e),
        None => Error::from(e),
    })
}

/// The connection was reset or cut. Under TLS 1.3 a broker that refuses the
/// client's certificate sends its alert and closes; when the AMQP header we
/// sent right after the handshake is still unread, its kernel resets the
/// connection and the alert may be lost, so this attempt cannot tell.
fn reset(e: &lapin::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(e.kind(), lapin::ErrorKind::IOError(io)
        if matches!(io.kind(), K::ConnectionReset | K::UnexpectedEof | K::BrokenPipe))
}

/// A TLS handshake that failed over certificates, said in the config's
/// terms. lapin reports it as an I/O error, which would be retried forever;
/// no retry fixes a missing or untrusted certificate.
fn tls_refusal(e: &lapin::Error) -> Option<String> {
    use rustls::AlertDescription as A;
    let lapin::ErrorKind::IOError(io) = e.kind() else {
        return None;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = io
        .get_ref()
        .map(|e| e as &(dyn std::error::Error + 'static));
    let tls = loop {
        let c = cause?;
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            break tls;
        }
        cause = c.source();
    };
    let hint = match tls {
        rustls::Error::AlertReceived(A::CertificateRequired) => {
            "the broker requires a client certificate: set amqp.tls_cert_file and amqp.tls_key_file"
        }
        rustls::Error::AlertReceived(
            A::UnknownCA
            | A::BadCertificate
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied,
        ) => {
            "the broker refused the client certificate of amqp.tls_cert_file \
             (is it signed by a CA the broker trusts, and still valid?)"
        }
        rustls::Error::InvalidCertificate(_) => {
            "the broker's certificate is not trusted: set amqp.tls_ca_file to the CA that signed it"
        }
        rustls::Error::AlertReceived(_) => "the broker refused the TLS handshake",
        _ => return None,
    };
    Some(format!("{hint} ({tls})"))
}

/// The CA and client certificate files, read at each connect so that
/// rotated certificates are picked up by the next reconnect.
fn tls_config(cfg: &AmqpConfig) -> Result<OwnedTLSConfig, Error> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Error::Tls(format!("cannot read {key} {}: {e}", path.display())))
    };
    let cert_chain = match &cfg.tls_ca_file {
        Some(path) => Some(
            String::from_utf8(read("amqp.tls_ca_file", path)?).map_err(|_| {
                Error::Tls(format!(
                    "amqp.tls_ca_file {} is not PEM text",
                    path.display()
                ))
            })?,
        ),
        None => None,
    };
    let identity = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("amqp.tls_cert_file", cert)?,
            key: read("amqp.tls_key_file", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// The one reconnect backoff of warren: 100 ms doubling, with jitter, never
/// more than [`MAX_CONNECT_BACKOFF`] between attempts, forever (callers stop
/// it on shutdown).
pub fn connect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        // backon's jitter adds up to 100 % on top of the delay.
        .with_max_delay(MAX_CONNECT_BACKOFF / 2)
        .with_jitter()
        .without_max_times()
}

/// Longest wait between two connect attempts. Kept short on purpose: a
/// process started before its broker (compose, Kubernetes) should be up
/// within about this long after the broker is, not after a 10 s sleep; a
/// refused TCP connect costs the broker nothing.
pub const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(2);

/// Connect, retrying transient failures (broker down, refused, timed out)
/// with [`connect_backoff`]; a permanent one (bad URL, TLS file, refused
/// credentials or vhost) is returned at once. `Ok(None)` on shutdown.
pub async fn connect_with_backoff(
    cfg: &AmqpConfig,
    role: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Connection>, Error> {
    let attempt = || connect(cfg, role);
    let retry = attempt
        .retry(connect_backoff())
        .when(Error::is_transient)
        .notify(|e, d| {
            tracing::warn!(role, error = %e, retry_in_ms = d.as_millis() as u64, "cannot connect to the broker");
        });
    tokio::select! {
        _ = shutdown.cancelled() => Ok(None),
        r = retry => r.map(Some),
    }
}

/// Whether the broker blocks publishing on a connection (resource alarm),
/// following connection.blocked/unblocked. Cheap to clone.
#[derive(Clone)]
pub struct Blocked(watch::Receiver<bool>);

impl Blocked {
    pub fn is_blocked(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when the broker blocks the connection (at once if it is
    /// blocked now); never if the connection goes away first. The broker
    /// only says "blocked" once a publish arrives during an alarm, so a
    /// caller races its confirm against this rather than only checking
    /// [`is_blocked`](Self::is_blocked) before publishing.
    pub async fn until_blocked(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|b| *b).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Whether `e` only says a channel or the connection was already closing
/// or closed when an operation met it.
fn is_close_echo(e: &lapin::Error) -> bool {
    use lapin::{ChannelState as Ch, ConnectionState as Conn, ErrorKind};
    matches!(
        e.kind(),
        ErrorKind::InvalidChannelState(Ch::Closing | Ch::Closed, _)
            | ErrorKind::InvalidConnectionState(Conn::Closing | Conn::Closed)
    )
}

/// Watches a connection's events: [`Blocked`] follows
/// connection.blocked/unblocked so callers can refuse work (503) instead of
/// hanging on publishes.
pub fn watch_connection(conn: &Connection, metrics: AmqpMetrics) -> Blocked {
    let (flag, blocked) = watch::channel(false);
    let mut events = conn.events_listener();
    tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            match ev {
                Event::ConnectionBlocked(reason) => {
                    tracing::warn!(%reason, "broker blocked publishing on this connection");
                    flag.send_replace(true);
                    metrics.blocked.set(1);
                }
                Event::ConnectionUnblocked => {
                    tracing::info!("broker unblocked publishing");
                    flag.send_replace(false);
                    metrics.blocked.set(0);
                }
                // lapin reports a channel the broker closed (a soft error:
                // a refused or missing object) here too; the connection is
                // fine and the caller of that channel reports it.
                Event::Error(e) if e.is_amqp_soft_error() => {
                    tracing::debug!(error = %crate::error::broker_reason(&e), "channel closed by the broker");
                }
                // An operation that met a channel or connection already
                // closing or closed: the echo of a close, ours on shutdown
                // or one whose cause was reported first.
                Event::Error(e) if is_close_echo(&e) => {
                    tracing::debug!(error = %e, "operation after close");
                }
                Event::Error(e) => {
                    tracing::warn!(error = %crate::error::broker_reason(&e), "connection error");
                    metrics.connected.set(0);
                }
                _ => {}
            }
        }
    });
    Blocked(blocked)
}

/// A confirm-mode channel. Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    confirm_timeout: Duration,
    /// Publishes in delivery-tag order, for the [`sequence`] task. The lock
    /// spans the start of `basic_publish` (which takes the delivery tag and
    /// queues the frames) and the enqueue, so both happen in the same order.
    order: Arc<std::sync::Mutex<mpsc::UnboundedSender<Tracked>>>,
    /// Signs and/or encrypts every task sent (the producer's publishers).
    seal: Option<Arc<Seal>>,
}

/// A publish the broker has not confirmed yet.
#[must_use = "a publish is not done until its confirm is awaited"]
pub struct Pending {
    verdict: oneshot::Receiver<Result<(), Error>>,
    timeout: Duration,
}

impl Pending {
    /// Wait for the broker's verdict.
    pub async fn confirmed(self) -> Result<(), Error> {
        match tokio::time::timeout(self.timeout, self.verdict).await {
            Err(_) => Err(Error::ConfirmTimeout(self.timeout)),
            Ok(Err(_)) => Err(Error::ChannelGone),
            Ok(Ok(verdict)) => verdict,
        }
    }
}

/// What a `basic.return` says about the message it returns.
#[derive(Debug, Clone, PartialEq)]
struct Identity {
    exchange: String,
    routing_key: String,
    message_id: Option<String>,
}

/// A started `basic_publish`: resolves once lapin wrote its frames.
type Started = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// A `mandatory` publish of `body` on `channel`, not yet polled.
fn mandatory_publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
    body: &[u8],
) -> Started {
    let channel = channel.clone();
    let (exchange, routing_key) = (exchange.into(), routing_key.into());
    let body = body.to_vec();
    Box::pin(async move {
        channel
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
    })
}

/// Poll `publish` once: lapin's `basic_publish` takes the delivery tag and
/// queues the frames for its I/O thread before its first suspension point
/// (it then waits for the write), so this fixes the message's place on the
/// channel without waiting for the write. What is left resolves once the
/// frames are written.
fn queue_frames(mut publish: Started) -> Result<Started, Error> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match publish.as_mut().poll(&mut cx) {
        Poll::Ready(Err(e)) => Err(Error::Amqp(e)),
        Poll::Ready(Ok(confirm)) => Ok(Box::pin(std::future::ready(Ok(confirm)))),
        Poll::Pending => Ok(publish),
    }
}

struct Tracked {
    publish: Started,
    identity: Identity,
    done: oneshot::Sender<Result<(), Error>>,
}

/// Most returns a sequencer remembers before dropping the oldest; only
/// reached if the broker returned messages this channel never published.
const MAX_UNMATCHED_RETURNS: usize = 10_000;

/// Resolves every publish of one channel in delivery-tag order.
///
/// lapin hands a `basic.return` to whichever confirm resolves next, and a
/// multiple-ack resolves several at once, so under pipelining the return of
/// publish N can arrive on the confirm of publish N-2 (seen in a test under
/// load). The broker always sends a message's return before its ack, so the
/// return of publish N rides on a confirm with a tag <= N: walking confirms in
/// tag order and matching returns by identity gives each publish its own
/// verdict.
async fn sequence(mut queue: mpsc::UnboundedReceiver<Tracked>) {
    let mut returned: VecDeque<(Identity, String)> = VecDeque::new();
    while let Some(t) = queue.recv().await {
        let confirm = match t.publish.await {
            Ok(c) => c,
            Err(e) => {
                let _ = t.done.send(Err(Error::Amqp(e)));
                continue;
            }
        };
        let verdict = match confirm.await {
            Err(e) => Err(Error::Amqp(e)),
            Ok(Confirmation::NotRequested) => Err(Error::NotConfirmed),
            Ok(c) => {
                let nacked = c.is_nack();
                if let Some(ret) = c.take_message() {
                    let d = &ret.delivery;
                    let identity = Identity {
                        exchange: d.exchange.as_str().to_owned(),
                        routing_key: d.routing_key.as_str().to_owned(),
                        message_id: d
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|s| s.as_str().to_owned()),
                    };
                    if returned.len() >= MAX_UNMATCHED_RETURNS {
                        returned.pop_front();
                    }
                    returned
                        .push_back((identity, format!("{} {}", ret.reply_code, ret.reply_text)));
                }
                match returned.iter().position(|(id, _)| *id == t.identity) {
                    Some(i) => {
                        let reply = returned.remove(i).map(|(_, r)| r).unwrap_or_default();
                        Err(Error::Unroutable {
                            exchange: t.identity.exchange,
                            routing_key: t.identity.routing_key,
                            reply,
                        })
                    }
                    None if nacked => Err(Error::Nacked {
                        exchange: t.identity.exchange,
                        routing_key: t.identity.routing_key,
                    }),
                    None => Ok(()),
                }
            }
        };
        let _ = t.done.send(verdict);
    }
}

impl Publisher {
    /// Open a channel on `conn` and put it in confirm mode.
    pub async fn new(conn: &Connection, confirm_timeout: Duration) -> Result<Self, Error> {
        // Bounded like every other broker round trip: a broker that accepted
        // the connection but does not answer must not hang the caller.
        let open = async {
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, Error>(channel)
        };
        let channel = tokio::time::timeout(confirm_timeout, open)
            .await
            .map_err(|_| Error::ConnectTimeout(confirm_timeout))??;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(sequence(rx));
        Ok(Self {
            channel,
            confirm_timeout,
            order: Arc::new(std::sync::Mutex::new(tx)),
            seal: None,
        })
    }

    /// Seal every task this publisher sends ([`Publisher::send_task`] and
    /// the calls built on it, [`Publisher::wire`]). Republishing a task that
    /// is already sealed (a retry, a replay) must not go through a sealing
    /// publisher: its signature stays valid as it is.
    pub fn sealed(mut self, seal: Option<Arc<Seal>>) -> Self {
        self.seal = seal;
        self
    }

    /// The properties and body `task` goes out with: signed and encrypted
    /// when this publisher seals.
    pub fn wire<'t>(&self, task: &'t Task) -> Result<(BasicProperties, Cow<'t, [u8]>), Error> {
        self.wire_at(task, chrono::Utc::now())
    }

    /// [`wire`](Self::wire), stamped as published at `at`
    /// ([`Task::properties_at`]).
    pub fn wire_at<'t>(
        &self,
        task: &'t Task,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(BasicProperties, Cow<'t, [u8]>), Error> {
        let props = task.properties_at(at);
        match &self.seal {
            None => Ok((props, Cow::Borrowed(&task.payload))),
            Some(seal) => seal.apply(props, &task.payload).map_err(Error::Seal),
        }
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Whether the channel can still publish.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publish without waiting for the confirm.
    ///
    /// Returns once the message has its delivery tag and its frames are
    /// queued for lapin's I/O thread, without waiting for the write: a
    /// publishing loop then hands frames over in bursts instead of one
    /// thread round trip per message. A failed write surfaces through the
    /// [`Pending`], like a nack, and the confirm timeout bounds both.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<Pending, Error> {
        let identity = Identity {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            message_id: properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
        };
        let (done, verdict) = oneshot::channel();
        let publish = mandatory_publish(&self.channel, exchange, routing_key, properties, body);
        {
            let order = self.order.lock().map_err(|_| Error::ChannelGone)?;
            // One poll under the lock fixes the tag order that the sequencer
            // relies on; the sequencer polls it again with its own waker.
            let publish = queue_frames(publish)?;
            order
                .send(Tracked {
                    publish,
                    identity,
                    done,
                })
                .map_err(|_| Error::ChannelGone)?;
        }
        Ok(Pending {
            verdict,
            timeout: self.confirm_timeout,
        })
    }

    /// Publish and wait for the confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<(), Error> {
        self.send(exchange, routing_key, properties, body)
            .await?
            .confirmed()
            .await
    }

    /// Send a task so that it is delivered after `delay` (zero: at once).
    pub async fn send_task(
        &self,
        topo: &Topology,
        task: &Task,
        delay: Duration,
    ) -> Result<Pending, Error> {
        let (exchange, key) = topo.route(&task.name, delay);
        let (props, body) = self.wire(task)?;
        self.send(&exchange, &key, props, &body).await
    }

    /// Publish a task and wait for its confirm; a nack is sent again a few
    /// times (see [`nack_backoff`]).
    pub async fn publish_task(
        &self,
        topo: &Topology,
        task: &Task,
        delay: Duration,
    ) -> Result<(), Error> {
        let once = || async { self.send_task(topo, task, delay).await?.confirmed().await };
        once.retry(nack_backoff())
            .sleep(tokio::time::sleep)
            .when(|e| matches!(e, Error::Nacked { .. }))
            .await
    }

    /// Publish many tasks with up to `window` confirms outstanding; one result
    /// per task, in order. Nacked tasks are sent again, same id, a few times
    /// (see [`nack_backoff`]).
    pub async fn publish_tasks<'a>(
        &self,
        topo: &Topology,
        tasks: impl IntoIterator<Item = (&'a Task, Duration)>,
        window: usize,
    ) -> Vec<Result<(), Error>> {
        let tasks: Vec<(&Task, Duration)> = tasks.into_iter().collect();
        let mut results = self.publish_window(topo, &tasks, window).await;
        for pause in nack_backoff().build() {
            let nacked: Vec<usize> = (0..results.len())
                .filter(|i| matches!(results[*i], Err(Error::Nacked { .. })))
                .collect();
            if nacked.is_empty() {
                break;
            }
            tokio::time::sleep(pause).await;
            let again: Vec<(&Task, Duration)> = nacked.iter().map(|i| tasks[*i]).collect();
            for (i, r) in nacked
                .into_iter()
                .zip(self.publish_window(topo, &again, window).await)
            {
                results[i] = r;
            }
        }
        results
    }

    async fn publish_window(
        &self,
        topo: &Topology,
        tasks: &[(&Task, Duration)],
        window: usize,
    ) -> Vec<Result<(), Error>> {
        let mut results = Vec::with_capacity(tasks.len());
        let mut in_flight: VecDeque<(usize, Pending)> = VecDeque::new();
        for (task, delay) in tasks {
            let idx = results.len();
            results.push(Ok(()));
            match self.send_task(topo, task, *delay).await {
                Ok(p) => in_flight.push_back((idx, p)),
                Err(e) => results[idx] = Err(e),
            }
            if in_flight.len() >= window.max(1) {
                if let Some((i, p)) = in_flight.pop_front() {
                    results[i] = p.confirmed().await;
                }
            }
        }
        for (i, p) in in_flight {
            results[i] = p.confirmed().await;
        }
        results
    }
}

/// How a nacked publish is tried again: the broker nacks while a queue's
/// leader moves to another node (measured: the same publish went through
/// 1.1 s after a node kill), so 4 more tries over about 3 s, same task id.
/// A nack that lasts longer (a full queue under `reject-publish`) is
/// reported.
pub fn nack_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_factor(2.0)
        .with_max_times(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_after_a_close_is_an_echo_and_a_lost_socket_is_not() {
        use lapin::{ChannelState as Ch, ConnectionState as Conn, ErrorKind};
        let echo = |k: ErrorKind| is_close_echo(&lapin::Error::from(k));
        assert!(echo(ErrorKind::InvalidConnectionState(Conn::Closed)));
        assert!(echo(ErrorKind::InvalidConnectionState(Conn::Closing)));
        assert!(echo(ErrorKind::InvalidChannelState(
            Ch::Closing,
            "channel.close"
        )));
        assert!(echo(ErrorKind::InvalidChannelState(
            Ch::Closed,
            "basic.ack"
        )));
        assert!(!echo(ErrorKind::InvalidConnectionState(Conn::Connecting)));
        assert!(!echo(ErrorKind::InvalidChannelState(
            Ch::Initial,
            "basic.publish"
        )));
        assert!(!echo(ErrorKind::IOError(std::sync::Arc::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionReset)
        ))));
    }

    #[test]
    fn connect_backoff_grows_but_stays_short() {
        let delays: Vec<Duration> = connect_backoff().build().take(200).collect();
        assert!(
            delays.iter().all(|d| *d <= MAX_CONNECT_BACKOFF),
            "{delays:?}"
        );
        assert!(delays[0] < Duration::from_millis(250), "{delays:?}");
        assert!(delays[100..].iter().all(|d| *d >= MAX_CONNECT_BACKOFF / 2));
    }

    #[test]
    fn node_of_shows_host_and_port_only() {
        assert_eq!(
            node_of("amqp://u:s3cret@10.0.0.1:5672/%2f"),
            "10.0.0.1:5672"
        );
        assert_eq!(
            node_of("amqps://broker.example.com/prod?heartbeat=5"),
            "broker.example.com"
        );
        assert_eq!(node_of("amqp://u:p@[::1]:5672"), "[::1]:5672");
    }
}
