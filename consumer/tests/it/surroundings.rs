//! The process's own surroundings fail: its log pipe closes under it, or it
//! starts with stdout/stderr closed. Tasks must still finish and be acked,
//! and signals must still stop the process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use warren::testing::eventually;
use warren::Task;

use crate::helpers::*;

const NOOP_TOML: &str = r#"
[handlers."t.noop"]
kind = "noop"
"#;

/// The child serves `/metrics` on `port`: with its logs closed, that is the
/// only way to see that it has handled a task (an empty queue is not: a
/// delivery may still wait, unstarted, in the consumer's prefetch).
fn command(cfg: &warren_consumer::ConsumerConfig, dir: &tempfile::TempDir, port: u16) -> Command {
    let path = dir.path().join("consumer.toml");
    std::fs::write(&path, NOOP_TOML).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren-consumer"));
    cmd.arg("--config")
        .arg(&path)
        .env("WARREN_AMQP_URL", cfg.amqp.url_list())
        .env("WARREN_TOPOLOGY__PREFIX", &cfg.topology.prefix)
        .env("WARREN_HTTP_ADDR", format!("127.0.0.1:{port}"))
        // Every delivery logs several lines: the first write after the
        // reader is gone used to panic inside the task that logged.
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null());
    cmd
}

async fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer did not exit within {within:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This test's view of the broker: its topology declared, no worker.
struct Client {
    conn: lapin::Connection,
    publisher: warren::amqp::Publisher,
    topo: warren::Topology,
}

async fn client_app(cfg: &warren_consumer::ConsumerConfig) -> Client {
    let conn = warren::amqp::connect(&cfg.amqp, "test-client")
        .await
        .expect("connect");
    let topo = warren::Topology::new(&cfg.topology);
    warren::topology::declare(&conn, &topo)
        .await
        .expect("declare");
    let publisher = warren::amqp::Publisher::new(&conn, Duration::from_secs(10))
        .await
        .expect("publisher");
    Client {
        conn,
        publisher,
        topo,
    }
}

impl Client {
    fn queue(&self) -> String {
        self.topo.work_queues()[0].name.clone()
    }

    async fn stop(self) {
        warren::testing::delete_topology(&self.conn, &self.topo).await;
        let _ = self.conn.close(200, "test done".into()).await;
    }
}

/// Publish `n` noop tasks, then wait until the consumer (serving metrics on
/// `port`) has run them all.
async fn publish_and_drain(app: &Client, n: usize, port: u16) {
    for i in 0..n {
        let t = Task::new("t.noop", &json!({ "i": i }));
        app.publisher
            .publish_task(&app.topo, &t, Duration::ZERO)
            .await
            .expect("publish");
    }
    let url = format!("http://127.0.0.1:{port}/metrics");
    eventually(WAIT, "the consumer runs every task", || async {
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        let done = warren::testing::scraped_value(
            &text,
            "warren_consumer_tasks_total",
            &[("outcome", "succeeded")],
        )?;
        (done as usize >= n).then_some(())
    })
    .await;
}

async fn assert_stops_and_acked(app: &Client, child: &mut Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(child, Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "consumer exit status after SIGTERM: {status}"
    );
    // Nothing was left unacked: the closed connection would have put it back.
    assert_eq!(
        queue_len(&app.conn, &app.queue()).await,
        0,
        "unacked tasks came back"
    );
}

#[tokio::test]
async fn closed_log_pipe_neither_wedges_tasks_nor_signals() {
    // The queue exists (declared by this in-process client) before the child starts.
    let cfg = config("surround_logpipe");
    let app = client_app(&cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let port = warren::testing::free_port();
    let mut child = command(&cfg, &dir, port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read until it consumes, then close the pipe's only reader, as a log
    // shipper that dies (or `| tee` after Ctrl-C) does.
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref() {
            if line.map(|l| l.contains("consuming")).unwrap_or(true) {
                return true;
            }
        }
        false
    });
    assert!(reader.join().unwrap(), "consumer never logged `consuming`");
    publish_and_drain(&app, 20, port).await;
    assert_stops_and_acked(&app, &mut child).await;
    app.stop().await;
}

#[tokio::test]
async fn closed_stdout_and_stderr_from_the_start() {
    let cfg = config("surround_closedfds");
    let app = client_app(&cfg).await;
    let dir = tempfile::tempdir().unwrap();
    // `1>&- 2>&-`: both descriptors closed, not /dev/null.
    let port = warren::testing::free_port();
    let inner = command(&cfg, &dir, port);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" \"$@\" 1>&- 2>&-")
        .arg(inner.get_program())
        .args(inner.get_args())
        .envs(inner.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    publish_and_drain(&app, 20, port).await;
    assert_stops_and_acked(&app, &mut child).await;
    app.stop().await;
}

/// A full disk on the broker (`disk_free_limit` above the free space) blocks
/// every publisher: the retry copies of tasks that fail meanwhile cannot be
/// confirmed. Their deliveries are left unacked and come back; once the alarm
/// clears every task ends (here: succeeds on a later attempt), none is lost
/// and none is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_alarm_blocks_retries_and_loses_nothing() {
    const N: usize = 10;
    let node = tokio::task::spawn_blocking(warren::testing::Node::start)
        .await
        .unwrap();
    let mut cfg = config("surround_disk");
    cfg.amqp = amqp_for(node.url());
    cfg.amqp.confirm_timeout = Duration::from_secs(2);
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let runs = Runs::default();
    let mut reg = warren_consumer::Registry::new();
    let (g, r) = (gate.clone(), runs.clone());
    reg.register_fn("t.flaky", move |t: Task| {
        let (g, r) = (g.clone(), r.clone());
        async move {
            r.record(&t);
            if t.attempt == 1 {
                // Hold the first attempts until the alarm is on, then fail
                // them: their retry publishes meet a blocked broker.
                let _ = g.acquire().await.map(|p| p.forget());
                return Err(warren_consumer::TaskError::retryable("first attempt fails"));
            }
            Ok(())
        }
    })
    .unwrap();
    let app = spawn_worker(cfg, reg).await;
    for i in 0..N {
        app.publish(&Task::new("t.flaky", &json!({ "i": i }))).await;
    }
    runs.wait_total(N).await;

    let node = tokio::task::spawn_blocking(move || {
        let o = node.ctl(&["set_disk_free_limit", "1000000GB"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        node
    })
    .await
    .unwrap();
    gate.add_permits(1_000_000);
    // Blocked retries time out and the session starts over; the tasks come
    // back and fail again, still blocked, until the disk frees up.
    eventually(WAIT, "a retry publish refused by the alarm", || async {
        (app.counter("warren_amqp_reconnects_total", &[]) >= 1.0).then_some(())
    })
    .await;
    let node = tokio::task::spawn_blocking(move || {
        let o = node.ctl(&["set_disk_free_limit", "50MB"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        node
    })
    .await
    .unwrap();
    eventually(
        WAIT,
        "every task succeeded once the alarm cleared",
        || async {
            let done = runs
                .0
                .lock()
                .unwrap()
                .values()
                .filter(|v| v.iter().any(|(a, _)| *a >= 2))
                .count();
            (done == N).then_some(())
        },
    )
    .await;
    assert_eq!(
        queue_len(&app.conn, &app.topo.dead_queue()).await,
        0,
        "nothing dead"
    );
    app.stop().await;
    drop(node);
}

/// SIGHUP (a `kill -HUP` meant for the producer, a closed terminal) neither
/// kills the consumer nor stops its work: it used to end the process at once.
#[tokio::test]
async fn sighup_is_logged_and_ignored() {
    let cfg = config("surround_hup");
    let app = client_app(&cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let port = warren::testing::free_port();
    let mut child = command(&cfg, &dir, port)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_line = |what: &str| {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                if l.contains(what) {
                    return;
                }
            }
        }
        panic!("no log line with {what:?}");
    };
    wait_line("consuming");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).unwrap();
    wait_line("SIGHUP ignored");
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP ended the consumer"
    );
    publish_and_drain(&app, 5, port).await;
    assert_stops_and_acked(&app, &mut child).await;
    app.stop().await;
}

/// Credentials the broker refuses will be refused again: the consumer exits 1
/// at once instead of retrying forever.
#[tokio::test]
async fn refused_credentials_stop_the_consumer() {
    let cfg = config("surround_refused");
    let dir = tempfile::tempdir().unwrap();
    let url = cfg
        .amqp
        .url_list()
        .replacen("guest:guest@", "guest:wrong@", 1);
    assert_ne!(url, cfg.amqp.url_list(), "test URL carries guest:guest");
    let mut child = command(&cfg, &dir, warren::testing::free_port())
        .env("WARREN_AMQP_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // A bound on a hang, not on speed: the regression retried forever, the
    // fix exits after one refused attempt (well under a second here).
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the consumer kept retrying refused credentials for 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "refused credentials: exited after {} ms",
        started.elapsed().as_millis()
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(!err.contains("wrong"), "the password in the output: {err}");
}
