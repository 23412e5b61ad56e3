//! What is dying, grouped by cause: the dead queue's messages by task name,
//! failure kind and [`fingerprint`](super::fingerprint()), from a bounded scan
//! that leaves every message where it was.

use std::collections::HashMap;

use lapin::Connection;
use serde::Serialize;

use super::{count, describe, open_channel, DeadError, DeadTask, Scan, Tried};
use crate::Topology;

/// Dead tasks that failed the same way.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    pub task: String,
    pub kind: String,
    pub fingerprint: String,
    /// One full reason of the group (the first seen).
    pub example: String,
    /// Messages of the group among those scanned.
    pub count: u64,
    /// Earliest and latest `x-warren-dead-at` of the group (RFC 3339).
    pub oldest: Option<String>,
    pub newest: Option<String>,
}

/// The dead queue at a glance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    /// Messages in the dead queue (the broker's count, from a passive declare).
    pub total: u64,
    /// Messages looked at to build `groups`.
    pub scanned: u64,
    /// `scanned < total`: the groups describe the first `scanned` messages only.
    pub truncated: bool,
    /// Largest first (ties: by task, kind, fingerprint).
    pub groups: Vec<Group>,
}

/// Group the first `scan_limit` dead messages (all stay in the queue).
pub async fn overview(
    conn: &Connection,
    topo: &Topology,
    scan_limit: usize,
) -> Result<Overview, DeadError> {
    let total = count(conn, topo).await?;
    let ch = conn.create_channel().await.tried(open_channel)?;
    let mut scan = Scan::new(&ch, topo, scan_limit).await?;
    let mut tasks = Vec::new();
    while let Some(d) = scan.next().await? {
        tasks.push(describe(d.routing_key.as_str(), &d.properties, &d.data));
    }
    // Closing the channel returns every fetched message to the queue.
    scan.finish(conn, tasks.len(), "dead overview done").await?;
    let scanned = tasks.len() as u64;
    Ok(Overview {
        // Messages dead-lettered during the scan can make it see more than
        // the count taken before it.
        total: total.max(scanned),
        scanned,
        truncated: scanned < total,
        groups: group(&tasks),
    })
}

/// `tasks` grouped by (task, kind, fingerprint), largest group first.
pub fn group(tasks: &[DeadTask]) -> Vec<Group> {
    let mut index: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut groups: Vec<Group> = Vec::new();
    for t in tasks {
        let key = (t.task.as_str(), t.kind.as_str(), t.fingerprint.as_str());
        let at = *index.entry(key).or_insert_with(|| {
            groups.push(Group {
                task: t.task.clone(),
                kind: t.kind.clone(),
                fingerprint: t.fingerprint.clone(),
                example: t.reason.clone(),
                count: 0,
                oldest: None,
                newest: None,
            });
            groups.len() - 1
        });
        let g = &mut groups[at];
        g.count += 1;
        if let Some(when) = &t.failed_at {
            // RFC 3339 in UTC, as the consumer writes it: text order is time order.
            if g.oldest.as_ref().is_none_or(|o| when < o) {
                g.oldest = Some(when.clone());
            }
            if g.newest.as_ref().is_none_or(|n| when > n) {
                g.newest = Some(when.clone());
            }
        }
    }
    groups.sort_by(|a, b| {
        b.count.cmp(&a.count).then_with(|| {
            (&a.task, &a.kind, &a.fingerprint).cmp(&(&b.task, &b.kind, &b.fingerprint))
        })
    });
    groups
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dead(task: &str, kind: &str, reason: &str, at: &str) -> DeadTask {
        DeadTask {
            id: None,
            task: task.into(),
            reason: reason.into(),
            fingerprint: super::super::fingerprint(reason),
            kind: kind.into(),
            attempts: Some(1),
            failed_at: Some(at.into()),
            first_failed_at: None,
            original_queue: None,
            original_routing_key: None,
            last_error: None,
            body_bytes: 2,
        }
    }

    #[test]
    fn groups_by_task_kind_and_fingerprint_largest_first() {
        let groups = group(&[
            dead("a", "permanent", "bad input 1", "2024-05-01T10:00:02Z"),
            dead(
                "b",
                "retries_exhausted",
                "timeout after 10 ms",
                "2024-05-01T10:00:05Z",
            ),
            dead(
                "b",
                "retries_exhausted",
                "timeout after 99 ms",
                "2024-05-01T10:00:01Z",
            ),
            dead(
                "b",
                "permanent",
                "timeout after 99 ms",
                "2024-05-01T10:00:03Z",
            ),
        ]);
        let shape: Vec<(&str, &str, &str, u64)> = groups
            .iter()
            .map(|g| {
                (
                    g.task.as_str(),
                    g.kind.as_str(),
                    g.fingerprint.as_str(),
                    g.count,
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("b", "retries_exhausted", "timeout after # ms", 2),
                ("a", "permanent", "bad input #", 1),
                ("b", "permanent", "timeout after # ms", 1),
            ]
        );
        let b = &groups[0];
        assert_eq!(b.example, "timeout after 10 ms");
        assert_eq!(b.oldest.as_deref(), Some("2024-05-01T10:00:01Z"));
        assert_eq!(b.newest.as_deref(), Some("2024-05-01T10:00:05Z"));
    }
}
