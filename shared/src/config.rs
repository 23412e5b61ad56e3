//! Configuration: the sections both roles share and the one loader that layers
//! defaults < TOML file < `WARREN_*` environment.
//!
//! Each binary defines one `#[serde(deny_unknown_fields, default)]` struct
//! embedding these sections. Environment variables map onto keys with `__`
//! between path segments (`WARREN_WORKER__CONCURRENCY=32` sets
//! `worker.concurrency`); a few short aliases exist for what people set most
//! (`WARREN_AMQP_URL`, `WARREN_HTTP_ADDR`, `WARREN_LOG_FORMAT`, `WARREN_LOG_LEVEL`).
//! The environment is passed in, never read here, so tests can give a map.
//! What serde cannot check, each binary's validation collects into
//! [`Problems`], every problem at once, keyed by config path.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

mod problems;
pub mod split;

pub use problems::{Problem, Problems};
pub use split::Split;

/// The default broker URL (documented).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Environment variables that name a config key without the `__` form.
const ALIASES: &[(&str, &[&str])] = &[
    ("WARREN_AMQP_URL", &["amqp", "url"]),
    ("WARREN_HTTP_ADDR", &["http", "addr"]),
    ("WARREN_LOG_FORMAT", &["log", "format"]),
    ("WARREN_LOG_LEVEL", &["log", "level"]),
];

/// A value that must never be printed (the broker URL carries a password,
/// a token is one): held in a [`secrecy::SecretString`], so it is zeroed on
/// drop and has no `Display`; `Debug` shows a URL with its password
/// replaced ([`redact_url`]) and anything else as `<redacted>`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(SecretString::from(s.into()))
    }
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl ExposeSecret<str> for Secret {
    fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

/// Two configurations are compared on reload (what changed decides what is
/// applied), so equal secrets must compare equal.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

/// Serialized as its SHA-256 digest, never the value: configurations are
/// serialized only to compare them on reload, and a digest compares the same.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.expose().as_bytes());
        s.serialize_str(&format!("sha256:{}", hex::encode(digest)))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(self.expose()))
    }
}

/// The URL with any password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<redacted>".into();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// One broker node, or several separated by commas (`WARREN_AMQP_URL`
    /// holds a cluster's list that way). Unset (and no `urls`):
    /// [`DEFAULT_AMQP_URL`]. An `Option` so that setting it to the default's
    /// value still counts as set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<Secret>,
    /// The nodes of a cluster; when given, `url` must stay unset, and an
    /// empty list is an error rather than the default node. Every
    /// (re)connect tries them in a fresh random order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<Secret>>,
    /// Heartbeat asked for when the URL has none: a silent connection is
    /// dropped after about three of these (the broker would propose 60 s).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How long a publish may wait for its confirm (the broker blocks
    /// publishers under a resource alarm, so an unbounded wait would hang).
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Shown in the management UI next to the connection.
    pub connection_name: Option<String>,
    /// PEM file of CA certificates trusted for `amqps://`, besides the
    /// system's (for brokers with a private CA or a self-signed certificate).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) shown to a broker that asks for one
    /// (mutual TLS); set together with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1), unencrypted.
    pub tls_key_file: Option<PathBuf>,
    /// How to log in: `plain` (the URL's user and password) or `external`
    /// (the broker takes the user from the client certificate).
    pub auth_mechanism: AuthMechanism,
}

/// SASL mechanism of the broker login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMechanism {
    #[default]
    Plain,
    External,
}

/// Why the `[amqp]` section is unusable. Names the key; never holds a
/// password (URLs are kept redacted, or not at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAmqp {
    #[error("amqp.url and amqp.urls are both set: give the node list in one of them")]
    UrlAndUrls,
    #[error("{key}: the list of broker URLs is empty (leave the key out for the default node)")]
    NoUrls { key: &'static str },
    /// Without a scheme the password cannot be told from the rest, so the
    /// value is not shown at all.
    #[error(
        "{key}: expected amqp://[user[:password]@]host[:port][/vhost] \
         (or amqps://), got a value without `amqp://` (not shown: it may contain a password)"
    )]
    NoScheme { key: String },
    #[error("{key} = {redacted}: {why}")]
    BadUrl {
        key: String,
        /// The URL with its password replaced ([`redact_url`]).
        redacted: String,
        why: String,
    },
    #[error("amqp.heartbeat = 0s: must be at least 1s")]
    ZeroHeartbeat,
    #[error("amqp.confirm_timeout = 0s: must be positive")]
    ZeroConfirmTimeout,
    #[error("{missing}: must be set together with {given} (a client certificate needs its key)")]
    HalfIdentity {
        given: &'static str,
        missing: &'static str,
    },
    #[error("{key} = {path:?}: {why}")]
    TlsFile {
        key: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error(
        "amqp.auth_mechanism = \"external\": needs amqp.tls_cert_file and amqp.tls_key_file \
         (the broker takes the user from the client certificate)"
    )]
    ExternalWithoutCert,
}

impl AmqpConfig {
    /// Checks what serde cannot, so a malformed broker URL is a config error
    /// at start-up (exit 2) instead of a connect error retried forever. The
    /// message names `amqp.url` and never contains the password. The first
    /// of [`AmqpConfig::problems`].
    pub fn validate(&self) -> Result<(), InvalidAmqp> {
        first(self.problems())
    }

