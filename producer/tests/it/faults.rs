//! Panics in the scheduler, injected through its fail points (feature
//! `failpoints`, configured by `FAILPOINTS`): one schedule's panic must not stop the others,
//! and a leader whose fire loop dies must let a standby take over.

use std::time::Duration;

use crate::helpers::{duplicates, Producer, World};

const TWO: &str = r#"
[[schedules]]
name = "healthy"
cron = "* * * * * *"
task = "it.tick"

[[schedules]]
name = "broken"
cron = "* * * * * *"
task = "it.tick"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_schedule_is_counted_and_the_others_keep_firing() {
    let w = World::new("panic_schedule").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", TWO);
    let p = w.start(
        "producer",
        &cfg,
        &[("FAILPOINTS", "scheduler/schedule_math=return(broken)")],
    );
    rx.wait_for(Duration::from_secs(20), "five healthy ticks", |m| {
        m.iter()
            .filter(|m| m.schedule.as_deref() == Some("healthy"))
            .count()
            >= 5
    })
    .await;
    assert!(rx.of_schedule("broken").is_empty());
    warren::testing::eventually(
        Duration::from_secs(10),
        "missed fires of `broken`",
        || async {
            let v = p
                .metric(r#"warren_producer_schedule_missed_fires_total{schedule="broken"}"#)
                .await?;
            (v >= 2.0).then_some(())
        },
    )
    .await;
    assert!(
        p.logs().contains("schedule computation panicked"),
        "{}",
        p.logs()
    );
    assert_eq!(
        p.metric("warren_producer_leader").await,
        Some(1.0),
        "still the leader"
    );
}

const ONE: &str = r#"
[[schedules]]
name = "healthy"
cron = "* * * * * *"
task = "it.tick"
"#;

/// A replica with `failpoint` set, a standby started once it leads, and how
/// the first one exited. The standby joins only then: the bad replica fails
/// at its first wake-up, so it may be gone already (the standby leads then).
async fn bad_leader_then_standby(
    w: &World,
    cfg: &std::path::PathBuf,
    failpoint: &str,
) -> (Producer, Producer, std::process::ExitStatus) {
    let mut bad = w.start("bad", cfg, &[("FAILPOINTS", failpoint)]);
    warren::testing::eventually(Duration::from_secs(20), "the bad replica to lead", || {
        let led = bad.logs().contains("elected leader");
        async move { led.then_some(()) }
    })
    .await;
    let good = w.start("good", cfg, &[]);
    let status = bad.process.wait_exit(Duration::from_secs(20)).await;
    (bad, good, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_fire_loop_releases_the_lock_and_exits_1_for_a_standby() {
    let w = World::new("panic_term").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", ONE);
    let (bad, good, status) = bad_leader_then_standby(&w, &cfg, "scheduler/term=panic").await;
    assert_eq!(status.code(), Some(1), "{}", bad.logs());
    assert!(
        bad.logs().contains("releasing the leader lock"),
        "{}",
        bad.logs()
    );
    good.wait_leader(Duration::from_secs(20), true).await;
    let all = rx
        .wait_for(Duration::from_secs(20), "ticks from the new leader", |m| {
            m.iter().filter(|m| m.sent_by(good.pid)).count() >= 3
        })
        .await;
    assert!(duplicates(&all).is_empty());
}

/// A topology that conflicts with the broker's (the work queue exists
/// without priorities, the config asks for them) is no transient error:
/// the producer stops with exit 1 naming the queue and the argument, as the
/// consumer does, instead of retrying every 2 s forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_conflict_stops_the_producer_naming_it() {
    let w = World::new("conflict").await;
    let cfg = w.write_config(
        "c.toml",
        "[[topology.queues]]\nname = \"default\"\nbindings = [\"#\"]\nmax_priority = 10\n",
    );
    let mut p = w.start("a", &cfg, &[]);
    let status = p.process.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", p.logs());
    let logs = p.logs();
    assert!(
        logs.contains(&w.work_queue()) && logs.contains("x-max-priority"),
        "{logs}"
    );
    assert!(!logs.contains("; retrying"), "{logs}");
}

/// A leader that dies (abort: no clean-up, as `kill -9`) after writing a
/// wake-up's ticks and their log record to the socket, before committing
/// them: the broker drops the uncommitted ticks, so none of them reaches a
/// queue, and the standby fires those instants itself, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_before_its_commit_leaves_no_tick_behind() {
    let w = World::new("kill_before_commit").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", TWO);
    let (bad, good, status) = bad_leader_then_standby(&w, &cfg, "scheduler/commit=return").await;
    assert!(status.code().is_none(), "died by a signal: {status}");
    good.wait_leader(Duration::from_secs(20), true).await;
    let all = rx
        .wait_for(Duration::from_secs(20), "ticks from the new leader", |m| {
            m.iter().filter(|m| m.sent_by(good.pid)).count() >= 6
        })
        .await;
    let from_bad: Vec<&String> = all
        .iter()
        .filter(|m| m.sent_by(bad.pid))
        .map(|m| &m.id)
        .collect();
    assert!(
        from_bad.is_empty(),
        "uncommitted ticks arrived: {from_bad:?}"
    );
    assert!(duplicates(&all).is_empty(), "{:?}", duplicates(&all));
    // Both schedules were in the dead leader's one transaction; the standby
    // fires both.
    for s in ["healthy", "broken"] {
        assert!(!rx.of_schedule(s).is_empty(), "no tick of {s}");
    }
}

/// A commit the broker refuses in part (a classic queue at its length
/// limit under `reject-publish`: `partial tx completion`) leaves unknown
/// which ticks it took: the leader sends them again with confirms and
/// retries a nacked one within its grace, so the refused instant still
/// arrives once the queue has room, and nothing arrives twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_is_sent_again_with_confirms_and_loses_nothing() {
    let node = std::sync::Arc::new(
        tokio::task::spawn_blocking(warren::testing::Node::start)
            .await
            .expect("start a broker node"),
    );
    let w = World::on("refused_commit", node.url()).await;
    let ctl = |args: Vec<String>| {
        let node = node.clone();
        async move {
            let o = tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                node.ctl(&refs)
            })
            .await
            .expect("rabbitmqctl");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    };
    let pattern = format!("^{}$", regex_escape(&w.work_queue()));
    ctl(vec![
        "set_policy".into(),
        "full".into(),
        pattern,
        r#"{"max-length":1,"overflow":"reject-publish"}"#.into(),
        "--apply-to".into(),
        "queues".into(),
    ])
    .await;
    let cfg = w.write_config("p.toml", ONE);
    let p = w.start("producer", &cfg, &[]);
    warren::testing::eventually(Duration::from_secs(30), "a refused commit", || {
        let refused = p.logs().contains("were not committed");
        async move { refused.then_some(()) }
    })
    .await;
    ctl(vec!["clear_policy".into(), "full".into()]).await;
    let rx = w.collect().await;
    let all = rx
        .wait_for(Duration::from_secs(30), "four ticks", |m| m.len() >= 4)
        .await;
    let instants: Vec<_> = all.iter().filter_map(|m| m.instant()).collect();
    assert_eq!(
        instants[1] - instants[0],
        chrono::TimeDelta::seconds(1),
        "the refused instant arrives right after the one the queue held: {instants:?}\n{}",
        p.logs()
    );
    assert!(duplicates(&all).is_empty(), "{:?}", duplicates(&all));
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '.' | '-' | '+' | '*' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '^' | '$' | '|'
            | '\\' => vec!['\\', c],
            _ => vec![c],
        })
        .collect()
}
