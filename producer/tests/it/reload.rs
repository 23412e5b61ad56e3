use std::time::Duration;

use chrono::TimeDelta;

use crate::helpers::{duplicates, Msg, World};

const BEFORE: &str = r#"
[[schedules]]
name = "keep"
cron = "* * * * * *"
task = "it.keep"

[[schedules]]
name = "old"
cron = "* * * * * *"
task = "it.old"
"#;

const AFTER: &str = r#"
[[schedules]]
name = "keep"
cron = "* * * * * *"
task = "it.keep"

[[schedules]]
name = "new"
cron = "@every 1s"
task = "it.new"
"#;

/// SIGHUP swaps the schedules without a restart: `new` starts, `old` stops,
/// `keep` fires on without a missed tick. A broken file is rejected whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_adds_and_removes_schedules() {
    let w = World::new("reload").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", BEFORE);
    let p = w.start("producer", &cfg, &[]);
    rx.wait_for(Duration::from_secs(20), "ticks of `old`", |m| {
        m.iter()
            .filter(|m| m.schedule.as_deref() == Some("old"))
            .count()
            >= 2
    })
    .await;

    // A broken file is refused and changes nothing.
    std::fs::write(
        &cfg,
        "[[schedules]]\nname = \"x\"\ncron = \"nope\"\ntask = \"t\"\n",
    )
    .unwrap();
    p.signal("HUP");
    warren::testing::eventually(
        Duration::from_secs(10),
        "the reload to be refused",
        || async {
            let v = p
                .metric("warren_producer_config_last_reload_successful")
                .await?;
            (v == 0.0).then_some(())
        },
    )
    .await;
    assert!(p.logs().contains("schedule `x`: cron"), "{}", p.logs());

    std::fs::write(&cfg, AFTER).unwrap();
    p.signal("HUP");
    let all = rx
        .wait_for(Duration::from_secs(20), "ticks of `new`", |m| {
            m.iter()
                .filter(|m| m.schedule.as_deref() == Some("new"))
                .count()
                >= 3
        })
        .await;
    let first_new = all
        .iter()
        .filter(|m| m.schedule.as_deref() == Some("new"))
        .filter_map(Msg::instant)
        .min()
        .unwrap();
    // Two more seconds: `old` must stay silent.
    let all = rx
        .wait_for(Duration::from_secs(10), "later ticks", |m| {
            m.iter().any(|m| {
                m.schedule.as_deref() == Some("keep")
                    && m.instant()
                        .is_some_and(|t| t > first_new + TimeDelta::seconds(2))
            })
        })
        .await;
    let old_after: Vec<_> = all
        .iter()
        .filter(|m| m.schedule.as_deref() == Some("old"))
        .filter(|m| m.instant().is_some_and(|t| t >= first_new))
        .map(|m| m.id.clone())
        .collect();
    assert!(
        old_after.is_empty(),
        "removed schedule still fired: {old_after:?}"
    );
    // `keep` fired every second across both reloads.
    let mut keep: Vec<_> = all
        .iter()
        .filter(|m| m.schedule.as_deref() == Some("keep"))
        .filter_map(Msg::instant)
        .collect();
    keep.sort();
    for pair in keep.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            TimeDelta::seconds(1),
            "missed tick of `keep`: {keep:?}"
        );
    }
    assert!(duplicates(&all).is_empty());
    assert!(p.logs().contains("schedules reloaded"));
}
