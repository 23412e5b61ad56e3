//! Wall-clock steps: detecting them against the monotonic clock, and what a
//! step does to a schedule's cursor. Pure: callers pass in clock samples.
//!
//! * **Backward** (NTP correcting a fast clock, a VM restored from a
//!   snapshot): the schedule keeps firing from the new now. An instant this
//!   replica already decided (fired, or counted missed) is never fired again,
//!   because its task went out already under the same id; every instant it
//!   never decided fires on time. Without this, the cursor would wait for the
//!   instant after the last fire: silence for the size of the step.
//! * **Forward** (NTP correcting a slow clock, a suspended VM or laptop
//!   resuming): the instants jumped over are overdue like after any outage,
//!   and the schedule's misfire policy decides (bounded by `misfire_grace`
//!   and `max_catch_up`). They are real instants: on a slow clock they
//!   passed already in true time, and the monotonic clock stops while a
//!   machine is suspended, so a resume looks exactly like a forward step
//!   while the work really was missed. A standby taking over at that moment
//!   would apply the same policy: one rule, whichever replica leads.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::schedule::Spec;

/// Disagreement between the two clocks that counts as a step. NTP slews
/// at most 500 ppm (15 ms over the 30 s longest sleep): far below.
pub const STEP_TOLERANCE: Duration = Duration::from_secs(1);

/// The wall clock and the monotonic clock read together.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub wall: DateTime<Utc>,
    pub mono: Instant,
}

