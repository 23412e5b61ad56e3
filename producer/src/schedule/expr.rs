//! Cron expression syntax: one grammar for 5, 6 and 7 fields, checked field
//! by field so that every error names the field, the user's text and the
//! allowed range, then compiled into an all-numeric pattern for `croner`,
//! which finds the matching wall-clock times.
//!
//! The rules are robfig/cron v3's (the Go library most cron dialects with a
//! seconds field follow) wherever robfig accepts the expression:
//!
//! * fields: `[sec] min hour dom month dow [year]` — 5 fields have no
//!   seconds (second 0) and 6 fields put seconds first; a 7th field is a year;
//! * day of week 0-7, 0 and 7 = Sunday, 1 = Monday, names `sun`…`sat`, in
//!   every form (5, 6 or 7 fields);
//! * day of month and day of week: a day matches when **either** matches,
//!   unless one of them is unrestricted (`*` or `?`, also `*/1`), then both
//!   must. `*/2` is restricted (robfig; Vixie cron would AND it);
//! * `N/step` means `N-max/step`; in the day-of-week field max is Saturday,
//!   so `mon/2` is Monday, Wednesday, Friday;
//! * a leading `CRON_TZ=Zone` or `TZ=Zone` names the expression's zone.
//!
//! Beyond robfig: 7 for Sunday, full day and month names, `L` (last day of
//! the month), `LW` (last weekday), `15W` (weekday nearest the 15th), `5L`
//! (last Friday), `5#2` (second Friday) and the year field.

use std::collections::BTreeSet;

use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};

use super::UnknownZone;

