//! [`Replicas`]: this producer replica's name, the others it heard
//! announce themselves, and the control events among them (a pause or
//! resume relayed to the leader waits for its answer here).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::broadcast;

use super::Leadership;
use crate::control::{self, ControlError, Op, Presence};

pub struct Replicas {
    /// This replica's name (`<host>:<pid>`).
    instance: String,
    leadership: Arc<Leadership>,
    /// Every control event heard.
    events: broadcast::Sender<control::Event>,
    /// Replicas heard announcing themselves, and when.
    heard: Mutex<HashMap<String, (Presence, Instant)>>,
}

impl Replicas {
    pub fn new(instance: String, leadership: Arc<Leadership>) -> Self {
        Self {
            instance,
            leadership,
            events: broadcast::channel(64).0,
            heard: Mutex::new(HashMap::new()),
        }
    }

    /// This replica's name (`<host>:<pid>`).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// A replica's announcement (this one's own included: the exchange
    /// fans out to every replica).
    pub fn on_presence(&self, p: Presence) {
        if let Ok(mut g) = self.heard.lock() {
            // One leader at a time: the newest claim wins over an older one
            // from a replica that died without saying so (`kill -9`).
            if p.leader {
                for (other, _) in g.values_mut() {
                    other.leader = false;
                }
            }
            g.insert(p.instance.clone(), (p, Instant::now()));
        }
    }

    /// Replicas heard within [`control::PRESENCE_TTL`], this one always
    /// first (as it is now), then by name.
    pub fn list(&self) -> Vec<Presence> {
        let me = Presence {
            instance: self.instance.clone(),
            leader: self.leadership.is_leader(),
        };
        let mut others: Vec<Presence> = match self.heard.lock() {
            Ok(mut g) => {
                g.retain(|_, (_, seen)| seen.elapsed() < control::PRESENCE_TTL);
                g.values()
                    .filter(|(p, _)| p.instance != me.instance)
                    .map(|(p, _)| Presence {
                        instance: p.instance.clone(),
                        leader: p.leader && !me.leader,
                    })
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        others.sort_by(|a, b| a.instance.cmp(&b.instance));
        let mut out = vec![me];
        out.extend(others);
        out
    }

    /// Wake whoever waits for the answer to a request.
    pub fn on_event(&self, event: control::Event) {
        let _ = self.events.send(event);
    }

    /// Send `op` on schedule `name` to the leader over `conn` and wait for
    /// its answer: `Ok` once the leader recorded it in its state snapshot.
    pub async fn relay(
        &self,
        conn: &lapin::Connection,
        prefix: &str,
        op: Op,
        name: &str,
    ) -> Result<(), ControlError> {
        let req = control::Request {
            id: uuid::Uuid::new_v4().to_string(),
            op,
            schedule: Some(name.to_owned()),
        };
        // Subscribed before sending: the answer cannot slip past.
        let mut rx = self.events.subscribe();
        control::send(conn, prefix, &req)
            .await
            .map_err(|_| ControlError::Unavailable)?;
        let answer = async {
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.answers.as_deref() == Some(req.id.as_str()) => return Some(ev),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        };
        match tokio::time::timeout(control::REPLY_TIMEOUT, answer).await {
            Ok(Some(ev)) => match ev.error {
                None => Ok(()),
                Some(e) => Err(ControlError::Refused(e)),
            },
            _ => Err(ControlError::NoLeader),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn replicas(leading: bool) -> Replicas {
        let gauge = prometheus::IntGauge::new("leader", "leader").unwrap();
        let leadership = Arc::new(Leadership::new(gauge));
        leadership.set(leading);
        Replicas::new("me:1".into(), leadership)
    }

    fn heard(r: &Replicas, instance: &str, leader: bool) {
        r.on_presence(Presence {
            instance: instance.into(),
            leader,
        });
    }

    fn leaders(r: &Replicas) -> Vec<String> {
        r.list()
            .into_iter()
            .filter(|p| p.leader)
            .map(|p| p.instance)
            .collect()
    }

    #[test]
    fn this_replica_comes_first_and_the_newest_leader_claim_wins() {
        let r = replicas(false);
        heard(&r, "b:2", true);
        heard(&r, "a:3", false);
        // Its own announcement comes back through the exchange.
        heard(&r, "me:1", false);
        let names: Vec<String> = r.list().into_iter().map(|p| p.instance).collect();
        assert_eq!(names, ["me:1", "a:3", "b:2"]);
        assert_eq!(leaders(&r), ["b:2"]);

        heard(&r, "a:3", true);
        assert_eq!(leaders(&r), ["a:3"]);
    }

    #[test]
    fn a_leading_replica_lists_no_other_leader() {
        let r = replicas(true);
        heard(&r, "b:2", true);
        assert_eq!(leaders(&r), ["me:1"]);
    }
}
