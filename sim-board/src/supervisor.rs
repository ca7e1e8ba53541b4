//! The running board: owns the console pty and boots one OS after another.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use nix::pty::openpty;
use nix::sys::signal::{killpg, Signal};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use nix::unistd::Pid;

use crate::cache::Cache;
use crate::layout::{Layout, LayoutError};

/// Why the board stopped unexpectedly.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The layout is broken.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

fn sys<E: Into<std::io::Error>>(what: &'static str) -> impl FnOnce(E) -> SupervisorError {
    move |e| SupervisorError::Sys {
        what,
        source: e.into(),
    }
}

/// What the main loop waits for.
enum Event {
    /// The OS of boot `n` ended: a reboot.
    Exited(u64),
    /// Hard reset from the power command.
    Reset,
    /// Power off; reply on the stream once done.
    Off(UnixStream),
}

/// Queued console output; dropped when the console is not being read, as
/// bytes on a UART with nobody listening are.
type ConsoleTx = SyncSender<Vec<u8>>;

fn emit(console: &ConsoleTx, text: &str) {
    let _ = console.try_send(text.as_bytes().to_vec());
}

fn pump(mut from: impl Read + Send + 'static, console: ConsoleTx) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                return;
            }
            let _ = console.try_send(buf[..n].to_vec());
        }
    });
}

/// Runs the board until powered off.
///
/// # Errors
/// When the pty or control socket cannot be set up.
pub fn run(layout: &Layout) -> Result<(), SupervisorError> {
    // Its own session: everything the board runs stays in it, so a reset can
    // stop all of it, as cutting power would.
    nix::unistd::setsid().map_err(sys("setsid"))?;
    // And their reaper: a process that leaves the session (setsid) and
    // whose parent exits is re-parented here, not to init, so a reboot
    // still finds and ends it (a board has no process that outlives it).
    nix::sys::prctl::set_child_subreaper(true).map_err(sys("PR_SET_CHILD_SUBREAPER"))?;
    let board = layout.load()?;
    let pty = openpty(None, None).map_err(sys("openpty"))?;
    let mut t = tcgetattr(&pty.slave).map_err(sys("tcgetattr"))?;
    cfmakeraw(&mut t);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &t).map_err(sys("tcsetattr"))?;
    let slave_path = nix::unistd::ttyname(&pty.slave).map_err(sys("ttyname"))?;
    let _ = std::fs::remove_file(layout.console());
    std::os::unix::fs::symlink(&slave_path, layout.console()).map_err(sys("console symlink"))?;

    let master = File::from(pty.master);
    let mut master_out = master.try_clone().map_err(sys("dup pty"))?;
    let (console, console_rx) = sync_channel::<Vec<u8>>(256);
    std::thread::spawn(move || {
        for bytes in console_rx {
            let _ = master_out.write_all(&bytes);
        }
    });
    // What the dispatcher types goes to the running OS's stdin.
    let stdin: Arc<Mutex<Option<ChildStdin>>> = Arc::new(Mutex::new(None));
    let typed = stdin.clone();
    std::thread::spawn(move || {
        let mut master_in = master;
        let mut buf = [0u8; 1024];
        while let Ok(n) = master_in.read(&mut buf) {
            if n == 0 {
                return;
            }
            if let Ok(mut s) = typed.lock() {
                if let Some(s) = s.as_mut() {
                    let _ = s.write_all(&buf[..n]);
                }
            }
        }
    });

    let (events, rx) = channel();
    let _ = std::fs::remove_file(layout.control());
    let listener = UnixListener::bind(layout.control()).map_err(sys("control socket"))?;
    let control = events.clone();
    std::thread::spawn(move || serve_control(listener, control));

    let result = boot_loop(layout, &board.master_agent, &console, &stdin, &events, &rx);
    let _ = std::fs::remove_file(layout.console());
    let _ = std::fs::remove_file(layout.control());
    let _ = std::fs::remove_file(layout.os_pgid_file());
    let _ = std::fs::remove_file(layout.kmsg());
    let _ = std::fs::remove_file(layout.sync_report());
    drop(pty.slave);
    result
}

