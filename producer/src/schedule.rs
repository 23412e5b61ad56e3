//! Pure schedule math: parsing every accepted syntax into a [`Spec`], the next
//! fire instant after a given instant (with the DST rules), and the misfire
//! [`plan`] that decides which overdue instants still fire.
//!
//! Nothing here reads a clock or does I/O: every function takes `now` or
//! `after` as an argument, so the rules are unit-tested exactly.
//!
//! Cron expressions are evaluated in *local wall-clock time* of the schedule's
//! zone, then mapped to UTC instants:
//!
//! * a local time inside a spring-forward gap does not exist: [`DstGap::Shift`]
//!   (default) moves it forward by the length of the gap (02:30 → 03:30 on the
//!   US spring-forward day), [`DstGap::Skip`] drops it;
//! * a local time inside a fall-back overlap happens twice:
//!   [`DstOverlap::First`] (default) fires at the earlier instant only,
//!   [`DstOverlap::Last`] at the later one, [`DstOverlap::Both`] at both.
//!
//! `@every <duration>` is not wall-clock based: it fires at every whole multiple
//! of the duration since the Unix epoch (UTC), so all replicas agree on the
//! instants (and therefore on the task ids) and DST never affects it.

mod expr;

use std::time::Duration;

pub use expr::CronError;

use chrono::{DateTime, NaiveDateTime, Offset, SecondsFormat, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// What to do with a local time that falls into a spring-forward gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DstGap {
    /// Move it forward by the gap's length (like `java.time` and JS Temporal).
    #[default]
    Shift,
    /// Do not fire.
    Skip,
}

/// What to do with a local time that occurs twice in a fall-back overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DstOverlap {
    /// Fire at the first (daylight-time) occurrence only.
    #[default]
    First,
    /// Fire at the second (standard-time) occurrence only.
    Last,
    /// Fire at both occurrences (two distinct instants, two ids).
    Both,
}

/// What happens to fires that were due while nobody could publish them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MisfirePolicy {
    /// Drop every fire that is late by more than [`ON_TIME`].
    Skip,
    /// Fire the most recent overdue instant once if it is within the grace;
    /// drop the others.
    FireOnce,
    /// Fire every overdue instant within the grace, oldest first, at most
    /// `max_catch_up` of them (the most recent ones).
    #[default]
    CatchUp,
}

/// How late a fire may be and still count as on time under [`MisfirePolicy::Skip`].
pub const ON_TIME: Duration = Duration::from_secs(2);

/// Largest offset change a zone makes at one transition, with margin.
const TRANSITION_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(3);

/// Candidates examined per `next_after` call before giving up.
const MAX_CANDIDATES: usize = 200_000;

/// A parsed schedule expression in its zone.
#[derive(Debug, Clone)]
pub enum Spec {
    Cron {
        /// Shared by every schedule with the same expression (see
        /// [`shared_cron`]).
        cron: std::sync::Arc<croner::Cron>,
        tz: Tz,
        gap: DstGap,
        overlap: DstOverlap,
        memo: NextMemo,
    },
    Every {
        period_ms: i64,
    },
}

/// Why a schedule expression was refused. Every message quotes what the
/// user wrote.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("bad cron expression `{expr}`: {error}")]
    Cron { expr: String, error: CronError },
    #[error("`@every` needs a duration, e.g. `@every 5s`")]
    EveryWithoutDuration,
    #[error("`@every {text}`: bad duration: {error}")]
    EveryBadDuration {
        text: String,
        error: humantime::DurationError,
    },
    #[error("`@every {text}`: the period must be at least 1s")]
    EveryTooShort { text: String },
    #[error("`@every {text}`: period too long")]
    EveryTooLong { text: String },
    #[error("`{expr}` names the zone {prefix} but the schedule's timezone is {timezone}: keep one of them")]
    TwoZones {
        expr: String,
        prefix: Tz,
        timezone: Tz,
    },
}

/// A time zone name that is not in the IANA database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown time zone `{0}` (expected an IANA name such as `Europe/Berlin` or `UTC`)")]
pub struct UnknownZone(pub String);

/// Parse `expr` (any accepted syntax) in zone `tz` with the given DST rules.
/// A `CRON_TZ=Zone` / `TZ=Zone` prefix names the zone instead of `tz`.
pub fn parse(expr: &str, tz: Tz, gap: DstGap, overlap: DstOverlap) -> Result<Spec, ScheduleError> {
    let original = expr.trim();
    let bad = |error: CronError| ScheduleError::Cron {
        expr: original.to_owned(),
        error,
    };
    let (prefix_tz, expr) = expr::split_tz_prefix(original).map_err(bad)?;
    if let Some(rest) = expr.strip_prefix("@every") {
        let text = rest.trim().to_owned();
        if text.is_empty() {
            return Err(ScheduleError::EveryWithoutDuration);
        }
        let d = match humantime::parse_duration(&text) {
            Ok(d) => d,
            Err(error) => return Err(ScheduleError::EveryBadDuration { text, error }),
        };
        if d < Duration::from_secs(1) {
            return Err(ScheduleError::EveryTooShort { text });
        }
        let Ok(period_ms) = i64::try_from(d.as_millis()) else {
            return Err(ScheduleError::EveryTooLong { text });
        };
        return Ok(Spec::Every { period_ms });
    }
    let cron = shared_cron(expr).map_err(bad)?;
    let tz = match prefix_tz {
        // `timezone` left at its default (UTC) or naming the same zone.
        Some(p) if tz == Tz::UTC || tz == p => p,
        Some(prefix) => {
            return Err(ScheduleError::TwoZones {
                expr: original.to_owned(),
                prefix,
                timezone: tz,
            })
        }
        None => tz,
    };
    Ok(Spec::Cron {
        cron,
        tz,
        gap,
        overlap,
        memo: NextMemo::default(),
    })
}

/// The last two answers of [`Spec::next_after`] for one schedule. A fire
/// asks the same questions more than once (is the next instant due? which
/// instants are due? what comes after the last?), and the calendar walk is
/// the costliest step of a fire: four walks per fire were about a tenth of
/// the leader's CPU at 100,000 schedules; with the memo one is left.
#[derive(Default)]
pub struct NextMemo(std::sync::Mutex<[Option<Answer>; 2]>);

/// A question to `next_after` and its answer.
type Answer = (DateTime<Utc>, Option<DateTime<Utc>>);

