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
    b.shots("login").await;
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
    b.shots("overview").await;

    b.click("nav a[href='/ui/schedules']").await;
    b.wait_path("/ui/schedules").await;
    let hourly = b.text("tr[data-schedule='hourly']").await;
    assert!(hourly.contains("0 * * * *"), "{hourly}");
    assert!(hourly.contains("Europe/Berlin"), "{hourly}");
    assert!(
        hourly.contains("CE"),
        "local time in the schedule's zone: {hourly}"
    );
    b.shots("schedules").await;

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
    b.shots("publish").await;
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
    b.shots("overview-failures").await;

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
    b.shots("dead").await;

    // Drill down to the message and replay it with a payload that passes.
    b.click("tr.group[data-task='it.check'] td a").await;
    b.wait_path("/ui/dead/group").await;
    b.click("a[href='/ui/dead/message?id=check-1']").await;
    b.wait_path("/ui/dead/message").await;
    let payload = b.text("pre.payload").await;
    assert!(payload.contains("<i>x</i>"), "shown as text: {payload}");
    b.shots("dead-message").await;
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

/// The Tasks page lists what ran (refreshed live), finds a task by id,
/// shows a dead task's timeline and links it both ways with the dead-letter
/// workbench; the Workers page lists the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_follows_tasks_and_workers() {
    let w = World::new("ui-browser-tasks").await;
    let cfg = w.write_config("p.toml", "");
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let consumer = start_consumer(&w);
    publish_api(
        &p,
        r#"[{"task": "it.ok", "id": "ok-1"},
            {"task": "it.check", "id": "bad-1", "payload": {"ok": false}}]"#,
    )
    .await;
    warren::testing::eventually(WAIT, "ok-1 ran", || async {
        (succeeded(&consumer, "it.ok") == 1).then_some(())
    })
    .await;

    let b = Browser::start().await;
    sign_in(&b, &p, READ_TOKEN).await;
    b.click("nav a[href='/ui/tasks']").await;
    b.wait_path("/ui/tasks").await;
    b.wait_text("tr[data-task='ok-1']", "succeeded").await;
    b.wait_text("tr[data-task='bad-1']", "dead").await;
    // Live: a task published while the page is open shows up unreloaded.
    b.client
        .execute("window.__stay = 1;", vec![])
        .await
        .expect("script");
    publish_api(&p, r#"{"task": "it.ok", "id": "ok-2"}"#).await;
    b.wait_text("tr[data-task='ok-2']", "succeeded").await;
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
    b.shots("tasks").await;

    // Search by id, then the timeline of the dead task.
    b.fill("input[name='id']", "bad-1").await;
    b.click("form.filters button").await;
    b.wait_path("/ui/tasks/task").await;
    let tl = b.wait_text("ol.timeline", "dead").await;
    assert!(tl.contains("published by api"), "{tl}");
    assert!(tl.contains("permanent"), "{tl}");
    b.shots("task-timeline").await;
    b.click("a[href='/ui/dead/message?id=bad-1']").await;
    b.wait_path("/ui/dead/message").await;
    b.click("a.timeline").await;
    b.wait_path("/ui/tasks/task").await;

    b.click("nav a[href='/ui/workers']").await;
    b.wait_path("/ui/workers").await;
    let row = b.wait_text("tr[data-worker]", "default").await;
    assert!(row.contains(&w.prefix), "{row}");
    b.shots("workers").await;
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
    b.shots("schedules-paused").await;

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

/// `n` dead letters as an operator meets them, in three groups (one in
/// three each): a Python traceback from an exec handler, an HTTP failure
/// after retries with a request id, and a usage error. Each carries a
/// `traceparent`, an AMQP timestamp and the publish instant in ms.
async fn fill_realistic(w: &World, n: usize) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    use warren::envelope::headers;

    let ch = w.conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let queue = w.topo.dead_queue();
    let now = chrono::Utc::now();
    for i in 0..n {
        let (task, kind, reason) = match i % 3 {
            0 => (
                "it.report",
                "permanent",
                format!(
                    "permanent error: /usr/bin/python3 exited with 1: Traceback (most recent call last):\n  \
                     File \"/srv/jobs/report.py\", line 88, in <module>\n    main()\n  \
                     File \"/srv/jobs/report.py\", line {}, in main\n    row = rows[customer]\n\
                     KeyError: 'c3e815'",
                    61 + i % 2
                ),
            ),
            1 => (
                "it.charge",
                "exhausted",
                format!(
                    "attempts exhausted (5 of 5): HTTP 503 from https://pay.example/v2/charge after {}ms (request {:016x})",
                    900 + i,
                    (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ),
            ),
            _ => (
                "it.mail",
                "permanent",
                "permanent error: /usr/bin/python3 exited with 2: usage: send.py [-h] --to TO\n\
                 send.py: error: the following arguments are required: --to"
                    .to_owned(),
            ),
        };
        let s = |v: String| AMQPValue::LongString(v.into());
        let at = now - chrono::TimeDelta::seconds((n - i) as i64);
        let mut h = FieldTable::default();
        h.insert(ShortString::from(headers::DEAD_KIND), s(kind.into()));
        h.insert(ShortString::from(headers::DEAD_REASON), s(reason.clone()));
        h.insert(ShortString::from(headers::LAST_ERROR), s(reason));
        h.insert(
            ShortString::from(headers::DEAD_AT),
            s(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
        h.insert(
            ShortString::from(headers::ATTEMPT),
            AMQPValue::LongLongInt(if kind == "exhausted" { 5 } else { 1 }),
        );
        h.insert(
            ShortString::from(headers::PUBLISHED_AT_MS),
            AMQPValue::LongLongInt(at.timestamp_millis() - 60_000),
        );
        h.insert(
            ShortString::from(headers::ORIGINAL_QUEUE),
            s(w.work_queue()),
        );
        h.insert(
            ShortString::from("traceparent"),
            s(format!(
                "00-{:032x}-{:016x}-01",
                i as u128 * 0x1f3d_5b79,
                i as u64 + 7
            )),
        );
        let props = lapin::BasicProperties::default()
            .with_message_id(format!("{task}-{i:05}").into())
            .with_type(task.into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(u64::try_from(at.timestamp() - 60).unwrap_or(0))
            .with_headers(h);
        let body = format!(r#"{{"customer": "c3e815", "n": {i}, "to": "ops+{i}@example.com"}}"#);
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await
        .expect("publish a dead letter");
    }
    ch.wait_for_confirms().await.expect("confirms");
    let _ = ch.close(200, "".into()).await;
}

/// The visible text of the page's main part.
async fn main_text(b: &Browser) -> String {
    b.text("main").await
}

/// 1,200 dead letters in three groups, worked from the console: the
/// broker's total with separators, fingerprints that show the cause,
/// a paged group with its size and group actions, one message whose
/// headers wrap and whose instants read as RFC 3339, search by id and by
/// text, the console's 404, a disabled schedule without "Trigger now",
/// and disabled buttons that name their scope. Every page is shot at
/// desktop and phone width.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_works_a_large_dead_queue() {
    let w = World::new("ui-browser-scale").await;
    fill_realistic(&w, 1200).await;
    let dead_q = w.topo.dead_queue();
    assert_eq!(w.queue_len(&dead_q).await, 1200);
    let cfg = w.write_config(
        "p.toml",
        &format!(
            "{PRODUCER}\n[[schedules]]\nname = \"off\"\ncron = \"0 3 * * *\"\ntask = \"it.off\"\nenabled = false\n"
        ),
    );
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let b = Browser::start().await;

    b.goto(&p.url("/ui/")).await;
    b.wait_path("/ui/login").await;
    b.shots("scale-login").await;
    sign_in(&b, &p, crate::helpers::ADMIN_TOKEN).await;
    b.wait_text(".card.dead p.big", "1,200").await;
    b.wait_text("table.latest", "it.report").await;
    b.shots("scale-overview").await;

    // The groups: the broker's total, the cause first in each fingerprint.
    b.click("nav a[href='/ui/dead']").await;
    b.wait_path("/ui/dead").await;
    b.wait_text("p.total", "1,200 dead letters").await;
    b.wait_text("p.total", "Groups of the first 1,000").await;
    let report = b
        .text("tr.group[data-task='it.report'] td.fingerprint")
        .await;
    assert!(
        report.starts_with("KeyError: 'c3e815' — permanent error: /usr/bin/python3 exited with #"),
        "{report}"
    );
    let charge = b
        .text("tr.group[data-task='it.charge'] td.fingerprint")
        .await;
    assert!(
        charge.starts_with("HTTP # from https://pay.example/v2/charge after #ms (request <id>)"),
        "{charge}"
    );
    let mail = b.text("tr.group[data-task='it.mail'] td.fingerprint").await;
    assert!(mail.starts_with("usage: send.py"), "{mail}");
    let groups = b
        .client
        .find_all(fantoccini::Locator::Css("tr.group"))
        .await
        .expect("groups");
    assert_eq!(
        groups.len(),
        3,
        "one group per failure, whatever its numbers"
    );
    assert!(!main_text(&b).await.contains('`'), "no literal backticks");
    b.shots("scale-dead").await;

    // One group, 50 a page, with its size and the group's actions on top.
    b.click("tr.group[data-task='it.charge'] td a").await;
    b.wait_path("/ui/dead/group").await;
    b.wait_text(
        "p.size",
        "333 dead letters in this group among the first 1,000 of 1,200",
    )
    .await;
    let rows = b
        .client
        .find_all(fantoccini::Locator::Css("table.messages tbody tr"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 50);
    b.wait_text("nav.pager .range", "1–50 of 333").await;
    b.shots("scale-dead-group").await;
    b.click("nav.pager a[rel='next']").await;
    b.wait_text("nav.pager .range", "51–100 of 333").await;

    // One message: headers wrap inside their card, instants are readable.
    b.click("table.messages tbody tr:first-child td:nth-child(2) a")
        .await;
    b.wait_path("/ui/dead/message").await;
    let headers = b.text(".card:nth-child(2)").await;
    assert!(headers.contains("traceparent"), "{headers}");
    assert!(headers.contains("-01"), "the whole traceparent: {headers}");
    let props = b.text(".card:nth-child(1)").await;
    let line = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    for (text, key) in [
        (&props, "timestamp"),
        (&headers, "x-warren-published-at-ms"),
    ] {
        let l = line(text, key);
        assert!(
            l.ends_with('Z') && l.contains('T') && l.contains(':'),
            "RFC 3339, not an epoch number: {l:?} in {text}"
        );
    }
    b.shots("scale-dead-message").await;

    // Search: by task id, then by text in the payload and the reason.
    b.goto(&p.url("/ui/dead")).await;
    b.fill("form.search input[name=q]", "it.mail-00005").await;
    b.click("form.search button").await;
    b.wait_path("/ui/dead/search").await;
    b.wait_text("p.size", "1 dead letter matches").await;
    b.wait_text("table.messages", "it.mail-00005").await;
    b.shots("scale-dead-search").await;
    b.fill("form.search input[name=q]", "ops+42@").await;
    b.click("form.search button").await;
    b.wait_text("p.size", "1 dead letter matches").await;
    b.wait_text("table.messages", "it.report-00042").await;

    // Replay a whole group from its page: back to the groups, saying so.
    b.goto(&p.url("/ui/dead")).await;
    b.click("tr.group[data-task='it.charge'] td a").await;
    b.wait_path("/ui/dead/group").await;
    b.click("button.replay-group").await;
    b.wait_path("/ui/dead").await;
    b.wait_text(
        "p.flash",
        "Replayed 400 dead letters of group it.charge · exhausted.",
    )
    .await;
    assert_eq!(w.queue_len(&dead_q).await, 800);
    b.wait_text("p.total", "800 dead letters").await;
    b.shots("scale-dead-after-replay").await;

    // Purge a group from its page, confirming first.
    b.click("tr.group[data-task='it.mail'] td a").await;
    b.wait_path("/ui/dead/group").await;
    b.click("button.purge-group").await;
    b.wait_text("p.notice", "Purge").await;
    b.shots("scale-dead-purge-confirm").await;
    b.click("form.confirm button").await;
    b.wait_text(
        "p.flash",
        "Purged 400 dead letters of group it.mail · permanent.",
    )
    .await;
    assert_eq!(w.queue_len(&dead_q).await, 400);

    // A group emptied meanwhile explains itself instead of an empty table.
    b.goto(&p.url("/ui/dead")).await;
    b.click("tr.group[data-task='it.report'] td a").await;
    b.wait_path("/ui/dead/group").await;
    let group_url = b.client.current_url().await.expect("url").to_string();
    reqwest::Client::new()
        .post(p.url("/v1/dead/purge"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"all": true, "confirm": true}"#)
        .send()
        .await
        .expect("purge");
    b.goto(&group_url).await;
    b.wait_text("p.notice", "This group has no dead letters now")
        .await;
    assert!(b
        .client
        .find(fantoccini::Locator::Css("table.messages"))
        .await
        .is_err());
    b.shots("scale-dead-group-empty").await;

    // Not a page: the console's 404. A lure in `?flash=` shows nothing.
    b.goto(&p.url("/ui/dead/nope")).await;
    b.wait_text("main h1", "Not found").await;
    b.shots("scale-not-found").await;
    b.goto(&p.url(
        "/ui/dead?flash=Session%20expired.%20Paste%20your%20token%20at%20https%3A%2F%2Fevil.example",
    ))
    .await;
    b.el("main h1").await;
    assert!(!main_text(&b).await.contains("evil.example"));

    // A disabled schedule offers no "Trigger now".
    b.goto(&p.url("/ui/schedules")).await;
    let off = b.text("tr[data-schedule='off']").await;
    assert!(
        off.contains("off in the config") && !off.contains("Trigger now"),
        "{off}"
    );
    b.shots("scale-schedules").await;
    b.goto(&p.url("/ui/publish")).await;
    b.shots("scale-publish").await;
    b.goto(&p.url("/ui/workflows")).await;
    b.shots("scale-workflows").await;

    // A read token: every action disabled, each saying the scope it needs.
    fill_realistic(&w, 3).await;
    sign_out(&b).await;
    sign_in(&b, &p, READ_TOKEN).await;
    b.goto(&p.url("/ui/dead")).await;
    let title = |css: &'static str| {
        let b = &b;
        async move {
            let e = b.el(css).await;
            assert!(!e.is_enabled().await.expect("enabled?"), "{css} enabled");
            e.attr("title").await.expect("title").unwrap_or_default()
        }
    };
    assert_eq!(
        title("tr.group button.replay").await,
        "needs the publish scope"
    );
    assert_eq!(
        title("tr.group button.purge").await,
        "needs the admin scope"
    );
    b.wait_text(
        "p.scopes",
        "Your token (read) cannot replay (needs publish), nor purge (needs admin).",
    )
    .await;
    b.shots("scale-dead-read").await;
    b.goto(&p.url("/ui/schedules")).await;
    assert_eq!(
        title("tr[data-schedule='hourly'] form[action$='/trigger'] button").await,
        "needs the publish scope"
    );
    assert_eq!(
        title("tr[data-schedule='hourly'] form[action$='/pause'] button").await,
        "needs the admin scope"
    );
    b.goto(&p.url("/ui/publish")).await;
    assert_eq!(
        title("form.publish button").await,
        "needs the publish scope"
    );
    b.close().await;
}

/// A console in use stays signed in past `console.session_ttl` after
/// sign-in (the browser keeps the cookie; the server counts idle time),
/// and one left idle that long is signed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_use_lasts_past_session_ttl() {
    let w = World::new("ui-browser-ttl").await;
    let cfg = w.write_config(
        "p.toml",
        &format!("{PRODUCER}\n[console]\nsession_ttl = \"3s\"\n"),
    );
    let p = w.start("producer", &cfg, &[]);
    p.wait_ready(WAIT).await;
    let b = Browser::start().await;
    sign_in(&b, &p, READ_TOKEN).await;
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(7) {
        let page = if n % 2 == 0 {
            "/ui/schedules"
        } else {
            "/ui/dead"
        };
        b.click(&format!("nav a[href='{page}']")).await;
        b.wait_path(page).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // Idle past the ttl: the next page is the sign-in page.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    b.click("nav a[href='/ui/schedules']").await;
    b.wait_path("/ui/login").await;
    b.close().await;
}
