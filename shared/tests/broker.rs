//! The contract, topology, delay levels and confirmed publishing against a
//! real RabbitMQ node (see `warren::testing`).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use warren::amqp::Publisher;
use warren::config::{QueueConfig, QueueType, TopologyConfig};
use warren::envelope::headers;
use warren::retry::RetryOverrides;
use warren::testing::{self, eventually};
use warren::topology::{self, Topology};
use warren::{Error, Task};

const MAX_BODY: usize = 1 << 20;
/// Deadline for anything to happen: generous, so a loaded machine only makes
/// a test slower, never fail.
const WAIT: Duration = Duration::from_secs(60);

async fn setup(test: &str, qt: QueueType) -> (Connection, Topology, Publisher) {
    let conn = testing::connect().await;
    let topo = Topology::new(&testing::topology_config(test, qt));
    topology::declare(&conn, &topo).await.expect("declare");
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .expect("publisher");
    (conn, topo, publisher)
}

async fn get_one(conn: &Connection, queue: &str) -> Option<lapin::message::Delivery> {
    let ch = conn.create_channel().await.unwrap();
    let msg = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    msg.map(|m| m.delivery)
}

#[tokio::test]
async fn envelope_round_trips_through_the_broker() {
    let (conn, topo, publisher) = setup("envelope", QueueType::Classic).await;
    let mut extra = FieldTable::default();
    extra.insert("x-custom".into(), AMQPValue::LongString("v".into()));
    let task = Task {
        max_attempts: Some(4),
        timeout: Some(Duration::from_millis(1500)),
        not_before: Some(
            chrono::DateTime::parse_from_rfc3339("2030-01-02T03:04:05.678Z")
                .unwrap()
                .into(),
        ),
        priority: Some(7),
        correlation_id: Some("corr-1".into()),
        schedule: Some("nightly".into()),
        last_error: Some("previous failure".into()),
        first_failed_at: Some(
            chrono::DateTime::parse_from_rfc3339("2029-01-01T00:00:00.000Z")
                .unwrap()
                .into(),
        ),
        attempt: 2,
        retry: RetryOverrides {
            max_attempts: None,
            initial_delay: Some(Duration::from_millis(300)),
            multiplier: Some(1.5),
            max_delay: Some(Duration::from_secs(9)),
            jitter: Some(0.1),
        },
        extra_headers: extra,
        ..Task::new(
            "report.daily",
            &serde_json::json!({"day": "mon", "n": [1, 2]}),
        )
    };
    publisher
        .publish_task(&topo, &task, Duration::ZERO)
        .await
        .expect("confirmed");
    let queue = &topo.work_queues()[0].name;
    let d = testing::take_one(&conn, queue, WAIT).await;
    assert_eq!(d.properties.delivery_mode(), &Some(2), "persistent");
    let back = Task::decode(d.routing_key.as_str(), &d.properties, &d.data, MAX_BODY).unwrap();
    assert!(back.published_at.is_some());
    assert_eq!(
        Task {
            published_at: None,
            ..back
        },
        task
    );

    // A plain client: routing key and JSON body, nothing else.
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        topo.tasks_exchange().as_str().into(),
        "email.send".into(),
        BasicPublishOptions::default(),
        br#"{"to":"x@y.z"}"#,
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let d = testing::take_one(&conn, queue, WAIT).await;
    let plain = Task::decode(d.routing_key.as_str(), &d.properties, &d.data, MAX_BODY).unwrap();
    assert_eq!(plain.name, "email.send");
    assert_eq!(plain.attempt, 1);
    assert!(!plain.id.is_empty());
    assert_eq!(
        plain.payload_as::<serde_json::Value>().unwrap()["to"],
        "x@y.z"
    );
    testing::delete_topology(&conn, &topo).await;
}

#[tokio::test]
async fn declaring_twice_is_a_no_op() {
    let (conn, topo, _) = setup("twice", QueueType::Classic).await;
    topology::declare(&conn, &topo)
        .await
        .expect("second declare");
    let (conn_q, topo_q, _) = setup("twiceq", QueueType::Quorum).await;
    topology::declare(&conn_q, &topo_q)
        .await
        .expect("second quorum declare");
    testing::delete_topology(&conn, &topo).await;
    testing::delete_topology(&conn_q, &topo_q).await;
}

