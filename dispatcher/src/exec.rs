//! `dispatcher exec --device D -- CMD ARGS...`: one command on a board's
//! master image, for lab engineers. The board is used as found when its
//! master agent is announcing itself (booted, nobody answered yet);
//! otherwise it is powered on into its master image. The command's output
//! is printed live and its status becomes the exit code. The board is
//! powered off afterwards unless `--keep-on`.
//!
//! Exit codes (a command's own status passes through unchanged, so a
//! command that itself exits 124-127 looks the same: stderr says which):
//!
//! | exit | meaning |
//! | --- | --- |
//! | 0-123 | the command's exit status |
//! | 124 | the command ran past `--timeout`; its process group was killed |
//! | 125 | Ferry failed: device file, device busy, power, console, agent, network |
//! | 126 | the command could not be run (not executable) |
//! | 127 | the command was not found |
//! | 128+N | the command was killed by signal N |
//! | 130, 143 | `dispatcher exec` itself got SIGINT or SIGTERM |

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::console::{Announcement, Role};
use ferry_proto::master::v1 as pb;
use tokio::sync::mpsc;
use tonic::Code;

use crate::client::Session;
use crate::console::{Console, Signal};
use crate::device::Device;
use crate::events::EventLog;
use crate::lock::DeviceLock;
use crate::outcome::Failure;
use crate::{board, power};

/// The command ran past its timeout.
pub const TIMED_OUT: u8 = 124;
/// Ferry itself failed (device file, lock, power, console, agent, network).
pub const FERRY_FAILED: u8 = 125;
/// The command could not be run.
pub const NOT_RUNNABLE: u8 = 126;
/// The command was not found.
pub const NOT_FOUND: u8 = 127;

/// What `dispatcher exec` was asked.
#[derive(Debug, Clone)]
pub struct Request {
    /// The device file.
    pub device: PathBuf,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Variables for the command.
    pub env: Vec<(String, String)>,
    /// Working folder on the board.
    pub cwd: Option<String>,
    /// The command's timeout.
    pub timeout: Duration,
    /// How long to listen for an agent already announcing itself before
    /// powering the board on.
    pub probe: Duration,
    /// Leave the board powered on afterwards.
    pub keep_on: bool,
    /// Where console.log and events.jsonl go (a temporary folder otherwise).
    pub logs: Option<PathBuf>,
}

