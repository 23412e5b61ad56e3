//! [`ConsumerConfig::validate`]: what serde cannot check, one function per
//! section, every problem collected into one [`Problems`] keyed by config
//! path (`worker.prefetch`, `handlers."a".url`, `limits."a.*".burst`).

use std::time::Duration;

use warren::config::Problems;

use super::{BreakerSpec, ConsumerConfig, HandlerSpec, LimitSpec, RetryConfig};

impl ConsumerConfig {
    /// Every problem, each keyed by its config path with the value as a
    /// person would write it in the file. Never shows a secret: the broker
    /// URL's check ([`warren::config::AmqpConfig::validate`]) redacts its
    /// own message.
    pub fn validate(&self) -> Result<(), Problems> {
        let mut p = Problems::new();
        p.push_errors(self.amqp.problems());
        p.push_errors(self.topology.problems());
        p.push_errors(self.log.problems());
        p.push_errors(self.events.problems());
        for pat in &self.results {
            if pat.is_empty() || pat.split('.').any(str::is_empty) {
                p.push_value(
                    "results",
                    quoted(pat),
                    "expected a task name or a topic pattern (`report.*`, `billing.#`)",
                );
            }
        }
        // Reads every secret now: a missing key file is a config error.
        if let Err(e) = self.security.keyring() {
            p.push_value(e.key, e.value, e.why);
        }
        self.check_worker(&mut p);
        self.retry.check(&mut p);
        for (name, spec) in &self.handlers {
            let key = format!("handlers.\"{name}\"");
            if name.is_empty() {
                p.push_value(&key, quoted(name), "task name must not be empty");
            }
            spec.check(&key, &mut p);
        }
        for (name, spec) in &self.limits {
            let key = format!("limits.\"{name}\"");
            if name.is_empty() {
                p.push_value(&key, quoted(name), "task name must not be empty");
            }
            spec.check(&key, &mut p);
        }
        p.into_result()
    }

    /// `[worker]`.
    fn check_worker(&self, p: &mut Problems) {
        let topo = warren::Topology::new(&self.topology);
        let w = &self.worker;
        for (i, q) in w.queues.iter().enumerate() {
            if topo.work_queue(q).is_none() {
                let key = match w.queues.len() {
                    1 => "worker.queues".to_owned(),
                    _ => format!("worker.queues[{i}]"),
                };
                let why = "not one of topology.queues (declare it there first)";
                p.push_value(key, quoted(q), why);
            }
        }
        if w.prefetch == 0 {
            p.push_value("worker.prefetch", w.prefetch, "must be at least 1");
        }
        if w.concurrency == 0 || w.concurrency > 100_000 {
            let why = "must be within 1..=100000";
            p.push_value("worker.concurrency", w.concurrency, why);
        }
        if let Some(n) = w.threads.filter(|n| *n == 0 || *n > 1024) {
            p.push_value("worker.threads", n, "must be within 1..=1024");
        }
        positive(p, "worker.task_timeout", w.task_timeout);
        if w.max_body_bytes == 0 {
            let why = "must be positive";
            p.push_value("worker.max_body_bytes", w.max_body_bytes, why);
        }
    }
}

impl RetryConfig {
    /// `[retry]`: the default policy, then each task's overrides.
    fn check(&self, p: &mut Problems) {
        if let Err(e) = self.default.validate() {
            let key = format!("retry.default.{}", e.field());
            p.push_value(key, e.value(), e.rule());
        }
        for (name, o) in &self.tasks {
            // Each field on its own first, so the message names the field
            // the user wrote under this task, then the merged policy.
            if let Err(e) = o.validate().and_then(|()| o.apply(self.default).validate()) {
                let key = format!("retry.tasks.\"{name}\".{}", e.field());
                p.push_value(key, e.value(), e.rule());
            }
        }
    }
}

impl HandlerSpec {
    /// `handlers."<name>"`, whose path is `key`.
    fn check(&self, key: &str, p: &mut Problems) {
        match self {
            HandlerSpec::Http {
                url,
                timeout,
                breaker,
                headers,
            } => {
                match reqwest::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                    _ => p.push_value(format!("{key}.url"), quoted(url), "expected an http(s) URL"),
                }
                positive(p, &format!("{key}.timeout"), *timeout);
                for (name, value) in headers {
                    check_header(&format!("{key}.headers.\"{name}\""), name, value, p);
                }
                if let Some(b) = breaker {
                    b.check(&format!("{key}.breaker"), p);
                }
            }
            HandlerSpec::Exec { argv, timeout, .. } => {
                if argv.first().is_none_or(|a| a.is_empty()) {
                    let shown: Vec<String> = argv.iter().map(|a| quoted(a)).collect();
                    let value = format!("[{}]", shown.join(", "));
                    p.push_value(
                        format!("{key}.argv"),
                        value,
                        "expected at least the program path",
                    );
                }
                if let Some(t) = timeout {
                    positive(p, &format!("{key}.timeout"), *t);
                }
            }
            HandlerSpec::Noop {} | HandlerSpec::Sleep { .. } => {}
        }
    }
}

impl BreakerSpec {
    /// `handlers."<name>".breaker`, whose path is `key`.
    fn check(&self, key: &str, p: &mut Problems) {
        if self.failures == 0 {
            p.push_value(
                format!("{key}.failures"),
                self.failures,
                "must be at least 1",
            );
        }
        if self.cooldown.is_zero() || self.cooldown > warren::delay::MAX_DELAY {
            p.push_value(
                format!("{key}.cooldown"),
                secs(self.cooldown),
                "must be positive and at most what the delay levels carry (38 days)",
            );
        }
        positive(p, &format!("{key}.max_park"), self.max_park);
    }
}

impl LimitSpec {
    /// `limits."<name>"`, whose path is `key`.
    fn check(&self, key: &str, p: &mut Problems) {
        if self.concurrency.is_none() && self.rate.is_none() {
            p.push(key, "set concurrency, rate or both");
        }
        if let Some(n) = self.concurrency.filter(|n| *n == 0 || *n > 100_000) {
            p.push_value(format!("{key}.concurrency"), n, "must be within 1..=100000");
        }
        if let (Some(text), Err(e)) = (&self.rate, self.rate()) {
            p.push_value(format!("{key}.rate"), quoted(text), e.to_string());
        }
        match (self.burst, &self.rate) {
            (Some(0), _) => p.push_value(format!("{key}.burst"), 0, "must be at least 1"),
            (Some(b), None) => p.push_value(format!("{key}.burst"), b, "only goes with a rate"),
            _ => {}
        }
    }
}

/// A request header of an `http` handler. Its value is never shown: it
/// may be a credential (`Authorization`).
fn check_header(key: &str, name: &str, value: &str, p: &mut Problems) {
    use reqwest::header::{HeaderName, HeaderValue};
    if HeaderName::from_bytes(name.as_bytes()).is_err() {
        p.push(key, "not a valid HTTP header name");
    } else if HeaderValue::from_str(value).is_err() {
        p.push(
            key,
            "the value (not shown) is not a valid HTTP header value",
        );
    }
}

/// A duration `key` must not be zero.
fn positive(p: &mut Problems, key: &str, d: Duration) {
    if d.is_zero() {
        p.push_value(key, secs(d), "must be positive");
    }
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}
