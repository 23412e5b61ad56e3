//! The fingerprint of a failure reason: the reason with what differs from
//! one occurrence of the same failure to the next replaced by placeholders,
//! so "timeout after 1234 ms for id 9f0c…" and "timeout after 88 ms for id
//! 11ab…" group together, and with its cause first.
//!
//! The cause first ([`cause_first()`]): the wrappers many reasons share at
//! their start (`permanent error: `, `retryable error: `, `attempts
//! exhausted (3 of 5): `, `<program> exited with 1: `, `<program> was killed
//! by a signal (…): `) move behind the rest, after ` — `; of a Python
//! traceback only its last line (the exception) is kept, followed by
//! `Traceback`. So a list of groups, cut to its width, still shows what
//! went wrong, not the same program name in every row.
//!
//! Then, replaced: instants (`2024-05-01T10:00:00Z`, with or without time,
//! zone or fraction) by `<time>`; UUIDs and id-like words (8+ hex characters
//! with a digit, or 16+ letters and digits mixed) by `<id>`; whole numbers
//! (`42`, `1.5`, `0x1f`, and the number of `1500ms`) by `#`. Digits inside
//! a word stay (`python3`, `v2`, `c3e815`, `worker_7`): they name a thing.
//! Whitespace runs become one space. The result is capped, so a huge reason
//! cannot make a huge group key.

/// Longest fingerprint, in bytes (cut at a character boundary).
const MAX_LEN: usize = 256;

/// Between the cause and the wrappers moved behind it.
const SEPARATOR: &str = " — ";

/// `reason` without its numbers, ids and instants, cause first (see the
/// module docs).
pub fn fingerprint(reason: &str) -> String {
    normalise(&cause_first(reason))
}

/// `reason` with its cause first and the wrappers it shares with other
/// reasons behind it (`ValueError: bad row 7 — permanent error:
/// /usr/bin/python3 exited with 1: Traceback`); a reason without them as is.
pub fn cause_first(reason: &str) -> String {
    let mut rest = reason.trim_start();
    let mut wrappers = Vec::new();
    while let Some((wrapper, after)) = peel(rest) {
        wrappers.push(wrapper);
        rest = after.trim_start();
    }
    let mut cause = rest.trim_end();
    if let Some(last) = traceback_exception(cause) {
        wrappers.push("Traceback");
        cause = last;
    }
    if wrappers.is_empty() || cause.is_empty() {
        return reason.to_owned();
    }
    format!("{cause}{SEPARATOR}{}", wrappers.join(": "))
}

/// A wrapper at the start of `s` and what follows it.
fn peel(s: &str) -> Option<(&str, &str)> {
    for fixed in ["permanent error: ", "retryable error: "] {
        if let Some(after) = s.strip_prefix(fixed) {
            return Some((fixed.trim_end_matches([':', ' ']), after));
        }
    }
    // `attempts exhausted (3 of 5): `
    if s.starts_with("attempts exhausted (") {
        let end = s.find("): ")?;
        return Some((&s[..=end], &s[end + 3..]));
    }
    // `<program> exited with <code>: ` and `<program> was killed by a
    // signal (<status>): `, on the first line only.
    let line = s.split('\n').next().unwrap_or("");
    if let Some(at) = line.find(" exited with ") {
        let code_start = at + " exited with ".len();
        let digits = line[code_start..]
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'-')
            .count();
        let end = code_start + digits;
        if digits > 0 && line[end..].starts_with(": ") && !line[..at].contains(": ") {
            return Some((&s[..end], &s[end + 2..]));
        }
    }
    if let Some(at) = line.find(" was killed by a signal (") {
        let end = at + line[at..].find("): ")?;
        if !line[..at].contains(": ") {
            return Some((&s[..=end], &s[end + 3..]));
        }
    }
    None
}

/// The exception line of a Python traceback (its last non-empty line),
/// when `text` is one.
fn traceback_exception(text: &str) -> Option<&str> {
    if !text.contains("Traceback (most recent call last):") && !text.contains("\n  File \"") {
        return None;
    }
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .filter(|l| !l.starts_with("File \"") && !l.starts_with("Traceback"))
}

