//! Running one command for a lab engineer (`dispatcher exec`), Popen-like:
//! stdin streamed in, stdout and stderr streamed out as they come, then the
//! exit status or the signal that ended it.
//!
//! The command runs in its own process group, and the whole group is killed
//! when the command ends, when its timeout passes, or when the client goes
//! away: nothing it started outlives the call (a lab engineer who wants a
//! daemon detaches it with `setsid`).

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Size of the output chunks sent back.
const CHUNK: usize = 32 * 1024;

/// How long the output pipes may stay open once the group is killed (a
/// process that escaped the group could hold them forever).
const DRAIN: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments; the program is looked up on `PATH`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing) the agent's environment.
    pub env: Vec<(String, String)>,
    /// Working folder; the agent's own when absent.
    pub cwd: Option<PathBuf>,
    /// The command's process group is killed after this long.
    pub timeout: Duration,
}

/// A piece of the command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// From its stdout.
    Stdout(Vec<u8>),
    /// From its stderr.
    Stderr(Vec<u8>),
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

/// Why a command did not run to its end; mapped to gRPC codes in `service`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request is unusable (no program, a bad timeout or variable).
    #[error("exec: {0}")]
    Invalid(String),
    /// The program could not be started.
    #[error("exec {program:?}: cannot start: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why (not found, not executable, no such working folder...).
        source: std::io::Error,
    },
    /// The timeout passed: the process group was killed.
    #[error("exec {program:?}: still running after its timeout of {timeout:?}; its process group was killed")]
    TimedOut {
        /// The program.
        program: String,
        /// The timeout.
        timeout: Duration,
    },
    /// Nobody reads the output any more: the process group was killed.
    #[error("exec {program:?}: the client went away; its process group was killed")]
    ClientGone {
        /// The program.
        program: String,
    },
    /// Waiting for the process failed.
    #[error("exec {program:?}: {source}")]
    Wait {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

impl ExecSpec {
    /// Checks a request against the agent's longest allowed timeout.
    ///
    /// # Errors
    /// [`ExecError::Invalid`] naming what is wrong.
    pub fn check(&self, max_timeout: Duration) -> Result<(), ExecError> {
        if self.argv.first().is_none_or(|p| p.is_empty()) {
            return Err(ExecError::Invalid("no program given".into()));
        }
        if self.timeout.is_zero() || self.timeout > max_timeout {
            return Err(ExecError::Invalid(format!(
                "timeout {:?} is not between 0 and this agent's maximum of {max_timeout:?}",
                self.timeout
            )));
        }
        if let Some((k, _)) = self
            .env
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
        {
            return Err(ExecError::Invalid(format!(
                "bad environment variable name or value for {k:?}"
            )));
        }
        Ok(())
    }
}

/// Kills a process group; a group already gone is fine.
fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Copies a pipe into `out` as chunks made by `wrap`.
async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    out: mpsc::Sender<Output>,
    wrap: fn(Vec<u8>) -> Output,
) {
    loop {
        let mut buf = vec![0u8; CHUNK];
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                buf.truncate(n);
                if out.send(wrap(buf)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs `spec`, feeding it what arrives on `stdin` (its stdin closes when
/// the channel does) and sending its output to `out` as it comes.
///
/// # Errors
/// See [`ExecError`]; output sent before an error stays sent.
pub async fn run(
    spec: ExecSpec,
    mut stdin: mpsc::Receiver<Vec<u8>>,
    out: mpsc::Sender<Output>,
) -> Result<Exit, ExecError> {
    let program = spec.argv.first().cloned().unwrap_or_default();
    let mut command = Command::new(&program);
    command
        .args(&spec.argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    // The child leads its own group: its pid is the group id.
    let pgid = child.id();
    let mut child_in = child.stdin.take();
    let feed = async move {
        while let Some(bytes) = stdin.recv().await {
            let Some(pipe) = child_in.as_mut() else { break };
            if pipe.write_all(&bytes).await.is_err() || pipe.flush().await.is_err() {
                break;
            }
        }
        // Dropping the pipe is the command's end of input.
        drop(child_in);
        std::future::pending::<()>().await;
    };
    let pumps = tokio::spawn({
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let out = out.clone();
        async move {
            let o = async {
                if let Some(p) = stdout {
                    pump(p, out.clone(), Output::Stdout).await;
                }
            };
            let e = async {
                if let Some(p) = stderr {
                    pump(p, out.clone(), Output::Stderr).await;
                }
            };
            tokio::join!(o, e);
        }
    });

    let ended = tokio::select! {
        status = child.wait() => Ok(status),
        () = tokio::time::sleep(spec.timeout) => Err(ExecError::TimedOut { program: program.clone(), timeout: spec.timeout }),
        () = out.closed() => Err(ExecError::ClientGone { program: program.clone() }),
        () = feed => unreachable!("feed never ends"),
    };
    // Whatever happened, nothing of the command's group outlives the call.
    kill_group(pgid);
    let status = match ended {
        Ok(status) => status,
        Err(e) => {
            let _ = child.wait().await;
            let _ = tokio::time::timeout(DRAIN, pumps).await;
            return Err(e);
        }
    };
    let status = status.map_err(|source| ExecError::Wait {
        program: program.clone(),
        source,
    })?;
    // Output still in the pipes goes out before the exit status.
    let _ = tokio::time::timeout(DRAIN, pumps).await;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(sig)) => Exit::Signal(sig),
        (None, None) => Exit::Code(-1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str], timeout: Duration) -> ExecSpec {
        ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("FERRY_TEST".into(), "yes".into())],
            cwd: None,
            timeout,
        }
    }

    /// Runs `spec` with `input` on stdin; returns (stdout, stderr, result).
    async fn run_with(spec: ExecSpec, input: &[u8]) -> (String, String, Result<Exit, ExecError>) {
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(4);
        if !input.is_empty() {
            in_tx.send(input.to_vec()).await.expect("stdin");
        }
        drop(in_tx);
        let collect = tokio::spawn(async move {
            let (mut o, mut e) = (Vec::new(), Vec::new());
            while let Some(chunk) = out_rx.recv().await {
                match chunk {
                    Output::Stdout(b) => o.extend(b),
                    Output::Stderr(b) => e.extend(b),
                }
            }
            (o, e)
        });
        let result = run(spec, in_rx, out_tx).await;
        let (o, e) = collect.await.expect("collect");
        (
            String::from_utf8_lossy(&o).into(),
            String::from_utf8_lossy(&e).into(),
            result,
        )
    }

    #[tokio::test]
    async fn output_status_stdin_and_environment() {
        let (o, e, r) = run_with(
            spec(
                &[
                    "sh",
                    "-c",
                    "cat; echo \"env=$FERRY_TEST\"; echo oops >&2; exit 3",
                ],
                Duration::from_secs(10),
            ),
            b"from stdin\n",
        )
        .await;
        assert_eq!(o, "from stdin\nenv=yes\n");
        assert_eq!(e, "oops\n");
        assert_eq!(r.expect("ran"), Exit::Code(3));

        let (_, _, r) = run_with(
            spec(&["sh", "-c", "kill -TERM $$"], Duration::from_secs(10)),
            b"",
        )
        .await;
        assert_eq!(r.expect("ran"), Exit::Signal(15));
    }

    #[tokio::test]
    async fn a_missing_program_or_folder_is_a_spawn_error() {
        let (_, _, r) = run_with(
            spec(
                &["/nonexistent/ferry-no-such-program"],
                Duration::from_secs(5),
            ),
            b"",
        )
        .await;
        assert!(
            matches!(&r, Err(ExecError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound),
            "{r:?}"
        );
        let mut s = spec(&["true"], Duration::from_secs(5));
        s.cwd = Some("/nonexistent/ferry-folder".into());
        assert!(matches!(
            run_with(s, b"").await.2,
            Err(ExecError::Spawn { .. })
        ));
    }

    #[tokio::test]
    async fn the_whole_group_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().expect("tmp");
        let pids = dir.path().join("pids");
        // The shell and a background child both record their pids, then wait.
        let script = format!(
            "sleep 300 & echo $! >> {p}; echo $$ >> {p}; echo started; wait",
            p = pids.display()
        );
        let started = std::time::Instant::now();
        let (o, _, r) = run_with(
            spec(&["sh", "-c", &script], Duration::from_millis(700)),
            b"",
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(o, "started\n", "output before the timeout is kept");
        assert!(matches!(r, Err(ExecError::TimedOut { .. })), "{r:?}");
        let text = std::fs::read_to_string(&pids).expect("pids");
        for pid in text.lines() {
            // SIGKILL is sent by now but acts when the process next runs: on
            // a loaded machine it may still show as running for a moment.
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            loop {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // Gone, or at most a zombie not yet reaped by its dead parent's reaper.
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().next());
                if matches!(state, None | Some("Z")) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "process {pid} still runs 2 s after the timeout: {stat}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    #[tokio::test]
    async fn a_client_that_goes_away_gets_the_group_killed() {
        let (in_tx, in_rx) = mpsc::channel(1);
        let (out_tx, out_rx) = mpsc::channel(1);
        let s = spec(&["sleep", "300"], Duration::from_secs(300));
        let task = tokio::spawn(run(s, in_rx, out_tx));
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(out_rx);
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ended")
            .expect("join");
        assert!(matches!(r, Err(ExecError::ClientGone { .. })), "{r:?}");
        drop(in_tx);
    }

    #[test]
    fn requests_are_checked() {
        let max = Duration::from_secs(60);
        assert!(spec(&["true"], Duration::from_secs(1)).check(max).is_ok());
        for bad in [
            spec(&[], Duration::from_secs(1)),
            spec(&[""], Duration::from_secs(1)),
            spec(&["true"], Duration::ZERO),
            spec(&["true"], Duration::from_secs(61)),
            ExecSpec {
                env: vec![("A=B".into(), "c".into())],
                ..spec(&["true"], Duration::from_secs(1))
            },
        ] {
            assert!(
                matches!(bad.check(max), Err(ExecError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
