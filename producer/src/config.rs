//! The producer's configuration: one `ProducerConfig` (defaults < TOML file <
//! `WARREN_*` environment, unknown keys rejected) and its validation into
//! compiled [`Schedule`]s. Every key is documented in docs/configuration.md.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warren::config::{AmqpConfig, HttpConfig, LogConfig, Problems, Secret, TopologyConfig};
use warren::retry::RetryOverrides;
use warren::security::SecurityConfig;

use crate::auth::grant::{self, TokenSources};
use crate::auth::Tokens;
use crate::jwt::JwtVerifier;
use crate::schedule::{self, DstGap, DstOverlap, MisfirePolicy, Spec};
use crate::workflow::{WorkflowConfig, WorkflowSettings};

mod check;

// What a config holds, under the names library users know.
pub use crate::auth::grant::{hashed_token, Scope, TokenConfig};
pub use crate::jwt::JwtConfig;

pub use check::{check, load, load_checked, Checked};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    pub amqp: AmqpConfig,
    pub topology: TopologyConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub api: ApiConfig,
    pub leader: LeaderConfig,
    pub console: ConsoleConfig,
    pub schedules: Vec<ScheduleConfig>,
    /// Keys; `sign_with` and `encrypt_with` apply to every publish.
    pub security: SecurityConfig,
    /// `[[workflows]]`: DAGs of steps (docs/workflows.md).
    pub workflows: Vec<WorkflowConfig>,
    /// `[workflow]`: bounds of the coordinator's run state.
    pub workflow: WorkflowSettings,
    /// `[scheduler]`: bounds of the schedule book and its state.
    pub scheduler: SchedulerConfig,
    /// `[metrics]`: how many series `/metrics` may hold.
    pub metrics: MetricsConfig,
    /// `[events]`: task events this replica records, and its index of them
    /// (docs/tasks.md).
    pub events: ProducerEventsConfig,
}

/// `[events]` of the producer: the keys both roles share, and the index.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerEventsConfig {
    /// Record `published` for what this replica publishes. The index is
    /// kept either way (consumers may record).
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub max_bytes: u64,
    /// Most tasks the index holds; the oldest first seen go first.
    pub index_size: usize,
}

impl Default for ProducerEventsConfig {
    fn default() -> Self {
        let shared = warren::config::EventsConfig::default();
        Self {
            enabled: shared.enabled,
            max_age: shared.max_age,
            max_bytes: shared.max_bytes,
            index_size: 1_000_000,
        }
    }
}

impl ProducerEventsConfig {
    /// The keys both roles share.
    pub fn shared(&self) -> warren::config::EventsConfig {
        warren::config::EventsConfig {
            enabled: self.enabled,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
        }
    }
}

/// `[scheduler]` (docs/schedules.md#at-scale).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Most schedules the API may hold (config-file ones not counted).
    pub max_schedules: usize,
    /// How often the leader writes a compacted snapshot of every cursor
    /// (between two, each fire appends a small record to a stream).
    #[serde(with = "humantime_serde")]
    pub compact_every: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_schedules: 100_000,
            compact_every: Duration::from_secs(15),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Schedules with series of their own (`warren_producer_schedule_*`,
    /// next and last fire); the role-wide series count every schedule.
    pub per_schedule_limit: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            per_schedule_limit: 100,
        }
    }
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            amqp: AmqpConfig::default(),
            topology: TopologyConfig::default(),
            http: HttpConfig {
                addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            },
            log: LogConfig::default(),
            api: ApiConfig::default(),
            leader: LeaderConfig::default(),
            console: ConsoleConfig::default(),
            schedules: Vec::new(),
            security: SecurityConfig::default(),
            workflows: Vec::new(),
            workflow: WorkflowSettings::default(),
            scheduler: SchedulerConfig::default(),
            metrics: MetricsConfig::default(),
            events: ProducerEventsConfig::default(),
        }
    }
}

