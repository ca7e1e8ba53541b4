//! Runs the real `test-agent` binary on a folder rootfs: bundle, helpers,
//! set -e semantics, timeouts, records.

use std::path::Path;
use std::process::Command;

use ferry_proto::plan::v1::{Definition, Param, TestPlan};
use ferry_proto::record::{Body, Item, Outcome, Reader, Record, Stream, PLAN_FILE, RECORDS_DIR};
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
        ..Default::default()
    }
}

fn plan(job: &str, definitions: Vec<Definition>) -> TestPlan {
    TestPlan {
        job: job.into(),
        definitions,
        ..Default::default()
    }
}

/// Every record of every records file under `root`, files in name order;
/// panics on any gap (the agent never leaves one of its own making).
fn records_of(root: &Path) -> Vec<Record> {
    let mut names: Vec<_> = std::fs::read_dir(root.join(RECORDS_DIR))
        .expect("records dir")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    let mut records = Vec::new();
    for path in names {
        let f = std::io::BufReader::new(std::fs::File::open(&path).expect("open"));
        let (reader, gap) = Reader::new(f).expect("header");
        assert_eq!(gap, None, "{}", path.display());
        for item in reader {
            match item.expect("read") {
                Item::Record(r) => records.push(r),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }
    records
}

/// The output `definition` printed on `stream`, concatenated.
fn output(records: &[Record], definition: &str, stream: Stream) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        if let Body::Output {
            definition: d,
            stream: s,
            data,
        } = &r.body
        {
            if d == definition && *s == stream {
                out.extend_from_slice(data);
            }
        }
    }
    out
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
    (console, records_of(root))
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
    let plan = plan(
        "t",
        vec![
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
    );
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
    let first = String::from_utf8(output(&records, "first", Stream::Stdout)).expect("utf8");
    assert!(first.starts_with("hello world\n"), "{first}");
    assert_eq!(output(&records, "second", Stream::Stderr), b"err\n");
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
    let plan = plan(
        "t",
        vec![
            def(
                "hangs",
                &["lava-test-case before --result pass", "sleep 600"],
                1,
            ),
            def("next", &["lava-test-case next --result pass"], 0),
        ],
    );
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
    let records = records_of(dir.path());
    assert!(
        records.iter().any(|r| matches!(&r.body,
            Body::AgentMessage { level, message } if level == "error" && message.contains("cannot read the plan"))),
        "{records:?}"
    );
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

#[test]
fn floods_of_two_byte_lines_and_binary_output_round_trip_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 3 MiB of "y\n" on stdout, and every byte value (invalid UTF-8, NULs,
    // no final newline) on stderr, interleaved with a result.
    let plan = plan(
        "t",
        vec![def(
            "flood",
            &[
                "yes | head -c 3145728",
                "i=0; while [ $i -lt 256 ]; do printf \"\\\\$(printf %o $i)\"; i=$((i+1)); done >&2",
                "lava-test-case flooded --result pass",
                "printf 'no newline at the end'",
            ],
            0,
        )],
    );
    install(dir.path(), &plan);
    let (_, records) = run(dir.path());
    let mut expected = b"y\n".repeat(3 << 19);
    expected.extend_from_slice(b"<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=flooded RESULT=pass>\n");
    expected.extend_from_slice(b"no newline at the end");
    let stdout = output(&records, "flood", Stream::Stdout);
    assert_eq!(stdout.len(), expected.len());
    assert!(stdout == expected, "stdout differs");
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(output(&records, "flood", Stream::Stderr), all);
    assert_eq!(results(&records).len(), 1);
    // Compact: 3 MiB of 2-byte lines costs little more than 3 MiB.
    let stored: u64 = std::fs::read_dir(dir.path().join(RECORDS_DIR))
        .expect("dir")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum();
    assert!(
        stored < expected.len() as u64 * 11 / 10,
        "{stored} bytes stored for {} of output",
        expected.len()
    );
}

#[test]
fn output_over_its_quota_is_counted_and_later_results_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = plan(
        "t",
        vec![
            def(
                "noisy",
                &[
                    "yes | head -c 100000",
                    "lava-test-case after-flood --result pass",
                ],
                0,
            ),
            def(
                "quiet",
                &["echo hi", "lava-test-case later --result pass"],
                0,
            ),
        ],
    );
    p.definition_output_quota = 10_000;
    install(dir.path(), &p);
    let (_, records) = run(dir.path());
    assert_eq!(output(&records, "noisy", Stream::Stdout).len(), 10_000);
    assert_eq!(
        output(&records, "quiet", Stream::Stdout),
        b"hi\n<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=later RESULT=pass>\n"
    );
    let names: Vec<_> = results(&records).into_iter().map(|r| r.1).collect();
    assert_eq!(names, vec!["after-flood", "later"]);
    assert!(
        records.iter().any(|r| r.body
            == Body::OutputDropped {
                definition: "noisy".into(),
                reason: ferry_proto::record::DropReason::DefinitionQuota,
                // the flood's rest, and the helper's signal line after it
                bytes: 90_000
                    + "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=after-flood RESULT=pass>\n".len() as u64
            }),
        "{records:?}"
    );
}

#[test]
fn a_full_disk_drops_output_but_loses_no_result() {
    // The rootfs is a 4 MiB tmpfs in a mount namespace of the test's own
    // (as root, or as a user through a user namespace); the agent's binary
    // stays outside, its helpers are links to it.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let root = dir.path().join("root");
    let kept = dir.path().join("kept");
    std::fs::create_dir_all(src.join("ferry/bin")).expect("mkdir");
    std::fs::create_dir_all(&root).expect("mkdir");
    for helper in ["lava-test-case", "lava-test-set"] {
        std::os::unix::fs::symlink(BIN, src.join("ferry/bin").join(helper)).expect("link");
    }
    let p = plan(
        "t",
        vec![
            def(
                "fills",
                &[
                    "lava-test-case before --result pass",
                    "yes | head -c 8000000",
                    "lava-test-case after-full --result pass",
                ],
                0,
            ),
            def(
                "later",
                &["echo more", "lava-test-case later --result pass"],
                0,
            ),
        ],
    );
    std::fs::write(src.join(PLAN_FILE), p.encode_to_vec()).expect("plan");
    let script = format!(
        "set -e; mount -t tmpfs -o size=4m ferry-full \"$ROOT\"; cp -a \"$SRC\"/. \"$ROOT\"; \
         {BIN} run --reboot exit --boot-id b --root \"$ROOT\" >/dev/null; \
         df -k \"$ROOT\"; cp -a \"$ROOT\"/ferry/records \"$KEPT\""
    );
    let root_user =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("proc")) == 0;
    let out = Command::new("unshare")
        .args(if root_user {
            &["--mount"][..]
        } else {
            &["--user", "--map-root-user", "--mount"][..]
        })
        .args(["sh", "-c", &script])
        .env("ROOT", &root)
        .env("SRC", &src)
        .env("KEPT", &kept)
        .output()
        .expect("unshare");
    assert!(out.status.success(), "{out:?}");
    let df = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<_> = std::fs::read_dir(&kept)
        .expect("records")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    let mut records = Vec::new();
    for path in names {
        let (reader, _) = Reader::new(std::fs::File::open(path).expect("open")).expect("header");
        for item in reader {
            if let Item::Record(r) = item.expect("item") {
                records.push(r);
            }
        }
    }
    let names: Vec<_> = results(&records).into_iter().map(|r| r.1).collect();
    assert_eq!(names, vec!["before", "after-full", "later"], "{df}");
    let dropped: u64 = records
        .iter()
        .filter_map(|r| match &r.body {
            Body::OutputDropped {
                reason: ferry_proto::record::DropReason::DiskFull,
                bytes,
                ..
            } => Some(*bytes),
            _ => None,
        })
        .sum();
    let kept_bytes = output(&records, "fills", Stream::Stdout).len() as u64;
    assert!(dropped > 0, "the disk filled up: {df}");
    assert!(
        kept_bytes + dropped >= 8_000_000,
        "every byte kept or counted: {kept_bytes} + {dropped}"
    );
    let finished = records
        .iter()
        .filter(|r| matches!(r.body, Body::DefinitionFinished { .. }))
        .count();
    assert_eq!(finished, 2);
    assert!(matches!(
        records.last().map(|r| &r.body),
        Some(Body::AgentFinished {})
    ));
}

#[test]
fn background_processes_left_by_definitions_are_killed_at_the_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = plan(
        "t",
        vec![def(
            "leaves",
            &["sleep 1000 >/dev/null 2>&1 & echo $! > \"$FERRY_RUN_DIR/pid\""],
            0,
        )],
    );
    install(dir.path(), &p);
    run(dir.path());
    let pid = std::fs::read_to_string(dir.path().join("ferry/run/0_leaves/pid")).expect("pid");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    // Gone, or a zombie waiting for its new parent to reap it.
    let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
    assert!(
        stat.is_empty() || state == Some('Z'),
        "the leftover sleep still runs: {stat}"
    );
}
