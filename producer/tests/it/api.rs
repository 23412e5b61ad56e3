//! The HTTP API in process: an [`App`] built from a config in code (no
//! binary, no config file), served on `127.0.0.1:0`, called with reqwest.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use warren::config::Secret;
use warren_producer::config::ProducerConfig;
use warren_producer::App;

use crate::helpers::{World, PUBLISH_TOKEN, READ_TOKEN};

const SCHEDULES: &str = r#"
[[schedules]]
name = "hourly-report"
cron = "0 * * * *"
timezone = "Europe/Berlin"
task = "it.report"
payload = { kind = "hourly" }
"#;

/// A config for `w`'s broker and prefix, the test tokens, a small body limit.
fn config(w: &World) -> ProducerConfig {
    let mut cfg: ProducerConfig = toml::from_str(SCHEDULES).unwrap();
    cfg.http.addr = "127.0.0.1:0".parse().unwrap();
    cfg.amqp = warren::testing::amqp_config();
    cfg.amqp.url = Some(Secret::new(w.url.as_str()));
    cfg.topology.prefix = w.prefix.clone();
    cfg.api.publish_token = Some(Secret::new(PUBLISH_TOKEN));
    cfg.api.read_token = Some(Secret::new(READ_TOKEN));
    cfg.api.max_body_bytes = 4096;
    cfg.api.max_batch = 3;
    cfg
}

