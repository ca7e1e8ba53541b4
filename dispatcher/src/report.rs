//! Turning board records into what schedulers and people read:
//! `results.json`, `junit.xml` and the one-screen summary.

use std::fmt::Write as _;

use ferry_proto::plan::v1::TestPlan;
use ferry_proto::record::{Body, Outcome, Record};
use serde::Serialize;

/// The suite LAVA reports each definition's own run under.
pub const LAVA_SUITE: &str = "lava";

/// One result, in LAVA's shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestResult {
    /// The definition (suite) name, or `lava` for a definition's own result.
    pub suite: String,
    /// The test case id.
    pub name: String,
    /// pass, fail, skip or unknown.
    pub result: Outcome,
    /// A measurement, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measurement: Option<f64>,
    /// Its units.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub units: Option<String>,
    /// The test set, when inside one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    /// A URL, from `lava-test-reference`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// A `lava` row: the definition's wall time in seconds (`"1.25"`, as LAVA writes it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// A `lava` row of a definition from git: the repository URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// A `lava` row of a definition from git: the definition's path in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A `lava` row of a definition from git: the revision or branch asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// A `lava` row of a definition from git: the commit it resolved to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_id: Option<String>,
    /// A `kernel` row: the first report's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The results of a run: every `lava-test-case`, then one `lava` result per
/// definition in the plan (pass when its steps all succeeded, fail when one
/// failed or it timed out, unknown when it never finished).
pub fn results(plan: &TestPlan, records: &[Record], plan_ran: bool) -> Vec<TestResult> {
    let mut out: Vec<TestResult> = records
        .iter()
        .filter_map(|r| match &r.body {
            Body::Result {
                definition,
                case,
                result,
                measurement,
                units,
                set,
                reference,
            } => Some(TestResult {
                suite: definition.clone(),
                name: case.clone(),
                reference: reference.clone(),
                duration: None,
                repository: None,
                path: None,
                revision: None,
                commit_id: None,
                message: None,
                result: *result,
                measurement: *measurement,
                units: units.clone(),
                set: set.clone(),
            }),
            _ => None,
        })
        .collect();
    if !plan_ran {
        return out;
    }
    for def in &plan.definitions {
        let finished = records.iter().rev().find_map(|r| match &r.body {
            Body::DefinitionFinished {
                definition,
                exit_code,
                timed_out,
                duration_ms,
            } if *definition == def.name => Some((*exit_code, *timed_out, *duration_ms)),
            _ => None,
        });
        let git = |v: &str| (!def.commit.is_empty()).then(|| v.to_string());
        let result = match finished {
            Some((Some(0), false, _)) => Outcome::Pass,
            Some(_) => Outcome::Fail,
            None => Outcome::Unknown,
        };
        out.push(TestResult {
            suite: LAVA_SUITE.into(),
            name: def.name.clone(),
            result,
            measurement: None,
            units: None,
            set: None,
            reference: None,
            duration: finished.map(|f| format!("{:.2}", f.2 as f64 / 1000.0)),
            repository: git(&def.repository),
            path: git(&def.path),
            revision: git(if def.revision.is_empty() {
                "unspecified"
            } else {
                &def.revision
            }),
            commit_id: git(&def.commit),
            message: None,
        });
    }
    out
}

/// The failure of a run the board aborted (`lava-test-raise`; deps the
/// image cannot install are the job's input), from its first `aborted`
/// record; the results before it are kept.
pub fn aborted(records: &[Record]) -> Option<crate::outcome::Failure> {
    use crate::outcome::{Failure, Kind};
    records.iter().find_map(|r| match &r.body {
        Body::Aborted {
            definition,
            class,
            message,
        } => Some(if class == "job-error" {
            Failure::job(message.clone())
        } else {
            Failure::new(
                Kind::Raised,
                format!("lava-test-raise in definition {definition}: {message}"),
            )
        }),
        _ => None,
    })
}

/// One entry of `results.yaml`, as LAVA's server exports a test case
/// (`lava_results_app.utils.export_testcase`): strings throughout,
/// `measurement` `"None"` when there is none, the fields a server alone
/// knows (`url`, `id` in its database, log lines) empty or counted here.
#[derive(Debug, Serialize)]
struct LavaCase<'a> {
    name: &'a str,
    job: &'a str,
    suite: &'a str,
    result: &'a str,
    measurement: String,
    unit: &'a str,
    level: &'a str,
    url: &'a str,
    id: String,
    logged: &'a str,
    log_start_line: &'a str,
    log_end_line: &'a str,
    metadata: serde_json::Value,
}

/// `results.yaml`: every result in LAVA's export shape; `metadata` holds
/// what LAVA's dispatcher logged for it (`definition`, `case`, `result`,
/// `measurement`, `units`, `set`, `reference`; for a definition's own
/// `lava` row `duration`, `repository`, `path`, `revision`, `commit_id`).
pub fn results_yaml(job: &str, results: &[TestResult]) -> String {
    let cases: Vec<LavaCase> = results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut meta = serde_json::Map::new();
            meta.insert("definition".into(), r.suite.clone().into());
            meta.insert("case".into(), r.name.clone().into());
            meta.insert("result".into(), r.result.as_str().into());
            let mut put = |k: &str, v: &Option<String>| {
                if let Some(v) = v {
                    meta.insert(k.into(), v.clone().into());
                }
            };
            put("units", &r.units);
            put("set", &r.set);
            put("reference", &r.reference);
            put("duration", &r.duration);
            if r.suite == LAVA_SUITE {
                // LAVA's lava rows always carry these three.
                let or = |v: &Option<String>, d: &str| Some(v.clone().unwrap_or_else(|| d.into()));
                put("repository", &or(&r.repository, ""));
                put("path", &or(&r.path, ""));
                put("revision", &or(&r.revision, "unspecified"));
            }
            put("commit_id", &r.commit_id);
            if let Some(m) = r.measurement {
                meta.insert("measurement".into(), m.into());
            }
            LavaCase {
                name: &r.name,
                job,
                suite: &r.suite,
                result: r.result.as_str(),
                measurement: r.measurement.map_or("None".into(), |m| m.to_string()),
                unit: r.units.as_deref().unwrap_or(""),
                level: "",
                url: "",
                id: (i + 1).to_string(),
                logged: "",
                log_start_line: "",
                log_end_line: "",
                metadata: meta.into(),
            }
        })
        .collect();
    serde_norway::to_string(&cases).unwrap_or_default()
}

