//! The schedule book: every schedule in force, by name, from both sources —
//! the config file (replaced whole on SIGHUP) and the API's catalog
//! ([`crate::catalog`], changed one schedule at a time) — and a feed of what
//! changed, so that the fire loop re-plans only the schedules a change
//! touched instead of all of them.
//!
//! One name is one schedule: a config-file schedule shadows an API one of
//! the same name (the API refuses to create it; a catalog record made before
//! the file gained the name stays stored but out of force).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use tokio::sync::broadcast;

use crate::config::Schedule;

pub use crate::config::Origin;

/// What changed in the book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This schedule was added, replaced or removed: look it up again.
    One(String),
    /// Too much at once (or the listener fell behind): look at everything.
    All,
}

/// More changes than this in one reload are announced as [`Change::All`].
const MAX_SINGLE_CHANGES: usize = 4096;

pub struct Book {
    map: RwLock<BTreeMap<String, Arc<Schedule>>>,
    /// API schedules shadowed by a config-file schedule of the same name.
    shadowed: RwLock<BTreeMap<String, Arc<Schedule>>>,
    feed: broadcast::Sender<Change>,
}

impl Default for Book {
    fn default() -> Self {
        Self {
            map: RwLock::default(),
            shadowed: RwLock::default(),
            feed: broadcast::channel(MAX_SINGLE_CHANGES * 2).0,
        }
    }
}

