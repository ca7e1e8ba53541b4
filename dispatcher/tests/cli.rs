//! The `dispatcher` command line: bad input gets a clear message, the
//! documented exit code and an output folder, before any board is touched.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");

fn run(
    device: &std::path::Path,
    job: &std::path::Path,
    out: &std::path::Path,
) -> std::process::Output {
    Command::new(BIN)
        .arg("run")
        .arg("--device")
        .arg(device)
        .arg("--output")
        .arg(out)
        .arg(job)
        .output()
        .expect("runs")
}

#[test]
fn help_documents_the_exit_codes() {
    let out = Command::new(BIN)
        .args(["run", "--help"])
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "0 complete",
        "2 job error",
        "3 infrastructure",
        "4 test error",
        "5 canceled",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn a_missing_device_file_is_a_job_error_with_an_outcome() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("out");
    let o = run(
        &dir.path().join("nope.yaml"),
        &dir.path().join("job.yaml"),
        &out,
    );
    assert_eq!(o.status.code(), Some(2));
    let outcome: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("outcome.json")).expect("outcome"))
            .expect("json");
    assert_eq!(outcome["class"], "job-error");
    assert!(
        outcome["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nope.yaml"),
        "{outcome}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("results.json"))
            .expect("results")
            .trim(),
        "[]"
    );
}

#[test]
fn a_bad_job_never_powers_the_board_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("power.log");
    let device = dir.path().join("dev.yaml");
    std::fs::write(
        &device,
        format!(
            "device: d\npower: {{on: 'echo on >> {l}', off: 'echo off >> {l}'}}\nconsole: {{tcp: '127.0.0.1:9'}}\npartitions: [testrootfs]\n",
            l = log.display()
        ),
    )
    .expect("device");
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "job: j\ntest:\n  definitions:\n    - path: missing.yaml\n",
    )
    .expect("job");
    let o = run(&device, &job, &dir.path().join("out"));
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("missing.yaml"));
    assert_eq!(
        std::fs::read_to_string(&log).expect("power log"),
        "off\n",
        "only powered off"
    );
}
