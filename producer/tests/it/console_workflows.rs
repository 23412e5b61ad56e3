//! The console's workflow pages over plain HTTP, against a real broker and
//! an in-process worker: a run started from the form, its failure shown
//! (escaped) with a Resume button, the resume guarded by CSRF and scope,
//! and the run finishing once the failing handler is fixed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren::testing::eventually;
use warren::Task;
use warren_consumer::{Registry, TaskError};

use crate::console::{between, form, get, post, sign_in};
use crate::helpers::{Producer, World, PUBLISH_TOKEN, READ_TOKEN};

const WAIT: Duration = Duration::from_secs(60);

const SHIP: &str = r#"
[[workflows]]
name = "ship"
[[workflows.steps]]
name = "pack"
task = "it.wf.pack"
[[workflows.steps]]
name = "mail"
task = "it.wf.mail"
after = ["pack"]
max_attempts = 1
"#;

/// A worker whose `pack` step returns markup as its result and whose
/// `mail` step fails permanently (with markup in its error) while `broken`.
async fn worker(
    w: &World,
    broken: Arc<AtomicBool>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut cfg = warren_consumer::ConsumerConfig {
        amqp: warren::testing::amqp_config(),
        ..Default::default()
    };
    cfg.amqp.url = Some(warren::config::Secret::new(w.url.as_str()));
    cfg.topology.prefix = w.prefix.clone();
    cfg.http.addr = "127.0.0.1:0".parse().unwrap();
    let mut reg = Registry::new();
    reg.register_fn("it.wf.pack", |_t: Task| async {
        warren_consumer::set_result(json!({"label": "<script>alert('result')</script>"}));
        Ok(())
    })
    .unwrap();
    reg.register_fn("it.wf.mail", move |_t: Task| {
        let broken = broken.load(Ordering::SeqCst);
        async move {
            if broken {
                return Err(TaskError::permanent(
                    "<script>alert('error')</script> mail refused",
                ));
            }
            Ok(())
        }
    })
    .unwrap();
    let worker = warren_consumer::Worker::builder(cfg)
        .registry(reg)
        .build()
        .unwrap();
    let health = worker.health();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let running = tokio::spawn(async move {
        let _ = worker.run(s).await;
    });
    eventually(WAIT, "worker ready", || async {
        health.is_ready().then_some(())
    })
    .await;
    (stop, running)
}

const RUN: &str = "/ui/workflows/run?workflow=ship&id=c1";