impl Book {
    /// Told of every change; a receiver that lags must look at everything.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Schedule>> {
        self.map.read().ok()?.get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.read().is_ok_and(|m| m.contains_key(name))
    }

    pub fn len(&self) -> usize {
        self.map.read().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every schedule, by name (cost grows with the book: for resyncs and
    /// whole listings, not per event).
    pub fn all(&self) -> Vec<Arc<Schedule>> {
        self.map
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Up to `limit` schedules whose names start with `prefix`, after the
    /// name `after`, by name.
    pub fn page(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<Arc<Schedule>> {
        let Ok(m) = self.map.read() else {
            return Vec::new();
        };
        let start = match after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a.to_owned()),
            _ => std::ops::Bound::Included(prefix.to_owned()),
        };
        m.range((start, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How many schedules of each origin: (config, api).
    pub fn counts(&self) -> (usize, usize) {
        let Ok(m) = self.map.read() else {
            return (0, 0);
        };
        let api = m.values().filter(|s| s.origin == Origin::Api).count();
        (m.len() - api, api)
    }

    /// Put the config file's schedules in force (start, SIGHUP); API
    /// schedules stay, except where the file now names them. The names
    /// whose schedule went away, for their metrics and status.
    pub fn replace_config(&self, list: Vec<Schedule>) -> Vec<String> {
        let mut changed = Vec::new();
        let mut gone = Vec::new();
        {
            let (Ok(mut m), Ok(mut shadowed)) = (self.map.write(), self.shadowed.write()) else {
                return gone;
            };
            let incoming: BTreeMap<String, Arc<Schedule>> = list
                .into_iter()
                .map(|s| (s.name().to_owned(), Arc::new(s)))
                .collect();
            let old_config: Vec<String> = m
                .iter()
                .filter(|(_, s)| s.origin == Origin::Config)
                .map(|(k, _)| k.clone())
                .collect();
            for name in old_config {
                if !incoming.contains_key(&name) {
                    m.remove(&name);
                    // An API schedule it shadowed comes back into force.
                    match shadowed.remove(&name) {
                        Some(api) => {
                            m.insert(name.clone(), api);
                        }
                        None => gone.push(name.clone()),
                    }
                    changed.push(name);
                }
            }
            for (name, s) in incoming {
                match m.get(&name) {
                    Some(old) if old.origin == Origin::Config && same(old, &s) => continue,
                    Some(old) if old.origin == Origin::Api => {
                        tracing::warn!(schedule = %name, "the config file now names an API schedule: the file's definition is in force");
                        shadowed.insert(name.clone(), old.clone());
                    }
                    _ => {}
                }
                m.insert(name.clone(), s);
                changed.push(name);
            }
        }
        self.announce(changed);
        gone
    }

    /// Put an API schedule in force (`false`: a config-file schedule has
    /// that name; the API schedule is kept aside, out of force).
    pub fn put_api(&self, s: Schedule) -> bool {
        let name = s.name().to_owned();
        let s = Arc::new(s);
        {
            let (Ok(mut m), Ok(mut shadowed)) = (self.map.write(), self.shadowed.write()) else {
                return false;
            };
            if m.get(&name).is_some_and(|o| o.origin == Origin::Config) {
                shadowed.insert(name, s);
                return false;
            }
            m.insert(name.clone(), s);
        }
        self.announce(vec![name]);
        true
    }

    /// Take an API schedule out of force; whether it was in force.
    pub fn remove_api(&self, name: &str) -> bool {
        let removed = {
            let (Ok(mut m), Ok(mut shadowed)) = (self.map.write(), self.shadowed.write()) else {
                return false;
            };
            shadowed.remove(name);
            match m.get(name) {
                Some(s) if s.origin == Origin::Api => m.remove(name).is_some(),
                _ => false,
            }
        };
        if removed {
            self.announce(vec![name.to_owned()]);
        }
        removed
    }

    fn announce(&self, changed: Vec<String>) {
        if changed.len() > MAX_SINGLE_CHANGES {
            let _ = self.feed.send(Change::All);
            return;
        }
        for name in changed {
            let _ = self.feed.send(Change::One(name));
        }
    }
}

/// Whether two definitions fire the same tasks at the same instants.
fn same(a: &Schedule, b: &Schedule) -> bool {
    a.cfg == b.cfg && a.version == b.version
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{compile_schedules, ScheduleConfig};

    fn schedule(name: &str, cron: &str, origin: Origin) -> Schedule {
        let cfg: ScheduleConfig = toml::from_str(&format!(
            "name = \"{name}\"\ncron = \"{cron}\"\ntask = \"t\"\n"
        ))
        .unwrap();
        let mut s = compile_schedules(&[cfg]).unwrap().remove(0);
        s.origin = origin;
        s
    }

    fn drain(rx: &mut broadcast::Receiver<Change>) -> Vec<Change> {
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            out.push(c);
        }
        out
    }

    #[test]
    fn a_reload_announces_only_what_changed() {
        let book = Book::default();
        let mut rx = book.subscribe();
        book.replace_config(vec![
            schedule("a", "* * * * * *", Origin::Config),
            schedule("b", "* * * * * *", Origin::Config),
        ]);
        assert_eq!(drain(&mut rx).len(), 2);
        let gone = book.replace_config(vec![
            schedule("a", "* * * * * *", Origin::Config),
            schedule("c", "*/2 * * * * *", Origin::Config),
        ]);
        assert_eq!(gone, ["b"]);
        assert_eq!(
            drain(&mut rx),
            [Change::One("b".into()), Change::One("c".into())]
        );
    }

    #[test]
    fn the_config_file_shadows_an_api_schedule_of_the_same_name() {
        let book = Book::default();
        assert!(book.put_api(schedule("x", "* * * * * *", Origin::Api)));
        book.replace_config(vec![schedule("x", "*/5 * * * * *", Origin::Config)]);
        assert_eq!(book.get("x").unwrap().origin, Origin::Config);
        assert!(!book.put_api(schedule("x", "* * * * * *", Origin::Api)));
        // The file drops it: the API schedule is back in force.
        book.replace_config(vec![]);
        assert_eq!(book.get("x").unwrap().origin, Origin::Api);
        assert!(book.remove_api("x"));
        assert!(book.is_empty());
    }

    #[test]
    fn pages_by_prefix_and_after() {
        let book = Book::default();
        for n in ["a.1", "a.2", "a.3", "b.1"] {
            book.put_api(schedule(n, "* * * * * *", Origin::Api));
        }
        let names =
            |v: Vec<Arc<Schedule>>| v.iter().map(|s| s.name().to_owned()).collect::<Vec<_>>();
        assert_eq!(names(book.page("a.", None, 2)), ["a.1", "a.2"]);
        assert_eq!(names(book.page("a.", Some("a.2"), 10)), ["a.3"]);
        assert_eq!(names(book.page("", Some("a.3"), 10)), ["b.1"]);
        assert_eq!(book.counts(), (0, 4));
    }
}
