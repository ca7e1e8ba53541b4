//! The console decides nothing it cannot prove, on the simulated board:
//! test output that looks like agent or kernel lines steers nothing, a
//! garbled token line is recovered from, a lost test-agent announcement is
//! made good by the records, and a dispatcher bug still ends with the board
//! off and an outcome written.

use std::net::TcpListener;
use std::path::Path;

use ferry_proto::console::{Announcement, Role, TokenLine};
use ferry_tests::{bin, r, Row, SimBoard};

/// A sim board whose console goes through `console-fault` with `faults`.
fn board_with_console_faults(faults: &str) -> SimBoard {
    SimBoard::with_device(|text| {
        let tty = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("tty: "))
            .expect("example device has a tty console")
            .to_string();
        text.replace(
            &format!("tty: {tty}"),
            &format!("command: {} {tty} {faults}", bin("console-fault").display()),
        )
    })
}

/// A job whose first definition records a result, prints everything a
/// hostile or careless test could print, then records another; a second
/// definition records one more.
fn job_printing(board: &SimBoard, lines: &[String]) -> std::path::PathBuf {
    let mut steps = String::from("            - lava-test-case before --result pass\n");
    for l in lines {
        assert!(!l.contains('\''), "shell-quoted below");
        // A JSON string is a YAML double-quoted scalar.
        for step in [format!("echo '{l}'"), format!("echo 'mid-line {l}' >&2")] {
            let yaml = serde_json::to_string(&step).expect("json");
            steps.push_str(&format!("            - {yaml}\n"));
        }
    }
    steps.push_str("            - lava-test-case after --result pass\n");
    board.job(
        "printing.yaml",
        &format!(
            r#"job: printing
timeouts: {{job: 2m, test: 1m}}
# Back in the master image after forged lines: the fetch is part of the test.
records: {{fetch: always}}
test:
  definitions:
    - inline:
        metadata: {{format: Lava-Test Test Definition 1.0, name: printer}}
        run:
          steps:
{steps}    - inline:
        metadata: {{format: Lava-Test Test Definition 1.0, name: later}}
        run:
          steps:
            - lava-test-case still-here --result pass
"#
        ),
    )
}

fn printing_results() -> Vec<Row> {
    vec![
        r("printer", "before", "pass"),
        r("printer", "after", "pass"),
        r("later", "still-here", "pass"),
        r("lava", "printer", "pass"),
        r("lava", "later", "pass"),
    ]
}

/// A listener standing for whatever a forged line names; it must never be
/// dialed.
fn decoy() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let addr = l.local_addr().expect("addr");
    (l, addr)
}

fn assert_never_dialed(l: &TcpListener) {
    assert!(
        l.accept().is_err(),
        "the dispatcher connected to an address only a forged line named"
    );
}

#[test]
fn test_output_that_looks_like_agent_and_kernel_lines_steers_nothing() {
    let board = SimBoard::new();
    let (listener, addr) = decoy();
    let forged = Announcement {
        role: Role::Master,
        version: "9.9.9".into(),
        boot: "0badc0de-0000-4000-8000-000000000000".into(),
        addr: Some(addr),
        cert: Some("ba".repeat(32)),
    };
    let token = TokenLine {
        boot: forged.boot.clone(),
        token: "deadbeef".into(),
    };
    let job = job_printing(
        &board,
        &[
            forged.to_string(),
            token.to_string(),
            "[    5.000000] Kernel panic - not syncing: VFS: Unable to mount root fs".into(),
            "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009".into(),
        ],
    );
    let run = board.run(&job);
    run.expect_outcome("complete");
    assert_eq!(run.results(), printing_results(), "{}", run.dump());
    assert_eq!(
        run.boot_roles(),
        ["master", "test", "master"],
        "{}",
        run.dump()
    );
    assert_never_dialed(&listener);
    // The output is kept exactly in the records, and shown escaped on the console.
    let events = run.text("events.jsonl");
    assert!(
        events.contains("Kernel panic - not syncing: VFS"),
        "records keep the bytes"
    );
    let console = run.text("console.log");
    assert!(
        console.contains("| FERRY\\-AGENT role=master version=9.9.9"),
        "{console}"
    );
    assert!(!board.powered());
}

#[test]
fn a_forged_master_announcement_on_the_console_is_never_dialed() {
    let (listener, addr) = decoy();
    let board = board_with_console_faults(&format!("forge-master={addr}"));
    let job = job_printing(&board, &[]);
    let run = board.run(&job);
    run.expect_outcome("complete");
    assert_eq!(run.results(), printing_results(), "{}", run.dump());
    assert_never_dialed(&listener);
    assert!(
        run.text("events.jsonl").contains("ignored-announcement"),
        "the forged line is reported as ignored\n{}",
        run.dump()
    );
    assert!(!board.powered());
}

#[test]
fn a_garbled_token_line_is_recovered_from() {
    let board = board_with_console_faults("garble-token");
    let job = job_printing(&board, &[]);
    let run = board.run(&job);
    run.expect_outcome("complete");
    assert_eq!(run.results(), printing_results(), "{}", run.dump());
    assert!(
        run.text("console.log")
            .contains("ignoring a garbled token line"),
        "the fault was really injected\n{}",
        run.dump()
    );
}

#[test]
fn a_lost_test_agent_announcement_is_made_good_by_the_records() {
    let board = board_with_console_faults("drop-test-announcement");
    let job = job_printing(&board, &[]);
    let run = board.run(&job);
    run.expect_outcome("complete");
    assert_eq!(run.results(), printing_results(), "{}", run.dump());
    assert_eq!(run.boot_roles(), ["master", "master"], "{}", run.dump());
    assert!(run.text("events.jsonl").contains("its records show it ran"));
}

#[test]
fn a_dispatcher_panic_still_powers_off_and_writes_the_outcome() {
    for phase in ["deploy", "fetching results"] {
        let board = SimBoard::new();
        let job = job_printing(&board, &[]);
        let run = board.run_env(&job, &[("FERRY_DISPATCHER_PANIC_AT", phase)]);
        let message = run.expect_outcome("internal-error");
        assert!(message.contains("injected"), "{message}");
        assert!(!board.powered(), "board left on after a panic in {phase}");
        if phase == "fetching results" {
            // Everything up to the panic is in the log; nothing of the run is lost.
            assert!(Path::new(&run.dir.join("events.jsonl")).exists());
            assert!(run.text("summary.txt").contains("internal-error"));
        }
    }
}
