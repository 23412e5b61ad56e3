use futures_util::stream::{FuturesOrdered, StreamExt};
use std::time::{Duration, Instant};
use warren::amqp::{Publisher, Transaction};
use warren::Task;

fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

#[tokio::main]
async fn main() {
    let url = std::env::var("URL").unwrap();
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    let chunk: usize = std::env::var("CHUNK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let k: usize = std::env::var("K")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "txexp".into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    let tasks: Vec<Task> = (0..n)
        .map(|_| Task::from_raw("bench.noop", b"{\"n\":1}".to_vec()))
        .collect();
    for mode in ["confirms", "tx", "confirms", "tx"] {
        ch.queue_purge("txexp".into(), Default::default())
            .await
            .unwrap();
        let (c0, t0) = (cpu(), Instant::now());
        if mode == "confirms" {
            let p = Publisher::new(&conn, Duration::from_secs(30))
                .await
                .unwrap();
            let mut inflight = std::collections::VecDeque::new();
            for t in &tasks {
                let (props, body) = p.wire(t).unwrap();
                inflight.push_back(p.send("", "txexp", props, &body).await.unwrap());
                if inflight.len() >= 1000 {
                    inflight.pop_front().unwrap().confirmed().await.unwrap();
                }
            }
            for f in inflight {
                f.confirmed().await.unwrap();
            }
        } else {
            let mut txs = Vec::new();
            for _ in 0..k {
                txs.push(
                    Transaction::new(&conn, Duration::from_secs(30))
                        .await
                        .unwrap(),
                );
            }
            let chunks: Vec<&[Task]> = tasks.chunks(chunk).collect();
            let mut inflight = FuturesOrdered::new();
            let mut staged = 0;
            loop {
                while inflight.len() < k && staged < chunks.len() {
                    let mut b = txs[staged % k].batch();
                    for t in chunks[staged] {
                        b.publish("", "txexp", t.properties(), &t.payload).unwrap();
                    }
                    inflight.push_back(b.commit());
                    staged += 1;
                }
                match inflight.next().await {
                    Some(r) => {
                        r.unwrap();
                    }
                    None => break,
                }
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "{mode}: {:.0} msgs/s, client CPU {:.1} µs/msg",
            n as f64 / dt,
            (cpu() - c0) * 1e6 / n as f64
        );
    }
}
