//! [`Timetable`]: the schedules in force (the [`Book`], fed by the config
//! file and by the API's [`Catalog`]) and how each stands: when it fires
//! next, when it last fired, whether it is paused.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, RwLock};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::book::Book;
use crate::catalog::{Catalog, Effect};
use crate::config::Schedule;
use crate::metrics::Metrics;

/// What one schedule looks like from outside (API, metrics).
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub next_fire: Option<DateTime<Utc>>,
    pub last_fired: Option<DateTime<Utc>>,
    /// Paused by an operator (as this replica last heard from the leader).
    pub paused: bool,
}

/// The schedules in force, their status and pauses, with the schedule
/// series of [`Metrics`] kept in step.
pub struct Timetable {
    metrics: Metrics,
    /// Every schedule in force, from the file and from the API.
    book: Book,
    /// The API's schedules as read from the broker.
    catalog: Catalog,
    /// Whether the API's schedules were read from the broker yet.
    catalog_loaded: watch::Sender<bool>,
    status: Mutex<HashMap<String, Status>>,
    /// Paused schedules: the leader's own set, or what a standby last heard.
    paused: RwLock<BTreeSet<String>>,
}

impl Timetable {
    pub fn new(catalog: Catalog, metrics: Metrics) -> Self {
        Self {
            metrics,
            book: Book::default(),
            catalog,
            catalog_loaded: watch::channel(false).0,
            status: Mutex::new(HashMap::new()),
            paused: RwLock::new(BTreeSet::new()),
        }
    }

    /// The schedules in force now, from both sources.
    pub fn book(&self) -> &Book {
        &self.book
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Put the config file's `schedules` in force (start, SIGHUP): series
    /// and status of removed ones are dropped, those of new ones exist from
    /// now on (zero, not absent).
    pub fn apply_schedules(&self, schedules: Vec<Schedule>) {
        for s in schedules.iter().filter(|s| s.cfg.enabled) {
            self.metrics.init_schedule(s.name());
        }
        let count = schedules.len();
        let shown: Vec<String> = schedules
            .iter()
            .take(20)
            .map(|s| s.name().to_owned())
            .collect();
        for gone in self.book.replace_config(schedules) {
            self.forget(&gone);
        }
        self.count_schedules();
        tracing::info!(schedules = count, first = ?shown, "schedules from the config file in force");
    }

    /// Put what reading the catalog's log decided in force.
    pub fn catalog_effect(&self, e: Effect) {
        match e {
            Effect::Put(s) => {
                self.put_api_schedule(*s);
            }
            Effect::Remove(name) => self.remove_api_schedule(&name),
            Effect::None => {}
        }
    }

    /// Put an API schedule in force (from the catalog); `false` when a
    /// config-file schedule has its name.
    pub fn put_api_schedule(&self, s: Schedule) -> bool {
        if s.cfg.enabled {
            self.metrics.init_schedule(s.name());
        }
        let done = self.book.put_api(s);
        self.count_schedules();
        done
    }

    /// Take an API schedule out of force (from the catalog).
    pub fn remove_api_schedule(&self, name: &str) {
        if self.book.remove_api(name) {
            self.forget(name);
        }
        self.count_schedules();
    }

    fn forget(&self, name: &str) {
        self.metrics.forget_schedule(name);
        if let Ok(mut m) = self.status.lock() {
            m.remove(name);
        }
    }

    fn count_schedules(&self) {
        let (config, api) = self.book.counts();
        let g = &self.metrics.schedules;
        g.with_label_values(&["config"]).set(config as i64);
        g.with_label_values(&["api"]).set(api as i64);
    }

    /// The API's schedules have been read from the broker (each replica,
    /// once, at start).
    pub fn set_catalog_loaded(&self) {
        self.catalog_loaded.send_replace(true);
    }

    /// Resolves once the API's schedules are in the book.
    pub async fn catalog_loaded(&self) {
        let mut rx = self.catalog_loaded.subscribe();
        let _ = rx.wait_for(|loaded| *loaded).await;
    }

    pub fn set_next(&self, name: &str, next: Option<DateTime<Utc>>) {
        // 0 = no further fire (e.g. a 7-field expression whose years are over).
        self.metrics.next_fire(name, next);
        if let Ok(mut m) = self.status.lock() {
            match m.get_mut(name) {
                Some(st) => st.next_fire = next,
                None => {
                    m.entry(name.to_owned()).or_default().next_fire = next;
                }
            }
        }
    }

    pub fn set_last(&self, name: &str, t: DateTime<Utc>) {
        if let Ok(mut m) = self.status.lock() {
            match m.get_mut(name) {
                Some(st) => st.last_fired = Some(t),
                None => {
                    m.entry(name.to_owned()).or_default().last_fired = Some(t);
                }
            }
        }
    }

    pub fn status_of(&self, name: &str) -> Status {
        let mut st = self
            .status
            .lock()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .unwrap_or_default();
        st.paused = self.is_paused(name);
        st
    }

    pub fn is_paused(&self, name: &str) -> bool {
        self.paused.read().is_ok_and(|p| p.contains(name))
    }

    pub fn paused(&self) -> BTreeSet<String> {
        self.paused.read().map(|p| p.clone()).unwrap_or_default()
    }

    /// Put `paused` in force (the leader, from its snapshot or a request;
    /// a standby, from the leader's events).
    pub fn set_paused(&self, paused: BTreeSet<String>) {
        if let Ok(mut p) = self.paused.write() {
            *p = paused;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::book::Origin;

    fn timetable() -> Timetable {
        let metrics = Metrics::register(&prometheus::Registry::new(), 100).unwrap();
        let compile =
            Box::new(|def: &crate::config::ScheduleConfig| crate::config::compile_one(def, &[]));
        Timetable::new(Catalog::new(compile), metrics)
    }

    fn schedule(name: &str, origin: Origin) -> Schedule {
        let def = toml::from_str(&format!(
            "name = \"{name}\"\ncron = \"0 * * * *\"\ntask = \"t\"\n"
        ))
        .unwrap();
        let mut s = crate::config::compile_one(&def, &[]).unwrap();
        s.origin = origin;
        s
    }

    #[test]
    fn a_schedules_status_shows_its_fires_and_pause_until_it_leaves_the_book() {
        let t = timetable();
        assert!(t.put_api_schedule(schedule("a", Origin::Api)));
        let at = Utc::now();
        t.set_next("a", Some(at));
        t.set_last("a", at);
        t.set_paused(BTreeSet::from(["a".to_owned()]));
        let st = t.status_of("a");
        assert_eq!(
            (st.next_fire, st.last_fired, st.paused),
            (Some(at), Some(at), true)
        );
        assert!(!t.is_paused("b"));

        t.remove_api_schedule("a");
        assert!(t.book().get("a").is_none());
        let st = t.status_of("a");
        assert_eq!((st.next_fire, st.last_fired), (None, None));
    }

    #[test]
    fn a_config_schedule_keeps_its_name_from_the_api() {
        let t = timetable();
        t.apply_schedules(vec![schedule("a", Origin::Config)]);
        assert!(!t.put_api_schedule(schedule("a", Origin::Api)));
        assert_eq!(t.book().counts(), (1, 0));
    }

    #[tokio::test]
    async fn catalog_loaded_waits_until_the_catalog_was_read() {
        let t = timetable();
        let wait = Duration::from_millis(50);
        assert!(tokio::time::timeout(wait, t.catalog_loaded())
            .await
            .is_err());
        t.set_catalog_loaded();
        assert!(tokio::time::timeout(wait, t.catalog_loaded()).await.is_ok());
    }
}
