//! [`Problems`]: what validation found wrong in one configuration, every
//! problem at once, each keyed by its config path (`worker.concurrency`,
//! `handlers."a".url`, `workers[2].queue`). Both roles collect into it and
//! report it the same way: exit 2 listing one problem per line. The
//! shared sections give theirs as a list (`AmqpConfig::problems` and the
//! like; `validate` answers the first).

use std::fmt;

use super::ConfigError;

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: the config path, as a person would find it in the file.
    pub path: String,
    /// The value as written, when it may be shown (never a secret).
    pub value: Option<String>,
    /// What is wrong with it (empty when `path` says it all).
    pub message: String,
}

impl fmt::Display for Problem {
    /// `path = value: message`, or `path: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(v) = &self.value {
            write!(f, " = {v}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// Every problem found, in the order found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    /// `path` is wrong: `message` says how.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            path: path.into(),
            value: None,
            message: message.into(),
        });
    }

    /// `path` holds `value` (as written in the file), which is wrong:
    /// `message` says how. An empty `value` is not shown.
    pub fn push_value(
        &mut self,
        path: impl Into<String>,
        value: impl fmt::Display,
        message: impl Into<String>,
    ) {
        let value = value.to_string();
        self.list.push(Problem {
            path: path.into(),
            value: (!value.is_empty()).then_some(value),
            message: message.into(),
        });
    }

    /// The error of a check that names its own key: its text reads
    /// `key = value: why` or `key: why` (as the typed errors of the shared
    /// sections, [`super::InvalidAmqp`] and the like, do).
    pub fn push_error(&mut self, e: impl fmt::Display) {
        let text = e.to_string();
        let (head, why) = text.split_once(": ").unwrap_or((text.as_str(), ""));
        let (path, value) = match head.split_once(" = ") {
            Some((path, value)) => (path, Some(value.to_owned())),
            None => (head, None),
        };
        self.list.push(Problem {
            path: path.to_owned(),
            value,
            message: why.to_owned(),
        });
    }

    /// Every error of `errors` (see [`Problems::push_error`]), e.g. a
    /// shared section's `problems()`.
    pub fn push_errors<E: fmt::Display>(&mut self, errors: impl IntoIterator<Item = E>) {
        for e in errors {
            self.push_error(e);
        }
    }

    /// Note `checked`'s error, if any (see [`Problems::push_error`]).
    pub fn check<E: fmt::Display>(&mut self, checked: Result<(), E>) {
        if let Err(e) = checked {
            self.push_error(e);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Problem> {
        self.list.iter()
    }

    /// `Ok` when nothing was found.
    pub fn into_result(self) -> Result<(), Problems> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// The error a binary reports (exit 2): `origin` says where the values
    /// came from (see [`super::origin`]); one problem reads on one line,
    /// several are counted and listed one per line below.
    pub fn into_error(self, origin: String) -> ConfigError {
        let message = match self.list.as_slice() {
            [one] => one.to_string(),
            many => {
                let lines: Vec<String> = many.iter().map(|p| format!("  {p}")).collect();
                format!("{} problems:\n{}", many.len(), lines.join("\n"))
            }
        };
        ConfigError::Invalid { origin, message }
    }
}

impl fmt::Display for Problems {
    /// One problem per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.list.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

impl Extend<Problem> for Problems {
    fn extend<I: IntoIterator<Item = Problem>>(&mut self, iter: I) {
        self.list.extend(iter);
    }
}

impl IntoIterator for Problems {
    type Item = Problem;
    type IntoIter = std::vec::IntoIter<Problem>;

    fn into_iter(self) -> Self::IntoIter {
        self.list.into_iter()
    }
}

impl<'a> IntoIterator for &'a Problems {
    type Item = &'a Problem;
    type IntoIter = std::slice::Iter<'a, Problem>;

    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InvalidAmqp, InvalidTopology};

    #[test]
    fn every_problem_is_kept_and_listed_one_per_line() {
        let mut p = Problems::new();
        assert_eq!(p.clone().into_result(), Ok(()));
        p.push("workers[2].queue", "not one of topology.queues");
        p.push_value("worker.prefetch", 0, "must be at least 1");
        p.push_value("limits.\"a\"", "", "set concurrency, rate or both");
        p.check(Err(InvalidAmqp::ZeroHeartbeat));
        p.check::<InvalidTopology>(Ok(()));
        p.check(Err(InvalidTopology::NoQueues));
        assert_eq!(p.len(), 5);
        assert_eq!(
            p.to_string(),
            "workers[2].queue: not one of topology.queues\n\
             worker.prefetch = 0: must be at least 1\n\
             limits.\"a\": set concurrency, rate or both\n\
             amqp.heartbeat = 0s: must be at least 1s\n\
             topology.queues: expected at least one work queue"
        );
        let paths: Vec<&str> = p.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(paths[3], "amqp.heartbeat");
        assert_eq!(p.iter().nth(3).and_then(|x| x.value.as_deref()), Some("0s"));
        let e = p
            .into_result()
            .unwrap_err()
            .into_error("config file c.toml".into());
        let text = e.to_string();
        assert!(
            text.starts_with("config file c.toml: 5 problems:\n  workers[2].queue: "),
            "{text}"
        );
        assert_eq!(text.lines().count(), 6, "{text}");
    }

    #[test]
    fn one_problem_reads_as_one_line_and_a_typed_error_as_it_did() {
        let mut p = Problems::new();
        p.check(Err(InvalidAmqp::UrlAndUrls));
        assert_eq!(p.to_string(), InvalidAmqp::UrlAndUrls.to_string());
        let e = p.into_error("env".into()).to_string();
        assert_eq!(
            e,
            "env: amqp.url and amqp.urls are both set: give the node list in one of them"
        );
        let mut p = Problems::new();
        p.push_error("no colon here");
        assert_eq!(p.to_string(), "no colon here");
    }
}