    /// Every problem of the section, in the order [`AmqpConfig::validate`]
    /// looks.
    pub fn problems(&self) -> Vec<InvalidAmqp> {
        let mut out = Vec::new();
        if self.url.is_some() && self.urls.is_some() {
            out.push(InvalidAmqp::UrlAndUrls);
        }
        let (key, list) = self.endpoint_list();
        if list.is_empty() {
            out.push(InvalidAmqp::NoUrls { key });
        }
        for (i, url) in list.iter().enumerate() {
            let key = if list.len() > 1 {
                format!("{key}[{i}]")
            } else {
                key.to_owned()
            };
            match check_amqp_url(url) {
                Ok(()) => {}
                Err(UrlProblem::NoScheme) => out.push(InvalidAmqp::NoScheme { key }),
                Err(UrlProblem::Other(why)) => out.push(InvalidAmqp::BadUrl {
                    key,
                    redacted: redact_url(url),
                    why,
                }),
            }
        }
        if self.heartbeat.is_zero() {
            out.push(InvalidAmqp::ZeroHeartbeat);
        }
        if self.confirm_timeout.is_zero() {
            out.push(InvalidAmqp::ZeroConfirmTimeout);
        }
        self.tls_problems(&mut out);
        out
    }

    /// The TLS files exist, are readable and hold what their key says, so a
    /// typo is a config error (exit 2) rather than a connect failure.
    fn tls_problems(&self, out: &mut Vec<InvalidAmqp>) {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => out.push(InvalidAmqp::HalfIdentity {
                given: "amqp.tls_cert_file",
                missing: "amqp.tls_key_file",
            }),
            (None, Some(_)) => out.push(InvalidAmqp::HalfIdentity {
                given: "amqp.tls_key_file",
                missing: "amqp.tls_cert_file",
            }),
            (None, None) if self.auth_mechanism == AuthMechanism::External => {
                out.push(InvalidAmqp::ExternalWithoutCert)
            }
            _ => {}
        }
        let files = [
            ("amqp.tls_ca_file", &self.tls_ca_file, "CERTIFICATE"),
            ("amqp.tls_cert_file", &self.tls_cert_file, "CERTIFICATE"),
            ("amqp.tls_key_file", &self.tls_key_file, "PRIVATE KEY"),
        ];
        for (key, path, label) in files {
            let Some(path) = path else { continue };
            let bad = |why: String| InvalidAmqp::TlsFile {
                key,
                path: path.clone(),
                why,
            };
            // Read as bytes: a key file's content must never reach a message.
            match std::fs::read(path) {
                Err(e) => out.push(bad(format!("cannot read: {e}"))),
                Ok(pem) => {
                    let holds = String::from_utf8_lossy(&pem)
                        .lines()
                        .any(|l| l.starts_with("-----BEGIN ") && l.contains(label));
                    if !holds {
                        out.push(bad(format!("no PEM `{label}` in it")));
                    }
                }
            }
        }
    }
}

/// The first of `problems`, as the `validate` of a section answers.
fn first<E>(problems: Vec<E>) -> Result<(), E> {
    match problems.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Why a broker URL is unusable (never quoting the URL itself).
#[derive(Debug, PartialEq)]
pub enum UrlProblem {
    /// Without a scheme we cannot tell the password from the rest, so the
    /// value cannot be shown even redacted.
    NoScheme,
    Other(String),
}

/// Validate a broker URL: scheme `amqp`/`amqps`, a host, a port in
/// 1..=65535, a non-empty vhost, and whatever else lapin's parser needs.
pub fn check_amqp_url(url: &str) -> Result<(), UrlProblem> {
    let other = |m: &str| Err(UrlProblem::Other(m.to_owned()));
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(UrlProblem::NoScheme);
    };
    if !matches!(scheme.to_ascii_lowercase().as_str(), "amqp" | "amqps") {
        // Quote the scheme only when it cannot be a piece of userinfo.
        let plain = scheme.len() <= 16
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        return other(&if plain {
            format!("the scheme must be `amqp` or `amqps`, not `{scheme}`")
        } else {
            "the scheme must be `amqp` or `amqps`".to_owned()
        });
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if !authority.contains('@') && tail.contains('@') {
        // `amqp://user:pa/ss@host`: the userinfo was cut at a reserved
        // character, so what looks like a port is part of the password.
        return other(
            "the user name or password contains `/`, `?` or `#`: percent-encode it (`%2F`, `%3F`, `%23`)",
        );
    }
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    // `[::1]:5672`: the port follows the bracket; `host:5672` the last colon.
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return other("an IPv6 host needs a closing `]`"),
        },
        None => match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return other("no host (expected amqp://user:password@host:port/vhost)");
    }
    if let Some(p) = port {
        match p.parse::<u64>() {
            _ if p.is_empty() => return other("empty port after `:`"),
            Ok(n) if (1..=65535).contains(&n) => {}
            Ok(n) => return other(&format!("port {n} is out of range (1-65535)")),
            Err(_) => return other(&format!("port `{p}` is not a number")),
        }
    }
    let path = tail.split(['?', '#']).next().unwrap_or("");
    if path == "/" {
        return other(
            "the vhost is empty (the URL ends in `/`); write `%2f` for the default vhost `/`, \
             or leave the path out",
        );
    }
    // Whatever lapin still refuses (bad percent-encoding, query values). Its
    // messages may quote the input, so only ours are shown.
    if url.parse::<lapin::uri::AMQPUri>().is_err() {
        return other("not a valid AMQP URL (check percent-encoding and query parameters)");
    }
    Ok(())
}

/// The machine's host name: `$HOSTNAME` (Kubernetes sets it to the pod name),
/// else the kernel's, else `unknown-host`. Used in connection names and
/// instance ids, so two replicas never share one.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown-host".into())
}