/// The HTTP API (`/v1/...`) and its bearer tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve `/v1/...` at all.
    pub enabled: bool,
    /// Token with the `read` scope (env `WARREN_API__READ_TOKEN`).
    pub read_token: Option<Secret>,
    /// Token with the `read` and `publish` scopes (env `WARREN_API__PUBLISH_TOKEN`).
    pub publish_token: Option<Secret>,
    /// Token with the `read`, `publish` and `admin` scopes (env `WARREN_API__ADMIN_TOKEN`).
    pub admin_token: Option<Secret>,
    /// More tokens, each with its own scopes.
    pub tokens: Vec<TokenConfig>,
    /// A file of tokens, one per line: `<scope>[,<scope>] <token> [name]`; `#` comments.
    pub tokens_file: Option<PathBuf>,
    /// Largest request body accepted (bytes); larger → 413.
    pub max_body_bytes: usize,
    /// Most tasks in one `POST /v1/tasks` array; more → 413.
    pub max_batch: usize,
    /// Serve the operator console under `/ui/` (see [`ConsoleConfig`]).
    pub console: bool,
    /// Most dead messages one `/v1/dead` request looks at (overview, list,
    /// inspect, replay, purge of a selection); counts come from the broker.
    pub dead_scan_limit: usize,
    /// JWT bearer tokens from an identity provider, besides static tokens.
    pub jwt: Option<JwtConfig>,
    /// Serve `/metrics`, `/healthz`, `/readyz` on this address instead of
    /// `http.addr` (which then serves only the API and the console).
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            read_token: None,
            publish_token: None,
            admin_token: None,
            tokens: Vec::new(),
            tokens_file: None,
            max_body_bytes: 1024 * 1024,
            max_batch: 1000,
            console: true,
            dead_scan_limit: 10_000,
            jwt: None,
            metrics_listen: None,
        }
    }
}

impl ApiConfig {
    /// Where this config names tokens (see [`grant::grants`]).
    pub fn token_sources(&self) -> TokenSources<'_> {
        TokenSources {
            read_token: self.read_token.as_ref(),
            publish_token: self.publish_token.as_ref(),
            admin_token: self.admin_token.as_ref(),
            tokens: &self.tokens,
            tokens_file: self.tokens_file.as_deref(),
        }
    }

    /// The tokens the API serves with: every grant (the tokens file read
    /// now) and the JWT check if `[api.jwt]` is set.
    pub fn tokens(&self) -> anyhow::Result<Tokens> {
        let jwt = self
            .jwt
            .as_ref()
            .map(JwtVerifier::from_config)
            .transpose()?;
        Ok(Tokens::new(grant::grants(&self.token_sources())?, jwt))
    }
}

/// The operator console under `/ui/` (on while `api.console`; docs/console.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// A session unused this long is signed out.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// RabbitMQ management API (`http://user:pass@host:15672`): publish and
    /// deliver rates and unacked counts. Optional; never required.
    pub management_url: Option<Secret>,
    /// Dead letters the workbench reads to group them and to find one
    /// (counts come from the broker); replay and purge go through all.
    pub dead_scan_limit: usize,
    /// Accept `GET /ui/login?token=…` as a sign-in (a link a terminal can
    /// print). For a local demo only (`deploy/run.sh` turns it on): a token
    /// in a URL can end up in history and proxy logs.
    pub link_login: bool,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(8 * 3600),
            management_url: None,
            dead_scan_limit: 1000,
            link_login: false,
        }
    }
}

/// Leader election (docs/design.md, "Leader election: design and limits").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderConfig {
    /// Elect one scheduler among replicas. Off: this process always fires
    /// (only safe with a single replica).
    pub enabled: bool,
    /// How often a standby tries to take the lock.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// A leader whose own runtime stalled this long (SIGSTOP, VM pause, swap)
    /// steps down instead of publishing: the broker may have dropped its lock
    /// meanwhile. Default: the AMQP heartbeat.
    #[serde(with = "humantime_serde")]
    pub stall_threshold: Option<Duration>,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retry_interval: Duration::from_secs(1),
            stall_threshold: None,
        }
    }
}

