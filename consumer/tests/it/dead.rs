//! The `warren-consumer dead` CLI against real dead letters.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lapin::BasicProperties;
use serde_json::json;
use warren::Task;
use warren_consumer::{ConsumerConfig, Registry, TaskError};

use crate::helpers::*;

fn cli(cfg: &ConsumerConfig, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warren-consumer"))
        .arg("dead")
        .args(args)
        .env("WARREN_AMQP_URL", cfg.amqp.url_list())
        .env("WARREN_TOPOLOGY__PREFIX", &cfg.topology.prefix)
        .env_remove("WARREN_CONFIG")
        .output()
        .expect("run warren-consumer dead");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn list(cfg: &ConsumerConfig) -> Vec<serde_json::Value> {
    let (ok, out, err) = cli(cfg, &["list", "--json"]);
    assert!(ok, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_replay_and_purge() {
    let fixed = Arc::new(AtomicBool::new(false));
    let runs = Runs::default();
    let mut reg = Registry::new();
    for name in ["t.a", "t.b"] {
        let (f, r) = (fixed.clone(), runs.clone());
        reg.register_fn(name, move |t| {
            let (f, r) = (f.clone(), r.clone());
            async move {
                r.record(&t);
                if f.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(TaskError::permanent("not yet"))
                }
            }
        })
        .unwrap();
    }
    let cfg = config("deadcli");
    let app = spawn_worker(cfg.clone(), reg).await;
    let a: Vec<Task> = (0..3).map(|_| Task::new("t.a", &json!({}))).collect();
    let b: Vec<Task> = (0..2).map(|_| Task::new("t.b", &json!({}))).collect();
    for t in a.iter().chain(&b) {
        app.publish(t).await;
    }
    // One that came through the alternate exchange: no dead headers at all.
    app.publisher
        .publish(
            &app.topo.dead_exchange(),
            &warren::delay::routing_key(std::time::Duration::from_secs(1), "t.lost"),
            BasicProperties::default().with_message_id("lost-1".into()),
            b"{}",
        )
        .await
        .unwrap();
    warren::testing::eventually(WAIT, "6 dead", || async {
        (queue_len(&app.conn, &app.topo.dead_queue()).await == 6).then_some(())
    })
    .await;

    // list shows them all and keeps them.
    let l = list(&cfg);
    assert_eq!(l.len(), 6);
    let first = l.iter().find(|v| v["id"] == a[0].id.as_str()).unwrap();
    assert_eq!(first["task"], "t.a");
    assert_eq!(first["reason"], "permanent error: not yet");
    assert_eq!(first["attempts"], 1);
    assert!(first["failed_at"].as_str().is_some());
    let lost = l.iter().find(|v| v["id"] == "lost-1").unwrap();
    assert_eq!(lost["reason"], "unroutable after delay");
    assert_eq!(lost["task"], "t.lost");
    settles_at(&app.conn, &app.topo.dead_queue(), 6).await;
    let (ok, table, _) = cli(&cfg, &["list"]);
    assert!(ok && table.contains(&a[1].id) && table.contains("permanent error: not yet"));
    let (ok, grouped, _) = cli(&cfg, &["list", "--group"]);
    assert!(ok);
    assert!(
        grouped
            .lines()
            .any(|l| l.trim_start().starts_with('3') && l.contains("t.a")),
        "{grouped}"
    );

    fixed.store(true, Ordering::SeqCst);
    // replay by id
    let (ok, out, err) = cli(&cfg, &["replay", "--id", &a[0].id]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("replayed {}", a[0].id));
    runs.wait_total(6).await;
    let again = runs.of(&a[0].id);
    assert_eq!(again.len(), 2);
    assert_eq!(again[1].0, 1, "attempts reset on replay");
    settles_at(&app.conn, &app.topo.dead_queue(), 5).await;

    // replay by task name
    let (ok, _, err) = cli(&cfg, &["replay", "--task", "t.a"]);
    assert!(ok, "{err}");
    runs.wait_total(8).await;
    settles_at(&app.conn, &app.topo.dead_queue(), 3).await;
    let left: Vec<String> = list(&cfg)
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        left.contains(&b[0].id) && left.contains(&b[1].id) && left.contains(&"lost-1".to_string())
    );

    // purge by id, then everything
    let (ok, out, _) = cli(&cfg, &["purge", "--id", &b[0].id]);
    assert!(ok && out.trim() == "purged 1", "{out}");
    settles_at(&app.conn, &app.topo.dead_queue(), 2).await;
    let (ok, out, _) = cli(&cfg, &["purge", "--all"]);
    assert!(ok && out.trim() == "purged 2", "{out}");
    settles_at(&app.conn, &app.topo.dead_queue(), 0).await;
    assert_eq!(runs.of(&b[1].id).len(), 1, "purged tasks never ran again");

    // A selector is required.
    let (ok, _, err) = cli(&cfg, &["replay"]);
    assert!(!ok && err.contains("--id"), "{err}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_task_nobody_binds_is_listed_as_unroutable_after_delay() {
    let mut cfg = config("unroutable");
    cfg.topology.queues[0].bindings = vec!["email.*".into()];
    let app = spawn_worker(cfg.clone(), Registry::new()).await;
    let t = Task::new("sms.send", &json!({}));
    app.publisher
        .publish_task(&app.topo, &t, std::time::Duration::from_millis(200))
        .await
        .expect("a delayed publish is routable into the delay levels");
    warren::testing::eventually(WAIT, "dead via the alternate exchange", || async {
        (queue_len(&app.conn, &app.topo.dead_queue()).await == 1).then_some(())
    })
    .await;
    let l = list(&cfg);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["id"], t.id.as_str());
    assert_eq!(l[0]["task"], "sms.send");
    assert_eq!(l[0]["reason"], "unroutable after delay");
    app.stop().await;
}

/// `dead list | head` with nothing read: the listing's header meets a closed
/// stdout, and the command still ends cleanly.
#[test]
fn dead_list_survives_a_closed_stdout() {
    let cfg = config("deadpipe");
    let out = Command::new(env!("CARGO_BIN_EXE_warren-consumer"))
        .args(["dead", "list"])
        .env("WARREN_AMQP_URL", cfg.amqp.url_list())
        .env("WARREN_TOPOLOGY__PREFIX", &cfg.topology.prefix)
        .env_remove("WARREN_CONFIG")
        .stdout(crate::cli::closed_stdout())
        .output()
        .expect("run warren-consumer dead list");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
