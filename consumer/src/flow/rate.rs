//! Rates as written in config (`"50/s"`, `"300/m"`, `"1000/h"`) and the
//! token bucket that enforces one, in its GCRA form: one instant (the
//! theoretical arrival time) instead of a token count, so a reservation is
//! one comparison and one addition. Pure: every instant is passed in.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Tasks per unit of time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    count: f64,
    unit: Duration,
}

/// Why a rate does not parse (the config check shows it after the value).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("expected tasks per second, minute or hour, e.g. \"50/s\", \"300/m\", \"1000/h\"")]
pub struct BadRate;

/// The fastest rate accepted: a bucket below a microsecond per task would
/// no longer be a limit.
const MAX_PER_SECOND: f64 = 1_000_000.0;

impl FromStr for Rate {
    type Err = BadRate;

    fn from_str(s: &str) -> Result<Self, BadRate> {
        let (count, unit) = s.split_once('/').ok_or(BadRate)?;
        let count: f64 = count.trim().parse().map_err(|_| BadRate)?;
        let unit = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(BadRate),
        };
        let rate = Self { count, unit };
        if !count.is_finite() || count <= 0.0 || rate.per_second() > MAX_PER_SECOND {
            return Err(BadRate);
        }
        Ok(rate)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        self.count / self.unit.as_secs_f64()
    }

    /// Time between two starts at this rate.
    pub fn interval(&self) -> Duration {
        self.unit.div_f64(self.count)
    }

    /// The burst when config sets none: 100 ms worth of tasks, at least one.
    /// Small enough that a limit still reads as a pace, large enough that a
    /// timer waking a little late does not lose throughput.
    pub fn default_burst(&self) -> u32 {
        (self.per_second() / 10.0)
            .ceil()
            .clamp(1.0, f64::from(u32::MAX)) as u32
    }
}

/// A token bucket of `burst` tokens refilled at one per `interval`.
#[derive(Debug, Clone)]
pub struct Bucket {
    interval: Duration,
    /// How far ahead of now the arrival time may run and a start still be
    /// immediate: `(burst - 1) × interval`.
    tolerance: Duration,
    /// Theoretical arrival time: when the bucket is next full again minus the burst.
    tat: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: Rate, burst: u32) -> Self {
        let interval = rate.interval();
        Self {
            interval,
            tolerance: interval.saturating_mul(burst.saturating_sub(1)),
            tat: None,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long a start asked for at `now` would wait for its token.
    pub fn wait(&self, now: Instant) -> Duration {
        self.ahead(now).saturating_sub(self.tolerance)
    }

    /// Take the next token: the instant the caller may start (`now` when a
    /// token is free, later when it has to wait for one).
    pub fn reserve(&mut self, now: Instant) -> Instant {
        let ahead = self.ahead(now);
        self.tat = Some(now + ahead + self.interval);
        now + ahead.saturating_sub(self.tolerance)
    }

    /// When every token taken so far has been paid back.
    pub fn drained_at(&self, now: Instant) -> Instant {
        now + self.ahead(now)
    }

    fn ahead(&self, now: Instant) -> Duration {
        self.tat
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_per_second_minute_and_hour() {
        let r: Rate = "50/s".parse().unwrap();
        assert_eq!(r.interval(), Duration::from_millis(20));
        assert_eq!(r.to_string(), "50/s");
        let r: Rate = "300 / m".parse().unwrap();
        assert_eq!(r.per_second(), 5.0);
        let r: Rate = "1800/hour".parse().unwrap();
        assert_eq!(r.interval(), Duration::from_secs(2));
        let r: Rate = "0.5/s".parse().unwrap();
        assert_eq!(r.interval(), Duration::from_secs(2));
    }

    #[test]
    fn refuses_what_is_not_a_rate() {
        for bad in [
            "fast",
            "50",
            "50/",
            "/s",
            "50/d",
            "0/s",
            "-1/s",
            "NaN/s",
            "inf/s",
            "50/s/s",
            "2000000/s",
        ] {
            assert_eq!(bad.parse::<Rate>(), Err(BadRate), "{bad}");
        }
    }

    #[test]
    fn default_burst_is_a_tenth_of_a_second_at_least_one() {
        let burst = |s: &str| s.parse::<Rate>().unwrap().default_burst();
        assert_eq!(burst("20/s"), 2);
        assert_eq!(burst("50/s"), 5);
        assert_eq!(burst("1/s"), 1);
        assert_eq!(burst("10/h"), 1);
    }

    #[test]
    fn burst_starts_at_once_then_paces() {
        let mut b = Bucket::new("10/s".parse().unwrap(), 3);
        let t0 = Instant::now();
        let ms = |n| Duration::from_millis(n);
        let starts: Vec<Duration> = (0..6).map(|_| b.reserve(t0) - t0).collect();
        assert_eq!(starts, vec![ms(0), ms(0), ms(0), ms(100), ms(200), ms(300)]);
        assert_eq!(b.wait(t0), ms(400));
        assert_eq!(b.drained_at(t0) - t0, ms(600));
        // Half a second later two tokens are back (and the one reserved for 300 ms is used).
        assert_eq!(b.wait(t0 + ms(500)), ms(0));
        assert_eq!(b.reserve(t0 + ms(500)), t0 + ms(500));
        assert_eq!(b.reserve(t0 + ms(500)), t0 + ms(500));
        assert_eq!(b.reserve(t0 + ms(500)), t0 + ms(600));
    }

    #[test]
    fn an_idle_bucket_refills_only_up_to_its_burst() {
        let mut b = Bucket::new("10/s".parse().unwrap(), 2);
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        let starts: Vec<Instant> = (0..3).map(|_| b.reserve(later)).collect();
        assert_eq!(
            starts,
            vec![later, later, later + Duration::from_millis(100)]
        );
    }

    #[test]
    fn a_steady_stream_never_exceeds_the_rate() {
        // Ask every millisecond for ten seconds: starts in any 1 s window
        // number at most rate + burst.
        let mut b = Bucket::new("20/s".parse().unwrap(), 2);
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            if b.wait(now).is_zero() {
                starts.push(b.reserve(now));
            }
        }
        assert!((199..=202).contains(&starts.len()), "{}", starts.len());
        for (i, s) in starts.iter().enumerate() {
            let in_window = starts[i..]
                .iter()
                .take_while(|t| **t - *s < Duration::from_secs(1))
                .count();
            assert!(in_window <= 22, "{in_window} starts within 1 s");
        }
    }
}
