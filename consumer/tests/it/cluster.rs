//! warren on a real 3-node RabbitMQ cluster (`deploy/broker.sh cluster`),
//! quorum queues, three workers, tasks published with confirms through the
//! `warren-producer publish --batch` CLI while nodes die and restart. Each
//! test prints what it measured.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warren::config::QueueType;
use warren::testing::{self, eventually, Cluster};
use warren::Task;
use warren_consumer::{ConsumerConfig, Registry, TaskError};

use crate::helpers::*;

const WORKERS: usize = 3;

fn producer_bin() -> PathBuf {
    // Built with the workspace; this crate only gets its own binaries' paths.
    PathBuf::from(env!("CARGO_BIN_EXE_warren-consumer")).with_file_name("warren-producer")
}

async fn start_cluster() -> Cluster {
    tokio::task::spawn_blocking(|| Cluster::start(3))
        .await
        .expect("start a 3-node cluster")
}

fn cluster_config(test: &str, cluster: &Cluster) -> ConsumerConfig {
    let mut cfg = config(test);
    cfg.amqp = amqp_for(&cluster.url_list());
    cfg.topology = testing::topology_config(test, QueueType::Quorum);
    cfg
}

/// Every run of `t.c` (and of `t.flaky`, which fails its first attempt),
/// across all workers, with when it started.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, u32, Instant)>>>);

impl Seen {
    fn registry(&self) -> Registry {
        let mut reg = Registry::new();
        let s = self.clone();
        reg.register_fn("t.c", move |t: Task| {
            let s = s.clone();
            async move {
                s.0.lock()
                    .unwrap()
                    .push((t.id.clone(), t.attempt, Instant::now()));
                Ok(())
            }
        })
        .unwrap();
        let s = self.clone();
        reg.register_fn("t.flaky", move |t: Task| {
            let s = s.clone();
            async move {
                s.0.lock()
                    .unwrap()
                    .push((t.id.clone(), t.attempt, Instant::now()));
                if t.attempt == 1 {
                    return Err(TaskError::retryable("first attempt fails"));
                }
                Ok(())
            }
        })
        .unwrap();
        reg
    }

    async fn wait_for(&self, n: usize) {
        eventually(WAIT, &format!("{n} runs"), || async {
            (self.runs().len() >= n).then_some(())
        })
        .await;
    }

    fn runs(&self) -> Vec<(String, u32, Instant)> {
        self.0.lock().unwrap().clone()
    }

    fn ids(&self) -> HashSet<String> {
        self.runs().into_iter().map(|(id, _, _)| id).collect()
    }

    /// Ids run more than once.
    fn duplicates(&self) -> usize {
        let mut n: HashMap<String, usize> = HashMap::new();
        for (id, attempt, _) in self.runs() {
            if attempt == 1 {
                *n.entry(id).or_default() += 1;
            }
        }
        n.values().filter(|c| **c > 1).count()
    }

