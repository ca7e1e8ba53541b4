//! LAVA's `parse.pattern` and `parse.fixupdict`, applied on the board to
//! each line a definition prints, so pattern results are records like any
//! `lava-test-case` call, never read back from the console.

use std::collections::HashMap;

use ferry_proto::record::{Body, Outcome, Stream};
use regex::Regex;

/// Longest line the pattern is tried on; a longer one is cut there (LAVA
/// matches on its console buffer, which is bounded too).
const MAX_LINE: usize = 64 * 1024;

/// Why a definition's pattern cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    /// Not a regular expression this engine reads (lookaround and
    /// backreferences are Python-only).
    #[error("parse.pattern {pattern:?} is not a supported regular expression: {source}")]
    Syntax {
        /// The pattern.
        pattern: String,
        /// The compiler's message.
        source: Box<regex::Error>,
    },
    /// A group LAVA needs is missing.
    #[error("parse.pattern {pattern:?} has no named group {group:?}")]
    MissingGroup {
        /// The pattern.
        pattern: String,
        /// `test_case_id` or `result`.
        group: &'static str,
    },
}

/// A compiled pattern and its fixups.
#[derive(Debug, Clone)]
pub struct Pattern {
    regex: Regex,
    fixup: HashMap<String, String>,
}

impl Pattern {
    /// Compiles LAVA's pattern. Python's `(?P<name>...)` groups are read as
    /// they are.
    ///
    /// # Errors
    /// A syntax error or a missing `test_case_id`/`result` group.
    pub fn new(pattern: &str, fixup: HashMap<String, String>) -> Result<Self, PatternError> {
        let regex = Regex::new(pattern).map_err(|e| PatternError::Syntax {
            pattern: pattern.into(),
            source: Box::new(e),
        })?;
        for group in ["test_case_id", "result"] {
            if !regex.capture_names().flatten().any(|n| n == group) {
                return Err(PatternError::MissingGroup {
                    pattern: pattern.into(),
                    group,
                });
            }
        }
        Ok(Pattern { regex, fixup })
    }

    /// The result `line` reports, if it matches. As in LAVA: the result word
    /// goes through the fixupdict; a case id with whitespace is skipped; a
    /// result that is still not pass/fail/skip/unknown, or a measurement
    /// that is not a number, is reported as the `Err` message.
    pub fn matches(&self, definition: &str, line: &str) -> Option<Result<Body, String>> {
        let caps = self.regex.captures(line)?;
        let case = caps.name("test_case_id")?.as_str().trim().to_string();
        if case.is_empty() || case.chars().any(char::is_whitespace) {
            return None;
        }
        let raw = caps.name("result").map(|m| m.as_str()).unwrap_or_default();
        let word = self.fixup.get(raw).map(String::as_str).unwrap_or(raw);
        let Some(result) = Outcome::parse(word) else {
            return Some(Err(format!(
                "parse.pattern matched {case:?} with result {raw:?}, which is not pass, fail, skip or unknown (after fixupdict)"
            )));
        };
        let measurement = match caps.name("measurement").map(|m| m.as_str().trim()) {
            None | Some("") => None,
            Some(m) => match m.parse::<f64>() {
                Ok(v) if v.is_finite() => Some(v),
                _ => {
                    return Some(Err(format!(
                    "parse.pattern matched {case:?} with measurement {m:?}, which is not a number"
                )))
                }
            },
        };
        let units = caps
            .name("units")
            .map(|m| m.as_str().trim().to_string())
            .filter(|u| !u.is_empty() && measurement.is_some());
        Some(Ok(Body::Result {
            definition: definition.into(),
            case,
            result,
            measurement,
            units,
            set: None,
            reference: None,
        }))
    }
}

/// Cuts one definition's output chunks into lines, per stream, for a pattern.
#[derive(Debug)]
pub struct LineParser {
    pattern: Pattern,
    definition: String,
    partial: [Vec<u8>; 2],
}

impl LineParser {
    /// A parser for `definition`'s output.
    pub fn new(pattern: Pattern, definition: &str) -> Self {
        LineParser {
            pattern,
            definition: definition.into(),
            partial: [Vec::new(), Vec::new()],
        }
    }

