//! Schedules managed at runtime (`/v1/schedules/{name}`, the catalog in
//! RabbitMQ) through real producer processes: round trip with ETags,
//! refusals, standbys seeing changes, firing, persistence across `kill -9`
//! of every replica and a broker restart, pause and trigger of API
//! schedules; and a schedule book
//! of a few thousand schedules where every due instant fires exactly once.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{duplicates, Producer, World, ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN};

/// A request; the status, the `ETag` and the JSON body (Null when none).
async fn req(
    method: Method,
    url: &str,
    token: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Value) {
    let mut r = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = r.send().await.expect("HTTP request");
    let status = resp.status().as_u16();
    let etag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        etag,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

fn url(p: &Producer, name: &str) -> String {
    p.url(&format!("/v1/schedules/{name}"))
}

const CONFIG: &str = r#"
[[schedules]]
name = "from-file"
cron = "0 0 * * * *"
task = "it.file"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_schedules_round_trip_with_etags_and_every_refusal() {
    let w = World::new("sched_api").await;
    let cfg = w.write_config("p.toml", CONFIG);
    let p = w.start("a", &cfg, &[("WARREN_SCHEDULER__MAX_SCHEDULES", "2")]);
    p.wait_ready(Duration::from_secs(20)).await;
    let def = json!({"cron": "0 0 9 * * *", "timezone": "Europe/Berlin", "task": "report.daily",
                     "payload": {"customer": 42}});

    // Create: 201 with an ETag; read back with the same ETag and source api.
    let (s, created, v) = req(
        Method::PUT,
        &url(&p, "cust-42"),
        ADMIN_TOKEN,
        Some(def.clone()),
        &[],
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let created = created.expect("ETag on create");
    let (s, tag, v) = req(Method::GET, &url(&p, "cust-42"), READ_TOKEN, None, &[]).await;
    assert_eq!((s, tag.as_deref()), (200, Some(created.as_str())), "{v}");
    assert_eq!(v["source"], "api");
    assert_eq!(v["definition"]["payload"], json!({"customer": 42}));
    assert!(
        v["next_fire_local"]
            .as_str()
            .unwrap_or("")
            .contains("T09:00:00"),
        "{v}"
    );

    // Replace with the current ETag: 200, a new ETag; the old one is stale.
    let changed = json!({"cron": "0 30 9 * * *", "task": "report.daily"});
    let (s, replaced, _) = req(
        Method::PUT,
        &url(&p, "cust-42"),
        ADMIN_TOKEN,
        Some(changed.clone()),
        &[("if-match", &created)],
    )
    .await;
    assert_eq!(s, 200);
    assert_ne!(replaced.as_deref(), Some(created.as_str()));
    let (s, _, v) = req(
        Method::PUT,
        &url(&p, "cust-42"),
        ADMIN_TOKEN,
        Some(changed.clone()),
        &[("if-match", &created)],
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (412, Some("precondition_failed")),
        "{v}"
    );
    // Create-only on an existing name: 412.
    let (s, _, _) = req(
        Method::PUT,
        &url(&p, "cust-42"),
        ADMIN_TOKEN,
        Some(changed.clone()),
        &[("if-none-match", "*")],
    )
    .await;
    assert_eq!(s, 412);

    // Scopes: read may not write; publish may not either.
    for token in [READ_TOKEN, PUBLISH_TOKEN] {
        let (s, _, _) = req(Method::PUT, &url(&p, "x"), token, Some(def.clone()), &[]).await;
        assert_eq!(s, 403);
    }
    // The config file's schedule is read-only here, and named as such.
    let (s, _, v) = req(
        Method::PUT,
        &url(&p, "from-file"),
        ADMIN_TOKEN,
        Some(def.clone()),
        &[],
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("config_schedule")),
        "{v}"
    );
    assert!(
        v["message"].as_str().unwrap_or("").contains("p.toml"),
        "{v}"
    );
    let (s, _, v) = req(
        Method::DELETE,
        &url(&p, "from-file"),
        ADMIN_TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(s, 409, "{v}");
    let (s, _, v) = req(Method::GET, &url(&p, "from-file"), READ_TOKEN, None, &[]).await;
    assert_eq!((s, v["source"].as_str()), (200, Some("config")));

    // 422 naming the key, one per bad input; nothing stored.
    let bad: [(&str, Value, &str); 6] = [
        ("b1", json!({"cron": "61 * * * * *", "task": "t"}), "cron"),
        (
            "b2",
            json!({"cron": "* * * * * *", "task": "t", "timezone": "Mars/Olympus"}),
            "timezone",
        ),
        (
            "b3",
            json!({"cron": "* * * * * *", "task": "t", "colour": "red"}),
            "colour",
        ),
        (
            "b4",
            json!({"cron": "* * * * * *", "workflow": "nope"}),
            "workflow",
        ),
        ("b5", json!({"cron": "* * * * * *"}), "task"),
        (
            "b6",
            json!({"cron": "* * * * * *", "task": "t", "name": "other"}),
            "name",
        ),
    ];
    for (name, body, key) in bad {
        let (s, _, v) = req(Method::PUT, &url(&p, name), ADMIN_TOKEN, Some(body), &[]).await;
        assert_eq!(s, 422, "{name}: {v}");
        assert!(
            v["message"].as_str().unwrap_or("").contains(key),
            "{name} names `{key}`: {v}"
        );
    }
    let long = "n".repeat(201);
    for name in ["a@b", "a%2Fb", "a%20b", long.as_str()] {
        let (s, _, v) = req(
            Method::PUT,
            &url(&p, name),
            ADMIN_TOKEN,
            Some(def.clone()),
            &[],
        )
        .await;
        assert_eq!(s, 422, "name {name:?}: {v}");
    }
    let big = json!({"cron": "* * * * * *", "task": "t", "payload": {"x": "y".repeat(2 << 20)}});
    let (s, _, _) = req(Method::PUT, &url(&p, "big"), ADMIN_TOKEN, Some(big), &[]).await;
    assert_eq!(s, 413);
    // scheduler.max_schedules = 2: the second fits, the third is refused.
    let (s, _, _) = req(
        Method::PUT,
        &url(&p, "second"),
        ADMIN_TOKEN,
        Some(def.clone()),
        &[],
    )
    .await;
    assert_eq!(s, 201);
    let (s, _, v) = req(
        Method::PUT,
        &url(&p, "third"),
        ADMIN_TOKEN,
        Some(def.clone()),
        &[],
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("too_many_schedules")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("max_schedules = 2"),
        "{v}"
    );

    // Paged list: prefix, limit, after.
    let (s, _, v) = req(
        Method::GET,
        &p.url("/v1/schedules?limit=1"),
        READ_TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!((s, v["total"].as_u64()), (200, Some(3)), "{v}");
    assert_eq!(v["schedules"][0]["name"], "cust-42");
    let after = v["next_after"].as_str().expect("next page").to_owned();
    let (_, _, v) = req(
        Method::GET,
        &p.url(&format!("/v1/schedules?after={after}")),
        READ_TOKEN,
        None,
        &[],
    )
    .await;
    let names: Vec<&str> = v["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["from-file", "second"]);
    let (_, _, v) = req(
        Method::GET,
        &p.url("/v1/schedules?prefix=cust-"),
        READ_TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(v["schedules"].as_array().map(Vec::len), Some(1));

    // Delete: stale If-Match refused, then 204, then 404.
    let (s, _, _) = req(
        Method::DELETE,
        &url(&p, "cust-42"),
        ADMIN_TOKEN,
        None,
        &[("if-match", &created)],
    )
    .await;
    assert_eq!(s, 412);
    let (s, _, _) = req(Method::DELETE, &url(&p, "cust-42"), ADMIN_TOKEN, None, &[]).await;
    assert_eq!(s, 204);
    let (s, _, _) = req(Method::GET, &url(&p, "cust-42"), READ_TOKEN, None, &[]).await;
    assert_eq!(s, 404);
    let (s, _, _) = req(Method::DELETE, &url(&p, "cust-42"), ADMIN_TOKEN, None, &[]).await;
    assert_eq!(s, 404);
    // Every change left an audit line naming the action.
    let logs = p.logs();
    assert!(
        logs.contains("schedule_put") && logs.contains("schedule_delete"),
        "audit lines"
    );
}

/// An API schedule created on a standby is seen by the leader within a
/// second and fires under `<name>@<instant>` ids; it survives `kill -9` of
/// both replicas (no id twice across the restart), and can be paused,
/// resumed and triggered like a config-file one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_schedules_fire_survive_kill_9_of_every_replica_and_pause() {
    let w = World::new("sched_api_fire").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", "");
    let mut a = w.start("a", &cfg, &[]);
    a.wait_leader(Duration::from_secs(20), true).await;
    a.wait_ready(Duration::from_secs(20)).await;
    let mut b = w.start("b", &cfg, &[]);
    b.wait_ready(Duration::from_secs(20)).await;
    let every = json!({"cron": "* * * * * *", "task": "it.api"});
    let (s, _, v) = req(
        Method::PUT,
        &url(&b, "api-tick"),
        ADMIN_TOKEN,
        Some(every),
        &[],
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let created = Utc::now();
    // The leader knows it within a second.
    warren::testing::eventually(
        Duration::from_secs(1),
        "the leader sees the new schedule",
        || async {
            let (s, _, _) = req(Method::GET, &url(&a, "api-tick"), READ_TOKEN, None, &[]).await;
            (s == 200).then_some(())
        },
    )
    .await;
    // It fires at its first instant at least 2 s away, and on.
    let first = rx
        .wait_for(Duration::from_secs(20), "3 ticks of api-tick", |m| {
            m.iter()
                .filter(|m| m.schedule.as_deref() == Some("api-tick"))
                .count()
                >= 3
        })
        .await;
    let earliest = first
        .iter()
        .filter(|m| m.schedule.as_deref() == Some("api-tick"))
        .filter_map(|m| m.instant())
        .min()
        .unwrap();
    assert!(
        earliest <= created + chrono::TimeDelta::seconds(3),
        "first tick {earliest}, created {created}"
    );

    // Every replica killed; the catalog and the cursors live in RabbitMQ.
    a.kill9();
    b.kill9();
    let before_restart = rx.of_schedule("api-tick").len();
    let c = w.start("c", &cfg, &[]);
    c.wait_leader(Duration::from_secs(30), true).await;
    c.wait_ready(Duration::from_secs(30)).await;
    let (s, _, v) = req(Method::GET, &url(&c, "api-tick"), READ_TOKEN, None, &[]).await;
    assert_eq!((s, v["source"].as_str()), (200, Some("api")), "{v}");
    rx.wait_for(Duration::from_secs(20), "ticks after the restart", |m| {
        m.iter()
            .filter(|m| m.schedule.as_deref() == Some("api-tick"))
            .count()
            >= before_restart + 3
    })
    .await;
    assert_eq!(
        duplicates(&rx.of_schedule("api-tick")),
        Vec::<String>::new()
    );

    // Pause, resume and trigger work on an API schedule.
    let (s, _, v) = req(
        Method::POST,
        &c.url("/v1/schedules/api-tick/pause"),
        ADMIN_TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (_, _, v) = req(Method::GET, &url(&c, "api-tick"), READ_TOKEN, None, &[]).await;
    assert_eq!(v["paused"], true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_at = rx.of_schedule("api-tick").len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rx.of_schedule("api-tick").len(),
        paused_at,
        "no tick while paused"
    );
    let (s, _, v) = req(
        Method::POST,
        &c.url("/v1/schedules/api-tick/trigger"),
        PUBLISH_TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let manual = v["id"].as_str().unwrap().to_owned();
    rx.wait_for(Duration::from_secs(10), "the manual trigger", |m| {
        m.iter().any(|m| m.id == manual)
    })
    .await;
    let (s, _, _) = req(
        Method::POST,
        &c.url("/v1/schedules/api-tick/resume"),
        ADMIN_TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(s, 200);
    let resumed = rx.of_schedule("api-tick").len();
    rx.wait_for(Duration::from_secs(10), "ticks after resume", |m| {
        m.iter()
            .filter(|m| m.schedule.as_deref() == Some("api-tick"))
            .count()
            >= resumed + 2
    })
    .await;

    // Deleting it while it fires: it stops.
    let (s, _, _) = req(Method::DELETE, &url(&c, "api-tick"), ADMIN_TOKEN, None, &[]).await;
    assert_eq!(s, 204);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_delete = rx.of_schedule("api-tick").len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rx.of_schedule("api-tick").len(),
        after_delete,
        "no tick after delete"
    );
    assert_eq!(
        duplicates(&rx.of_schedule("api-tick")),
        Vec::<String>::new()
    );
}

/// The CI-sized scale test: 3,000 per-minute schedules spread over the
/// seconds (50 fires a second) for 70 s: every instant due in the window
/// fires exactly once. Counts, not times.
/// API schedules live in RabbitMQ alone: a broker restart (with every
/// producer gone) keeps both one in the compacted snapshot and one only in
/// the log after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_schedules_survive_a_broker_restart() {
    let node = warren::testing::Node::start();
    let w = World::on("sched_api_restart", node.url()).await;
    let cfg = w.write_config("p.toml", "");
    let fast = [("WARREN_SCHEDULER__COMPACT_EVERY", "1s")];
    let mut a = w.start("a", &cfg, &fast);
    a.wait_leader(Duration::from_secs(30), true).await;
    a.wait_ready(Duration::from_secs(30)).await;
    let hourly = json!({"cron": "0 0 * * * *", "task": "it.hourly"});
    let (s, _, v) = req(
        Method::PUT,
        &url(&a, "in-snapshot"),
        ADMIN_TOKEN,
        Some(hourly.clone()),
        &[],
    )
    .await;
    assert_eq!(s, 201, "{v}");
    // Past a compaction (every second here), then one more only in the log.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s, _, v) = req(
        Method::PUT,
        &url(&a, "in-log"),
        ADMIN_TOKEN,
        Some(hourly),
        &[],
    )
    .await;
    assert_eq!(s, 201, "{v}");
    a.kill9();
    node.stop_app();
    node.start_app();
    let b = w.start("b", &cfg, &fast);
    b.wait_leader(Duration::from_secs(60), true).await;
    b.wait_ready(Duration::from_secs(60)).await;
    for name in ["in-snapshot", "in-log"] {
        let (s, _, v) = req(Method::GET, &url(&b, name), READ_TOKEN, None, &[]).await;
        assert_eq!((s, v["source"].as_str()), (200, Some("api")), "{name}: {v}");
        assert_eq!(v["cron"], "0 0 * * * *", "{name}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_schedules_fire_every_due_instant_exactly_once() {
    const N: usize = 3000;
    let w = World::new("sched_scale").await;
    let rx = w.collect().await;
    let mut text = String::new();
    for i in 0..N {
        text.push_str(&format!(
            "[[schedules]]\nname = \"s{i}\"\ncron = \"{} * * * * *\"\ntask = \"it.scale\"\n",
            i % 60
        ));
    }
    let cfg = w.write_config("p.toml", &text);
    let p = w.start("a", &cfg, &[]);
    p.wait_leader(Duration::from_secs(30), true).await;
    let start: DateTime<Utc> = Utc::now() + chrono::TimeDelta::seconds(2);
    tokio::time::sleep(Duration::from_secs(70)).await;
    let end: DateTime<Utc> = Utc::now() - chrono::TimeDelta::seconds(5);
    // Wait for the last instants of the window to arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = rx.all();
    assert_eq!(duplicates(&all), Vec::<String>::new(), "an id fired twice");
    let seen: HashSet<&str> = all.iter().map(|m| m.id.as_str()).collect();
    let mut missing = BTreeMap::new();
    let mut due = 0;
    for i in 0..N {
        let name = format!("s{i}");
        let spec = warren_producer_spec(i % 60);
        let mut t = start;
        while let Some(n) = next_at_second(&spec, t) {
            if n > end {
                break;
            }
            due += 1;
            let id = format!(
                "{name}@{}",
                n.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            );
            if !seen.contains(id.as_str()) {
                missing.insert(id, ());
            }
            t = n;
        }
    }
    assert!(
        due >= N,
        "the window holds at least one instant of each schedule ({due})"
    );
    assert!(
        missing.is_empty(),
        "{} of {due} due instants missing, e.g. {:?}",
        missing.len(),
        missing.keys().take(5).collect::<Vec<_>>()
    );
}

/// Second `s` of every minute.
fn warren_producer_spec(s: usize) -> u32 {
    s as u32
}

/// The next instant after `t` whose second is `s`.
fn next_at_second(s: &u32, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    use chrono::{TimeDelta, Timelike};
    let mut n = t.with_nanosecond(0)? + TimeDelta::seconds(1);
    while n.second() != *s {
        n += TimeDelta::seconds(1);
    }
    Some(n)
}

/// `schedules apply FILE [--dry-run]` and `schedules delete NAME` change
/// what the running producers serve; every problem of a file is refused
/// before anything is stored (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_apply_and_delete_from_the_command_line() {
    let w = World::new("sched_cli").await;
    let cfg = w.write_config("p.toml", CONFIG);
    let cfg_s = cfg.to_string_lossy().into_owned();
    let p = w.start("a", &cfg, &[]);
    p.wait_ready(Duration::from_secs(20)).await;
    let two = "[[schedules]]\nname = \"c1\"\ncron = \"0 0 9 * * *\"\ntask = \"t.one\"\n\
               [[schedules]]\nname = \"c2\"\ncron = \"0 0 10 * * *\"\ntask = \"t.two\"\n";
    let file = w.write_config("s.toml", two);
    let file_s = file.to_string_lossy().into_owned();
    let run = |args: &[&str]| {
        let mut all = vec!["--config", cfg_s.as_str(), "schedules"];
        all.extend_from_slice(args);
        let out = w.cli(&all, b"");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&["apply", &file_s, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("create c1") && out.contains("create c2") && out.contains("nothing changed"),
        "{out}"
    );
    let (s, _, _) = req(Method::GET, &url(&p, "c1"), READ_TOKEN, None, &[]).await;
    assert_eq!(s, 404, "a dry run stores nothing");

    let (code, out, err) = run(&["apply", &file_s]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("2 created"), "{out}");
    warren::testing::eventually(Duration::from_secs(1), "the producer serves c1", || async {
        let (s, _, v) = req(Method::GET, &url(&p, "c1"), READ_TOKEN, None, &[]).await;
        (s == 200 && v["source"] == "api").then_some(())
    })
    .await;

    // One changed, one not; as JSON this time.
    let json_file = w.write_config(
        "s.json",
        &json!([{"name": "c1", "cron": "0 0 9 * * *", "task": "t.one"},
                {"name": "c2", "cron": "0 0 11 * * *", "task": "t.two"}])
        .to_string(),
    );
    let (code, out, err) = run(&["apply", &json_file.to_string_lossy()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("1 unchanged") && out.contains("1 updated"),
        "{out}"
    );

    // Every problem at once, nothing stored.
    let bad = w.write_config(
        "bad.toml",
        "[[schedules]]\nname = \"b1\"\ncron = \"99 * * * * *\"\ntask = \"t\"\n\
         [[schedules]]\nname = \"from-file\"\ncron = \"* * * * * *\"\ntask = \"t\"\n",
    );
    let (code, _, err) = run(&["apply", &bad.to_string_lossy()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("b1") && err.contains("cron") && err.contains("from-file"),
        "{err}"
    );
    let unknown = w.write_config(
        "unknown.toml",
        "[[schedules]]\nname = \"u\"\ncron = \"* * * * * *\"\ntask = \"t\"\nspeed = 3\n",
    );
    let (code, _, err) = run(&["apply", &unknown.to_string_lossy()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("speed"), "{err}");
    let (s, _, _) = req(Method::GET, &url(&p, "b1"), READ_TOKEN, None, &[]).await;
    assert_eq!(s, 404);

    let (code, out, err) = run(&["delete", "c1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    warren::testing::eventually(
        Duration::from_secs(1),
        "c1 gone from the producer",
        || async {
            let (s, _, _) = req(Method::GET, &url(&p, "c1"), READ_TOKEN, None, &[]).await;
            (s == 404).then_some(())
        },
    )
    .await;
    let (code, _, err) = run(&["delete", "from-file"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = run(&["delete", "c1"]);
    assert_eq!(code, Some(1), "{err}");
}