/// `text` with instants, ids and whole numbers replaced, whitespace
/// collapsed, capped at [`MAX_LEN`].
fn normalise(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len().min(MAX_LEN));
    let mut i = 0;
    while i < b.len() && out.len() < MAX_LEN {
        let c = b[i];
        let at_word_start = i == 0 || !is_word(b[i - 1]);
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
        if is_word(c) {
            let mut end = i + b[i..].iter().take_while(|c| is_word(**c)).count();
            let word = &text[i..end];
            // Ids first: a hex id that happens to have no letter
            // (`20481632`) must not make a group of its own.
            if is_id_like(word) {
                out.push_str("<id>");
            } else if word.bytes().all(|c| c.is_ascii_digit()) {
                // A decimal (`1.5`, `3.10.8`) is one number.
                while b.get(end) == Some(&b'.') && b.get(end + 1).is_some_and(u8::is_ascii_digit) {
                    end += 1;
                    while b.get(end).is_some_and(u8::is_ascii_digit) {
                        end += 1;
                    }
                }
                out.push('#');
            } else if is_hex_literal(word) {
                out.push('#');
            } else if let Some(unit) = unit_suffix(word) {
                out.push('#');
                out.push_str(unit);
            } else {
                out.push_str(word);
            }
            i = end;
            continue;
        }
        // Punctuation, or a multi-byte character: copied whole.
        let len = text[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&text[i..i + len]);
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

/// Characters of a word (an identifier: `worker_7` is one word).
fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// `0x1f`, `0XDEAD`: a number written in hex.
fn is_hex_literal(word: &str) -> bool {
    let digits = word.strip_prefix("0x").or_else(|| word.strip_prefix("0X"));
    digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// The unit of a number with one glued on (`1500ms` → `ms`, `3xx` → `xx`).
fn unit_suffix(word: &str) -> Option<&str> {
    let digits = word.bytes().take_while(u8::is_ascii_digit).count();
    let unit = &word[digits..];
    (digits > 0 && !unit.is_empty() && unit.bytes().all(|c| c.is_ascii_alphabetic()))
        .then_some(unit)
}

/// A word that names one thing rather than saying something: hex of 8 or
/// more with a digit (`9f0c31ab`, `deadbeef01`), or 16 or more letters and
/// digits mixed (`k7Zp9Qx2mN4bV8cL`, base62 request ids).
fn is_id_like(word: &str) -> bool {
    let alnum = word.bytes().all(|c| c.is_ascii_alphanumeric());
    let has_digit = word.bytes().any(|c| c.is_ascii_digit());
    let has_alpha = word.bytes().any(|c| c.is_ascii_alphabetic());
    let hex = word.bytes().all(|c| c.is_ascii_hexdigit());
    alnum && has_digit && ((hex && word.len() >= 8) || (has_alpha && word.len() >= 16))
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
        Some(c) if is_word(*c) => None,
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
        // A hex id without a letter is still an id.
        assert_eq!(fingerprint("timeout after 7 ms for id 20481632"), a);
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
    fn whole_numbers_go_and_digits_inside_words_stay() {
        assert_eq!(
            fingerprint("HTTP 503 from api-v2 after 1500ms"),
            "HTTP # from api-v2 after #ms"
        );
        assert_eq!(
            fingerprint("exit status 1.5 (code=137) at 127.0.0.1:5672"),
            "exit status # (code=#) at #:#"
        );
        // Programs, versions, short hex and identifiers name things.
        assert_eq!(
            fingerprint("/usr/bin/python3 crashed in c3e815 on worker_7, node-3, pointer 0x7ffd"),
            "/usr/bin/python3 crashed in c3e815 on worker_7, node-#, pointer #"
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
        assert_eq!(
            fingerprint("the_field_number_12345 is long"),
            "the_field_number_12345 is long"
        );
        assert_eq!(fingerprint("2024-05-01x"), "#-#-#x");
    }

    #[test]
    fn the_cause_comes_before_the_wrappers_it_shares() {
        let a = "permanent error: /usr/bin/python3 exited with 1: ValueError: bad row 17";
        assert_eq!(
            cause_first(a),
            "ValueError: bad row 17 — permanent error: /usr/bin/python3 exited with 1"
        );
        assert_eq!(
            fingerprint(a),
            "ValueError: bad row # — permanent error: /usr/bin/python3 exited with #"
        );
        assert_eq!(
            fingerprint("attempts exhausted (3 of 5): upstream said 502"),
            "upstream said # — attempts exhausted (# of #)"
        );
        assert_eq!(
            fingerprint("attempts exhausted (5 of 5): /bin/sh was killed by a signal (signal: 9 (SIGKILL)): oom"),
            "oom — attempts exhausted (# of #): /bin/sh was killed by a signal (signal: # (SIGKILL))"
        );
        let tb = "permanent error: /usr/bin/python3 exited with 1: Traceback (most recent call last):\n  \
                  File \"/srv/job.py\", line 12, in <module>\n    main()\n  \
                  File \"/srv/job.py\", line 9, in main\n    raise KeyError(k)\nKeyError: 'customer_42'\n";
        assert_eq!(
            fingerprint(tb),
            "KeyError: 'customer_42' — permanent error: /usr/bin/python3 exited with #: Traceback"
        );
        // Nothing after the wrapper, or no wrapper: the reason as it is.
        assert_eq!(
            cause_first("permanent error: /bin/false exited with 1: "),
            "permanent error: /bin/false exited with 1: "
        );
        assert_eq!(cause_first("no handler for it.x"), "no handler for it.x");
        // A colon before "exited with" is text, not a program.
        assert_eq!(
            cause_first("step: job exited with 2: oops"),
            "step: job exited with 2: oops"
        );
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