    /// The longest time without any task starting, between `from` and the
    /// last run.
    fn longest_stall(&self, from: Instant) -> Duration {
        let mut t: Vec<Instant> = self.runs().into_iter().map(|r| r.2).collect();
        t.push(from);
        t.sort();
        t.windows(2)
            .filter(|w| w[0] >= from)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

/// Publish `ids` as `t.c` tasks with `warren-producer publish --batch`;
/// returns the ids the broker confirmed (none if the command could not say).
fn publish_cli(cfg: &ConsumerConfig, ids: &[String]) -> Vec<String> {
    let mut child = Command::new(producer_bin())
        .args(["publish", "--batch", "--window", "100"])
        .env("WARREN_AMQP_URL", cfg.amqp.url_list())
        .env("WARREN_TOPOLOGY__PREFIX", &cfg.topology.prefix)
        .env("WARREN_TOPOLOGY__QUEUE_TYPE", "quorum")
        .env("WARREN_AMQP__CONFIRM_TIMEOUT", "5s")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn warren-producer");
    let mut input = String::new();
    for id in ids {
        input.push_str(&format!("{{\"task\":\"t.c\",\"id\":\"{id}\"}}\n"));
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().expect("wait warren-producer");
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.contains(" confirmed, ") {
        return Vec::new();
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed: HashSet<&str> = stderr
        .lines()
        // `line N: task <id> (<name>): <why>` (see producer/src/batch.rs).
        .filter_map(|l| l.split_once(": task ")?.1.split(' ').next())
        .collect();
    ids.iter()
        .filter(|id| !failed.contains(id.as_str()))
        .cloned()
        .collect()
}

/// Publish batches until `stop` is set, from a thread; returns every id the
/// broker confirmed.
fn publish_until(
    cfg: ConsumerConfig,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut confirmed = Vec::new();
        let mut batch = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let ids: Vec<String> = (0..200).map(|i| format!("b{batch}-{i}")).collect();
            confirmed.extend(publish_cli(&cfg, &ids));
            batch += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        confirmed
    })
}

struct Fleet {
    apps: Vec<App>,
    seen: Seen,
    prefetch: usize,
}

async fn fleet(cfg: &ConsumerConfig) -> Fleet {
    let seen = Seen::default();
    let mut apps = Vec::new();
    for _ in 0..WORKERS {
        apps.push(spawn_worker(cfg.clone(), seen.registry()).await);
    }
    Fleet {
        apps,
        seen,
        prefetch: usize::from(cfg.worker.prefetch),
    }
}

impl Fleet {
    /// Wait until every confirmed id ran; report and check the duplicates.
    async fn check(self, what: &str, confirmed: &[String], faults_from: Instant) {
        let seen = self.seen.clone();
        let want: HashSet<String> = confirmed.iter().cloned().collect();
        eventually(
            Duration::from_secs(90),
            "every confirmed task ran",
            || async {
                let ids = seen.ids();
                let missing = want.iter().filter(|id| !ids.contains(*id)).count();
                (missing == 0).then_some(())
            },
        )
        .await;
        let dups = seen.duplicates();
        let stall = seen.longest_stall(faults_from);
        eprintln!(
            "{what}: {} tasks confirmed, all ran; {dups} ran twice; longest stall {} ms",
            want.len(),
            stall.as_millis()
        );
        assert!(
            want.len() >= 1000,
            "too few tasks confirmed: {}",
            want.len()
        );
        // At-least-once: only deliveries in flight when a node died come back.
        let window = WORKERS * self.prefetch;
        assert!(
            dups <= window,
            "{dups} duplicates > in-flight window {window}"
        );
        for app in self.apps {
            app.shutdown.cancel();
        }
    }
}

/// The node leading the work queue is killed (kill -9) while tasks are
/// published with confirms and three workers consume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_leader_killed_under_load_loses_no_confirmed_task() {
    let cluster = start_cluster().await;
    let cfg = cluster_config("cl_kill", &cluster);
    let fleet = fleet(&cfg).await;
    let queue = fleet.apps[0].queue();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = publish_until(cfg.clone(), stop.clone());
    fleet.seen.wait_for(500).await;

    let leader = cluster
        .leader_of(1, &queue)
        .expect("the work queue's leader");
    let killed = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(leader);
        cluster
    })
    .await
    .unwrap();
    eprintln!("killed node {leader}, the leader of {queue}");
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let confirmed = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    fleet.check("leader kill", &confirmed, killed).await;
    drop(cluster);
}

/// Every node is restarted in turn (graceful stop, start, rejoin) while
/// tasks are published and consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_under_load_loses_no_confirmed_task() {
    let cluster = start_cluster().await;
    let cfg = cluster_config("cl_roll", &cluster);
    let fleet = fleet(&cfg).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = publish_until(cfg.clone(), stop.clone());
    fleet.seen.wait_for(500).await;
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || {
        for n in 1..=3 {
            cluster.restart(n);
            cluster.wait_whole(3, Duration::from_secs(60));
        }
        cluster
    })
    .await
    .unwrap();
    eprintln!(
        "rolling restart of 3 nodes took {} ms",
        started.elapsed().as_millis()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let confirmed = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    fleet.check("rolling restart", &confirmed, started).await;
    drop(cluster);
}