impl Sample {
    pub fn now() -> Sample {
        Sample {
            mono: Instant::now(),
            wall: Utc::now(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    None,
    Backward(Duration),
    Forward(Duration),
}

/// Whether the wall clock stepped between two samples: how far it moved
/// beyond (or short of) the real time that passed.
pub fn detect(prev: Sample, now: Sample) -> Step {
    let real = now.mono.saturating_duration_since(prev.mono);
    let real = chrono::TimeDelta::from_std(real).unwrap_or(chrono::TimeDelta::MAX);
    let skew = (now.wall - prev.wall) - real;
    let tolerance = chrono::TimeDelta::from_std(STEP_TOLERANCE).unwrap_or_default();
    if skew > tolerance {
        Step::Forward(skew.to_std().unwrap_or_default())
    } else if skew < -tolerance {
        Step::Backward((-skew).to_std().unwrap_or_default())
    } else {
        Step::None
    }
}

/// Which instants of one schedule are still to be decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Track {
    /// The next instant considered is the first one after this.
    pub cursor: DateTime<Utc>,
    /// Instants in `(from, until]` were decided before a backward step and
    /// are never fired again.
    pub skip: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Every instant in `(since, cursor]` was decided by this replica;
    /// `None` when instants before the cursor came from another leader's
    /// state and are not known one by one.
    pub since: Option<DateTime<Utc>>,
}

impl Track {
    /// A schedule this replica starts deciding at `now`.
    pub fn fresh(now: DateTime<Utc>) -> Track {
        Track {
            cursor: now,
            skip: None,
            since: Some(now),
        }
    }

    /// A schedule resumed from a previous leader's cursor. A cursor ahead of
    /// this replica's clock (the previous leader's clock ran ahead) is a
    /// backward step as seen from here.
    pub fn resumed(cursor: DateTime<Utc>, now: DateTime<Utc>) -> Track {
        let mut t = Track {
            cursor,
            skip: None,
            since: None,
        };
        t.stepped_back(now);
        t
    }

    /// The latest instant decided: what a new leader must not fire again.
    pub fn high_water(&self) -> DateTime<Utc> {
        self.skip.map_or(self.cursor, |(_, b)| b.max(self.cursor))
    }

    pub fn skips(&self, t: DateTime<Utc>) -> bool {
        self.skip.is_some_and(|(a, b)| t > a && t <= b)
    }

    /// The wall clock went back to `now`: fire again from `now`, except the
    /// instants already decided.
    pub fn stepped_back(&mut self, now: DateTime<Utc>) {
        if now >= self.cursor {
            return;
        }
        let high = self.high_water();
        // Instants before `since` were never decided here and may fire.
        // (A second step while a skip is still pending also skips the
        // undecided instants between the cursor and the pending skip: rare,
        // and it errs towards not firing an id twice.)
        let from = self.since.map_or(now, |s| s.max(now));
        self.skip = (from < high).then_some((from, high));
        self.since = self.since.map(|s| s.min(now));
        self.cursor = now;
    }

    /// Every instant up to `t` has been decided.
    pub fn advance(&mut self, t: DateTime<Utc>) {
        self.cursor = self.cursor.max(t);
        if self.skip.is_some_and(|(_, b)| self.cursor >= b) {
            self.skip = None;
        }
    }

    /// The next instant to decide.
    pub fn next(&self, spec: &Spec) -> Option<DateTime<Utc>> {
        let n = spec.next_after(self.cursor)?;
        match self.skip {
            Some((_, b)) if self.skips(n) => spec.next_after(b),
            _ => Some(n),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::schedule::{parse, DstGap, DstOverlap};

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn every_5s() -> Spec {
        parse(
            "*/5 * * * * *",
            chrono_tz::Tz::UTC,
            DstGap::Shift,
            DstOverlap::First,
        )
        .unwrap()
    }

    fn sample(base: Instant, real_secs: u64, wall: &str) -> Sample {
        Sample {
            mono: base + Duration::from_secs(real_secs),
            wall: utc(wall),
        }
    }

    #[test]
    fn detects_steps_in_both_directions() {
        let base = Instant::now();
        let prev = sample(base, 0, "2026-01-01T10:00:00Z");
        // 30 s of real time, 30 s on the wall: steady.
        let steady = sample(base, 30, "2026-01-01T10:00:30Z");
        assert_eq!(detect(prev, steady), Step::None);
        // Under the tolerance (slew, scheduling noise): steady.
        let noise = sample(base, 30, "2026-01-01T10:00:30.900Z");
        assert_eq!(detect(prev, noise), Step::None);
        // 5 s real, the wall went back an hour.
        let back = sample(base, 5, "2026-01-01T09:00:05Z");
        assert_eq!(
            detect(prev, back),
            Step::Backward(Duration::from_secs(3600))
        );
        // 5 s real, the wall went forward an hour.
        let fwd = sample(base, 5, "2026-01-01T11:00:05Z");
        assert_eq!(detect(prev, fwd), Step::Forward(Duration::from_secs(3600)));
    }

    /// The defect: started at 10:00, fired up to 10:00:30, clock back an
    /// hour. The instants of the past hour were never fired here: they fire
    /// at once, on time; 10:00:05..10:00:30 (fired) never again.
    #[test]
    fn backward_step_fires_from_the_new_now_but_no_id_twice() {
        let s = every_5s();
        let mut t = Track::fresh(utc("2026-01-01T10:00:00Z"));
        t.advance(utc("2026-01-01T10:00:30Z"));
        t.stepped_back(utc("2026-01-01T09:00:32Z"));
        assert_eq!(t.next(&s), Some(utc("2026-01-01T09:00:35Z")));
        assert_eq!(t.high_water(), utc("2026-01-01T10:00:30Z"));
        // Up to the old start, instants fire; then the decided ones are skipped.
        t.advance(utc("2026-01-01T09:59:55Z"));
        assert_eq!(t.next(&s), Some(utc("2026-01-01T10:00:00Z")));
        t.advance(utc("2026-01-01T10:00:00Z"));
        assert!(t.skips(utc("2026-01-01T10:00:05Z")));
        assert!(t.skips(utc("2026-01-01T10:00:30Z")));
        assert!(!t.skips(utc("2026-01-01T10:00:35Z")));
        assert_eq!(t.next(&s), Some(utc("2026-01-01T10:00:35Z")));
        t.advance(utc("2026-01-01T10:00:35Z"));
        assert_eq!(t.skip, None, "the skip ends once the cursor passes it");
    }

    /// A replica that decided every instant of the repeated span stays
    /// silent for it: firing those instants again would repeat ids.
    #[test]
    fn backward_step_over_decided_instants_skips_them() {
        let s = every_5s();
        let mut t = Track::fresh(utc("2026-01-01T08:00:00Z"));
        t.advance(utc("2026-01-01T10:00:30Z"));
        t.stepped_back(utc("2026-01-01T09:00:32Z"));
        assert_eq!(t.next(&s), Some(utc("2026-01-01T10:00:35Z")));
        // A cursor from another leader's state: nothing before it is known.
        let r = Track::resumed(utc("2026-01-01T10:00:30Z"), utc("2026-01-01T10:00:10Z"));
        assert_eq!(r.next(&s), Some(utc("2026-01-01T10:00:35Z")));
        assert_eq!(r.high_water(), utc("2026-01-01T10:00:30Z"));
        // A cursor behind this replica's clock: no step, nothing skipped.
        let r = Track::resumed(utc("2026-01-01T10:00:30Z"), utc("2026-01-01T10:01:00Z"));
        assert_eq!(r.skip, None);
        assert_eq!(r.next(&s), Some(utc("2026-01-01T10:00:35Z")));
    }

    /// A forward step changes nothing here: the overdue instants are left to
    /// the misfire plan, exactly as after an outage.
    #[test]
    fn forward_step_leaves_the_cursor_to_the_misfire_policy() {
        let s = every_5s();
        let mut t = Track::fresh(utc("2026-01-01T10:00:00Z"));
        t.advance(utc("2026-01-01T10:00:30Z"));
        let before = t.clone();
        t.stepped_back(utc("2026-01-01T11:00:30Z")); // not back: no-op
        assert_eq!(t, before);
        assert_eq!(t.next(&s), Some(utc("2026-01-01T10:00:35Z")));
        let due = s.fires_between(t.cursor, utc("2026-01-01T11:00:32Z"), usize::MAX);
        let p = crate::schedule::plan(
            crate::schedule::MisfirePolicy::CatchUp,
            Duration::from_secs(10),
            100,
            &due,
            0,
            utc("2026-01-01T11:00:32Z"),
        );
        // Only the instants within the 10 s grace: 11:00:25 and 11:00:30.
        assert_eq!(
            p.fire,
            [utc("2026-01-01T11:00:25Z"), utc("2026-01-01T11:00:30Z")]
        );
        assert_eq!(p.missed, due.len() as u64 - 2);
    }

    #[test]
    fn second_backward_step_keeps_every_decided_instant_skipped() {
        let s = every_5s();
        let mut t = Track::fresh(utc("2026-01-01T10:00:00Z"));
        t.advance(utc("2026-01-01T10:00:30Z"));
        t.stepped_back(utc("2026-01-01T09:00:32Z"));
        t.advance(utc("2026-01-01T09:00:45Z"));
        t.stepped_back(utc("2026-01-01T08:00:00Z"));
        // 09:00:35..09:00:45 and 10:00:05..10:00:30 were fired: skipped.
        assert!(t.skips(utc("2026-01-01T09:00:40Z")));
        assert!(t.skips(utc("2026-01-01T10:00:30Z")));
        assert_eq!(t.next(&s), Some(utc("2026-01-01T08:00:05Z")));
        assert_eq!(t.high_water(), utc("2026-01-01T10:00:30Z"));
    }
}
