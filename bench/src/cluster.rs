//! `--scenario cluster`: what replication costs. The same publish-and-drain
//! run (warren's confirmed publisher, a plain consumer acking as it goes) on a
//! classic queue of one node and on a quorum queue of a local 3-node cluster
//! (`deploy/broker.sh cluster`), interleaved, reported as a ratio.

use std::time::{Duration, Instant};

use anyhow::Result;
use warren::config::{AmqpConfig, QueueType, Secret, TopologyConfig};
use warren::testing::{Cluster, Node};
use warren::topology::{self, Topology};

use crate::{plain_consume_until, purge, warren_publish, Args};

fn topo(queue_type: QueueType) -> Topology {
    Topology::new(&TopologyConfig {
        prefix: format!("bench.cluster.{}", std::process::id()),
        queue_type,
        ..TopologyConfig::default()
    })
}

async fn connect(url: String) -> Result<lapin::Connection> {
    let amqp = AmqpConfig {
        url: Some(Secret::new(url)),
        ..AmqpConfig::default()
    };
    Ok(warren::amqp::connect(&amqp, "bench").await?)
}

/// Publish `n` tasks with confirms while a consumer drains them; msgs/s.
async fn one_run(conn: &lapin::Connection, t: &Topology, args: &Args) -> Result<f64> {
    purge(conn, t).await?;
    let queue = t.work_queues()[0].name.clone();
    let (ready, is_ready) = tokio::sync::oneshot::channel();
    let consume = plain_consume_until(conn, &queue, args.messages, args.prefetch, ready);
    let start = std::cell::Cell::new(None);
    let publish = async {
        let _ = is_ready.await;
        start.set(Some(Instant::now()));
        warren_publish(conn, t, args.messages).await
    };
    let (consumed, published) = tokio::time::timeout(Duration::from_secs(300), async {
        tokio::join!(consume, publish)
    })
    .await?;
    consumed?;
    published?;
    let start = start.get().unwrap_or_else(Instant::now);
    Ok(args.messages as f64 / start.elapsed().as_secs_f64())
}

pub async fn cluster_scenario(args: &Args) -> Result<()> {
    let node = tokio::task::spawn_blocking(Node::start).await?;
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(3)).await?;
    let single = connect(node.url().to_owned()).await?;
    let replicated = connect(cluster.url_list()).await?;
    let (classic, quorum) = (topo(QueueType::Classic), topo(QueueType::Quorum));
    topology::declare(&single, &classic).await?;
    topology::declare(&replicated, &quorum).await?;
    let (mut c, mut q) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        for side in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                c.push(one_run(&single, &classic, args).await?);
            } else {
                q.push(one_run(&replicated, &quorum, args).await?);
            }
        }
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut ratios: Vec<f64> = c.iter().zip(&q).map(|(c, q)| q / c).collect();
    ratios.sort_by(f64::total_cmp);
    warren::outln!("cluster: classic queue, 1 node   msgs/s [{}]", fmt(&c));
    warren::outln!("cluster: quorum queue, 3 nodes  msgs/s [{}]", fmt(&q));
    warren::outln!(
        "cluster: quorum / classic median {:.2} (publish with confirms + drain, {} msgs)",
        ratios.get(ratios.len() / 2).copied().unwrap_or(0.0),
        args.messages
    );
    let _ = single.close(200, "bye".into()).await;
    let _ = replicated.close(200, "bye".into()).await;
    drop(cluster);
    drop(node);
    Ok(())
}
