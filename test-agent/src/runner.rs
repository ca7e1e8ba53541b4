//! Runs a test plan: each definition's steps in a shell, its output read
//! from the pipes in chunks and recorded byte for byte, a per-definition
//! timeout, and one definition's failure never stopping the next.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use ferry_proto::plan::v1::{Definition, TestPlan};
use ferry_proto::record::{Body, Stream, FERRY_DIR};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::mirror::Mirror;
use crate::parse::{LineParser, Pattern};
use crate::records::{RecordError, Recorder};

/// How long to keep reading output after a definition's shell has exited
/// (or was killed), in case background processes still hold its pipes.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// PATH for steps when the agent itself has none (init starts it bare).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a definition could not be run at all (its failure is a record, not this).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Recording failed: nothing can be trusted after that.
    #[error(transparent)]
    Records(#[from] RecordError),
    /// The run folder or script could not be written.
    #[error("preparing {path}: {source}")]
    Prepare {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The shell could not be started.
    #[error("starting the shell for definition {definition}: {source}")]
    Spawn {
        /// The definition.
        definition: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Where and as whom the plan runs.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Root of the test rootfs (`/` on a board).
    pub root: PathBuf,
    /// The agent's records file (`FERRY_RECORDS`); helpers that cannot
    /// reach the agent write records files of their own beside it.
    pub records: PathBuf,
    /// The agent's socket for the helpers (an abstract socket name).
    pub socket: String,
    /// The job named in the plan.
    pub job: String,
    /// This boot's id.
    pub boot_id: String,
}

/// Runs every definition of `plan` in order. At the end, whatever the
/// definitions left running in the background is killed: a leftover
/// process could hold a file on the rootfs open for writing and keep it
/// from being remounted read-only before the reboot.
///
/// # Errors
/// Only when recording itself fails; failing definitions are records.
pub fn run_plan(
    ctx: &RunContext,
    plan: &TestPlan,
    rec: &Recorder,
    mirror: &Mirror,
) -> Result<(), RunError> {
    let mut groups = Vec::new();
    let ran = run_all(ctx, plan, rec, mirror, &mut groups);
    for pgid in groups {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    ran
}

fn run_all(
    ctx: &RunContext,
    plan: &TestPlan,
    rec: &Recorder,
    mirror: &Mirror,
    groups: &mut Vec<Pid>,
) -> Result<(), RunError> {
    for (index, def) in plan.definitions.iter().enumerate() {
        match run_definition(ctx, index, def, rec, mirror, groups) {
            Ok(Ran::Finished) => {}
            Ok(Ran::Aborted) => {
                // As in LAVA, an aborted run ends the test action: later
                // definitions do not run; earlier results stay.
                let left = plan.definitions.len() - index - 1;
                if left > 0 {
                    mirror.line(format!(
                        "[ferry] run aborted in {}: {left} later definition(s) not run",
                        def.name
                    ));
                }
                return Ok(());
            }
            Err(RunError::Records(e)) => return Err(RunError::Records(e)),
            Err(e) => {
                // Could not even start: say so and go on with the next one.
                mirror.line(format!("[ferry] {e}"));
                rec.durable(Body::AgentMessage {
                    level: "error".into(),
                    message: e.to_string(),
                })?;
            }
        }
    }
    Ok(())
}

/// Quotes a value for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// How a definition ended, for the plan.
#[derive(Debug, PartialEq, Eq)]
enum Ran {
    /// It ran (whatever its exit status): go on with the next.
    Finished,
    /// It aborted the run (`lava-test-raise`, or deps it cannot install).
    Aborted,
}

/// Name of the file `lava-test-raise` leaves in the run folder.
pub const ABORTED_FILE: &str = "aborted";

/// Package managers LAVA's `lava-install-packages` knows, as found in the
/// image, and the shell lines that install `deps` with each.
const PACKAGE_MANAGERS: [&str; 3] = ["apt-get", "apk", "opkg"];
const IMAGE_BIN_DIRS: [&str; 6] = [
    "usr/local/sbin",
    "usr/local/bin",
    "usr/sbin",
    "usr/bin",
    "sbin",
    "bin",
];

/// The image's package manager: the first of [`PACKAGE_MANAGERS`] in the
/// image's own bin folders (under `root`, not the agent's PATH, so a
/// simulated board's host tools do not count).
fn package_manager(root: &Path) -> Option<(&'static str, PathBuf)> {
    PACKAGE_MANAGERS.iter().find_map(|pm| {
        IMAGE_BIN_DIRS
            .iter()
            .map(|d| root.join(d).join(pm))
            .find(|p| p.is_file())
            .map(|p| (*pm, p))
    })
}

/// The lines that install `deps` with `pm` (as LAVA's distro scripts do).
fn install_lines(pm: &str, path: &Path, deps: &[String]) -> String {
    let bin = shell_quote(&path.display().to_string());
    let deps: Vec<String> = deps.iter().map(|d| shell_quote(d)).collect();
    let deps = deps.join(" ");
    match pm {
        "apt-get" => format!(
            "DEBIAN_FRONTEND=noninteractive {bin} update -q\nDEBIAN_FRONTEND=noninteractive {bin} install -y -q {deps}\n"
        ),
        "apk" => format!("{bin} add {deps}\n"),
        _ => format!("{bin} update\n{bin} install {deps}\n"),
    }
}

/// The script LAVA would generate: `set -e`, the parameters, the package
/// installation, then the steps.
fn script(def: &Definition, install: &str) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by ferry test-agent.\nset -e\n");
    for p in &def.params {
        s.push_str(&format!(
            "{}={}\nexport {}\n",
            p.name,
            shell_quote(&p.value),
            p.name
        ));
    }
    s.push_str(install);
    for step in &def.steps {
        s.push_str(step);
        s.push('\n');
    }
    s
}

fn prepare(path: &Path, result: std::io::Result<()>) -> Result<(), RunError> {
    result.map_err(|source| RunError::Prepare {
        path: path.into(),
        source,
    })
}

/// Largest piece of output read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;
/// Chunks waiting between the pipe readers and the runner: a test that
/// prints faster than the records are written blocks on its pipe.
const PIPE_QUEUE: usize = 4;
/// Longest piece of a line mirrored as one console line.
const MAX_LINE: usize = 64 * 1024;
/// Bytes of output mirrored per [`MIRROR_WINDOW`] (about what a 115200
/// baud UART carries); the lines beyond are counted as skipped without
/// being copied. A console is no faster in practice, and an emulated UART
/// that is (QEMU's) costs the board CPU for every byte it carries.
const MIRROR_BYTES: usize = 1536;
/// Lines mirrored per [`MIRROR_WINDOW`], however short.
const MIRROR_LINES: u32 = 100;
/// See [`MIRROR_BYTES`].
const MIRROR_WINDOW: Duration = Duration::from_millis(100);

fn read_chunks(stream: Stream, mut pipe: impl Read, tx: SyncSender<(Stream, Vec<u8>)>) {
    loop {
        let mut buf = vec![0u8; READ_CHUNK];
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                // Blocks while the runner is behind: backpressure.
                if tx.send((stream, buf)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Cuts output chunks into console lines, within a line budget.
struct MirrorLines<'a> {
    mirror: &'a Mirror,
    partial: [Vec<u8>; 2],
    window: Instant,
    used: u32,
    used_bytes: usize,
}

impl<'a> MirrorLines<'a> {
    fn new(mirror: &'a Mirror) -> Self {
        MirrorLines {
            mirror,
            partial: [Vec::new(), Vec::new()],
            window: Instant::now(),
            used: 0,
            used_bytes: 0,
        }
    }

    /// Whether this window's budget is used up.
    fn spent(&self) -> bool {
        self.used >= MIRROR_LINES || self.used_bytes >= MIRROR_BYTES
    }

    fn emit(&mut self, line: &[u8]) {
        if self.window.elapsed() >= MIRROR_WINDOW {
            self.window = Instant::now();
            self.used = 0;
            self.used_bytes = 0;
        }
        if !self.spent() {
            self.used += 1;
            self.used_bytes += line.len();
            let line = String::from_utf8_lossy(line);
            self.mirror.line(ferry_proto::console::mirror_output(
                line.trim_end_matches(['\n', '\r']),
            ));
        } else {
            self.mirror.skip(1);
        }
    }

    fn chunk(&mut self, stream: Stream, data: &[u8]) {
        let i = stream as usize;
        let mut rest = data;
        while let Some(n) = rest.iter().position(|b| *b == b'\n') {
            let (line, tail) = rest.split_at(n + 1);
            rest = tail;
            if self.partial[i].is_empty() {
                if self.spent() && self.window.elapsed() < MIRROR_WINDOW {
                    // Over budget: count the remaining lines in one pass.
                    let lines = 1 + rest.iter().filter(|b| **b == b'\n').count() as u64;
                    self.mirror.skip(lines);
                    rest = &rest
                        [rest.len() - rest.iter().rev().take_while(|b| **b != b'\n').count()..];
                    break;
                }
                self.emit(line);
            } else {
                let mut whole = std::mem::take(&mut self.partial[i]);
                whole.extend_from_slice(line);
                self.emit(&whole);
            }
        }
        self.partial[i].extend_from_slice(rest);
        if self.partial[i].len() >= MAX_LINE {
            let whole = std::mem::take(&mut self.partial[i]);
            self.emit(&whole);
        }
    }

    fn finish(&mut self) {
        // The last unfinished lines are shown whatever the budget.
        self.used = 0;
        self.used_bytes = 0;
        for i in 0..2 {
            let whole = std::mem::take(&mut self.partial[i]);
            if !whole.is_empty() {
                self.emit(&whole);
            }
        }
    }
}

fn run_definition(
    ctx: &RunContext,
    index: usize,
    def: &Definition,
    rec: &Recorder,
    mirror: &Mirror,
    groups: &mut Vec<Pid>,
) -> Result<Ran, RunError> {
    let run_dir = ctx
        .root
        .join(FERRY_DIR)
        .join("run")
        .join(format!("{index}_{}", def.name));
    prepare(&run_dir, std::fs::create_dir_all(&run_dir))?;
    // A folder left by an earlier run of the same image must not abort this one.
    let _ = std::fs::remove_file(run_dir.join(ABORTED_FILE));
    let install = if def.install_deps.is_empty() {
        String::new()
    } else if let Some((pm, path)) = package_manager(&ctx.root) {
        install_lines(pm, &path, &def.install_deps)
    } else {
        let message = format!(
            "definition {}: install.deps {:?} cannot be installed: the image has none of the package managers {PACKAGE_MANAGERS:?}; install them in the image, or drop install.deps",
            def.name, def.install_deps
        );
        mirror.line(format!("[ferry] {message}"));
        rec.durable(Body::Aborted {
            definition: def.name.clone(),
            class: "job-error".into(),
            message,
        })?;
        return Ok(Ran::Aborted);
    };
    let pattern = if def.parse_pattern.is_empty() {
        None
    } else {
        let fixup = def.fixupdict.clone().into_iter().collect();
        match Pattern::new(&def.parse_pattern, fixup) {
            Ok(p) => Some(LineParser::new(p, &def.name)),
            Err(e) => {
                let message = format!("definition {}: {e}", def.name);
                rec.durable(Body::Aborted {
                    definition: def.name.clone(),
                    class: "job-error".into(),
                    message,
                })?;
                return Ok(Ran::Aborted);
            }
        }
    };
    let script_path = run_dir.join("run.sh");
    prepare(
        &script_path,
        std::fs::write(&script_path, script(def, &install)),
    )?;
    // A definition from git runs in its repository's tree, as in LAVA.
    let work_dir = if def.tree_tar_gz.is_empty() {
        run_dir.clone()
    } else {
        let repo = run_dir.join("repo");
        let _ = std::fs::remove_dir_all(&repo);
        prepare(&repo, std::fs::create_dir_all(&repo))?;
        let gz = flate2::read::GzDecoder::new(def.tree_tar_gz.as_slice());
        prepare(&repo, tar::Archive::new(gz).unpack(&repo))?;
        repo
    };

    let bin = ctx.root.join(FERRY_DIR).join("bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into())
    );
    let start = Instant::now();
    rec.durable(Body::DefinitionStarted {
        definition: def.name.clone(),
    })?;
    mirror.line(format!(
        "<LAVA_SIGNAL_STARTRUN {index}_{} {}>",
        def.name, ctx.boot_id
    ));

    let mut child = Command::new("/bin/sh")
        .arg(&script_path)
        .current_dir(&work_dir)
        .env("PATH", path)
        .env("FERRY_RECORDS", &ctx.records)
        .env("FERRY_AGENT_SOCKET", &ctx.socket)
        .env("FERRY_JOB", &ctx.job)
        .env("FERRY_DEFINITION", &def.name)
        .env("FERRY_BOOT_ID", &ctx.boot_id)
        .env("FERRY_RUN_DIR", &run_dir)
        // Where LAVA's helpers leave their files (results/<case>/result...).
        .env("LAVA_RESULT_DIR", &run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills everything it started.
        .process_group(0)
        .spawn()
        .map_err(|source| RunError::Spawn {
            definition: def.name.clone(),
            source,
        })?;
    let pgid = Pid::from_raw(child.id() as i32);
    groups.push(pgid);

    let (tx, rx) = sync_channel(PIPE_QUEUE);
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || read_chunks(Stream::Stdout, out, tx));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || read_chunks(Stream::Stderr, err, tx));
    }
    drop(tx);

    let limit = (def.timeout_seconds > 0).then(|| Duration::from_secs(def.timeout_seconds));
    let mut deadline = limit.map(|l| start + l);
    let mut timed_out = false;
    let mut status = None;
    let mut lines = MirrorLines::new(mirror);
    let mut pattern = pattern;
    let parsed = |found: Vec<Result<Body, String>>| -> Result<(), RunError> {
        for r in found {
            match r {
                Ok(body) => rec.durable(body)?,
                Err(message) => rec.durable(Body::AgentMessage {
                    level: "warn".into(),
                    message: format!("definition {}: {message}", def.name),
                })?,
            }
        }
        Ok(())
    };
    loop {
        // The deadline is checked on every turn, so a flood of output
        // cannot keep a definition past its timeout.
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if status.is_none() {
                timed_out = true;
                let _ = killpg(pgid, Signal::SIGKILL);
                status = child.wait().ok();
                deadline = Some(Instant::now() + DRAIN_GRACE);
            } else {
                // Output still held open by stray background processes.
                let _ = killpg(pgid, Signal::SIGKILL);
                break;
            }
        }
        let wait = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(200))
            .min(Duration::from_millis(200));
        match rx.recv_timeout(wait) {
            Ok((stream, data)) => {
                lines.chunk(stream, &data);
                if let Some(p) = pattern.as_mut() {
                    parsed(p.chunk(stream, &data))?;
                }
                // Blocks while the records queue is full: backpressure.
                rec.output(&def.name, stream, data)?;
            }
            Err(RecvTimeoutError::Disconnected) if status.is_some() => break,
            Err(RecvTimeoutError::Disconnected) | Err(RecvTimeoutError::Timeout) => {}
        }
        if status.is_none() {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s);
                deadline = Some(Instant::now() + DRAIN_GRACE);
            }
        }
    }
    lines.finish();
    if let Some(p) = pattern.as_mut() {
        parsed(p.finish())?;
    }

    let exit_code = if timed_out {
        None
    } else {
        status.and_then(|s| s.code())
    };
    // LAVA's lava-test-shell leaves the shell's status there; best effort.
    if let Some(c) = exit_code {
        let _ = std::fs::write(run_dir.join("return_code"), format!("{c}\n"));
    }
    rec.durable(Body::DefinitionFinished {
        definition: def.name.clone(),
        exit_code,
        timed_out,
        duration_ms: start.elapsed().as_millis() as u64,
    })?;
    let how = match (timed_out, exit_code) {
        (true, _) => "timed out".to_string(),
        (false, Some(c)) => format!("exit {c}"),
        (false, None) => "killed by a signal".to_string(),
    };
    mirror.line(format!(
        "<LAVA_SIGNAL_ENDRUN {index}_{} {}> ({how})",
        def.name, ctx.boot_id
    ));
    Ok(if run_dir.join(ABORTED_FILE).exists() {
        Ran::Aborted
    } else {
        Ran::Finished
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::plan::v1::Param;

    /// A console that keeps what it is given.
    #[derive(Clone, Default)]
    struct Console(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Console {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("lock"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pipes_are_read_in_chunks_that_keep_every_byte() {
        let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (tx, rx) = sync_channel(PIPE_QUEUE);
        let data = input.clone();
        let t = std::thread::spawn(move || read_chunks(Stream::Stderr, data.as_slice(), tx));
        let mut back = Vec::new();
        for (stream, chunk) in rx {
            assert_eq!(stream, Stream::Stderr);
            assert!(chunk.len() <= READ_CHUNK);
            back.extend_from_slice(&chunk);
        }
        t.join().expect("reader");
        assert!(back == input);
    }

    #[test]
    fn mirror_rejoins_split_lines_and_counts_what_it_skips() {
        let console = Console::default();
        let mirror = Mirror::start(Box::new(console.clone()));
        let mut lines = MirrorLines::new(&mirror);
        lines.chunk(Stream::Stdout, b"hel");
        lines.chunk(Stream::Stderr, b"err\n");
        lines.chunk(Stream::Stdout, b"lo\nwor");
        lines.chunk(Stream::Stdout, b"ld\n");
        // A flood far beyond the budget: counted, not queued.
        lines.chunk(Stream::Stdout, &b"y\n".repeat(10_000));
        lines.chunk(Stream::Stdout, b"tail");
        lines.finish();
        let skipped = mirror.skipped();
        mirror.finish(Duration::from_secs(5));
        let text = String::from_utf8(console.0.lock().expect("lock").clone()).expect("utf8");
        // (the mirror's own "skipped" notes may come anywhere)
        let shown: Vec<&str> = text.lines().filter(|l| !l.starts_with("[ferry]")).collect();
        let tagged = |l: &str| ferry_proto::console::mirror_output(l);
        assert_eq!(
            shown[..3],
            [tagged("err"), tagged("hello"), tagged("world")]
        );
        let ys = shown.iter().filter(|l| **l == tagged("y")).count() as u64;
        assert_eq!(ys + skipped, 10_000, "{text}");
        assert!(skipped >= 10_000 - u64::from(MIRROR_LINES));
        assert!(text.ends_with(&format!("{}\n", tagged("tail"))), "{text}");
    }

    #[test]
    fn script_quotes_params_and_keeps_step_order() {
        let def = Definition {
            name: "d".into(),
            steps: vec!["echo $A".into(), "false".into(), "echo never".into()],
            params: vec![Param {
                name: "A".into(),
                value: "it's $HOME".into(),
            }],
            timeout_seconds: 0,
            origin: "inline".into(),
            ..Default::default()
        };
        let s = script(&def, "");
        assert!(s.contains("set -e\n"));
        assert!(s.contains("A='it'\\''s $HOME'\nexport A\n"));
        assert!(s.find("echo $A").expect("step") < s.find("false").expect("step"));
    }
}
