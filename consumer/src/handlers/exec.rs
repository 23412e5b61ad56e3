//! `exec`: runs an argv fixed in config — no shell — with the task's JSON
//! payload on stdin. Off unless configured.
//!
//! The process runs in its own process group; when the timeout passes (or the
//! attempt is abandoned, e.g. the worker's task timeout fires) the whole group
//! is killed with SIGKILL, so grandchildren do not linger. Exit 0 → success;
//! an exit code listed in `permanent_exit_codes` → permanent; any other exit
//! or a signal → retryable. The last lines of stderr become the error text.
//! The process sees `WARREN_TASK_ID`, `WARREN_TASK_NAME`, `WARREN_TASK_ATTEMPT`,
//! and the task's W3C trace context as `TRACEPARENT` (and `TRACESTATE`), the
//! names OpenTelemetry's environment propagation reads.
//!
//! The environment is built, not inherited: the consumer's own holds the
//! broker URL with its password and other `WARREN_*` secrets, and a handler
//! script must not see (or log) them. The process gets only [`SAFE_ENV`] from
//! the consumer's environment, the names in `pass_env`, the configured `env`,
//! and the task variables above.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren::Task;

use crate::handler::{Handler, TaskError};

pub struct Exec {
    pub argv: Vec<String>,
    pub permanent_exit_codes: Vec<i32>,
    pub cwd: Option<PathBuf>,
    /// Variables set for the process.
    pub env: BTreeMap<String, String>,
    /// Variables passed through from the consumer's environment.
    pub pass_env: Vec<String>,
    /// This handler's configured timeout ([`Handler::timeout`]).
    pub timeout: Option<Duration>,
    /// Limit when neither the task nor the config set one (a worker always
    /// sets the task's).
    pub default_timeout: Duration,
}

/// Variables passed through from the consumer's environment unasked:
/// what programs need to find binaries, a home, a locale and a temp dir.
pub const SAFE_ENV: &[&str] = &["PATH", "HOME", "LANG", "TZ", "TMPDIR"];

/// Whether the process may see the consumer's variable `name`.
pub fn passes(name: &str, pass_env: &[String]) -> bool {
    if pass_env.iter().any(|p| p == name) {
        return true;
    }
    if name.starts_with("WARREN_") {
        return false;
    }
    SAFE_ENV.contains(&name) || name.starts_with("LC_")
}

impl Exec {
    /// The process environment, from the consumer's `inherited` one.
    fn environment(
        &self,
        inherited: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
        task: &Task,
    ) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        let mut out: Vec<_> = inherited
            .into_iter()
            .filter(|(k, _)| k.to_str().is_some_and(|k| passes(k, &self.pass_env)))
            .collect();
        out.extend(self.env.iter().map(|(k, v)| (k.into(), v.into())));
        out.push(("WARREN_TASK_ID".into(), task.id.clone().into()));
        out.push(("WARREN_TASK_NAME".into(), task.name.clone().into()));
        out.push((
            "WARREN_TASK_ATTEMPT".into(),
            task.attempt.to_string().into(),
        ));
        // Last, so neither `env` nor `pass_env` can stand in for the task's own.
        out.retain(|(k, _)| k != "TRACEPARENT" && k != "TRACESTATE");
        if let Some(t) = &task.trace {
            out.push(("TRACEPARENT".into(), t.traceparent().into()));
            if let Some(state) = &t.state {
                out.push(("TRACESTATE".into(), state.into()));
            }
        }
        out
    }
}

/// Kills the process group when dropped unless disarmed (the process exited).
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

const STDERR_KEEP: usize = 2000;

