//! A broker under a resource alarm blocks publishers: the API must say so at
//! once (503 `broker_blocked`), not after the confirm timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::helpers::{World, PUBLISH_TOKEN};

/// The broker only reports a connection blocked once a publish reaches it
/// during the alarm, so the first request used to wait out the whole confirm
/// timeout and answer 503 `broker_unavailable`. It must answer 503
/// `broker_blocked` (which only the block, not the confirm timeout, produces;
/// how long it took is printed), then publish once the alarm clears, losing
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_under_an_alarm_is_refused_at_once() {
    let node = Arc::new(
        tokio::task::spawn_blocking(warren::testing::Node::start)
            .await
            .expect("start a broker node"),
    );
    let w = World::on("alarm", node.url()).await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", "");
    let p = w.start("producer", &cfg, &[("WARREN_AMQP__CONFIRM_TIMEOUT", "30s")]);
    p.wait_ready(Duration::from_secs(30)).await;
    let post = |id: &'static str| {
        let url = p.url("/v1/tasks");
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(PUBLISH_TOKEN)
                .body(format!(r#"{{"task":"it.alarm","id":"{id}"}}"#))
                .send()
                .await
                .expect("POST");
            let status = resp.status().as_u16();
            let body: serde_json::Value =
                serde_json::from_str(&resp.text().await.expect("body")).expect("JSON body");
            (status, body)
        }
    };
    assert_eq!(post("before").await.0, 202);

    let ctl = |args: &'static [&'static str]| {
        let node = node.clone();
        async move {
            tokio::task::spawn_blocking(move || node.ctl(args))
                .await
                .expect("rabbitmqctl")
        }
    };
    let o = ctl(&["set_vm_memory_high_watermark", "0.0000001"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    warren::testing::eventually(Duration::from_secs(30), "the memory alarm", || async {
        let o = ctl(&["eval", "rabbit_alarm:get_alarms()."]).await;
        String::from_utf8_lossy(&o.stdout)
            .contains("memory")
            .then_some(())
    })
    .await;

    let started = Instant::now();
    let (status, body) = post("during").await;
    let took = started.elapsed();
    eprintln!("503 broker_blocked after {took:?}");
    assert_eq!(
        (status, &body["error"]),
        (503, &"broker_blocked".into()),
        "{body}"
    );

    let o = ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The client retries the refused task under its own id, as told to.
    warren::testing::eventually(Duration::from_secs(30), "202 once unblocked", || async {
        (post("during").await.0 == 202).then_some(())
    })
    .await;
    rx.wait_for(Duration::from_secs(20), "both tasks in the queue", |m| {
        ["before", "during"]
            .iter()
            .all(|id| m.iter().any(|m| m.id == *id))
    })
    .await;
}
