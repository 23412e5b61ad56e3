//! The console in a real headless Chromium against a running producer and
//! consumer (the built binaries) on the test broker. Each scenario leaves a
//! screenshot of the pages it saw in `target/console-screenshots/`.

mod driver;

use std::process::Command;
use std::time::Duration;

use warren::testing::Process;

use crate::helpers::{free_port, Producer, World, PUBLISH_TOKEN, READ_TOKEN};
use driver::Browser;

const WAIT: Duration = Duration::from_secs(20);

/// The consumer's handlers: `it.ok` and the schedules' tasks succeed;
/// `it.check` succeeds only for a payload with `"ok": true` and fails
/// permanently otherwise; any other name has no handler.
const CONSUMER: &str = r#"
[handlers."it.ok"]
kind = "noop"
[handlers."it.hourly"]
kind = "noop"
[handlers."it.often"]
kind = "noop"
[handlers."it.tick"]
kind = "noop"
[handlers."it.check"]
kind = "exec"
argv = ["grep", "-q", "\"ok\": *true"]
permanent_exit_codes = [1]
"#;

pub const PRODUCER: &str = r#"
[[schedules]]
name = "hourly"
cron = "0 * * * *"
timezone = "Europe/Berlin"
task = "it.hourly"
payload = { report = "<b>daily</b>" }

[[schedules]]
name = "often"
cron = "* * * * * *"
task = "it.often"
misfire = "skip"

# A witness that keeps firing while `often` is paused.
[[schedules]]
name = "tick"
cron = "* * * * * *"
task = "it.tick"
misfire = "skip"
"#;

pub fn binary(name: &str) -> String {
    let dir = std::path::Path::new(crate::helpers::BIN)
        .parent()
        .expect("target dir");
    dir.join(name).display().to_string()
}