#[tokio::test]
async fn conflicting_queue_names_object_and_argument() {
    let conn = testing::connect().await;
    let mut cfg = testing::topology_config("conflict", QueueType::Classic);
    // Set explicitly: an unset `max_priority` adopts the queue instead.
    cfg.queues[0].max_priority = Some(0);
    let topo = Topology::new(&cfg);
    let queue = topo.work_queues()[0].name.clone();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(3));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(topo.dead_exchange().into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .unwrap();
    let err = topology::declare(&conn, &topo).await.unwrap_err();
    match &err {
        Error::TopologyConflict {
            object, argument, ..
        } => {
            assert!(object.contains(&queue), "{err}");
            assert_eq!(argument, "x-max-priority", "{err}");
        }
        other => panic!("expected a topology conflict, got {other}"),
    }
    assert!(!err.is_transient());
    // The caller's connection survives the refusal.
    assert!(conn.status().connected());
    testing::delete_topology(&conn, &topo).await;
}

/// Priorities are opt-in: a queue created with `max_priority` unset has none
/// (so redeclaring it with `0` is equivalent and with `10` conflicts), while
/// a priority queue an older warren declared (default 10) is used as it is
/// when `max_priority` is unset, and refused when it is set to something else.
#[tokio::test]
async fn unset_max_priority_creates_none_and_adopts_an_existing_priority_queue() {
    let conn = testing::connect().await;
    let with = |cfg: &TopologyConfig, p: Option<u8>| {
        let mut c = cfg.clone();
        c.queues[0].max_priority = p;
        Topology::new(&c)
    };
    let conflict_arg = |e: Error| match e {
        Error::TopologyConflict { argument, .. } => argument,
        other => panic!("expected a topology conflict, got {other}"),
    };

    let fresh = testing::topology_config("prio_fresh", QueueType::Classic);
    topology::declare(&conn, &with(&fresh, None)).await.unwrap();
    topology::declare(&conn, &with(&fresh, Some(0)))
        .await
        .expect("a new default queue has no x-max-priority");
    let err = topology::declare(&conn, &with(&fresh, Some(10)))
        .await
        .unwrap_err();
    assert_eq!(conflict_arg(err), "x-max-priority");
    testing::delete_topology(&conn, &with(&fresh, None)).await;

    let older = testing::topology_config("prio_older", QueueType::Classic);
    topology::declare(&conn, &with(&older, Some(10)))
        .await
        .unwrap();
    topology::declare(&conn, &with(&older, None))
        .await
        .expect("unset adopts the existing priority queue");
    topology::declare(&conn, &with(&older, Some(10)))
        .await
        .expect("it still is one");
    let err = topology::declare(&conn, &with(&older, Some(0)))
        .await
        .unwrap_err();
    assert_eq!(conflict_arg(err), "x-max-priority");
    assert!(conn.status().connected());
    testing::delete_topology(&conn, &with(&older, None)).await;
}

async fn delays_arrive_on_time(qt: QueueType, test: &str) {
    let (conn, topo, publisher) = setup(test, qt).await;
    let queue = topo.work_queues()[0].name.clone();
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "t".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delays = [0u64, 250, 1700, 3300];
    let start = Instant::now();
    for ms in delays {
        let task = Task::new(format!("delay.t{ms}"), &serde_json::json!({"ms": ms}));
        publisher
            .publish_task(&topo, &task, Duration::from_millis(ms))
            .await
            .expect("confirmed");
    }
    let mut seen = Vec::new();
    while seen.len() < delays.len() {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("all delayed tasks arrive")
            .unwrap()
            .unwrap();
        let elapsed = start.elapsed();
        let task = Task::decode(d.routing_key.as_str(), &d.properties, &d.data, MAX_BODY).unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        let ms: u64 = task.payload_as::<serde_json::Value>().unwrap()["ms"]
            .as_u64()
            .unwrap();
        assert_eq!(
            task.name,
            format!("delay.t{ms}"),
            "task name survives the levels"
        );
        // Never early is the contract and holds however loaded the machine
        // is; how late is a matter of load, so it is printed, not asserted
        // (`WAIT` bounds it).
        assert!(
            elapsed >= Duration::from_millis(ms),
            "{ms} ms task arrived early, after {elapsed:?}"
        );
        eprintln!("{ms} ms task arrived after {elapsed:?}");
        seen.push(ms);
    }
    // Each task is published only after the one before was confirmed, and
    // the delays are at least 250 ms apart: a longer delay overtaking a
    // shorter one would mean a level blocked it (head of line), not load.
    assert_eq!(seen, delays.to_vec(), "arrival order follows the delays");
    testing::delete_topology(&conn, &topo).await;
}

