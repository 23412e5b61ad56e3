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

const OLD_TOKEN: &str = "it-rotated-old-token-0123456789";
const NEW_TOKEN: &str = "it-rotated-new-token-9876543210";

/// SIGHUP rotates API tokens without a restart, from the file and from its
/// tokens file: the new token is accepted, the old one refused. A changed
/// key that needs a restart is named in a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_api_tokens_and_names_restart_only_keys() {
    let w = World::new("reload_tokens").await;
    let tokens_file = w.write_config("tokens", &format!("publish {OLD_TOKEN}\n"));
    let config = |token: &str, max_batch: usize| {
        format!(
            "[api]\nmax_batch = {max_batch}\ntokens_file = \"{}\"\n\
             [[api.tokens]]\ntoken = \"{token}\"\nscopes = [\"read\"]\n",
            tokens_file.display()
        )
    };
    let cfg = w.write_config("p.toml", &config(&format!("{OLD_TOKEN}-r"), 1000));
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(Duration::from_secs(20)).await;
    let status = |method: reqwest::Method, path: &str, token: String| {
        let url = p.url(path);
        async move {
            reqwest::Client::new()
                .request(method, url)
                .bearer_auth(token)
                .body(r#"{"task":"it.rotated"}"#)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    let post = |t: &str| status(reqwest::Method::POST, "/v1/tasks", t.to_owned());
    let get = |t: String| status(reqwest::Method::GET, "/v1/schedules", t);
    assert_eq!(post(OLD_TOKEN).await, 202);
    assert_eq!(get(format!("{OLD_TOKEN}-r")).await, 200);
    assert_eq!(post(NEW_TOKEN).await, 401);

    std::fs::write(&tokens_file, format!("publish {NEW_TOKEN}\n")).unwrap();
    std::fs::write(&cfg, config(&format!("{NEW_TOKEN}-r"), 10)).unwrap();
    p.signal("HUP");
    warren::testing::eventually(Duration::from_secs(10), "the new token", || async {
        (post(NEW_TOKEN).await == 202).then_some(())
    })
    .await;
    assert_eq!(post(OLD_TOKEN).await, 401);
    assert_eq!(get(format!("{NEW_TOKEN}-r")).await, 200);
    assert_eq!(get(format!("{OLD_TOKEN}-r")).await, 401);
    let logs = p.logs();
    assert!(
        logs.contains("api.max_batch changed; restart to apply"),
        "{logs}"
    );
    assert!(
        !logs.contains(OLD_TOKEN) && !logs.contains(NEW_TOKEN),
        "a token in the log: {logs}"
    );
    assert!(logs.contains("API tokens reloaded"), "{logs}");
}
