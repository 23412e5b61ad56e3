//! The producer's one validation: [`ProducerConfig::validate`] (what serde
//! cannot check, one function per section) and [`check`], which adds the
//! schedules and workflows and hands back the [`Checked`] configuration,
//! compiled once. Every problem is collected into one [`Problems`] keyed by
//! config path (`api.max_batch`, `workflows[0].steps[1].after`; a schedule
//! by its name, `schedule `nightly``, as the API and the CLI name it too).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use warren::config::Problems;

use super::{compile_into, load_env, ProducerConfig, Schedule};
use crate::workflow::Workflow;

/// A configuration that passed [`check`], with what it compiles to.
#[derive(Debug)]
pub struct Checked {
    pub cfg: ProducerConfig,
    /// `[[schedules]]`, ready to fire.
    pub schedules: Vec<Schedule>,
    /// `[[workflows]]`, in config order (fixed until restart).
    pub workflows: Vec<Arc<Workflow>>,
}

/// Load the config (defaults < file < environment) and validate everything
/// but the schedules and workflows: what `publish` needs. Every error is a
/// [`ConfigError`](warren::config::ConfigError), so `main` exits 2 on it.
pub fn load(path: Option<&Path>) -> anyhow::Result<ProducerConfig> {
    let cfg = load_env(path)?;
    match cfg.validate() {
        Ok(()) => Ok(cfg),
        Err(p) => Err(p.into_error(warren::config::origin(path)).into()),
    }
}

/// The one validation of the producer, used by `run`, `schedules check`,
/// `schedules next` and SIGHUP: the whole config, schedules included, with
/// every problem in one message.
pub fn load_checked(path: Option<&Path>) -> anyhow::Result<Checked> {
    check(load_env(path)?, path)
}

/// Validate a config however it was made (a file, or built in code by a
/// library user): everything, schedules and workflows included, as one
/// [`ConfigError`](warren::config::ConfigError) naming `path` as its origin.
///
/// The definitions move into the compiled schedules: `cfg.schedules` of
/// the result is empty (the schedules in force are in `schedules`).
pub fn check(mut cfg: ProducerConfig, path: Option<&Path>) -> anyhow::Result<Checked> {
    let mut p = cfg.validate().err().unwrap_or_default();
    // Read before the definitions move; reported after the others, as ever.
    let mut unknown_workflows = Problems::new();
    check_schedule_workflows(&cfg, &mut unknown_workflows);
    let schedules = compile_into(std::mem::take(&mut cfg.schedules), &mut p);
    let workflows = match crate::workflow::definition::compile(&cfg.workflows) {
        Ok(w) => w.into_iter().map(Arc::new).collect(),
        Err(e) => {
            p.extend(e);
            Vec::new()
        }
    };
    p.extend(unknown_workflows);
    match p.into_result() {
        Ok(()) => Ok(Checked {
            cfg,
            schedules,
            workflows,
        }),
        Err(p) => Err(p.into_error(warren::config::origin(path)).into()),
    }
}

/// Each schedule that starts a workflow names one of `[[workflows]]`.
fn check_schedule_workflows(cfg: &ProducerConfig, p: &mut Problems) {
    for (i, s) in cfg.schedules.iter().enumerate() {
        if let Some(w) = &s.workflow {
            if !cfg.workflows.iter().any(|d| &d.name == w) {
                let known: Vec<&str> = cfg.workflows.iter().map(|d| d.name.as_str()).collect();
                let why = format!(
                    "unknown workflow {w:?} (workflows are: {})",
                    known.join(", ")
                );
                p.push(format!("schedules[{i}].workflow"), why);
            }
        }
    }
}

impl ProducerConfig {
    /// What serde cannot check, outside `[[schedules]]` and `[[workflows]]`
    /// (see [`check`]): every problem, each keyed by its config path.
    pub fn validate(&self) -> Result<(), Problems> {
        let mut p = Problems::new();
        p.push_errors(self.amqp.problems());
        p.push_errors(self.topology.problems());
        p.push_errors(self.log.problems());
        // Reads every secret now: `run`, `check`, `publish` and SIGHUP
        // refuse the same missing or short key.
        if let Err(e) = self.security.keyring() {
            p.push_value(e.key, e.value, e.why);
        }
        self.check_api(&mut p);
        self.check_console(&mut p);
        self.check_bounds(&mut p);
        p.into_result()
    }

    /// `[api]`: the tokens `run` would serve with (tokens file included),
    /// the JWT keys, the limits.
    fn check_api(&self, p: &mut Problems) {
        if let Err(e) = crate::auth::grant::grants(&self.api.token_sources()) {
            p.push_error(format!("{e:#}"));
        }
        if let Some(jwt) = &self.api.jwt {
            if let Err(e) = crate::jwt::JwtVerifier::from_config(jwt) {
                p.push_error(format!("{e:#}"));
            }
        }
        if self.api.metrics_listen == Some(self.http.addr) && self.http.addr.port() != 0 {
            let why = "must differ from http.addr";
            p.push_value("api.metrics_listen", self.http.addr, why);
        }
        if self.api.max_body_bytes == 0 {
            p.push_value("api.max_body_bytes", 0, "must be positive");
        }
        if self.api.max_batch == 0 {
            p.push_value("api.max_batch", 0, "must be at least 1");
        }
        if self.api.dead_scan_limit == 0 {
            p.push_value("api.dead_scan_limit", 0, "must be at least 1");
        }
    }

    /// `[console]`.
    fn check_console(&self, p: &mut Problems) {
        if self.console.session_ttl.is_zero() {
            p.push_value("console.session_ttl", "0s", "must be positive");
        }
        if self.console.dead_scan_limit == 0 {
            p.push_value("console.dead_scan_limit", 0, "must be at least 1");
        }
        if let Some(url) = &self.console.management_url {
            let u = url.expose();
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                p.push_value(
                    "console.management_url",
                    warren::config::redact_url(u),
                    "must start with http:// or https://",
                );
            }
        }
    }

    /// `[scheduler]`, `[workflow]`, `[events]` and `[leader]`: sizes and
    /// intervals.
    fn check_bounds(&self, p: &mut Problems) {
        if self.scheduler.compact_every < Duration::from_secs(1) {
            p.push_value(
                "scheduler.compact_every",
                humantime::format_duration(self.scheduler.compact_every),
                "must be at least 1s",
            );
        }
        self.workflow.check(p);
        p.push_errors(self.events.shared().problems());
        if self.events.index_size == 0 || self.events.index_size > 100_000_000 {
            let why = "expected 1 to 100000000";
            p.push_value("events.index_size", self.events.index_size, why);
        }
        if self.leader.retry_interval.is_zero() {
            p.push_value("leader.retry_interval", "0s", "must be positive");
        }
        if self.leader.stall_threshold.is_some_and(|d| d.is_zero()) {
            p.push_value("leader.stall_threshold", "0s", "must be positive");
        }
    }
}