fn serve_control(listener: UnixListener, events: Sender<Event>) {
    for stream in listener.incoming().flatten() {
        let mut line = String::new();
        let Ok(mut reader) = stream.try_clone().map(BufReader::new) else {
            continue;
        };
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let mut stream = stream;
        let event = match line.trim() {
            "reset" => {
                let _ = stream.write_all(b"ok\n");
                Event::Reset
            }
            "off" => Event::Off(stream),
            other => {
                let _ = writeln!(stream, "unknown command {other:?}");
                continue;
            }
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

fn banner(console: &ConsoleTx, boot: u64) {
    emit(console, "\r\n[    0.000000] Linux version 6.1.0-ferry-sim (simulated board) #1 SMP PREEMPT_DYNAMIC\r\n");
    emit(
        console,
        &format!("[    0.000000] Command line: console=ttyS0,115200 ferry.sim.boot={boot}\r\n"),
    );
    // A real UART often shows noise before the baud rate settles.
    let _ = console.try_send(vec![
        0x00, 0xff, 0xfe, b'~', 0x1b, b'[', b'0', b'm', b'\r', b'\n',
    ]);
    emit(console, "[    0.412345] Run /init as init process\r\n");
}

fn boot_loop(
    layout: &Layout,
    master_agent: &Path,
    console: &ConsoleTx,
    stdin: &Arc<Mutex<Option<ChildStdin>>>,
    events: &Sender<Event>,
    rx: &Receiver<Event>,
) -> Result<(), SupervisorError> {
    let mut boot = 0u64;
    loop {
        boot += 1;
        banner(console, boot);
        let boot_id = uuid::Uuid::new_v4().to_string();
        // Held open (read-write, so neither side ever sees an end) for as
        // long as this boot runs: the boot's kernel log.
        let _ = std::fs::remove_file(layout.kmsg());
        let mut _kmsg = None;
        // The test boot's unsynced writes, lost on a reset or power cut.
        let mut cache = None;
        let mut child = match take_boot_flag(layout) {
            Some(part) => {
                emit(console, &format!("[    0.500000] sim-board: boot-once flag set: booting the test image on {part}\r\n"));
                _kmsg = kernel_log(layout, boot);
                let c = Cache::start(&layout.part(&part));
                let traced = c.available();
                if traced {
                    cache = Some(c);
                } else {
                    emit(console, "[    0.500000] sim-board: strace not found: unsynced writes will survive a reset\r\n");
                }
                test_os(layout, &part, &boot_id, _kmsg.is_some(), traced)
            }
            None => {
                emit(console, "[    0.500000] sim-board: booting the master image\r\n");
                let mut cmd = Command::new(master_agent);
                cmd.arg("--config").arg(layout.agent_config()).arg("--boot-id").arg(&boot_id);
                cmd
            }
        }
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(sys("starting the OS"))?;
        let pgid = Pid::from_raw(child.id() as i32);
        let _ = std::fs::write(layout.os_pgid_file(), format!("{pgid}\n"));
        if let Some(c) = &cache {
            // The test OS stopped itself first thing: trace it from its
            // first instruction on, then let it go.
            if let Err(e) = c.attach(pgid, &layout.sync_report()) {
                emit(console, &format!("[    0.500000] sim-board: cannot trace the test image's syncs ({e}): unsynced writes will survive a reset\r\n"));
                cache = None;
            }
            let _ = nix::sys::signal::kill(pgid, Signal::SIGCONT);
        }
        if let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) {
            pump(out, console.clone());
            pump(err, console.clone());
        }
        if let Ok(mut s) = stdin.lock() {
            *s = child.stdin.take();
        }
        wait_in_thread(child, boot, events.clone());

        loop {
            match rx.recv() {
                Ok(Event::Exited(n)) if n == boot => {
                    // A reboot ends every process of the boot, background
                    // ones a test left included, as a real one does.
                    kill_os(pgid);
                    emit(console, "[   99.000000] reboot: Restarting system\r\n");
                    break;
                }
                Ok(Event::Exited(_)) => {}
                Ok(Event::Reset) => {
                    kill_os(pgid);
                    power_lost(console, cache.as_ref());
                    emit(console, "\r\n[sim-board] hard reset\r\n");
                    break;
                }
                Ok(Event::Off(mut reply)) => {
                    kill_os(pgid);
                    power_lost(console, cache.as_ref());
                    let _ = reply.write_all(b"ok\n");
                    return Ok(());
                }
                Err(_) => {
                    kill_os(pgid);
                    return Ok(());
                }
            }
        }
    }
}

/// Stops everything the running OS started: its process group, any other
/// process in the board's session (test steps run in groups of their own),
/// and every descendant of the board (a process that made a session of its
/// own), then reaps them.
fn kill_os(pgid: Pid) {
    let _ = killpg(pgid, Signal::SIGKILL);
    let me = nix::unistd::getpid();
    // Killed processes re-parent their children here: repeat until none is left.
    for _ in 0..10 {
        let left = board_processes(me);
        if left.is_empty() {
            break;
        }
        for pid in left {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        }
        reap();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    reap();
}

/// Reaps dead orphans re-parented to the board (the OS's own main
/// process is waited for by its thread; reaping it here first only makes
/// that wait end at once).
fn reap() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            return;
        }
    }
}

/// One living process as `/proc/PID/stat` gives it.
struct Proc {
    pid: Pid,
    parent: i32,
    session: i32,
}

