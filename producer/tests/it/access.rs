//! The producer's and the command line's broker users with exactly the
//! permissions docs/operations.md documents (see the consumer's twin test).

use std::time::Duration;

use warren::config::TopologyConfig;
use warren::testing::{self, eventually, Node};
use warren::topology::producer::Part;
use warren::Topology;

use crate::helpers::World;

const WAIT: Duration = Duration::from_secs(60);

/// (user, [configure, write, read]) of each documented `set_permissions`.
fn documented_permissions() -> Vec<(String, [String; 3])> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("rabbitmqctl set_permissions -p / "))
        .map(|rest| {
            let (user, quoted) = rest.split_once(' ').unwrap();
            let a: Vec<String> = quoted
                .split('\'')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect();
            (user.to_owned(), [a[0].clone(), a[1].clone(), a[2].clone()])
        })
        .collect()
}

fn ctl_ok(node: &Node, args: &[&str]) {
    let o = node.ctl(args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[tokio::test]
async fn producer_and_cli_users_need_only_their_documented_permissions() {
    let node = Node::start();
    let perms = documented_permissions();
    for (user, [c, w, r]) in &perms {
        ctl_ok(&node, &["add_user", user, &format!("pw-{user}")]);
        ctl_ok(&node, &["set_permissions", "-p", "/", user, c, w, r]);
    }
    let as_user = |u: &str| {
        node.url()
            .replacen("guest:guest", &format!("{u}:pw-{u}"), 1)
    };
    let world = World::on("perm", node.url()).await;
    let topo = Topology::new(&TopologyConfig::default());
    warren::topology::declare(&world.conn, &topo).await.unwrap();
    // The deployer's step (`warren-consumer declare`): with `declare =
    // false` the producer only checks its own objects too.
    warren::topology::producer::declare(&world.conn, &topo, &Part::ALL)
        .await
        .unwrap();
    let config = world.write_config(
        "producer.toml",
        "[topology]\ndeclare = false\n\n[[schedules]]\nname = \"tick\"\ncron = \"* * * * * *\"\ntask = \"it.tick\"\n",
    );
    let producer_url = as_user("warren-producer");
    let env = [
        ("WARREN_AMQP_URL", producer_url.as_str()),
        ("WARREN_TOPOLOGY__PREFIX", "warren"),
    ];
    let mut producer = world.start("least", &config, &env);
    producer.wait_leader(WAIT, true).await;
    producer.wait_ready(WAIT).await;
    eventually(WAIT, "ticks in warren.default", || async {
        (testing::queue_len(&world.conn, "warren.default").await > 0).then_some(())
    })
    .await;
    let resp = reqwest::Client::new()
        .post(producer.url("/v1/tasks"))
        .bearer_auth(crate::helpers::PUBLISH_TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"task": "it.later", "payload": {}, "delay": "2s"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        202,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let logs = producer.logs();
    assert!(
        !logs.contains("ACCESS_REFUSED"),
        "a refusal with the documented permissions: {logs}"
    );
    producer.kill9();

    // Without configure on its own queues it cannot take the lock: exit 1
    // with the broker's refusal naming the queue.
    let mine = &perms
        .iter()
        .find(|(u, _)| u == "warren-producer")
        .unwrap()
        .1;
    ctl_ok(
        &node,
        &[
            "set_permissions",
            "-p",
            "/",
            "warren-producer",
            "^$",
            &mine[1],
            &mine[2],
        ],
    );
    let mut refused = world.start("refused", &config, &env);
    let status = refused.process.wait_exit(WAIT).await;
    let logs = refused.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(
        logs.contains("ACCESS_REFUSED - access to queue 'warren.producer.leader' in vhost '/' refused for user 'warren-producer'"),
        "{logs}"
    );

    // The command line's user publishes, delayed too; without write on the
    // delay exchanges a delayed publish names the exchange.
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_warren-producer"));
        cmd.args(args)
            .env("WARREN_AMQP_URL", as_user("warren-cli"))
            .env("WARREN_TOPOLOGY__DECLARE", "false")
            .env("WARREN_TOPOLOGY__PREFIX", "warren")
            .env_remove("WARREN_CONFIG")
            .env_remove("RUST_LOG");
        cmd.output().unwrap()
    };
    for args in [
        &["publish", "it.now"][..],
        &["publish", "it.later", "--delay", "5s"],
    ] {
        let out = cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cli_perms = &perms.iter().find(|(u, _)| u == "warren-cli").unwrap().1;
    ctl_ok(
        &node,
        &[
            "set_permissions",
            "-p",
            "/",
            "warren-cli",
            "^$",
            "^warren\\.tasks$",
            &cli_perms[2],
        ],
    );
    let out = cli(&["publish", "it.later", "--delay", "5s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ACCESS_REFUSED - access to exchange 'warren.delay."),
        "{err}"
    );
    // Said once, in one line naming what was tried, with no line of the
    // AMQP client's own at the default level.
    assert_eq!(err.matches("ACCESS_REFUSED").count(), 1, "{err}");
    assert!(!err.contains("lapin"), "{err}");
    let out = cli(&[
        "--config",
        &config.display().to_string(),
        "schedules",
        "pause",
        "tick",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // The control queue only checked (it exists), the first refusal is the
    // private queue the answers come back on.
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "warren-producer: pausing schedule `tick`: ACCESS_REFUSED - access to queue 'amq.gen-"
        ) && last.ends_with("' in vhost '/' refused for user 'warren-cli'"),
        "{err}"
    );
    assert_eq!(err.matches("ACCESS_REFUSED").count(), 1, "{err}");
}

/// With `topology.declare = false` the producer checks its own objects
/// (control, catalog, workflow runs, the scheduler's log and snapshot) like
/// the rest of the topology: missing, it stops with exit 1 naming one and
/// creates none of them; once the deployer declared them, it starts and leads.
#[tokio::test]
async fn without_declaring_the_producer_refuses_its_missing_objects() {
    let world = World::new("pchk").await;
    let config = world.write_config("producer.toml", "[topology]\ndeclare = false\n");
    let objects: Vec<_> = Part::ALL
        .iter()
        .flat_map(|p| {
            warren::topology::producer::objects(&world.prefix, world.topo.queue_type(), *p)
        })
        .collect();

    let mut missing = world.start("missing", &config, &[]);
    let status = missing.process.wait_exit(WAIT).await;
    let logs = missing.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    let named = objects.iter().any(|o| {
        let name = match o {
            warren::topology::Object::Queue { name, .. } => format!("queue `{name}`"),
            warren::topology::Object::Exchange { name, .. } => format!("exchange `{name}`"),
            _ => return false,
        };
        logs.contains(&format!("{name} does not exist"))
    });
    assert!(named, "no missing producer object named: {logs}");
    for o in &objects {
        assert!(
            !testing::exists(&world.conn, o).await,
            "{o:?} was declared: {logs}"
        );
    }

    warren::topology::producer::declare(&world.conn, &world.topo, &Part::ALL)
        .await
        .unwrap();
    let started = world.start("declared", &config, &[]);
    started.wait_leader(WAIT, true).await;
    started.wait_ready(WAIT).await;
    let logs = started.logs();
    assert!(!logs.contains("does not exist"), "{logs}");
}
