//! `security.*` on the producer: every publish path (CLI, API, schedules)
//! signs and encrypts; rotation is a restart with another `sign_with`;
//! broken key config exits 2 naming the key, never showing a secret.

use std::time::Duration;

use lapin::message::Delivery;
use warren::security::{Opener, SecurityConfig, Verify};

use crate::helpers::{World, PUBLISH_TOKEN};

const K1: &str = "k1-secret-0123456789abcdef0123456789abcdef";
const K2: &str = "k2-secret-0123456789abcdef0123456789abcdef";

/// Key files and the `[security]` section naming them.
pub fn keys(w: &World, sign_with: &str, encrypt: bool) -> String {
    let k1 = w.write_config("k1.key", &format!("{K1}\n"));
    let k2 = w.write_config("k2.key", K2);
    let e1 = w.write_config("e1.key", &"3c".repeat(32));
    format!(
        r#"
[security]
sign_with = "{sign_with}"
{encrypt}
[[security.keys]]
id = "k1"
secret_file = "{}"
[[security.keys]]
id = "k2"
secret_file = "{}"
[[security.keys]]
id = "e1"
kind = "encrypt"
secret_file = "{}"
"#,
        k1.display(),
        k2.display(),
        e1.display(),
        encrypt = if encrypt { "encrypt_with = \"e1\"" } else { "" },
    )
}

