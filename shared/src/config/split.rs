//! Reading a long `[[key]]` array of tables a chunk at a time.
//!
//! toml builds a spanned tree of the whole document before serde sees it:
//! about 2.5 KB per `[[schedules]]` entry, so a file of 100,000 schedules
//! (7.4 MB) peaked at 260 MiB for the tree alone. Cut at its `[[key]]`
//! header lines, the file parses as a head (everything before the first
//! header) and chunks of entries, each tree freed before the next is built.
//!
//! Tables after the last entry (`[[workflows]]` below the schedules) are
//! read with the head: TOML tables mean the same in any order, save the
//! sub-tables of an entry (`[schedules.retry]`), which stay with it.
//!
//! The cut is only trusted when every piece parses and each chunk holds
//! nothing but `key`: a header line inside a multi-line string leaves the
//! chunk it ends unterminated, and a table such as `[api]` between the
//! entries is not an array of `E`. Either way the caller parses the file
//! whole, as before, so the answer and its errors (line, column, key) are
//! always the whole file's.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

/// Entries per chunk: small enough that a chunk's tree is a few MiB,
/// large enough that a file of ordinary size is never cut.
pub const PER_CHUNK: usize = 1024;

/// A document cut at its `[[key]]` header lines.
#[derive(Debug)]
pub struct Split<'a> {
    key: &'a str,
    /// Everything but the entries: the text before the first header, then
    /// the tables after the last entry.
    pub rest: String,
    chunks: Vec<&'a str>,
}

impl<'a> Split<'a> {
    /// Cut `text` before every `per_chunk`-th line that reads `[[key]]`
    /// (surrounding blanks aside), or `None` when it would be one chunk.
    pub fn find(text: &'a str, key: &'a str, per_chunk: usize) -> Option<Self> {
        let header = format!("[[{key}]]");
        let mut starts = Vec::new();
        let mut seen = 0usize;
        let mut offset = 0;
        for line in text.split_inclusive('\n') {
            if line.trim() == header {
                if seen.is_multiple_of(per_chunk.max(1)) {
                    starts.push(offset);
                }
                seen += 1;
            }
            offset += line.len();
        }
        if starts.len() < 2 {
            return None;
        }
        let mut rest = text[..starts[0]].to_owned();
        let mut chunks = Vec::with_capacity(starts.len());
        for (i, &start) in starts.iter().enumerate() {
            let end = match starts.get(i + 1) {
                Some(&next) => next,
                None => {
                    let tail = tail_start(&text[start..], key).map_or(text.len(), |t| start + t);
                    rest.push_str(&text[tail..]);
                    tail
                }
            };
            chunks.push(&text[start..end]);
        }
        Some(Split { key, rest, chunks })
    }

    /// Every chunk's entries in file order, or `None` when a chunk does not
    /// parse or holds anything but `[[key]]` entries.
    pub fn entries<E: DeserializeOwned>(&self) -> Option<Vec<E>> {
        let mut all = Vec::new();
        for chunk in &self.chunks {
            let mut doc: BTreeMap<String, Vec<E>> = toml::from_str(chunk).ok()?;
            let entries = doc.remove(self.key)?;
            if !doc.is_empty() {
                return None;
            }
            all.extend(entries);
        }
        Some(all)
    }
}

