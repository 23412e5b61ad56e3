//! Summaries of runs: median and spread, ratios per run, and the Markdown
//! rows `--table FILE` collects for `bench/run.sh` (one row per line, cells
//! `|`-separated; the script adds the header and the machine).

use std::fmt;
use std::io::Write;

use anyhow::{Context, Result};

use crate::Args;

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn list(v: &[f64], prec: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.prec$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `other / base`, run by run (runs are interleaved, so run i of both sides
/// saw the same machine).
pub fn ratios(base: &[f64], other: &[f64]) -> Vec<f64> {
    base.iter().zip(other).map(|(b, o)| o / b).collect()
}

/// Median and range of a set of runs.
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(v: &[f64]) -> Spread {
        Spread {
            median: median(v),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    /// As a ratio: `**0.93** (0.88–0.97)`.
    pub fn ratio(&self) -> String {
        if self.min > self.max {
            return "—".into();
        }
        format!("**{:.2}** ({:.2}–{:.2})", self.median, self.min, self.max)
    }
}

/// As a rate: `21.2k/s (20.1k–22.4k)`.
impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min > self.max {
            return f.write_str("—");
        }
        let k = |x: f64| format!("{:.1}k", x / 1000.0);
        write!(f, "{}/s ({}–{})", k(self.median), k(self.min), k(self.max))
    }
}

/// Append one row to `--table FILE`, if given. Columns: what, plain lapin,
/// warren, warren / plain, target, rusty-celery, Celery, note.
pub fn row(args: &Args, cells: &[String]) -> Result<()> {
    let Some(path) = &args.table else {
        return Ok(());
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
    writeln!(f, "| {} |", cells.join(" | "))?;
    Ok(())
}
