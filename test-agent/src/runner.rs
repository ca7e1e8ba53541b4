//! Runs a test plan: each definition's steps in a shell, every output line
//! recorded, a per-definition timeout, and one definition's failure never
//! stopping the next.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use ferry_proto::plan::v1::{Definition, TestPlan};
use ferry_proto::record::{Body, Stream, FERRY_DIR};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::mirror::Mirror;
use crate::records::{RecordError, RecordLog};

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
    /// The records file, shared with the helpers.
    pub records: PathBuf,
    /// This boot's id.
    pub boot_id: String,
}

/// Runs every definition of `plan` in order.
///
/// # Errors
/// Only when recording itself fails; failing definitions are records.
pub fn run_plan(
    ctx: &RunContext,
    plan: &TestPlan,
    log: &mut RecordLog,
    mirror: &Mirror,
) -> Result<(), RunError> {
    for (index, def) in plan.definitions.iter().enumerate() {
        if let Err(e) = run_definition(ctx, index, def, log, mirror) {
            if let RunError::Records(_) = e {
                return Err(e);
            }
            // Could not even start: say so and go on with the next one.
            mirror.line(format!("[ferry] {e}"));
            log.append_synced(Body::AgentMessage {
                level: "error".into(),
                message: e.to_string(),
            })?;
        }
    }
    Ok(())
}

/// Quotes a value for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The script LAVA would generate: `set -e`, the parameters, then the steps.
fn script(def: &Definition) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by ferry test-agent.\nset -e\n");
    for p in &def.params {
        s.push_str(&format!(
            "{}={}\nexport {}\n",
            p.name,
            shell_quote(&p.value),
            p.name
        ));
    }
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

/// Longest piece of a line kept in one record: a longer line is split over
/// several records, never truncated, and never held whole in memory.
const MAX_LINE: u64 = 64 * 1024;

fn read_lines(stream: Stream, pipe: impl Read, tx: Sender<(Stream, String)>) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']).to_string();
                if tx.send((stream, line)).is_err() {
                    return;
                }
            }
        }
    }
}

fn run_definition(
    ctx: &RunContext,
    index: usize,
    def: &Definition,
    log: &mut RecordLog,
    mirror: &Mirror,
) -> Result<(), RunError> {
    let run_dir = ctx
        .root
        .join(FERRY_DIR)
        .join("run")
        .join(format!("{index}_{}", def.name));
    prepare(&run_dir, std::fs::create_dir_all(&run_dir))?;
    let script_path = run_dir.join("run.sh");
    prepare(&script_path, std::fs::write(&script_path, script(def)))?;

    let bin = ctx.root.join(FERRY_DIR).join("bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into())
    );
    let start = Instant::now();
    log.append_synced(Body::DefinitionStarted {
        definition: def.name.clone(),
    })?;
    mirror.line(format!(
        "<LAVA_SIGNAL_STARTRUN {index}_{} {}>",
        def.name, ctx.boot_id
    ));

    let mut child = Command::new("/bin/sh")
        .arg(&script_path)
        .current_dir(&run_dir)
        .env("PATH", path)
        .env("FERRY_RECORDS", &ctx.records)
        .env("FERRY_DEFINITION", &def.name)
        .env("FERRY_BOOT_ID", &ctx.boot_id)
        .env("FERRY_RUN_DIR", &run_dir)
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

    let (tx, rx) = channel();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || read_lines(Stream::Stdout, out, tx));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || read_lines(Stream::Stderr, err, tx));
    }
    drop(tx);

    let limit = (def.timeout_seconds > 0).then(|| Duration::from_secs(def.timeout_seconds));
    let mut deadline = limit.map(|l| start + l);
    let mut timed_out = false;
    let mut status = None;
    loop {
        // Poll the child now and then; output arrives on the channel meanwhile.
        let wait = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(200))
            .min(Duration::from_millis(200));
        match rx.recv_timeout(wait) {
            Ok((stream, line)) => {
                record_line(log, mirror, &def.name, stream, line)?;
                // Group commit: sync once the burst is written.
                while let Ok((stream, line)) = rx.try_recv() {
                    record_line(log, mirror, &def.name, stream, line)?;
                }
                log.sync()?;
            }
            Err(RecvTimeoutError::Disconnected) if status.is_some() => break,
            Err(RecvTimeoutError::Disconnected) | Err(RecvTimeoutError::Timeout) => {}
        }
        if status.is_none() {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s);
                deadline = Some(Instant::now() + DRAIN_GRACE);
                continue;
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if status.is_none() {
                timed_out = true;
                let _ = killpg(pgid, Signal::SIGKILL);
                status = child.wait().ok();
                deadline = Some(Instant::now() + DRAIN_GRACE);
            } else {
                break; // output still held open by stray background processes
            }
        }
    }
    log.sync()?;

    let exit_code = if timed_out {
        None
    } else {
        status.and_then(|s| s.code())
    };
    log.append_synced(Body::DefinitionFinished {
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
    Ok(())
}

fn record_line(
    log: &mut RecordLog,
    mirror: &Mirror,
    definition: &str,
    stream: Stream,
    line: String,
) -> Result<(), RecordError> {
    log.append(Body::Output {
        definition: definition.into(),
        stream,
        line: line.clone(),
    })?;
    mirror.line(ferry_proto::console::mirror_output(&line));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::plan::v1::Param;

    #[test]
    fn long_lines_are_split_not_truncated() {
        let long = "x".repeat(MAX_LINE as usize * 2 + 10);
        let input = format!("short\n{long}\nlast");
        let (tx, rx) = channel();
        read_lines(Stream::Stdout, input.as_bytes(), tx);
        let lines: Vec<String> = rx.into_iter().map(|(_, l)| l).collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0], "short");
        assert_eq!(lines[1..4].concat(), long);
        assert_eq!(lines[4], "last");
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
        };
        let s = script(&def);
        assert!(s.contains("set -e\n"));
        assert!(s.contains("A='it'\\''s $HOME'\nexport A\n"));
        assert!(s.find("echo $A").expect("step") < s.find("false").expect("step"));
    }
}