/// Where the first table other than `key`'s starts in `chunk` (after its
/// own first line), if one does.
fn tail_start(chunk: &str, key: &str) -> Option<usize> {
    let mut offset = 0;
    for (i, line) in chunk.split_inclusive('\n').enumerate() {
        if i > 0 && opens_other_table(line, key) {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

/// Whether `line` is a table header (`[name]`, `[[name]]`) for anything
/// but `key` and its sub-tables. A line taken for one wrongly (a line of a
/// multi-line string) only spoils the cut: see the module.
fn opens_other_table(line: &str, key: &str) -> bool {
    let t = line.trim();
    let t = t.split_once(" #").map_or(t, |(h, _)| h).trim_end();
    let Some(inner) = t.strip_prefix('[') else {
        return false;
    };
    let inner = inner.strip_prefix('[').unwrap_or(inner).trim_start();
    // A header names a key; a line of an array value (`[1, 2],`) does not
    // end in `]`.
    let names = inner.starts_with(|c: char| c.is_ascii_alphanumeric() || "_-\"'".contains(c));
    let of_key = inner
        .strip_prefix(key)
        .is_some_and(|r| r.starts_with([']', '.', ' ']));
    names && t.ends_with(']') && !of_key
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        name: String,
        #[serde(default)]
        retry: Option<BTreeMap<String, u32>>,
        #[serde(default)]
        note: Option<String>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default)]
        title: Option<String>,
        #[serde(default)]
        api: Option<BTreeMap<String, u32>>,
        #[serde(default)]
        items: Vec<Entry>,
    }

    fn file(n: usize) -> String {
        let mut text = String::from("title = \"t\"\n\n");
        for i in 0..n {
            text.push_str(&format!("[[items]]\nname = \"e{i}\"\n\n"));
            if i % 3 == 0 {
                text.push_str("[items.retry]\nmax = 3\n\n");
            }
        }
        text
    }

    fn whole(text: &str) -> Vec<Entry> {
        toml::from_str::<Doc>(text).unwrap().items
    }

    #[test]
    fn chunks_read_the_same_entries_in_the_same_order_as_the_whole_file() {
        let text = file(10);
        let split = Split::find(&text, "items", 3).unwrap();
        assert_eq!(split.chunks.len(), 4);
        assert_eq!(split.rest, "title = \"t\"\n\n");
        let entries: Vec<Entry> = split.entries().unwrap();
        assert_eq!(entries, whole(&text));
        assert_eq!(entries[9].name, "e9");
        assert_eq!(entries[3].retry.as_ref().unwrap()["max"], 3);
        assert_eq!(entries[4].retry, None);
    }

    #[test]
    fn tables_after_the_last_entry_are_read_with_the_head() {
        let mut text = file(7);
        text.push_str("[api] # after the entries\nport = 1\n");
        let split = Split::find(&text, "items", 3).unwrap();
        let entries: Vec<Entry> = split.entries().unwrap();
        let rest: Doc = toml::from_str(&split.rest).unwrap();
        let whole: Doc = toml::from_str(&text).unwrap();
        assert_eq!(entries, whole.items);
        assert_eq!((rest.title, rest.api), (whole.title, whole.api));
        assert!(rest.items.is_empty());
        // The last entry's sub-table stays with it.
        assert_eq!(entries[6].retry.as_ref().unwrap()["max"], 3);
    }

    #[test]
    fn headers_are_told_from_sub_tables_and_array_lines() {
        for (line, other) in [
            ("[api]\n", true),
            ("  [ api ]  \n", true),
            ("[[workflows]]\n", true),
            ("[api] # port\n", true),
            ("[\"quoted\"]\n", true),
            ("[[items]]\n", false),
            ("[items.retry]\n", false),
            ("[ items . retry ]\n", false),
            ("[1, 2],\n", false),
            ("[\n", false),
            ("name = \"[api]\"\n", false),
        ] {
            assert_eq!(opens_other_table(line, "items"), other, "{line:?}");
        }
    }

    #[test]
    fn a_file_of_one_chunk_is_not_cut() {
        assert!(Split::find(&file(3), "items", 3).is_none());
        assert!(Split::find(&file(4), "items", 3).is_some());
        assert!(Split::find("a = 1\n", "items", 3).is_none());
    }

    #[test]
    fn a_header_line_inside_a_multi_line_string_spoils_the_cut() {
        let mut text = file(4);
        text.push_str("[[items]]\nname = \"x\"\nnote = \"\"\"\n[[items]]\n\"\"\"\n");
        let split = Split::find(&text, "items", 1).unwrap();
        assert!(split.entries::<Entry>().is_none());
        // The whole file reads that header as text.
        assert_eq!(
            whole(&text).last().unwrap().note.as_deref(),
            Some("[[items]]\n")
        );
    }

    #[test]
    fn a_table_between_the_entries_spoils_the_cut() {
        let mut text = file(4);
        text.push_str("[api]\nport = 1\n\n[[items]]\nname = \"last\"\n");
        let split = Split::find(&text, "items", 2).unwrap();
        assert!(split.entries::<Entry>().is_none());
        assert_eq!(whole(&text).len(), 5);
    }

    #[test]
    fn a_bad_entry_spoils_the_cut() {
        let mut text = file(4);
        text.push_str("[[items]]\nname = 5\n");
        assert!(Split::find(&text, "items", 2)
            .unwrap()
            .entries::<Entry>()
            .is_none());
    }

    #[test]
    fn crlf_lines_and_blanks_around_a_header_still_cut() {
        let text = "[[items]]\r\nname = \"a\"\r\n  [[items]]  \r\nname = \"b\"\r\n";
        let split = Split::find(text, "items", 1).unwrap();
        let names: Vec<String> = split
            .entries::<Entry>()
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
