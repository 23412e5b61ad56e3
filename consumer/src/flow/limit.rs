//! One `limits."<pattern>"` entry: how many of its tasks run at once and how
//! many start per second in this process, and the rule that keeps a flood of
//! them from starving other tasks: a delivery waits for its limit only while
//! the entry's waiting share is free and only up to [`HOLD`]; otherwise it is
//! parked through the delay levels (attempt kept) to a slot spread out after
//! the ones already handed out.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::rate::Bucket;

/// The longest a delivery waits in this process for its limit before it is
/// parked instead (it holds a worker permit and a prefetch slot meanwhile).
pub const HOLD: Duration = Duration::from_secs(1);

/// The shortest park: below this the round trip through the delay levels
/// costs more than the wait it spares.
pub const MIN_PARK: Duration = Duration::from_secs(1);

/// Run time assumed for a concurrency-limited task before one has finished.
const FIRST_RUN_GUESS: Duration = Duration::from_secs(1);

pub(crate) struct Limit {
    /// The config key (`limits."<key>"`), also the metric label.
    pub(crate) key: String,
    /// The key has `*` or `#` words.
    pub(crate) pattern: bool,
    concurrency: Option<(usize, Arc<Semaphore>)>,
    bucket: Option<Mutex<Bucket>>,
    /// Deliveries waiting for this limit right now, at most `max_waiting`.
    waiting: AtomicUsize,
    max_waiting: usize,
    /// The latest park slot handed out.
    parked_until: Mutex<Option<Instant>>,
    /// Moving average of run time in µs (concurrency limits spread parks
    /// by it); 0 until a run finished.
    mean_run_us: AtomicU64,
    waited: prometheus::IntCounter,
    parked: prometheus::IntCounter,
}

/// What a delivery does about its limit.
pub(crate) enum Admission<'a> {
    /// Run now; hold the slot until the handler returns.
    Run(Slot<'a>),
    /// Park for this long, attempt kept.
    Park(Duration),
}

/// A running task's place in its limit: frees the concurrency permit when
/// dropped and feeds the run time into the park spacing.
pub(crate) struct Slot<'a> {
    limit: &'a Limit,
    _permit: Option<OwnedSemaphorePermit>,
    started: Instant,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.limit.concurrency.is_some() {
            self.limit.observe_run(self.started.elapsed());
        }
    }
}

/// A delivery counted as waiting for its limit.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limit {
    pub(crate) fn new(
        key: String,
        concurrency: Option<usize>,
        bucket: Option<Bucket>,
        max_waiting: usize,
        metric: &prometheus::IntCounterVec,
    ) -> Self {
        let waited = metric.with_label_values(&[key.as_str(), super::action::WAITED]);
        let parked = metric.with_label_values(&[key.as_str(), super::action::PARKED]);
        Self {
            pattern: key.split('.').any(|w| w == "*" || w == "#"),
            key,
            concurrency: concurrency.map(|n| (n, Arc::new(Semaphore::new(n)))),
            bucket: bucket.map(Mutex::new),
            waiting: AtomicUsize::new(0),
            max_waiting,
            parked_until: Mutex::new(None),
            mean_run_us: AtomicU64::new(0),
            waited,
            parked,
        }
    }

    /// Concurrency first (a rate token taken and then left unused while
    /// waiting for a permit would be lost), then the rate.
    pub(crate) async fn admit(&self) -> Admission<'_> {
        let mut waiting = None;
        let mut permit = None;
        if let Some((_, sem)) = &self.concurrency {
            match sem.clone().try_acquire_owned() {
                Ok(p) => permit = Some(p),
                Err(_) => {
                    let Some(w) = self.enter_waiting() else {
                        return self.park(Instant::now());
                    };
                    waiting = Some(w);
                    match tokio::time::timeout(HOLD, sem.clone().acquire_owned()).await {
                        Ok(Ok(p)) => permit = Some(p),
                        _ => return self.park(Instant::now()),
                    }
                }
            }
        }
        if let Some(bucket) = &self.bucket {
            let now = Instant::now();
            let start = {
                let Ok(mut b) = bucket.lock() else {
                    return Admission::Run(self.slot(permit));
                };
                let wait = b.wait(now);
                if wait > HOLD {
                    None
                } else if wait.is_zero() || waiting.is_some() {
                    Some(b.reserve(now))
                } else {
                    match self.enter_waiting() {
                        Some(w) => {
                            waiting = Some(w);
                            Some(b.reserve(now))
                        }
                        None => None,
                    }
                }
            };
            match start {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => return self.park(now),
            }
        }
        if waiting.is_some() {
            self.waited.inc();
        }
        Admission::Run(self.slot(permit))
    }

    fn slot(&self, permit: Option<OwnedSemaphorePermit>) -> Slot<'_> {
        Slot {
            limit: self,
            _permit: permit,
            started: Instant::now(),
        }
    }

    fn enter_waiting(&self) -> Option<Waiting<'_>> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let w = Waiting(&self.waiting);
        (before < self.max_waiting).then_some(w)
    }

    /// Park to the next free slot after those already handed out, spaced
    /// by how fast this limit lets tasks through, so parked tasks come back
    /// about as fast as they can start instead of all at once.
    fn park(&self, now: Instant) -> Admission<'_> {
        self.parked.inc();
        let mut spacing = Duration::ZERO;
        let mut base = now;
        if let Some((n, _)) = &self.concurrency {
            let mean = match self.mean_run_us.load(Ordering::Relaxed) {
                0 => FIRST_RUN_GUESS,
                us => Duration::from_micros(us),
            };
            spacing = mean / (*n as u32).max(1);
        }
        if let Some(b) = self.bucket.as_ref().and_then(|b| b.lock().ok()) {
            spacing = spacing.max(b.interval());
            base = b.drained_at(now);
        }
        let at = match self.parked_until.lock() {
            Ok(mut last) => {
                let at = last.filter(|l| *l > base).unwrap_or(base) + spacing;
                *last = Some(at);
                at
            }
            Err(_) => base + spacing,
        };
        Admission::Park(park_delay(at.saturating_duration_since(now)))
    }

    /// Exponential moving average, weight 1/8 for the newest run; the
    /// first run sets it.
    fn observe_run(&self, took: Duration) {
        let new = (took.as_micros().min(u128::from(u64::MAX)) as u64).max(1);
        let _ =
            self.mean_run_us
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| match old {
                    0 => Some(new),
                    old => Some(old - old / 8 + new / 8),
                });
    }
}

