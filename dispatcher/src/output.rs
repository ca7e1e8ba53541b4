//! The output folder schedulers and people read: `results.json`,
//! `junit.xml`, `outcome.json` and `summary.txt` (also printed on stdout).
//! `events.jsonl` and `console.log` are written live by [`crate::events`].

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::json;

use crate::outcome::{Class, Health, Outcome, Verdict};
use crate::report::{self, Counts, TestResult, LAVA_SUITE};
use crate::timings::Phases;

/// A boot the dispatcher saw announced.
#[derive(Debug, Clone, Serialize)]
pub struct Boot {
    /// "master" or "test".
    pub role: &'static str,
    /// Its boot id.
    pub boot: String,
    /// The announcing agent's version.
    pub version: String,
}

/// Everything the output folder says about a run.
pub struct Report<'a> {
    /// The folder.
    pub out: &'a Path,
    /// The job's name, once its file was read.
    pub job: Option<&'a str>,
    /// The board's name, once its file was read.
    pub device: Option<&'a str>,
    /// Things accepted but not acted on.
    pub warnings: &'a [String],
    /// How it ended.
    pub outcome: &'a Outcome,
    /// Boots seen, in order.
    pub boots: &'a [Boot],
    /// Results, in LAVA's shape.
    pub results: &'a [TestResult],
    /// Where the time went, once the job ran.
    pub phases: Option<&'a Phases>,
    /// When the run started.
    pub started: SystemTime,
    /// Every failure of the run and the health answer, once the job ran.
    pub verdict: Option<(&'a Verdict, Health)>,
}

/// The files [`write`] produces, `outcome.json` last.
const FILES: [&str; 6] = [
    "results.json",
    "results.yaml",
    "junit.xml",
    "summary.txt",
    crate::html::FILE,
    "outcome.json",
];

/// Removes a previous run's files from a reused output folder, so a job that
/// dies before [`write`] can never show another job's outcome.
///
/// # Errors
/// When one exists and cannot be removed.
pub fn clear(out: &Path) -> std::io::Result<()> {
    for name in FILES {
        match std::fs::remove_file(out.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    for dir in [BOARD_DIR, crate::records::OUTPUT_DIR] {
        match std::fs::remove_dir_all(out.join(dir)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The folder, inside the output folder, the board's record files go to.
pub const BOARD_DIR: &str = "board";

/// Writes `name` in `out` atomically (a temporary file renamed into place):
/// a reader never sees half a file, even if the dispatcher dies mid-write.
pub(crate) fn put(out: &Path, name: &str, text: &[u8]) -> std::io::Result<()> {
    let mut tmp = tempfile::NamedTempFile::new_in(out)?;
    tmp.write_all(text)?;
    tmp.as_file().sync_data()?;
    tmp.persist(out.join(name)).map_err(|e| e.error)?;
    Ok(())
}

/// Writes the folder's files and prints the summary. Best effort: a file
/// that cannot be written must not hide the exit code.
pub fn write(r: &Report) {
    let results = serde_json::to_string_pretty(r.results).unwrap_or_else(|_| "[]".into());
    let _ = put(r.out, "results.json", (results + "\n").as_bytes());
    let _ = put(
        r.out,
        "results.yaml",
        report::results_yaml(r.job.unwrap_or(""), r.results).as_bytes(),
    );
    let _ = put(
        r.out,
        "junit.xml",
        report::junit(r.job.unwrap_or(""), r.results).as_bytes(),
    );
    let counts = Counts::of(r.results);
    let outcome = json!({
        "class": r.outcome.class,
        "exit_code": r.outcome.class.exit_code(),
        "message": r.outcome.message,
        "job": r.job,
        "device": r.device,
        "duration_seconds": seconds(r.started),
        "dispatcher_peak_rss_kib": peak_rss_kib(),
        "dispatcher_cpu_seconds": cpu_seconds(),
        "boots": r.boots,
        "phases": r.phases,
        "results": { "pass": counts.pass, "fail": counts.fail, "skip": counts.skip, "unknown": counts.unknown },
        "warnings": r.warnings,
        "failures": r.verdict.as_ref().map(|(v, _)| v.failures()),
        "health": r.verdict.as_ref().map(|(_, h)| h),
    });
    let text = serde_json::to_string_pretty(&outcome).unwrap_or_default();
    let summary = summary(r);
    let _ = put(r.out, "summary.txt", summary.as_bytes());
    if let Err(e) = crate::html::write(r.out, Some(&outcome)) {
        tracing::warn!("report.html not written: {e}");
    }
    // Last: a scheduler that sees outcome.json sees the rest too.
    let _ = put(r.out, "outcome.json", (text + "\n").as_bytes());
    // A closed stdout (a scheduler that stopped reading) is not an error.
    let _ = std::io::stdout().write_all(summary.as_bytes());
}

/// The dispatcher's own CPU time (user + system), for capacity planning
/// when many boards share a host.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // Clock ticks: 100 per second on every Linux ABI Ferry runs on.
    Some((utime + stime) as f64 / 100.0)
}

/// The dispatcher's own peak resident memory (VmHWM), likewise.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn seconds(since: SystemTime) -> f64 {
    since.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The one-screen summary.
fn summary(r: &Report) -> String {
    let o = r.outcome;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ferry: job {} on {}: {} (exit {}) in {:.1}s",
        r.job.unwrap_or("(unread)"),
        r.device.unwrap_or("(unread)"),
        o.class.name(),
        o.class.exit_code(),
        seconds(r.started)
    );
    if o.class != Class::Complete {
        let _ = writeln!(s, "  {}", o.message);
    }
    let c = Counts::of(r.results.iter().filter(|t| t.suite != LAVA_SUITE));
    let _ = writeln!(
        s,
        "  test cases: {} pass, {} fail, {} skip, {} unknown",
        c.pass, c.fail, c.skip, c.unknown
    );
    for def in r.results.iter().filter(|t| t.suite == LAVA_SUITE) {
        let _ = writeln!(s, "  definition {:<24} {}", def.name, def.result.as_str());
    }
    let not_passed = r
        .results
        .iter()
        .filter(|t| t.suite != LAVA_SUITE && t.result.as_str() != "pass");
    for t in not_passed.take(15) {
        let _ = writeln!(s, "    {:>7}  {}/{}", t.result.as_str(), t.suite, t.name);
    }
    if !r.boots.is_empty() {
        let path: Vec<_> = r.boots.iter().map(|b| b.role).collect();
        let _ = writeln!(s, "  boots: {}", path.join(" -> "));
    }
    if let Some(line) = r.phases.and_then(Phases::line) {
        let _ = writeln!(s, "  phases: {line}");
    }
    for w in r.warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
    let _ = writeln!(s, "  output: {}", r.out.display());
    s
}
