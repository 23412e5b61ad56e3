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
