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
