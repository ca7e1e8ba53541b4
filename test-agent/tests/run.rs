//! Runs the real `test-agent` binary on a folder rootfs: bundle, helpers,
//! set -e semantics, timeouts, records.

use std::path::Path;
use std::process::Command;

use ferry_proto::plan::v1::{Definition, Param, TestPlan};
use ferry_proto::record::{Body, Outcome, Record, PLAN_FILE, RECORDS_DIR, RECORDS_FILE};
use prost::Message;

const BIN: &str = env!("CARGO_BIN_EXE_test-agent");

fn install(root: &Path, plan: &TestPlan) {
    let bundle = root.join("bundle.tar.gz");
    let out = Command::new(BIN)
        .arg("bundle")
        .arg("--output")
        .arg(&bundle)
        .output()
        .expect("bundle");
    assert!(out.status.success(), "{out:?}");
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(&bundle).expect("open"));
    tar::Archive::new(gz).unpack(root).expect("unpack");
    std::fs::write(root.join(PLAN_FILE), plan.encode_to_vec()).expect("plan");
}

fn def(name: &str, steps: &[&str], timeout: u64) -> Definition {
    Definition {
        name: name.into(),
        steps: steps.iter().map(|s| s.to_string()).collect(),
        params: vec![Param {
            name: "GREETING".into(),
            value: "hello world".into(),
        }],
        timeout_seconds: timeout,
        origin: "inline".into(),
    }
}

fn run(root: &Path) -> (String, Vec<Record>) {
    let out = Command::new(BIN)
        .args(["run", "--reboot", "exit", "--boot-id", "boot-1", "--root"])
        .arg(root)
        .env_remove("FERRY_RECORDS")
        .output()
        .expect("run");
    let console = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(root.join(RECORDS_DIR).join(RECORDS_FILE)).expect("records");
    let (records, errors) = Record::parse_all(&text);
    assert!(errors.is_empty(), "{errors:?}");
    (console, records)
}

/// (definition, case, result, measurement, set)
type Row = (String, String, Outcome, Option<f64>, Option<String>);

fn results(records: &[Record]) -> Vec<Row> {
    records
        .iter()
        .filter_map(|r| match &r.body {
            Body::Result {
                definition,
                case,
                result,
                measurement,
                set,
                ..
            } => Some((
                definition.clone(),
                case.clone(),
                *result,
                *measurement,
                set.clone(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn runs_definitions_with_helpers_and_set_e() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = TestPlan {
        job: "t".into(),
        definitions: vec![
            def(
                "first",
                &[
                    "echo \"$GREETING\"",
                    "lava-test-case ok --result pass",
                    "lava-test-set start group",
                    "lava-test-case speed --result pass --measurement 3.5 --units MB/s",
                    "lava-test-set stop",
                    "lava-test-case shell-false --shell false",
                    "false",
                    "lava-test-case never --result pass",
                ],
                0,
            ),
            def(
                "second",
                &["echo err >&2", "lava-test-case after --result skip"],
                0,
            ),
        ],
    };
    install(dir.path(), &plan);
    let (console, records) = run(dir.path());
    assert_eq!(
        results(&records),
        vec![
            ("first".into(), "ok".into(), Outcome::Pass, None, None),
            (
                "first".into(),
                "speed".into(),
                Outcome::Pass,
                Some(3.5),
                Some("group".into())
            ),
            (
                "first".into(),
                "shell-false".into(),
                Outcome::Fail,
                None,
                None
            ),
            ("second".into(), "after".into(), Outcome::Skip, None, None),
        ]
    );
    let finished: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.body {
            Body::DefinitionFinished {
                definition,
                exit_code,
                timed_out,
                ..
            } => Some((definition.clone(), *exit_code, *timed_out)),
            _ => None,
        })
        .collect();
    assert_eq!(
        finished,
        vec![
            ("first".into(), Some(1), false),
            ("second".into(), Some(0), false)
        ]
    );
    assert!(records.iter().any(|r| matches!(&r.body,
        Body::Output { line, .. } if line == "hello world")));
    assert!(records.iter().any(|r| matches!(&r.body,
        Body::Output { line, stream: ferry_proto::record::Stream::Stderr, .. } if line == "err")));
    assert!(matches!(
        records.last().map(|r| &r.body),
        Some(Body::AgentFinished {})
    ));
    assert!(records.iter().all(|r| r.boot == "boot-1"));
    assert!(console.contains("FERRY-AGENT role=test"), "{console}");
    assert!(
        console.contains("<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=ok RESULT=pass>"),
        "{console}"
    );
}

#[test]
fn a_definition_timeout_kills_it_and_the_next_one_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = TestPlan {
        job: "t".into(),
        definitions: vec![
            def(
                "hangs",
                &["lava-test-case before --result pass", "sleep 600"],
                1,
            ),
            def("next", &["lava-test-case next --result pass"], 0),
        ],
    };
    install(dir.path(), &plan);
    let (_, records) = run(dir.path());
    let names: Vec<_> = results(&records).into_iter().map(|r| r.1).collect();
    assert_eq!(names, vec!["before", "next"]);
    assert!(records.iter().any(|r| matches!(&r.body,
        Body::DefinitionFinished { definition, timed_out: true, exit_code: None, .. } if definition == "hangs")));
}

#[test]
fn a_missing_plan_is_recorded_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["run", "--reboot", "exit", "--boot-id", "b", "--root"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let text =
        std::fs::read_to_string(dir.path().join(RECORDS_DIR).join(RECORDS_FILE)).expect("records");
    assert!(text.contains("cannot read the plan"), "{text}");
}

#[test]
fn helpers_refuse_to_run_outside_a_definition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("lava-test-case");
    std::os::unix::fs::symlink(BIN, &link).expect("symlink");
    let out = Command::new(&link)
        .args(["x", "--result", "pass"])
        .env_remove("FERRY_RECORDS")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FERRY_RECORDS is not set"));
}