impl AmqpConfig {
    /// Settings for the broker node(s) of `url` (one URL, or several
    /// separated by commas), the rest default.
    pub fn for_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(Secret::new(url)),
            ..Self::default()
        }
    }

    /// The broker nodes to try, as configured (see [`AmqpConfig::urls`]).
    pub fn endpoints(&self) -> Vec<&str> {
        self.endpoint_list().1
    }

    /// The nodes as one comma-separated value, the form `WARREN_AMQP_URL`
    /// takes (to hand the same broker to a child process). Holds passwords.
    pub fn url_list(&self) -> String {
        self.endpoints().join(",")
    }

    fn endpoint_list(&self) -> (&'static str, Vec<&str>) {
        match (&self.urls, &self.url) {
            (Some(urls), _) => (
                "amqp.urls",
                urls.iter().map(|u| u.expose().trim()).collect(),
            ),
            (None, url) => {
                let url = url.as_ref().map_or(DEFAULT_AMQP_URL, Secret::expose);
                let list = url
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .collect();
                ("amqp.url", list)
            }
        }
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: None,
            urls: None,
            heartbeat: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(15),
            connection_name: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            auth_mechanism: AuthMechanism::Plain,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Prefix of every AMQP object, so two deployments can share a vhost.
    pub prefix: String,
    pub queue_type: QueueType,
    pub queues: Vec<QueueConfig>,
    /// Quorum work queues only (`x-delivery-limit`): after this many
    /// deliveries of one message — redeliveries after consumer crashes, lost
    /// connections or drains past the grace — the broker dead-letters it, so a
    /// task that kills every consumer that runs it cannot crash-loop the fleet.
    /// 0 = unlimited. warren's own retries are new messages and do not count.
    pub delivery_limit: u32,
    /// Declare the topology (needs configure permission on it). Off: only
    /// check that the exchanges and queues this config names exist, so the
    /// role's broker user needs no configure permission (a deployer declares).
    pub declare: bool,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            prefix: "warren".into(),
            queue_type: QueueType::Classic,
            queues: vec![QueueConfig::default()],
            delivery_limit: 20,
            declare: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Short name; the queue is `<prefix>.<name>`.
    pub name: String,
    /// Topic patterns on the task exchange (`#` = every task).
    pub bindings: Vec<String>,
    /// `x-max-priority` for classic queues; 0 turns priorities off. Ignored on
    /// quorum queues, which have no priorities in RabbitMQ 3.x. Unset: a queue
    /// warren creates has none (they cost the broker ~2× per task), and a
    /// queue that exists already is used as it was declared, so a deployment
    /// made when the default was 10 keeps working.
    pub max_priority: Option<u8>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            bindings: vec!["#".into()],
            max_priority: None,
        }
    }
}

/// `[events]`: task events on the stream `<prefix>.events`
/// (docs/tasks.md). Both roles read these keys; the producer adds
/// `index_size` in its own section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Record this role's task events (off: none, and nothing declared).
    pub enabled: bool,
    /// Retention of the stream by age (`x-max-age`).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Retention of the stream by size in bytes (`x-max-length-bytes`).
    pub max_bytes: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 1 << 30,
        }
    }
}

/// Why the `[events]` section is unusable. Names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvents {
    #[error("events.max_age = {0}: must be at least 1m")]
    MaxAge(String),
    #[error("events.max_bytes = {0}: must be at least 1048576 (1 MiB)")]
    MaxBytes(u64),
}

impl EventsConfig {
    /// The first of [`EventsConfig::problems`].
    pub fn validate(&self) -> Result<(), InvalidEvents> {
        self.problems().into_iter().next().map_or(Ok(()), Err)
    }

    /// Every problem of the section.
    pub fn problems(&self) -> Vec<InvalidEvents> {
        let mut out = Vec::new();
        if self.max_age < Duration::from_secs(60) {
            out.push(InvalidEvents::MaxAge(
                humantime::format_duration(self.max_age).to_string(),
            ));
        }
        if self.max_bytes < 1 << 20 {
            out.push(InvalidEvents::MaxBytes(self.max_bytes));
        }
        out
    }

    /// The stream to declare, when this role records events.
    pub fn stream(&self) -> Option<EventStream> {
        self.enabled.then_some(EventStream {
            max_age: self.max_age,
            max_bytes: self.max_bytes,
        })
    }
}

/// Retention of the task events stream `<prefix>.events` (`[events]`), as
/// the topology declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventStream {
    pub max_age: Duration,
    pub max_bytes: u64,
}

/// Why the `[topology]` section is unusable. Names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTopology {
    #[error("topology.prefix: expected a non-empty name without # or *, got {0:?}")]
    Prefix(String),
    #[error("topology.queues: expected at least one work queue")]
    NoQueues,
    #[error("topology.queues: name {0:?} is empty or used twice")]
    QueueName(String),
    #[error("topology.queues.{0}: expected at least one binding")]
    NoBindings(String),
}

impl TopologyConfig {
    /// The first of [`TopologyConfig::problems`].
    pub fn validate(&self) -> Result<(), InvalidTopology> {
        first(self.problems())
    }

    /// Every problem of the section.
    pub fn problems(&self) -> Vec<InvalidTopology> {
        let mut out = Vec::new();
        if self.prefix.is_empty() || self.prefix.contains(['#', '*']) {
            out.push(InvalidTopology::Prefix(self.prefix.clone()));
        }
        if self.queues.is_empty() {
            out.push(InvalidTopology::NoQueues);
        }
        let mut seen = std::collections::HashSet::new();
        for q in &self.queues {
            if q.name.is_empty() || !seen.insert(q.name.as_str()) {
                out.push(InvalidTopology::QueueName(q.name.clone()));
            }
            if q.bindings.is_empty() {
                out.push(InvalidTopology::NoBindings(q.name.clone()));
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of /metrics, /healthz, /readyz (and the producer's API).
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
    /// Let the AMQP client's own message and frame dumps (which hold task
    /// payloads) through. Off: no payload byte reaches any log at any level.
    pub payloads: bool,
    /// OTLP/HTTP collector base URL (`http://collector:4318`); spans go to
    /// its `/v1/traces`. Needs a build with the `otlp` feature.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans (default: the binary's name).
    pub otlp_service_name: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            payloads: false,
            otlp_endpoint: None,
            otlp_service_name: None,
        }
    }
}

/// Why the `[log]` section is unusable. Names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidLog {
    #[error("log.otlp_endpoint = \"{0}\": this build of warren lacks the `otlp` feature (build with `--features otlp`, or remove the key)")]
    NoOtlp(String),
    #[error("log.otlp_endpoint = \"{0}\": expected an http:// or https:// URL with a host")]
    OtlpEndpoint(String),
    #[error("log.otlp_service_name = \"\": must not be empty")]
    EmptyServiceName,
}

impl LogConfig {
    /// Checked by `run` and `check` alike, before anything connects: the
    /// first of [`LogConfig::problems`].
    pub fn validate(&self) -> Result<(), InvalidLog> {
        first(self.problems())
    }

