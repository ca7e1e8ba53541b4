//! The master agent's side of the console: announce until a dispatcher
//! answers, and pick this boot's token out of whatever else arrives.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::console::{Announcement, TokenLine};
use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};

use crate::auth::{Auth, TokenUse};

/// The writable half of the console, shared by everything that prints.
pub type ConsoleWriter = Arc<Mutex<Box<dyn Write + Send>>>;

/// Opens the console: a tty (no echo, no line editing, so the token is not
/// echoed back) or standard input/output.
///
/// # Errors
/// When the tty cannot be opened.
pub fn open(path: Option<&Path>) -> std::io::Result<(Box<dyn Read + Send>, ConsoleWriter)> {
    let Some(path) = path else {
        return Ok((
            Box::new(std::io::stdin()),
            Arc::new(Mutex::new(Box::new(std::io::stdout()))),
        ));
    };
    let tty = OpenOptions::new().read(true).write(true).open(path)?;
    if let Ok(mut t) = tcgetattr(tty.as_fd()) {
        t.local_flags.remove(
            LocalFlags::ECHO
                | LocalFlags::ECHONL
                | LocalFlags::ICANON
                | LocalFlags::ISIG
                | LocalFlags::IEXTEN,
        );
        tcsetattr(tty.as_fd(), SetArg::TCSANOW, &t).map_err(std::io::Error::from)?;
    }
    let writer = tty.try_clone()?;
    Ok((Box::new(tty), Arc::new(Mutex::new(Box::new(writer)))))
}

/// Writes one line to the console; a console error must not stop the agent.
pub fn say(console: &ConsoleWriter, line: &str) {
    if let Ok(mut w) = console.lock() {
        // A tty's output processing turns the newline into CR LF.
        let _ = w.write_all(format!("{line}\n").as_bytes());
        let _ = w.flush();
    }
}

/// Reads console input on a thread, handing this boot's tokens to `auth`.
pub fn read_tokens(
    reader: Box<dyn Read + Send>,
    boot: String,
    auth: Arc<Auth>,
    console: ConsoleWriter,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return, // console closed: nobody can issue tokens any more
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf);
            match TokenLine::find(&line) {
                Some(Ok(t)) if t.boot == boot => match auth.set_token(t.token) {
                    TokenUse::Accepted => say(
                        &console,
                        &format!("[ferry] master-agent: token accepted for boot {boot}"),
                    ),
                    TokenUse::Repeated => tracing::debug!("the same token again for boot {boot}"),
                    TokenUse::Ignored => {
                        tracing::warn!("ignoring a different token line for boot {boot}");
                        say(
                            &console,
                            &format!("[ferry] master-agent: ignoring a different token for boot {boot}: this boot keeps its first token"),
                        );
                    }
                },
                Some(Ok(t)) => tracing::debug!("ignoring a token for boot {}", t.boot),
                Some(Err(e)) => say(
                    &console,
                    &format!("[ferry] master-agent: ignoring a garbled token line ({e})"),
                ),
                None => {}
            }
        }
    });
}

/// Prints the announcement every `interval` until a dispatcher answers.
pub async fn announce(
    console: ConsoleWriter,
    make: impl Fn() -> Announcement,
    interval: Duration,
    auth: Arc<Auth>,
) {
    while !auth.answered() {
        // A leading newline ends whatever the console was in the middle of:
        // agent lines count only at the start of a console line.
        let line = format!("\n{}", make());
        let c = console.clone();
        let _ = tokio::task::spawn_blocking(move || say(&c, &line)).await;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = auth.wait_answered() => {}
        }
    }
}
