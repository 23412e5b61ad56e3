//! The process's own surroundings fail: its log pipe closes under it. And no
//! task payload reaches a log, even at the most verbose level.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{World, BIN};

const PER_SECOND: &str = r#"
[[schedules]]
name = "every-second"
cron = "* * * * * *"
task = "it.tick"
"#;

/// With its stderr pipe's reader gone, the leader keeps firing and SIGTERM
/// still stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_log_pipe_neither_stops_schedules_nor_signals() {
    let w = World::new("surround_pipe").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", PER_SECOND);
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(&cfg).arg("run");
    for (k, v) in w.env() {
        cmd.env(k, v);
    }
    let port = crate::helpers::free_port();
    let mut child = cmd
        .env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        lines.any(|l| l.map(|l| l.contains("elected leader")).unwrap_or(false))
    });
    assert!(reader.join().unwrap(), "producer never became leader");
    // The reader is gone; every tick logs at debug. Ticks keep coming.
    let before = rx.all().len();
    rx.wait_for(
        Duration::from_secs(20),
        "3 ticks after the pipe closed",
        |m| m.len() >= before + 3,
    )
    .await;
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "producer ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}

/// A publish the broker returns (no queue binds the name) is an error that
/// names the task, and at `RUST_LOG=trace,lapin=trace` not one payload byte is logged
/// (the AMQP client dumps returned messages and frames unless
/// `log.payloads = true`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_publish_logs_no_payload_byte() {
    let w = World::new("surround_payload").await;
    // Only `email.*` is bound: `report.daily` is unroutable.
    warren::testing::delete_topology(&w.conn, &w.topo).await;
    let cfg = w.write_config(
        "p.toml",
        "[[topology.queues]]\nname = \"emails\"\nbindings = [\"email.*\"]\n",
    );
    let cfg = cfg.display().to_string();
    let mark = "PAYLOAD-MARK-a8d1";
    let payload = format!("{{\"secret\":\"{mark}\"}}");
    let run = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--config",
            &cfg,
            "publish",
            "report.daily",
            "--payload",
            &payload,
        ]);
        for (k, v) in w.env() {
            cmd.env(k, v);
        }
        // `lapin` named: its lines are off by default, which would keep
        // the dumps out without the payload filter's help.
        cmd.env("RUST_LOG", "trace,lapin=trace")
            .env("WARREN_LOG_FORMAT", "json");
        cmd.envs(extra.iter().copied());
        cmd.stdin(Stdio::null()).output().unwrap()
    };
    // The client prints bodies as byte lists: look for both spellings.
    let as_bytes = mark
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let leaks = |text: &str| text.contains(mark) || text.contains(&as_bytes);
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    // A returned publish is a runtime failure, not a usage error.
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unroutable publish fails: {err}"
    );
    assert!(
        err.contains("report.daily"),
        "the error names the task: {err}"
    );
    assert!(
        !leaks(&err) && !leaks(&String::from_utf8_lossy(&out.stdout)),
        "payload bytes in the output"
    );
    // The debug option lets the client's dump through: the filter, not luck,
    // kept it out above.
    let out = run(&[("WARREN_LOG__PAYLOADS", "true")]);
    assert!(
        leaks(&String::from_utf8_lossy(&out.stderr)),
        "log.payloads = true shows the client's message dump"
    );
    let emails = warren::config::TopologyConfig {
        prefix: w.prefix.clone(),
        queues: vec![warren::config::QueueConfig {
            name: "emails".into(),
            bindings: vec!["email.*".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    warren::testing::delete_topology(&w.conn, &warren::Topology::new(&emails)).await;
}