/// What is wrong with a cron expression, in terms of what the user wrote.
/// The caller prefixes the whole expression ([`super::ScheduleError::Cron`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    // The inner errors are part of the message, not a `source`, so that an
    // error chain printer does not repeat them.
    #[error("`{prefix}`: {zone}")]
    Zone { prefix: String, zone: UnknownZone },
    #[error("`{prefix}` must be followed by an expression")]
    NothingAfterZone { prefix: String },
    #[error("unknown descriptor `{0}` (expected @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly or `@every <duration>`)")]
    UnknownDescriptor(String),
    #[error("expected 5 fields (minute hour day-of-month month day-of-week), 6 (second first) or 7 (second first, year last), got {0}")]
    FieldCount(usize),
    /// Every field was checked first, so this is a bug here, not a user error.
    #[error("internal error: the cron engine refused it ({0})")]
    Engine(String),
    #[error("{field}: a value is missing")]
    ValueMissing { field: &'static str },
    #[error("{field} {value} out of range {range}")]
    OutOfRange {
        field: &'static str,
        value: String,
        range: String,
    },
    #[error("{field}: `{value}` is not a {field} (expected {range})")]
    NotAValue {
        field: &'static str,
        value: String,
        range: String,
    },
    #[error("{field}: empty item in the list `{list}`")]
    EmptyItem { field: &'static str, list: String },
    #[error("{field}: `{item}` has nothing before `/`")]
    NothingBeforeSlash { field: &'static str, item: String },
    #[error("{field}: range `{range}` has no start")]
    RangeWithoutStart { field: &'static str, range: String },
    #[error("{field}: range `{range}` has no end")]
    RangeWithoutEnd { field: &'static str, range: String },
    #[error("{field}: range `{range}` runs backwards ({lo} is after {hi}); write it as a list of two ranges")]
    RangeBackwards {
        field: &'static str,
        range: String,
        lo: u32,
        hi: u32,
    },
    #[error("{field}: `{item}` has no step after `/`")]
    NoStep { field: &'static str, item: String },
    #[error("{field}: `{item}` has more than one `/`")]
    TwoSlashes { field: &'static str, item: String },
    #[error("{field}: step in `{item}` must be at least 1")]
    ZeroStep { field: &'static str, item: String },
    #[error("{field}: step `{step}` in `{item}` is not a positive whole number")]
    BadStep {
        field: &'static str,
        step: String,
        item: String,
    },
    /// The day of a `nW` item is wrong: says what `nW` means.
    #[error("{day} (in `{item}`: `nW` is the weekday nearest day n)")]
    NearestWeekday { item: String, day: Box<CronError> },
    #[error("{field}: `{item}`: the occurrence after `#` must be 1-5 or L")]
    BadOccurrence { field: &'static str, item: String },
}

/// Strip a robfig-style `CRON_TZ=Zone ` / `TZ=Zone ` prefix.
pub fn split_tz_prefix(expr: &str) -> Result<(Option<Tz>, &str), CronError> {
    let expr = expr.trim();
    let (first, rest) = expr.split_once(char::is_whitespace).unwrap_or((expr, ""));
    let zone = first
        .strip_prefix("CRON_TZ=")
        .or_else(|| first.strip_prefix("TZ="));
    let Some(zone) = zone else {
        return Ok((None, expr));
    };
    let tz = super::parse_tz(zone).map_err(|zone| CronError::Zone {
        prefix: first.to_owned(),
        zone,
    })?;
    let rest = rest.trim();
    if rest.is_empty() {
        return Err(CronError::NothingAfterZone {
            prefix: first.to_owned(),
        });
    }
    Ok((Some(tz), rest))
}

/// The descriptors and the 5-field expressions they stand for.
const DESCRIPTORS: &[(&str, &str)] = &[
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

/// Parse a cron expression or descriptor (no `@every`, no zone prefix).
/// Errors say what is wrong, in terms of what the user wrote; the caller
/// prefixes the whole expression.
pub fn parse(expr: &str) -> Result<croner::Cron, CronError> {
    let expr = expr.trim();
    if expr.starts_with('@') {
        let Some((_, five)) = DESCRIPTORS
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(expr))
        else {
            return Err(CronError::UnknownDescriptor(expr.to_owned()));
        };
        return parse(five);
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let (texts, defs): (Vec<&str>, &[&Field]) = match fields.len() {
        5 => (
            [&["0"], &fields[..], &["*"]].concat(),
            &[&SECOND, &MINUTE, &HOUR, &DOM, &MONTH, &DOW, &YEAR],
        ),
        6 => (
            [&fields[..], &["*"]].concat(),
            &[&SECOND, &MINUTE, &HOUR, &DOM, &MONTH, &DOW, &YEAR],
        ),
        7 => (
            fields.clone(),
            &[&SECOND, &MINUTE, &HOUR, &DOM, &MONTH, &DOW, &YEAR],
        ),
        n => return Err(CronError::FieldCount(n)),
    };
    let compiled = texts
        .iter()
        .zip(defs)
        .map(|(text, def)| compile_field(def, text))
        .collect::<Result<Vec<_>, _>>()?;
    let pattern = compiled.join(" ");
    // Every field is all-numeric and in range by now, so croner refusing it
    // would be a bug here, not a user error: say so.
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Required)
        .build()
        .parse(&pattern)
        .map_err(|e| CronError::Engine(e.to_string()))
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    DayOfMonth,
    DayOfWeek,
}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    /// Upper end of `*` and of `N/step`.
    star_max: u32,
    /// Names for `min + index` (three-letter and full).
    names: &'static [(&'static str, &'static str)],
    kind: Kind,
}

const SECOND: Field = plain("second", 0, 59);
const MINUTE: Field = plain("minute", 0, 59);
const HOUR: Field = plain("hour", 0, 23);
// croner searches up to the year 5000.
const YEAR: Field = plain("year", 1970, 4999);
const DOM: Field = Field {
    name: "day-of-month",
    min: 1,
    max: 31,
    star_max: 31,
    names: &[],
    kind: Kind::DayOfMonth,
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    star_max: 12,
    names: &[
        ("jan", "january"),
        ("feb", "february"),
        ("mar", "march"),
        ("apr", "april"),
        ("may", "may"),
        ("jun", "june"),
        ("jul", "july"),
        ("aug", "august"),
        ("sep", "september"),
        ("oct", "october"),
        ("nov", "november"),
        ("dec", "december"),
    ],
    kind: Kind::Plain,
};
const DOW: Field = Field {
    name: "day-of-week",
    min: 0,
    max: 7,
    // robfig: `*` and `N/step` end on Saturday (`mon/2` = Mon, Wed, Fri).
    star_max: 6,
    names: &[
        ("sun", "sunday"),
        ("mon", "monday"),
        ("tue", "tuesday"),
        ("wed", "wednesday"),
        ("thu", "thursday"),
        ("fri", "friday"),
        ("sat", "saturday"),
    ],
    kind: Kind::DayOfWeek,
};

const fn plain(name: &'static str, min: u32, max: u32) -> Field {
    Field {
        name,
        min,
        max,
        star_max: max,
        names: &[],
        kind: Kind::Plain,
    }
}

impl Field {
    fn range_text(&self) -> String {
        let mut s = format!("{}-{}", self.min, self.max);
        if self.kind == Kind::DayOfWeek {
            s.push_str(" (0 and 7 = Sunday) or sun-sat");
        } else if !self.names.is_empty() {
            s.push_str(" or jan-dec");
        }
        s
    }

    /// One value: a number in range or a name.
    fn value(&self, s: &str) -> Result<u32, CronError> {
        let field = self.name;
        if s.is_empty() {
            return Err(CronError::ValueMissing { field });
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u32>() {
                Ok(v) if (self.min..=self.max).contains(&v) => Ok(v),
                _ => Err(CronError::OutOfRange {
                    field,
                    value: s.to_owned(),
                    range: self.range_text(),
                }),
            };
        }
        let lower = s.to_ascii_lowercase();
        self.names
            .iter()
            .position(|(short, long)| lower == *short || lower == *long)
            .map(|i| self.min + i as u32)
            .ok_or_else(|| CronError::NotAValue {
                field,
                value: s.to_owned(),
                range: self.range_text(),
            })
    }
}

/// Compile one field into croner's numeric syntax: `*` when unrestricted
/// (robfig's "star" rule, which decides the day-field OR), else a list.
fn compile_field(f: &Field, text: &str) -> Result<String, CronError> {
    let field = f.name;
    let mut values = BTreeSet::new();
    let mut specials: Vec<String> = Vec::new();
    let mut star = false;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(CronError::EmptyItem {
                field,
                list: text.to_owned(),
            });
        }
        if let Some(special) = special_item(f, item)? {
            specials.push(special);
            continue;
        }
        let (range, step) = match item.split_once('/') {
            None => (item, None),
            Some((r, s)) => (r, Some(step(f, item, s)?)),
        };
        let (lo, hi, is_star) = bounds(f, item, range, step.is_some())?;
        let step = step.unwrap_or(1);
        // robfig: `*` and `*/1` leave the field unrestricted, `*/2` does not.
        // Nothing to list then: the year field's `*` alone would be
        // thousands of values per schedule.
        if is_star && step == 1 {
            star = true;
            continue;
        }
        let mut v = lo;
        while v <= hi {
            values.insert(if f.kind == Kind::DayOfWeek { v % 7 } else { v });
            v += step;
        }
    }
    if star {
        return Ok("*".into());
    }
    let mut out: Vec<String> = values.iter().map(u32::to_string).collect();
    out.extend(specials);
    Ok(out.join(","))
}

/// The first and last value `range` (the part of `item` before any `/`)
/// covers, and whether it is `*`.
fn bounds(
    f: &Field,
    item: &str,
    range: &str,
    stepped: bool,
) -> Result<(u32, u32, bool), CronError> {
    let field = f.name;
    if range.is_empty() {
        return Err(CronError::NothingBeforeSlash {
            field,
            item: item.to_owned(),
        });
    }
    if range == "*" || range == "?" {
        return Ok((f.min, f.star_max, true));
    }
    if let Some((a, b)) = range.split_once('-') {
        let (lo, hi) = range_bounds(f, range, a, b)?;
        return Ok((lo, hi, false));
    }
    let v = f.value(range)?;
    // robfig: `N/step` runs from N to the end of the field.
    Ok((v, if stepped { f.star_max.max(v) } else { v }, false))
}

/// `a-b`, checked: both ends given, not backwards.
fn range_bounds(f: &Field, range: &str, a: &str, b: &str) -> Result<(u32, u32), CronError> {
    let field = f.name;
    if a.is_empty() {
        return Err(CronError::RangeWithoutStart {
            field,
            range: range.to_owned(),
        });
    }
    if b.is_empty() {
        return Err(CronError::RangeWithoutEnd {
            field,
            range: range.to_owned(),
        });
    }
    let lo = f.value(a)?;
    let mut hi = f.value(b)?;
    // `fri-sun`: a range ending on Sunday by name ends on day 7.
    if f.kind == Kind::DayOfWeek && hi == 0 && lo > 0 {
        hi = 7;
    }
    if lo > hi {
        return Err(CronError::RangeBackwards {
            field,
            range: range.to_owned(),
            lo,
            hi,
        });
    }
    Ok((lo, hi))
}

fn step(f: &Field, item: &str, s: &str) -> Result<u32, CronError> {
    let (field, item) = (f.name, item.to_owned());
    if s.is_empty() {
        return Err(CronError::NoStep { field, item });
    }
    if s.contains('/') {
        return Err(CronError::TwoSlashes { field, item });
    }
    match s.parse::<u32>() {
        Ok(0) => Err(CronError::ZeroStep { field, item }),
        Ok(n) if s.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(CronError::BadStep {
            field,
            step: s.to_owned(),
            item,
        }),
    }
}

/// `L`, `LW`, `15W` (day of month), `5L`, `5#2`, `fri#L` (day of week), in
/// croner's spelling; `None` for an ordinary item.
fn special_item(f: &Field, item: &str) -> Result<Option<String>, CronError> {
    let upper = item.to_ascii_uppercase();
    match f.kind {
        Kind::DayOfMonth => {
            if upper == "L" || upper == "LW" {
                return Ok(Some(upper));
            }
            if let Some(day) = upper.strip_suffix('W') {
                let d = f.value(day).map_err(|e| CronError::NearestWeekday {
                    item: item.to_owned(),
                    day: Box::new(e),
                })?;
                return Ok(Some(format!("{d}W")));
            }
            Ok(None)
        }
        Kind::DayOfWeek => {
            if let Some((day, nth)) = item.split_once('#') {
                let d = f.value(day)? % 7;
                let n = match nth {
                    "L" | "l" => "L".to_owned(),
                    "1" | "2" | "3" | "4" | "5" => nth.to_owned(),
                    _ => {
                        return Err(CronError::BadOccurrence {
                            field: f.name,
                            item: item.to_owned(),
                        })
                    }
                };
                return Ok(Some(format!("{d}#{n}")));
            }
            if upper.len() > 1 && upper.ends_with('L') {
                let day = &item[..item.len() - 1];
                // `sunday`-like names do not end in L, so this is `5L`/`friL`.
                if let Ok(d) = f.value(day) {
                    return Ok(Some(format!("{}#L", d % 7)));
                }
            }
            Ok(None)
        }
        Kind::Plain => Ok(None),
    }
}
