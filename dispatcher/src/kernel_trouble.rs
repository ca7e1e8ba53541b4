//! Kernel trouble as results: oops, `BUG:`, `WARNING:`, panic, hung-task
//! and soft-lockup reports in the test boot's kernel log (the test agent's
//! `kernel` records) become `kernel` suite results, one per kind, failed,
//! carrying the first report's text; a job whose tests all pass still
//! shows them.

use ferry_proto::record::{Body, Outcome, Record};

use crate::report::TestResult;

/// The suite kernel trouble is reported under.
pub const SUITE: &str = "kernel";

/// Lines of a report kept after its first (its call trace), at most.
const TRACE_LINES: usize = 40;

/// A kind of kernel report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// `Oops:` (x86) or `Internal error: Oops` (ARM).
    Oops,
    /// `BUG:` or `kernel BUG at`.
    Bug,
    /// `WARNING:` (WARN_ON, lockdep).
    Warning,
    /// `Kernel panic - not syncing`.
    Panic,
    /// `INFO: task … blocked for more than … seconds`.
    HungTask,
    /// `BUG: soft lockup - CPU#…` (with or without `watchdog: `).
    SoftLockup,
}

impl Trouble {
    /// Its test case name.
    pub fn name(self) -> &'static str {
        match self {
            Trouble::Oops => "oops",
            Trouble::Bug => "bug",
            Trouble::Warning => "warning",
            Trouble::Panic => "panic",
            Trouble::HungTask => "hung-task",
            Trouble::SoftLockup => "soft-lockup",
        }
    }

    /// The kind of report `line` (one kernel message, as `/dev/kmsg` gives
    /// it) starts, if any.
    pub fn of(line: &str) -> Option<Trouble> {
        let line = line.trim_start();
        // A console copy starts with its timestamp: `[   12.345678] `.
        let line = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
            Some((stamp, rest)) if stamp.trim().parse::<f64>().is_ok() => rest,
            _ => line,
        };
        let line = line.strip_prefix("watchdog: ").unwrap_or(line);
        if line.starts_with("BUG: soft lockup") {
            Some(Trouble::SoftLockup)
        } else if line.starts_with("BUG: ") || line.starts_with("kernel BUG at ") {
            Some(Trouble::Bug)
        } else if line.starts_with("WARNING: ") {
            Some(Trouble::Warning)
        } else if line.starts_with("Oops") || line.starts_with("Internal error: Oops") {
            Some(Trouble::Oops)
        } else if line.starts_with("Kernel panic - not syncing") {
            Some(Trouble::Panic)
        } else if line.starts_with("INFO: task ") && line.contains(" blocked for more than ") {
            Some(Trouble::HungTask)
        } else {
            None
        }
    }
}

/// The first report of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Its kind.
    pub kind: Trouble,
    /// Its text: the report's line and what followed it (its call trace),
    /// up to the end-of-trace marker or the next report.
    pub text: String,
}

/// Finds the first report of each kind in a kernel log read line by line
/// (the records are streamed, never all in memory): what it keeps is
/// bounded by the kinds and [`TRACE_LINES`].
#[derive(Debug, Default)]
pub struct Scanner {
    found: Vec<Report>,
    /// Lines the last report may still take, when it is still open.
    open: usize,
}

impl Scanner {
    /// Reads one kernel message.
    pub fn line(&mut self, line: &str) {
        if let Some(kind) = Trouble::of(line) {
            self.open = 0;
            if !self.found.iter().any(|r| r.kind == kind) {
                self.found.push(Report {
                    kind,
                    text: line.to_string(),
                });
                self.open = TRACE_LINES;
            }
            return;
        }
        if self.open == 0 {
            return;
        }
        if let Some(r) = self.found.last_mut() {
            r.text.push('\n');
            r.text.push_str(line);
        }
        self.open = if line.contains("---[ end ") {
            0
        } else {
            self.open - 1
        };
    }

    /// The first report of each kind, in the order they happened.
    pub fn reports(&self) -> &[Report] {
        &self.found
    }
}

/// The first report of each kind in `records`, in the order they happened.
pub fn scan(records: &[Record]) -> Vec<Report> {
    let mut s = Scanner::default();
    for r in records {
        if let Body::Kernel { line, .. } = &r.body {
            s.line(line);
        }
    }
    s.found
}

