//! A lab on one machine: `dispatcher lab up|down|status --lab DIR`.
//!
//! A scenario names boards (simulated or virtual QEMU, how many); `up`
//! writes one device file per board, `DIR/devices/NAME-N.yaml`, with
//! absolute paths, and a state folder per board under `DIR/boards/`, each
//! with its own names, namespace and ports so boards never collide. Boards
//! are powered by the jobs that use them; whatever they start (supervisors,
//! agents, QEMU, test processes) carries the lab folder in its command line
//! or environment, so `down --force` finds it all, even after `kill -9` of
//! the processes that started it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lock;
use crate::yaml;

/// What can go wrong with a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The scenario file is wrong (file, line, key).
    #[error("scenario file {0}")]
    Scenario(String),
    /// A file of the lab cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A program the lab needs is not where it should be.
    #[error("{0} not found (build the workspace, or name it in the scenario)")]
    Missing(PathBuf),
    /// The folder holds no lab.
    #[error("{0} holds no lab (run `dispatcher lab up --lab {0}` first)")]
    NoLab(PathBuf),
    /// Jobs still use the lab's boards.
    #[error("jobs are running on this lab ({0}); wait, cancel them, or use --force")]
    Busy(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.into(),
        source,
    }
}

/// The kind of a board.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `ferry-sim-board`: real agents as processes, a pty console.
    Sim,
    /// `images/qemu-board`: a QEMU virtual board (needs root and images/build).
    Qemu,
}

/// A group of identical boards in a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardGroup {
    /// Name; boards are `NAME-1`, `NAME-2`...
    pub name: String,
    /// Their kind.
    pub kind: Kind,
    /// How many.
    #[serde(default = "one")]
    pub count: u32,
    /// QEMU boards: the console, `pty` (default) or `tcp` (a free port each).
    #[serde(default)]
    pub console: ConsoleKind,
}

/// How a QEMU board's console is exported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleKind {
    /// A pty.
    #[default]
    Pty,
    /// A TCP serial port on loopback.
    Tcp,
}

fn one() -> u32 {
    1
}

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The boards.
    pub boards: Vec<BoardGroup>,
    /// `ferry-sim-board` (default: beside this dispatcher).
    #[serde(default)]
    pub sim_board: Option<PathBuf>,
    /// `images/qemu-board` (default: found above this dispatcher's folder).
    #[serde(default)]
    pub qemu_board: Option<PathBuf>,
}

impl Default for Scenario {
    /// One simulated board.
    fn default() -> Self {
        Scenario {
            boards: vec![BoardGroup {
                name: "sim".into(),
                kind: Kind::Sim,
                count: 1,
                console: ConsoleKind::Pty,
            }],
            sim_board: None,
            qemu_board: None,
        }
    }
}

/// One board of an up lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Board {
    /// The device name (unique on the host: the lab's name is in it).
    pub device: String,
    /// Its kind.
    pub kind: Kind,
    /// Its device file.
    pub device_file: PathBuf,
    /// Its state folder.
    pub state: PathBuf,
    /// Its network namespace (QEMU boards).
    pub netns: Option<String>,
}

/// `DIR/lab.json`: what `up` made, for `status` and `down`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    /// The lab folder, absolute.
    pub dir: PathBuf,
    /// Its boards.
    pub boards: Vec<Board>,
}

const STATE: &str = "lab.json";

/// A sibling program of this dispatcher (the workspace builds them together).
fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test binaries live one folder deeper (target/<profile>/deps).
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.exists())
}

/// `images/qemu-board` above this dispatcher's folder (it lives in the repo).
fn find_qemu_board() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .map(|a| a.join("images/qemu-board"))
        .find(|p| p.exists())
}

/// Reads a scenario file.
///
/// # Errors
/// [`LabError::Scenario`] naming the file, line and key.
pub fn load_scenario(path: &Path) -> Result<Scenario, LabError> {
    let s: Scenario = yaml::load(path).map_err(|e| LabError::Scenario(e.to_string()))?;
    for g in &s.boards {
        let ok = !g.name.is_empty()
            && g.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok || g.count == 0 {
            return Err(LabError::Scenario(format!(
                "{}: boards: {:?}: a name of [-_a-zA-Z0-9] and a count of at least 1",
                path.display(),
                g.name
            )));
        }
    }
    Ok(s)
}

/// A short id of the lab folder, so two labs' boards never share a name.
fn lab_id(dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    ferry_proto::hex(&Sha256::digest(dir.as_os_str().as_encoded_bytes())[..4])
}