impl Handler for Exec {
    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    async fn run(&self, task: Task) -> Result<(), TaskError> {
        // The attempt's one timeout, computed by the worker.
        let timeout = task
            .timeout
            .or(self.timeout)
            .unwrap_or(self.default_timeout);
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| TaskError::permanent("exec handler has an empty argv"))?;
        let mut child = self
            .command(program, args, &task)
            .spawn()
            .map_err(|e| TaskError::retryable(format!("cannot start {program}: {e}")))?;
        let mut guard = GroupGuard(child.id().and_then(|id| i32::try_from(id).ok()));
        let run = converse(&mut child, task.payload);
        let Ok((err, out, status)) = tokio::time::timeout(timeout, run).await else {
            guard.kill();
            return Err(TaskError::retryable(format!(
                "{program} timed out after {}; process group killed",
                humantime::format_duration(timeout)
            )));
        };
        // The leader exited; anything it left behind in its group goes too.
        guard.kill();
        let status =
            status.map_err(|e| TaskError::retryable(format!("waiting for {program}: {e}")))?;
        if status.success() {
            if let Some(v) = crate::result::from_json_bytes(&out) {
                crate::result::set_result(v);
            }
            return Ok(());
        }
        let tail = stderr_tail(&err);
        match status.code() {
            Some(code) if self.permanent_exit_codes.contains(&code) => Err(TaskError::permanent(
                format!("{program} exited with {code}: {tail}"),
            )),
            Some(code) => Err(TaskError::retryable(format!(
                "{program} exited with {code}: {tail}"
            ))),
            None => Err(TaskError::retryable(format!(
                "{program} was killed by a signal ({status}): {tail}"
            ))),
        }
    }
}

impl Exec {
    /// `program args`, in a process group of its own, with the built
    /// environment and piped stdio.
    fn command(&self, program: &str, args: &[String], task: &Task) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(self.environment(std::env::vars_os(), task))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        cmd
    }
}

/// Feed `payload` to the child's stdin while reading its stderr and stdout
/// (kept for a workflow step's result, else drained, never left to block the
/// program on a full pipe) until it exits; stderr, stdout and how it exited.
async fn converse(
    child: &mut tokio::process::Child,
    payload: Vec<u8>,
) -> (Vec<u8>, Vec<u8>, std::io::Result<std::process::ExitStatus>) {
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A program that ignores stdin closes the pipe: not an error.
            let _ = stdin.write_all(&payload).await;
            let _ = stdin.shutdown().await;
        }
    };
    let mut stderr = child.stderr.take();
    let collect = async move {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf).await;
        }
        buf
    };
    let mut stdout = child.stdout.take();
    let want = crate::result::wants_result();
    let collect_out = async move {
        let mut kept = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let mut buf = [0u8; 8192];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if want && kept.len() <= crate::result::READ_LIMIT {
                    kept.extend_from_slice(&buf[..n]);
                }
            }
        }
        kept
    };
    let (_, err, out, status) = tokio::join!(feed, collect, collect_out, child.wait());
    (err, out, status)
}