/// `warren-consumer` on the world's topology, logging JSON at debug.
pub fn start_consumer(w: &World) -> Process {
    let cfg = w.write_config("consumer.toml", CONSUMER);
    let bin = binary("warren-consumer");
    let mut cmd = Command::new(&bin);
    cmd.arg("--config").arg(cfg).arg("run");
    for (k, v) in w.env() {
        if !k.starts_with("WARREN_API") && !k.starts_with("WARREN_LEADER") {
            cmd.env(k, v);
        }
    }
    cmd.env("WARREN_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("WARREN_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,warren_consumer=debug");
    Process::spawn(&mut cmd)
        .unwrap_or_else(|e| panic!("start {bin} (cargo build -p warren-consumer): {e}"))
}

/// Tasks named `name` that the consumer finished successfully.
pub fn succeeded(c: &Process, name: &str) -> usize {
    c.field_of("task succeeded", "task.name")
        .iter()
        .filter(|n| *n == name)
        .count()
}

pub async fn sign_in(b: &Browser, p: &Producer, token: &str) {
    b.goto(&p.url("/ui/")).await;
    b.wait_path("/ui/login").await;
    b.fill("#token", token).await;
    b.click("form.login button").await;
    b.wait_path("/ui/").await;
}

pub async fn sign_out(b: &Browser) {
    b.click("form.who button").await;
    b.wait_path("/ui/login").await;
}

/// Sign in, read the overview and the schedules, trigger one and see the
/// consumer run it, publish from the form (JSON checked as typed), then
/// come back with a read token and find every action refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_signs_in_triggers_and_publishes() {
    let w = World::new("ui-browser").await;
    let cfg = w.write_config("p.toml", PRODUCER);
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let consumer = start_consumer(&w);
    let b = Browser::start().await;

    b.goto(&p.url("/ui/schedules")).await;
    b.wait_path("/ui/login").await;
    b.shot("login").await;
    b.fill("#token", "a-wrong-token-0123456789").await;
    b.click("form.login button").await;
    b.wait_text("p.error", "Unknown token").await;
    sign_in(&b, &p, PUBLISH_TOKEN).await;

    // The overview names the work queue and counts its consumer; the
    // fragment refreshes in place.
    let queue = w.work_queue();
    let row = format!("tr[data-queue='{queue}']");
    b.wait_text(&row, &queue).await;
    b.wait_text(".card.producer", "leader").await;
    warren::testing::eventually(WAIT, "the consumer counted on the overview", || async {
        b.client.refresh().await.ok()?;
        let cells = b.text(&format!("{row} td:nth-child(3)")).await;
        (cells.trim() == "1").then_some(())
    })
    .await;
    b.shot("overview").await;

    b.click("nav a[href='/ui/schedules']").await;
    b.wait_path("/ui/schedules").await;
    let hourly = b.text("tr[data-schedule='hourly']").await;
    assert!(hourly.contains("0 * * * *"), "{hourly}");
    assert!(hourly.contains("Europe/Berlin"), "{hourly}");
    assert!(
        hourly.contains("CE"),
        "local time in the schedule's zone: {hourly}"
    );
    b.shot("schedules").await;

    // On a phone the page does not scroll sideways: wide tables scroll
    // inside their own box.
    b.client.set_window_size(390, 844).await.expect("resize");
    for page in ["/ui/", "/ui/schedules"] {
        b.goto(&p.url(page)).await;
        b.el("main h1").await;
        let wide = b
            .client
            .execute(
                "return document.documentElement.scrollWidth > window.innerWidth + 1;",
                vec![],
            )
            .await
            .expect("script");
        assert_eq!(
            wide,
            serde_json::Value::Bool(false),
            "{page} overflows a phone"
        );
    }
    b.shot("schedules-phone").await;
    b.client.set_window_size(1280, 900).await.expect("resize");

    b.click("tr[data-schedule='hourly'] form[action$='/trigger'] button")
        .await;
    b.wait_text("p.flash", "Triggered hourly").await;
    warren::testing::eventually(WAIT, "the consumer ran the triggered task", || async {
        (succeeded(&consumer, "it.hourly") == 1).then_some(())
    })
    .await;

    b.click("nav a[href='/ui/publish']").await;
    b.fill("#task", "it.ok").await;
    b.fill("#payload", "{\"to\": ").await;
    b.wait_text("p.json-error", "Not valid JSON").await;
    b.click("form.publish button").await;
    // The browser refuses to send an invalid form: still on the form.
    assert!(b
        .client
        .find(fantoccini::Locator::Css("p.flash"))
        .await
        .is_err());
    b.fill("#payload", "{\"to\": \"ada@example.com\"}").await;
    b.wait_text("p.json-error", "").await;
    b.shot("publish").await;
    b.click("form.publish button").await;
    b.wait_text("p.flash", "Published it.ok").await;
    warren::testing::eventually(WAIT, "the consumer ran the published task", || async {
        (succeeded(&consumer, "it.ok") == 1).then_some(())
    })
    .await;

    // A read token: the pages, but no action.
    sign_out(&b).await;
    sign_in(&b, &p, READ_TOKEN).await;
    b.goto(&p.url("/ui/schedules")).await;
    let button = b
        .el("tr[data-schedule='hourly'] form[action$='/trigger'] button")
        .await;
    assert!(!button.is_enabled().await.expect("enabled?"));
    b.goto(&p.url("/ui/publish")).await;
    assert!(!b
        .el("form.publish button")
        .await
        .is_enabled()
        .await
        .expect("enabled?"));
    b.close().await;
}