/// A running app; `stop` shuts it down and returns what `run` returned.
struct Running {
    base: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(cfg: ProducerConfig) -> Running {
        let app = App::build(cfg).await.expect("App::build");
        let addr = app.addr();
        assert_ne!(addr.port(), 0, "the bound port, not the configured 0");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        let running = Running {
            base: format!("http://{addr}"),
            shutdown,
            task,
        };
        let ready = running.url("/readyz");
        warren::testing::eventually(Duration::from_secs(20), "/readyz", || async {
            let r = reqwest::get(ready.as_str()).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        running
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .request(method, self.url(path))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.body(b.to_vec());
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let json =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body, got {text:?}"));
        (status, json)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("run returns after shutdown")
            .expect("run task")
    }
}

/// The status and error code of a response, to compare in one assert.
fn code(r: &(u16, Value)) -> (u16, Option<&str>) {
    (r.0, r.1["error"].as_str())
}

/// Every refusal of `/v1` (401 missing / unknown / not-bearer, 403 scope,
/// 400 not JSON, 413 body and batch, 422 invalid task, 404 schedule) and
/// every success (202 task and batch, 200 schedules, 202 trigger), against
/// an app built in this process; nothing refused reaches the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refusals_and_successes_in_process() {
    let w = World::new("api_inproc").await;
    let rx = w.collect().await;
    let app = Running::start(config(&w)).await;
    let one: &[u8] = br#"{"task":"it.api","payload":{"x":1},"id":"api-1"}"#;
    let tasks = "/v1/tasks";

    // 401, with `WWW-Authenticate: Bearer`.
    let r = app.call(Method::POST, tasks, None, Some(one)).await;
    assert_eq!(code(&r), (401, Some("unauthorized")), "{}", r.1);
    let resp = reqwest::Client::new()
        .post(app.url(tasks))
        .header("authorization", format!("Basic {PUBLISH_TOKEN}"))
        .body(one.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        resp.headers().get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    let wrong = "wrong-token-wrong-token";
    let r = app.call(Method::POST, tasks, Some(wrong), Some(one)).await;
    assert_eq!(code(&r), (401, Some("unauthorized")), "{}", r.1);
    assert_eq!(r.1["message"], "unknown token");
    // 403: a read-only token may not publish or trigger.
    let r = app
        .call(Method::POST, tasks, Some(READ_TOKEN), Some(one))
        .await;
    assert_eq!(code(&r), (403, Some("forbidden")), "{}", r.1);
    assert_eq!(r.1["message"], "this token lacks the `publish` scope");
    let trigger = "/v1/schedules/hourly-report/trigger";
    let r = app
        .call(Method::POST, trigger, Some(READ_TOKEN), None)
        .await;
    assert_eq!(code(&r), (403, Some("forbidden")), "{}", r.1);
    // Authorization comes before the body: no token and too big is 401.
    let big = format!(r#"{{"task":"it.big","payload":"{}"}}"#, "x".repeat(8192));
    let r = app
        .call(Method::POST, tasks, None, Some(big.as_bytes()))
        .await;
    assert_eq!(code(&r), (401, Some("unauthorized")), "{}", r.1);

    let publish = Some(PUBLISH_TOKEN);
    // 400: not JSON, with the line and column.
    let r = app
        .call(Method::POST, tasks, publish, Some(b"{not json"))
        .await;
    assert_eq!(code(&r), (400, Some("bad_json")), "{}", r.1);
    assert!(
        r.1["message"]
            .as_str()
            .unwrap()
            .starts_with("body, line 1: "),
        "{}",
        r.1
    );
    // 413: over api.max_body_bytes, and over api.max_batch.
    let r = app
        .call(Method::POST, tasks, publish, Some(big.as_bytes()))
        .await;
    assert_eq!(code(&r), (413, Some("payload_too_large")), "{}", r.1);
    let four: &[u8] = br#"[{"task":"a"},{"task":"a"},{"task":"a"},{"task":"a"}]"#;
    let r = app.call(Method::POST, tasks, publish, Some(four)).await;
    assert_eq!(code(&r), (413, Some("batch_too_large")), "{}", r.1);
    // 422: JSON but no task; the words of `RequestError`, indexed in a batch.
    let r = app
        .call(Method::POST, tasks, publish, Some(br#"{"payload":{}}"#))
        .await;
    assert_eq!(code(&r), (422, Some("invalid_task")), "{}", r.1);
    assert_eq!(r.1["message"], "missing field `task`");
    let r = app
        .call(Method::POST, tasks, publish, Some(br#"{"task":"a.#"}"#))
        .await;
    assert_eq!(r.1["message"], "`task` may not contain `*` or `#`");
    let bad_second: &[u8] = br#"[{"task":"a"},{"task":""}]"#;
    let r = app
        .call(Method::POST, tasks, publish, Some(bad_second))
        .await;
    assert_eq!(code(&r), (422, Some("invalid_task")), "{}", r.1);
    assert_eq!(r.1["message"], "task [1]: `task` is empty");
    let r = app.call(Method::POST, tasks, publish, Some(b"[]")).await;
    assert_eq!(code(&r), (422, Some("invalid_task")), "{}", r.1);
    let r = app.call(Method::POST, tasks, publish, Some(b"7")).await;
    assert_eq!(code(&r), (422, Some("invalid_task")), "{}", r.1);
    // 404: no such schedule.
    let r = app
        .call(Method::POST, "/v1/schedules/nope/trigger", publish, None)
        .await;
    assert_eq!(code(&r), (404, Some("not_found")), "{}", r.1);
    assert!(rx.all().is_empty(), "nothing published by refused requests");

    // 202: one task, then a batch, each confirmed before the answer.
    let r = app.call(Method::POST, tasks, publish, Some(one)).await;
    assert_eq!(r.0, 202, "{}", r.1);
    assert_eq!(r.1["ids"], json!(["api-1"]));
    let batch: &[u8] =
        br#"[{"task":"it.api","payload":1},{"task":"it.api","delay":"1s"},{"name":"it.api"}]"#;
    let r = app.call(Method::POST, tasks, publish, Some(batch)).await;
    assert_eq!(r.0, 202, "{}", r.1);
    assert_eq!(r.1["ids"].as_array().map(Vec::len), Some(3), "{}", r.1);
    let got = rx
        .wait_for(Duration::from_secs(10), "4 published tasks", |m| {
            m.len() >= 4
        })
        .await;
    let first = got.iter().find(|m| m.id == "api-1").expect("api-1");
    assert_eq!(first.body, br#"{"x":1}"#);

    // 200: schedules with the read scope (the publish token holds it too).
    for token in [READ_TOKEN, PUBLISH_TOKEN] {
        let r = app
            .call(Method::GET, "/v1/schedules", Some(token), None)
            .await;
        assert_eq!(r.0, 200, "{}", r.1);
        let s = &r.1["schedules"][0];
        assert_eq!(s["name"], "hourly-report");
        assert_eq!(s["timezone"], "Europe/Berlin");
        assert!(
            s["next_fire"].as_str().unwrap().ends_with(":00:00Z"),
            "{}",
            r.1
        );
        assert!(r.1["leader"].is_boolean());
    }
    let r = app.call(Method::GET, "/v1/schedules", None, None).await;
    assert_eq!(r.0, 401);

    // 202: a manual trigger, with an id of its own.
    let r = app.call(Method::POST, trigger, publish, None).await;
    assert_eq!(r.0, 202, "{}", r.1);
    let id = r.1["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("hourly-report@manual-"), "{id}");
    let got = rx
        .wait_for(Duration::from_secs(10), "the triggered task", |m| {
            m.iter().any(|m| m.id == id)
        })
        .await;
    let m = got.iter().find(|m| m.id == id).unwrap();
    assert_eq!(m.schedule.as_deref(), Some("hourly-report"));
    assert_eq!(m.body, br#"{"kind":"hourly"}"#);

    app.stop().await.expect("a clean shutdown is Ok");
}

/// `App::build` refuses what `run` could not work with, as a `ConfigError`
/// (exit 2 in the binary), before it binds or connects anything.
#[tokio::test]
async fn build_refuses_an_invalid_config() {
    let mut cfg = ProducerConfig::default();
    cfg.http.addr = "127.0.0.1:0".parse().unwrap();
    cfg.api.publish_token = Some(Secret::new("short"));
    cfg.schedules =
        toml::from_str::<ProducerConfig>("[[schedules]]\nname='a'\ncron='0 2 * *'\ntask='t'\n")
            .unwrap()
            .schedules;
    let Err(e) = App::build(cfg).await else {
        panic!("an invalid config was accepted");
    };
    assert!(
        e.downcast_ref::<warren::config::ConfigError>().is_some(),
        "{e:#}"
    );
    let text = format!("{e:#}");
    assert!(text.contains("api.publish_token"), "{text}");
    assert!(text.contains("schedule `a`: cron"), "{text}");
}
