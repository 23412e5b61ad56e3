//! The real `warren-producer` under libfaketime: its wall clock is stepped
//! back an hour and then forward an hour through a timestamp file (the
//! monotonic clock stays real), and ticks must keep coming without an id
//! twice.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use crate::helpers::{duplicates, Msg, World};

/// From the Debian package `faketime` (`dpkg -L libfaketime`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

const PULSE: &str = r#"
[[schedules]]
name = "pulse"
cron = "* * * * * *"
task = "it.tick"
misfire = "catch_up"
misfire_grace = "10s"
"#;

fn libfaketime() -> &'static str {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: install the Debian package `faketime` (deploy/test.sh does)"
    );
    LIBFAKETIME
}

/// Set the faked clock's offset from real time, atomically (libfaketime
/// re-reads the file on every clock read).
fn set_offset(file: &Path, offset: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset}\n")).expect("write faketime offset");
    std::fs::rename(&tmp, file).expect("swap faketime offset");
}

fn instants(msgs: &[Msg]) -> Vec<DateTime<Utc>> {
    msgs.iter().filter_map(Msg::instant).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_keep_coming_when_the_wall_clock_steps_back_and_forward() {
    let lib = libfaketime();
    let w = World::new("clock_step").await;
    let rx = w.collect().await;
    let cfg = w.write_config("p.toml", PULSE);
    let offset: PathBuf = w.dir.path().join("faketime");
    set_offset(&offset, "+0");
    let offset_str = offset.to_string_lossy().into_owned();
    let p = w.start(
        "producer",
        &cfg,
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME_TIMESTAMP_FILE", offset_str.as_str()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );

    let before = rx
        .wait_for(Duration::from_secs(20), "three ticks", |m| m.len() >= 3)
        .await;
    let first = instants(&before).into_iter().min().expect("a tick instant");

    // Back one hour: the past hour was never fired, so it fires now.
    set_offset(&offset, "-3600");
    let back_edge = first - TimeDelta::minutes(30);
    let after_back = rx
        .wait_for(
            Duration::from_secs(20),
            "three ticks of the past hour",
            |m| instants(m).iter().filter(|t| **t < back_edge).count() >= 3,
        )
        .await;
    assert!(p.logs().contains("wall clock stepped back"), "{}", p.logs());

    // Forward one hour (back to real time): the hour jumped over is overdue
    // and follows the misfire policy: only the 10 s grace catches up.
    let seen_before_forward = after_back.len();
    let forward_now = Utc::now();
    set_offset(&offset, "+0");
    let all = rx
        .wait_for(
            Duration::from_secs(20),
            "three ticks after the forward step",
            |m| instants(m).iter().filter(|t| **t > forward_now).count() >= 3,
        )
        .await;
    assert!(
        p.logs().contains("wall clock stepped forward"),
        "{}",
        p.logs()
    );
    let jumped_over: Vec<_> = instants(&all[seen_before_forward..])
        .into_iter()
        .filter(|t| {
            *t > forward_now - TimeDelta::minutes(50) && *t < forward_now - TimeDelta::seconds(13)
        })
        .collect();
    assert!(
        jumped_over.is_empty(),
        "instants older than the grace fired after the forward step: {jumped_over:?}"
    );
    let dups = duplicates(&all);
    assert!(dups.is_empty(), "ids fired twice: {dups:?}\n{}", p.logs());
    eprintln!(
        "clock steps: {} ticks before, {} during the hour back, {} after the step forward",
        before.len(),
        seen_before_forward - before.len(),
        all.len() - seen_before_forward
    );
}
