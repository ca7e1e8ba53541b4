//! Faults of the lab and of the test image on the simulated board: each ends
//! in its outcome class with the board off, nothing left running, and every
//! result recorded before the fault returned.

use std::path::Path;
use std::process::Command;

use ferry_tests::{bin, processes_mentioning, r, Row, SimBoard};

const JOB: &str = r#"job: faults
timeouts: {job: 2m, test: 6s}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: work}
        run:
          steps:
            - lava-test-case recorded --result pass
"#;

fn complete_results() -> Vec<Row> {
    vec![r("work", "recorded", "pass"), r("lava", "work", "pass")]
}

/// A board whose device file's power commands are edited by `edit`
/// (`ON`, `OFF` and `RESET` stand for the simulated board's own).
fn board_with_power(on: &str, off: &str, timeout: &str) -> SimBoard {
    SimBoard::with_device(|text| {
        let cmd = |action: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{action}: ")))
                .expect("example power command")
                .to_string()
        };
        let (real_on, real_off) = (cmd("on"), cmd("off"));
        text.replace(
            &format!("on: {real_on}"),
            &format!("on: {}", on.replace("ON", &real_on)),
        )
        .replace(
            &format!("off: {real_off}"),
            &format!("off: {}", off.replace("OFF", &real_off)),
        )
        .replace("power: 60s", &format!("power: {timeout}"))
    })
}

/// Nothing of the board, nor the marker a fault's process carries, is left.
fn assert_nothing_left(board: &SimBoard, marker: &str) {
    assert!(!board.powered(), "board left powered");
    let left = processes_mentioning(Path::new(marker));
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[test]
fn a_power_on_command_that_fails_is_an_infrastructure_error() {
    let board = board_with_power("exit 7", "OFF", "20s");
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("infrastructure-error");
    assert!(msg.contains("power on") && msg.contains('7'), "{msg}");
    assert_nothing_left(&board, "exit 7");
}

#[test]
fn a_power_on_command_that_hangs_is_killed_at_the_power_timeout() {
    let board = board_with_power("sleep 601", "OFF", "2s");
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("infrastructure-error");
    assert!(msg.contains("timed out"), "{msg}");
    assert_nothing_left(&board, "sleep 601");
}

#[test]
fn a_power_off_that_fails_keeps_every_result_but_is_an_infrastructure_error() {
    let board = board_with_power("ON", "OFF; exit 3", "20s");
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("infrastructure-error");
    assert!(msg.contains("results complete"), "{msg}");
    assert_eq!(run.results(), complete_results(), "{}", run.dump());
    assert!(!board.powered());
}

/// Prepares the board's folder and adds an init script to its test image.
fn with_test_init_script(board: &SimBoard, name: &str, body: &str) {
    let out = Command::new(bin("ferry-sim-board"))
        .arg("--board")
        .arg(&board.board)
        .arg("prepare")
        .output()
        .expect("prepare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = board.board.join("parts/testrootfs/etc/init.d").join(name);
    std::fs::write(&script, body).expect("script");
}

#[test]
fn a_test_image_that_never_boots_is_a_test_error_after_the_test_timeout() {
    let board = SimBoard::new();
    // Its init hangs before the test agent's turn: the image never comes up.
    with_test_init_script(&board, "S00hang", "sleep 602\n");
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("test-error");
    assert!(
        msg.contains("did not return within the test timeout"),
        "{msg}"
    );
    assert_eq!(
        run.results(),
        vec![r("lava", "work", "unknown")],
        "{}",
        run.dump()
    );
    assert_eq!(run.boot_roles(), ["master", "master"], "{}", run.dump());
    assert_nothing_left(&board, "sleep 602");
}

#[test]
fn a_board_that_returns_without_its_records_is_a_test_error() {
    let board = SimBoard::new();
    // After the test agent ran, something in the test image wipes the records.
    with_test_init_script(
        &board,
        "S99zz-wipe",
        "rm -rf \"$FERRY_ROOT/ferry/records\"\n",
    );
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("test-error");
    assert!(
        msg.contains("never running") || msg.contains("recorded nothing"),
        "{msg}"
    );
    assert_eq!(
        run.results(),
        vec![r("lava", "work", "unknown")],
        "{}",
        run.dump()
    );
    assert!(!board.powered());
}
