//! [`Leadership`]: whether this replica is the active scheduler, what the
//! elector writes and the API, the console and the scheduler read.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::IntGauge;

/// The leader flag, exported as `warren_producer_leader`, with a wake-up
/// on every change.
pub struct Leadership {
    leader: AtomicBool,
    /// Woken when `leader` changes, so replicas hear of it at once.
    changed: tokio::sync::Notify,
    gauge: IntGauge,
}

impl Leadership {
    pub fn new(gauge: IntGauge) -> Self {
        Self {
            leader: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            gauge,
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Record (and export) whether this replica is the active scheduler.
    pub fn set(&self, leading: bool) {
        let was = self.leader.swap(leading, Ordering::SeqCst);
        self.gauge.set(i64::from(leading));
        if was != leading {
            self.changed.notify_one();
        }
    }

    /// Resolves after this replica took or lost the lead (a change made
    /// before the call counts: `Notify` keeps one permit).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}