#[tokio::test]
async fn delays_on_classic_queues() {
    delays_arrive_on_time(QueueType::Classic, "delayc").await;
}

#[tokio::test]
async fn delays_on_quorum_queues() {
    delays_arrive_on_time(QueueType::Quorum, "delayq").await;
}

/// One work queue that binds only `email.*`: every other task name is unroutable.
fn emails_only(test: &str, qt: QueueType) -> TopologyConfig {
    TopologyConfig {
        queues: vec![QueueConfig {
            name: "emails".into(),
            bindings: vec!["email.*".into()],
            max_priority: Some(0),
        }],
        ..testing::topology_config(test, qt)
    }
}

async fn unroutable_at_last_hop_goes_dead(qt: QueueType, test: &str) {
    let conn = testing::connect().await;
    let cfg = emails_only(test, qt);
    let topo = Topology::new(&cfg);
    topology::declare(&conn, &topo).await.unwrap();
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    // Routable when published (into the level), unroutable when it leaves it.
    let lost = Task::new("report.daily", &serde_json::json!({}));
    publisher
        .publish_task(&topo, &lost, Duration::from_millis(300))
        .await
        .unwrap();
    let behind = Task::new("email.send", &serde_json::json!({}));
    publisher
        .publish_task(&topo, &behind, Duration::from_millis(300))
        .await
        .unwrap();

    let d = testing::take_one(&conn, &topo.dead_queue(), WAIT).await;
    assert_eq!(
        d.properties.message_id().as_ref().unwrap().as_str(),
        lost.id
    );
    assert_eq!(
        d.properties.kind().as_ref().unwrap().as_str(),
        "report.daily"
    );
    let d = testing::take_one(&conn, &topo.work_queues()[0].name, WAIT).await;
    assert_eq!(
        d.properties.message_id().as_ref().unwrap().as_str(),
        behind.id
    );
    assert!(
        get_one(&conn, &topo.dead_queue()).await.is_none(),
        "only the unroutable one is dead"
    );
    testing::delete_topology(&conn, &topo).await;
}

#[tokio::test]
async fn unroutable_after_delay_is_dead_lettered_classic() {
    unroutable_at_last_hop_goes_dead(QueueType::Classic, "unroutc").await;
}

#[tokio::test]
async fn unroutable_after_delay_is_dead_lettered_quorum() {
    unroutable_at_last_hop_goes_dead(QueueType::Quorum, "unroutq").await;
}

