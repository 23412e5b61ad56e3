//! The consumer's configuration: one [`ConsumerConfig`] loaded from defaults <
//! TOML file < `WARREN_*` environment (see [`warren::config`]), validated before
//! anything connects. Every key is documented in docs/configuration.md and in
//! `deploy/consumer.toml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warren::config::{AmqpConfig, HttpConfig, LogConfig, TopologyConfig};
use warren::retry::{RetryOverrides, RetryPolicy};
use warren::security::SecurityConfig;

mod check;

/// Default address of `/metrics`, `/healthz`, `/readyz`.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:9090";

/// Everything `warren-consumer` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    pub amqp: AmqpConfig,
    pub topology: TopologyConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub worker: WorkerConfig,
    pub retry: RetryConfig,
    /// Task name (or topic pattern with `*` / `#`) → built-in handler.
    pub handlers: BTreeMap<String, HandlerSpec>,
    /// Keys; signature verification (`verify`) and decryption.
    pub security: SecurityConfig,
    /// Task name (or pattern) → concurrency and rate limits, per process.
    pub limits: BTreeMap<String, LimitSpec>,
    /// Workflow steps: how large a result the step event carries.
    pub workflow: StepResultConfig,
    /// `[events]`: this consumer's task events (docs/tasks.md).
    pub events: warren::config::EventsConfig,
    /// Task names (or topic patterns) whose result is kept in their
    /// `succeeded` event, up to `workflow.max_result_bytes` (docs/tasks.md#results).
    pub results: Vec<String>,
}

/// `[workflow]` (docs/workflows.md#results).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StepResultConfig {
    /// A step result larger than this (as JSON) is dropped; the event says so.
    pub max_result_bytes: usize,
}

impl Default for StepResultConfig {
    fn default() -> Self {
        Self {
            max_result_bytes: 64 * 1024,
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            amqp: AmqpConfig::default(),
            topology: TopologyConfig::default(),
            http: HttpConfig {
                addr: default_http_addr(),
            },
            log: LogConfig::default(),
            worker: WorkerConfig::default(),
            retry: RetryConfig::default(),
            handlers: BTreeMap::new(),
            security: SecurityConfig::default(),
            limits: BTreeMap::new(),
            workflow: StepResultConfig::default(),
            events: warren::config::EventsConfig::default(),
            results: Vec::new(),
        }
    }
}

fn default_http_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}

/// How deliveries are taken and run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Short names of the `topology.queues` to consume; empty = all of them.
    pub queues: Vec<String>,
    /// Unacked deliveries the broker may push per queue (per-channel QoS).
    pub prefetch: u16,
    /// Tasks running at once in this process.
    pub concurrency: usize,
    /// Time a handler may take before the attempt counts as failed
    /// (retryable); the `x-warren-timeout-ms` header overrides it per task.
    #[serde(with = "humantime_serde")]
    pub task_timeout: Duration,
    /// Largest body accepted; bigger messages are dead-lettered as `oversized`.
    pub max_body_bytes: usize,
    /// On SIGTERM/SIGINT, how long running tasks may still finish before the
    /// connection is closed (unfinished tasks go back to the queue).
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    /// Runtime worker threads of the `warren-consumer` binary; unset = one per
    /// two CPUs (at least one). lapin's I/O thread is busy besides them, and
    /// the built-in handlers wait rather than compute, so fewer threads mean
    /// fewer cross-thread wake-ups per delivery (docs/benchmarks.md).
    pub threads: Option<usize>,
}

impl WorkerConfig {
    /// The runtime worker threads `threads` asks for, on this machine.
    pub fn runtime_threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cpus / 2).max(1)
        })
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            prefetch: 64,
            concurrency: 32,
            task_timeout: Duration::from_secs(300),
            max_body_bytes: 1 << 20,
            drain_grace: Duration::from_secs(30),
            threads: None,
        }
    }
}

/// The default retry policy and per-task-name overrides.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub default: RetryPolicy,
    /// Task name (or pattern) → fields that differ from `default` (unset
    /// fields come from `default`).
    pub tasks: BTreeMap<String, RetryOverrides>,
}

impl RetryConfig {
    /// The configured policy for a task name (before message header overrides).
    pub fn policy_for(&self, task: &str) -> RetryPolicy {
        if let Some(o) = self.tasks.get(task) {
            return o.apply(self.default);
        }
        self.tasks
            .iter()
            .find(|(pat, _)| crate::handler::pattern_matches(pat, task))
            .map(|(_, o)| o.apply(self.default))
            .unwrap_or(self.default)
    }
}