/// Brings a lab up in `dir`: device files and board folders.
///
/// # Errors
/// When the folder cannot be written or a program is missing.
pub fn up(dir: &Path, scenario: &Scenario) -> Result<Lab, LabError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dir = std::fs::canonicalize(dir).map_err(io(dir))?;
    if let Ok(lab) = read(&dir) {
        // Up twice: the first lab's boards must go first.
        return Err(LabError::Busy(format!(
            "{} is already up with {} board(s): `dispatcher lab down --lab {}` first",
            dir.display(),
            lab.boards.len(),
            dir.display()
        )));
    }
    let id = lab_id(&dir);
    let devices = dir.join("devices");
    std::fs::create_dir_all(&devices).map_err(io(&devices))?;
    let mut boards = Vec::new();
    let mut to_prepare = Vec::new();
    for g in &scenario.boards {
        for n in 1..=g.count {
            let name = format!("{}-{n}", g.name);
            let state = dir.join("boards").join(&name);
            std::fs::create_dir_all(&state).map_err(io(&state))?;
            let device = format!("{name}.{id}");
            let (text, netns) = match g.kind {
                Kind::Sim => {
                    let sim = scenario
                        .sim_board
                        .clone()
                        .or_else(|| sibling("ferry-sim-board"))
                        .ok_or_else(|| LabError::Missing("ferry-sim-board".into()))?;
                    to_prepare.push((sim.clone(), state.clone()));
                    (sim_device(&device, &sim, &state), None)
                }
                Kind::Qemu => {
                    let qemu = scenario
                        .qemu_board
                        .clone()
                        .or_else(find_qemu_board)
                        .ok_or_else(|| LabError::Missing("images/qemu-board".into()))?;
                    let netns = format!("ferry-{id}-{name}");
                    (
                        qemu_device(&device, &qemu, &state, &netns, g.console),
                        Some(netns),
                    )
                }
            };
            let device_file = devices.join(format!("{name}.yaml"));
            std::fs::write(&device_file, text).map_err(io(&device_file))?;
            boards.push(Board {
                device,
                kind: g.kind,
                device_file,
                state,
                netns,
            });
        }
    }
    // Simulated boards are prepared a few at a time (each packs its own
    // test-agent bundle): a lab of a hundred comes up in seconds, not minutes.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
    // The first board packs the test-agent bundle; the others share it.
    if let Some((sim, state)) = to_prepare.first() {
        prepare_sim(sim, state)?;
        let bundle = state.join("test-agent.tar.gz");
        for (_, other) in &to_prepare[1..] {
            let to = other.join("test-agent.tar.gz");
            std::fs::hard_link(&bundle, &to)
                .or_else(|_| std::fs::copy(&bundle, &to).map(|_| ()))
                .map_err(io(&to))?;
        }
    }
    for chunk in to_prepare.get(1..).unwrap_or_default().chunks(workers) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(sim, state)| scope.spawn(move || prepare_sim(sim, state)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LabError::Missing("a board preparation thread".into()))
                    })
                })
                .collect::<Result<Vec<()>, LabError>>()
        })?;
    }
    let lab = Lab {
        dir: dir.clone(),
        boards,
    };
    let path = dir.join(STATE);
    let text = serde_json::to_vec_pretty(&lab).map_err(|e| io(&path)(e.into()))?;
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(lab)
}

/// Makes a simulated board's folder now, so its first power-on is as quick
/// as any other.
fn prepare_sim(sim: &Path, state: &Path) -> Result<(), LabError> {
    let out = std::process::Command::new(sim)
        .arg("--board")
        .arg(state)
        .arg("prepare")
        .output()
        .map_err(io(sim))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Io {
            path: state.into(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        })
    }
}

fn sim_device(device: &str, sim: &Path, state: &Path) -> String {
    let (sim, state) = (sim.display(), state.display());
    format!(
        "# Written by `dispatcher lab up`: a simulated board.
device: {device}
power:
  on: {sim} --board {state} on
  off: {sim} --board {state} off
  reset: {sim} --board {state} reset
console:
  tty: {state}/console
network:
  stream: 127.0.0.1:0
partitions: [testrootfs, firmware]
test_rootfs: testrootfs
timeouts: {{power: 30s, console: 10s, announce: 60s, rpc: 20s, fetch: 60s}}
"
    )
}

fn qemu_device(
    device: &str,
    qemu: &Path,
    state: &Path,
    netns: &str,
    console: ConsoleKind,
) -> String {
    let (qemu, state_s) = (qemu.display(), state.display());
    let (flag, console_key) = match console {
        ConsoleKind::Pty => (String::new(), format!("tty: {state_s}/console")),
        ConsoleKind::Tcp => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap_or(0);
            (
                format!(" --console tcp:{port}"),
                format!("tcp: 127.0.0.1:{port}"),
            )
        }
    };
    let cmd = format!("{qemu} --state {state_s} --netns {netns}{flag}");
    format!(
        "# Written by `dispatcher lab up`: a virtual QEMU board (needs root and images/build).
device: {device}
power:
  on: {cmd} on
  off: {cmd} off
  reset: {cmd} reset
console:
  {console_key}
network:
  namespace: {netns}
  stream: 192.0.2.1:0
partitions: [testrootfs]
test_rootfs: testrootfs
timeouts: {{power: 60s, console: 20s, announce: 120s, rpc: 30s, fetch: 120s}}
"
    )
}

/// Reads the lab in `dir`.
///
/// # Errors
/// [`LabError::NoLab`] when `dir` holds none.
pub fn read(dir: &Path) -> Result<Lab, LabError> {
    let path = dir.join(STATE);
    let text = std::fs::read(&path).map_err(|_| LabError::NoLab(dir.into()))?;
    serde_json::from_slice(&text).map_err(|e| io(&path)(e.into()))
}

