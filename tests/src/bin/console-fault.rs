//! `console-fault TTY [FAULT...]`: a console in the middle, for tests of what
//! the dispatcher believes. Used as a device file's `console: {command: ...}`,
//! it relays a board's tty to stdin/stdout and injects faults a real console
//! shows:
//!
//! - `garble-token`: the first token line the dispatcher writes reaches the
//!   board with one byte changed (line noise);
//! - `drop-test-announcement`: the test agent's announcement never arrives;
//! - `forge-master=ADDR`: when the test agent announces itself, a correctly
//!   sealed master announcement naming ADDR (a fresh boot) appears too, as
//!   anything that writes to the console could print.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use ferry_proto::console::{Announcement, Role, TokenLine};

fn open(path: &str) -> std::io::Result<File> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => {
                let mut t = nix::sys::termios::tcgetattr(f.as_fd())?;
                nix::sys::termios::cfmakeraw(&mut t);
                nix::sys::termios::tcsetattr(f.as_fd(), nix::sys::termios::SetArg::TCSANOW, &t)?;
                return Ok(f);
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!(
            "usage: console-fault TTY [garble-token] [drop-test-announcement] [forge-master=ADDR]"
        );
        std::process::exit(2);
    };
    let faults: Vec<String> = args.collect();
    let has = |f: &str| faults.iter().any(|x| x == f);
    let (garble, drop_test) = (has("garble-token"), has("drop-test-announcement"));
    let forge = faults
        .iter()
        .find_map(|f| f.strip_prefix("forge-master="))
        .map(|a| a.parse().expect("forge-master=IP:PORT"));

    let tty = open(&path)?;
    let mut to_board = tty.try_clone()?;
    std::thread::spawn(move || {
        let mut garbled = !garble;
        let mut input = BufReader::new(std::io::stdin());
        let mut line = Vec::new();
        while matches!(input.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            if !garbled && TokenLine::find(&String::from_utf8_lossy(&line)).is_some() {
                garbled = true;
                if let Some(b) = line.iter_mut().rev().find(|b| b.is_ascii_hexdigit()) {
                    *b = if *b == b'0' { b'1' } else { b'0' };
                }
            }
            if to_board.write_all(&line).is_err() {
                return;
            }
            line.clear();
        }
    });

    let mut from_board = BufReader::new(tty);
    let mut out = std::io::stdout();
    let mut line = Vec::new();
    loop {
        line.clear();
        // Whole lines, so a fault lands on line boundaries like real text.
        let mut byte = [0u8; 1];
        loop {
            match from_board.read(&mut byte) {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => line.push(byte[0]),
            }
            if byte[0] == b'\n' {
                break;
            }
        }
        let test_announcement = matches!(
            Announcement::find(&String::from_utf8_lossy(&line)),
            Some(Ok(a)) if a.role == Role::Test
        );
        if !(drop_test && test_announcement) {
            out.write_all(&line)?;
        }
        if let (true, Some(addr)) = (test_announcement, forge) {
            let forged = Announcement {
                role: Role::Master,
                version: "0.0.0-forged".into(),
                boot: "f0f0f0f0-0000-4000-8000-000000000000".into(),
                addr: Some(addr),
                // A forger announces a certificate of its own.
                cert: Some("f0".repeat(32)),
            };
            out.write_all(format!("\r\n{forged}\r\n").as_bytes())?;
        }
        out.flush()?;
    }
}
