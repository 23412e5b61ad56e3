//! A child process under test, its output lines captured as they come, so a
//! test can wait for a log event instead of sleeping.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::eventually;

/// A spawned child whose stdout and stderr lines are collected (in arrival
/// order per stream). Killed on drop; when the test is failing, its last
/// lines are printed to help the diagnosis.
pub struct Process {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Output streams read to their end (the child closed them).
    closed: Arc<AtomicUsize>,
}

impl Process {
    /// Spawn `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Process> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            collect(stream, lines.clone(), closed.clone());
        }
        Ok(Process {
            child,
            lines,
            closed,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lines").clone()
    }

    /// The lines that are JSON objects (structured log events).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .expect("log lines")
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// JSON log events whose `message` is `msg`.
    pub fn events(&self, msg: &str) -> Vec<serde_json::Value> {
        self.json_lines()
            .into_iter()
            .filter(|v| v["message"] == msg)
            .collect()
    }

    /// Wait until at least `n` events `msg` were logged.
    pub async fn wait_log(&self, msg: &str, n: usize, within: Duration) {
        eventually(within, &format!("{n} x log {msg:?}"), || async {
            (self.events(msg).len() >= n).then_some(())
        })
        .await;
    }

    /// Values of `field` in the events `msg`, looked up in the event and then
    /// in its span (e.g. `task.id`).
    pub fn field_of(&self, msg: &str, field: &str) -> Vec<String> {
        self.events(msg)
            .into_iter()
            .filter_map(|v| {
                v[field]
                    .as_str()
                    .or_else(|| v["span"][field].as_str())
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Send a signal by name (`TERM`, `SIGHUP`, `STOP`...).
    pub fn signal(&self, name: &str) {
        let name = name.strip_prefix("SIG").unwrap_or(name);
        let status = Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} {}", self.pid());
    }

    /// Whether the child has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for the child to exit, up to `within`; its exit status. Its
    /// output is then read to the end: [`Process::lines`] has every line it
    /// wrote (the lines travel through a pipe and a reader thread, so they
    /// can trail the exit by a moment), unless a grandchild holds the pipes
    /// open past 3 s.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = &mut self.child;
        let status = eventually(within, "the child to exit", || {
            let status = child.try_wait().expect("try_wait");
            async move { status }
        })
        .await;
        // Best effort: a grandchild that inherited the pipes keeps them open.
        let until = std::time::Instant::now() + Duration::from_secs(3);
        while self.closed.load(Ordering::Acquire) < 2 && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        status
    }
}

fn collect(
    stream: impl Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    closed: Arc<AtomicUsize>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Ok(mut l) = lines.lock() {
                l.push(line);
            }
        }
        closed.fetch_add(1, Ordering::Release);
    });
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
            let tail = &lines[lines.len().saturating_sub(50)..];
            eprintln!(
                "---- last lines of child {} ----\n{}",
                self.child.id(),
                tail.join("\n")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_captured_and_exit_is_awaited() {
        let mut p = Process::spawn(Command::new("sh").args([
            "-c",
            r#"echo '{"message":"hi","task.id":"t1"}'; echo plain >&2; exit 3"#,
        ]))
        .expect("sh runs");
        let status = p.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(3));
        // Every line is in once `wait_exit` returned: no waiting for it.
        assert_eq!(p.field_of("hi", "task.id"), ["t1"]);
        assert!(p.lines().contains(&"plain".to_owned()), "{:?}", p.lines());
    }

    #[tokio::test]
    async fn signals_reach_the_child() {
        let mut p = Process::spawn(Command::new("sleep").arg("600")).expect("sleep runs");
        assert!(p.is_running());
        p.signal("SIGTERM");
        let status = p.wait_exit(Duration::from_secs(30)).await;
        assert!(!status.success());
    }
}
