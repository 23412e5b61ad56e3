use std::time::Duration;

use chrono::{TimeDelta, Utc};

use crate::helpers::{duplicates, World};

const PER_SECOND: &str = r#"
[[schedules]]
name = "every-second"
cron = "* * * * * *"
task = "it.tick"
payload = { n = 1 }
"#;

/// A per-second schedule publishes exactly one message per second, each with
/// the deterministic id `<schedule>@<instant>`, promptly after its instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_second_schedule_publishes_n_messages_with_deterministic_ids() {
    const N: i64 = 5;
    let w = World::new("per_second").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", PER_SECOND);
    let p = w.start("producer", &cfg, &[]);

    let first = rx
        .wait_for(Duration::from_secs(20), "a first tick", |m| !m.is_empty())
        .await;
    let t0 = first[0].instant().expect("tick id carries its instant");
    let end = t0 + TimeDelta::seconds(N);
    // Wait for the tick after the window, so the window is complete.
    let all = rx
        .wait_for(Duration::from_secs(20), "N more ticks", |m| {
            m.iter().any(|m| m.instant().is_some_and(|t| t >= end))
        })
        .await;
    let window: Vec<_> = all
        .iter()
        .filter(|m| m.instant().is_some_and(|t| t >= t0 && t < end))
        .collect();
    let expected: Vec<String> = (0..N)
        .map(|i| {
            format!(
                "every-second@{}",
                (t0 + TimeDelta::seconds(i)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        })
        .collect();
    let got: Vec<String> = window.iter().map(|m| m.id.clone()).collect();
    assert_eq!(got, expected, "{}", p.logs());
    assert!(
        duplicates(&all).is_empty(),
        "duplicates: {:?}",
        duplicates(&all)
    );
    let mut max_lag = TimeDelta::zero();
    for m in &window {
        assert_eq!(m.schedule.as_deref(), Some("every-second"));
        assert_eq!(m.name.as_deref(), Some("it.tick"));
        assert_eq!(m.body, br#"{"n":1}"#);
        assert!(
            m.sent_by(p.pid),
            "app_id names the firing replica: {:?}",
            m.app_id
        );
        let instant = m.instant().unwrap();
        let published = chrono::DateTime::from_timestamp_millis(m.published_ms.unwrap()).unwrap();
        assert!(published >= instant, "never early: {published} < {instant}");
        // Staged ahead of its instant, a tick is committed at it: nothing
        // reaches the queue before (this test's clock is the producer's).
        assert!(
            m.received >= instant,
            "received before its instant: {} < {instant}",
            m.received
        );
        max_lag = max_lag.max(published - instant);
    }
    // A bound on a stuck scheduler, not on speed (measured lag is printed
    // below; a loaded machine stretches it).
    assert!(
        max_lag < TimeDelta::seconds(10),
        "a tick was published {max_lag} after its instant"
    );
    eprintln!(
        "per-second schedule: {N} ticks, max publish lag {} ms",
        max_lag.num_milliseconds()
    );
    // The lag histogram counted the fires.
    let fires = p
        .metric(r#"warren_producer_schedule_fires_total{schedule="every-second"}"#)
        .await
        .unwrap_or(0.0);
    assert!(fires >= N as f64, "fires_total {fires}");
    let _ = Utc::now();
}

/// A tick no queue binds is returned by the broker at the commit of its
/// wake-up and counted as missed; the ticks committed with it arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_tick_counts_as_missed_and_the_rest_of_its_commit_fires() {
    let w = World::new("unroutable_tick").await;
    // Only `it.*` is bound: `report.daily` is unroutable.
    warren::testing::delete_topology(&w.conn, &w.topo).await;
    let cfg = w.write_config(
        "p.toml",
        r#"
[[topology.queues]]
name = "default"
bindings = ["it.*"]

[[schedules]]
name = "routed"
cron = "* * * * * *"
task = "it.tick"

[[schedules]]
name = "lost"
cron = "* * * * * *"
task = "report.daily"
"#,
    );
    let p = w.start("producer", &cfg, &[]);
    let missed = |n: f64| {
        let p = &p;
        move || async move {
            let v = p
                .metric(r#"warren_producer_schedule_missed_fires_total{schedule="lost"}"#)
                .await?;
            (v >= n).then_some(())
        }
    };
    // A missed fire: the leader declared the topology (the work queue
    // exists) and fired.
    warren::testing::eventually(
        Duration::from_secs(20),
        "a missed fire of `lost`",
        missed(1.0),
    )
    .await;
    let rx = w.collect().await;
    let all = rx
        .wait_for(Duration::from_secs(20), "three routed ticks", |m| {
            m.len() >= 3
        })
        .await;
    assert!(all.iter().all(|m| m.schedule.as_deref() == Some("routed")));
    warren::testing::eventually(
        Duration::from_secs(10),
        "missed fires of `lost`",
        missed(3.0),
    )
    .await;
    let logs = p.logs();
    assert!(
        logs.contains("tick not published: counted as missed"),
        "{logs}"
    );
    assert!(!logs.contains("were not committed"), "{logs}");
    assert_eq!(
        p.metric(r#"warren_producer_schedule_missed_fires_total{schedule="routed"}"#)
            .await,
        Some(0.0)
    );
}