/// One `[[schedules]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    pub cron: String,
    #[serde(default = "default_tz")]
    pub timezone: String,
    /// The task each fire publishes (or set `workflow`).
    #[serde(default)]
    pub task: String,
    /// Start a run of this workflow instead of publishing a task: the
    /// payload is the run's input, the fire id its run id.
    #[serde(default)]
    pub workflow: Option<String>,
    #[serde(default = "default_payload")]
    pub payload: toml::Value,
    #[serde(default)]
    pub priority: Option<u8>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// The same keys as the consumer's `retry.tasks."<name>"`.
    #[serde(default)]
    pub retry: Option<RetryOverrides>,
    #[serde(default)]
    pub misfire: MisfirePolicy,
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub misfire_grace: Duration,
    #[serde(default = "default_max_catch_up")]
    pub max_catch_up: usize,
    #[serde(default)]
    pub dst_gap: DstGap,
    #[serde(default)]
    pub dst_overlap: DstOverlap,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl ScheduleConfig {
    /// The retry overrides of this schedule's tasks: `retry`, with the
    /// schedule's own `max_attempts` (validation allows only one of the two).
    pub fn retry(&self) -> RetryOverrides {
        let r = self.retry.unwrap_or_default();
        RetryOverrides {
            max_attempts: self.max_attempts.or(r.max_attempts),
            ..r
        }
    }
}

fn default_tz() -> String {
    "UTC".into()
}
fn default_payload() -> toml::Value {
    toml::Value::Table(toml::Table::new())
}
fn default_grace() -> Duration {
    Duration::from_secs(300)
}
fn default_max_catch_up() -> usize {
    100
}
fn default_true() -> bool {
    true
}

/// Where a schedule comes from (`source` in the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `[[schedules]]` in the config file: read-only through the API.
    #[default]
    Config,
    /// Created through the API or `schedules apply`, stored in RabbitMQ.
    Api,
}

impl Origin {
    pub fn label(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Api => "api",
        }
    }
}

/// A validated schedule, ready to fire.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub cfg: ScheduleConfig,
    pub spec: Spec,
    /// The payload as JSON bytes.
    pub payload: Vec<u8>,
    pub origin: Origin,
    /// The catalog's version of an API schedule (its `ETag`); 0 for the
    /// config file's.
    pub version: u64,
}

/// The schedules in force (replaced whole on reload).
pub type ScheduleSet = Arc<Vec<Schedule>>;

impl Schedule {
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// What it fires, for people: the task name, or `workflow <name>`.
    pub fn target(&self) -> String {
        match &self.cfg.workflow {
            Some(w) => format!("workflow {w}"),
            None => self.cfg.task.clone(),
        }
    }

    /// The task for the fire at `instant` (or a manual trigger with `id`).
    pub fn task(&self, id: String) -> warren::Task {
        let mut t = warren::Task::from_raw(self.cfg.task.clone(), self.payload.clone());
        t.id = id;
        t.schedule = Some(self.cfg.name.clone());
        // Each fire is a trace of its own (its retries share it).
        t.trace = Some(warren::trace::TraceContext::new_root());
        t.priority = self.cfg.priority;
        t.timeout = self.cfg.timeout;
        let retry = self.cfg.retry();
        t.max_attempts = retry.max_attempts;
        t.retry = RetryOverrides {
            max_attempts: None,
            ..retry
        };
        t
    }
}

/// Validate every schedule; all problems at once, each naming its schedule.
/// Longest schedule name: `<name>@<instant>` must fit a task id (an AMQP
/// short string, 255 bytes) with room for the instant.
pub const MAX_SCHEDULE_NAME_LEN: usize = 200;

/// One schedule definition, checked as a `[[schedules]]` entry would be
/// (name, task, cron, zone, retry, workflow): the API's and the CLI's
/// validation, every problem at once.
pub fn compile_one(def: &ScheduleConfig, workflows: &[String]) -> Result<Schedule, Vec<String>> {
    let mut errors = Vec::new();
    if let Some(w) = &def.workflow {
        if !workflows.iter().any(|d| d == w) {
            errors.push(format!(
                "workflow: unknown workflow {w:?} (workflows are: {})",
                workflows.join(", ")
            ));
        }
    }
    match compile_schedules(std::slice::from_ref(def)) {
        Ok(mut v) if errors.is_empty() => Ok(v.remove(0)),
        Ok(_) => Err(errors),
        Err(p) => {
            // The entry's own key (`schedule `x``) says nothing more than
            // the request already does.
            let who = schedule_key(0, def);
            errors.extend(p.iter().map(|x| match x.path == who {
                true => x.message.clone(),
                false => x.to_string(),
            }));
            Err(errors)
        }
    }
}

