//! The fingerprint of a failure reason: the reason with what differs from
//! one occurrence of the same failure to the next replaced by placeholders,
//! so "timeout after 1234 ms for id 9f0c…" and "timeout after 88 ms for id
//! 11ab…" group together.
//!
//! Replaced: instants (`2024-05-01T10:00:00Z`, with or without time, zone
//! or fraction) by `<time>`; UUIDs and id-like words (8+ hex characters with
//! a digit, or 16+ letters and digits mixed) by `<id>`; every other run of
//! digits by `#`. Whitespace runs become one space. The result is capped, so
//! a huge reason cannot make a huge group key.

/// Longest fingerprint, in bytes (cut at a character boundary).
const MAX_LEN: usize = 256;

/// `reason` without its numbers, ids and instants (see the module docs).
pub fn fingerprint(reason: &str) -> String {
    let b = reason.as_bytes();
    let mut out = String::with_capacity(reason.len().min(MAX_LEN));
    let mut i = 0;
    while i < b.len() && out.len() < MAX_LEN {
        let c = b[i];
        let at_word_start = i == 0 || !b[i - 1].is_ascii_alphanumeric();
        if c.is_ascii_whitespace() {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if !out.is_empty() && i < b.len() {
                out.push(' ');
            }
            continue;
        }
        if at_word_start {
            if let Some(n) = instant_len(&b[i..]) {
                out.push_str("<time>");
                i += n;
                continue;
            }
            if let Some(n) = uuid_len(&b[i..]) {
                out.push_str("<id>");
                i += n;
                continue;
            }
        }
        if c.is_ascii_alphanumeric() {
            let end = i + b[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric())
                .count();
            let word = &reason[i..end];
            if at_word_start && is_id_like(word) {
                out.push_str("<id>");
            } else {
                push_without_digits(&mut out, word);
            }
            i = end;
            continue;
        }
        // A multi-byte character: copy it whole.
        let len = reason[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&reason[i..i + len]);
        i += len;
    }
    if out.len() > MAX_LEN {
        let mut cut = MAX_LEN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out.truncate(out.trim_end().len());
    out
}

/// Each run of digits in `word` as one `#`.
fn push_without_digits(out: &mut String, word: &str) {
    let mut in_digits = false;
    for c in word.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
}

/// A word that names one thing rather than saying something: hex of 8 or
/// more with a digit (`9f0c31ab`, `deadbeef01`), or 16 or more letters and
/// digits mixed (`k7Zp9Qx2mN4bV8cL`, base62 request ids).
fn is_id_like(word: &str) -> bool {
    let has_digit = word.bytes().any(|c| c.is_ascii_digit());
    let has_alpha = word.bytes().any(|c| c.is_ascii_alphabetic());
    let hex = word.bytes().all(|c| c.is_ascii_hexdigit());
    has_digit && ((hex && word.len() >= 8) || (has_alpha && word.len() >= 16))
}

/// Length of a UUID (`8-4-4-4-12` hex) at the start of `b`.
fn uuid_len(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    for (n, group) in [8, 4, 4, 4, 12].into_iter().enumerate() {
        if n > 0 {
            (b.get(i) == Some(&b'-')).then_some(())?;
            i += 1;
        }
        let hex = b[i.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_hexdigit())
            .count();
        (hex == group).then_some(())?;
        i += group;
    }
    ends_word(b, i)
}

/// Length of an instant at the start of `b`: `YYYY-MM-DD`, optionally
/// followed by `T` or a space and `HH:MM[:SS[.fff]]`, optionally a zone
/// (`Z`, `+02:00`, `-0500`).
fn instant_len(b: &[u8]) -> Option<usize> {
    let digits = |at: usize, n: usize| -> bool {
        b.len() >= at + n && b[at..at + n].iter().all(u8::is_ascii_digit)
    };
    let is = |at: usize, c: u8| b.get(at) == Some(&c);
    if !(digits(0, 4) && is(4, b'-') && digits(5, 2) && is(7, b'-') && digits(8, 2)) {
        return None;
    }
    let mut i = 10;
    if (is(i, b'T') || is(i, b't') || is(i, b' ')) && digits(i + 1, 2) && is(i + 3, b':') {
        if !digits(i + 4, 2) {
            return ends_word(b, i);
        }
        i += 6;
        if is(i, b':') && digits(i + 1, 2) {
            i += 3;
            if (is(i, b'.') || is(i, b',')) && digits(i + 1, 1) {
                i += 1;
                while digits(i, 1) {
                    i += 1;
                }
            }
        }
        if is(i, b'Z') || is(i, b'z') {
            i += 1;
        } else if (is(i, b'+') || is(i, b'-')) && digits(i + 1, 2) {
            if is(i + 3, b':') && digits(i + 4, 2) {
                i += 6;
            } else if digits(i + 3, 2) {
                i += 5;
            } else {
                i += 3;
            }
        }
    }
    ends_word(b, i)
}

/// `Some(n)` when `b[n]` does not continue a word (so `2024-05-01x` is no date).
fn ends_word(b: &[u8], n: usize) -> Option<usize> {
    match b.get(n) {
        Some(c) if c.is_ascii_alphanumeric() => None,
        _ => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_ids_and_instants_vanish_from_the_same_failure() {
        let a = fingerprint("timeout after 1234 ms for id 9f0c31ab77e2");
        let b = fingerprint("timeout after 88 ms for id 11ab0c9d2e");
        assert_eq!(a, "timeout after # ms for id <id>");
        assert_eq!(a, b);
    }

    #[test]
    fn uuids_and_instants_become_placeholders() {
        assert_eq!(
            fingerprint(
                "task 0b4c1c9e-3f0a-4a59-9d3c-5c1f0d2b7e11 failed at 2024-05-01T10:00:00.123Z"
            ),
            "task <id> failed at <time>"
        );
        assert_eq!(
            fingerprint(
                "due 2024-05-01 14:03:59+02:00, seen 2026-11-26t03:00:00-0500; day 2024-05-01."
            ),
            "due <time>, seen <time>; day <time>."
        );
        assert_eq!(fingerprint("at 2024-05-01T10:00"), "at <time>");
    }

    #[test]
    fn digits_inside_words_collapse_and_short_words_stay() {
        assert_eq!(
            fingerprint("HTTP 503 from api-v2 after 1500ms"),
            "HTTP # from api-v# after #ms"
        );
        assert_eq!(
            fingerprint("exit status 1.5 (code=137)"),
            "exit status #.# (code=#)"
        );
        // Hex-looking words without a digit are words, not ids.
        assert_eq!(
            fingerprint("deadbeefcafe happened"),
            "deadbeefcafe happened"
        );
        assert_eq!(
            fingerprint("request k7Zp9Qx2mN4bV8cLq refused"),
            "request <id> refused"
        );
        assert_eq!(fingerprint("2024-05-01x"), "#-#-#x");
    }

    #[test]
    fn whitespace_collapses_and_the_length_is_capped() {
        assert_eq!(fingerprint("  a \n\t b  "), "a b");
        assert_eq!(fingerprint(""), "");
        let long = "ü".repeat(1000);
        let f = fingerprint(&long);
        assert!(f.len() <= MAX_LEN && f.chars().all(|c| c == 'ü'), "{f}");
        assert_eq!(fingerprint("héllo 42 wörld"), "héllo # wörld");
    }
}
