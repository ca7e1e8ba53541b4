//! Support for Ferry's end-to-end tests: the real binaries, real boards, and
//! a dump of what they said when an assertion fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Folder holding the workspace's binaries for this build profile.
pub fn bin_dir() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A workspace binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// One row of `results.json`: (suite, name, result).
pub type Row = (String, String, String);

/// A [`Row`].
pub fn r(suite: &str, name: &str, result: &str) -> Row {
    (suite.into(), name.into(), result.into())
}

/// The results of `examples/jobs/defs/smoke.yaml`, in order.
pub fn smoke_cases() -> Vec<Row> {
    vec![
        r("smoke", "shell-works", "pass"),
        r("smoke", "greeting", "pass"),
        r("smoke", "sleep-time", "pass"),
        r("smoke", "not-yet", "skip"),
    ]
}

/// The results of the smoke jobs (both boards run the same definitions).
pub fn smoke_job_results() -> Vec<Row> {
    let mut rows = smoke_cases();
    rows.extend([
        r("checks", "missing-file", "fail"),
        r("checks", "arithmetic", "pass"),
        r("checks", "flaky", "unknown"),
        r("lava", "smoke", "pass"),
        r("lava", "checks", "pass"),
    ]);
    rows
}

/// The files of a folder, by name, with their bytes.
pub fn folder_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).expect("read"))
        })
        .collect();
    v.sort();
    v
}

/// Asserts the records the live stream brought (`streamed`) are the
/// fetched ones (`fetched`), byte for byte, and that there are some.
pub fn assert_same_records(streamed: &Path, fetched: &Path) {
    let (streamed, fetched) = (folder_files(streamed), folder_files(fetched));
    assert!(!fetched.is_empty(), "no records fetched");
    assert_eq!(
        streamed.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        fetched.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for ((name, s), (_, f)) in streamed.iter().zip(&fetched) {
        assert!(
            s == f,
            "{name}: streamed {} bytes, fetched {}",
            s.len(),
            f.len()
        );
    }
}

/// A TCP port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `(suite, name, result)` of every row of a `results.json`; `None` when it
/// is not an array.
pub fn rows(results: &serde_json::Value) -> Option<Vec<Row>> {
    let rows = results.as_array()?.iter().map(|r| {
        (
            r["suite"].as_str().unwrap_or("").into(),
            r["name"].as_str().unwrap_or("").into(),
            r["result"].as_str().unwrap_or("").into(),
        )
    });
    Some(rows.collect())
}

/// What a dispatcher run left behind.
pub struct Run {
    /// The process output (stdout is the summary).
    pub output: Output,
    /// The output folder.
    pub dir: PathBuf,
}

impl Run {
    /// Exit code.
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
    /// Asserts the run ended in `class` with its documented exit code, in
    /// both the exit status and `outcome.json`; returns the outcome message.
    pub fn expect_outcome(&self, class: &str) -> String {
        let code = match class {
            "complete" => 0,
            "job-error" => 2,
            "infrastructure-error" => 3,
            "test-error" => 4,
            "canceled" => 5,
            "internal-error" => 1,
            other => panic!("no outcome class {other:?}"),
        };
        assert_eq!(self.code(), Some(code), "{}", self.dump());
        let outcome = self.json("outcome.json");
        assert_eq!(
            (outcome["class"].as_str(), outcome["exit_code"].as_i64()),
            (Some(class), Some(i64::from(code))),
            "{}",
            self.dump()
        );
        outcome["message"].as_str().unwrap_or_default().to_string()
    }

    /// A file of the output folder, parsed as JSON.
    pub fn json(&self, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.dump()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.dump()))
    }
    /// A file of the output folder as text.
    pub fn text(&self, name: &str) -> String {
        let bytes = std::fs::read(self.dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.dump()));
        String::from_utf8_lossy(&bytes).into_owned()
    }
    /// Everything worth seeing when a test fails.
    pub fn dump(&self) -> String {
        let outcome = std::fs::read_to_string(self.dir.join("outcome.json")).unwrap_or_default();
        let console = std::fs::read(self.dir.join("console.log")).unwrap_or_default();
        let tail = &console[console.len().saturating_sub(4000)..];
        format!(
            "--- exit: {:?}\n--- stdout:\n{}\n--- stderr:\n{}\n--- outcome.json:\n{outcome}\n--- console.log (tail):\n{}",
            self.output.status.code(),
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr),
            String::from_utf8_lossy(tail)
        )
    }
    /// `(suite, name, result)` of every result.
    pub fn results(&self) -> Vec<Row> {
        rows(&self.json("results.json"))
            .unwrap_or_else(|| panic!("results.json is not an array\n{}", self.dump()))
    }
    /// Roles of the boots announced, in order ("master", "test"...).
    pub fn boot_roles(&self) -> Vec<String> {
        self.boots().into_iter().map(|b| b.0).collect()
    }

    /// Role and id of the boots announced, in order, from `events.jsonl`.
    pub fn boots(&self) -> Vec<(String, String)> {
        self.text("events.jsonl")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["source"] == "dispatcher" && e["kind"] == "boot")
            .map(|e| {
                (
                    e["role"].as_str().unwrap_or("").to_string(),
                    e["boot"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }
}

/// Runs `dispatcher run` as a separate process.
pub fn dispatch(device: &Path, job: &Path, out: &Path) -> Run {
    dispatch_env(device, job, out, &[])
}

/// Runs `dispatcher run` as a separate process with `env` added.
pub fn dispatch_env(device: &Path, job: &Path, out: &Path, env: &[(&str, &str)]) -> Run {
    let output = spawn_dispatch(device, job, out, env)
        .wait_with_output()
        .expect("dispatcher runs");
    Run {
        output,
        dir: out.into(),
    }
}

/// Starts `dispatcher run` as a separate process with `env` added, its
/// stdout and stderr piped (for [`Run`] once it ended).
pub fn spawn_dispatch(
    device: &Path,
    job: &Path,
    out: &Path,
    env: &[(&str, &str)],
) -> std::process::Child {
    Command::new(bin("dispatcher"))
        .envs(env.iter().copied())
        .arg("run")
        .arg("--device")
        .arg(device)
        .arg("--output")
        .arg(out)
        .arg(job)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dispatcher starts")
}

/// A simulated board in a temporary folder, described by a device file
/// made from `examples/devices/sim-board.yaml`; powered off on drop.
pub struct SimBoard {
    /// Holds the board, device file and outputs.
    pub tmp: tempfile::TempDir,
    /// The device file.
    pub device: PathBuf,
    /// The board folder.
    pub board: PathBuf,
}

impl SimBoard {
    /// Prepares a board (it is created on first power-on).
    pub fn new() -> Self {
        Self::with_device(|d| d)
    }

    /// Like [`SimBoard::new`], with the device file text edited by `edit`.
    pub fn with_device(edit: impl FnOnce(String) -> String) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let board = tmp.path().join("board");
        let example = std::fs::read_to_string(workspace().join("examples/devices/sim-board.yaml"))
            .expect("example device");
        let text = example
            .replace(
                "../../target/debug/ferry-sim-board",
                &bin("ferry-sim-board").display().to_string(),
            )
            .replace("../../target/sim-board", &board.display().to_string())
            // One lock per device name: each test's board is its own device.
            .replace(
                "device: sim-board\n",
                &format!(
                    "device: sim-board-{}\n",
                    tmp.path()
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("x")
                ),
            );
        let device = tmp.path().join("sim-board.yaml");
        std::fs::write(&device, edit(text)).expect("device file");
        SimBoard { tmp, device, board }
    }

    /// Runs a job file on this board.
    pub fn run(&self, job: &Path) -> Run {
        self.run_env(job, &[])
    }

    /// Runs a job file on this board, with `env` added to the dispatcher's.
    pub fn run_env(&self, job: &Path, env: &[(&str, &str)]) -> Run {
        let out = self.tmp.path().join(format!(
            "out-{}",
            job.file_stem().and_then(|s| s.to_str()).unwrap_or("job")
        ));
        dispatch_env(&self.device, job, &out, env)
    }

    /// Writes a job file next to the example jobs' assets and returns its path.
    pub fn job(&self, name: &str, text: &str) -> PathBuf {
        let dir = self.tmp.path().join("jobs");
        std::fs::create_dir_all(&dir).expect("jobs dir");
        let p = dir.join(name);
        std::fs::write(&p, text).expect("job file");
        p
    }

    /// Whether anything of the board still runs: its control socket, or a
    /// process whose command line names the board folder (the supervisor,
    /// the master agent, the test agent).
    pub fn powered(&self) -> bool {
        self.board.join("control.sock").exists() || !processes_mentioning(&self.board).is_empty()
    }
}

/// Processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.display().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&needle)
                })
                .unwrap_or(false)
        })
        .filter(|pid| *pid != std::process::id() as i32)
        .collect()
}