impl NextMemo {
    fn get_or(
        &self,
        after: DateTime<Utc>,
        walk: impl FnOnce() -> Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        // Another thread asking at the same moment (the API showing the
        // next instants) walks without the memo rather than wait.
        let Ok(mut m) = self.0.try_lock() else {
            return walk();
        };
        if let Some((_, next)) = m.iter().flatten().find(|(a, _)| *a == after) {
            return *next;
        }
        let next = walk();
        m.swap(0, 1);
        m[0] = Some((after, next));
        next
    }
}

/// A copy starts with an empty memo.
impl Clone for NextMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for NextMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NextMemo")
    }
}

/// The compiled expression `expr`, shared by every schedule that uses the
/// same text: a compiled expression holds a table of every year it may
/// fire in (about 10 KB), and 100,000 per-customer schedules typically use a
/// handful of expressions. Entries go when their last schedule does.
fn shared_cron(expr: &str) -> Result<std::sync::Arc<croner::Cron>, CronError> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    static SHARED: OnceLock<Mutex<HashMap<String, Weak<croner::Cron>>>> = OnceLock::new();
    let shared = SHARED.get_or_init(Mutex::default);
    if let Some(c) = shared
        .lock()
        .ok()
        .and_then(|m| m.get(expr).and_then(Weak::upgrade))
    {
        return Ok(c);
    }
    let cron = Arc::new(expr::parse(expr)?);
    if let Ok(mut m) = shared.lock() {
        // Forget expressions no schedule uses any more, now and then.
        if m.len() >= 1024 && m.len().is_power_of_two() {
            m.retain(|_, w| w.strong_count() > 0);
        }
        m.insert(expr.to_owned(), Arc::downgrade(&cron));
    }
    Ok(cron)
}

/// Parse an IANA zone name.
pub fn parse_tz(name: &str) -> Result<Tz, UnknownZone> {
    name.parse::<Tz>().map_err(|_| UnknownZone(name.to_owned()))
}

impl Spec {
    /// The first fire instant strictly after `after`, or `None` if the
    /// expression never fires again.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Spec::Every { period_ms } => {
                let t = after.timestamp_millis();
                let next = (t.div_euclid(*period_ms) + 1).checked_mul(*period_ms)?;
                Utc.timestamp_millis_opt(next).single()
            }
            Spec::Cron {
                cron,
                tz,
                gap,
                overlap,
                memo,
            } => memo.get_or(after, || next_cron(cron, tz, *gap, *overlap, after)),
        }
    }

    /// Fire instants in `(after, until]`, oldest first, at most `limit`.
    pub fn fires_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut cur = after;
        while out.len() < limit {
            match self.next_after(cur) {
                Some(t) if t <= until => {
                    out.push(t);
                    cur = t;
                }
                _ => break,
            }
        }
        out
    }

    /// The zone instants are shown in (UTC for `@every`).
    pub fn tz(&self) -> Tz {
        match self {
            Spec::Cron { tz, .. } => *tz,
            Spec::Every { .. } => Tz::UTC,
        }
    }
}

/// Whether the zone's UTC offset changes anywhere in `[t - 3h, t + 3h]`.
fn transition_near(tz: &Tz, t: DateTime<Utc>) -> bool {
    let off = |t: DateTime<Utc>| tz.offset_from_utc_datetime(&t.naive_utc()).fix();
    let here = off(t);
    off(t - TRANSITION_WINDOW) != here || off(t + TRANSITION_WINDOW) != here
}

/// UTC instants a local wall-clock time maps to under the DST rules.
fn map_local(tz: &Tz, gap: DstGap, overlap: DstOverlap, n: NaiveDateTime) -> Vec<DateTime<Utc>> {
    use chrono::LocalResult;
    match tz.from_local_datetime(&n) {
        LocalResult::Single(t) => vec![t.with_timezone(&Utc)],
        LocalResult::Ambiguous(a, b) => {
            let (a, b) = (a.with_timezone(&Utc), b.with_timezone(&Utc));
            let (first, last) = if a <= b { (a, b) } else { (b, a) };
            match overlap {
                DstOverlap::First => vec![first],
                DstOverlap::Last => vec![last],
                DstOverlap::Both => vec![first, last],
            }
        }
        LocalResult::None => match gap {
            DstGap::Skip => vec![],
            DstGap::Shift => {
                // The offset in force before the gap: read it a day earlier.
                let probe = n - chrono::TimeDelta::days(1);
                let before = match tz.offset_from_local_datetime(&probe).earliest() {
                    Some(o) => o.fix().local_minus_utc(),
                    None => return vec![],
                };
                let utc = n - chrono::TimeDelta::seconds(i64::from(before));
                vec![Utc.from_utc_datetime(&utc)]
            }
        },
    }
}

fn next_cron(
    cron: &croner::Cron,
    tz: &Tz,
    gap: DstGap,
    overlap: DstOverlap,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    // Walk matching wall-clock times (naive local time) and map each to
    // instants. Near a DST transition local time is not monotonic in UTC, so
    // there we start a few hours early and keep scanning a few hours past the
    // first hit.
    let local_after = after.with_timezone(tz).naive_local();
    let near_start = transition_near(tz, after);
    let start = if near_start {
        local_after - TRANSITION_WINDOW
    } else {
        local_after
    };
    // Whole seconds: the walk steps from one matching second to the next.
    let mut cur = start.with_nanosecond(0)?;
    let mut best: Option<DateTime<Utc>> = None;
    let mut scan_until: Option<NaiveDateTime> = None;
    for _ in 0..MAX_CANDIDATES {
        // An error means no match before croner's year limit: never again.
        let n = cron.find_next_occurrence(&cur, false).ok()?;
        cur = n;
        if let Some(limit) = scan_until {
            if n > limit {
                break;
            }
        }
        for t in map_local(tz, gap, overlap, n) {
            if t > after && best.is_none_or(|b| t < b) {
                best = Some(t);
            }
        }
        if let (Some(b), None) = (best, scan_until) {
            if !near_start && !transition_near(tz, b) {
                return best;
            }
            scan_until = Some(n + TRANSITION_WINDOW);
        }
    }
    best
}

/// The deterministic task id of a scheduled fire:
/// `<schedule>@<fire instant, RFC 3339 UTC>`.
pub fn fire_id(schedule: &str, instant: DateTime<Utc>) -> String {
    format!(
        "{schedule}@{}",
        instant.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    )
}

/// What to do with the instants that came due.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Publish these, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Count these as missed.
    pub missed: u64,
}

