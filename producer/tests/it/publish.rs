use std::time::Duration;

use chrono::Utc;

use warren::config::QueueType;

use crate::helpers::World;

/// `publish <task>` prints the id once the broker confirmed; the message is
/// in the work queue with its payload, name and priority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_single_task_prints_id_after_confirm() {
    let w = World::new("publish_single").await;
    let rx = w.collect().await;
    let out = w.cli(
        &[
            "publish",
            "it.single",
            "--payload",
            r#"{"to":"a@b.c"}"#,
            "--id",
            "my-id-1",
            "--priority",
            "4",
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "my-id-1");
    let got = rx
        .wait_for(Duration::from_secs(10), "the published task", |m| {
            !m.is_empty()
        })
        .await;
    assert_eq!(got[0].id, "my-id-1");
    assert_eq!(got[0].name.as_deref(), Some("it.single"));
    assert_eq!(got[0].body, br#"{"to":"a@b.c"}"#);

    // Payload from a file, generated id.
    let file = w.write_config("payload.json", r#"{"from":"file"}"#);
    let out = w.cli(
        &[
            "publish",
            "it.file",
            "--payload",
            &format!("@{}", file.display()),
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "a UUID: {id}");
    let got = rx
        .wait_for(Duration::from_secs(10), "the second task", |m| m.len() >= 2)
        .await;
    assert_eq!(got[1].id, id);
    assert_eq!(got[1].body, br#"{"from":"file"}"#);

    // Bad JSON payload: non-zero, nothing published.
    let out = w.cli(&["publish", "it.bad", "--payload", "{nope"], b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
}

/// `publish --delay 3s` arrives no earlier than 3 s after the command started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_delayed_task_arrives_no_earlier_than_the_delay() {
    let w = World::new("publish_delayed").await;
    let rx = w.collect().await;
    let started = Utc::now();
    let out = w.cli(
        &["publish", "it.later", "--delay", "3s", "--payload", "-"],
        b"[1,2]",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The bound is on a hang (a lost or stuck delayed copy), not on the
    // delay's precision, which a loaded machine stretches: that is printed.
    let got = rx
        .wait_for(
            Duration::from_secs(60),
            "the task delayed by 3 s, for 60 s",
            |m| !m.is_empty(),
        )
        .await;
    let waited = got[0].received - started;
    assert!(
        waited >= chrono::TimeDelta::seconds(3),
        "arrived after {waited}, before the 3 s delay"
    );
    assert_eq!(got[0].name.as_deref(), Some("it.later"));
    assert_eq!(got[0].body, b"[1,2]");
    eprintln!("delayed 3s: arrived after {} ms", waited.num_milliseconds());
}

/// `publish --batch` of 10,000 NDJSON tasks: all confirmed and in the queue;
/// a bad line makes the command fail loudly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_batch_of_10000() {
    let w = World::new("publish_batch").await;
    let mut input = String::new();
    for i in 0..10_000 {
        input.push_str(&format!(
            "{{\"task\":\"it.batch\",\"id\":\"b-{i}\",\"payload\":{{\"i\":{i}}}}}\n"
        ));
    }
    let started = std::time::Instant::now();
    let out = w.cli(&["publish", "--batch"], input.as_bytes());
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "10000 confirmed, 0 failed"
    );
    let q = w.work_queue();
    warren::testing::eventually(
        Duration::from_secs(10),
        "10,000 messages in the queue",
        || async { (w.queue_len(&q).await == 10_000).then_some(()) },
    )
    .await;
    eprintln!(
        "batch of 10,000: {} ms including process start and topology declare",
        took.as_millis()
    );

    let out = w.cli(
        &["publish", "--batch"],
        b"{\"task\":\"it.batch\"}\nnot json\n{\"task\":\"it.batch\",\"bogus\":1}\n",
    );
    assert!(!out.status.success(), "bad lines must fail the batch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.trim(), "1 confirmed, 2 failed");
    assert!(
        stderr.contains("line 2: not valid JSON at column 2")
            && stderr.contains("line 3: unknown field `bogus`"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("line 1 column"),
        "serde's own position: {stderr}"
    );
}

/// `publish --batch` keeps publishing past a task the broker refuses (here
/// unroutable: no queue binds its name) and reports it, and a bad line, by
/// line number; the command exits 1 once every other task was confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_batch_reports_refused_tasks_by_line_and_exits_1() {
    let w = World::new("publish_batch_refused").await;
    // A prefix of its own whose only queue binds `only.this`: anything else
    // is returned by the broker.
    let prefix = format!("{}.noroute", w.prefix);
    let config = w.write_config(
        "noroute.toml",
        "[[topology.queues]]\nname = \"only\"\nbindings = [\"only.this\"]\n",
    );
    let mut input = String::new();
    for i in 0..3000 {
        input.push_str(&format!("{{\"task\":\"only.this\",\"id\":\"ok-{i}\"}}\n"));
    }
    input.push_str("{\"task\":\"other.thing\",\"id\":\"refused-1\"}\n");
    input.push_str("\n{oops\n");
    for i in 3000..6000 {
        input.push_str(&format!("{{\"task\":\"only.this\",\"id\":\"ok-{i}\"}}\n"));
    }
    let out = w.cli_with(
        &["--config", &config.to_string_lossy(), "publish", "--batch"],
        input.as_bytes(),
        &[("WARREN_TOPOLOGY__PREFIX", &prefix)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout} {stderr}");
    assert_eq!(stdout.trim(), "6000 confirmed, 2 failed", "{stderr}");
    assert!(
        stderr.contains("line 3001: task refused-1 (other.thing): unroutable"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 3003: not valid JSON at column 2"),
        "{stderr}"
    );
    let queue = format!("{prefix}.only");
    warren::testing::eventually(
        Duration::from_secs(10),
        "6,000 messages in the queue",
        || async { (w.queue_len(&queue).await == 6000).then_some(()) },
    )
    .await;
    let mut cfg = warren::testing::topology_config("publish_batch_refused", QueueType::Classic);
    cfg.prefix = prefix;
    cfg.queues = vec![warren::config::QueueConfig {
        name: "only".into(),
        bindings: vec!["only.this".into()],
        ..Default::default()
    }];
    warren::testing::delete_topology(&w.conn, &warren::Topology::new(&cfg)).await;
}

/// `publish --at` 100 days ahead (past the delay levels' ~38.8-day range) is
/// accepted: the task waits in the top level and carries the exact instant
/// in `x-warren-not-before`, so the consumer parks it again on arrival.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_at_beyond_the_delay_range_is_accepted() {
    let w = World::new("publish_far_eta").await;
    let at = (Utc::now() + chrono::TimeDelta::days(100))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let out = w.cli(&["publish", "it.far", "--at", &at], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = format!("{}.delay.{}", w.prefix, warren::delay::LEVELS - 1);
    assert_eq!(
        w.queue_len(&top).await,
        1,
        "the task waits in the top level"
    );
    let ch = w.conn.create_channel().await.unwrap();
    let msg = ch
        .basic_get(
            top.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the parked task");
    let headers = msg
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let nb = warren::envelope::header_str(&headers, warren::envelope::headers::NOT_BEFORE)
        .expect("x-warren-not-before");
    let nb = chrono::DateTime::parse_from_rfc3339(&nb).unwrap();
    let want = chrono::DateTime::parse_from_rfc3339(&at).unwrap();
    assert!(
        (nb - want).abs() < chrono::TimeDelta::seconds(1),
        "not-before {nb} for --at {at}"
    );
}
