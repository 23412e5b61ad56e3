//! `--scenario index`: the task index of every producer replica
//! (docs/tasks.md#the-index) at 1,000,000 tasks, in this process, without a
//! broker: each task published, started and succeeded, applied in batches
//! of 1,000 as the stream delivers them; then the memory it grew by (VmRSS)
//! per task and the time of 100,000 lookups.

use warren::events::{Batch, Event, Source, What};
use warren_producer::tasks::Index;

const N: usize = 1_000_000;

pub(crate) fn rss_kib() -> u64 {
    crate::meter::status_kib("self", "VmRSS:").unwrap_or(0)
}

fn batch(role: &str, events: Vec<Event>) -> Batch {
    Batch {
        v: 1,
        role: role.into(),
        instance: format!("{role}-1"),
        host: "h".into(),
        events,
        worker: None,
    }
}

pub(crate) fn id(i: usize) -> String {
    format!("{:08x}-1b2c-4d5e-8f90-{:012x}", i, i * 7919)
}

/// The events of task `i`: (published, [started, succeeded]).
pub(crate) fn story(i: usize) -> (Event, [Event; 2]) {
    let name = format!("bench.task{}", i % 20);
    let mut p = Event::new(
        &id(i),
        &name,
        What::Published {
            source: Source::Api,
        },
    );
    p.at = 1_800_000_000_000 + i as i64;
    p.trace = Some(format!("{:032x}", i + 1));
    let mut s = Event::new(&id(i), &name, What::Started { attempt: 1 }).queue("warren.default");
    s.at = 1_800_000_000_001 + i as i64;
    let mut d = Event::new(
        &id(i),
        &name,
        What::Succeeded {
            attempt: 1,
            duration_ms: 3,
            result: None,
        },
    )
    .queue("warren.default");
    d.at = 1_800_000_000_004 + i as i64;
    (p, [s, d])
}

pub fn index_scenario() -> anyhow::Result<()> {
    let idx = Index::new(N);
    let before = rss_kib();
    let started = std::time::Instant::now();
    let mut events = 0usize;
    for chunk in 0..N / 1000 {
        let mut p = Vec::with_capacity(1000);
        let mut c = Vec::with_capacity(2000);
        for i in chunk * 1000..(chunk + 1) * 1000 {
            let (published, run) = story(i);
            p.push(published);
            c.extend(run);
        }
        events += p.len() + c.len();
        idx.apply(&batch("producer", p), None);
        idx.apply(&batch("consumer", c), None);
    }
    let took = started.elapsed();
    let grown = rss_kib().saturating_sub(before);
    let mut lookups: Vec<u128> = Vec::with_capacity(100_000);
    for k in 0..100_000 {
        let i = (k * 7_777) % N;
        let key = id(i);
        let t = std::time::Instant::now();
        let found = idx.get(&key).is_some();
        lookups.push(t.elapsed().as_nanos());
        anyhow::ensure!(found, "task {key} missing from the index");
    }
    lookups.sort_unstable();
    anyhow::ensure!(idx.len() == N, "index holds {} tasks, not {N}", idx.len());
    warren::outln!(
        "index: {} tasks, {events} events applied in {:.2} s ({:.0} events/s); RSS +{} MiB = {} bytes/task; get p50 {} ns, p99 {} ns",
        idx.len(),
        took.as_secs_f64(),
        events as f64 / took.as_secs_f64(),
        grown / 1024,
        grown * 1024 / N as u64,
        lookups[lookups.len() / 2],
        lookups[lookups.len() * 99 / 100],
    );
    Ok(())
}