#[tokio::test]
async fn confirmed_publish_reports_unroutable_and_missing_exchange() {
    let conn = testing::connect().await;
    let cfg = emails_only("unroutable", QueueType::Classic);
    let topo = Topology::new(&cfg);
    topology::declare(&conn, &topo).await.unwrap();
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();

    let task = Task::new("nobody.listens", &serde_json::json!({}));
    let err = publisher
        .publish_task(&topo, &task, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unroutable { .. }), "{err}");
    assert!(err.to_string().contains("nobody.listens"), "{err}");

    // Pipelined: one bad among good ones is singled out.
    let good: Vec<Task> = (0..50)
        .map(|i| Task::new("email.send", &serde_json::json!({"i": i})))
        .collect();
    let mut batch: Vec<(&Task, Duration)> = good.iter().map(|t| (t, Duration::ZERO)).collect();
    batch.insert(25, (&task, Duration::ZERO));
    let results = publisher.publish_tasks(&topo, batch, 16).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 50);
    let errs: Vec<(usize, String)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e.to_string())))
        .collect();
    assert!(
        matches!(results[25], Err(Error::Unroutable { .. })),
        "errors: {errs:?}"
    );

    // Under pipelining the broker acks many publishes at once and lapin hands a
    // return to whichever confirm resolves first: every verdict must still
    // land on its own publish, from one batch and from concurrent callers.
    let mixed: Vec<Task> = (0..2000)
        .map(|i| {
            let name = if i % 7 == 3 {
                "nobody.listens"
            } else {
                "email.send"
            };
            Task::new(name, &serde_json::json!({ "i": i }))
        })
        .collect();
    let results = publisher
        .publish_tasks(&topo, mixed.iter().map(|t| (t, Duration::ZERO)), 500)
        .await;
    for (t, r) in mixed.iter().zip(&results) {
        match (t.name.as_str(), r) {
            ("email.send", Ok(())) => {}
            ("nobody.listens", Err(Error::Unroutable { routing_key, .. })) => {
                assert_eq!(routing_key, "nobody.listens")
            }
            (name, r) => panic!("{name}: wrong verdict {r:?}"),
        }
    }
    let callers: Vec<_> = (0..8)
        .map(|c| {
            let publisher = publisher.clone();
            let topo = topo.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    let bad = (i + c) % 5 == 0;
                    let t = Task::new(
                        if bad { "nobody.listens" } else { "email.send" },
                        &serde_json::json!({}),
                    );
                    let r = publisher.publish_task(&topo, &t, Duration::ZERO).await;
                    assert_eq!(r.is_err(), bad, "caller {c} task {i}: {r:?}");
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }

    let other = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    let err = other
        .publish("wt.no-such-exchange", "x", task.properties(), &task.payload)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no-such-exchange") || err.to_string().contains("NOT_FOUND"),
        "{err}"
    );
    testing::delete_topology(&conn, &topo).await;
}

#[tokio::test]
async fn headers_survive_as_plain_clients_send_them() {
    // pika and rabbitmqadmin send header integers as signed 32/64-bit or strings.
    let (conn, topo, _) = setup("hdrs", QueueType::Classic).await;
    let ch = conn.create_channel().await.unwrap();
    let mut h = FieldTable::default();
    h.insert(headers::MAX_ATTEMPTS.into(), AMQPValue::LongInt(2));
    h.insert(
        headers::TIMEOUT_MS.into(),
        AMQPValue::LongString("2500".into()),
    );
    ch.basic_publish(
        topo.tasks_exchange().as_str().into(),
        "x.y".into(),
        BasicPublishOptions::default(),
        b"[]",
        BasicProperties::default()
            .with_headers(h)
            .with_message_id("given-id".into()),
    )
    .await
    .unwrap();
    let d = testing::take_one(&conn, &topo.work_queues()[0].name, WAIT).await;
    let t = Task::decode(d.routing_key.as_str(), &d.properties, &d.data, MAX_BODY).unwrap();
    assert_eq!(t.id, "given-id");
    assert_eq!(t.max_attempts, Some(2));
    assert_eq!(t.timeout, Some(Duration::from_millis(2500)));
    testing::delete_topology(&conn, &topo).await;
}

#[tokio::test]
async fn amqps_with_a_private_ca() {
    let node = testing::Node::start_tls();
    let cfg = warren::config::AmqpConfig {
        url: Some(warren::config::Secret::new(node.tls_url())),
        tls_ca_file: Some(node.ca_file()),
        ..testing::amqp_config()
    };
    let conn = warren::amqp::connect(&cfg, "tls-test")
        .await
        .expect("amqps connect");
    let topo = Topology::new(&testing::topology_config("tls", QueueType::Classic));
    topology::declare(&conn, &topo).await.unwrap();
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    let task = Task::new("over.tls", &serde_json::json!({"secure": true}));
    publisher
        .publish_task(&topo, &task, Duration::ZERO)
        .await
        .expect("confirmed over TLS");
    let d = testing::take_one(&conn, &topo.work_queues()[0].name, WAIT).await;
    assert_eq!(
        d.properties.message_id().as_ref().unwrap().as_str(),
        task.id
    );

    // The certificate is really verified: without the CA the handshake fails.
    let untrusted = warren::config::AmqpConfig {
        tls_ca_file: None,
        ..cfg.clone()
    };
    assert!(warren::amqp::connect(&untrusted, "tls-test").await.is_err());
    let missing = warren::config::AmqpConfig {
        tls_ca_file: Some("/nonexistent/ca.pem".into()),
        ..cfg
    };
    let err = warren::amqp::connect(&missing, "tls-test")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Tls(_)) && err.to_string().contains("/nonexistent/ca.pem"),
        "{err}"
    );
    conn.close(200, "bye".into()).await.ok();
}

