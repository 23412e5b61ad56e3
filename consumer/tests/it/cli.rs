//! Configuration errors at the command line: `check` and `run` (and the
//! `dead` tools) refuse the same configs with exit 2, naming the key.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run the consumer with only `env` (no inherited `WARREN_*`), to exit
/// within a generous deadline: a config error must stop it before it
/// connects or serves anything.
pub(crate) fn exits(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren-consumer"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("WARREN_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("WARREN_HTTP_ADDR", "127.0.0.1:0");
    cmd.envs(env.iter().copied());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn warren-consumer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// A stdout whose reader is gone, as after `| head` exits: writing to it
/// fails with EPIPE.
pub(crate) fn closed_stdout() -> Stdio {
    let mut reader = Command::new("true")
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn true");
    let pipe = reader.stdin.take().expect("piped stdin");
    reader.wait().expect("wait for true");
    Stdio::from(pipe)
}

/// What is wrong, the file, extra environment, what stderr must say.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn config_errors_exit_2_in_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[Case] = &[
        ("unknown key", "[worker]\nconcurency = 3\n", &[], "concurency"),
        ("bad type", "[worker]\nprefetch = \"many\"\n", &[], "prefetch"),
        (
            "bad value",
            "[worker]\nconcurrency = 0\n",
            &[],
            "worker.concurrency = 0: must be within 1..=100000",
        ),
        (
            "URL without scheme (file)",
            "[amqp]\nurl = \"guest:s3cret@host:5672\"\n",
            &[],
            "amqp.url",
        ),
        (
            "URL without scheme (env)",
            "",
            &[("WARREN_AMQP_URL", "guest:s3cret@host:5672")],
            "amqp.url",
        ),
        (
            "port out of range",
            "",
            &[("WARREN_AMQP_URL", "amqp://guest:s3cret@host:99999/%2f")],
            "amqp.url = amqp://guest:***@host:99999/%2f: port 99999 is out of range",
        ),
        (
            "amqp.url and amqp.urls, url at its default value",
            "[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nurls = [\"amqp://guest:s3cret@node1/%2f\"]\n",
            &[],
            "amqp.url and amqp.urls are both set",
        ),
        (
            "amqp.urls in the file, amqp.url from the environment",
            "[amqp]\nurls = [\"amqp://guest:s3cret@node1/%2f\"]\n",
            &[("WARREN_AMQP_URL", "amqp://guest:s3cret@node2/%2f")],
            "amqp.url and amqp.urls are both set",
        ),
        (
            "empty amqp.urls",
            "[amqp]\nurls = []\n",
            &[],
            "amqp.urls: the list of broker URLs is empty",
        ),
        (
            "empty amqp.urls (env)",
            "",
            &[("WARREN_AMQP__URLS", "[]")],
            "amqp.urls: the list of broker URLs is empty",
        ),
        (
            "bad retry value",
            "[retry.default]\njitter = 5.0\n",
            &[],
            "retry.default.jitter = 5.0: must be between 0 and 1",
        ),
        (
            "bad per-task retry value",
            "[retry.tasks.\"email.*\"]\nmultiplier = 0.5\n",
            &[],
            "retry.tasks.\"email.*\".multiplier = 0.5: must be at least 1",
        ),
        (
            "OTLP endpoint that is not a URL",
            "[log]\notlp_endpoint = \"collector:4318\"\n",
            &[],
            "log.otlp_endpoint = \"collector:4318\": expected an http:// or https:// URL",
        ),
        (
            "OTLP endpoint that is not a URL (env)",
            "",
            &[("WARREN_LOG__OTLP_ENDPOINT", "collector:4318")],
            "log.otlp_endpoint",
        ),
        (
            "handler that cannot be built",
            "[handlers.a]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/\"\nheaders = { \"bad header\" = \"v\" }\n",
            &[],
            "bad header",
        ),
    ];
    for (i, (what, text, env, names)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        for cmd in [&["check"][..], &["run"][..], &["dead", "list"][..]] {
            let args: Vec<&str> = ["--config", path.as_str()]
                .into_iter()
                .chain(cmd.iter().copied())
                .collect();
            let out = exits(&args, env);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what}, {cmd:?}: {err}");
            assert!(err.contains(names), "{what}, {cmd:?}: {err}");
            assert!(!err.contains("s3cret"), "{what}, {cmd:?}: {err}");
            assert!(!err.contains(" { "), "Rust debug text: {what}: {err}");
        }
    }
    // A valid config passes `check`, which connects to nothing.
    let path = dir.path().join("good.toml");
    std::fs::write(&path, "[handlers.\"demo.*\"]\nkind = \"noop\"\n").unwrap();
    let out = exits(&["--config", &path.display().to_string(), "check"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: 1 handler"));
    // A list of nodes from the environment is a TOML array, like any list.
    let out = exits(
        &["--config", &path.display().to_string(), "check"],
        &[(
            "WARREN_AMQP__URLS",
            r#"["amqp://guest:s3cret@node1/%2f", "amqp://guest:s3cret@node2/%2f"]"#,
        )],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every problem in a file is reported in one run, each on a line of its
/// own naming its key: fixing one does not reveal the next.
#[test]
fn every_problem_in_a_file_is_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.toml");
    let text = "[worker]\nprefetch = 0\n\
                [handlers.a]\nkind = \"http\"\nurl = \"ftp://x\"\n\
                [limits.\"b.*\"]\nconcurrency = 0\n";
    std::fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    for cmd in ["check", "run"] {
        let out = exits(&["--config", &path, cmd], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains(&path) && err.contains("3 problems:"),
            "{cmd}: {err}"
        );
        for line in [
            "  worker.prefetch = 0: must be at least 1",
            "  handlers.\"a\".url = \"ftp://x\": expected an http(s) URL",
            "  limits.\"b.*\".concurrency = 0: must be within 1..=100000",
        ] {
            assert!(err.lines().any(|l| l == line), "{cmd}: {line:?} in {err}");
        }
    }
}

#[test]
fn check_survives_a_closed_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.toml");
    std::fs::write(&path, "[handlers.\"demo.*\"]\nkind = \"noop\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warren-consumer"))
        .args(["--config", &path.display().to_string(), "check"])
        .env_remove("WARREN_CONFIG")
        .stdout(closed_stdout())
        .output()
        .expect("run warren-consumer check");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A build without `otlp` refuses the key rather than ignoring it.
#[cfg(not(feature = "otlp"))]
#[test]
fn an_otlp_endpoint_needs_the_otlp_build() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[log]\notlp_endpoint = \"http://collector:4318\"\n").unwrap();
    let out = exits(&["--config", &path.display().to_string(), "check"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("log.otlp_endpoint") && err.contains("lacks the `otlp` feature"),
        "{err}"
    );
}