    fn line(&self, bytes: &[u8], out: &mut Vec<Result<Body, String>>) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches(['\n', '\r']);
        if let Some(r) = self.pattern.matches(&self.definition, text) {
            out.push(r);
        }
    }

    /// Feeds a chunk; returns what its finished lines report.
    pub fn chunk(&mut self, stream: Stream, data: &[u8]) -> Vec<Result<Body, String>> {
        let i = stream as usize;
        let mut out = Vec::new();
        let mut rest = data;
        while let Some(n) = rest.iter().position(|b| *b == b'\n') {
            let (line, tail) = rest.split_at(n + 1);
            rest = tail;
            if self.partial[i].is_empty() {
                self.line(line, &mut out);
            } else {
                let mut whole = std::mem::take(&mut self.partial[i]);
                whole.extend_from_slice(line);
                self.line(&whole, &mut out);
            }
        }
        let room = MAX_LINE.saturating_sub(self.partial[i].len());
        self.partial[i].extend_from_slice(&rest[..rest.len().min(room)]);
        out
    }

    /// The unfinished last lines, once the definition has ended.
    pub fn finish(&mut self) -> Vec<Result<Body, String>> {
        let mut out = Vec::new();
        for i in 0..2 {
            let whole = std::mem::take(&mut self.partial[i]);
            if !whole.is_empty() {
                self.line(&whole, &mut out);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(p: &str, fix: &[(&str, &str)]) -> Pattern {
        Pattern::new(
            p,
            fix.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
        .expect("pattern")
    }

    fn case(b: &Body) -> (String, Outcome, Option<f64>, Option<String>) {
        match b {
            Body::Result {
                case,
                result,
                measurement,
                units,
                ..
            } => (case.clone(), *result, *measurement, units.clone()),
            other => panic!("not a result: {other:?}"),
        }
    }

    #[test]
    fn python_named_groups_and_fixupdict_as_in_lava() {
        // The pattern of Linaro's test-definitions (automated/linux/...).
        let p = pattern(
            r"^(?P<test_case_id>\S+)\s+(?P<result>PASS|FAIL|SKIP)(\s+(?P<measurement>[0-9.]+)\s+(?P<units>\S+))?$",
            &[("PASS", "pass"), ("FAIL", "fail"), ("SKIP", "skip")],
        );
        let mut lp = LineParser::new(p, "d");
        let mut got = lp.chunk(Stream::Stdout, b"boot PASS\nnoise\nthrough");
        got.extend(lp.chunk(Stream::Stderr, b"err FAIL\n"));
        got.extend(lp.chunk(Stream::Stdout, b"put PASS 12.5 MB/s\r\nlast SKIP"));
        got.extend(lp.finish());
        let got: Vec<_> = got.iter().map(|r| case(r.as_ref().expect("ok"))).collect();
        assert_eq!(
            got,
            vec![
                ("boot".into(), Outcome::Pass, None, None),
                ("err".into(), Outcome::Fail, None, None),
                (
                    "throughput".into(),
                    Outcome::Pass,
                    Some(12.5),
                    Some("MB/s".into())
                ),
                ("last".into(), Outcome::Skip, None, None),
            ]
        );
    }

    #[test]
    fn bad_words_and_measurements_are_reported_not_recorded() {
        let p = pattern(
            r"(?P<test_case_id>\w+): (?P<result>\w+)( (?P<measurement>\S+))?",
            &[],
        );
        assert!(p.matches("d", "a: maybe").expect("match").is_err());
        assert!(p.matches("d", "a: pass fast").expect("match").is_err());
        assert!(p.matches("d", "a: pass").expect("match").is_ok());
        assert!(p.matches("d", "nothing here").is_none());
    }

    #[test]
    fn refuses_patterns_lava_could_not_use() {
        assert!(matches!(
            Pattern::new(r"(?P<test_case_id>\w+)", HashMap::new()),
            Err(PatternError::MissingGroup {
                group: "result",
                ..
            })
        ));
        assert!(matches!(
            Pattern::new(r"(?P<test_case_id>\w+)(?=x)(?P<result>\w+)", HashMap::new()),
            Err(PatternError::Syntax { .. })
        ));
    }
}
