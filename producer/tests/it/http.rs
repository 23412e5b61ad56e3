use std::time::Duration;

use serde_json::Value;

use crate::helpers::{World, PUBLISH_TOKEN, READ_TOKEN};

const CFG: &str = r#"
[[schedules]]
name = "hourly-report"
cron = "0 * * * *"
timezone = "Europe/Berlin"
task = "it.report"
payload = { kind = "hourly" }
"#;

async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client
        .request(method, url)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.expect("HTTP request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body, got {text:?}"));
    (status, json)
}

/// The binary serves the API end to end: a refused and an accepted publish,
/// the schedules listing and a manual trigger, and `/metrics` (counting
/// them) passes `promtool check metrics`. Every refusal and success of `/v1`
/// is checked in process in `api.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_through_the_binary() {
    use reqwest::Method;
    let w = World::new("http").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", CFG);
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(Duration::from_secs(20)).await;
    // The next-fire gauges checked below exist once the fire loop leads.
    p.wait_leader(Duration::from_secs(20), true).await;
    let tasks = p.url("/v1/tasks");
    let one = br#"{"task":"it.api","payload":{"x":1},"id":"api-1"}"#.to_vec();

    let (s, b) = call(Method::POST, &tasks, None, Some(one.clone())).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("unauthorized")), "{b}");
    let (s, b) = call(Method::POST, &tasks, Some(READ_TOKEN), Some(one.clone())).await;
    assert_eq!((s, b["error"].as_str()), (403, Some("forbidden")), "{b}");
    assert!(rx.all().is_empty(), "nothing published by refused requests");

    let (s, b) = call(Method::POST, &tasks, Some(PUBLISH_TOKEN), Some(one)).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["ids"], serde_json::json!(["api-1"]));
    let got = rx
        .wait_for(Duration::from_secs(10), "the published task", |m| {
            m.iter().any(|m| m.id == "api-1")
        })
        .await;
    let m = got.iter().find(|m| m.id == "api-1").unwrap();
    assert_eq!(m.body, br#"{"x":1}"#);

    // Schedules: read scope suffices; publish token includes read.
    let (s, b) = call(Method::GET, &p.url("/v1/schedules"), Some(READ_TOKEN), None).await;
    assert_eq!(s, 200, "{b}");
    let sched = &b["schedules"][0];
    assert_eq!(sched["name"], "hourly-report");
    assert_eq!(sched["timezone"], "Europe/Berlin");
    assert!(
        sched["next_fire"].as_str().unwrap().ends_with(":00:00Z"),
        "{b}"
    );
    assert!(b["leader"].is_boolean());
    let (s, _) = call(Method::GET, &p.url("/v1/schedules"), None, None).await;
    assert_eq!(s, 401);

    // Trigger: its own id, published now.
    let trig = p.url("/v1/schedules/hourly-report/trigger");
    let (s, b) = call(Method::POST, &trig, Some(READ_TOKEN), None).await;
    assert_eq!(s, 403, "{b}");
    let (s, b) = call(Method::POST, &trig, Some(PUBLISH_TOKEN), None).await;
    assert_eq!(s, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("hourly-report@manual-"), "{id}");
    let got = rx
        .wait_for(Duration::from_secs(10), "the triggered task", |m| {
            m.iter().any(|m| m.id == id)
        })
        .await;
    let m = got.iter().find(|m| m.id == id).unwrap();
    assert_eq!(m.schedule.as_deref(), Some("hourly-report"));
    assert_eq!(m.body, br#"{"kind":"hourly"}"#);
    let (s, b) = call(
        Method::POST,
        &p.url("/v1/schedules/nope/trigger"),
        Some(PUBLISH_TOKEN),
        None,
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (404, Some("not_found")));

    // Metrics: names, and promtool's lint.
    let text = p.metrics().await.expect("/metrics");
    for name in [
        "warren_producer_fires_total",
        "warren_producer_fire_lag_seconds",
        "warren_producer_missed_fires_total",
        "warren_producer_schedule_fires_total{schedule=",
        "warren_producer_schedules{source=\"config\"}",
        "warren_producer_published_total{source=\"api\"} 2",
        "warren_producer_publish_failures_total",
        "warren_producer_next_fire_timestamp_seconds",
        "warren_producer_leader",
        "warren_amqp_connected 1",
        "warren_amqp_reconnects_total",
        "warren_amqp_blocked",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // `publish` is a process of its own: no series that can only be 0.
    assert!(!text.contains("source=\"cli\""), "{text}");
    warren::testing::assert_promtool_ok(&text);
    let (s, _) = call(Method::GET, &p.url("/healthz"), None, None).await;
    assert_eq!(s, 200);
}
