//! The `admin` side of the API against a running `warren-producer`: the
//! audit line and counter of mutating requests.

use std::time::Duration;

use crate::helpers::{World, ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN};

const HOURLY: &str = r#"
[[schedules]]
name = "hourly"
cron = "0 * * * *"
task = "it.hourly"
"#;

async fn post(url: &str, token: &str, body: &str) -> u16 {
    reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("HTTP request")
        .status()
        .as_u16()
}

/// A trigger and a publish each leave one audit line naming the grant (not
/// its token) and count in `warren_producer_actions_total`; the payload is
/// in no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_requests_are_audited_by_grant_name() {
    let w = World::new("audit").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", HOURLY);
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(Duration::from_secs(20)).await;

    let trigger = p.url("/v1/schedules/hourly/trigger");
    assert_eq!(post(&trigger, PUBLISH_TOKEN, "").await, 202);
    let tasks = p.url("/v1/tasks");
    let body = r#"[{"task":"it.a","payload":{"secret":"payload-marker-1"}},
                   {"task":"it.b","payload":{"secret":"payload-marker-2"}}]"#;
    assert_eq!(post(&tasks, ADMIN_TOKEN, body).await, 202);
    rx.wait_for(Duration::from_secs(20), "3 tasks", |m| m.len() >= 3)
        .await;

    let ok = |action: &str| {
        format!("warren_producer_actions_total{{action=\"{action}\",result=\"ok\"}}")
    };
    assert_eq!(p.metric(&ok("trigger")).await, Some(1.0));
    assert_eq!(p.metric(&ok("publish")).await, Some(1.0));
    let logs = p.logs();
    let audit = audit_lines(&logs);
    assert_eq!(audit.len(), 2, "{logs}");
    assert!(
        audit[0].contains(
            r#"who="publish_token" action="trigger" target="hourly" result="ok" count=1"#
        ),
        "{}",
        audit[0]
    );
    assert!(
        audit[1].contains(
            r#"who="admin_token" action="publish" target="it.a,it.b" result="ok" count=2"#
        ),
        "{}",
        audit[1]
    );
    for secret in [PUBLISH_TOKEN, ADMIN_TOKEN, READ_TOKEN, "payload-marker"] {
        assert!(!logs.contains(secret), "`{secret}` in the log:\n{logs}");
    }
}

/// The `warren::audit` lines of a text log, without colour codes.
pub fn audit_lines(logs: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains("warren::audit"))
        .map(strip_ansi)
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Put a dead letter straight into the dead queue, with the headers a
/// consumer writes when it dead-letters a task.
async fn dead_letter(
    w: &World,
    p: &warren::amqp::Publisher,
    id: &str,
    task: &str,
    kind: &str,
    reason: &str,
) {
    use lapin::types::{AMQPValue, FieldTable};
    use warren::envelope::headers;
    let mut h = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(v.into());
    h.insert(headers::DEAD_REASON.into(), s(reason));
    h.insert(headers::DEAD_KIND.into(), s(kind));
    h.insert(headers::DEAD_AT.into(), s("2026-01-01T00:00:00.000Z"));
    h.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(3));
    let props = lapin::BasicProperties::default()
        .with_message_id(id.into())
        .with_type(task.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(h);
    let body = format!(r#"{{"original":"{id}"}}"#);
    p.publish(&w.topo.dead_exchange(), task, props, body.as_bytes())
        .await
        .expect("publish a dead letter");
}

async fn call(
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("HTTP request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body, got {text:?}")),
    )
}

