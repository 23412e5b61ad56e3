//! Signed and encrypted tasks against a real broker: refusals are
//! dead-lettered unrun with the reason, valid signatures survive retries and
//! dead-letter replays, encrypted payloads reach only the handler, the
//! documented pika publisher is accepted, keys rotate without a refusal.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde_json::json;
use warren::amqp::Publisher;
use warren::envelope::headers;
use warren::security::{KeyConfig, KeyKind, Keyring, Seal, SecurityConfig, Verify};
use warren::testing::eventually;
use warren::Task;
use warren_consumer::dead::{self, Selector};
use warren_consumer::{Registry, TaskError};

use crate::helpers::*;

/// Key files in a temp dir: signing keys `k1`, `k2`, encryption key `e1`.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (id, secret) in [
            ("k1", "k1-secret-0123456789abcdef0123456789abcdef"),
            ("k2", "k2-secret-0123456789abcdef0123456789abcdef"),
            ("k9", "k9-secret-0123456789abcdef0123456789abcdef"),
            ("e1", &"5a".repeat(32)),
        ] {
            std::fs::write(dir.path().join(id), format!("{secret}\n")).unwrap();
        }
        Self { dir }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.path().join(id)
    }

    fn config(&self, ids: &[&str], verify: Option<Verify>) -> SecurityConfig {
        SecurityConfig {
            keys: ids
                .iter()
                .map(|id| KeyConfig {
                    id: (*id).into(),
                    kind: if id.starts_with('e') {
                        KeyKind::Encrypt
                    } else {
                        KeyKind::Sign
                    },
                    secret_file: Some(self.path(id)),
                    secret_env: None,
                })
                .collect(),
            verify,
            ..SecurityConfig::default()
        }
    }

    fn ring(&self, ids: &[&str]) -> Keyring {
        self.config(ids, None).keyring().unwrap()
    }

    fn seal(&self, sign: Option<&str>, encrypt: Option<&str>) -> Arc<Seal> {
        let ids: Vec<&str> = sign.into_iter().chain(encrypt).collect();
        Arc::new(
            Seal::new(
                self.ring(&ids),
                sign.map(Into::into),
                encrypt.map(Into::into),
            )
            .unwrap(),
        )
    }
}

async fn sealing_publisher(app: &App, seal: Arc<Seal>) -> Publisher {
    Publisher::new(&app.conn, Duration::from_secs(10))
        .await
        .unwrap()
        .sealed(Some(seal))
}

fn dead_by_id(
    dead: &[lapin::message::Delivery],
) -> std::collections::HashMap<String, &lapin::message::Delivery> {
    dead.iter()
        .map(|d| {
            let id = d
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .as_str()
                .to_owned();
            (id, d)
        })
        .collect()
}

fn signature_of(props: &BasicProperties) -> String {
    match props
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .get(headers::SIGNATURE)
    {
        Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
        other => panic!("no signature header: {other:?}"),
    }
}