/// A park of `wanted`, within what the delay levels carry and no shorter
/// than [`MIN_PARK`].
pub(crate) fn park_delay(wanted: Duration) -> Duration {
    wanted.clamp(MIN_PARK, warren::delay::MAX_DELAY)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn metric() -> prometheus::IntCounterVec {
        prometheus::IntCounterVec::new(prometheus::Opts::new("t", "t"), &["limit", "action"])
            .unwrap()
    }

    fn concurrency(n: usize, max_waiting: usize) -> (Limit, prometheus::IntCounterVec) {
        let m = metric();
        (Limit::new("c".into(), Some(n), None, max_waiting, &m), m)
    }

    fn count(m: &prometheus::IntCounterVec, action: &str) -> u64 {
        m.with_label_values(&["c", action]).get()
    }

    #[tokio::test]
    async fn concurrency_waits_within_its_share_then_parks() {
        let (l, m) = concurrency(1, 1);
        let Admission::Run(first) = l.admit().await else {
            panic!("a free permit runs at once")
        };
        // One may wait; while it does, the next is parked at once.
        let waiter = l.admit();
        tokio::pin!(waiter);
        assert!(futures_util::poll!(&mut waiter).is_pending());
        let Admission::Park(d) = l.admit().await else {
            panic!("over the waiting share: parked")
        };
        assert!(d >= MIN_PARK);
        drop(first);
        assert!(matches!(waiter.await, Admission::Run(_)));
        assert_eq!((count(&m, "waited"), count(&m, "parked")), (1, 1));
    }

    #[tokio::test]
    async fn concurrency_waits_at_most_the_hold() {
        let (l, _) = concurrency(1, 4);
        let Admission::Run(_busy) = l.admit().await else {
            panic!()
        };
        let t0 = Instant::now();
        assert!(matches!(l.admit().await, Admission::Park(_)));
        assert!(t0.elapsed() >= HOLD, "waited for the hold");
        assert_eq!(l.waiting.load(Ordering::SeqCst), 0, "no longer waiting");
    }

    #[tokio::test]
    async fn no_waiting_share_means_parking_at_once() {
        let (l, _) = concurrency(1, 0);
        let Admission::Run(_busy) = l.admit().await else {
            panic!()
        };
        let second = l.admit();
        tokio::pin!(second);
        assert!(
            matches!(
                futures_util::poll!(&mut second),
                std::task::Poll::Ready(Admission::Park(_))
            ),
            "parked without waiting"
        );
    }

    #[test]
    fn parks_spread_out_by_the_rate() {
        let m = metric();
        let bucket = Bucket::new("10/s".parse().unwrap(), 1);
        let l = Limit::new("r".into(), None, Some(bucket), 0, &m);
        let now = Instant::now();
        let delays: Vec<Duration> = (0..25)
            .map(|_| match l.park(now) {
                Admission::Park(d) => d,
                Admission::Run(_) => panic!(),
            })
            .collect();
        assert_eq!(delays[0], MIN_PARK, "floored");
        assert_eq!(delays[10], Duration::from_millis(1100));
        assert_eq!(delays[24], Duration::from_millis(2500));
    }

    #[test]
    fn run_time_average_moves_toward_recent_runs() {
        let (l, _) = concurrency(2, 0);
        l.observe_run(Duration::from_millis(800));
        assert_eq!(l.mean_run_us.load(Ordering::SeqCst), 800_000, "first run");
        for _ in 0..64 {
            l.observe_run(Duration::from_millis(200));
        }
        let mean = l.mean_run_us.load(Ordering::SeqCst);
        assert!((195_000..=205_000).contains(&mean), "{mean}");
    }
}