#[tokio::test]
async fn mutual_tls_needs_a_certificate_from_the_brokers_ca() {
    let node = testing::Node::start_mtls();
    let (cert, key) = node.client_cert("client");
    let cfg = warren::config::AmqpConfig {
        url: Some(warren::config::Secret::new(node.tls_url())),
        tls_ca_file: Some(node.ca_file()),
        tls_cert_file: Some(cert.clone()),
        tls_key_file: Some(key.clone()),
        ..testing::amqp_config()
    };
    cfg.validate().expect("a valid config");
    let conn = warren::amqp::connect(&cfg, "mtls-test")
        .await
        .expect("connects with the client certificate");
    let topo = Topology::new(&testing::topology_config("mtls", QueueType::Classic));
    topology::declare(&conn, &topo).await.unwrap();
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    let task = Task::new("over.mtls", &serde_json::json!({"mutual": true}));
    publisher
        .publish_task(&topo, &task, Duration::ZERO)
        .await
        .expect("confirmed over mutual TLS");
    let d = testing::take_one(&conn, &topo.work_queues()[0].name, WAIT).await;
    assert_eq!(
        d.properties.message_id().as_ref().unwrap().as_str(),
        task.id
    );
    conn.close(200, "bye".into()).await.ok();

    // No certificate, or one from another CA: refused, for good (no retry
    // can fix it), and the error says it is about the certificate.
    let (other_cert, other_key) = node.client_cert("other-client");
    let refusals = [
        ("no certificate", None, None),
        ("another CA's", Some(other_cert), Some(other_key)),
    ];
    for (what, cert, key) in refusals {
        let cfg = warren::config::AmqpConfig {
            tls_cert_file: cert,
            tls_key_file: key,
            ..cfg.clone()
        };
        // Under TLS 1.3 the broker's alert races the connection reset it
        // causes (see `amqp::reset`): an attempt that only saw the reset is
        // retried, and the first that reads the alert is final.
        let mut attempts = 0;
        let err = loop {
            attempts += 1;
            let err = warren::amqp::connect(&cfg, "mtls-test").await.unwrap_err();
            let text = err.to_string();
            assert!(text.contains("client certificate"), "{what}: {text}");
            if !err.is_transient() || attempts == 40 {
                break err;
            }
        };
        eprintln!("{what}: refused for good after {attempts} attempt(s): {err}");
        assert!(matches!(err, Error::Tls(_)), "{what}: {err}");
    }

    // EXTERNAL: no user or password in the URL; the broker logs the
    // connection in as the certificate's CN.
    let external = warren::config::AmqpConfig {
        url: Some(warren::config::Secret::new(
            node.tls_url().replace("guest:guest@", ""),
        )),
        auth_mechanism: warren::config::AuthMechanism::External,
        ..cfg.clone()
    };
    external.validate().expect("a valid config");
    let conn = warren::amqp::connect(&external, "mtls-external")
        .await
        .expect("EXTERNAL login with the certificate");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "mtls.external.probe".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the certificate's user may declare");
    let users = node.ctl(&["list_connections", "user", "auth_mechanism"]);
    let listed = String::from_utf8_lossy(&users.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.contains("warren-client") && l.contains("EXTERNAL")),
        "{listed}"
    );
    conn.close(200, "bye".into()).await.ok();
}

