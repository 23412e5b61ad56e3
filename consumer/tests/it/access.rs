//! Broker access: client certificates (mutual TLS) and least-privilege
//! broker users, each on a node of its own.

use std::time::Duration;

use warren::amqp::Publisher;
use warren::config::{AmqpConfig, Secret};
use warren::testing::{self, eventually, Node};
use warren::{Task, Topology};

use crate::helpers::{config, spawn_process, WAIT};

const NOOP: &str = "[handlers.\"t.noop\"]\nkind = \"noop\"\n";

/// The `[amqp]` TLS keys of a consumer config file.
fn tls_toml(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> String {
    let mut t = format!("[amqp]\ntls_ca_file = {:?}\n", ca.display().to_string());
    if let Some((cert, key)) = identity {
        t += &format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        );
    }
    t
}

#[tokio::test]
async fn with_a_client_certificate_a_consumer_runs_tasks_and_without_one_exits_1() {
    let node = Node::start_mtls();
    let (cert, key) = node.client_cert("client");
    let mut cfg = config("mtls");
    cfg.amqp = AmqpConfig {
        url: Some(Secret::new(node.tls_url())),
        tls_ca_file: Some(node.ca_file()),
        tls_cert_file: Some(cert.clone()),
        tls_key_file: Some(key.clone()),
        ..testing::amqp_config()
    };
    let toml = tls_toml(&node.ca_file(), Some((&cert, &key))) + NOOP;
    let worker = spawn_process(&cfg, &toml);
    worker.wait_log("consuming", 1).await;

    let conn = warren::amqp::connect(&cfg.amqp, "test-client")
        .await
        .expect("the test client connects with the certificate too");
    let topo = Topology::new(&cfg.topology);
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    let task = Task::new("t.noop", &serde_json::json!({"over": "mtls"}));
    publisher
        .publish_task(&topo, &task, Duration::ZERO)
        .await
        .unwrap();
    eventually(WAIT, "the consumer ran the task", || async {
        worker.handled_ids().contains(&task.id).then_some(())
    })
    .await;
    conn.close(200, "bye".into()).await.ok();

    // The same consumer without its certificate: refused for good.
    let toml = tls_toml(&node.ca_file(), None) + NOOP;
    let mut bare = spawn_process(&cfg, &toml);
    let status = bare.wait_exit(WAIT).await;
    let out = bare.lines().join("\n");
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("the broker requires a client certificate: set amqp.tls_cert_file"),
        "{out}"
    );
}

/// The `rabbitmqctl set_permissions` lines of docs/operations.md, as
/// (user, [configure, write, read]): the test grants exactly what the
/// documentation tells operators to grant.
fn documented_permissions() -> Vec<(String, [String; 3])> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    let out: Vec<_> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("rabbitmqctl set_permissions -p / "))
        .map(|rest| {
            let (user, quoted) = rest.split_once(' ').unwrap();
            let args: Vec<String> = quoted
                .split('\'')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect();
            (
                user.to_owned(),
                [args[0].clone(), args[1].clone(), args[2].clone()],
            )
        })
        .collect();
    assert_eq!(out.len(), 4, "four users documented: {out:?}");
    out
}