impl Default for SimBoard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SimBoard {
    fn drop(&mut self) {
        let _ = Command::new(bin("ferry-sim-board"))
            .arg("--board")
            .arg(&self.board)
            .arg("off")
            .output();
    }
}

/// ser2net (Debian's serial-to-network server) in front of the board's pty,
/// as in a lab where consoles are reached over TCP.
pub struct Ser2net(std::process::Child);

impl Ser2net {
    /// Serves `tty` on a free loopback port, raw or with telnet.
    pub fn start(dir: &std::path::Path, tty: &std::path::Path, telnet: bool) -> (Self, u16) {
        let port = free_port();
        let config = dir.join("ser2net.yaml");
        std::fs::write(
            &config,
            format!(
                "%YAML 1.1\n---\nconnection: &board\n  accepter: {}tcp,127.0.0.1,{port}\n  connector: serialdev,{},115200n81,local\n  options:\n    kickolduser: true\n",
                if telnet { "telnet," } else { "" },
                tty.display()
            ),
        )
        .expect("ser2net config");
        let child = Command::new("ser2net")
            .arg("-d")
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ser2net is installed (.ci/run installs it)");
        (Ser2net(child), port)
    }
}

impl Drop for Ser2net {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `out/events.jsonl` says the run entered `phase` (as the
/// dispatcher names it: `deploy`, `test`, `fetching results`...); panics
/// after `timeout`.
pub fn wait_for_phase(out: &Path, phase: &str, timeout: std::time::Duration) {
    let needle = format!("\"phase\":\"{phase}\"");
    wait_for_event(out, &needle, &format!("phase {phase}"), timeout);
}

/// Waits until `out/events.jsonl` holds `needle`; panics after `timeout`
/// saying the run never reached `what`.
pub fn wait_for_event(out: &Path, needle: &str, what: &str, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap_or_default();
        if events.contains(needle) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the run never reached {what}");
}

/// The sha256 of `bytes`, in hex, as a job file gives it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