#[tokio::test]
async fn quorum_queue_dead_letters_a_task_redelivered_past_the_limit() {
    // A task whose consumer dies every time it runs it (here: a channel that
    // closes without acking) must not crash-loop the fleet forever.
    let conn = testing::connect().await;
    let cfg = TopologyConfig {
        delivery_limit: 2,
        ..testing::topology_config("dlimit", QueueType::Quorum)
    };
    let topo = Topology::new(&cfg);
    topology::declare(&conn, &topo).await.unwrap();
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    let task = Task::new("crashes.everything", &serde_json::json!({}));
    publisher
        .publish_task(&topo, &task, Duration::ZERO)
        .await
        .unwrap();
    let queue = topo.work_queues()[0].name.clone();
    let dead = topo.dead_queue();
    let deliveries = std::sync::atomic::AtomicU32::new(0);
    // Take it and "crash" until the broker dead-letters it: the state waited
    // on is the dead queue, since a returned message may take a moment to be
    // ready again.
    eventually(
        WAIT,
        "the task dead-lettered past its delivery limit",
        || async {
            if testing::queue_len(&conn, &dead).await > 0 {
                return Some(());
            }
            let ch = conn.create_channel().await.unwrap();
            let got = ch
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .unwrap();
            // Closing the channel unacked returns the message, as a crash would.
            ch.close(200, "crash".into()).await.unwrap();
            if got.is_some() {
                let n = deliveries.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                assert!(n <= 3, "delivered {n} times past a limit of 2");
            }
            None
        },
    )
    .await;
    let d = testing::take_one(&conn, &topo.dead_queue(), WAIT).await;
    assert_eq!(
        d.properties.message_id().as_ref().unwrap().as_str(),
        task.id
    );
    let h = d.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        warren::envelope::header_str(&h, "x-first-death-reason").as_deref(),
        Some("delivery_limit")
    );
    testing::delete_topology(&conn, &topo).await;
}

/// Names of the tasks waiting in `queue` (taking them).
async fn drain_names(conn: &Connection, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(d) = get_one(conn, queue).await {
        let t = Task::decode(d.routing_key.as_str(), &d.properties, &d.data, MAX_BODY).unwrap();
        out.push(t.name);
    }
    out.sort();
    out
}