fn ok(o: std::process::Output) {
    assert!(
        o.status.success(),
        "rabbitmqctl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A node with the documented users; `url(user)` logs in as one of them.
fn node_with_users() -> (Node, Vec<(String, [String; 3])>) {
    let node = Node::start();
    let perms = documented_permissions();
    for (user, [c, w, r]) in &perms {
        ok(node.ctl(&["add_user", user, &format!("pw-{user}")]));
        ok(node.ctl(&["set_permissions", "-p", "/", user, c, w, r]));
    }
    (node, perms)
}

fn url_as(node: &Node, user: &str) -> String {
    node.url()
        .replacen("guest:guest", &format!("{user}:pw-{user}"), 1)
}

/// The consumer's config file: no declaring, one retry 300 ms later.
const LEAST_PRIVILEGE_TOML: &str = r#"
[topology]
declare = false
[retry.default]
max_attempts = 2
initial_delay = "300ms"
jitter = 0.0
[handlers."t.noop"]
kind = "noop"
[handlers."t.fail"]
kind = "exec"
argv = ["/bin/false"]
"#;

#[tokio::test]
async fn least_privilege_users_run_the_pipeline_and_a_missing_permission_is_named() {
    let (node, perms) = node_with_users();
    let mut cfg = config("perm");
    cfg.topology.prefix = "warren".into();
    cfg.amqp = crate::helpers::amqp_for(&url_as(&node, "warren-consumer"));

    // Nothing declared yet: the consumer names what is missing and exits 1.
    let mut early = spawn_process(&cfg, LEAST_PRIVILEGE_TOML);
    let status = early.wait_exit(WAIT).await;
    let out = early.lines().join("\n");
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("does not exist; declare it with a role that has configure permission, or set topology.declare = true"),
        "{out}"
    );

    // The deployer declares.
    let declared = std::process::Command::new(env!("CARGO_BIN_EXE_warren-consumer"))
        .arg("declare")
        .env("WARREN_AMQP_URL", url_as(&node, "warren-deployer"))
        .env("WARREN_TOPOLOGY__PREFIX", "warren")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let declared = output_within(declared, WAIT, "warren-consumer declare");
    assert!(
        declared.status.success(),
        "{}",
        String::from_utf8_lossy(&declared.stderr)
    );

    dead_tools_say_what_they_tried_once(&node);

    // The consumer runs a task, retries one through a delay level and
    // dead-letters it; the producer's user publishes both.
    let mut worker = spawn_process(&cfg, LEAST_PRIVILEGE_TOML);
    worker.wait_log("consuming", 1).await;
    let producer = crate::helpers::amqp_for(&url_as(&node, "warren-producer"));
    let pconn = warren::amqp::connect(&producer, "producer").await.unwrap();
    let topo = Topology::new(&warren::config::TopologyConfig {
        declare: false,
        ..cfg.topology.clone()
    });
    warren::topology::declare(&pconn, &topo)
        .await
        .expect("the producer's passive check");
    let publisher = Publisher::new(&pconn, Duration::from_secs(10))
        .await
        .unwrap();
    let good = Task::new("t.noop", &serde_json::json!({}));
    let bad = Task::new("t.fail", &serde_json::json!({}));
    for t in [&good, &bad] {
        publisher
            .publish_task(&topo, t, Duration::ZERO)
            .await
            .unwrap();
    }
    let admin = testing_conn(&node).await;
    let dead = testing::take_one(&admin, &topo.dead_queue(), WAIT).await;
    assert_eq!(
        dead.properties.message_id().as_ref().unwrap().as_str(),
        bad.id
    );
    assert_eq!(
        testing::header(&dead, "x-warren-attempt").as_deref(),
        Some("2")
    );
    eventually(WAIT, "the good task ran", || async {
        worker.handled_ids().contains(&good.id).then_some(())
    })
    .await;
    // A workflow step: the consumer's user may send its event.
    let mut step = Task::new("t.noop", &serde_json::json!({}));
    step.step = Some(warren::envelope::StepRef {
        workflow: "w".into(),
        run: "r".into(),
        step: "s".into(),
    });
    publisher
        .publish_task(&topo, &step, Duration::ZERO)
        .await
        .unwrap();
    let ev = testing::take_one(&admin, &topo.workflows_queue(), WAIT).await;
    let ev: warren::workflow::StepEvent = serde_json::from_slice(&ev.data).unwrap();
    assert_eq!(
        (ev.task_id, ev.outcome),
        (step.id.clone(), warren::workflow::StepOutcome::Succeeded)
    );
    // A drain, not a kill: a kill could lose the (coalesced) ack of the dead
    // task's last attempt, and its redelivery to the next worker would be
    // dead-lettered a second time, at least once as documented.
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    let status = worker.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "{}", worker.lines().join("\n"));

    // One permission less each: the refusal names the permission and object.
    let consumer_perms = &perms
        .iter()
        .find(|(u, _)| u == "warren-consumer")
        .unwrap()
        .1;
    let set = |w: &str, r: &str| {
        ok(node.ctl(&["set_permissions", "-p", "/", "warren-consumer", "^$", w, r]));
    };
    set(&consumer_perms[1], "^$");
    let mut unread = spawn_process(&cfg, LEAST_PRIVILEGE_TOML);
    let status = unread.wait_exit(WAIT).await;
    let out = unread.lines().join("\n");
    assert_eq!(status.code(), Some(1), "{out}");
    assert_eq!(out.matches("ACCESS_REFUSED").count(), 1, "said once: {out}");
    assert!(
        out.contains("cannot consume queue `warren.default` (a consumer's broker user needs read permission")
            && out.contains("ACCESS_REFUSED - access to queue 'warren.default' in vhost '/' refused for user 'warren-consumer'"),
        "{out}"
    );

    set("^warren\\.(tasks|dead)$", &consumer_perms[2]);
    let unwritten = spawn_process(&cfg, LEAST_PRIVILEGE_TOML);
    unwritten.wait_log("consuming", 1).await;
    let again = Task::new("t.fail", &serde_json::json!({}));
    publisher
        .publish_task(&topo, &again, Duration::ZERO)
        .await
        .unwrap();
    eventually(WAIT, "the refused retry publish in the log", || async {
        let lines = unwritten.lines();
        lines
            .iter()
            .any(|l| {
                l.contains("publish failed; delivery left unacked")
                    && l.contains("ACCESS_REFUSED - access to exchange 'warren.delay.")
            })
            .then_some(())
    })
    .await;
    drop(unwritten);
    assert_eq!(
        testing::queue_len(&admin, &topo.dead_queue()).await,
        0,
        "nothing dead-lettered early"
    );
}