/// Decide which due instants (sorted, oldest first, all `<= now`) fire.
/// `earlier_missed` counts due instants older than the listed ones that were
/// not enumerated (they are all outside the grace).
pub fn plan(
    policy: MisfirePolicy,
    grace: Duration,
    max_catch_up: usize,
    due: &[DateTime<Utc>],
    earlier_missed: u64,
    now: DateTime<Utc>,
) -> Plan {
    let late = |t: &DateTime<Utc>| (now - *t).to_std().unwrap_or(Duration::ZERO);
    let total = due.len() as u64 + earlier_missed;
    let fire: Vec<DateTime<Utc>> = match policy {
        MisfirePolicy::Skip => due
            .last()
            .filter(|t| late(t) <= ON_TIME.min(grace.max(Duration::from_millis(1))))
            .into_iter()
            .copied()
            .collect(),
        MisfirePolicy::FireOnce => due
            .last()
            .filter(|t| late(t) <= grace)
            .into_iter()
            .copied()
            .collect(),
        MisfirePolicy::CatchUp => {
            let within: Vec<_> = due.iter().filter(|t| late(t) <= grace).copied().collect();
            let skip = within.len().saturating_sub(max_catch_up);
            within[skip..].to_vec()
        }
    };
    Plan {
        missed: total - fire.len() as u64,
        fire,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn spec(expr: &str, tz: &str) -> Spec {
        parse(
            expr,
            parse_tz(tz).unwrap(),
            DstGap::Shift,
            DstOverlap::First,
        )
        .unwrap()
    }

    fn spec_with(expr: &str, tz: &str, gap: DstGap, overlap: DstOverlap) -> Spec {
        parse(expr, parse_tz(tz).unwrap(), gap, overlap).unwrap()
    }

    fn next_n(s: &Spec, after: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = utc(after);
        for _ in 0..n {
            cur = s.next_after(cur).unwrap();
            out.push(cur.to_rfc3339_opts(SecondsFormat::Secs, true));
        }
        out
    }

    #[test]
    fn five_field_crontab() {
        let s = spec("*/15 9 * * *", "UTC");
        assert_eq!(
            next_n(&s, "2026-01-01T09:20:00Z", 3),
            [
                "2026-01-01T09:30:00Z",
                "2026-01-01T09:45:00Z",
                "2026-01-02T09:00:00Z"
            ]
        );
    }

    #[test]
    fn five_field_day_of_week_is_crontab_numbering() {
        // 2026-01-05 is a Monday. crontab 1-5 = Mon..Fri; 0 and 7 = Sunday.
        let s = spec("0 8 * * 1-5", "UTC");
        assert_eq!(
            next_n(&s, "2026-01-02T12:00:00Z", 2), // Friday noon
            ["2026-01-05T08:00:00Z", "2026-01-06T08:00:00Z"]
        );
        let sun = spec("0 8 * * 7", "UTC");
        assert_eq!(
            next_n(&sun, "2026-01-05T00:00:00Z", 1),
            ["2026-01-11T08:00:00Z"]
        );
        let sun0 = spec("0 8 * * 0", "UTC");
        assert_eq!(
            next_n(&sun0, "2026-01-05T00:00:00Z", 1),
            ["2026-01-11T08:00:00Z"]
        );
        let named = spec("0 8 * * sat,sun", "UTC");
        assert_eq!(
            next_n(&named, "2026-01-05T00:00:00Z", 2),
            ["2026-01-10T08:00:00Z", "2026-01-11T08:00:00Z"]
        );
    }

    #[test]
    fn five_field_dom_and_dow_are_ored() {
        // crontab: "on the 1st, or on any Monday".
        let s = spec("0 0 1 * mon", "UTC");
        assert_eq!(
            next_n(&s, "2026-01-01T12:00:00Z", 3),
            [
                "2026-01-05T00:00:00Z",
                "2026-01-12T00:00:00Z",
                "2026-01-19T00:00:00Z"
            ]
        );
        assert_eq!(
            next_n(&s, "2026-01-26T12:00:00Z", 1),
            ["2026-02-01T00:00:00Z"]
        );
    }

    #[test]
    fn six_and_seven_fields_with_seconds_and_year() {
        let s = spec("*/10 * * * * *", "UTC");
        assert_eq!(
            next_n(&s, "2026-01-01T00:00:05Z", 2),
            ["2026-01-01T00:00:10Z", "2026-01-01T00:00:20Z"]
        );
        let y = spec("0 0 12 1 1 * 2027", "UTC");
        assert_eq!(
            next_n(&y, "2026-01-01T00:00:00Z", 1),
            ["2027-01-01T12:00:00Z"]
        );
        assert_eq!(y.next_after(utc("2027-06-01T00:00:00Z")), None);
    }

    #[test]
    fn descriptors() {
        let at = "2026-03-15T10:20:30Z";
        assert_eq!(
            next_n(&spec("@hourly", "UTC"), at, 1),
            ["2026-03-15T11:00:00Z"]
        );
        assert_eq!(
            next_n(&spec("@daily", "UTC"), at, 1),
            ["2026-03-16T00:00:00Z"]
        );
        assert_eq!(
            next_n(&spec("@midnight", "UTC"), at, 1),
            ["2026-03-16T00:00:00Z"]
        );
        // 2026-03-15 is a Sunday: @weekly is Sunday midnight.
        assert_eq!(
            next_n(&spec("@weekly", "UTC"), at, 1),
            ["2026-03-22T00:00:00Z"]
        );
        assert_eq!(
            next_n(&spec("@monthly", "UTC"), at, 1),
            ["2026-04-01T00:00:00Z"]
        );
        assert_eq!(
            next_n(&spec("@yearly", "UTC"), at, 1),
            ["2027-01-01T00:00:00Z"]
        );
        assert_eq!(
            next_n(&spec("@annually", "UTC"), at, 1),
            ["2027-01-01T00:00:00Z"]
        );
        // Descriptors are local to the zone.
        assert_eq!(
            next_n(&spec("@daily", "Europe/Berlin"), at, 1),
            ["2026-03-15T23:00:00Z"]
        );
    }

    #[test]
    fn every_is_epoch_aligned_and_zone_free() {
        let s = spec("@every 5s", "America/New_York");
        assert_eq!(
            next_n(&s, "2026-01-01T00:00:03Z", 3),
            [
                "2026-01-01T00:00:05Z",
                "2026-01-01T00:00:10Z",
                "2026-01-01T00:00:15Z"
            ]
        );
        // Exactly on an instant: strictly after.
        assert_eq!(
            next_n(&s, "2026-01-01T00:00:05Z", 1),
            ["2026-01-01T00:00:10Z"]
        );
        let m = spec("@every 1h 30m", "UTC");
        assert_eq!(
            next_n(&m, "1970-01-01T00:00:00Z", 2),
            ["1970-01-01T01:30:00Z", "1970-01-01T03:00:00Z"]
        );
        // Across the US spring-forward: still every 5 s of real time.
        let d = next_n(&s, "2026-03-08T06:59:58Z", 2);
        assert_eq!(d, ["2026-03-08T07:00:00Z", "2026-03-08T07:00:05Z"]);
        let ms = spec("@every 1500ms", "UTC");
        let t = ms.next_after(utc("2026-01-01T00:00:00Z")).unwrap();
        assert_eq!(fire_id("x", t), "x@2026-01-01T00:00:01.500Z");
    }

    // America/New_York 2026: spring forward 2026-03-08 02:00 EST → 03:00 EDT
    // (07:00Z); fall back 2026-11-01 02:00 EDT → 01:00 EST (06:00Z).

    #[test]
    fn new_york_spring_forward_gap() {
        let shift = spec("30 2 * * *", "America/New_York");
        assert_eq!(
            next_n(&shift, "2026-03-07T12:00:00Z", 3),
            [
                "2026-03-08T07:30:00Z", // 02:30 does not exist → 03:30 EDT
                "2026-03-09T06:30:00Z", // 02:30 EDT
                "2026-03-10T06:30:00Z",
            ]
        );
        let skip = spec_with(
            "30 2 * * *",
            "America/New_York",
            DstGap::Skip,
            DstOverlap::First,
        );
        assert_eq!(
            next_n(&skip, "2026-03-07T12:00:00Z", 2),
            ["2026-03-09T06:30:00Z", "2026-03-10T06:30:00Z"]
        );
        // Times outside the gap are unaffected; 03:00 is the first EDT minute.
        let three = spec("0 3 * * *", "America/New_York");
        assert_eq!(
            next_n(&three, "2026-03-07T12:00:00Z", 2),
            ["2026-03-08T07:00:00Z", "2026-03-09T07:00:00Z"]
        );
        // Hourly across the gap: 01:00 EST, (02:00 → 03:00 EDT), 03:00 EDT is the same instant: once.
        let hourly = spec("0 * * * *", "America/New_York");
        assert_eq!(
            next_n(&hourly, "2026-03-08T05:30:00Z", 3),
            [
                "2026-03-08T06:00:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-08T08:00:00Z"
            ]
        );
    }

    #[test]
    fn new_york_fall_back_overlap() {
        let at = "2026-10-31T12:00:00Z";
        let first = spec("30 1 * * *", "America/New_York");
        assert_eq!(
            next_n(&first, at, 2),
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"] // 01:30 EDT, then 01:30 EST next day
        );
        let last = spec_with(
            "30 1 * * *",
            "America/New_York",
            DstGap::Shift,
            DstOverlap::Last,
        );
        assert_eq!(
            next_n(&last, at, 2),
            ["2026-11-01T06:30:00Z", "2026-11-02T06:30:00Z"]
        );
        let both = spec_with(
            "30 1 * * *",
            "America/New_York",
            DstGap::Shift,
            DstOverlap::Both,
        );
        assert_eq!(
            next_n(&both, at, 3),
            [
                "2026-11-01T05:30:00Z",
                "2026-11-01T06:30:00Z",
                "2026-11-02T06:30:00Z"
            ]
        );
        // Every 20 min through the overlap with Both: strictly increasing instants.
        let dense = spec_with(
            "*/20 * * * *",
            "America/New_York",
            DstGap::Shift,
            DstOverlap::Both,
        );
        let v = next_n(&dense, "2026-11-01T04:50:00Z", 8);
        assert_eq!(
            v,
            [
                "2026-11-01T05:00:00Z", // 01:00 EDT
                "2026-11-01T05:20:00Z",
                "2026-11-01T05:40:00Z",
                "2026-11-01T06:00:00Z", // 01:00 EST
                "2026-11-01T06:20:00Z",
                "2026-11-01T06:40:00Z",
                "2026-11-01T07:00:00Z", // 02:00 EST
                "2026-11-01T07:20:00Z",
            ]
        );
        // With First, the repeated hour is skipped.
        let dense_first = spec("*/20 * * * *", "America/New_York");
        assert_eq!(
            next_n(&dense_first, "2026-11-01T05:50:00Z", 2),
            ["2026-11-01T07:00:00Z", "2026-11-01T07:20:00Z"]
        );
    }

    // Europe/Berlin 2026: spring forward 2026-03-29 02:00 CET → 03:00 CEST
    // (01:00Z); fall back 2026-10-25 03:00 CEST → 02:00 CET (01:00Z).

    #[test]
    fn berlin_spring_forward_gap() {
        let s = spec("15 2 * * *", "Europe/Berlin");
        assert_eq!(
            next_n(&s, "2026-03-28T12:00:00Z", 3),
            [
                "2026-03-29T01:15:00Z", // 02:15 missing → 03:15 CEST
                "2026-03-30T00:15:00Z",
                "2026-03-31T00:15:00Z"
            ]
        );
        let skip = spec_with(
            "15 2 * * *",
            "Europe/Berlin",
            DstGap::Skip,
            DstOverlap::First,
        );
        assert_eq!(
            next_n(&skip, "2026-03-28T12:00:00Z", 1),
            ["2026-03-30T00:15:00Z"]
        );
    }

    #[test]
    fn berlin_fall_back_overlap() {
        let at = "2026-10-24T12:00:00Z";
        let first = spec("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            next_n(&first, at, 2),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
        );
        let last = spec_with(
            "30 2 * * *",
            "Europe/Berlin",
            DstGap::Shift,
            DstOverlap::Last,
        );
        assert_eq!(next_n(&last, at, 1), ["2026-10-25T01:30:00Z"]);
        let both = spec_with(
            "30 2 * * *",
            "Europe/Berlin",
            DstGap::Shift,
            DstOverlap::Both,
        );
        assert_eq!(
            next_n(&both, at, 3),
            [
                "2026-10-25T00:30:00Z",
                "2026-10-25T01:30:00Z",
                "2026-10-26T01:30:00Z"
            ]
        );
    }

    #[test]
    fn bad_expressions_and_zones() {
        let tz = Tz::UTC;
        let bad = |e: &str| {
            parse(e, tz, DstGap::Shift, DstOverlap::First)
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad("* * *").contains("expected 5 fields"),
            "{}",
            bad("* * *")
        );
        assert!(bad("61 * * * *").contains("bad cron expression"));
        assert!(bad("0 25 * * *").contains("bad cron expression"));
        assert!(bad("0 0 * * 8").contains("day-of-week"));
        assert!(bad("0 0 * * funday").contains("day-of-week"));
        assert!(bad("@fortnightly").contains("unknown descriptor"));
        assert!(bad("@every").contains("needs a duration"));
        assert!(bad("@every soon").contains("bad duration"));
        assert!(bad("@every 500ms").contains("at least 1s"));
        assert!(parse_tz("Mars/Olympus")
            .unwrap_err()
            .to_string()
            .contains("unknown time zone"));
        assert!(parse_tz("Europe/Berlin").is_ok());
    }

    #[test]
    fn fires_between_is_half_open() {
        let s = spec("* * * * * *", "UTC");
        let v = s.fires_between(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T00:00:03Z"), 10);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0], utc("2026-01-01T00:00:01Z"));
        assert_eq!(v[2], utc("2026-01-01T00:00:03Z"));
        assert_eq!(
            s.fires_between(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T01:00:00Z"), 5)
                .len(),
            5
        );
    }

    /// The memo answers exactly what a walk answers, whatever the order of
    /// the questions (a DST zone, so that the walk's detours count too).
    #[test]
    fn memoized_answers_are_the_walks_answers() {
        let s = spec("30 2 * * *", "Europe/Berlin");
        let times: Vec<_> = [
            "2026-03-28T12:00:00Z",
            "2026-03-29T00:30:00Z",
            "2026-03-28T12:00:00Z",
            "2026-10-25T00:00:00Z",
            "2026-03-29T00:30:00Z",
            "2026-10-25T00:00:00Z",
            "2026-10-25T00:30:00.5Z",
        ]
        .iter()
        .map(|t| utc(t))
        .collect();
        for t in &times {
            // A clone starts with an empty memo: its answer is a fresh walk.
            assert_eq!(s.next_after(*t), s.clone().next_after(*t), "after {t}");
        }
    }

    #[test]
    fn fire_ids_are_deterministic() {
        assert_eq!(
            fire_id("nightly", utc("2026-03-08T07:30:00Z")),
            "nightly@2026-03-08T07:30:00Z"
        );
    }

    #[test]
    fn misfire_plans() {
        let now = utc("2026-01-01T00:10:00Z");
        let due: Vec<_> = (1..=5)
            .map(|m| utc(&format!("2026-01-01T00:0{}:00Z", m * 2 - 1)))
            .collect(); // 00:01, 00:03, 00:05, 00:07, 00:09
        let grace = Duration::from_secs(300);
        // catch_up: every due instant within 5 min (00:05, 00:07, 00:09).
        let p = plan(MisfirePolicy::CatchUp, grace, 100, &due, 2, now);
        assert_eq!(p.fire, due[2..].to_vec());
        assert_eq!(p.missed, 4);
        // bounded
        let p = plan(MisfirePolicy::CatchUp, grace, 1, &due, 0, now);
        assert_eq!(p.fire, vec![due[4]]);
        assert_eq!(p.missed, 4);
        // fire_once: the latest, once.
        let p = plan(MisfirePolicy::FireOnce, grace, 100, &due, 0, now);
        assert_eq!(p.fire, vec![due[4]]);
        assert_eq!(p.missed, 4);
        // fire_once outside the grace: nothing.
        let p = plan(
            MisfirePolicy::FireOnce,
            Duration::from_secs(30),
            100,
            &due,
            0,
            now,
        );
        assert!(p.fire.is_empty());
        assert_eq!(p.missed, 5);
        // skip: only an on-time fire.
        let p = plan(MisfirePolicy::Skip, grace, 100, &due, 0, now);
        assert!(p.fire.is_empty());
        assert_eq!(p.missed, 5);
        let on_time = [utc("2026-01-01T00:09:59Z")];
        let p = plan(MisfirePolicy::Skip, grace, 100, &on_time, 0, now);
        assert_eq!(p.fire, on_time.to_vec());
        assert_eq!(p.missed, 0);
        // Normal operation: one due instant, a few ms late, fires under every policy.
        for policy in [
            MisfirePolicy::Skip,
            MisfirePolicy::FireOnce,
            MisfirePolicy::CatchUp,
        ] {
            let p = plan(
                policy,
                grace,
                100,
                &[now - chrono::TimeDelta::milliseconds(3)],
                0,
                now,
            );
            assert_eq!(p.fire.len(), 1, "{policy:?}");
        }
    }

    /// robfig/cron v3 `TestActivation` (5 fields, `ParseStandard`): whether
    /// the expression fires at that wall-clock minute.
    #[test]
    fn robfig_activation_table() {
        let table: &[(&str, &str, bool)] = &[
            ("2012-07-09T15:00:00Z", "0/15 * * * *", true),
            ("2012-07-09T15:45:00Z", "0/15 * * * *", true),
            ("2012-07-09T15:40:00Z", "0/15 * * * *", false),
            ("2012-07-09T15:05:00Z", "5/15 * * * *", true),
            ("2012-07-09T15:20:00Z", "5/15 * * * *", true),
            ("2012-07-09T15:50:00Z", "5/15 * * * *", true),
            ("2012-07-15T15:00:00Z", "0/15 * * Jul *", true),
            ("2012-07-15T15:00:00Z", "0/15 * * Jun *", false),
            ("2012-07-15T08:30:00Z", "30 08 ? Jul Sun", true),
            ("2012-07-15T08:30:00Z", "30 08 15 Jul ?", true),
            ("2012-07-16T08:30:00Z", "30 08 ? Jul Sun", false),
            ("2012-07-16T08:30:00Z", "30 08 15 Jul ?", false),
            ("2012-07-09T15:00:00Z", "@hourly", true),
            ("2012-07-09T15:04:00Z", "@hourly", false),
            ("2012-07-09T15:00:00Z", "@daily", false),
            ("2012-07-09T00:00:00Z", "@daily", true),
            ("2012-07-09T00:00:00Z", "@weekly", false),
            ("2012-07-08T00:00:00Z", "@weekly", true),
            ("2012-07-08T01:00:00Z", "@weekly", false),
            ("2012-07-08T00:00:00Z", "@monthly", false),
            ("2012-07-01T00:00:00Z", "@monthly", true),
            // Both day fields restricted: either may match.
            ("2012-07-15T00:00:00Z", "* * 1,15 * Sun", true),
            ("2012-06-15T00:00:00Z", "* * 1,15 * Sun", true),
            ("2012-08-01T00:00:00Z", "* * 1,15 * Sun", true),
            ("2012-07-15T00:00:00Z", "* * */10 * Sun", true),
            // One of them `*`: both must match.
            ("2012-07-15T00:00:00Z", "* * * * Mon", false),
            ("2012-07-09T00:00:00Z", "* * 1,15 * *", false),
            ("2012-07-15T00:00:00Z", "* * 1,15 * *", true),
            ("2012-07-15T00:00:00Z", "* * */2 * Sun", true),
        ];
        for (at, expr, fires) in table {
            let t = utc(at);
            let s = spec(expr, "UTC");
            let got = s.next_after(t - chrono::TimeDelta::seconds(1)) == Some(t);
            assert_eq!(got, *fires, "`{expr}` at {at}");
        }
    }

    /// robfig/cron v3 `TestNext` (seconds first), including its `TZ=` rows.
    /// robfig skips a time in a spring-forward gap and fires at both
    /// occurrences in a fall-back overlap: warren's `dst_gap = "skip"`,
    /// `dst_overlap = "both"`.
    #[test]
    fn robfig_next_table() {
        let table: &[(&str, &str, Option<&str>)] = &[
            (
                "2012-07-09T14:45:00Z",
                "0 0/15 * * * *",
                Some("2012-07-09T15:00:00Z"),
            ),
            (
                "2012-07-09T14:59:00Z",
                "0 0/15 * * * *",
                Some("2012-07-09T15:00:00Z"),
            ),
            (
                "2012-07-09T14:59:59Z",
                "0 0/15 * * * *",
                Some("2012-07-09T15:00:00Z"),
            ),
            (
                "2012-07-09T15:45:00Z",
                "0 20-35/15 * * * *",
                Some("2012-07-09T16:20:00Z"),
            ),
            (
                "2012-07-09T23:46:00Z",
                "0 */15 * * * *",
                Some("2012-07-10T00:00:00Z"),
            ),
            (
                "2012-07-09T23:45:00Z",
                "0 20-35/15 * * * *",
                Some("2012-07-10T00:20:00Z"),
            ),
            (
                "2012-07-09T23:35:51Z",
                "15/35 20-35/15 * * * *",
                Some("2012-07-10T00:20:15Z"),
            ),
            (
                "2012-07-09T23:35:51Z",
                "15/35 20-35/15 1/2 * * *",
                Some("2012-07-10T01:20:15Z"),
            ),
            (
                "2012-07-09T23:35:51Z",
                "15/35 20-35/15 10-12 * * *",
                Some("2012-07-10T10:20:15Z"),
            ),
            (
                "2012-07-09T23:35:51Z",
                "15/35 20-35/15 1/2 */2 * *",
                Some("2012-07-11T01:20:15Z"),
            ),
            (
                "2012-07-09T23:35:51Z",
                "15/35 20-35/15 * 9-20 * *",
                Some("2012-07-10T00:20:15Z"),
            ),
            (
                "2012-07-09T23:35:51Z",
                "15/35 20-35/15 * 9-20 Jul *",
                Some("2012-07-10T00:20:15Z"),
            ),
            (
                "2012-07-09T23:35:00Z",
                "0 0 0 9 Apr-Oct ?",
                Some("2012-08-09T00:00:00Z"),
            ),
            (
                "2012-07-09T23:35:00Z",
                "0 0 0 */5 Apr,Aug,Oct Mon",
                Some("2012-08-01T00:00:00Z"),
            ),
            (
                "2012-07-09T23:35:00Z",
                "0 0 0 */5 Oct Mon",
                Some("2012-10-01T00:00:00Z"),
            ),
            (
                "2012-07-09T23:35:00Z",
                "0 0 0 * Feb Mon",
                Some("2013-02-04T00:00:00Z"),
            ),
            (
                "2012-07-09T23:35:00Z",
                "0 0 0 * Feb Mon/2",
                Some("2013-02-01T00:00:00Z"),
            ),
            (
                "2012-12-31T23:59:45Z",
                "0 * * * * *",
                Some("2013-01-01T00:00:00Z"),
            ),
            (
                "2012-07-09T23:35:00Z",
                "0 0 0 29 Feb ?",
                Some("2016-02-29T00:00:00Z"),
            ),
            ("2012-07-09T23:35:00Z", "0 0 0 30 Feb ?", None),
            ("2012-07-09T23:35:00Z", "0 0 0 31 Apr ?", None),
            // Spring forward in New York: 2am EST → 3am EDT.
            (
                "2012-03-11T00:00:00-05:00",
                "TZ=America/New_York 0 30 2 11 Mar ?",
                Some("2013-03-11T02:30:00-04:00"),
            ),
            (
                "2012-03-11T00:00:00-05:00",
                "TZ=America/New_York 0 0 * * * ?",
                Some("2012-03-11T01:00:00-05:00"),
            ),
            (
                "2012-03-11T01:00:00-05:00",
                "TZ=America/New_York 0 0 * * * ?",
                Some("2012-03-11T03:00:00-04:00"),
            ),
            (
                "2012-03-11T00:00:00-05:00",
                "TZ=America/New_York 0 0 2 * * ?",
                Some("2012-03-12T02:00:00-04:00"),
            ),
            // Fall back in New York: 2am EDT → 1am EST.
            (
                "2012-11-04T00:00:00-04:00",
                "TZ=America/New_York 0 30 2 04 Nov ?",
                Some("2012-11-04T02:30:00-05:00"),
            ),
            (
                "2012-11-04T01:45:00-04:00",
                "TZ=America/New_York 0 30 1 04 Nov ?",
                Some("2012-11-04T01:30:00-05:00"),
            ),
            (
                "2012-11-04T00:00:00-04:00",
                "TZ=America/New_York 0 0 * * * ?",
                Some("2012-11-04T01:00:00-04:00"),
            ),
            (
                "2012-11-04T01:00:00-04:00",
                "TZ=America/New_York 0 0 * * * ?",
                Some("2012-11-04T01:00:00-05:00"),
            ),
            (
                "2012-11-04T01:00:00-05:00",
                "TZ=America/New_York 0 0 * * * ?",
                Some("2012-11-04T02:00:00-05:00"),
            ),
            (
                "2012-11-04T00:00:00-04:00",
                "CRON_TZ=America/New_York 0 0 3 3 * ?",
                Some("2012-12-03T03:00:00-05:00"),
            ),
            // Midnight missing on a DST day (robfig issue 157).
            (
                "2018-10-17T05:00:00-04:00",
                "TZ=America/Sao_Paulo 0 0 9 10 * ?",
                Some("2018-11-10T06:00:00-05:00"),
            ),
            (
                "2018-02-14T05:00:00-05:00",
                "TZ=America/Sao_Paulo 0 0 9 22 * ?",
                Some("2018-02-22T07:00:00-05:00"),
            ),
        ];
        for (after, expr, next) in table {
            let s = spec_with(expr, "UTC", DstGap::Skip, DstOverlap::Both);
            assert_eq!(
                s.next_after(utc(after)),
                next.map(utc),
                "`{expr}` after {after}"
            );
        }
    }

    #[test]
    fn one_weekday_numbering_and_day_rule_for_five_six_and_seven_fields() {
        // 2026-01-05 is a Monday, 2026-01-11 a Sunday.
        let at = "2026-01-03T12:00:00Z"; // Saturday
        for expr in ["0 9 * * 1", "0 0 9 * * 1", "0 0 9 * * 1 *", "0 0 9 * * mon"] {
            assert_eq!(
                next_n(&spec(expr, "UTC"), at, 1),
                ["2026-01-05T09:00:00Z"],
                "{expr}"
            );
        }
        for expr in ["0 0 9 * * 0", "0 0 9 * * 7", "0 0 9 * * SUN"] {
            assert_eq!(
                next_n(&spec(expr, "UTC"), at, 1),
                ["2026-01-04T09:00:00Z"],
                "{expr}"
            );
        }
        assert_eq!(
            next_n(&spec("0 0 9 * * 1-5", "UTC"), "2026-01-02T12:00:00Z", 2),
            ["2026-01-05T09:00:00Z", "2026-01-06T09:00:00Z"] // Fri noon → Mon, Tue
        );
        assert_eq!(
            next_n(&spec("0 0 9 * * 0,6", "UTC"), "2026-01-05T00:00:00Z", 2),
            ["2026-01-10T09:00:00Z", "2026-01-11T09:00:00Z"]
        );
        assert_eq!(
            next_n(&spec("0 0 9 * * fri-sun", "UTC"), "2026-01-05T00:00:00Z", 3),
            [
                "2026-01-09T09:00:00Z",
                "2026-01-10T09:00:00Z",
                "2026-01-11T09:00:00Z"
            ]
        );
        // `Mon/2` = Monday, Wednesday, Friday (robfig: N/step ends on Saturday).
        assert_eq!(
            next_n(&spec("0 0 9 * * Mon/2", "UTC"), "2026-01-04T00:00:00Z", 4),
            [
                "2026-01-05T09:00:00Z",
                "2026-01-07T09:00:00Z",
                "2026-01-09T09:00:00Z",
                "2026-01-12T09:00:00Z"
            ]
        );
        // Friday the 13th in 6 fields ORs like 5 fields: the 13th or any Friday.
        let f13 = spec("0 0 0 13 * FRI", "UTC");
        assert_eq!(
            next_n(&f13, "2026-01-01T00:00:00Z", 3),
            [
                "2026-01-02T00:00:00Z",
                "2026-01-09T00:00:00Z",
                "2026-01-13T00:00:00Z"
            ]
        );
        // robfig, not Vixie: `*/2` restricts, so odd days OR Mondays.
        // 2026-01-05 (Mon, odd), 2026-01-07 (Wed, odd), 2026-01-12 (Mon, even).
        let v = next_n(&spec("0 0 */2 * 1", "UTC"), "2026-01-04T00:00:00Z", 5);
        assert!(v.contains(&"2026-01-12T00:00:00Z".to_owned()), "{v:?}");
        assert!(v.contains(&"2026-01-07T00:00:00Z".to_owned()), "{v:?}");
    }

    #[test]
    fn last_nth_and_nearest_weekday() {
        let at = "2026-01-01T00:00:00Z";
        // Last day of the month; last weekday; weekday nearest the 17th
        // (Saturday 2026-01-17 → Friday 16th); last Friday; second Tuesday.
        let cases = [
            ("0 0 L * *", "2026-01-31T00:00:00Z"),
            ("0 0 LW * *", "2026-01-30T00:00:00Z"),
            ("0 0 17W * *", "2026-01-16T00:00:00Z"),
            ("0 0 * * 5L", "2026-01-30T00:00:00Z"),
            ("0 0 * * fri#L", "2026-01-30T00:00:00Z"),
            ("0 0 * * 2#2", "2026-01-13T00:00:00Z"),
        ];
        for (expr, next) in cases {
            assert_eq!(next_n(&spec(expr, "UTC"), at, 1), [next], "{expr}");
        }
    }

    #[test]
    fn fires_after_2100() {
        let s = spec("0 0 12 1 1 * 2101", "UTC");
        assert_eq!(
            next_n(&s, "2026-01-01T00:00:00Z", 1),
            ["2101-01-01T12:00:00Z"]
        );
        let far = spec("0 0 0 29 2 * 2400-2404", "UTC");
        assert_eq!(
            next_n(&far, "2026-01-01T00:00:00Z", 2),
            ["2400-02-29T00:00:00Z", "2404-02-29T00:00:00Z"]
        );
        assert_eq!(far.next_after(utc("2404-03-01T00:00:00Z")), None);
    }

    #[test]
    fn zone_prefix() {
        let s = spec("CRON_TZ=Asia/Tokyo 0 6 * * ?", "UTC");
        assert_eq!(s.tz(), parse_tz("Asia/Tokyo").unwrap());
        assert_eq!(
            next_n(&s, "2026-01-01T00:00:00Z", 1),
            ["2026-01-01T21:00:00Z"]
        );
        assert_eq!(
            next_n(
                &spec("TZ=Europe/Berlin @daily", "Europe/Berlin"),
                "2026-03-15T10:00:00Z",
                1
            ),
            ["2026-03-15T23:00:00Z"]
        );
        let tz = parse_tz("Europe/Berlin").unwrap();
        let e = parse(
            "CRON_TZ=Asia/Tokyo 0 6 * * *",
            tz,
            DstGap::Shift,
            DstOverlap::First,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "`CRON_TZ=Asia/Tokyo 0 6 * * *` names the zone Asia/Tokyo but the schedule's timezone is Europe/Berlin: keep one of them");
        let e = parse(
            "CRON_TZ=Mars/Base 0 6 * * *",
            Tz::UTC,
            DstGap::Shift,
            DstOverlap::First,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`CRON_TZ=Mars/Base`: unknown time zone `Mars/Base`"),
            "{e}"
        );
    }

    /// Every message names the user's own expression, the field, and what
    /// is wrong (with the allowed range).
    #[test]
    fn error_messages_speak_of_what_the_user_wrote() {
        let cases = [
            ("60 * * * *", "minute 60 out of range 0-59"),
            ("0 24 * * *", "hour 24 out of range 0-23"),
            ("0 0 32 * *", "day-of-month 32 out of range 1-31"),
            ("0 0 0 * *", "day-of-month 0 out of range 1-31"),
            ("0 0 1 13 *", "month 13 out of range 1-12 or jan-dec"),
            ("60 0 0 * * *", "second 60 out of range 0-59"),
            ("0 0 * * 8", "day-of-week 8 out of range 0-7 (0 and 7 = Sunday) or sun-sat"),
            ("0 0 0 1 1 * 1969", "year 1969 out of range 1970-4999"),
            ("*/-5 * * * *", "minute: step `-5` in `*/-5` is not a positive whole number"),
            ("*/0 * * * *", "minute: step in `*/0` must be at least 1"),
            ("*/ * * * *", "minute: `*/` has no step after `/`"),
            ("/5 * * * *", "minute: `/5` has nothing before `/`"),
            ("0,,5 * * * *", "minute: empty item in the list `0,,5`"),
            ("0, * * * *", "minute: empty item in the list `0,`"),
            ("0 0 * * MON-", "day-of-week: range `MON-` has no end"),
            ("0 0 * * -MON", "day-of-week: range `-MON` has no start"),
            ("0 0 * * 5-1", "day-of-week: range `5-1` runs backwards (5 is after 1); write it as a list of two ranges"),
            ("0 0 * * funday", "day-of-week: `funday` is not a day-of-week (expected 0-7 (0 and 7 = Sunday) or sun-sat)"),
            ("0 0 * foo *", "month: `foo` is not a month (expected 1-12 or jan-dec)"),
            ("x * * * *", "minute: `x` is not a minute (expected 0-59)"),
            ("0 0 * * 5#6", "day-of-week: `5#6`: the occurrence after `#` must be 1-5 or L"),
            ("0 0 * *", "expected 5 fields (minute hour day-of-month month day-of-week), 6 (second first) or 7 (second first, year last), got 4"),
        ];
        for (expr, want) in cases {
            let e = parse(expr, Tz::UTC, DstGap::Shift, DstOverlap::First)
                .unwrap_err()
                .to_string();
            assert_eq!(e, format!("bad cron expression `{expr}`: {want}"));
        }
        // Never the internally rewritten form.
        let e = parse("60 * * * *", Tz::UTC, DstGap::Shift, DstOverlap::First)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("0 60"), "{e}");
    }

    /// Callers can tell the kinds of mistake apart without reading the text.
    #[test]
    fn errors_are_typed() {
        let parse_utc = |e: &str| parse(e, Tz::UTC, DstGap::Shift, DstOverlap::First);
        assert!(matches!(
            parse_utc("0 24 * * *"),
            Err(ScheduleError::Cron {
                error: CronError::OutOfRange { field: "hour", .. },
                ..
            })
        ));
        assert!(matches!(
            parse_utc("0 0 17X * *"),
            Err(ScheduleError::Cron {
                error: CronError::NotAValue {
                    field: "day-of-month",
                    ..
                },
                ..
            })
        ));
        assert!(matches!(
            parse_utc("0 0 32W * *"),
            Err(ScheduleError::Cron {
                error: CronError::NearestWeekday { .. },
                ..
            })
        ));
        assert!(matches!(
            parse_utc("@every 500ms"),
            Err(ScheduleError::EveryTooShort { .. })
        ));
        assert!(matches!(
            parse_utc("@every soon"),
            Err(ScheduleError::EveryBadDuration { .. })
        ));
        assert!(matches!(
            parse_utc("TZ=Mars/Base @daily"),
            Err(ScheduleError::Cron {
                error: CronError::Zone { .. },
                ..
            })
        ));
        assert_eq!(
            parse_tz("Mars/Olympus"),
            Err(UnknownZone("Mars/Olympus".into()))
        );
        let berlin = parse_tz("Europe/Berlin").unwrap();
        assert!(matches!(
            parse(
                "TZ=Asia/Tokyo @daily",
                berlin,
                DstGap::Shift,
                DstOverlap::First
            ),
            Err(ScheduleError::TwoZones { .. })
        ));
    }

    /// The messages the table in `error_messages_speak_of_what_the_user_wrote`
    /// does not cover, pinned as they read before the errors were typed.
    #[test]
    fn remaining_messages_read_as_before() {
        let msg = |e: &str| {
            parse(e, Tz::UTC, DstGap::Shift, DstOverlap::First)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            msg("0 0 32W * *"),
            "bad cron expression `0 0 32W * *`: day-of-month 32 out of range 1-31 (in `32W`: `nW` is the weekday nearest day n)"
        );
        assert_eq!(
            msg("TZ=Asia/Tokyo"),
            "bad cron expression `TZ=Asia/Tokyo`: `TZ=Asia/Tokyo` must be followed by an expression"
        );
        assert_eq!(
            msg("*/5/2 * * * *"),
            "bad cron expression `*/5/2 * * * *`: minute: `*/5/2` has more than one `/`"
        );
        assert_eq!(
            msg("0 0 * * #2"),
            "bad cron expression `0 0 * * #2`: day-of-week: a value is missing"
        );
        assert_eq!(
            msg("@fortnightly"),
            "bad cron expression `@fortnightly`: unknown descriptor `@fortnightly` (expected @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly or `@every <duration>`)"
        );
        assert_eq!(msg("@every"), "`@every` needs a duration, e.g. `@every 5s`");
        assert_eq!(
            msg("@every 500ms"),
            "`@every 500ms`: the period must be at least 1s"
        );
        // After `bad duration: ` comes humantime's own wording.
        let e = msg("@every 100000000000000000000s");
        assert!(
            e.starts_with("`@every 100000000000000000000s`: bad duration: number is too large"),
            "{e}"
        );
        assert_eq!(
            msg("@every 500000000000000000s"),
            "`@every 500000000000000000s`: period too long"
        );
        assert_eq!(
            parse_tz("Mars/Olympus").unwrap_err().to_string(),
            "unknown time zone `Mars/Olympus` (expected an IANA name such as `Europe/Berlin` or `UTC`)"
        );
    }
}