/// Validate every schedule; all problems at once, each naming its schedule.
pub fn compile_schedules(list: &[ScheduleConfig]) -> Result<Vec<Schedule>, Problems> {
    let mut p = Problems::new();
    let out = compile_into(list.to_vec(), &mut p);
    p.into_result().map(|()| out)
}

/// The schedules of `list` that compile; the problems of the others go to
/// `p`. Each definition moves into its schedule: with 100,000 schedules a
/// second copy of every definition was about 40 MB.
pub(crate) fn compile_into(list: Vec<ScheduleConfig>, p: &mut Problems) -> Vec<Schedule> {
    let mut out = Vec::with_capacity(list.len());
    let mut names = HashSet::new();
    for (i, s) in list.into_iter().enumerate() {
        let who = schedule_key(i, &s);
        let mut err = |m: String| p.push(who.as_str(), m);
        check_schedule_name(&s, &mut names, &mut err);
        check_schedule_target(&s, &mut err);
        check_schedule_retry(&s, &mut err);
        if s.max_catch_up == 0 {
            err("`max_catch_up` must be at least 1".into());
        }
        if let Some(schedule) = compile_schedule(s, &mut err) {
            out.push(schedule);
        }
    }
    out
}

/// How problems name a schedule: by its name, or its index without one.
fn schedule_key(i: usize, s: &ScheduleConfig) -> String {
    if s.name.is_empty() {
        format!("schedules[{i}]")
    } else {
        format!("schedule `{}`", s.name)
    }
}

fn check_schedule_name(
    s: &ScheduleConfig,
    names: &mut HashSet<String>,
    err: &mut impl FnMut(String),
) {
    if s.name.is_empty() {
        err("`name` is empty".into());
    } else if !s
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        err("`name` may only contain ASCII letters, digits, `-`, `_`, `.` and `:`".into());
    } else if s.name.len() > MAX_SCHEDULE_NAME_LEN {
        err(format!(
            "`name` is longer than {MAX_SCHEDULE_NAME_LEN} bytes (it starts every task id of the schedule)"
        ));
    } else if !names.insert(s.name.clone()) {
        err("duplicate name (schedule names must be unique)".into());
    }
}

/// `task` or `workflow`, one of the two.
fn check_schedule_target(s: &ScheduleConfig, err: &mut impl FnMut(String)) {
    if s.workflow.is_some() {
        if !s.task.is_empty() {
            err("set either `task` or `workflow`, not both".into());
        }
    } else if s.task.is_empty() {
        err("`task` is empty (or set `workflow`)".into());
    } else if s.task.len() > warren::delay::MAX_TASK_NAME_LEN {
        err(format!(
            "`task` is longer than {} bytes",
            warren::delay::MAX_TASK_NAME_LEN
        ));
    }
}

/// `max_attempts` and `retry`, by the consumer's rules.
fn check_schedule_retry(s: &ScheduleConfig, err: &mut impl FnMut(String)) {
    let in_retry = s.retry.and_then(|r| r.max_attempts);
    if s.max_attempts.is_some() && in_retry.is_some() {
        err("`max_attempts` is set both on the schedule and in `retry`: keep one".into());
    } else if let Err(e) = s.retry().validate() {
        let field = match &e {
            warren::retry::Invalid::NoAttempts if in_retry.is_none() => "max_attempts".to_owned(),
            _ => format!("retry.{}", e.field()),
        };
        err(format!("`{field}` = {}: {}", e.value(), e.rule()));
    }
}