/// The `kernel` suite's results for `reports`.
pub fn results(reports: &[Report]) -> Vec<TestResult> {
    reports
        .iter()
        .map(|r| TestResult {
            suite: SUITE.into(),
            name: r.kind.name().into(),
            result: Outcome::Fail,
            measurement: None,
            units: None,
            set: None,
            reference: None,
            duration: None,
            repository: None,
            path: None,
            revision: None,
            commit_id: None,
            message: Some(r.text.clone()),
        })
        .collect()
}

/// What the outcome says about `reports` (none: nothing to say).
pub fn summary(reports: &[Report]) -> Option<String> {
    let first = reports.first()?;
    let kinds: Vec<&str> = reports.iter().map(|r| r.kind.name()).collect();
    let head = first.text.lines().next().unwrap_or_default();
    Some(format!(
        "the kernel reported trouble during the test ({}): {head}",
        kinds.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(line: &str) -> Record {
        Record {
            ts_us: 0,
            boot: "test".into(),
            body: Body::Kernel {
                level: 4,
                kernel_us: 0,
                line: line.into(),
            },
        }
    }

    #[test]
    fn every_kind_is_recognised_in_the_kernels_own_words() {
        let cases = [
            ("Oops: general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP", Some(Trouble::Oops)),
            ("Internal error: Oops: 96000004 [#1] PREEMPT SMP", Some(Trouble::Oops)),
            ("BUG: kernel NULL pointer dereference, address: 0000000000000000", Some(Trouble::Bug)),
            ("kernel BUG at mm/slub.c:4205!", Some(Trouble::Bug)),
            ("WARNING: CPU: 0 PID: 1 at kernel/ferry.c:1 ferry_test+0x0/0x10", Some(Trouble::Warning)),
            ("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009", Some(Trouble::Panic)),
            ("INFO: task kworker/0:1:12 blocked for more than 120 seconds.", Some(Trouble::HungTask)),
            ("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:99]", Some(Trouble::SoftLockup)),
            ("BUG: soft lockup - CPU#1 stuck for 23s!", Some(Trouble::SoftLockup)),
            ("[   12.345678] WARNING: CPU: 1 PID: 2 at x.c:3 f+0x1/0x2", Some(Trouble::Warning)),
            ("random: crng init done", None),
            ("a test printed WARNING: inside a line", None),
            ("INFO: task list", None),
        ];
        for (line, want) in cases {
            assert_eq!(Trouble::of(line), want, "{line}");
        }
    }

    #[test]
    fn the_first_report_of_each_kind_becomes_one_failed_result_with_its_trace() {
        let records = [
            kernel("Linux version 6.1.0"),
            kernel("------------[ cut here ]------------"),
            kernel("WARNING: CPU: 0 PID: 1 at a.c:1 first+0x0/0x10"),
            kernel("Call Trace:"),
            kernel(" <TASK>"),
            kernel("---[ end trace 0000000000000000 ]---"),
            kernel("after the trace"),
            kernel("WARNING: CPU: 0 PID: 1 at b.c:2 second+0x0/0x10"),
            kernel("INFO: task sh:7 blocked for more than 2 seconds."),
            kernel("      Not tainted 6.1.0"),
        ];
        let reports = scan(&records);
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert_eq!(reports[0].kind, Trouble::Warning);
        assert_eq!(
            reports[0].text,
            "WARNING: CPU: 0 PID: 1 at a.c:1 first+0x0/0x10\nCall Trace:\n <TASK>\n---[ end trace 0000000000000000 ]---"
        );
        assert_eq!(reports[1].kind, Trouble::HungTask);
        assert_eq!(
            reports[1].text,
            "INFO: task sh:7 blocked for more than 2 seconds.\n      Not tainted 6.1.0"
        );
        let rows = results(&reports);
        assert_eq!(
            rows.iter()
                .map(|r| (r.suite.as_str(), r.name.as_str(), r.result))
                .collect::<Vec<_>>(),
            [
                ("kernel", "warning", Outcome::Fail),
                ("kernel", "hung-task", Outcome::Fail)
            ]
        );
        let msg = summary(&reports).expect("summary");
        assert!(
            msg.contains("(warning, hung-task)") && msg.contains("first+0x0"),
            "{msg}"
        );
        assert_eq!(summary(&[]), None);
        assert!(scan(&[kernel("all quiet")]).is_empty());
    }
}