/// Delayed tasks and retries waiting in the delay levels when a node dies:
/// none lost, none early.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delays_and_retries_survive_a_node_kill() {
    const N: usize = 50;
    let cluster = start_cluster().await;
    let cfg = cluster_config("cl_delay", &cluster);
    let fleet = fleet(&cfg).await;
    let app = &fleet.apps[0];
    let delay = Duration::from_secs(4);
    let mut due = HashMap::new();
    for i in 0..N {
        let mut t = Task::new("t.c", &serde_json::json!({ "i": i }));
        t.id = format!("late-{i}");
        // The delay runs from when the broker takes the message, which is
        // before its confirm comes back.
        let sent = Instant::now();
        app.publisher
            .publish_task(&app.topo, &t, delay)
            .await
            .expect("publish delayed");
        due.insert(t.id.clone(), sent + delay);
        let mut f = Task::new("t.flaky", &serde_json::json!({ "i": i }));
        f.id = format!("flaky-{i}");
        app.publish(&f).await;
    }
    // The first attempts of the flaky ones have run: their retries wait in
    // the levels, like the delayed tasks.
    let seen = fleet.seen.clone();
    eventually(WAIT, "first attempts", || async {
        (seen
            .runs()
            .iter()
            .filter(|r| r.0.starts_with("flaky-"))
            .count()
            >= N)
            .then_some(())
    })
    .await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(2);
        cluster
    })
    .await
    .unwrap();
    let done = || {
        let runs = seen.runs();
        let late = runs.iter().filter(|r| r.0.starts_with("late-")).count();
        let retried = runs
            .iter()
            .filter(|r| r.0.starts_with("flaky-") && r.1 >= 2)
            .map(|r| r.0.clone())
            .collect::<HashSet<_>>()
            .len();
        (late, retried)
    };
    let all_ran = |(late, retried): (usize, usize)| late >= N && retried == N;
    let deadline = Instant::now() + Duration::from_secs(45);
    while !all_ran(done()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cluster = if all_ran(done()) {
        cluster
    } else {
        // RabbitMQ's at-least-once dead-lettering worker of a quorum queue can
        // fail to re-register with a new leader after a node dies, leaving
        // messages parked in a delay level until the membership changes again
        // (rabbitmq-server#16652; docs/cluster.md). The node coming back is
        // that change: what an operator does. Say so, with where the
        // messages were, rather than hide it.
        let (late, retried) = done();
        eprintln!(
            "after 45 s only {late}/{N} delayed tasks and {retried}/{N} retries ran; delay levels holding messages (name, messages, leader node): {:?}; restarting node 2",
            stalled_levels(&cluster)
        );
        let cluster = tokio::task::spawn_blocking(move || {
            cluster.restart(2);
            cluster
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(45);
        while !all_ran(done()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if all_ran(done()) {
            cluster
        } else {
            // Seen in CI: node 2 back, and a level still holds its messages.
            // A graceful restart of that level's leader moves the queue to a
            // new leader, which starts a new dead-letter worker.
            let stalled = stalled_levels(&cluster);
            eprintln!(
                "still stalled after node 2 came back: {stalled:?}; restarting their leaders"
            );
            let leaders: std::collections::BTreeSet<usize> =
                stalled.iter().filter_map(|l| l.2).collect();
            tokio::task::spawn_blocking(move || {
                for n in leaders {
                    cluster.restart(n);
                }
                cluster
            })
            .await
            .unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !all_ran(done()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !all_ran(done()) {
        // The broker kept a level stuck through both remedies (upstream, see
        // above). What warren owes still holds or fails here: every task that
        // has not run is held by the broker in a delay level, none is lost.
        let (late, retried) = done();
        let held: u64 = stalled_levels(&cluster).iter().map(|l| l.1).sum();
        let missing = (N - late.min(N)) + (N - retried);
        assert_eq!(
            held, missing as u64,
            "{missing} tasks did not run and the delay levels hold {held}: some were lost"
        );
        eprintln!(
            "RabbitMQ kept {held} messages in a delay level through a node restart and a leader restart (rabbitmq-server#16652): none lost"
        );
    }
    let mut earliest = Duration::MAX;
    for (id, _, at) in seen.runs() {
        if let Some(d) = due.get(&id) {
            assert!(at >= *d, "{id} ran {:?} early", *d - at);
            earliest = earliest.min(at - *d);
        }
    }
    eprintln!(
        "node 2 killed with {N} delayed tasks and {N} retries in the levels: {:?} ran, none early (least lateness {} ms)",
        done(),
        earliest.as_millis()
    );
    for app in fleet.apps {
        app.shutdown.cancel();
    }
    drop(cluster);
}

/// Delay-level queues that hold messages: name, count and the 1-based node
/// of their leader (asked of node 1).
fn stalled_levels(cluster: &Cluster) -> Vec<(String, u64, Option<usize>)> {
    let out = cluster.ctl(
        1,
        &[
            "list_queues",
            "name",
            "messages",
            "leader",
            "--formatter",
            "json",
        ],
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter()
        .filter(|q| q["name"].as_str().is_some_and(|n| n.contains(".delay.")))
        .filter_map(|q| {
            let messages = q["messages"].as_u64().unwrap_or(0);
            let leader = q["leader"].as_str().unwrap_or_default();
            let node = leader
                .rsplit_once('@')
                .and_then(|(_, host)| cluster.node_by_host(host));
            (messages > 0).then(|| {
                (
                    q["name"].as_str().unwrap_or_default().to_owned(),
                    messages,
                    node,
                )
            })
        })
        .collect()
}

/// The work queue's leader node is cut off from the other two (nftables)
/// for 20 s under load, then healed: with `pause_minority` it stops serving,
/// the workers and publishers on it move to the majority, and no confirmed
/// task is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_node_clients_move_to_the_majority() {
    let cluster = start_cluster().await;
    let cfg = cluster_config("cl_cut", &cluster);
    let fleet = fleet(&cfg).await;
    let queue = fleet.apps[0].queue();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = publish_until(cfg.clone(), stop.clone());
    fleet.seen.wait_for(500).await;
    let node = cluster
        .leader_of(1, &queue)
        .expect("the work queue's leader");
    let cut = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.cut(node);
        std::thread::sleep(Duration::from_secs(20));
        cluster.heal(node);
        cluster.wait_whole(3, Duration::from_secs(120));
        cluster
    })
    .await
    .unwrap();
    eprintln!("node {node} (leader of {queue}) was cut off for 20 s");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let confirmed = tokio::task::spawn_blocking(move || publisher.join().unwrap())
        .await
        .unwrap();
    fleet.check("partition", &confirmed, cut).await;
    drop(cluster);
}
