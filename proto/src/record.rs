//! Records the test agent writes on its rootfs, one JSON object per line.
//!
//! Records are the source of truth for results: they are written and
//! fsync'd on the board before anything is mirrored to the console, and the
//! dispatcher reads them back after the board returns to its master image.
//! Appending whole lines with `O_APPEND` lets the test agent and its helper
//! commands (separate processes) share one file safely.

use serde::{Deserialize, Serialize};

/// Folder (relative to the test rootfs) the test agent owns.
pub const FERRY_DIR: &str = "ferry";
/// Folder (relative to the test rootfs) holding the records.
pub const RECORDS_DIR: &str = "ferry/records";
/// The records file of one test run, inside [`RECORDS_DIR`].
pub const RECORDS_FILE: &str = "records.jsonl";
/// The plan file (protobuf `ferry.plan.v1.TestPlan`), relative to the test rootfs.
pub const PLAN_FILE: &str = "ferry/plan.pb";

/// One record: when, on which boot, and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Microseconds since the Unix epoch, on the board's clock.
    pub ts_us: u64,
    /// The boot id the record was written in.
    pub boot: String,
    /// What happened.
    #[serde(flatten)]
    pub body: Body,
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Body {
    /// The test agent started a run of the plan.
    AgentStarted {
        /// The test agent's version.
        version: String,
        /// The job named in the plan.
        job: String,
    },
    /// A definition started.
    DefinitionStarted {
        /// The definition (suite) name.
        definition: String,
    },
    /// One line a definition's steps printed.
    Output {
        /// The definition (suite) name.
        definition: String,
        /// Which stream it came from.
        stream: Stream,
        /// The line, without its newline (lossy UTF-8).
        line: String,
    },
    /// A test case result, from `lava-test-case`.
    Result {
        /// The definition (suite) name.
        definition: String,
        /// The test case id.
        case: String,
        /// The result.
        result: Outcome,
        /// A measurement, when given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        measurement: Option<f64>,
        /// The measurement's units, when given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        units: Option<String>,
        /// The test set the case belongs to, when inside one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<String>,
    },
    /// `lava-test-set start NAME`.
    SetStarted {
        /// The definition (suite) name.
        definition: String,
        /// The set name.
        set: String,
    },
    /// `lava-test-set stop`.
    SetStopped {
        /// The definition (suite) name.
        definition: String,
        /// The set that was stopped.
        set: String,
    },
    /// A definition ended.
    DefinitionFinished {
        /// The definition (suite) name.
        definition: String,
        /// Exit status of its shell; `None` when killed.
        exit_code: Option<i32>,
        /// Whether its own timeout ended it.
        timed_out: bool,
        /// Wall time in milliseconds.
        duration_ms: u64,
    },
    /// The agent itself had something to say (e.g. a definition could not start).
    AgentMessage {
        /// Severity: "info", "warn" or "error".
        level: String,
        /// The message.
        message: String,
    },
    /// A kernel log message (from `/dev/kmsg`) seen during the run.
    Kernel {
        /// Syslog level: 0 emergency .. 7 debug.
        level: u8,
        /// The kernel's own timestamp, microseconds since boot.
        kernel_us: u64,
        /// The message.
        line: String,
    },
    /// The test agent finished the plan and is about to reboot.
    AgentFinished {},
}

/// Output stream of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A test case result, as LAVA spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Passed.
    Pass,
    /// Failed.
    Fail,
    /// Skipped.
    Skip,
    /// Ran, but the result is not known.
    Unknown,
}

impl Outcome {
    /// Parses LAVA's spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pass" => Some(Outcome::Pass),
            "fail" => Some(Outcome::Fail),
            "skip" => Some(Outcome::Skip),
            "unknown" => Some(Outcome::Unknown),
            _ => None,
        }
    }

    /// LAVA's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
            Outcome::Unknown => "unknown",
        }
    }
}

/// A line of the records file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("record line {line}: {source}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// Why it failed.
    pub source: serde_json::Error,
}

impl Record {
    /// Serialises the record as one line, newline included, ready for a single `write`.
    pub fn to_line(&self) -> Vec<u8> {
        // A struct of strings and numbers always serialises.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Reads a records file. A torn last line (power cut mid-write) is
    /// reported in the errors and every whole record before it is kept.
    pub fn parse_all(text: &str) -> (Vec<Record>, Vec<ParseError>) {
        let mut records = Vec::new();
        let mut errors = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(line) {
                Ok(r) => records.push(r),
                Err(source) => errors.push(ParseError {
                    line: i + 1,
                    source,
                }),
            }
        }
        (records, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_record_shape_is_stable() {
        let r = Record {
            ts_us: 7,
            boot: "b".into(),
            body: Body::Result {
                definition: "smoke".into(),
                case: "boot".into(),
                result: Outcome::Pass,
                measurement: Some(1.5),
                units: Some("s".into()),
                set: None,
            },
        };
        let line = String::from_utf8(r.to_line()).expect("utf8");
        assert_eq!(
            line,
            "{\"ts_us\":7,\"boot\":\"b\",\"kind\":\"result\",\"definition\":\"smoke\",\"case\":\"boot\",\"result\":\"pass\",\"measurement\":1.5,\"units\":\"s\"}\n"
        );
        let (back, errs) = Record::parse_all(&line);
        assert!(errs.is_empty());
        assert_eq!(back, vec![r]);
    }

    #[test]
    fn torn_last_line_keeps_the_rest() {
        let good = Record {
            ts_us: 1,
            boot: "b".into(),
            body: Body::AgentFinished {},
        };
        let mut text = String::from_utf8(good.to_line()).expect("utf8");
        text.push_str("{\"ts_us\":2,\"bo");
        let (records, errors) = Record::parse_all(&text);
        assert_eq!(records, vec![good]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 2);
    }
}
