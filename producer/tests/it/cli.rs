use crate::helpers::World;

/// `schedules check` passes a good file and fails a bad one naming every
/// broken schedule; `schedules next` prints UTC and local instants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_check_and_next() {
    let w = World::new("cli").await;
    let good = w.write_config(
        "good.toml",
        r#"
[[schedules]]
name = "nightly"
cron = "30 2 * * *"
timezone = "America/New_York"
task = "report.daily"
"#,
    );
    let path = good.display().to_string();
    let out = w.cli(&["--config", &path, "schedules", "check"], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: 1 schedule"));

    let out = w.cli(
        &["--config", &path, "schedules", "next", "--count", "3"],
        b"",
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(
        text.contains(":30:00Z") && (text.contains("EST") || text.contains("EDT")),
        "{text}"
    );

    let bad = w.write_config(
        "bad.toml",
        r#"
[[schedules]]
name = "a"
cron = "0 2 * *"
task = "t"
[[schedules]]
name = "b"
cron = "@daily"
timezone = "Mars/Olympus"
task = "t"
[[schedules]]
name = "a"
cron = "@every 1h"
task = "t"
"#,
    );
    let out = w.cli(
        &["--config", &bad.display().to_string(), "schedules", "check"],
        b"",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("schedule `a`: cron"), "{err}");
    assert!(err.contains("schedule `b`: timezone"), "{err}");
    assert!(err.contains("duplicate"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");

    // Unknown keys fail too, with file and line.
    let typo = w.write_config(
        "typo.toml",
        "[[schedules]]\nname='a'\ncron='@daily'\ntask='t'\nmisfier='skip'\n",
    );
    let out = w.cli(
        &[
            "--config",
            &typo.display().to_string(),
            "schedules",
            "check",
        ],
        b"",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("misfier"));
}

/// Run the producer with only `env` (no inherited `WARREN_*`), to exit
/// within a generous deadline: a config error must stop it before it
/// connects or serves anything.
fn exits(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(crate::helpers::BIN);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("WARREN_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("WARREN_HTTP_ADDR", "127.0.0.1:0");
    cmd.envs(env.iter().copied());
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn warren-producer");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Every kind of config error makes `schedules check` and `run` alike exit 2
/// naming the key, from the file or the environment; a malformed broker URL
/// never shows its password.
/// What is wrong, the file, extra environment, what stderr must say.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn config_errors_exit_2_in_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[Case] = &[
        ("unknown key", "[api]\npublsh_token = \"x\"\n", &[], "publsh_token"),
        ("bad type", "[leader]\nretry_interval = 5\n", &[], "retry_interval"),
        (
            "short token",
            "[api]\npublish_token = \"short-token\"\n",
            &[],
            "api.publish_token",
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
            "unquoted URL",
            "[amqp]\nurl = guest:s3cret@host:5672\n",
            &[],
            "url",
        ),
        (
            "http scheme",
            "",
            &[("WARREN_AMQP_URL", "http://guest:s3cret@host:5672/%2f")],
            "amqp.url = http://guest:***@host:5672/%2f: the scheme must be `amqp` or `amqps`",
        ),
        (
            "OTLP endpoint that is not a URL (password hidden)",
            "[log]\notlp_endpoint = \"u:s3cret@collector:4318\"\n",
            &[],
            "log.otlp_endpoint",
        ),
        (
            "port out of range",
            "[amqp]\nurl = \"amqp://guest:s3cret@host:99999/%2f\"\n",
            &[],
            "port 99999 is out of range",
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
            "[[schedules]]\nname = \"a\"\ncron = \"@daily\"\ntask = \"t\"\nretry = { jitter = 5.0 }\n",
            &[],
            "schedule `a`: `retry.jitter` = 5.0: must be between 0 and 1",
        ),
    ];
    for (i, (what, text, env, names)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        for cmd in [&["schedules", "check"][..], &["run"][..]] {
            let args: Vec<&str> = ["--config", path.as_str()]
                .into_iter()
                .chain(cmd.iter().copied())
                .collect();
            let out = exits(&args, env);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what}, {cmd:?}: {err}");
            assert!(err.contains(names), "{what}, {cmd:?}: {err}");
            assert!(!err.contains("s3cret"), "{what}, {cmd:?}: {err}");
            assert!(out.stdout.is_empty(), "{what}, {cmd:?}");
        }
    }
    // `publish` refuses the same way.
    let out = exits(
        &["publish", "it.x"],
        &[("WARREN_AMQP_URL", "guest:s3cret@host:5672")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("amqp.url") && !err.contains("s3cret"), "{err}");
    // A list of nodes from the environment is a TOML array, like any list.
    let out = exits(
        &["schedules", "check"],
        &[(
            "WARREN_AMQP__URLS",
            r#"["amqp://guest:s3cret@node1/%2f", "amqp://guest:s3cret@node2/%2f"]"#,
        )],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// What the user typed after `publish` is checked before anything connects:
/// a payload that is not JSON, a payload file that cannot be read or an
/// invalid task name exit 2 saying what is wrong, never echoing the payload;
/// a broker that cannot be reached is a runtime failure (exit 1).
#[test]
fn publish_usage_errors_exit_2_and_runtime_failures_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-payload.json");
    let missing_arg = format!("@{}", missing.display());
    // Nothing listens here: reaching the broker would fail with exit 1.
    let closed = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        crate::helpers::free_port()
    );
    let env = [("WARREN_AMQP_URL", closed.as_str())];
    let cases: &[(&[&str], &str)] = &[
        (
            &["publish", "it.x", "--payload", "{\"secret-mark\": nope"],
            "--payload is not valid JSON",
        ),
        (
            &["publish", "it.x", "--payload", &missing_arg],
            "reading the payload from",
        ),
        (
            &["publish", "it.#", "--payload", "{}"],
            "`task` may not contain `*` or `#`",
        ),
        (&["publish", ""], "`task` is empty"),
    ];
    for (args, says) in cases {
        let out = exits(args, &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("secret-mark"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = exits(&["publish", "it.x", "--payload", "{}"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("connecting to the broker"), "{err}");
}

/// Only transient connect errors are retried: a broker that refuses the
/// credentials or the vhost refuses them again, so `run` stops with exit 1
/// and says why instead of retrying forever.
#[test]
fn refused_credentials_or_vhost_stop_the_producer() {
    let url = warren::testing::broker_url();
    let (base, _vhost) = url.rsplit_once('/').expect("vhost in the test URL");
    let (scheme, rest) = base.split_once("://").expect("scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    for (url, says) in [
        (format!("{base}/warren-no-such-vhost"), "NOT_ALLOWED"),
        (
            format!("{scheme}://guest:wrong-s3cret@{host}/%2f"),
            "ACCESS_REFUSED",
        ),
    ] {
        let out = exits(&["run"], &[("WARREN_AMQP_URL", &url)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
}

/// Without `$HOSTNAME` (plain `docker run`, systemd, cron) the instance id is
/// still `<host>:<pid>` with the machine's real name, not `local:<pid>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_id_uses_the_real_host_name() {
    let w = World::new("instance").await;
    let port = crate::helpers::free_port();
    let mut cmd = std::process::Command::new(crate::helpers::BIN);
    cmd.arg("run");
    for (k, _) in std::env::vars() {
        if k.starts_with("WARREN_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("HOSTNAME")
        .envs(w.env())
        .env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Killed(cmd.spawn().expect("spawn warren-producer"));
    let url = format!("http://127.0.0.1:{port}/v1/schedules");
    let instance = warren::testing::eventually(
        std::time::Duration::from_secs(20),
        "GET /v1/schedules",
        || async {
            let r = reqwest::Client::new()
                .get(&url)
                .bearer_auth(crate::helpers::READ_TOKEN)
                .send()
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
            v["instance"].as_str().map(str::to_owned)
        },
    )
    .await;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(instance, format!("{}:{}", host.trim(), child.0.id()));
}