/// POST `/v1/tasks` with the publish token.
async fn publish_api(p: &Producer, body: &str) {
    let r = reqwest::Client::new()
        .post(p.url("/v1/tasks"))
        .bearer_auth(PUBLISH_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("POST /v1/tasks");
    assert_eq!(r.status().as_u16(), 202);
}

/// Tasks that die two ways show as two groups; one is edited and replayed
/// and then succeeds; the other group is purged after the confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_works_the_dead_letters() {
    let w = World::new("ui-browser-dead").await;
    let cfg = w.write_config("p.toml", "");
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let consumer = start_consumer(&w);
    let dead_q = w.topo.dead_queue();
    publish_api(
        &p,
        r#"[{"task": "it.check", "id": "check-1", "payload": {"ok": false, "note": "<i>x</i>"}},
            {"task": "it.check", "id": "check-2", "payload": {"ok": false}},
            {"task": "it.nohandler", "id": "lost-1"}]"#,
    )
    .await;
    warren::testing::eventually(WAIT, "three dead letters", || async {
        (w.queue_len(&dead_q).await == 3).then_some(())
    })
    .await;
    // (A fourth arrives while the overview is open, below.)

    let b = Browser::start().await;
    sign_in(&b, &p, crate::helpers::ADMIN_TOKEN).await;
    b.wait_text(".card.dead p.big", "3").await;
    b.wait_text("table.latest", "it.nohandler").await;
    b.shot("overview-failures").await;

    // The overview refreshes itself: one more dead letter shows up without
    // a reload (a marker set in the page survives).
    b.client
        .execute("window.__stay = 1;", vec![])
        .await
        .expect("script");
    publish_api(&p, r#"{"task": "it.nohandler", "id": "lost-2"}"#).await;
    b.wait_text(".card.dead p.big", "4").await;
    let stayed = b
        .client
        .execute("return window.__stay === 1;", vec![])
        .await
        .expect("script");
    assert_eq!(
        stayed,
        serde_json::Value::Bool(true),
        "the page was reloaded"
    );
    b.click("nav a[href='/ui/dead']").await;
    b.wait_path("/ui/dead").await;
    let check = b.text("tr.group[data-task='it.check']").await;
    assert!(check.contains("permanent"), "{check}");
    assert_eq!(b.text("tr.group[data-task='it.check'] td.count").await, "2");
    let lost = b.text("tr.group[data-task='it.nohandler']").await;
    assert!(lost.contains("no_handler"), "{lost}");
    let groups = b
        .client
        .find_all(fantoccini::Locator::Css("tr.group"))
        .await
        .expect("groups");
    assert_eq!(groups.len(), 2);
    b.shot("dead").await;

    // Drill down to the message and replay it with a payload that passes.
    b.click("tr.group[data-task='it.check'] td a").await;
    b.wait_path("/ui/dead/group").await;
    b.click("a[href='/ui/dead/message?id=check-1']").await;
    b.wait_path("/ui/dead/message").await;
    let payload = b.text("pre.payload").await;
    assert!(payload.contains("<i>x</i>"), "shown as text: {payload}");
    b.shot("dead-message").await;
    b.fill("#payload", "{\"ok\": true, \"edited\": 1").await;
    b.wait_text("p.json-error", "Not valid JSON").await;
    b.fill("#payload", "{\"ok\": true}").await;
    b.click("form.edit button").await;
    b.wait_text("p.flash", "Replayed check-1").await;
    warren::testing::eventually(WAIT, "the edited task succeeded", || async {
        (succeeded(&consumer, "it.check") == 1).then_some(())
    })
    .await;

    // Purge the other group, confirming first.
    b.goto(&p.url("/ui/dead")).await;
    b.click("tr.group[data-task='it.nohandler'] button.purge")
        .await;
    b.wait_text("p.notice", "Purge").await;
    b.click("form.confirm button").await;
    b.wait_text("p.flash", "Purged 2").await;
    assert_eq!(w.queue_len(&dead_q).await, 1, "check-2 is left");
    assert!(b
        .client
        .find(fantoccini::Locator::Css(
            "tr.group[data-task='it.nohandler']"
        ))
        .await
        .is_err());
    b.close().await;
}

/// Pause a schedule from the page: it stops firing (while another schedule
/// goes on ticking), says so, and fires again once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_pauses_and_resumes_a_schedule() {
    let w = World::new("ui-browser-pause").await;
    let cfg = w.write_config("p.toml", PRODUCER);
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let consumer = start_consumer(&w);
    warren::testing::eventually(WAIT, "`often` firing", || async {
        (succeeded(&consumer, "it.often") >= 1).then_some(())
    })
    .await;

    let b = Browser::start().await;
    sign_in(&b, &p, crate::helpers::ADMIN_TOKEN).await;
    b.goto(&p.url("/ui/schedules")).await;
    b.click("tr[data-schedule='often'] form[action$='/pause'] button")
        .await;
    b.wait_text("p.flash", "Paused often").await;
    assert_eq!(b.text("tr[data-schedule='often'] td.state").await, "paused");
    b.shot("schedules-paused").await;

    // A fire decided just before the pause may still arrive: take the
    // count once the witness has fired since, then watch three more ticks.
    let ticks = succeeded(&consumer, "it.tick");
    let wait_ticks = |n: usize| {
        let consumer = &consumer;
        async move {
            warren::testing::eventually(WAIT, "the witness schedule ticking", || async move {
                (succeeded(consumer, "it.tick") >= n).then_some(())
            })
            .await;
        }
    };
    wait_ticks(ticks + 1).await;
    let often = succeeded(&consumer, "it.often");
    wait_ticks(ticks + 4).await;
    assert_eq!(
        succeeded(&consumer, "it.often"),
        often,
        "a paused schedule fired"
    );

    b.click("tr[data-schedule='often'] form[action$='/resume'] button")
        .await;
    b.wait_text("p.flash", "Resumed often").await;
    warren::testing::eventually(WAIT, "`often` firing again", || async {
        (succeeded(&consumer, "it.often") > often).then_some(())
    })
    .await;
    b.close().await;
}