/// The README's two-queue layout: `default` binds `#`, `emails` binds
/// `email.*`. Each task lands on exactly one queue, published directly (with
/// warren or a plain client) or delayed; a deployment declared by an older
/// warren (the catch-all bound straight to the tasks exchange) is fixed by
/// declaring again.
async fn overlapping_bindings(qt: QueueType, test: &str) {
    let mut cfg = testing::topology_config(test, qt);
    cfg.queues.push(QueueConfig {
        name: "emails".into(),
        bindings: vec!["email.*".into()],
        max_priority: Some(0),
    });
    let conn = testing::connect().await;
    let topo = Topology::new(&cfg);
    let default = topo.work_queues()[0].name.clone();
    let emails = topo.work_queues()[1].name.clone();
    topology::declare(&conn, &topo).await.unwrap();
    // What the one-stage layout had bound: a second path for every task.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_bind(
        default.as_str().into(),
        topo.tasks_exchange().as_str().into(),
        "#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    topology::declare(&conn, &topo)
        .await
        .expect("declaring over the old layout");
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();
    for name in ["email.send", "report.daily"] {
        for delay in [Duration::ZERO, Duration::from_millis(300)] {
            publisher
                .publish_task(&topo, &Task::new(name, &serde_json::json!({})), delay)
                .await
                .unwrap();
        }
        // A plain client, straight to the front door.
        ch.basic_publish(
            topo.tasks_exchange().as_str().into(),
            name.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    // Routing a message to all its queues is one step, so once the expected
    // number arrived a duplicate would be there too.
    eventually(WAIT, "all six tasks routed", || async {
        (testing::queue_len(&conn, &default).await + testing::queue_len(&conn, &emails).await >= 6)
            .then_some(())
    })
    .await;
    assert_eq!(drain_names(&conn, &emails).await, vec!["email.send"; 3]);
    assert_eq!(drain_names(&conn, &default).await, vec!["report.daily"; 3]);
    assert!(get_one(&conn, &topo.dead_queue()).await.is_none());
    testing::delete_topology(&conn, &topo).await;
}

#[tokio::test]
async fn overlapping_bindings_deliver_each_task_once_classic() {
    overlapping_bindings(QueueType::Classic, "overlapc").await;
}

#[tokio::test]
async fn overlapping_bindings_deliver_each_task_once_quorum() {
    overlapping_bindings(QueueType::Quorum, "overlapq").await;
}

/// A nack is transient (the broker nacks while a queue's leader moves to
/// another node): `publish_task` and `publish_tasks` send the same task
/// again a few times before they report it. Made here with a full
/// `reject-publish` queue that a reader empties 0.5 s later.
#[tokio::test]
async fn a_nacked_publish_is_sent_again_with_the_same_id() {
    let (conn, topo, publisher) = setup("nack_retry", QueueType::Classic).await;
    let full = format!("{}.full", topo.prefix());
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    // The exchange routes `nack.*` to the one-message queue only.
    ch.queue_bind(
        full.as_str().into(),
        topo.tasks_exchange().as_str().into(),
        "nack.*".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let filler = Task::new("nack.fill", &serde_json::json!({}));
    publisher
        .publish_task(&topo, &filler, Duration::ZERO)
        .await
        .expect("the first message fits");
    let drain = |n: usize| {
        let (conn, full) = (&conn, full.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut ids = Vec::new();
            for _ in 0..n {
                let d = get_one(conn, &full).await.expect("a message to take");
                ids.push(d.properties.message_id().as_ref().map(|s| s.to_string()));
            }
            ids
        }
    };
    let task = Task::new("nack.one", &serde_json::json!({}));
    let (res, _) = tokio::join!(
        publisher.publish_task(&topo, &task, Duration::ZERO),
        drain(1)
    );
    res.expect("sent again once the queue had room");
    let got = get_one(&conn, &full).await.expect("the retried task");
    assert_eq!(
        got.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(task.id.as_str()),
        "the same id"
    );
    // The same through the pipelined path (the API's and the console's).
    publisher
        .publish_task(&topo, &filler, Duration::ZERO)
        .await
        .unwrap();
    let batch = Task::new("nack.two", &serde_json::json!({}));
    let (res, _) = tokio::join!(
        publisher.publish_tasks(&topo, [(&batch, Duration::ZERO)], 8),
        drain(1)
    );
    assert!(res.iter().all(Result::is_ok), "{res:?}");
    // A nack that lasts is reported as such, after the retries.
    let stuck = Task::new("nack.three", &serde_json::json!({}));
    let began = Instant::now();
    let err = publisher
        .publish_task(&topo, &stuck, Duration::ZERO)
        .await
        .expect_err("the queue stays full");
    assert!(matches!(err, Error::Nacked { .. }), "{err}");
    assert!(
        began.elapsed() >= Duration::from_secs(2),
        "retried before giving up"
    );
    let _ = ch
        .queue_delete(full.as_str().into(), Default::default())
        .await;
}

/// A transaction's messages reach their queue at its commit and not before;
/// the commit hands back the ones no queue took; a batch dropped without
/// its commit marks the channel unusable, so its publishes can never go out
/// with a later commit, and closing the channel discards them.
#[tokio::test]
async fn a_transaction_delivers_at_its_commit_and_a_dropped_batch_spoils_its_channel() {
    use warren::amqp::Transaction;
    let (conn, topo, _publisher) = setup("transaction", QueueType::Classic).await;
    let queue = topo.work_queues()[0].name.clone();
    let props = |id: &str| {
        BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2)
    };
    let tx = Transaction::new(&conn, Duration::from_secs(10))
        .await
        .unwrap();

    let mut batch = tx.batch();
    for id in ["a", "b", "c"] {
        batch.publish("", &queue, props(id), b"{}").unwrap();
    }
    batch
        .publish("", "no-such-queue-anywhere", props("lost"), b"{}")
        .unwrap();
    assert_eq!(batch.len(), 4);
    // Written to the socket, not committed: nothing in the queue yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        get_one(&conn, &queue).await.is_none(),
        "delivered before the commit"
    );
    let returned = batch.commit().await.unwrap();
    let ids: Vec<_> = returned.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids, vec![Some("lost".to_owned())]);
    assert_eq!(returned[0].routing_key, "no-such-queue-anywhere");
    assert!(tx.is_open());
    let mut got = Vec::new();
    while let Some(d) = get_one(&conn, &queue).await {
        got.push(d.properties.message_id().clone().unwrap().to_string());
    }
    assert_eq!(got, ["a", "b", "c"]);

    let mut stale = tx.batch();
    stale.publish("", &queue, props("stale"), b"{}").unwrap();
    drop(stale);
    assert!(!tx.is_open(), "a dropped batch spoils the channel");
    tx.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        get_one(&conn, &queue).await.is_none(),
        "an uncommitted publish arrived"
    );
}
