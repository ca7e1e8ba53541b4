//! Power commands, as a lab PDU client would offer them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::layout::Layout;
use crate::supervisor;

#[derive(Parser)]
#[command(
    name = "ferry-sim-board",
    about = "A simulated board for Ferry, controlled like a PDU"
)]
struct Cli {
    /// The board's folder (created on first power-on).
    #[arg(long)]
    board: PathBuf,
    /// Folder with the master-agent and test-agent binaries (default: next to this program).
    #[arg(long)]
    agents: Option<PathBuf>,
    /// How long a power command may take.
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Cmd,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    // Seconds with an optional "s", the only form the power commands need.
    s.trim_end_matches('s')
        .parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Power on (no-op when on): the board boots.
    On,
    /// Power off (no-op when off).
    Off,
    /// Hard reset; powers on when off.
    Reset,
    /// Run the board in the foreground (what `on` starts).
    Run,
    /// Make the board's folder (partitions, agent config, test-agent
    /// bundle) without powering it: what the first `on` would do, ahead of
    /// time (`dispatcher lab up` does this).
    Prepare,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Absolute, so the board's processes do not depend on the caller's folder.
    let board = match std::fs::create_dir_all(&cli.board).and_then(|()| cli.board.canonicalize()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("ferry-sim-board: board folder {}: {e}", cli.board.display());
            return ExitCode::FAILURE;
        }
    };
    let layout = Layout::new(&board);
    let result = match cli.command {
        Cmd::On => on(&layout, cli.agents, cli.timeout),
        Cmd::Off => off(&layout, cli.timeout),
        Cmd::Reset => reset(&layout, cli.agents, cli.timeout),
        Cmd::Run => supervisor::run(&layout).map_err(Into::into),
        Cmd::Prepare => agents_dir(cli.agents).and_then(|a| layout.ensure(&a).map_err(Into::into)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-sim-board: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn command(layout: &Layout, cmd: &str, timeout: Duration) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(layout.control())?;
    s.set_read_timeout(Some(timeout))?;
    writeln!(s, "{cmd}")?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    Ok(reply.trim().to_string())
}

fn running(layout: &Layout) -> bool {
    UnixStream::connect(layout.control()).is_ok()
}

fn agents_dir(agents: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match agents {
        Some(a) => Ok(a),
        None => Ok(std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()),
    }
}

fn on(layout: &Layout, agents: Option<PathBuf>, timeout: Duration) -> anyhow::Result<()> {
    if running(layout) {
        return Ok(());
    }
    layout.ensure(&agents_dir(agents)?)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.log())?;
    let child = Command::new(std::env::current_exe()?)
        .arg("--board")
        .arg(&layout.dir)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    std::fs::write(layout.pid_file(), format!("{}\n", child.id()))?;
    let deadline = Instant::now() + timeout;
    while !(running(layout) && layout.console().exists()) {
        if Instant::now() > deadline {
            bail!(
                "board did not come up within {timeout:?}; see {}",
                layout.log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether `pid` is a live process. The supervisor is nobody's child once
/// `on` has returned, so after it exits it may linger as a zombie until its
/// new parent reaps it: that counts as gone.
fn running_process(pid: Pid) -> bool {
    // Field 3 of /proc/PID/stat is the state.
    let state = supervisor::stat_field(pid, 3);
    !matches!(state.as_deref(), None | Some("Z") | Some("X"))
}

fn read_pid(path: &Path) -> Option<Pid> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(Pid::from_raw)
}

fn off(layout: &Layout, timeout: Duration) -> anyhow::Result<()> {
    if running(layout) && command(layout, "off", timeout).ok().as_deref() == Some("ok") {
        // The supervisor stopped its OS; wait for it to exit.
        if let Some(pid) = read_pid(&layout.pid_file()) {
            let deadline = Instant::now() + timeout;
            while running_process(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    // Whatever is left (a wedged supervisor) is cut off hard, like a PDU.
    if let Some(pgid) = read_pid(&layout.os_pgid_file()) {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    if let Some(pid) = read_pid(&layout.pid_file()) {
        for member in supervisor::session_members(pid) {
            let _ = kill(member, Signal::SIGKILL);
        }
        let _ = kill(pid, Signal::SIGKILL);
    }
    for f in [
        layout.pid_file(),
        layout.os_pgid_file(),
        layout.console(),
        layout.control(),
    ] {
        let _ = std::fs::remove_file(f);
    }
    Ok(())
}

fn reset(layout: &Layout, agents: Option<PathBuf>, timeout: Duration) -> anyhow::Result<()> {
    if running(layout) {
        let reply = command(layout, "reset", timeout)?;
        if reply != "ok" {
            bail!("reset refused: {reply}");
        }
        return Ok(());
    }
    on(layout, agents, timeout)
}