/// Counts by result.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Passed.
    pub pass: usize,
    /// Failed.
    pub fail: usize,
    /// Skipped.
    pub skip: usize,
    /// Unknown.
    pub unknown: usize,
}

impl Counts {
    /// Counts `results`.
    pub fn of<'a>(results: impl IntoIterator<Item = &'a TestResult>) -> Self {
        let mut c = Counts::default();
        for r in results {
            match r.result {
                Outcome::Pass => c.pass += 1,
                Outcome::Fail => c.fail += 1,
                Outcome::Skip => c.skip += 1,
                Outcome::Unknown => c.unknown += 1,
            }
        }
        c
    }
    /// All results.
    pub fn total(&self) -> usize {
        self.pass + self.fail + self.skip + self.unknown
    }
}

fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// JUnit XML: one `<testsuite>` per suite; fail is a failure, unknown an error.
pub fn junit(job: &str, results: &[TestResult]) -> String {
    let mut suites: Vec<&str> = Vec::new();
    for r in results {
        if !suites.contains(&r.suite.as_str()) {
            suites.push(&r.suite);
        }
    }
    let all = Counts::of(results);
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\">",
        esc(job),
        all.total(),
        all.fail,
        all.unknown,
        all.skip
    );
    for suite in suites {
        let cases: Vec<_> = results.iter().filter(|r| r.suite == suite).collect();
        let c = Counts::of(cases.iter().copied());
        let _ = writeln!(
            x,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\">",
            esc(suite),
            c.total(),
            c.fail,
            c.unknown,
            c.skip
        );
        for r in cases {
            let name = match &r.set {
                Some(set) => format!("{set}/{}", r.name),
                None => r.name.clone(),
            };
            let _ = write!(
                x,
                "    <testcase classname=\"{}\" name=\"{}\"",
                esc(suite),
                esc(&name)
            );
            let body = match r.result {
                Outcome::Pass => None,
                Outcome::Fail => Some("<failure message=\"fail\"/>"),
                Outcome::Skip => Some("<skipped/>"),
                Outcome::Unknown => Some("<error message=\"result unknown\"/>"),
            };
            let props = match (&r.measurement, &r.units) {
                (Some(m), u) => format!(
                    "<properties><property name=\"measurement\" value=\"{m}\"/><property name=\"units\" value=\"{}\"/></properties>",
                    esc(u.as_deref().unwrap_or(""))
                ),
                _ => String::new(),
            };
            match (body, props.is_empty()) {
                (None, true) => x.push_str("/>\n"),
                (b, _) => {
                    let _ = writeln!(x, ">{props}{}</testcase>", b.unwrap_or(""));
                }
            }
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::plan::v1::Definition;

    fn rec(body: Body) -> Record {
        Record {
            ts_us: 0,
            boot: "b".into(),
            body,
        }
    }

    #[test]
    fn results_and_junit_counts() {
        let plan = TestPlan {
            job: "j".into(),
            definitions: ["a", "b", "c"]
                .iter()
                .map(|n| Definition {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let records = vec![
            rec(Body::Result {
                definition: "a".into(),
                case: "x<1>".into(),
                result: Outcome::Pass,
                measurement: Some(2.0),
                units: Some("s".into()),
                set: None,
                reference: None,
            }),
            rec(Body::Result {
                definition: "a".into(),
                case: "y".into(),
                result: Outcome::Fail,
                measurement: None,
                units: None,
                set: Some("s1".into()),
                reference: None,
            }),
            rec(Body::DefinitionFinished {
                definition: "a".into(),
                exit_code: Some(0),
                timed_out: false,
                duration_ms: 1,
            }),
            rec(Body::DefinitionFinished {
                definition: "b".into(),
                exit_code: None,
                timed_out: true,
                duration_ms: 1,
            }),
        ];
        let r = results(&plan, &records, true);
        let lava: Vec<_> = r
            .iter()
            .filter(|r| r.suite == LAVA_SUITE)
            .map(|r| (r.name.as_str(), r.result))
            .collect();
        assert_eq!(
            lava,
            vec![
                ("a", Outcome::Pass),
                ("b", Outcome::Fail),
                ("c", Outcome::Unknown)
            ]
        );
        let x = junit("j", &r);
        assert!(
            x.contains(
                "<testsuites name=\"j\" tests=\"5\" failures=\"2\" errors=\"1\" skipped=\"0\">"
            ),
            "{x}"
        );
        assert!(x.contains("name=\"x&lt;1&gt;\""), "{x}");
        assert!(x.contains("name=\"s1/y\"><failure"), "{x}");
    }
}