/// A board's state for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct BoardStatus {
    /// The board.
    #[serde(flatten)]
    pub board: Board,
    /// Whether anything of it runs.
    pub powered: bool,
    /// The job using it, if any.
    pub job: Option<lock::Holder>,
}

/// Each board's state.
///
/// # Errors
/// [`LabError::NoLab`] when `dir` holds none.
pub fn status(dir: &Path) -> Result<Vec<BoardStatus>, LabError> {
    let lab = read(dir)?;
    let running = lock::running();
    Ok(lab
        .boards
        .into_iter()
        .map(|b| BoardStatus {
            powered: !processes_of(&b.state).is_empty(),
            job: running.iter().find(|h| h.device == b.device).cloned(),
            board: b,
        })
        .collect())
}

/// What `down` did not manage.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Everything that could not be stopped or removed, for people.
    pub items: Vec<String>,
}

/// Takes the lab down: refuses while jobs run unless `force`, which cancels
/// them; powers every board off, kills whatever is left of them, removes
/// their namespaces and the lab's files. Returns what could not be removed.
///
/// # Errors
/// [`LabError::Busy`] when jobs run and `force` is not set.
pub async fn down(dir: &Path, force: bool, power_timeout: Duration) -> Result<Leftovers, LabError> {
    let dir = std::fs::canonicalize(dir).map_err(|_| LabError::NoLab(dir.into()))?;
    let lab = read(&dir)?;
    let running: Vec<lock::Holder> = lock::running()
        .into_iter()
        .filter(|h| lab.boards.iter().any(|b| b.device == h.device))
        .collect();
    if !running.is_empty() && !force {
        let names: Vec<String> = running
            .iter()
            .map(|h| format!("{h} on {}", h.device))
            .collect();
        return Err(LabError::Busy(names.join(", ")));
    }
    let mut left = Leftovers::default();
    // Jobs first, the scheduler's way: they power their boards off themselves.
    for h in &running {
        if crate::jobs::cancel(&h.job, power_timeout).await.is_err() {
            kill_now(h.pid as i32);
        }
    }
    for b in &lab.boards {
        power_off(b, power_timeout).await;
    }
    // Whatever survived (orphans of a kill -9 among them): by name.
    let deadline = Instant::now() + power_timeout;
    loop {
        let pids = processes_of(&dir);
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            left.items
                .extend(pids.iter().map(|p| format!("process {p}")));
            break;
        }
        for p in pids {
            kill_now(p);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for b in &lab.boards {
        if let Some(ns) = &b.netns {
            if Path::new("/run/netns").join(ns).exists() {
                let ok = tokio::process::Command::new("ip")
                    .args(["netns", "del", ns])
                    .status()
                    .await
                    .is_ok_and(|s| s.success());
                if !ok {
                    left.items.push(format!("network namespace {ns}"));
                }
            }
        }
    }
    for sub in ["boards", "devices"] {
        let p = dir.join(sub);
        if p.exists() && std::fs::remove_dir_all(&p).is_err() {
            left.items.push(p.display().to_string());
        }
    }
    if left.items.is_empty() {
        let _ = std::fs::remove_file(dir.join(STATE));
    }
    Ok(left)
}

async fn power_off(b: &Board, timeout: Duration) {
    let Ok(text) = std::fs::read_to_string(&b.device_file) else {
        return;
    };
    let Some(cmd) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("off: "))
        .map(str::to_string)
    else {
        return;
    };
    let child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    let _ = tokio::time::timeout(timeout, child).await;
}

fn kill_now(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The parent of `pid`, from `/proc/PID/stat`.
fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Processes whose command line or environment names `path` (everything a
/// lab's boards start does), this process and its ancestors aside (the
/// shell that ran `lab down --lab DIR` names the folder too).
pub fn processes_of(path: &Path) -> Vec<i32> {
    let needle = path.as_os_str().as_encoded_bytes();
    let mut spared = vec![std::process::id() as i32];
    while let Some(p) = spared.last().and_then(|&p| parent(p)).filter(|&p| p > 1) {
        spared.push(p);
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| !spared.contains(pid))
        .filter(|pid| {
            ["cmdline", "environ"].iter().any(|f| {
                std::fs::read(format!("/proc/{pid}/{f}"))
                    .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.yaml");
        std::fs::write(&p, "boards:\n  - {name: sim, kind: toaster}\n").expect("w");
        let e = load_scenario(&p).expect_err("bad kind").to_string();
        assert!(e.contains("s.yaml:2:") && e.contains("toaster"), "{e}");
        std::fs::write(&p, "boards:\n  - {name: 'a/b', kind: sim}\n").expect("w");
        assert!(load_scenario(&p).is_err());
        std::fs::write(
            &p,
            "boards:\n  - {name: sim, kind: sim, count: 3}\n  - {name: vm, kind: qemu}\n",
        )
        .expect("w");
        let s = load_scenario(&p).expect("good");
        assert_eq!((s.boards[0].count, s.boards[1].kind), (3, Kind::Qemu));
    }
}