/// Text logs sent to a pipe (systemd, `docker logs`, `> consumer.log`) carry
/// no colour codes: the same lines a terminal would show in colour, here
/// with not one ESC byte.
#[tokio::test]
async fn text_logs_to_a_pipe_have_no_colour_codes() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren-consumer"));
    for (k, _) in std::env::vars() {
        if k.starts_with("WARREN_") || k == "RUST_LOG" || k == "NO_COLOR" {
            cmd.env_remove(k);
        }
    }
    // Nothing listens there: the consumer logs its retries until killed.
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        warren::testing::free_port()
    );
    cmd.env("WARREN_HTTP_ADDR", "127.0.0.1:0")
        .env("WARREN_AMQP_URL", url);
    let p = warren::testing::Process::spawn(&mut cmd).expect("spawn warren-consumer");
    warren::testing::eventually(
        Duration::from_secs(30),
        "an INFO and a WARN line",
        || async {
            let lines = p.lines();
            let has = |msg: &str| lines.iter().any(|l| l.contains(msg));
            (has("serving /metrics") && has("cannot open AMQP session")).then_some(())
        },
    )
    .await;
    let lines = p.lines();
    assert!(
        lines.iter().all(|l| !l.contains('\x1b')),
        "escape codes in a piped log: {lines:?}"
    );
}