    /// Every problem of the section.
    pub fn problems(&self) -> Vec<InvalidLog> {
        let mut out = Vec::new();
        if self.otlp_service_name.as_deref() == Some("") {
            out.push(InvalidLog::EmptyServiceName);
        }
        let Some(url) = &self.otlp_endpoint else {
            return out;
        };
        // As written, less any password (`redact_url` hides what has no scheme).
        let shown = if url.contains("://") || url.contains('@') {
            redact_url(url)
        } else {
            url.clone()
        };
        let host = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
        if !host.is_some_and(|h| !h.is_empty() && !h.contains(char::is_whitespace)) {
            out.push(InvalidLog::OtlpEndpoint(shown));
        } else if !cfg!(feature = "otlp") {
            out.push(InvalidLog::NoOtlp(shown));
        }
        out
    }

    /// Where spans are sent: the endpoint's `/v1/traces` (as the OTLP
    /// spec builds it from `OTEL_EXPORTER_OTLP_ENDPOINT`), or the URL as
    /// written when it already names that path.
    pub fn otlp_traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.as_deref()?;
        if base.trim_end_matches('/').ends_with("/v1/traces") {
            return Some(base.to_owned());
        }
        Some(format!("{}/v1/traces", base.trim_end_matches('/')))
    }
}

/// Why configuration could not be loaded. Every variant names where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("environment ({vars}): {message}")]
    Env { vars: String, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Load `T` from defaults, then `path` (if any), then `env` (`WARREN_*` pairs).
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let env = overrides(env);
    let text = path.map(read).transpose()?;
    layer(path, text.as_deref(), env)
}

/// [`load`], reading a long `[[key]]` array of tables a chunk at a time
/// ([`Split`]) into the list `entries` points at: the same answer and the
/// same errors, without a tree of the whole file in memory.
pub fn load_with_array<T: DeserializeOwned, E: DeserializeOwned>(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    key: &str,
    entries: fn(&mut T) -> &mut Vec<E>,
) -> Result<T, ConfigError> {
    let env = overrides(env);
    let text = path.map(read).transpose()?;
    let touches_key = |(k, _): &(String, String)| {
        env_path(k).is_some_and(|p| p.first().map(String::as_str) == Some(key))
    };
    if !env.iter().any(touches_key) {
        let chunked = text
            .as_deref()
            .and_then(|t| chunked(path, t, key, &env, entries));
        if let Some(cfg) = chunked {
            return Ok(cfg);
        }
    }
    layer(path, text.as_deref(), env)
}

/// `text` read as its head and tail, then its `[[key]]` entries a chunk at
/// a time; `None` when the cut cannot be trusted (read it whole).
fn chunked<T: DeserializeOwned, E: DeserializeOwned>(
    path: Option<&Path>,
    text: &str,
    key: &str,
    env: &[(String, String)],
    entries: fn(&mut T) -> &mut Vec<E>,
) -> Option<T> {
    let split = Split::find(text, key, split::PER_CHUNK)?;
    let list = split.entries::<E>()?;
    let mut cfg = layer::<T>(path, Some(&split.rest), env.to_vec()).ok()?;
    let slot = entries(&mut cfg);
    if !slot.is_empty() {
        return None;
    }
    *slot = list;
    Some(cfg)
}

/// The `WARREN_*` pairs that name a key.
fn overrides(env: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    env.into_iter()
        .filter(|(key, _)| env_path(key).is_some())
        .collect()
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Defaults < `text` (the file at `path`) < `env`.
fn layer<T: DeserializeOwned>(
    path: Option<&Path>,
    text: Option<&str>,
    env: Vec<(String, String)>,
) -> Result<T, ConfigError> {
    let file_error = |message: String| ConfigError::File {
        path: path.map(Path::to_owned).unwrap_or_default(),
        message,
    };
    let mut table = match text {
        Some(text) => {
            // Parse straight into T first: toml's errors then carry line,
            // column and the offending key.
            let parsed = toml::from_str::<T>(text)
                .map_err(|e| file_error(scrub_snippet(e.to_string().trim_end())))?;
            // Without overrides that is the answer: a table of the whole
            // file next to T doubled the peak memory of a file with
            // 100,000 schedules (about 300 MiB for `schedules check`).
            if env.is_empty() {
                return Ok(parsed);
            }
            drop(parsed);
            toml::from_str::<toml::Table>(text)
                .map_err(|e| file_error(scrub_snippet(&e.to_string())))?
        }
        None => toml::Table::new(),
    };
    let mut applied = Vec::new();
    let mut secrets = Vec::new();
    for (key, raw) in env {
        let Some(path) = env_path(&key) else { continue };
        let value = if path.last().is_some_and(|k| is_secret_key(k)) {
            secrets.push(raw.clone());
            secret_env_value(raw)
        } else {
            env_value(&raw)
        };
        set_path(&mut table, &path, value).map_err(|message| ConfigError::Env {
            vars: key.clone(),
            message,
        })?;
        applied.push(key);
    }
    T::deserialize(table).map_err(|e| {
        // serde quotes a string of the wrong type (`invalid type: string
        // "amqp://u:pw@h", expected a sequence`): never a secret's.
        let mut message = e.to_string().trim_end().to_owned();
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            let quoted = format!("{s:?}");
            message = message
                .replace(&quoted, "<not shown>")
                .replace(s.as_str(), "<not shown>");
        }
        ConfigError::Env {
            vars: applied.join(", "),
            message,
        }
    })
}