/// What a consumer with every key and `verify = required` makes of `d`:
/// the plaintext payload and the signing key id.
fn open(w: &World, d: &Delivery) -> (Vec<u8>, String) {
    let cfg: SecurityConfig = toml::from_str(
        keys(w, "k1", false)
            .replace("[security]", "")
            .replace("[[security.keys]]", "[[keys]]")
            .as_str(),
    )
    .unwrap();
    let opener = Opener::new(cfg.keyring().unwrap(), Verify::Required);
    let plain = opener
        .open(d.routing_key.as_str(), &d.properties, &d.data)
        .unwrap_or_else(|e| panic!("refused: {e}"))
        .unwrap_or_else(|| d.data.clone());
    let sig = warren::envelope::header_str(
        d.properties.headers().as_ref().unwrap(),
        warren::envelope::headers::SIGNATURE,
    )
    .unwrap();
    (plain, sig.split(':').nth(1).unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_api_and_schedules_publish_signed_encrypted_tasks() {
    let w = World::new("sec_paths").await;
    let cfg = w.write_config(
        "producer.toml",
        &format!(
            "{}\n[[schedules]]\nname = \"tick\"\ncron = \"@every 1s\"\ntask = \"it.tick\"\npayload = {{ secret = \"tick-plaintext\" }}\n",
            keys(&w, "k1", true)
        ),
    );
    let path = cfg.display().to_string();
    let out = w.cli(
        &[
            "--config",
            &path,
            "publish",
            "it.cli",
            "--payload",
            r#"{"secret":"cli-plaintext"}"#,
        ],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = warren::testing::take(&w.conn, &w.work_queue(), 1, Duration::from_secs(10)).await;
    assert!(!String::from_utf8_lossy(&d[0].data).contains("plaintext"));
    assert_eq!(
        d[0].properties
            .content_encoding()
            .as_ref()
            .map(|s| s.as_str()),
        Some("warren-aes256gcm;k=e1")
    );
    let (plain, key) = open(&w, &d[0]);
    assert_eq!(plain, br#"{"secret":"cli-plaintext"}"#);
    assert_eq!(key, "k1");

    let p = w.start("sec", &cfg, &[]);
    p.wait_ready(Duration::from_secs(20)).await;
    let resp = reqwest::Client::new()
        .post(p.url("/v1/tasks"))
        .bearer_auth(PUBLISH_TOKEN)
        .body(r#"{"task":"it.api","payload":{"secret":"api-plaintext"}}"#)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    // The API task and at least one tick, whichever comes first.
    let got = warren::testing::take(&w.conn, &w.work_queue(), 2, Duration::from_secs(20)).await;
    let mut seen = Vec::new();
    for d in &got {
        assert!(!String::from_utf8_lossy(&d.data).contains("plaintext"));
        let (plain, key) = open(&w, d);
        assert_eq!(key, "k1");
        let v: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        seen.push(v["secret"].as_str().unwrap().to_owned());
    }
    assert!(seen.contains(&"api-plaintext".to_owned()), "{seen:?}");
    assert!(seen.contains(&"tick-plaintext".to_owned()), "{seen:?}");
    let logs = p.logs();
    assert!(
        !logs.contains("k1-secret") && !logs.contains("3c3c3c"),
        "{logs}"
    );
}

/// Rotation on the publishing side: the same producer config, restarted
/// with `sign_with = "k2"`, signs with k2; a consumer holding both keys
/// accepts both generations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_another_sign_with_rotates_the_key() {
    let w = World::new("sec_rotate").await;
    for (gen, key) in [("old", "k1"), ("new", "k2")] {
        let cfg = w.write_config(&format!("{gen}.toml"), &keys(&w, key, false));
        let out = w.cli(
            &[
                "--config",
                &cfg.display().to_string(),
                "publish",
                "it.rot",
                "--payload",
                "{}",
            ],
            b"",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let d = warren::testing::take(&w.conn, &w.work_queue(), 1, Duration::from_secs(10)).await;
        let (plain, signed_with) = open(&w, &d[0]);
        assert_eq!(plain, b"{}");
        assert_eq!(signed_with, key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_key_config_exits_2_naming_the_key() {
    let w = World::new("sec_bad").await;
    let short = w.write_config("short.key", "short-s3cret");
    for (toml, names) in [
        (
            keys(&w, "k7", false),
            "security.sign_with = \"k7\": no key with this id",
        ),
        (
            "[[security.keys]]\nid = \"k1\"\nsecret_file = \"/nonexistent/k1.key\"\n".to_owned(),
            "security.keys[0].secret_file = \"/nonexistent/k1.key\": cannot read",
        ),
        (
            format!(
                "[[security.keys]]\nid = \"k1\"\nsecret_file = \"{}\"\n",
                short.display()
            ),
            "at least 32 bytes",
        ),
        (
            "[[security.keys]]\nid = \"k1\"\nsecret_env = \"WARREN_TEST_NO_SUCH_VAR\"\n".to_owned(),
            "security.keys[0].secret_env = \"WARREN_TEST_NO_SUCH_VAR\"",
        ),
    ] {
        let cfg = w.write_config("bad.toml", &toml);
        let path = cfg.display().to_string();
        for args in [
            &["--config", &path, "publish", "it.x", "--payload", "{}"][..],
            &["--config", &path, "schedules", "check"][..],
        ] {
            let out = w.cli(args, b"");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert!(err.contains(names), "{args:?}: {err}");
            assert!(
                !err.contains("s3cret") && !err.contains("k1-secret"),
                "{err}"
            );
        }
    }
}

/// Rotation by SIGHUP: a running producer moves its ticks from k1 to k2
/// without a restart; every tick verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_switches_the_signing_key() {
    let w = World::new("sec_hup").await;
    let schedule = "[[schedules]]\nname = \"tick\"\ncron = \"@every 1s\"\ntask = \"it.tick\"\n";
    let cfg = w.write_config("p.toml", &format!("{}{schedule}", keys(&w, "k1", false)));
    let p = w.start("hup", &cfg, &[]);
    let first = warren::testing::take(&w.conn, &w.work_queue(), 1, Duration::from_secs(20)).await;
    assert_eq!(open(&w, &first[0]).1, "k1");
    std::fs::write(&cfg, format!("{}{schedule}", keys(&w, "k2", false))).unwrap();
    p.signal("HUP");
    warren::testing::eventually(Duration::from_secs(30), "a tick signed with k2", || async {
        let d = warren::testing::take(&w.conn, &w.work_queue(), 1, Duration::from_secs(10)).await;
        let (_, key) = open(&w, &d[0]);
        (key == "k2").then_some(())
    })
    .await;
    assert!(p.logs().contains("security keys reloaded"), "{}", p.logs());
    assert!(!p.logs().contains("restart to apply"), "{}", p.logs());
}

/// An operator's edit of a dead task gets the producer's signature (and
/// encryption): a consumer under `verify = required` accepts the copy. The
/// old signature cannot cover the new body, so without this the edit would
/// be dead-lettered again as `bad_signature`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_dead_letter_replay_is_signed_and_sealed() {
    use lapin::options::BasicPublishOptions;
    let w = World::new("sec_edit").await;
    let cfg = w.write_config("producer.toml", &keys(&w, "k1", true));
    let task = warren::Task::new("it.edited", &serde_json::json!({"v": 1}));
    let ch = w.conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        w.topo.dead_queue().as_str().into(),
        BasicPublishOptions::default(),
        &task.payload,
        task.properties(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let p = w.start("sec-edit", &cfg, &[]);
    p.wait_ready(Duration::from_secs(20)).await;
    let resp = reqwest::Client::new()
        .post(p.url(&format!("/v1/dead/messages/{}/replay", task.id)))
        .bearer_auth(PUBLISH_TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"payload":{"v":2,"secret":"edited-plaintext"}}"#)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let got = warren::testing::take(&w.conn, &w.work_queue(), 1, Duration::from_secs(10)).await;
    assert!(!String::from_utf8_lossy(&got[0].data).contains("plaintext"));
    let (plain, key) = open(&w, &got[0]);
    assert_eq!(key, "k1");
    let v: serde_json::Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(v["secret"], "edited-plaintext");
}
