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
        url: Secret::new(node.tls_url()),
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