/// `warren-consumer dead …` as the consumer's user, which may not read the
/// dead queue, at the default log level: one line each, saying what was
/// tried on which object and the broker's reason, and no line of lapin's
/// own. The CLI's user, which may, purges.
fn dead_tools_say_what_they_tried_once(node: &Node) {
    let dead = |user: &str, args: &[&str]| {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_warren-consumer"))
            .arg("dead")
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("WARREN_LOG_LEVEL")
            .env("WARREN_AMQP_URL", url_as(node, user))
            .env("WARREN_TOPOLOGY__PREFIX", "warren")
            .env("WARREN_TOPOLOGY__DECLARE", "false")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        output_within(
            child,
            WAIT,
            &format!("warren-consumer dead {args:?} as {user}"),
        )
    };
    let refusal = "ACCESS_REFUSED - access to queue 'warren.dead' in vhost '/' refused for user 'warren-consumer'";
    for (args, tried) in [
        (&["purge", "--all"][..], "purge queue `warren.dead`"),
        (&["purge", "--id", "x"][..], "read queue `warren.dead`"),
        (&["replay", "--all"][..], "read queue `warren.dead`"),
        (&["list"][..], "read queue `warren.dead`"),
    ] {
        let out = dead("warren-consumer", args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err.trim_end(),
            format!("warren-consumer: cannot {tried}: {refusal}"),
            "{args:?}"
        );
    }
    let out = dead("warren-cli", &["purge", "--all"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "purged 0\n", "{err}");
}

/// A guest connection to `node`, to look at queues.
async fn testing_conn(node: &Node) -> lapin::Connection {
    warren::amqp::connect(&crate::helpers::amqp_for(node.url()), "test-admin")
        .await
        .unwrap()
}

/// The output of `child`, which must exit within `limit` (a hung command
/// fails the test naming it, instead of running into the harness timeout).
fn output_within(
    mut child: std::process::Child,
    limit: Duration,
    what: &str,
) -> std::process::Output {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not exit within {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