/// Why `dispatcher exec` ended without the command's status.
enum Ended {
    Ferry(Failure),
    Command(u8, String),
    Signal(&'static str, u8),
}

/// Waits until `deadline` for a master announcement at the pinned address.
async fn announcement(
    console: &mut Console,
    events: &EventLog,
    pinned: &mut Option<SocketAddr>,
    deadline: tokio::time::Instant,
) -> Option<Announcement> {
    loop {
        match console.next_signal(deadline, events).await {
            Signal::Announce(a) if a.role == Role::Master && board::pins(pinned, &a, events) => {
                return Some(a)
            }
            Signal::Announce(_) | Signal::Panic(_) => {}
            Signal::Closed(_) | Signal::Timeout => return None,
        }
    }
}

/// Reaches the board's master agent: as found when it is announcing within
/// the probe, else after powering it on.
async fn reach(
    req: &Request,
    device: &Device,
    events: &Arc<EventLog>,
) -> Result<(Console, Session), Failure> {
    let mut pinned = device.network.address;
    if let Ok(mut console) = Console::open(&device.console, req.probe, events.clone()).await {
        let deadline = tokio::time::Instant::now() + req.probe;
        if let Some(a) = announcement(&mut console, events, &mut pinned, deadline).await {
            events.say(
                "dispatcher",
                format!("master boot {} already up: using it", a.boot),
            );
            let session = board::authenticate(device, events, &mut console, &a).await?;
            return Ok((console, session));
        }
    }
    events.say(
        "dispatcher",
        "no master agent announcing itself: powering the board on",
    );
    power::start(device, events).await?;
    let mut console =
        Console::open(&device.console, device.timeouts.console, events.clone()).await?;
    let deadline = tokio::time::Instant::now() + device.timeouts.announce;
    let a = announcement(&mut console, events, &mut pinned, deadline)
        .await
        .ok_or_else(|| {
            Failure::new(
                crate::outcome::Kind::NoMaster,
                format!(
                    "the master agent did not announce itself within {:?}",
                    device.timeouts.announce
                ),
            )
        })?;
    let session = board::authenticate(device, events, &mut console, &a).await?;
    Ok((console, session))
}

/// Our own stdin, read on a plain thread (it may never end, and must not
/// hold the runtime up at exit), as chunks for the command.
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        loop {
            let mut buf = vec![0u8; 32 * 1024];
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(buf).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Prints output as it comes; a closed stdout (a pipe into `head`) is not
/// an error.
fn print(msg: pb::exec_reply::Msg) {
    match msg {
        pb::exec_reply::Msg::Stdout(b) => {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(&b).and_then(|()| o.flush());
        }
        pb::exec_reply::Msg::Stderr(b) => {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(&b).and_then(|()| e.flush());
        }
        pb::exec_reply::Msg::Exit(_) => {}
    }
}

/// Runs the command once the board is reached.
async fn run_command(req: &Request, device: &Device, events: &Arc<EventLog>) -> Result<u8, Ended> {
    let (_console, mut session) = reach(req, device, events).await.map_err(Ended::Ferry)?;
    let start = pb::ExecStart {
        argv: req.argv.clone(),
        env: req.env.iter().cloned().collect(),
        cwd: req.cwd.clone().unwrap_or_default(),
        timeout_ms: u64::try_from(req.timeout.as_millis()).unwrap_or(u64::MAX),
    };
    events.event("dispatcher", serde_json::json!({ "kind": "exec", "argv": req.argv, "timeout": format!("{:?}", req.timeout) }));
    match session.exec(start, stdin_chunks(), print).await {
        Ok(pb::exec_exit::Status::Code(c)) => Ok(u8::try_from(c).unwrap_or(FERRY_FAILED)),
        Ok(pb::exec_exit::Status::Signal(s)) => {
            eprintln!("dispatcher exec: {} was killed by signal {s}", req.argv[0]);
            Ok(u8::try_from(128 + s).unwrap_or(FERRY_FAILED))
        }
        Err(s) => Err(match s.code() {
            Code::DeadlineExceeded => Ended::Command(TIMED_OUT, s.message().into()),
            Code::NotFound => Ended::Command(NOT_FOUND, s.message().into()),
            Code::PermissionDenied => Ended::Command(NOT_RUNNABLE, s.message().into()),
            _ => Ended::Ferry(crate::client::failure("Exec", &s)),
        }),
    }
}

/// Runs `req`; returns the exit code (see the module's table).
pub async fn exec(req: Request) -> u8 {
    let fail = |what: &str| {
        eprintln!("dispatcher exec: {what}");
        FERRY_FAILED
    };
    let device = match Device::load(&req.device) {
        Ok(d) => d,
        Err(f) => return fail(&f.message),
    };
    let tmp;
    let logs = match &req.logs {
        Some(dir) => dir.clone(),
        None => match tempfile::tempdir() {
            Ok(t) => {
                tmp = t;
                tmp.path().to_path_buf()
            }
            Err(e) => return fail(&format!("temporary folder: {e}")),
        },
    };
    if let Err(e) = std::fs::create_dir_all(&logs) {
        return fail(&format!("{}: {e}", logs.display()));
    }
    let events = match EventLog::create(&logs) {
        Ok(e) => Arc::new(e),
        Err(e) => return fail(&format!("{}: {e}", logs.display())),
    };
    // Never touch a board a job is using.
    let lock = match DeviceLock::acquire(&device.name, "exec", &logs, Duration::ZERO).await {
        Ok((lock, _)) => lock,
        Err(e) => return fail(&e.to_string()),
    };
    let ended = tokio::select! {
        r = run_command(&req, &device, &events) => r,
        sig = crate::run::cancelled() => Err(Ended::Signal(sig, if sig == "SIGINT" { 130 } else { 143 })),
    };
    let mut code = match ended {
        Ok(code) => code,
        Err(Ended::Command(code, why)) => {
            eprintln!("dispatcher exec: {why}");
            code
        }
        Err(Ended::Ferry(f)) => fail(&f.message),
        Err(Ended::Signal(sig, code)) => {
            eprintln!("dispatcher exec: canceled by {sig}");
            code
        }
    };
    if !req.keep_on {
        if let Err(f) = power::off(&device, &events).await {
            code = fail(&format!("powering the board off: {}", f.message));
        }
    }
    events.flush();
    drop(lock);
    code
}
