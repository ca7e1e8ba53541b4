//! The jobs running on this host, from the device locks: `dispatcher list`
//! and `dispatcher cancel`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::lock::{self, Holder};

/// Why a cancel did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No running job has that job or device name.
    #[error("no running job or device named {0:?} (see `dispatcher list`)")]
    NotFound(String),
    /// The dispatcher could not be signalled.
    #[error("cannot signal dispatcher pid {pid}: {source}")]
    Signal {
        /// Its pid.
        pid: u32,
        /// Why.
        source: nix::errno::Errno,
    },
    /// It was signalled but still runs.
    #[error("dispatcher pid {pid} still runs {waited:?} after SIGTERM")]
    StillRunning {
        /// Its pid.
        pid: u32,
        /// How long we waited.
        waited: Duration,
    },
}

/// The running jobs as a table for people.
pub fn table(jobs: &[Holder]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<20} {:<20} {:<28} {:>8} {:>8}  OUTPUT",
        "JOB", "DEVICE", "PHASE", "ELAPSED", "PID"
    );
    for j in jobs {
        let _ = writeln!(
            s,
            "{:<20} {:<20} {:<28} {:>7}s {:>8}  {}",
            j.job,
            j.device,
            j.phase,
            lock::elapsed(j.since).as_secs(),
            j.pid,
            j.output.display()
        );
    }
    s
}

/// Cancels the running job named `target` (a job or a device name) the way
/// a scheduler does, with SIGTERM: its dispatcher powers the board off and
/// writes its outputs. Waits up to `timeout` for it to finish.
///
/// # Errors
/// When no such job runs, or it does not end in time.
pub async fn cancel(target: &str, timeout: Duration) -> Result<Vec<Holder>, CancelError> {
    let matching: Vec<Holder> = lock::running()
        .into_iter()
        .filter(|h| h.job == target || h.device == target)
        .collect();
    if matching.is_empty() {
        return Err(CancelError::NotFound(target.into()));
    }
    for h in &matching {
        let pid = Pid::from_raw(h.pid as i32);
        kill(pid, Signal::SIGTERM).map_err(|source| CancelError::Signal { pid: h.pid, source })?;
    }
    let started = Instant::now();
    for h in &matching {
        while std::path::Path::new(&format!("/proc/{}", h.pid)).exists() && !zombie(h.pid) {
            if started.elapsed() >= timeout {
                return Err(CancelError::StillRunning {
                    pid: h.pid,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(matching)
}

/// A process that has exited but was not reaped yet (our own child, in tests).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