/// The run page once its state is `state`.
async fn run_page(p: &Producer, cookie: &str, state: &str) -> String {
    let want = format!(r#"data-run-state="{state}""#);
    eventually(WAIT, &format!("run c1 {state} on its page"), || async {
        let (status, page) = get(p, cookie, RUN).await;
        (status == 200 && page.contains(&want)).then_some(page)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_workflow_run_started_failed_shown_and_resumed() {
    let w = World::new("ui-workflow").await;
    let broken = Arc::new(AtomicBool::new(true));
    let (stop, running) = worker(&w, broken.clone()).await;
    let cfg = w.write_config("p.toml", SHIP);
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let s = sign_in(&p, PUBLISH_TOKEN).await;
    let r = sign_in(&p, READ_TOKEN).await;

    let (status, list) = get(&p, &s.cookie, "/ui/workflows").await;
    assert_eq!(status, 200);
    assert!(
        list.contains(r#"href="/ui/workflows""#),
        "a navigation entry"
    );
    assert!(
        list.contains(r#"data-workflow="ship""#) && list.contains("Start run"),
        "{list}"
    );

    // Bad JSON: the form again, with what was typed (escaped) and why.
    let evil = r#"{"x": "</textarea><script>alert(1)</script>""#;
    let start = |csrf: &str, input: &str| {
        form(&[
            ("csrf", csrf),
            ("workflow", "ship"),
            ("input", input),
            ("id", "c1"),
        ])
    };
    let resp = post(&p, &s.cookie, "/ui/workflows/start", &start(&s.csrf, evil)).await;
    assert_eq!(resp.status().as_u16(), 422);
    let page = resp.text().await.unwrap_or_default();
    assert!(page.contains("Input, line 1"), "{page}");
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    // No CSRF token, or a read token: refused, nothing started.
    let input = r#"{"order": "<script>alert('input')</script>"}"#;
    let resp = post(&p, &s.cookie, "/ui/workflows/start", &start("", input)).await;
    assert_eq!(resp.status().as_u16(), 403);
    let resp = post(&p, &r.cookie, "/ui/workflows/start", &start(&r.csrf, input)).await;
    assert_eq!(resp.status().as_u16(), 403);

    let resp = post(&p, &s.cookie, "/ui/workflows/start", &start(&s.csrf, input)).await;
    assert_eq!(resp.status().as_u16(), 303);
    let to = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(to.starts_with(RUN), "{to}");

    // Failed: the failing step, its error and the pack result, escaped.
    let page = run_page(&p, &s.cookie, "failed").await;
    assert!(!page.contains("<script>alert"), "{page}");
    for shown in [
        "&lt;script&gt;alert('error')&lt;/script&gt; mail refused",
        "&lt;script&gt;alert('result')&lt;/script&gt;",
        "&lt;script&gt;alert('input')&lt;/script&gt;",
        r#"data-step="mail" data-state="failed""#,
        r#"data-step="pack" data-state="succeeded""#,
        "c1:pack",
        r#"action="/ui/workflows/resume""#,
    ] {
        assert!(page.contains(shown), "{shown} in {page}");
    }
    let failed = between(&page, r#"<td class="failure">"#, "</td>").unwrap_or_default();
    assert!(
        failed.contains("mail") && failed.contains("permanent"),
        "{failed}"
    );
    let (status, _) = get(&p, &s.cookie, "/ui/workflows/run?workflow=ship&id=nope").await;
    assert_eq!(status, 404, "an unknown run");
    let (_, list) = get(&p, &s.cookie, "/ui/workflows").await;
    let row = between(&list, r#"data-run="c1""#, "</tr>").unwrap_or_default();
    assert!(
        row.contains(r#"data-state="failed""#) && row.contains("<code>mail</code>"),
        "{row}"
    );

    // Resume: the read session sees the button disabled and is refused; a
    // missing or wrong CSRF token is refused.
    let (_, read_page) = get(&p, &r.cookie, RUN).await;
    let button =
        between(&read_page, r#"action="/ui/workflows/resume""#, "</form>").unwrap_or_default();
    assert!(
        button.contains("disabled") && button.contains("needs the publish scope"),
        "{button}"
    );
    let resume = |csrf: &str| form(&[("csrf", csrf), ("workflow", "ship"), ("id", "c1")]);
    for (who, body) in [
        (&r, resume(&r.csrf)),
        (&s, resume("")),
        (&s, resume("0000")),
        (&s, resume(&r.csrf)),
    ] {
        let resp = post(&p, &who.cookie, "/ui/workflows/resume", &body).await;
        assert_eq!(resp.status().as_u16(), 403, "{body}");
    }
    let (_, page) = get(&p, &s.cookie, RUN).await;
    assert!(
        page.contains(r#"data-run-state="failed""#),
        "still failed: {page}"
    );

    // Fixed, then resumed from the console: the run finishes.
    broken.store(false, Ordering::SeqCst);
    let resp = post(&p, &s.cookie, "/ui/workflows/resume", &resume(&s.csrf)).await;
    assert_eq!(resp.status().as_u16(), 303);
    let to = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (_, resumed) = get(&p, &s.cookie, &to).await;
    assert!(
        resumed.contains("Resumed run <code>c1</code>"),
        "{to}: {resumed}"
    );
    let page = run_page(&p, &s.cookie, "succeeded").await;
    assert!(
        page.contains("c1:mail:g1"),
        "the resumed step's task: {page}"
    );
    assert!(
        !page.contains(r#"action="/ui/workflows/resume""#),
        "no Resume once succeeded"
    );
    let logs = p.logs();
    assert!(
        logs.lines().any(|l| l.contains("audit")
            && l.contains("publish_token")
            && l.contains("workflow_resume")),
        "the audit line"
    );
    assert!(
        !logs.contains("alert('input')"),
        "no payload byte in the log"
    );

    stop.cancel();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("worker stops")
        .expect("worker task");
}