/// Payload, zone and cron, each needed by the next: the first that fails
/// ends the schedule's checks.
fn compile_schedule(s: ScheduleConfig, err: &mut impl FnMut(String)) -> Option<Schedule> {
    let payload = serde_json::to_vec(&s.payload)
        .map_err(|e| err(format!("`payload` is not representable as JSON: {e}")))
        .ok()?;
    let tz = schedule::parse_tz(&s.timezone)
        .map_err(|e| err(format!("timezone: {e}")))
        .ok()?;
    let spec = schedule::parse(&s.cron, tz, s.dst_gap, s.dst_overlap)
        .map_err(|e| err(format!("cron: {e}")))
        .ok()?;
    if s.enabled && spec.next_after(chrono::Utc::now()).is_none() {
        err(format!("cron: `{}` never fires again", s.cron));
        return None;
    }
    Some(Schedule {
        cfg: s,
        spec,
        payload,
        origin: Origin::Config,
        version: 0,
    })
}

/// Defaults < file < `WARREN_*` environment, before any validation.
fn load_env(path: Option<&Path>) -> anyhow::Result<ProducerConfig> {
    let env = warren::config::process_env();
    Ok(warren::config::load_with_array(
        path,
        env,
        "schedules",
        schedules_of,
    )?)
}

fn schedules_of(cfg: &mut ProducerConfig) -> &mut Vec<ScheduleConfig> {
    &mut cfg.schedules
}

/// Keys SIGHUP applies without a restart: the schedules, the API tokens
/// and the signing and encryption keys.
const RELOADABLE: &[&str] = &[
    "schedules",
    "security",
    "api.read_token",
    "api.publish_token",
    "api.admin_token",
    "api.tokens",
    "api.tokens_file",
];

