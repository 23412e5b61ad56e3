//! Plugin-free delayed delivery: the binary decomposition of a delay into
//! routing-key bits, one fixed-TTL queue per bit.
//!
//! Level `k` is a queue whose `x-message-ttl` is `2^k` ticks of [`RESOLUTION`]. A
//! message's delay, counted in ticks, is written into its routing key as
//! [`LEVELS`] dot-separated bits, most significant first, followed by the task
//! name: `0.0. … .1.0.1.email.send`. Each level's exchange sends the message into its
//! queue when its bit is set and straight on to the next lower level when it is
//! clear; a level queue dead-letters expired messages into the next lower
//! level's exchange. After level 0 the message reaches the delivery exchange,
//! to which every work queue is bound as `*.…(LEVELS)….<pattern>`, so it lands
//! in the same queues as an undelayed task of that name.
//!
//! Every queue holds a single TTL, so nothing waits behind a longer delay
//! (RabbitMQ expires messages only at the head of a queue).
//!
//! This module is pure: names and arithmetic. [`crate::topology`] declares the
//! objects.

use std::time::Duration;

/// One tick: the smallest delay step. Delays round *up* to a whole tick so a
/// message never arrives early.
pub const RESOLUTION: Duration = Duration::from_millis(100);

/// Number of delay levels (bits). 25 levels of 100 ms reach 2^25 - 1 ticks,
/// about 38.8 days: more than the 30 days a monthly job's retry might need,
/// while the prefix stays 50 bytes of the 255 a routing key may hold.
pub const LEVELS: u32 = 25;

/// Longest delay one trip through the levels can express.
pub const MAX_DELAY: Duration = Duration::from_millis(((1u64 << LEVELS) - 1) * 100);

/// Bytes the bit prefix takes in a routing key (`"b."` per level).
pub const PREFIX_LEN: usize = 2 * LEVELS as usize;

/// Longest task name that still fits a delayed routing key.
pub const MAX_TASK_NAME_LEN: usize = 255 - PREFIX_LEN;

/// Delay in ticks, rounded up, clamped to the range.
pub fn ticks(delay: Duration) -> u64 {
    let res = RESOLUTION.as_nanos();
    let t = delay.as_nanos().div_ceil(res);
    t.min((1u128 << LEVELS) - 1) as u64
}

/// TTL of level `k` in milliseconds.
pub fn level_ttl_ms(level: u32) -> u64 {
    (1u64 << level) * RESOLUTION.as_millis() as u64
}

/// Routing key that carries `task` through the levels for `delay`.
pub fn routing_key(delay: Duration, task: &str) -> String {
    let t = ticks(delay);
    let mut key = String::with_capacity(PREFIX_LEN + task.len());
    for level in (0..LEVELS).rev() {
        key.push(if t & (1 << level) != 0 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(strip_prefix(task));
    key
}

/// Highest level whose bit is set, i.e. the level exchange to publish into;
/// `None` for a zero delay, which needs no level at all.
pub fn entry_level(delay: Duration) -> Option<u32> {
    let t = ticks(delay);
    (t != 0).then(|| 63 - t.leading_zeros())
}

/// The task name inside a routing key, whether it carries a delay prefix or not.
/// Stripping before re-delaying keeps keys under 255 bytes however often a task
/// is retried.
pub fn strip_prefix(key: &str) -> &str {
    let bytes = key.as_bytes();
    if bytes.len() < PREFIX_LEN {
        return key;
    }
    let is_prefix = bytes[..PREFIX_LEN]
        .chunks(2)
        .all(|pair| matches!(pair[0], b'0' | b'1') && pair[1] == b'.');
    if is_prefix {
        &key[PREFIX_LEN..]
    } else {
        key
    }
}

/// Binding pattern on a level's exchange: `bit` at level `level`.
pub fn level_pattern(level: u32, bit: bool) -> String {
    let mut p = String::new();
    for _ in (level + 1..LEVELS).rev() {
        p.push_str("*.");
    }
    p.push(if bit { '1' } else { '0' });
    p.push_str(".#");
    p
}

/// Binding of a work queue on the delivery exchange for a work-exchange pattern.
pub fn delivery_pattern(work_pattern: &str) -> String {
    let mut p = "*.".repeat(LEVELS as usize);
    p.push_str(work_pattern);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_up_never_early() {
        assert_eq!(ticks(Duration::ZERO), 0);
        assert_eq!(ticks(Duration::from_millis(1)), 1);
        assert_eq!(ticks(Duration::from_millis(100)), 1);
        assert_eq!(ticks(Duration::from_millis(101)), 2);
        assert_eq!(ticks(Duration::from_millis(250)), 3);
        assert_eq!(ticks(Duration::from_millis(3300)), 33);
    }

    #[test]
    fn range_covers_thirty_days() {
        assert!(MAX_DELAY >= Duration::from_secs(30 * 24 * 3600));
        assert_eq!(
            ticks(Duration::from_secs(100 * 24 * 3600)),
            (1 << LEVELS) - 1
        );
    }

    #[test]
    fn key_encodes_bits_msb_first() {
        let key = routing_key(Duration::from_millis(3300), "email.send");
        // 33 = 0b100001: levels 5 and 0.
        let bits: Vec<&str> = key.split('.').take(LEVELS as usize).collect();
        assert_eq!(bits.len(), LEVELS as usize);
        assert_eq!(bits[LEVELS as usize - 1], "1");
        assert_eq!(bits[LEVELS as usize - 6], "1");
        assert_eq!(bits.iter().filter(|b| **b == "1").count(), 2);
        assert!(key.ends_with(".email.send"));
        assert_eq!(entry_level(Duration::from_millis(3300)), Some(5));
        assert_eq!(entry_level(Duration::ZERO), None);
    }

    #[test]
    fn redelaying_strips_old_prefix() {
        let once = routing_key(Duration::from_secs(5), "a.b");
        let twice = routing_key(Duration::from_secs(9), &once);
        assert_eq!(twice.len(), once.len());
        assert_eq!(strip_prefix(&twice), "a.b");
        assert_eq!(strip_prefix("a.b"), "a.b");
        assert_eq!(strip_prefix("1.0.report"), "1.0.report");
    }

    #[test]
    fn patterns_address_the_right_word() {
        let key = routing_key(Duration::from_millis(3300), "x");
        let words: Vec<&str> = key.split('.').collect();
        for level in 0..LEVELS {
            let p = level_pattern(level, true);
            let pw: Vec<&str> = p.split('.').collect();
            let idx = pw.len() - 2;
            assert_eq!(idx, (LEVELS - 1 - level) as usize);
            let set = words[idx] == "1";
            assert_eq!(set, level == 5 || level == 0, "level {level}");
        }
        assert_eq!(delivery_pattern("#").matches("*.").count(), LEVELS as usize);
    }

    #[test]
    fn level_ttls_double() {
        assert_eq!(level_ttl_ms(0), 100);
        assert_eq!(level_ttl_ms(1), 200);
        assert_eq!(level_ttl_ms(24), 100 * (1 << 24));
    }
}
