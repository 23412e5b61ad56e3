use std::time::Duration;

use chrono::Utc;

use crate::helpers::{Msg, World, PUBLISH_TOKEN};

const CFG: &str = r#"
[[schedules]]
name = "tick"
cron = "* * * * * *"
task = "it.tick"
misfire = "skip"
"#;

/// A memory alarm blocks publishers: the API answers 503 `broker_blocked`
/// and recovers when it clears. The broker goes away and comes back: the
/// producer reports not-ready and answers 503 meanwhile, then reconnects on
/// its own, re-declares, becomes leader again and fires on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_broker_loss() {
    let node = tokio::task::spawn_blocking(warren::testing::Node::start)
        .await
        .expect("start a broker node");
    let mut w = World::on("broker_loss", node.url()).await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", CFG);
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(Duration::from_secs(20)).await;
    rx.wait_for(Duration::from_secs(10), "ticks", |m| m.len() >= 2)
        .await;

    // A memory alarm blocks publishers: the API answers 503 instead of hanging.
    let node = tokio::task::spawn_blocking(move || {
        let o = node.ctl(&["set_vm_memory_high_watermark", "0"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        node
    })
    .await
    .expect("alarm");
    let post = || async {
        let resp = reqwest::Client::new()
            .post(p.url("/v1/tasks"))
            .bearer_auth(PUBLISH_TOKEN)
            .body(r#"{"task":"it.x"}"#)
            .send()
            .await
            .expect("POST");
        let status = resp.status().as_u16();
        let body: serde_json::Value =
            serde_json::from_str(&resp.text().await.expect("body")).expect("JSON body");
        (status, body)
    };
    warren::testing::eventually(Duration::from_secs(20), "503 broker_blocked", || async {
        let (status, body) = post().await;
        (status == 503 && body["error"] == "broker_blocked").then_some(())
    })
    .await;
    assert_eq!(p.metric("warren_amqp_blocked").await, Some(1.0));
    let node = tokio::task::spawn_blocking(move || {
        let o = node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        node
    })
    .await
    .expect("clear alarm");
    warren::testing::eventually(Duration::from_secs(20), "202 once unblocked", || async {
        let (status, _) = post().await;
        (status == 202).then_some(())
    })
    .await;
    assert_eq!(p.metric("warren_amqp_blocked").await, Some(0.0));

    let node = tokio::task::spawn_blocking(move || {
        node.stop_app();
        node
    })
    .await
    .expect("stop_app");
    warren::testing::eventually(Duration::from_secs(15), "/readyz 503", || async {
        let r = reqwest::get(p.url("/readyz")).await.ok()?;
        (r.status().as_u16() == 503).then_some(())
    })
    .await;
    let (status, body) = post().await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "broker_unavailable");
    p.wait_leader(Duration::from_secs(10), false).await;

    let node = tokio::task::spawn_blocking(move || {
        node.start_app();
        node
    })
    .await
    .expect("start_app");
    let back = Utc::now();
    p.wait_ready(Duration::from_secs(30)).await;
    p.wait_leader(Duration::from_secs(30), true).await;
    // A fresh reader (the old one died with the broker).
    w.reconnect().await;
    let rx2 = w.collect().await;
    rx2.wait_for(
        Duration::from_secs(20),
        "ticks after the broker came back",
        |m| m.iter().filter_map(Msg::instant).any(|t| t > back),
    )
    .await;
    let reconnects = p
        .metric("warren_amqp_reconnects_total")
        .await
        .unwrap_or(0.0);
    assert!(reconnects >= 1.0, "reconnects_total {reconnects}");
    assert_eq!(p.metric("warren_amqp_connected").await, Some(1.0));
    drop(node);
}