/// A secret stays the string it was (a numeric token is still a token, and
/// a type error cannot quote a number), except a TOML array of strings,
/// which is read as one (`WARREN_AMQP__URLS='["amqp://a", "amqp://b"]'`).
fn secret_env_value(raw: String) -> toml::Value {
    match env_value(&raw) {
        toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => {
            toml::Value::Array(items)
        }
        _ => toml::Value::String(raw),
    }
}

/// Keys whose values must never appear in a message.
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["url", "token", "password", "secret", "keys"]
        .iter()
        .any(|s| k.contains(s))
}

/// toml's errors quote the offending source line; when that line sets a
/// secret (`url = guest:pw@host`, a token), show the key only.
fn scrub_snippet(message: &str) -> String {
    message
        .lines()
        .map(|line| {
            let Some((gutter, text)) = line.split_once(" | ") else {
                return line.to_owned();
            };
            let key = text.split('=').next().unwrap_or("");
            if gutter.trim().chars().all(|c| c.is_ascii_digit())
                && !gutter.trim().is_empty()
                && (is_secret_key(key) || text.contains('@'))
            {
                format!("{gutter} | {}= <not shown>", key)
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where a value came from, for validation errors raised after loading.
pub fn origin(path: Option<&Path>) -> String {
    match path {
        Some(p) => format!("config file {} (or WARREN_* environment)", p.display()),
        None => "configuration (defaults and WARREN_* environment)".into(),
    }
}

fn env_path(key: &str) -> Option<Vec<String>> {
    if let Some((_, path)) = ALIASES.iter().find(|(k, _)| *k == key) {
        return Some(path.iter().map(|s| s.to_string()).collect());
    }
    let rest = key.strip_prefix("WARREN_")?;
    if !rest.contains("__") {
        return None;
    }
    Some(rest.split("__").map(|s| s.to_ascii_lowercase()).collect())
}

/// A value is read as a TOML literal when it is one (`32`, `true`, `["a"]`),
/// else as a plain string (`amqp://…`, `10s`).
fn env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = table;
    for seg in parents {
        let entry = cur
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{seg}` is not a table"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

/// The `WARREN_*` variables of this process.
pub fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with("WARREN_"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        amqp: AmqpConfig,
        topology: TopologyConfig,
        worker: Worker,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Worker {
        concurrency: u32,
    }
    impl Default for Demo {
        fn default() -> Self {
            Self {
                amqp: AmqpConfig::default(),
                topology: TopologyConfig::default(),
                worker: Worker { concurrency: 8 },
            }
        }
    }
    impl Default for Worker {
        fn default() -> Self {
            Self { concurrency: 8 }
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn otlp_keys_are_checked_up_front() {
        let with = |url: &str| LogConfig {
            otlp_endpoint: Some(url.into()),
            ..LogConfig::default()
        };
        assert_eq!(LogConfig::default().validate(), Ok(()));
        for bad in ["collector:4318", "http://", "ftp://c/", "http:// c"] {
            let e = with(bad).validate().unwrap_err().to_string();
            assert!(e.starts_with("log.otlp_endpoint = "), "{e}");
        }
        let e = with("http://u:secret@c:4318").validate();
        if cfg!(feature = "otlp") {
            assert_eq!(e, Ok(()));
        } else {
            let e = e.unwrap_err().to_string();
            assert!(e.contains("lacks the `otlp` feature"), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let empty = LogConfig {
            otlp_service_name: Some(String::new()),
            ..LogConfig::default()
        };
        assert_eq!(empty.validate(), Err(InvalidLog::EmptyServiceName));
        assert_eq!(
            with("http://c:4318").otlp_traces_url().as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            with("https://c/otel/v1/traces")
                .otlp_traces_url()
                .as_deref(),
            Some("https://c/otel/v1/traces")
        );
    }

    #[test]
    fn defaults_without_file() {
        let d: Demo = load(None, env(&[])).unwrap();
        assert_eq!(d, Demo::default());
        assert_eq!(d.topology.queues[0].bindings, vec!["#"]);
    }

    #[test]
    fn file_then_env_layering() {
        let f = file("[worker]\nconcurrency = 3\n[amqp]\nheartbeat = \"5s\"\n");
        let d: Demo = load(
            Some(f.path()),
            env(&[
                ("WARREN_WORKER__CONCURRENCY", "42"),
                ("WARREN_AMQP_URL", "amqp://u:p@h:1/v"),
                ("WARREN_TEST_AMQP_URL", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(d.worker.concurrency, 42);
        assert_eq!(d.amqp.heartbeat, Duration::from_secs(5));
        assert_eq!(d.amqp.url_list(), "amqp://u:p@h:1/v");
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Listed {
        worker: Worker,
        jobs: Vec<Job>,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Job {
        name: String,
        #[serde(default)]
        every: Option<u32>,
    }
    fn jobs(l: &mut Listed) -> &mut Vec<Job> {
        &mut l.jobs
    }

    #[test]
    fn a_long_array_read_in_chunks_is_the_whole_file_s_answer_and_error() {
        let n = 3 * split::PER_CHUNK + 5;
        let mut text = String::from("# jobs\n[worker]\nconcurrency = 3\n\n");
        for i in 0..n {
            text.push_str(&format!("[[jobs]]\nname = \"j{i}\"\nevery = {i}\n\n"));
        }
        let f = file(&text);
        let chunked: Listed = load_with_array(Some(f.path()), env(&[]), "jobs", jobs).unwrap();
        assert_eq!(chunked, load::<Listed>(Some(f.path()), env(&[])).unwrap());
        assert_eq!((chunked.jobs.len(), chunked.worker.concurrency), (n, 3));
        assert_eq!(chunked.jobs[n - 1].every, Some(n as u32 - 1));
        let vars = env(&[("WARREN_WORKER__CONCURRENCY", "7")]);
        let overridden: Listed = load_with_array(Some(f.path()), vars, "jobs", jobs).unwrap();
        assert_eq!(
            (overridden.jobs.len(), overridden.worker.concurrency),
            (n, 7)
        );

        // A table after the entries is read with the head.
        let after = format!("{text}[worker]\nconcurrency = 5\n").replacen(
            "[worker]\nconcurrency = 3\n",
            "",
            1,
        );
        let f = file(&after);
        let chunked: Listed = load_with_array(Some(f.path()), env(&[]), "jobs", jobs).unwrap();
        assert_eq!(chunked, load::<Listed>(Some(f.path()), env(&[])).unwrap());
        assert_eq!((chunked.jobs.len(), chunked.worker.concurrency), (n, 5));

        // A bad entry far down, and a bad key in the head: the errors name
        // the whole file's line.
        let bad_entry = text.replacen("every = 3000\n", "every = 3000\nevry = 1\n", 1);
        let bad_head = text.replacen("concurrency = 3", "concurency = 3", 1);
        for (bad, line) in [(bad_entry, "line 12008"), (bad_head, "line 3")] {
            let f = file(&bad);
            let whole = load::<Listed>(Some(f.path()), env(&[])).unwrap_err();
            let e = load_with_array(Some(f.path()), env(&[]), "jobs", jobs).unwrap_err();
            assert_eq!(e.to_string(), whole.to_string());
            assert!(e.to_string().contains(line), "{e}");
        }
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let f = file("[worker]\nconcurency = 3\n");
        let e = load::<Demo>(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&f.path().display().to_string()), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("concurency"), "{e}");
    }

    #[test]
    fn bad_type_says_what_was_expected() {
        let f = file("[worker]\nconcurrency = \"many\"\n");
        let e = load::<Demo>(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("u32"), "{e}");
    }

    #[test]
    fn bad_env_names_the_variable() {
        let e = load::<Demo>(None, env(&[("WARREN_WORKER__CONCURRENCY", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("WARREN_WORKER__CONCURRENCY"), "{e}");
        let e = load::<Demo>(None, env(&[("WARREN_WORKER__NOPE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret::new("amqp://guest:hunter2@host:5672/%2f");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("host:5672"));
        let token = Secret::new("a-token-only-its-holder-knows");
        assert_eq!(format!("{token:?}"), "<redacted>");
    }

    #[test]
    fn a_serialized_secret_is_its_digest_and_compares_like_the_value() {
        let ser = |s: &Secret| serde_json::to_string(s).unwrap();
        let a = Secret::new("amqp://guest:hunter2@host:5672/%2f");
        assert!(!ser(&a).contains("hunter2"), "{}", ser(&a));
        assert!(ser(&a).starts_with("\"sha256:"), "{}", ser(&a));
        assert_eq!(ser(&a), ser(&a.clone()));
        assert_ne!(
            ser(&a),
            ser(&Secret::new("amqp://guest:other@host:5672/%2f"))
        );
    }

    fn url_error(url: &str) -> String {
        let cfg = AmqpConfig {
            url: Some(Secret::new(url)),
            ..AmqpConfig::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.starts_with("amqp.url"), "{e}");
        assert!(!e.contains("s3cret") && !e.contains("cret@"), "{e}");
        e
    }

    #[test]
    fn malformed_urls_are_refused_without_the_password() {
        assert!(url_error("guest:s3cret@host:5672").contains("without `amqp://`"));
        assert!(url_error("http://guest:s3cret@host:5672/%2f").contains("not `http`"));
        assert!(url_error("amqp://guest:s3cret@host:99999/%2f").contains("port 99999"));
        assert!(url_error("amqp://guest:s3cret@host:0").contains("port 0"));
        assert!(url_error("amqp://guest:s3cret@host:56x2").contains("not a number"));
        assert!(url_error("amqp://guest:s3cret@:5672/%2f").contains("no host"));
        assert!(url_error("amqp://guest:s3cret@host/").contains("vhost is empty"));
        assert!(url_error("amqp://guest:s3/cret@host:5672").contains("percent-encode"));
        assert!(url_error("amqp://guest:s3cret@host/%2f?heartbeat=often")
            .contains("not a valid AMQP URL"));
        assert!(url_error("amqp://guest:s3cret@[::1:5672/").contains("`]`"));
        for ok in [
            DEFAULT_AMQP_URL,
            "amqps://u:p@broker.example.com/prod",
            "amqp://broker",
            "amqp://u:p%2Fq@[::1]:5672/%2f?heartbeat=5",
        ] {
            let cfg = AmqpConfig {
                url: Some(Secret::new(ok)),
                ..AmqpConfig::default()
            };
            assert_eq!(cfg.validate(), Ok(()), "{ok}");
        }
    }

    #[test]
    fn a_cluster_is_a_list_of_urls_in_either_key() {
        let a = "amqp://u:s3cret@127.0.0.11:5672/%2f";
        let b = "amqp://u:s3cret@127.0.0.12:5672/%2f";
        let comma = AmqpConfig {
            url: Some(Secret::new(format!("{a}, {b}"))),
            ..AmqpConfig::default()
        };
        assert_eq!(comma.validate(), Ok(()));
        assert_eq!(comma.endpoints(), [a, b]);
        let list = AmqpConfig {
            urls: Some(vec![Secret::new(a), Secret::new(b)]),
            ..AmqpConfig::default()
        };
        assert_eq!(list.validate(), Ok(()));
        assert_eq!(list.endpoints(), [a, b]);

        let bad = |cfg: AmqpConfig| {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{e}");
            e
        };
        let e = bad(AmqpConfig {
            url: Some(Secret::new(format!("{a},u:s3cret@host"))),
            ..AmqpConfig::default()
        });
        assert!(e.starts_with("amqp.url[1]: expected amqp://"), "{e}");
        let e = bad(AmqpConfig {
            urls: Some(vec![
                Secret::new(a),
                Secret::new("amqp://u:s3cret@h:99999/%2f"),
            ]),
            ..AmqpConfig::default()
        });
        assert!(
            e.starts_with("amqp.urls[1] = amqp://u:***@h:99999/%2f"),
            "{e}"
        );
        let e = bad(AmqpConfig {
            url: Some(Secret::new(" , ")),
            ..AmqpConfig::default()
        });
        assert_eq!(
            e,
            "amqp.url: the list of broker URLs is empty (leave the key out for the default node)"
        );
        let e = bad(AmqpConfig {
            url: Some(Secret::new(a)),
            urls: Some(vec![Secret::new(b)]),
            ..AmqpConfig::default()
        });
        assert!(e.contains("both set"), "{e}");
    }

    /// Whether a key was set decides, not its value: the default URL
    /// written out beside `urls` is still two answers to one question.
    #[test]
    fn url_and_urls_conflict_by_presence_and_an_empty_list_is_refused() {
        let both = file(&format!(
            "[amqp]\nurl = \"{DEFAULT_AMQP_URL}\"\nurls = [\"amqp://a\"]\n"
        ));
        let d: Demo = load(Some(both.path()), env(&[])).unwrap();
        assert_eq!(d.amqp.validate(), Err(InvalidAmqp::UrlAndUrls));
        // The alias counts as setting `amqp.url`.
        let urls = file("[amqp]\nurls = [\"amqp://a\"]\n");
        let d: Demo = load(
            Some(urls.path()),
            env(&[("WARREN_AMQP_URL", DEFAULT_AMQP_URL)]),
        )
        .unwrap();
        assert_eq!(d.amqp.validate(), Err(InvalidAmqp::UrlAndUrls));

        let empty = file("[amqp]\nurls = []\n");
        let d: Demo = load(Some(empty.path()), env(&[])).unwrap();
        let e = d.amqp.validate().unwrap_err();
        assert_eq!(e, InvalidAmqp::NoUrls { key: "amqp.urls" });
        assert!(e.to_string().starts_with("amqp.urls: "), "{e}");
        let blank = AmqpConfig {
            urls: Some(vec![Secret::new("amqp://a"), Secret::new(" ")]),
            ..AmqpConfig::default()
        };
        let e = blank.validate().unwrap_err().to_string();
        assert!(e.starts_with("amqp.urls[1]: expected amqp://"), "{e}");

        // Neither set: the default node.
        assert_eq!(AmqpConfig::default().endpoints(), [DEFAULT_AMQP_URL]);
        assert_eq!(AmqpConfig::default().validate(), Ok(()));
    }

    #[test]
    fn urls_from_the_environment_are_a_toml_list() {
        let d: Demo = load(
            None,
            env(&[(
                "WARREN_AMQP__URLS",
                r#"["amqp://u:s3cret@a/%2f", "amqp://u:s3cret@b/%2f"]"#,
            )]),
        )
        .unwrap();
        assert_eq!(d.amqp.validate(), Ok(()));
        assert_eq!(
            d.amqp.endpoints(),
            ["amqp://u:s3cret@a/%2f", "amqp://u:s3cret@b/%2f"]
        );
        let d: Demo = load(None, env(&[("WARREN_AMQP__URLS", "[]")])).unwrap();
        assert_eq!(
            d.amqp.validate(),
            Err(InvalidAmqp::NoUrls { key: "amqp.urls" })
        );
        // Not a list: refused, naming the variable, without the password.
        for raw in ["amqp://u:s3cret@a/%2f", r#"["amqp://u:s3cret@a", 5]"#] {
            let e = load::<Demo>(None, env(&[("WARREN_AMQP__URLS", raw)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains("WARREN_AMQP__URLS"), "{e}");
            assert!(e.contains("expected a sequence"), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn toml_errors_do_not_quote_secret_lines() {
        let f = file("[amqp]\nurl = guest:s3cret@host\n");
        let e = load::<Demo>(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && !e.contains("s3cret"), "{e}");
        // A numeric-looking secret from the environment stays a string.
        let d: Demo = load(None, env(&[("WARREN_AMQP__URL", "12345")])).unwrap();
        assert_eq!(d.amqp.url_list(), "12345");
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_readable_pem_files() {
        let cert = file("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
        let key = file("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n");
        let ec_key = file("-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n");
        let with = |c: Option<&Path>, k: Option<&Path>, m: AuthMechanism| AmqpConfig {
            tls_cert_file: c.map(Path::to_owned),
            tls_key_file: k.map(Path::to_owned),
            auth_mechanism: m,
            ..AmqpConfig::default()
        };
        let plain = AuthMechanism::Plain;
        assert_eq!(
            with(Some(cert.path()), Some(key.path()), plain).validate(),
            Ok(())
        );
        assert_eq!(
            with(
                Some(cert.path()),
                Some(ec_key.path()),
                AuthMechanism::External
            )
            .validate(),
            Ok(())
        );
        let e = with(Some(cert.path()), None, plain).validate().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("amqp.tls_key_file: must be set together with amqp.tls_cert_file"),
            "{e}"
        );
        let e = with(None, Some(key.path()), plain).validate().unwrap_err();
        assert!(e.to_string().starts_with("amqp.tls_cert_file: "), "{e}");
        let e = with(None, None, AuthMechanism::External)
            .validate()
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("amqp.auth_mechanism = \"external\": needs"),
            "{e}"
        );
        let e = with(
            Some(cert.path()),
            Some(Path::new("/nonexistent/client.key")),
            plain,
        )
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("amqp.tls_key_file = \"/nonexistent/client.key\": cannot read"),
            "{e}"
        );
        // Certificate and key swapped: named, and the key's bytes not shown.
        let e = with(Some(key.path()), Some(cert.path()), plain)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("amqp.tls_cert_file = ") && e.ends_with("no PEM `CERTIFICATE` in it"),
            "{e}"
        );
        assert!(!e.contains("MIIE"), "{e}");
        let d: Demo = load(None, env(&[("WARREN_AMQP__AUTH_MECHANISM", "external")])).unwrap();
        assert_eq!(d.amqp.auth_mechanism, AuthMechanism::External);
    }

    #[test]
    fn host_name_is_never_empty() {
        assert!(!host_name().trim().is_empty());
    }

    #[test]
    fn topology_validation() {
        let mut t = TopologyConfig::default();
        assert!(t.validate().is_ok());
        t.queues.push(QueueConfig::default());
        assert!(t.validate().unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn a_section_lists_every_problem_and_validate_answers_the_first() {
        let amqp = AmqpConfig {
            urls: Some(vec![
                Secret::new("amqp://ok/%2f"),
                Secret::new("u:s3cret@h"),
                Secret::new("amqp://h:0/%2f"),
            ]),
            heartbeat: Duration::ZERO,
            tls_key_file: Some("/nonexistent/key.pem".into()),
            ..AmqpConfig::default()
        };
        let all = amqp.problems();
        let keys: Vec<String> = all
            .iter()
            .map(|e| {
                e.to_string()
                    .split([':', ' '])
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        assert_eq!(
            keys,
            [
                "amqp.urls[1]",
                "amqp.urls[2]",
                "amqp.heartbeat",
                "amqp.tls_cert_file",
                "amqp.tls_key_file"
            ],
            "{all:?}"
        );
        assert_eq!(amqp.validate(), Err(all[0].clone()));
        assert!(!format!("{all:?}").contains("s3cret"));

        let mut topo = TopologyConfig {
            prefix: "a.#".into(),
            ..TopologyConfig::default()
        };
        topo.queues[0].bindings.clear();
        assert_eq!(
            topo.problems(),
            [
                InvalidTopology::Prefix("a.#".into()),
                InvalidTopology::NoBindings("default".into())
            ]
        );
        let log = LogConfig {
            otlp_service_name: Some(String::new()),
            otlp_endpoint: Some("collector".into()),
            ..LogConfig::default()
        };
        assert_eq!(log.problems().len(), 2);
        assert_eq!(log.validate(), Err(InvalidLog::EmptyServiceName));
    }

    /// Each kind of mistake is its own variant, and reads as it did when
    /// these checks returned strings.
    #[test]
    fn validation_errors_are_typed_and_read_as_before() {
        let amqp = |f: fn(&mut AmqpConfig)| {
            let mut cfg = AmqpConfig::default();
            f(&mut cfg);
            cfg.validate().unwrap_err()
        };
        let e = amqp(|c| c.heartbeat = Duration::ZERO);
        assert_eq!(e, InvalidAmqp::ZeroHeartbeat);
        assert_eq!(e.to_string(), "amqp.heartbeat = 0s: must be at least 1s");
        let e = amqp(|c| c.confirm_timeout = Duration::ZERO);
        assert_eq!(e, InvalidAmqp::ZeroConfirmTimeout);
        assert_eq!(e.to_string(), "amqp.confirm_timeout = 0s: must be positive");
        let e = amqp(|c| c.url = Some(Secret::new("amqp://u:s3cret@h:0/%2f")));
        assert!(
            matches!(&e, InvalidAmqp::BadUrl { key, redacted, .. }
                if key == "amqp.url" && !redacted.contains("s3cret")),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "amqp.url = amqp://u:***@h:0/%2f: port 0 is out of range (1-65535)"
        );
        let e = amqp(|c| c.url = Some(Secret::new("u:s3cret@h")));
        assert_eq!(
            e,
            InvalidAmqp::NoScheme {
                key: "amqp.url".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "amqp.url: expected amqp://[user[:password]@]host[:port][/vhost] (or amqps://), \
             got a value without `amqp://` (not shown: it may contain a password)"
        );
        let e = amqp(|c| {
            c.url = Some(Secret::new("amqp://a"));
            c.urls = Some(vec![Secret::new("amqp://b")]);
        });
        assert_eq!(e, InvalidAmqp::UrlAndUrls);
        assert_eq!(
            e.to_string(),
            "amqp.url and amqp.urls are both set: give the node list in one of them"
        );

        let topo = |f: fn(&mut TopologyConfig)| {
            let mut t = TopologyConfig::default();
            f(&mut t);
            t.validate().unwrap_err()
        };
        let e = topo(|t| t.prefix = "a.#".into());
        assert_eq!(e, InvalidTopology::Prefix("a.#".into()));
        assert_eq!(
            e.to_string(),
            r#"topology.prefix: expected a non-empty name without # or *, got "a.#""#
        );
        let e = topo(|t| t.queues.clear());
        assert_eq!(e, InvalidTopology::NoQueues);
        assert_eq!(
            e.to_string(),
            "topology.queues: expected at least one work queue"
        );
        let e = topo(|t| t.queues[0].name.clear());
        assert_eq!(
            e.to_string(),
            r#"topology.queues: name "" is empty or used twice"#
        );
        let e = topo(|t| t.queues[0].bindings.clear());
        assert_eq!(e, InvalidTopology::NoBindings("default".into()));
        assert_eq!(
            e.to_string(),
            "topology.queues.default: expected at least one binding"
        );
    }
}