fn with_signature(props: BasicProperties, value: &str) -> BasicProperties {
    let mut h = props.headers().clone().unwrap_or_default();
    h.insert(
        headers::SIGNATURE.into(),
        AMQPValue::LongString(value.into()),
    );
    props.with_headers(h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_are_dead_lettered_unrun_with_what_failed() {
    let keys = Keys::new();
    let mut cfg = config("sig_refused");
    cfg.security = keys.config(&["k1"], Some(Verify::Required));
    let (reg, runs) = recording("sec.*");
    let app = spawn_worker(cfg, reg).await;
    let seal = keys.seal(Some("k1"), None);
    let signed = |t: &Task| {
        let (p, b) = seal.apply(t.properties(), &t.payload).unwrap();
        (p, b.into_owned())
    };

    let good = Task::new("sec.run", &json!({"n": 1}));
    let (p, b) = signed(&good);
    app.publish_raw("sec.run", p, &b).await;

    let tampered = Task::new("sec.run", &json!({"amount": 10}));
    let (p, _) = signed(&tampered);
    app.publish_raw("sec.run", p, br#"{"amount":10000}"#).await;

    // A captured task replayed under another name.
    let renamed = Task::new("sec.read", &json!({}));
    let (p, b) = signed(&renamed);
    app.publish_raw("sec.delete", p.with_type("sec.delete".into()), &b)
        .await;

    let unknown = Task::new("sec.run", &json!({}));
    let (p, b) = keys
        .seal(Some("k9"), None)
        .apply(unknown.properties(), &unknown.payload)
        .unwrap();
    app.publish_raw("sec.run", p, &b).await;

    let truncated = Task::new("sec.run", &json!({}));
    let (p, b) = signed(&truncated);
    let cut = signature_of(&p);
    let p = with_signature(p, &cut[..cut.len() - 10]);
    app.publish_raw("sec.run", p, &b).await;

    let missing = Task::new("sec.run", &json!({}));
    app.publish(&missing).await;

    let dead = app.take_dead(5).await;
    let dead = dead_by_id(&dead);
    for (task, says) in [
        (&tampered, "does not match the task"),
        (&renamed, "does not match the task"),
        (
            &unknown,
            "signed with key `k9`, which this consumer does not hold",
        ),
        (&truncated, "malformed x-warren-signature"),
        (&missing, "no x-warren-signature header"),
    ] {
        let d = dead
            .get(&task.id)
            .unwrap_or_else(|| panic!("{says}: not dead-lettered"));
        assert_eq!(
            header(d, headers::DEAD_KIND).as_deref(),
            Some("bad_signature")
        );
        let reason = header(d, headers::DEAD_REASON).unwrap();
        assert!(reason.contains(says), "{reason}");
        assert!(runs.of(&task.id).is_empty(), "{says}: never run");
    }
    runs.wait_total(1).await;
    assert_eq!(runs.of(&good.id).len(), 1, "the valid task ran");
    assert_eq!(
        app.counter(
            "warren_consumer_refused_total",
            &[("kind", "bad_signature")]
        ),
        5.0
    );
    // Dead-lettered at once: no retry copy is on its way.
    assert_eq!(queue_len(&app.conn, &app.topo.dead_queue()).await, 0);
    assert_eq!(runs.total(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_present_runs_unsigned_tasks_but_refuses_bad_signatures() {
    let keys = Keys::new();
    let mut cfg = config("sig_when_present");
    // No `verify`: with a signing key configured, `when_present` applies.
    cfg.security = keys.config(&["k1"], None);
    let (reg, runs) = recording("sec.*");
    let app = spawn_worker(cfg, reg).await;
    let unsigned = Task::new("sec.run", &json!({}));
    app.publish(&unsigned).await;
    let bad = Task::new("sec.run", &json!({}));
    let (p, _) = keys
        .seal(Some("k1"), None)
        .apply(bad.properties(), &bad.payload)
        .unwrap();
    app.publish_raw("sec.run", p, br#"{"tampered":true}"#).await;
    let dead = app.take_dead(1).await;
    assert_eq!(
        dead[0].properties.message_id().as_ref().unwrap().as_str(),
        bad.id
    );
    assert_eq!(
        header(&dead[0], headers::DEAD_KIND).as_deref(),
        Some("bad_signature")
    );
    runs.wait_total(1).await;
    assert_eq!(runs.of(&unsigned.id).len(), 1);
    app.stop().await;
}

/// A handler failing the first `fail_first` attempts (retryable), then
/// failing permanently while `park` is set, recording payloads it saw.
#[derive(Clone, Default)]
struct Flaky {
    attempts: Arc<AtomicU32>,
    payloads: Arc<Mutex<Vec<Vec<u8>>>>,
    park: Arc<std::sync::atomic::AtomicBool>,
}

fn flaky(name: &str, f: &Flaky) -> Registry {
    let f = f.clone();
    let mut reg = Registry::new();
    reg.register_fn(name, move |t| {
        let f = f.clone();
        async move {
            f.payloads.lock().unwrap().push(t.payload.clone());
            let n = f.attempts.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                return Err(TaskError::retryable("first attempt fails"));
            }
            if f.park.load(Ordering::SeqCst) {
                return Err(TaskError::permanent("parked for the test"));
            }
            Ok(())
        }
    })
    .unwrap();
    reg
}

async fn wait_attempts(f: &Flaky, n: u32) {
    let f = f.clone();
    eventually(WAIT, &format!("{n} attempts"), || {
        let f = f.clone();
        async move { (f.attempts.load(Ordering::SeqCst) >= n).then_some(()) }
    })
    .await;
}

/// Retry, dead letter and replay of a sealed task, `verify = required`:
/// the signature stays valid on every copy, nothing is refused.
async fn survives_retry_and_replay(test: &str, encrypt: bool) {
    let keys = Keys::new();
    let mut cfg = config(test);
    let ids: &[&str] = if encrypt { &["k1", "e1"] } else { &["k1"] };
    cfg.security = keys.config(ids, Some(Verify::Required));
    let f = Flaky::default();
    f.park.store(true, Ordering::SeqCst);
    let app = spawn_worker(cfg.clone(), flaky("sec.pii", &f)).await;
    let publisher = sealing_publisher(&app, keys.seal(Some("k1"), encrypt.then_some("e1"))).await;
    let secret = "Ada Lovelace, 10 Dec 1815";
    let task = Task::new("sec.pii", &json!({ "name": secret }));
    publisher
        .publish_task(&app.topo, &task, Duration::ZERO)
        .await
        .unwrap();
    // Attempt 1 fails (retry), attempt 2 fails permanently (dead letter).
    wait_attempts(&f, 2).await;
    eventually(WAIT, "dead copy", || async {
        (queue_len(&app.conn, &app.topo.dead_queue()).await == 1).then_some(())
    })
    .await;
    {
        // Look at the dead copy without taking it.
        let ch = app.conn.create_channel().await.unwrap();
        let m = ch
            .basic_get(
                app.topo.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
            .unwrap()
            .delivery;
        assert_eq!(header(&m, headers::DEAD_KIND).as_deref(), Some("permanent"));
        let body = String::from_utf8_lossy(&m.data);
        assert_eq!(
            body.contains("Lovelace"),
            !encrypt,
            "dead queue holds ciphertext only when encrypted"
        );
        if encrypt {
            assert_eq!(
                m.properties.content_encoding().as_ref().map(|s| s.as_str()),
                Some("warren-aes256gcm;k=e1")
            );
        }
        ch.close(200, "peeked".into()).await.unwrap();
    }
    f.park.store(false, Ordering::SeqCst);
    let report = dead::replay(
        &app.conn,
        &app.topo,
        &Selector::Ids(vec![task.id.clone()]),
        10,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(report.replayed, vec![task.id.clone()], "{report:?}");
    wait_attempts(&f, 3).await;
    eventually(WAIT, "replayed task succeeded", || async {
        (app.counter("warren_consumer_tasks_total", &[("outcome", "succeeded")]) == 1.0)
            .then_some(())
    })
    .await;
    // The handler saw the plaintext every time.
    for p in f.payloads.lock().unwrap().iter() {
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(p).unwrap()["name"],
            secret
        );
    }
    assert_eq!(
        app.counter("warren_consumer_refused_total", &[]),
        0.0,
        "no copy was refused"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_task_survives_a_retry_and_a_dead_letter_replay() {
    survives_retry_and_replay("sig_retry", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_task_runs_retries_and_replays_with_plaintext_only_in_the_handler() {
    survives_retry_and_replay("enc_retry", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_encryption_key_a_task_is_dead_lettered_undecryptable() {
    let keys = Keys::new();
    let mut cfg = config("enc_nokey");
    cfg.security = keys.config(&["k1"], Some(Verify::Required));
    let (reg, runs) = recording("sec.*");
    let app = spawn_worker(cfg, reg).await;
    let publisher = sealing_publisher(&app, keys.seal(Some("k1"), Some("e1"))).await;
    let task = Task::new("sec.pii", &json!({"name": "Grace Hopper"}));
    publisher
        .publish_task(&app.topo, &task, Duration::ZERO)
        .await
        .unwrap();
    let dead = app.take_dead(1).await;
    assert_eq!(
        header(&dead[0], headers::DEAD_KIND).as_deref(),
        Some("undecryptable")
    );
    let reason = header(&dead[0], headers::DEAD_REASON).unwrap();
    assert!(reason.contains("key `e1`"), "{reason}");
    assert!(!String::from_utf8_lossy(&dead[0].data).contains("Hopper"));
    assert_eq!(
        app.counter(
            "warren_consumer_refused_total",
            &[("kind", "undecryptable")]
        ),
        1.0
    );
    assert!(runs.of(&task.id).is_empty());
    app.stop().await;
}

/// Rotation: the fleet accepts k1 and k2; publishers move from k1 to k2
/// (a restart with a new `sign_with`); every task runs, none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_without_a_refused_task() {
    let keys = Keys::new();
    let mut cfg = config("sig_rotate");
    cfg.security = keys.config(&["k1", "k2"], Some(Verify::Required));
    let (reg, runs) = recording("sec.*");
    let app = spawn_worker(cfg, reg).await;
    let old = sealing_publisher(&app, keys.seal(Some("k1"), None)).await;
    let new = sealing_publisher(&app, keys.seal(Some("k2"), None)).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        // Both generations publish while the switch rolls through.
        let p = if i < 10 { &old } else { &new };
        let t = Task::new("sec.run", &json!({ "i": i }));
        p.publish_task(&app.topo, &t, Duration::ZERO).await.unwrap();
        ids.push(t.id);
    }
    runs.wait_total(20).await;
    assert!(ids.iter().all(|id| runs.of(id).len() == 1));
    assert_eq!(app.counter("warren_consumer_refused_total", &[]), 0.0);
    app.stop().await;
}

/// The Python publisher of the README, taken from the page itself.
fn python_example() -> String {
    let doc = include_str!("../../../README.md");
    let start = doc
        .find("<!-- signed-publisher:start -->")
        .expect("marker in README.md");
    let block = &doc[start..];
    let code = block.split("```python\n").nth(1).expect("python block");
    code.split("```").next().unwrap().to_owned()
}

fn python_with_pika() -> Option<&'static str> {
    ["python3", "/usr/bin/python3"].into_iter().find(|py| {
        std::process::Command::new(py)
            .args(["-c", "import pika"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_pika_publisher_is_accepted_under_required() {
    let python =
        python_with_pika().expect("python3 with pika (deploy/test.sh installs python3-pika)");
    let keys = Keys::new();
    let mut cfg = config("sig_pika");
    cfg.security = keys.config(&["k1"], Some(Verify::Required));
    let (reg, runs) = recording("report.daily");
    let app = spawn_worker(cfg.clone(), reg).await;
    let script = keys.dir.path().join("publish.py");
    std::fs::write(&script, python_example()).unwrap();
    let out = std::process::Command::new(python)
        .arg(&script)
        .env("AMQP_URL", cfg.amqp.url_list())
        .env("WARREN_EXCHANGE", app.topo.tasks_exchange())
        .env("WARREN_KEY_FILE", keys.path("k1"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!id.is_empty(), "the example prints the task id");
    runs.wait_total(1).await;
    assert_eq!(runs.of(&id).len(), 1, "ran the task the example published");
    assert_eq!(app.counter("warren_consumer_refused_total", &[]), 0.0);
    app.stop().await;
}

/// The binary end to end: `[security]` from its TOML file, an encrypted
/// task decrypted for an exec handler (which writes its stdin to a file),
/// no secret or plaintext in its logs; `check` refuses a missing key file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_decrypts_for_an_exec_handler_and_refuses_a_missing_key_file() {
    let keys = Keys::new();
    let out = keys.dir.path().join("stdin.json");
    let script = format!("cat > {0}.tmp && mv {0}.tmp {0}", out.display());
    let security = format!(
        "[security]\nverify = \"required\"\n\
         [[security.keys]]\nid = \"k1\"\nsecret_file = {k1:?}\n\
         [[security.keys]]\nid = \"e1\"\nkind = \"encrypt\"\nsecret_file = {e1:?}\n",
        k1 = keys.path("k1").display().to_string(),
        e1 = keys.path("e1").display().to_string(),
    );
    let toml = format!(
        "{security}[handlers.\"sec.exec\"]\nkind = \"exec\"\nargv = [\"/bin/sh\", \"-c\", {script:?}]\n"
    );
    let cfg = config("enc_exec");
    let p = spawn_process(&cfg, &toml);
    p.wait_log("consuming", 1).await;
    let conn = warren::amqp::connect(&cfg.amqp, "test-client")
        .await
        .unwrap();
    let topo = warren::Topology::new(&cfg.topology);
    let publisher = Publisher::new(&conn, Duration::from_secs(10))
        .await
        .unwrap()
        .sealed(Some(keys.seal(Some("k1"), Some("e1"))));
    let payload = r#"{"patient":"Marie Curie"}"#;
    let task = Task::from_raw("sec.exec", payload.as_bytes().to_vec());
    publisher
        .publish_task(&topo, &task, Duration::ZERO)
        .await
        .unwrap();
    let got = eventually(WAIT, "the exec handler's stdin", || {
        let out = out.clone();
        async move { std::fs::read_to_string(out).ok() }
    })
    .await;
    assert_eq!(got, payload, "the handler sees the plaintext");
    let logs = p.lines().join("\n");
    assert!(!logs.contains("Curie"), "payload in logs: {logs}");
    assert!(
        !logs.contains("k1-secret") && !logs.contains("5a5a5a"),
        "secret in logs"
    );
    drop(p);
    warren::testing::delete_topology(&conn, &topo).await;
    let _ = conn.close(200, "test done".into()).await;

    let bad = keys.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        security.replace(&keys.path("e1").display().to_string(), "/nonexistent/e1"),
    )
    .unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_warren-consumer"))
        .arg("--config")
        .arg(&bad)
        .arg("check")
        .env_remove("WARREN_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{err}");
    assert!(
        err.contains("security.keys[1].secret_file = \"/nonexistent/e1\": cannot read"),
        "{err}"
    );
}

/// An oversized delivery is poison before it is hashed or decrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_delivery_is_rejected_before_any_signature_work() {
    let keys = Keys::new();
    let mut cfg = config("sig_oversized");
    cfg.security = keys.config(&["k1"], Some(Verify::Required));
    cfg.worker.max_body_bytes = 64;
    let (reg, runs) = recording("sec.*");
    let app = spawn_worker(cfg, reg).await;
    let big = Task::new("sec.run", &json!({ "pad": "x".repeat(100) }));
    app.publish(&big).await;
    let dead = app.take_dead(1).await;
    assert_eq!(
        header(&dead[0], headers::DEAD_KIND).as_deref(),
        Some("oversized")
    );
    assert_eq!(app.counter("warren_consumer_refused_total", &[]), 0.0);
    assert_eq!(runs.total(), 0);
    app.stop().await;
}