/// Every living process (zombies, already dead, are left to [`reap`]),
/// each `/proc/PID/stat` read once: a lab runs hundreds of boards, and
/// each reset scans the whole table.
fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields from 3 on, after the parenthesised name (which may hold spaces).
            let (_, rest) = stat.rsplit_once(") ")?;
            let f: Vec<&str> = rest.split_whitespace().take(4).collect();
            if f.first() == Some(&"Z") {
                return None;
            }
            Some(Proc {
                pid: Pid::from_raw(pid),
                parent: f.get(1)?.parse().ok()?,
                session: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

/// The processes of the board `me` runs: those in its session and every
/// descendant (one that made a session of its own too), itself excluded.
fn board_processes(me: Pid) -> Vec<Pid> {
    let all = processes();
    let mut found = in_session(&all, me, me);
    let mut parents = vec![me.as_raw()];
    while let Some(parent) = parents.pop() {
        for p in all.iter().filter(|p| p.parent == parent) {
            parents.push(p.pid.as_raw());
            found.push(p.pid);
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Processes in session `sid`, other than the caller.
pub fn session_members(sid: Pid) -> Vec<Pid> {
    in_session(&processes(), sid, nix::unistd::getpid())
}

/// Those of `all` in session `sid`, `except` left out.
fn in_session(all: &[Proc], sid: Pid, except: Pid) -> Vec<Pid> {
    all.iter()
        .filter(|p| p.session == sid.as_raw() && p.pid != except)
        .map(|p| p.pid)
        .collect()
}

/// Field `n` (1-based, as proc(5) numbers them; n >= 3) of `/proc/PID/stat`.
/// Counted after the parenthesised command name, which may hold spaces.
pub fn stat_field(pid: Pid, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace()
        .nth(n.checked_sub(3)?)
        .map(str::to_string)
}

fn wait_in_thread(mut child: Child, boot: u64, events: Sender<Event>) {
    std::thread::spawn(move || {
        let _ = child.wait();
        let _ = events.send(Event::Exited(boot));
    });
}

/// Reads and clears the boot-once flag, as the master image's init does:
/// cleared before acting on it, so any later reset returns to the master.
fn take_boot_flag(layout: &Layout) -> Option<String> {
    let path = layout.part("bootsel");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ok()?;
    let mut sector = vec![0u8; ferry_proto::boot::SIZE];
    let n = file.read(&mut sector).ok()?;
    let part = ferry_proto::boot::decode(&sector[..n])?;
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(0)).ok()?;
    file.write_all(&vec![0u8; ferry_proto::boot::SIZE]).ok()?;
    file.sync_all().ok()?;
    Some(part)
}

/// The test image's "init": its `etc/init.d/S*` scripts in order, as
/// busybox's rcS runs them. When they end, the simulated board reboots.
/// With `stopped`, it stops itself before anything (to be traced, see
/// [`Cache::attach`]).
fn test_os(layout: &Layout, part: &str, boot_id: &str, kmsg: bool, stopped: bool) -> Command {
    let root = layout.part(part);
    let init = r#"for s in "$FERRY_ROOT"/etc/init.d/S*; do [ -f "$s" ] && sh "$s" start; done; echo "[sim-board] test image init finished""#;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(if stopped {
            format!("kill -STOP $$; {init}")
        } else {
            init.to_string()
        })
        .env("FERRY_ROOT", root)
        .env("FERRY_REBOOT", "exit")
        .env(
            "FERRY_KMSG",
            if kmsg {
                layout.kmsg().into_os_string()
            } else {
                Default::default()
            },
        )
        .env("FERRY_BOOT_ID", boot_id);
    cmd
}

/// Makes the test boot's kernel log: a fresh FIFO at [`Layout::kmsg`] (what
/// an earlier boot left in it is gone, as a reboot empties the kernel's
/// buffer) holding the boot's first messages, as `/dev/kmsg` does. `None`
/// (the boot then has no kernel log) when it cannot be made.
fn kernel_log(layout: &Layout, boot: u64) -> Option<File> {
    let path = layout.kmsg();
    let _ = std::fs::remove_file(&path);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).ok()?;
    let mut fifo = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .ok()?;
    let banner = format!(
        "5,0,0,-;Linux version 6.1.0-ferry-sim (simulated board) #1 SMP PREEMPT_DYNAMIC\n\
         6,1,0,-;Command line: console=ttyS0,115200 ferry.sim.boot={boot}\n\
         6,2,412345,-;Run /init as init process\n"
    );
    fifo.write_all(banner.as_bytes()).ok()?;
    Some(fifo)
}

/// The OS died without syncing: what the test boot never synced is gone,
/// and the console says what.
fn power_lost(console: &ConsoleTx, cache: Option<&Cache>) {
    for lost in cache.map(Cache::lose_unsynced).unwrap_or_default() {
        emit(
            console,
            &format!("\r\n[sim-board] lost unsynced writes: {lost}"),
        );
    }
}
