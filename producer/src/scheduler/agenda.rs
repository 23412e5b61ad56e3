//! The agenda: every schedule's next instant, ordered, so that a wake-up
//! touches only what is due (O(log N) per schedule that fires) instead of
//! scanning all N schedules. A binary heap with lazy deletion: changing or
//! removing a schedule leaves its old entry in the heap, recognised as stale
//! by its generation when it reaches the top. Pure: no clock, no I/O.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};

/// An entry: when, its generation, whose.
type Slot = Reverse<(DateTime<Utc>, u64, Arc<str>)>;

#[derive(Default)]
pub struct Agenda {
    heap: BinaryHeap<Slot>,
    /// The live generation of each schedule on the agenda.
    live: HashMap<Arc<str>, u64>,
    generation: u64,
}

impl Agenda {
    /// Put `name` on the agenda at `at` (replacing where it was); `None`
    /// takes it off.
    pub fn set(&mut self, name: &str, at: Option<DateTime<Utc>>) {
        let Some(at) = at else {
            self.remove(name);
            return;
        };
        self.generation += 1;
        let key: Arc<str> = match self.live.get_key_value(name) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        };
        self.live.insert(key.clone(), self.generation);
        self.heap.push(Reverse((at, self.generation, key)));
        self.compact_if_stale();
    }

    pub fn remove(&mut self, name: &str) {
        self.live.remove(name);
        self.compact_if_stale();
    }

    pub fn clear(&mut self) {
        self.heap.clear();
        self.live.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// The earliest instant on the agenda.
    pub fn next_at(&mut self) -> Option<DateTime<Utc>> {
        self.drop_stale_top();
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Take off every schedule due at `now` (their instants at or before
    /// it), earliest first. The caller puts each back at its next instant.
    pub fn pop_due(&mut self, now: DateTime<Utc>) -> Vec<Arc<str>> {
        let mut due = Vec::new();
        loop {
            self.drop_stale_top();
            match self.heap.peek() {
                Some(Reverse((at, _, _))) if *at <= now => {}
                _ => break,
            }
            if let Some(Reverse((_, _, name))) = self.heap.pop() {
                self.live.remove(&name);
                due.push(name);
            }
        }
        due
    }

    fn is_live(&self, generation: u64, name: &str) -> bool {
        self.live.get(name) == Some(&generation)
    }

    fn drop_stale_top(&mut self) {
        while let Some(Reverse((_, g, name))) = self.heap.peek() {
            if self.is_live(*g, name) {
                return;
            }
            self.heap.pop();
        }
    }

    /// Stale entries are dropped when they reach the top; if changes pile
    /// them up faster, rebuild (amortised O(1) per change).
    fn compact_if_stale(&mut self) {
        if self.heap.len() <= 2 * self.live.len() + 1024 {
            return;
        }
        let heap = std::mem::take(&mut self.heap);
        self.heap = heap
            .into_iter()
            .filter(|Reverse((_, g, name))| self.is_live(*g, name))
            .collect();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(s: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + i64::from(s), 0).unwrap()
    }

    fn names(v: Vec<Arc<str>>) -> Vec<String> {
        v.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn pops_only_what_is_due_earliest_first() {
        let mut a = Agenda::default();
        a.set("c", Some(t(30)));
        a.set("a", Some(t(10)));
        a.set("b", Some(t(20)));
        assert_eq!(a.next_at(), Some(t(10)));
        assert_eq!(names(a.pop_due(t(20))), ["a", "b"]);
        assert_eq!(a.next_at(), Some(t(30)));
        assert!(a.pop_due(t(29)).is_empty());
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn a_moved_or_removed_schedule_leaves_no_trace() {
        let mut a = Agenda::default();
        a.set("x", Some(t(10)));
        a.set("x", Some(t(50)));
        a.set("y", Some(t(20)));
        a.remove("y");
        assert_eq!(a.next_at(), Some(t(50)));
        assert!(a.pop_due(t(40)).is_empty());
        assert_eq!(names(a.pop_due(t(50))), ["x"]);
        a.set("z", None);
        assert_eq!(a.next_at(), None);
    }

    #[test]
    fn churn_does_not_grow_the_heap_without_bound() {
        let mut a = Agenda::default();
        for i in 0..100_000u32 {
            a.set("only", Some(t(i)));
        }
        assert!(a.heap.len() <= 2 * a.len() + 1025, "{}", a.heap.len());
        assert_eq!(names(a.pop_due(t(200_000))), ["only"]);
    }
}