/// A built-in handler selected from config (`kind = "..."`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum HandlerSpec {
    /// Does nothing but log the task at info.
    Noop {},
    /// Sleeps for the payload's `sleep_ms` (number) or `duration` ("2s"),
    /// else for `duration` from config.
    Sleep {
        #[serde(default = "default_sleep", with = "humantime_serde")]
        duration: Duration,
    },
    /// POSTs the payload to `url`.
    Http {
        url: String,
        /// Per-request timeout (connect + response).
        #[serde(default = "default_http_timeout", with = "humantime_serde")]
        timeout: Duration,
        /// Extra request headers (e.g. `Authorization`).
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// Circuit breaker for this entry (off unless this table is present).
        #[serde(default)]
        breaker: Option<BreakerSpec>,
    },
    /// Runs `argv` (no shell) with the payload on stdin.
    Exec {
        argv: Vec<String>,
        /// Exit codes that fail the task permanently (others are retryable).
        #[serde(default)]
        permanent_exit_codes: Vec<i32>,
        /// Working directory (default: the consumer's).
        #[serde(default)]
        cwd: Option<PathBuf>,
        /// Extra environment variables for the process.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Variables of the consumer's own environment the process may see
        /// besides the safe set (PATH, HOME, LANG, LC_*, TZ, TMPDIR); a
        /// `WARREN_*` one only when named here.
        #[serde(default)]
        pass_env: Vec<String>,
        /// Kill the process group after this long (default: the task timeout).
        #[serde(default, with = "humantime_serde")]
        timeout: Option<Duration>,
    },
}

/// `limits."<pattern>"`: how many of the matching tasks run at once and how
/// many start per unit of time, in this process.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSpec {
    /// Tasks running at once.
    pub concurrency: Option<usize>,
    /// Tasks started per second, minute or hour: `"50/s"`, `"300/m"`, `"1000/h"`.
    pub rate: Option<String>,
    /// Tasks that may start at once after a quiet spell (default: 100 ms
    /// worth of `rate`, at least 1).
    pub burst: Option<u32>,
}

impl LimitSpec {
    /// The parsed rate and the burst that goes with it.
    pub fn rate(
        &self,
    ) -> Result<Option<(crate::flow::rate::Rate, u32)>, crate::flow::rate::BadRate> {
        let Some(text) = &self.rate else {
            return Ok(None);
        };
        let rate: crate::flow::rate::Rate = text.parse()?;
        Ok(Some((
            rate,
            self.burst.unwrap_or_else(|| rate.default_burst()),
        )))
    }
}

/// `handlers."<name>".breaker` of an `http` handler.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSpec {
    /// Consecutive retryable failures that open the breaker.
    pub failures: u32,
    /// How long it stays open before one probe is let through.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// How long after its first failure (or first park) a task may be kept
    /// back by the open breaker without spending attempts; after that each
    /// refusal is a failed attempt.
    #[serde(with = "humantime_serde")]
    pub max_park: Duration,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        Self {
            failures: 5,
            cooldown: Duration::from_secs(30),
            max_park: Duration::from_secs(3600),
        }
    }
}

fn default_sleep() -> Duration {
    Duration::from_secs(1)
}

fn default_http_timeout() -> Duration {
    Duration::from_secs(30)
}