/// The last [`STDERR_KEEP`] bytes of stderr (on a character boundary), for
/// the error text.
fn stderr_tail(err: &[u8]) -> String {
    let text = String::from_utf8_lossy(err);
    let t = text.trim_end();
    let start = t.len().saturating_sub(STDERR_KEEP);
    let start = (start..=t.len())
        .find(|i| t.is_char_boundary(*i))
        .unwrap_or(t.len());
    t[start..].to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn exec(script: &str, timeout: Duration) -> Exec {
        Exec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            permanent_exit_codes: vec![3],
            cwd: None,
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            timeout: Some(timeout),
            default_timeout: Duration::from_secs(300),
        }
    }

    #[test]
    fn environment_keeps_the_safe_set_and_drops_warren_secrets() {
        let mut e = exec("true", Duration::from_secs(1));
        e.env.insert("BUCKET".into(), "reports".into());
        let inherited = [
            ("PATH", "/bin"),
            ("LC_ALL", "C"),
            ("WARREN_AMQP_URL", "amqp://u:secret@h/"),
            ("SECRET_X", "1"),
            ("OPTED", "yes"),
            ("WARREN_OPTED", "yes"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let names = |e: &Exec| -> Vec<String> {
            let mut n: Vec<String> = e
                .environment(inherited.clone(), &task())
                .into_iter()
                .map(|(k, _)| k.into_string().unwrap())
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(&e),
            [
                "BUCKET",
                "LC_ALL",
                "PATH",
                "WARREN_TASK_ATTEMPT",
                "WARREN_TASK_ID",
                "WARREN_TASK_NAME"
            ]
        );
        e.pass_env = vec!["OPTED".into(), "WARREN_OPTED".into()];
        let n = names(&e);
        assert!(n.contains(&"OPTED".to_string()) && n.contains(&"WARREN_OPTED".to_string()));
        assert!(!n.contains(&"WARREN_AMQP_URL".to_string()));
    }

    #[test]
    fn the_tasks_trace_context_wins_over_configured_and_passed_ones() {
        let mut e = exec("true", Duration::from_secs(1));
        e.env.insert("TRACEPARENT".into(), "from-config".into());
        e.pass_env = vec!["TRACESTATE".into()];
        let inherited = [("TRACESTATE", "from-consumer")].map(|(k, v)| (k.into(), v.into()));
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut t = task();
        t.trace = warren::trace::TraceContext::parse(tp, Some("congo=t61rcWkgMzE"));
        let env: Vec<(String, String)> = e
            .environment(inherited.clone(), &t)
            .into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .filter(|(k, _)| k.starts_with("TRACE"))
            .collect();
        assert_eq!(
            env,
            [
                ("TRACEPARENT".to_string(), tp.to_string()),
                ("TRACESTATE".to_string(), "congo=t61rcWkgMzE".to_string())
            ]
        );
        // Without a trace (a handler called outside a worker) none leaks in.
        let env = e.environment(inherited, &task());
        assert!(env
            .iter()
            .all(|(k, _)| !k.to_string_lossy().starts_with("TRACE")));
    }

    #[tokio::test]
    async fn the_tasks_timeout_wins_over_the_configured_one() {
        let mut t = task();
        t.timeout = Some(Duration::from_secs(20));
        exec("sleep 1", Duration::from_millis(200))
            .run(t)
            .await
            .unwrap();
    }

    fn task() -> Task {
        Task::new("t", &serde_json::json!({"k": "v"}))
    }

    #[tokio::test]
    async fn a_steps_json_stdout_is_its_result() {
        let json = exec(r#"echo '{"rows": 3}'"#, Duration::from_secs(10));
        let (r, result) = crate::result::capture(true, json.run(task())).await;
        r.unwrap();
        assert_eq!(result, Some(serde_json::json!({"rows": 3})));
        // Not JSON, or not a step: no result.
        let text = exec("echo hello", Duration::from_secs(10));
        let (_, result) = crate::result::capture(true, text.run(task())).await;
        assert_eq!(result, None);
        let (_, result) = crate::result::capture(false, json.run(task())).await;
        assert_eq!(result, None);
    }

    #[tokio::test]
    async fn payload_on_stdin_and_exit_codes() {
        let ok = exec(r#"grep -q '"k":"v"'"#, Duration::from_secs(10));
        ok.run(task()).await.unwrap();
        let e = exec("echo nope >&2; exit 3", Duration::from_secs(10))
            .run(task())
            .await
            .unwrap_err();
        assert!(e.is_permanent() && e.message.contains("nope"), "{e:?}");
        let e = exec("exit 1", Duration::from_secs(10))
            .run(task())
            .await
            .unwrap_err();
        assert!(!e.is_permanent(), "{e:?}");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild.pid");
        // The grandchild writes its pid, then would live for a minute.
        let script = format!(
            "sh -c 'echo $$ > {}; exec sleep 60' & wait",
            marker.display()
        );
        let start = std::time::Instant::now();
        let e = exec(&script, Duration::from_millis(500))
            .run(task())
            .await
            .unwrap_err();
        assert!(e.message.contains("timed out"), "{e:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed processes are reaped by init; wait until the pid is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let alive = nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true);
            if !alive {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "grandchild {pid} still alive"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
