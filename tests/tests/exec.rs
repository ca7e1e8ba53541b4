//! `dispatcher exec` on the simulated board: output and status come back,
//! a command past its timeout is killed with its whole process group, a
//! board already announcing itself is used as found.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ferry_tests::{bin, SimBoard};

fn exec(board: &SimBoard, args: &[&str], command: &[&str]) -> Output {
    Command::new(bin("dispatcher"))
        .arg("exec")
        .arg("--device")
        .arg(&board.device)
        .args(args)
        .arg("--")
        .args(command)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("dispatcher exec runs")
}

fn dump(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The `power` actions the dispatcher took, from an events.jsonl.
fn power_actions(events: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["source"] == "power" && e["command"].is_string())
        .filter_map(|e| e["action"].as_str().map(String::from))
        .collect()
}

#[test]
fn exec_returns_the_commands_output_and_status_and_powers_off() {
    let board = SimBoard::new();
    let logs = board.tmp.path().join("logs");
    let o = exec(
        &board,
        &[
            "--timeout",
            "20s",
            "--env",
            "WHO=lab",
            "--logs",
            logs.to_str().expect("utf8"),
        ],
        &[
            "sh",
            "-c",
            "echo \"hello $WHO\"; uname -s; echo oops >&2; exit 3",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", dump(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello lab\nLinux\n",
        "{}",
        dump(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("oops\n"),
        "{}",
        dump(&o)
    );
    assert!(!board.powered(), "powered off afterwards without --keep-on");
    assert_eq!(
        power_actions(&logs.join("events.jsonl")),
        ["off", "on", "off"]
    );

    let o = exec(&board, &[], &["/nonexistent/ferry-no-such-program"]);
    assert_eq!(o.status.code(), Some(127), "{}", dump(&o));
    let o = exec(&board, &[], &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(o.status.code(), Some(128 + 15), "{}", dump(&o));
}

#[test]
fn a_command_past_its_timeout_is_killed_with_its_process_group() {
    let board = SimBoard::new();
    let pids = board.tmp.path().join("pids");
    let script = format!(
        "sleep 300 & echo $! >> {p}; echo $$ >> {p}; echo started; wait",
        p = pids.display()
    );
    let started = Instant::now();
    // --keep-on: the board stays up, so only the timeout can have killed them.
    let o = exec(
        &board,
        &["--timeout", "2s", "--keep-on"],
        &["sh", "-c", &script],
    );
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(124), "{}", dump(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "started\n",
        "{}",
        dump(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("timeout"),
        "{}",
        dump(&o)
    );
    assert!(board.powered(), "--keep-on left the board on");
    let text = std::fs::read_to_string(&pids).expect("pids written");
    assert_eq!(text.lines().count(), 2, "{text}");
    // The group is killed before the reply; give the reaper a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in text.lines() {
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            if matches!(state, None | Some("Z")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "process {pid} still runs: {stat}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!("timed-out exec ended after {took:?}");
}

#[test]
fn a_board_already_announcing_itself_is_used_as_found() {
    let board = SimBoard::new();
    let on = Command::new(bin("ferry-sim-board"))
        .arg("--board")
        .arg(&board.board)
        .arg("on")
        .output()
        .expect("power on");
    assert!(on.status.success(), "{}", dump(&on));
    let logs = board.tmp.path().join("logs");
    let o = exec(
        &board,
        &["--logs", logs.to_str().expect("utf8")],
        &["echo", "up"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", dump(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "up\n");
    // Only the final power-off: the board was not power-cycled.
    assert_eq!(power_actions(&logs.join("events.jsonl")), ["off"]);
}
