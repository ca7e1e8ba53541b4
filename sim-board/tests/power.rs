//! The simulated board's power commands: on boots the master agent on a
//! pty console, reset reboots it (new boot id), off leaves nothing running.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_proto::console::Announcement;

const BIN: &str = env!("CARGO_BIN_EXE_ferry-sim-board");

fn power(board: &Path, action: &str) {
    let agents = Path::new(BIN).parent().expect("bin dir");
    let o = Command::new(BIN)
        .arg("--board")
        .arg(board)
        .arg("--agents")
        .arg(agents)
        .arg(action)
        .output()
        .expect("runs");
    assert!(
        o.status.success(),
        "{action}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Reads the console until a master announcement from a boot other than `not`.
fn announcement(console: &mut std::fs::File, not: Option<&str>) -> Announcement {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    let mut buf = [0u8; 1024];
    loop {
        assert!(
            Instant::now() < deadline,
            "no announcement; console said:\n{text}"
        );
        let n = console.read(&mut buf).expect("read console");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        for line in text.lines() {
            if let Some(Ok(a)) = Announcement::find(line) {
                if Some(a.boot.as_str()) != not {
                    return a;
                }
            }
        }
    }
}

#[test]
fn on_reset_off() {
    let dir = tempfile::tempdir().expect("tmp");
    let board = dir.path().join("board");
    // The master agent's binary lives next to this one only in a full build.
    if !Path::new(BIN).with_file_name("master-agent").exists() {
        panic!("build the workspace first: cargo build --workspace --bins");
    }
    power(&board, "on");
    let mut console = std::fs::File::open(board.join("console")).expect("console pty");
    let first = announcement(&mut console, None);
    power(&board, "reset");
    let second = announcement(&mut console, Some(&first.boot));
    assert_ne!(first.boot, second.boot);
    power(&board, "off");
    assert!(!board.join("console").exists());
    assert!(!board.join("control.sock").exists());
    let needle = board.display().to_string();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&needle),
            "still running: {:?}",
            entry.path()
        );
    }
    power(&board, "off"); // idempotent
}