/// The keys that differ between the running config and a reloaded one but
/// only take effect after a restart (`http.addr`, `leader.enabled`, ...).
/// Names only: values may be secrets.
pub fn restart_only_changes(running: &ProducerConfig, reloaded: &ProducerConfig) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        if RELOADABLE.contains(&prefix) || a == b {
            return;
        }
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    let null = serde_json::Value::Null;
                    walk(
                        &path,
                        a.get(k).unwrap_or(&null),
                        b.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }
    let (Ok(a), Ok(b)) = (
        serde_json::to_value(running),
        serde_json::to_value(reloaded),
    ) else {
        return vec!["(config not comparable)".into()];
    };
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::auth::grant::token_digest;

    fn parse(text: &str) -> ProducerConfig {
        toml::from_str(text).unwrap()
    }

    fn lines(p: Problems) -> Vec<String> {
        p.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn hashed_tokens_and_jwt_keys_are_checked_naming_the_key() {
        let token = "a-token-only-its-holder-knows-42";
        let cfg = parse(&format!(
            "[[api.tokens]]\ntoken = \"{}\"\nscopes = [\"read\"]\n",
            hashed_token(token.as_bytes())
        ));
        let grants = grant::grants(&cfg.api.token_sources()).unwrap();
        assert_eq!(grants[0].digest, token_digest(token.as_bytes()));
        // A digest is not held to the 16-character minimum of a token, but
        // must be one.
        let bad = parse("[[api.tokens]]\ntoken = \"sha256:abc\"\nscopes = [\"read\"]\n");
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("api.tokens[0]: `sha256:` must be followed by the 64 hex digits"),
            "{e}"
        );
        let e = parse("[api]\nread_token = \"short\"\n")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("api.read_token: API tokens must be at least 16 characters"),
            "{e}"
        );

        let jwt = |extra: &str| {
            parse(&format!(
                "[api.jwt]\nissuer = \"https://idp/\"\naudience = \"warren\"\n{extra}"
            ))
            .validate()
            .unwrap_err()
            .to_string()
        };
        assert!(
            jwt("").contains("api.jwt: no key to check tokens with"),
            "{}",
            jwt("")
        );
        let e = jwt("hs256_secret_file = \"/nonexistent/jwt.secret\"\n");
        assert!(
            e.starts_with("api.jwt.hs256_secret_file /nonexistent/jwt.secret: cannot read"),
            "{e}"
        );
        let short = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(short.path(), "too-short").unwrap();
        let e = jwt(&format!(
            "hs256_secret_file = {:?}\n",
            short.path().display().to_string()
        ));
        assert!(
            e.contains("at least 32 bytes") && !e.contains("too-short"),
            "{e}"
        );
        let e = jwt(&format!(
            "public_key_files = [{:?}]\n",
            short.path().display().to_string()
        ));
        assert!(e.starts_with("api.jwt.public_key_files[0] "), "{e}");
    }

    #[test]
    fn every_grant_has_a_name_and_admin_is_a_scope() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(
            &file,
            "# scopes token [name]\nadmin,read file-token-a-0123456789 ops-oncall\n\
             read file-token-b-0123456789\n",
        )
        .unwrap();
        let mut cfg = parse(
            r#"
            [api]
            admin_token = "admin-token-0123456789"
            tokens = [
              { token = "cfg-token-a-0123456789", scopes = ["publish"], name = "ci" },
              { token = "cfg-token-b-0123456789", scopes = ["admin"] },
            ]
            "#,
        );
        cfg.api.tokens_file = Some(file.clone());
        let grants = grant::grants(&cfg.api.token_sources()).unwrap();
        let named: Vec<(&str, &[Scope])> = grants
            .iter()
            .map(|g| (g.name.as_str(), g.scopes.as_slice()))
            .collect();
        let second_line = format!("{}:3", file.display());
        assert_eq!(
            named,
            vec![
                (
                    "admin_token",
                    &[Scope::Read, Scope::Publish, Scope::Admin][..]
                ),
                ("ci", &[Scope::Publish][..]),
                ("tokens[1]", &[Scope::Admin][..]),
                ("ops-oncall", &[Scope::Admin, Scope::Read][..]),
                (second_line.as_str(), &[Scope::Read][..]),
            ]
        );
        std::fs::write(&file, "root file-token-c-0123456789\n").unwrap();
        let err = grant::grants(&cfg.api.token_sources())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("unknown scope `root` (read, publish, admin)"),
            "{err}"
        );
        std::fs::write(&file, "read file-token-c-0123456789 a b\n").unwrap();
        let err = grant::grants(&cfg.api.token_sources())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("line 1: expected"), "{err}");
    }

    #[test]
    fn events_keys_are_checked_naming_the_key() {
        let cfg = parse("[events]\nindex_size = 0\nmax_age = \"5s\"\nmax_bytes = 1\n");
        let errors = cfg.validate().unwrap_err().to_string();
        for key in ["events.index_size", "events.max_age", "events.max_bytes"] {
            assert!(errors.contains(key), "{key}: {errors}");
        }
        assert!(parse("[events]\nenabled = false\n").validate().is_ok());
    }

    #[test]
    fn runs_without_any_config() {
        let cfg: ProducerConfig = warren::config::load(None, Vec::new()).unwrap();
        assert!(cfg.schedules.is_empty());
        assert_eq!(cfg.http.addr.port(), 8080);
        assert!(cfg.leader.enabled);
    }

    #[test]
    fn full_schedule_parses() {
        let cfg = parse(
            r#"
            [[schedules]]
            name = "nightly-report"
            cron = "0 2 * * *"
            timezone = "Europe/Berlin"
            task = "report.daily"
            payload = { format = "pdf", recipients = ["ops@example.com"] }
            priority = 5
            max_attempts = 3
            timeout = "10m"
            retry = { initial_delay = "30s", multiplier = 2.0 }
            misfire = "fire_once"
            misfire_grace = "2h"
            dst_gap = "skip"
            dst_overlap = "both"
            "#,
        );
        let s = compile_schedules(&cfg.schedules).unwrap();
        assert_eq!(s.len(), 1);
        let t = s[0].task("x".into());
        assert_eq!(t.name, "report.daily");
        assert_eq!(t.priority, Some(5));
        assert_eq!(t.schedule.as_deref(), Some("nightly-report"));
        let v: serde_json::Value = serde_json::from_slice(&t.payload).unwrap();
        assert_eq!(v["format"], "pdf");
        assert_eq!(s[0].cfg.misfire, MisfirePolicy::FireOnce);
        assert_eq!(t.max_attempts, Some(3));
        assert_eq!(t.retry.initial_delay, Some(Duration::from_secs(30)));
        assert_eq!(t.retry.multiplier, Some(2.0));
    }

    /// A schedule's `retry` table takes the consumer's `retry.tasks` keys and
    /// is checked by the same validation, with the same messages.
    #[test]
    fn schedule_retry_uses_the_consumer_keys_and_checks() {
        let e = toml::from_str::<ProducerConfig>(
            "[[schedules]]\nname='a'\ncron='@daily'\ntask='t'\nretry={initial='30s'}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`initial`") && e.contains("initial_delay"),
            "{e}"
        );

        let one = |retry: &str, extra: &str| {
            let cfg = parse(&format!(
                "[[schedules]]\nname='a'\ncron='@daily'\ntask='t'\n{extra}retry={retry}\n"
            ));
            compile_schedules(&cfg.schedules).map_err(lines)
        };
        let s = one(
            "{ max_attempts = 4, initial_delay = '1s', max_delay = '1m' }",
            "",
        )
        .unwrap();
        let t = s[0].task("x".into());
        assert_eq!(t.max_attempts, Some(4));
        assert_eq!(t.retry.max_attempts, None);
        assert_eq!(t.retry.max_delay, Some(Duration::from_secs(60)));

        let errs = one("{ jitter = 5.0 }", "").unwrap_err();
        assert_eq!(
            errs,
            ["schedule `a`: `retry.jitter` = 5.0: must be between 0 and 1"]
        );
        let errs = one("{ initial_delay = '90s', max_delay = '1m' }", "").unwrap_err();
        assert_eq!(
            errs,
            ["schedule `a`: `retry.max_delay` = 1m: must not be shorter than initial_delay (1m 30s)"]
        );
        let errs = one("{ max_attempts = 0 }", "").unwrap_err();
        assert_eq!(
            errs,
            ["schedule `a`: `retry.max_attempts` = 0: must be at least 1"]
        );
        let errs = one("{}", "max_attempts = 0\n").unwrap_err();
        assert_eq!(
            errs,
            ["schedule `a`: `max_attempts` = 0: must be at least 1"]
        );
        let errs = one("{ max_attempts = 3 }", "max_attempts = 2\n").unwrap_err();
        assert!(errs[0].contains("set both"), "{errs:?}");
    }

    #[test]
    fn errors_name_the_schedule() {
        let cfg = parse(
            r#"
            [[schedules]]
            name = "a"
            cron = "0 2 * *"
            task = "t"
            [[schedules]]
            name = "b"
            cron = "@daily"
            timezone = "Europe/Atlantis"
            task = "t"
            [[schedules]]
            name = "a"
            cron = "@daily"
            task = "t"
            "#,
        );
        let errs = lines(compile_schedules(&cfg.schedules).unwrap_err());
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("schedule `a`: cron:"), "{errs:?}");
        assert!(errs[1].contains("schedule `b`: timezone"), "{errs:?}");
        assert!(errs[2].contains("schedule `a`: duplicate"), "{errs:?}");
    }

    #[test]
    fn reload_names_restart_only_keys_but_not_tokens_or_schedules() {
        let running = ProducerConfig::default();
        let mut reloaded = parse(
            "[http]\naddr = \"127.0.0.1:9\"\n[leader]\nenabled = false\n\
             [api]\npublish_token = \"a-rotated-token-0123456789\"\n\
             [[schedules]]\nname = \"a\"\ncron = \"@daily\"\ntask = \"t\"\n",
        );
        reloaded.amqp.url = Some(Secret::new("amqp://u:other-password@elsewhere/%2f"));
        let keys = restart_only_changes(&running, &reloaded);
        assert_eq!(keys, ["amqp.url", "http.addr", "leader.enabled"]);
        assert!(restart_only_changes(&running, &running).is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = toml::from_str::<ProducerConfig>(
            "[[schedules]]\nname='a'\ncron='@daily'\ntask='t'\nmisfier='skip'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("misfier"), "{e}");
    }
}
