//! [`BrokerLink`]: the API's link to the broker (its publisher while
//! connected) and the keys every publish is sealed with, replaced whole on
//! reload.

use std::sync::{Arc, RwLock};

use warren::amqp::Publisher;
use warren::security::Seal;

use crate::metrics::{Metrics, Source};

/// The publishing side the API uses: present while connected.
#[derive(Clone)]
pub struct ApiPublisher {
    pub publisher: Publisher,
    pub blocked: warren::amqp::Blocked,
    /// The API connection itself (the dead-letter endpoints open channels on it).
    pub conn: Arc<lapin::Connection>,
}

impl ApiPublisher {
    /// `publish`, unless the broker starts blocking publishers first: then
    /// `None`, with its `n` tasks counted as failed under `source`. The
    /// broker only reports "blocked" once a publish reaches it during an
    /// alarm, so the first publish after an alarm would otherwise wait out
    /// the confirm timeout; the caller answers at once instead.
    pub async fn unless_blocked<T>(
        &self,
        metrics: &Metrics,
        source: Source,
        n: usize,
        publish: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::select! {
            r = publish => Some(r),
            () = self.blocked.until_blocked() => {
                metrics
                    .publish_failures
                    .with_label_values(&[source.label()])
                    .inc_by(n as u64);
                None
            }
        }
    }
}

/// The API's publisher slot (filled by the connection loop) and the seal.
#[derive(Default)]
pub struct BrokerLink {
    publisher: RwLock<Option<ApiPublisher>>,
    /// Signs and encrypts every task published (`security.*`); replaced
    /// whole on reload.
    seal: RwLock<Option<Arc<Seal>>>,
}

impl BrokerLink {
    /// The API's publisher, sealing with the keys in force now.
    pub fn publisher(&self) -> Option<ApiPublisher> {
        let p = self.publisher.read().ok().and_then(|g| g.clone())?;
        Some(ApiPublisher {
            publisher: p.publisher.sealed(self.seal()),
            blocked: p.blocked,
            conn: p.conn,
        })
    }

    /// The API's broker connection while it is up: what the dead-letter
    /// engine ([`warren::dead`]) runs on, for the API and the console.
    pub fn connection(&self) -> Option<Arc<lapin::Connection>> {
        self.publisher().map(|p| p.conn)
    }

    pub fn set_publisher(&self, publisher: Option<ApiPublisher>) {
        if let Ok(mut g) = self.publisher.write() {
            *g = publisher;
        }
    }

    pub fn seal(&self) -> Option<Arc<Seal>> {
        self.seal.read().ok().and_then(|g| g.clone())
    }

    pub fn set_seal(&self, seal: Option<Arc<Seal>>) {
        if let Ok(mut g) = self.seal.write() {
            *g = seal;
        }
    }
}