impl ConsumerConfig {
    /// Load from defaults < `path` < `env`, then validate: every problem
    /// at once, each naming its key.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let cfg: Self = warren::config::load(path, env)?;
        cfg.validate()
            .map_err(|p| p.into_error(warren::config::origin(path)))?;
        Ok(cfg)
    }

    /// Full names of the queues this worker consumes.
    pub fn queue_names(&self) -> Vec<String> {
        let topo = warren::Topology::new(&self.topology);
        if self.worker.queues.is_empty() {
            topo.work_queues().iter().map(|q| q.name.clone()).collect()
        } else {
            self.worker
                .queues
                .iter()
                .filter_map(|q| topo.work_queue(q).map(|w| w.name.clone()))
                .collect()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn load(text: &str) -> anyhow::Result<ConsumerConfig> {
        let f = file(text);
        ConsumerConfig::load(Some(f.path()), Vec::new())
    }

    #[test]
    fn runs_on_defaults_without_a_file() {
        let c = ConsumerConfig::load(None, Vec::new()).unwrap();
        assert_eq!(c.queue_names(), vec!["warren.default".to_string()]);
        assert_eq!(c.http.addr.to_string(), DEFAULT_HTTP_ADDR);
        assert!(c.handlers.is_empty());
    }

    #[test]
    fn parses_every_handler_kind() {
        let c = load(
            r#"
            [handlers."demo.hello"]
            kind = "noop"
            [handlers."bench.*"]
            kind = "sleep"
            duration = "250ms"
            [handlers."email.send"]
            kind = "http"
            url = "http://127.0.0.1:8080/hook"
            timeout = "5s"
            headers = { Authorization = "Bearer x" }
            [handlers."report.build"]
            kind = "exec"
            argv = ["/bin/cat"]
            permanent_exit_codes = [2]
            timeout = "1m"
            "#,
        )
        .unwrap();
        assert_eq!(c.handlers["demo.hello"], HandlerSpec::Noop {});
        assert_eq!(
            c.handlers["bench.*"],
            HandlerSpec::Sleep {
                duration: Duration::from_millis(250)
            }
        );
        assert!(
            matches!(&c.handlers["email.send"], HandlerSpec::Http { timeout, .. } if *timeout == Duration::from_secs(5))
        );
        assert!(
            matches!(&c.handlers["report.build"], HandlerSpec::Exec { permanent_exit_codes, timeout, .. } if permanent_exit_codes == &[2] && *timeout == Some(Duration::from_secs(60)))
        );
    }

    #[test]
    fn unknown_handler_kind_or_key_is_refused() {
        let e = load("[handlers.a]\nkind = \"shell\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shell"), "{e}");
        let e = load("[handlers.a]\nkind = \"noop\"\nurl = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("url"), "{e}");
        let e = load("[handlers.a]\nkind = \"http\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("url"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let f = file("[worker]\nconcurrency = 0\n");
        let e = ConsumerConfig::load(Some(f.path()), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker.concurrency") && e.contains('0'), "{e}");
        assert!(e.contains(&f.path().display().to_string()), "{e}");
        let e = load("[handlers.a]\nkind = \"http\"\nurl = \"ftp://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("handlers.\"a\".url") && e.contains("ftp://x"),
            "{e}"
        );
        let e = load("[handlers.a]\nkind = \"exec\"\nargv = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("argv"), "{e}");
        let e = load("[worker]\nthreads = 0\n").unwrap_err().to_string();
        assert!(e.contains("worker.threads") && e.contains('0'), "{e}");
        let e = load("[worker]\nqueues = [\"nope\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker.queues") && e.contains("nope"), "{e}");
        let e = load("[retry.tasks.\"a.b\"]\nmultiplier = 0.5\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("retry.tasks.\"a.b\"") && e.contains("multiplier"),
            "{e}"
        );
        let e = ConsumerConfig::load(None, vec![("WARREN_WORKER__PREFETCH".into(), "0".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker.prefetch"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let mut c = ConsumerConfig::default();
        c.worker.prefetch = 0;
        c.worker.queues = vec!["default".into(), "nope".into()];
        c.retry.default.jitter = 5.0;
        c.limits.insert("a".into(), LimitSpec::default());
        c.handlers.insert(
            "h".into(),
            HandlerSpec::Exec {
                argv: vec![],
                permanent_exit_codes: vec![],
                cwd: None,
                env: BTreeMap::new(),
                pass_env: vec![],
                timeout: Some(Duration::ZERO),
            },
        );
        let headers = BTreeMap::from([
            ("bad header".to_owned(), "v".to_owned()),
            ("X-Key".to_owned(), "s3cret\n".to_owned()),
        ]);
        c.handlers.insert(
            "web".into(),
            HandlerSpec::Http {
                url: "http://127.0.0.1:1/".into(),
                timeout: Duration::from_secs(1),
                headers,
                breaker: None,
            },
        );
        let p = c.validate().unwrap_err();
        assert!(!p.to_string().contains("s3cret"), "{p}");
        let paths: Vec<&str> = p.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "worker.queues[1]",
                "worker.prefetch",
                "retry.default.jitter",
                "handlers.\"h\".argv",
                "handlers.\"h\".timeout",
                "handlers.\"web\".headers.\"X-Key\"",
                "handlers.\"web\".headers.\"bad header\"",
                "limits.\"a\"",
            ],
            "{p}"
        );
        assert_eq!(p.to_string().lines().count(), 8);
        assert!(ConsumerConfig::default().validate().is_ok());
    }

    #[test]
    fn the_example_deploy_config_is_valid() {
        let text = include_str!("../../deploy/consumer.toml");
        let c = load(text).unwrap();
        assert_eq!(c.handlers["demo.hello"], HandlerSpec::Noop {});
        assert_eq!(c.worker, WorkerConfig::default());
        assert_eq!(c.retry.default, RetryPolicy::default());
        // The commented examples are valid too once uncommented.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = load(&uncommented).unwrap();
        assert_eq!(c.handlers.len(), 4, "{:?}", c.handlers.keys());
        assert_eq!(c.retry.policy_for("email.send").max_attempts, 10);
        assert_eq!(c.limits["email.*"].concurrency, Some(4));
        assert!(matches!(
            &c.handlers["email.send"],
            HandlerSpec::Http { breaker: Some(b), .. } if b.failures == 5
        ));
    }

    #[test]
    fn events_and_results_keys_are_checked() {
        let c = load("results = [\"report.*\"]\n[events]\nmax_age = \"2d\"\nmax_bytes = 2097152\n")
            .unwrap();
        assert_eq!(c.results, ["report.*"]);
        assert_eq!(c.events.max_age, Duration::from_secs(2 * 86_400));
        for (text, key) in [
            ("[events]\nmax_age = \"10s\"\n", "events.max_age"),
            ("[events]\nmax_bytes = 10\n", "events.max_bytes"),
            ("results = [\"a..b\"]\n", "results"),
            // The producer's key.
            ("[events]\nindex_size = 5\n", "index_size"),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn limits_and_breakers_parse_with_their_defaults() {
        let c = load(
            r#"
            [limits."email.*"]
            concurrency = 2
            [limits."report.daily"]
            rate = "20/s"
            [limits."sms.#"]
            rate = "300/m"
            burst = 10
            [handlers."h"]
            kind = "http"
            url = "http://127.0.0.1:1/"
            breaker = {}
            [handlers."h2"]
            kind = "http"
            url = "http://127.0.0.1:1/"
            "#,
        )
        .unwrap();
        assert_eq!(c.limits["email.*"].rate().unwrap(), None);
        let (rate, burst) = c.limits["report.daily"].rate().unwrap().unwrap();
        assert_eq!((rate.to_string(), burst), ("20/s".into(), 2));
        let (_, burst) = c.limits["sms.#"].rate().unwrap().unwrap();
        assert_eq!(burst, 10);
        assert!(matches!(
            &c.handlers["h"],
            HandlerSpec::Http { breaker: Some(b), .. } if *b == BreakerSpec::default()
        ));
        assert!(matches!(
            &c.handlers["h2"],
            HandlerSpec::Http { breaker: None, .. }
        ));
    }

    #[test]
    fn bad_limits_and_breakers_name_their_key() {
        for (text, key, value) in [
            ("[limits.\"a.b\"]\nrate = \"fast\"\n", "limits.\"a.b\".rate", "\"fast\""),
            ("[limits.\"a.b\"]\nconcurrency = 0\n", "limits.\"a.b\".concurrency", "0"),
            ("[limits.\"a.b\"]\nrate = \"5/s\"\nburst = 0\n", "limits.\"a.b\".burst", "0"),
            ("[limits.\"a.b\"]\nconcurrency = 1\nburst = 3\n", "limits.\"a.b\".burst", "3"),
            ("[limits.\"a.b\"]\n", "limits.\"a.b\"", "set concurrency, rate or both"),
            (
                "[handlers.h]\nkind = \"http\"\nurl = \"http://x/\"\nbreaker = { failures = 0 }\n",
                "handlers.\"h\".breaker.failures",
                "0",
            ),
            (
                "[handlers.h]\nkind = \"http\"\nurl = \"http://x/\"\nbreaker = { cooldown = \"0s\" }\n",
                "handlers.\"h\".breaker.cooldown",
                "0s",
            ),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(value), "{text}: {e}");
        }
        let e = load("[limits.a]\nconcurrency = 1\nspeed = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("speed"), "{e}");
        let e = load("[handlers.n]\nkind = \"noop\"\nbreaker = {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("breaker"), "a breaker is for http handlers: {e}");
    }

    #[test]
    fn per_task_retry_overrides_merge_onto_default() {
        let c = load(
            r#"
            [retry.default]
            max_attempts = 3
            initial_delay = "2s"
            [retry.tasks."email.*"]
            max_attempts = 10
            "#,
        )
        .unwrap();
        let p = c.retry.policy_for("email.send");
        assert_eq!(p.max_attempts, 10);
        assert_eq!(p.initial_delay, Duration::from_secs(2));
        assert_eq!(c.retry.policy_for("other").max_attempts, 3);
    }
}
