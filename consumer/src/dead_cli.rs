//! `warren-consumer dead list|replay|purge`: connects, runs the dead-letter
//! operation of [`warren_consumer::dead`] and prints its result — results on
//! stdout, summaries and failures on stderr, both through `warren::outln!` /
//! `warren::errln!`, so a closed pipe (`| head`) never panics.

use std::collections::BTreeMap;

use anyhow::Context;
use warren_consumer::dead::{self, DeadTask};
use warren_consumer::ConsumerConfig;

use crate::cli::DeadCommand;

/// `warren-consumer declare`: declare the whole topology of `cfg` and the
/// producer's objects, whatever `topology.declare` says (running it is
/// asking for it).
pub async fn declare(cfg: ConsumerConfig) -> anyhow::Result<()> {
    warren::telemetry::init(&warren::config::LogConfig {
        level: "warn".into(),
        ..cfg.log.clone()
    });
    let topology = warren::config::TopologyConfig {
        declare: true,
        ..cfg.topology.clone()
    };
    // The task events stream too: consumers and producers record there.
    let topo = warren::Topology::new(&topology).with_events(cfg.events.stream());
    let conn = warren::amqp::connect(&cfg.amqp, "warren-consumer-declare")
        .await
        .context("connecting to the broker")?;
    // The producer's own objects too, so that one deployer declares all a
    // least-privilege deployment needs (docs/operations.md).
    let res = async {
        warren::topology::declare(&conn, &topo).await?;
        let parts = warren::topology::producer::Part::ALL;
        warren::topology::producer::declare(&conn, &topo, &parts).await
    }
    .await;
    close(&conn, "declared").await;
    res?;
    warren::errln!(
        "declared the topology of prefix `{}` ({} work queue(s)) and the producer's objects",
        topo.prefix(),
        topo.work_queues().len()
    );
    Ok(())
}

/// Run `cmd` against the broker of `cfg`.
pub async fn run(cfg: ConsumerConfig, cmd: DeadCommand) -> anyhow::Result<()> {
    warren::telemetry::init(&warren::config::LogConfig {
        level: "warn".into(),
        ..cfg.log.clone()
    });
    let topo = warren::Topology::new(&cfg.topology);
    let conn = warren::amqp::connect(&cfg.amqp, "warren-consumer-dead")
        .await
        .context("connecting to the broker")?;
    warren::topology::declare(&conn, &topo).await?;
    let res = async {
        match cmd {
            DeadCommand::List { limit, json, group } => {
                let tasks = dead::list(&conn, &topo, limit).await?;
                if group {
                    print_lines(&grouped(&tasks));
                } else if json {
                    for t in &tasks {
                        warren::outln!("{}", serde_json::to_string(t)?);
                    }
                } else {
                    print_lines(&table(&tasks));
                    warren::errln!("{} dead task(s) shown", tasks.len());
                }
            }
            DeadCommand::Replay(sel) => {
                let r = dead::replay(
                    &conn,
                    &topo,
                    &sel.selector(),
                    usize::MAX,
                    cfg.amqp.confirm_timeout,
                )
                .await?;
                for id in &r.replayed {
                    warren::outln!("replayed {id}");
                }
                for (id, why) in &r.failed {
                    warren::errln!("kept {id}: {why}");
                }
                warren::errln!("{} replayed, {} kept", r.replayed.len(), r.failed.len());
                anyhow::ensure!(r.failed.is_empty(), "some tasks could not be replayed");
            }
            DeadCommand::Purge(sel) => {
                let n = dead::purge(&conn, &topo, &sel.selector(), usize::MAX).await?;
                warren::outln!("purged {n}");
            }
        }
        anyhow::Ok(())
    }
    .await;
    close(&conn, "done").await;
    res
}

/// Close the connection, waiting for the broker's answer at most 2 s: a
/// command that did its work must not hang on a slow or lost broker.
async fn close(conn: &lapin::Connection, why: &str) {
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        conn.close(200, why.into()),
    )
    .await;
}

fn print_lines(lines: &[String]) {
    for l in lines {
        warren::outln!("{l}");
    }
}

/// `list --group`: a header, then one line per (task, reason) with its count.
fn grouped(tasks: &[DeadTask]) -> Vec<String> {
    let mut groups: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for t in tasks {
        *groups.entry((&t.task, &t.reason)).or_default() += 1;
    }
    std::iter::once(format!("{:>6}  {:<30} REASON", "COUNT", "TASK"))
        .chain(
            groups
                .into_iter()
                .map(|((task, reason), n)| format!("{n:>6}  {task:<30} {reason}")),
        )
        .collect()
}

/// `list`: a header, then one line per dead task (`-` for what is unknown).
fn table(tasks: &[DeadTask]) -> Vec<String> {
    let header = format!(
        "{:<38} {:<24} {:>8} {:<24} REASON",
        "ID", "TASK", "ATTEMPTS", "FAILED AT"
    );
    std::iter::once(header)
        .chain(tasks.iter().map(|t| {
            format!(
                "{:<38} {:<24} {:>8} {:<24} {}",
                t.id.as_deref().unwrap_or("-"),
                t.task,
                t.attempts
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into()),
                t.failed_at.as_deref().unwrap_or("-"),
                t.reason
            )
        }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead(id: Option<&str>, task: &str, reason: &str, attempts: Option<i64>) -> DeadTask {
        DeadTask {
            id: id.map(str::to_owned),
            task: task.into(),
            reason: reason.into(),
            fingerprint: dead::fingerprint(reason),
            kind: "permanent".into(),
            attempts,
            failed_at: attempts.map(|_| "2024-05-01T10:00:00Z".into()),
            first_failed_at: None,
            original_queue: None,
            original_routing_key: None,
            last_error: None,
            body_bytes: 2,
        }
    }

    #[test]
    fn table_has_a_header_and_a_dash_for_the_unknown() {
        let lines = table(&[
            dead(Some("id-1"), "email.send", "permanent error: 4xx", Some(3)),
            dead(None, "x", "unroutable after delay", None),
        ]);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID ") && lines[0].ends_with("REASON"));
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cols[..4],
            ["id-1", "email.send", "3", "2024-05-01T10:00:00Z"]
        );
        assert!(lines[1].ends_with("permanent error: 4xx"));
        let cols: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(cols[..4], ["-", "x", "-", "-"]);
    }

    #[test]
    fn group_counts_by_task_and_reason_in_order() {
        let lines = grouped(&[
            dead(Some("1"), "b", "r1", Some(1)),
            dead(Some("2"), "a", "r2", Some(1)),
            dead(Some("3"), "b", "r1", Some(1)),
        ]);
        let rows: Vec<Vec<&str>> = lines
            .iter()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec!["COUNT", "TASK", "REASON"],
                vec!["1", "a", "r2"],
                vec!["2", "b", "r1"]
            ]
        );
    }
}