/// The `/v1/dead` API on real dead letters: groups by fingerprint, bounded
/// scans, listing by group, inspecting, edit-and-replay (audited, header
/// names the grant), replaying a group, purging with `admin` and a
/// confirmation only; scopes refused where they must be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_api_groups_inspects_replays_and_purges() {
    use reqwest::Method;
    use serde_json::json;
    let w = World::new("deadapi").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", HOURLY);
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(Duration::from_secs(20)).await;
    let publisher = warren::amqp::Publisher::new(&w.conn, Duration::from_secs(10))
        .await
        .unwrap();
    for (i, n) in [1234, 88, 7].iter().enumerate() {
        let reason = format!("permanent error: timeout after {n} ms for id 9f0c31ab{i}e2");
        dead_letter(
            &w,
            &publisher,
            &format!("slow-{i}"),
            "it.slow",
            "permanent",
            &reason,
        )
        .await;
    }
    for i in 0..2 {
        let reason = format!("attempts exhausted (3 of 3): upstream said 50{i}");
        dead_letter(
            &w,
            &publisher,
            &format!("flaky-{i}"),
            "it.flaky",
            "exhausted",
            &reason,
        )
        .await;
    }
    let slow_fp = "timeout after # ms for id <id> — permanent error";
    let flaky_fp = "upstream said # — attempts exhausted (# of #)";
    let slow_group = json!({"task": "it.slow", "kind": "permanent", "fingerprint": slow_fp});
    let flaky_group = json!({"task": "it.flaky", "kind": "exhausted", "fingerprint": flaky_fp});

    // Read: overview, bounded overview, a group's messages, one message.
    let (s, o) = call(Method::GET, &p.url("/v1/dead"), READ_TOKEN, None).await;
    assert_eq!(s, 200, "{o}");
    assert_eq!(
        (
            o["total"].as_u64(),
            o["scanned"].as_u64(),
            o["truncated"].as_bool()
        ),
        (Some(5), Some(5), Some(false))
    );
    assert_eq!(o["groups"][0]["fingerprint"], slow_fp);
    assert_eq!(o["groups"][0]["count"], 3);
    assert_eq!(o["groups"][1]["fingerprint"], flaky_fp);
    let (_, o) = call(Method::GET, &p.url("/v1/dead?limit=2"), READ_TOKEN, None).await;
    assert_eq!(
        (
            o["total"].as_u64(),
            o["scanned"].as_u64(),
            o["truncated"].as_bool()
        ),
        (Some(5), Some(2), Some(true))
    );
    let q = format!(
        "/v1/dead/messages?task=it.flaky&kind=exhausted&fingerprint={}",
        urlencode(flaky_fp)
    );
    let (s, l) = call(Method::GET, &p.url(&q), READ_TOKEN, None).await;
    assert_eq!(s, 200, "{l}");
    let ids: Vec<&str> = l["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["flaky-0", "flaky-1"]);
    let (s, m) = call(
        Method::GET,
        &p.url("/v1/dead/messages/slow-0"),
        READ_TOKEN,
        None,
    )
    .await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["payload"], r#"{"original":"slow-0"}"#);
    assert_eq!(m["payload_base64"], false);
    assert_eq!(m["properties"]["type"], "it.slow");
    assert_eq!(m["headers"]["x-warren-dead-kind"], "permanent");
    let (s, e) = call(
        Method::GET,
        &p.url("/v1/dead/messages/nope"),
        READ_TOKEN,
        None,
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (404, Some("not_found")));

    // Scopes: read cannot replay, publish cannot purge.
    let replay = p.url("/v1/dead/replay");
    let purge = p.url("/v1/dead/purge");
    let (s, _) = call(
        Method::POST,
        &replay,
        READ_TOKEN,
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = call(
        Method::POST,
        &purge,
        PUBLISH_TOKEN,
        Some(json!({"all": true, "confirm": true})),
    )
    .await;
    assert_eq!(s, 403);
    let (s, e) = call(Method::POST, &replay, PUBLISH_TOKEN, Some(json!({}))).await;
    assert_eq!((s, e["error"].as_str()), (422, Some("invalid_selector")));

    // Edit and replay one: new payload, attempt 1, edited by the grant.
    let edit = p.url("/v1/dead/messages/slow-0/replay");
    let (s, r) = call(
        Method::POST,
        &edit,
        PUBLISH_TOKEN,
        Some(json!({"payload": {"fixed": true}})),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["replayed"], json!(["slow-0"]));
    let got = rx
        .wait_for(Duration::from_secs(20), "the edited task", |m| {
            !m.is_empty()
        })
        .await;
    assert_eq!(got[0].id, "slow-0");
    assert_eq!(got[0].body, br#"{"fixed":true}"#);
    assert_eq!(got[0].edited_by.as_deref(), Some("publish_token"));
    assert!(
        got[0].attempt.is_none_or(|a| a == 1),
        "{:?}",
        got[0].attempt
    );
    let (s, _) = call(
        Method::POST,
        &edit,
        PUBLISH_TOKEN,
        Some(json!({"payload": 1})),
    )
    .await;
    assert_eq!(s, 404, "already replayed");

    // Replay the rest of the slow group; unknown ids are reported.
    let (s, r) = call(
        Method::POST,
        &replay,
        PUBLISH_TOKEN,
        Some(json!({"group": slow_group})),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["replayed"], json!(["slow-1", "slow-2"]));
    rx.wait_for(Duration::from_secs(20), "the group", |m| m.len() >= 3)
        .await;
    let (_, r) = call(
        Method::POST,
        &replay,
        PUBLISH_TOKEN,
        Some(json!({"ids": ["nope"]})),
    )
    .await;
    assert_eq!(r["failed"][0]["id"], "nope");

    // Purge: a confirmation is required, then the group goes.
    let (s, e) = call(
        Method::POST,
        &purge,
        ADMIN_TOKEN,
        Some(json!({"group": flaky_group})),
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (400, Some("confirm_required")));
    w.settles_at(&w.topo.dead_queue(), 2).await;
    let (s, r) = call(
        Method::POST,
        &purge,
        ADMIN_TOKEN,
        Some(json!({"group": flaky_group, "confirm": true})),
    )
    .await;
    assert_eq!((s, r["purged"].as_u64()), (200, Some(2)));
    w.settles_at(&w.topo.dead_queue(), 0).await;

    // Audited under the grant's name.
    let ok = |action: &str| {
        format!("warren_producer_actions_total{{action=\"{action}\",result=\"ok\"}}")
    };
    assert_eq!(p.metric(&ok("replay_edited")).await, Some(1.0));
    assert_eq!(p.metric(&ok("purge")).await, Some(1.0));
    // The log writer is non-blocking: the purge's line may land a moment
    // after its metric (and the HTTP answer) did.
    let has = |audit: &[String]| {
        audit.iter().any(|l| {
            l.contains(
            r#"who="publish_token" action="replay_edited" target="id slow-0" result="ok" count=1"#
        )
        }) && audit
            .iter()
            .any(|l| l.contains(r#"who="admin_token" action="purge""#) && l.contains("count=2"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut audit = audit_lines(&p.logs());
    while !has(&audit) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        audit = audit_lines(&p.logs());
    }
    assert!(has(&audit), "{audit:#?}");
    assert!(!p.logs().contains("fixed"), "no payload in the log");
}

/// Enough percent-encoding for a fingerprint in a query string.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const PAUSABLE: &str = r#"
[[schedules]]
name = "clock"
cron = "* * * * * *"
task = "it.clock"

[[schedules]]
name = "pausable"
cron = "* * * * * *"
task = "it.pausable"
misfire = "catch_up"
misfire_grace = "60s"
"#;

async fn schedule_json(p: &crate::helpers::Producer, name: &str) -> serde_json::Value {
    let (s, v) = call(
        reqwest::Method::GET,
        &p.url("/v1/schedules"),
        READ_TOKEN,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["schedules"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no schedule {name} in {v}"))
}

/// Pausing through a standby reaches the leader and its state: after the
/// leader's `kill -9` the new leader keeps the schedule paused (a per-second
/// witness schedule fires on meanwhile), and a resume makes it fire again
/// without catching up the paused span (even under `catch_up`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_survives_a_leader_kill_and_resume_skips_the_paused_span() {
    use reqwest::Method;
    let w = World::new("pause").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", PAUSABLE);
    let mut a = w.start("a", &cfg, &[]);
    a.wait_leader(Duration::from_secs(20), true).await;
    let b = w.start("b", &cfg, &[]);
    b.wait_ready(Duration::from_secs(20)).await;
    b.wait_leader(Duration::from_secs(10), false).await;
    // Each replica hears the other's announcement: the standby lists
    // itself first, then the leader.
    let replicas = b.url("/v1/replicas");
    let list = warren::testing::eventually(Duration::from_secs(15), "both replicas listed", || {
        let url = replicas.clone();
        async move {
            let (s, v) = call(Method::GET, &url, READ_TOKEN, None).await;
            let list = v["replicas"].as_array().cloned().unwrap_or_default();
            (s == 200 && list.len() == 2).then_some(list)
        }
    })
    .await;
    assert_eq!(
        list.iter()
            .map(|r| r["leader"].as_bool())
            .collect::<Vec<_>>(),
        [Some(false), Some(true)],
        "{list:?}"
    );
    let of = |msgs: &[crate::helpers::Msg], s: &str| -> Vec<chrono::DateTime<chrono::Utc>> {
        msgs.iter()
            .filter(|m| m.schedule.as_deref() == Some(s))
            .filter_map(|m| m.instant())
            .collect()
    };
    rx.wait_for(Duration::from_secs(20), "a tick of `pausable`", |m| {
        !of(m, "pausable").is_empty()
    })
    .await;

    // Only `admin` may pause; an unknown name is 404; the standby relays.
    let pause = b.url("/v1/schedules/pausable/pause");
    assert_eq!(call(Method::POST, &pause, PUBLISH_TOKEN, None).await.0, 403);
    let (s, _) = call(
        Method::POST,
        &b.url("/v1/schedules/nope/pause"),
        ADMIN_TOKEN,
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, v) = call(Method::POST, &pause, ADMIN_TOKEN, None).await;
    assert_eq!(s, 200, "{v}\n{}", b.logs());
    let paused_at = chrono::Utc::now();
    let st = schedule_json(&b, "pausable").await;
    assert_eq!(
        (st["paused"].as_bool(), st["next_fire"].is_null()),
        (Some(true), true),
        "{st}"
    );
    warren::testing::eventually(
        Duration::from_secs(10),
        "the leader to show it paused",
        || async { (schedule_json(&a, "pausable").await["paused"] == true).then_some(()) },
    )
    .await;

    // kill -9 the leader; the standby takes over and keeps it paused while
    // the witness fires on for a few seconds.
    let killed = chrono::Utc::now();
    a.kill9();
    b.wait_leader(Duration::from_secs(60), true).await;
    let window = killed + chrono::TimeDelta::seconds(3);
    let seen = rx
        .wait_for(
            Duration::from_secs(30),
            "the new leader's witness ticks",
            |m| {
                m.iter()
                    .any(|m| m.sent_by(b.pid) && m.instant().is_some_and(|t| t > window))
            },
        )
        .await;
    let during: Vec<_> = of(&seen, "pausable")
        .into_iter()
        .filter(|t| *t > paused_at)
        .collect();
    assert!(during.is_empty(), "fired while paused: {during:?}");
    assert_eq!(schedule_json(&b, "pausable").await["paused"], true);

    // Resume: it fires again, from now on.
    let resume_sent = chrono::Utc::now();
    let (s, v) = call(
        Method::POST,
        &b.url("/v1/schedules/pausable/resume"),
        ADMIN_TOKEN,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let after = rx
        .wait_for(Duration::from_secs(20), "a tick after the resume", |m| {
            of(m, "pausable").iter().any(|t| *t > resume_sent)
        })
        .await;
    let caught_up: Vec<_> = of(&after, "pausable")
        .into_iter()
        .filter(|t| *t > paused_at && *t < resume_sent)
        .collect();
    assert!(
        caught_up.is_empty(),
        "the paused span was caught up: {caught_up:?}"
    );
    assert_eq!(schedule_json(&b, "pausable").await["paused"], false);
    let audit = audit_lines(&b.logs());
    for action in ["pause", "resume"] {
        let line =
            format!(r#"who="admin_token" action="{action}" target="pausable" result="ok" count=1"#);
        assert!(audit.iter().any(|l| l.contains(&line)), "{audit:#?}");
    }
}

/// `warren-producer schedules pause|resume NAME` goes through the broker to
/// the leader like the API; an unknown name is a usage error (exit 2), no
/// leader a runtime failure (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_from_the_command_line() {
    let w = World::new("pausecli").await;
    let cfg = w.write_config("p.toml", PAUSABLE);
    let path = cfg.display().to_string();
    let no_leader = w.cli(&["--config", &path, "schedules", "pause", "pausable"], b"");
    assert_eq!(no_leader.status.code(), Some(1), "{no_leader:?}");
    let p = w.start("p", &cfg, &[]);
    p.wait_leader(Duration::from_secs(20), true).await;
    let out = w.cli(&["--config", &path, "schedules", "pause", "pausable"], b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", p.logs());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pausable: paused"
    );
    assert_eq!(schedule_json(&p, "pausable").await["paused"], true);
    let out = w.cli(&["--config", &path, "schedules", "resume", "pausable"], b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(schedule_json(&p, "pausable").await["paused"], false);
    let out = w.cli(&["--config", &path, "schedules", "pause", "nope"], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no schedule named `nope`"));
}
