//! One job per device: a lock per device name, held for the whole job.
//!
//! The lock is an `flock(2)` on `<run dir>/locks/<device>.lock`, so the
//! kernel releases it on every path, a `kill -9` included. Beside it,
//! `<device>.json` says who holds it (job, pid, phase, output folder) for
//! `dispatcher list` and `dispatcher cancel`; a holder removes it when done,
//! so one found by a new holder was left by a dispatcher that died: it is
//! reported as a stale lock broken.
//!
//! The run dir is `$FERRY_RUN_DIR`, else `/run/ferry` when it can be made,
//! else `$TMPDIR/ferry-<uid>`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Why a device could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock folder or file cannot be used.
    #[error("device lock {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another job holds the device and the caller would not wait.
    #[error("device {device} is busy with {holder}")]
    Busy {
        /// The device.
        device: String,
        /// Who holds it.
        holder: String,
    },
    /// Another job held the device until the deadline.
    #[error("device {device} was still busy with {holder} after {waited:?}")]
    Timeout {
        /// The device.
        device: String,
        /// Who holds it.
        holder: String,
        /// How long this job waited.
        waited: Duration,
    },
}

/// Who holds a device, as `dispatcher list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    /// The device's name.
    pub device: String,
    /// The job's name.
    pub job: String,
    /// The dispatcher's pid.
    pub pid: u32,
    /// The output folder.
    pub output: PathBuf,
    /// When the job took the device (seconds since the Unix epoch).
    pub since: u64,
    /// The job's phase.
    pub phase: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {} (dispatcher pid {})", self.job, self.pid)
    }
}

/// The host's folder for Ferry's run-time state.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_RUN_DIR") {
        return d.into();
    }
    let system = PathBuf::from("/run/ferry");
    if std::fs::create_dir_all(&system).is_ok() {
        return system;
    }
    std::env::temp_dir().join(format!("ferry-{}", nix::unistd::getuid()))
}

fn locks_dir() -> PathBuf {
    run_dir().join("locks")
}

/// A device name as a file name: anything outside `[-_.a-zA-Z0-9]` becomes `_`.
fn file_stem(device: &str) -> String {
    device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_holder(path: &Path) -> Option<Holder> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The claim a dispatcher that died left on a device (its marker): the
/// board may still be on and its output folder without an outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Stale {
    /// What happened, for people.
    pub message: String,
    /// Who held the device.
    pub holder: Holder,
}

/// A held device lock; released when dropped.
pub struct DeviceLock {
    _lock: Flock<File>,
    info: PathBuf,
    holder: Holder,
}

impl DeviceLock {
    fn try_take(device: &str) -> Result<Option<Flock<File>>, LockError> {
        let dir = locks_dir();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(format!("{}.lock", file_stem(device)));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(LockError::Io {
                path,
                source: e.into(),
            }),
        }
    }

    /// Takes the lock of `device` for `job`, waiting until `wait` has passed
    /// (zero: fail at once when busy). Returns the lock and, when a dead
    /// dispatcher left its claim behind, a message saying it was broken.
    ///
    /// # Errors
    /// [`LockError::Busy`] or [`LockError::Timeout`] when another job holds
    /// it; [`LockError::Io`] when the lock folder cannot be used.
    pub async fn acquire(
        device: &str,
        job: &str,
        output: &Path,
        wait: Duration,
    ) -> Result<(Self, Option<Stale>), LockError> {
        let started = std::time::Instant::now();
        let info = locks_dir().join(format!("{}.json", file_stem(device)));
        let lock = loop {
            if let Some(l) = Self::try_take(device)? {
                break l;
            }
            let holder = read_holder(&info).map_or_else(|| "another job".into(), |h| h.to_string());
            if wait.is_zero() {
                return Err(LockError::Busy {
                    device: device.into(),
                    holder,
                });
            }
            if started.elapsed() >= wait {
                return Err(LockError::Timeout {
                    device: device.into(),
                    holder,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let stale = read_holder(&info).map(|h| Stale {
            message: format!(
                "broke a stale lock on device {device}: {h} {} without releasing it",
                if alive(h.pid) {
                    "is gone from the device"
                } else {
                    "died"
                }
            ),
            holder: h,
        });
        let holder = Holder {
            device: device.into(),
            job: job.into(),
            pid: std::process::id(),
            output: std::path::absolute(output).unwrap_or_else(|_| output.into()),
            since: now(),
            phase: "starting".into(),
        };
        let me = DeviceLock {
            _lock: lock,
            info,
            holder,
        };
        me.publish();
        Ok((me, stale))
    }

    /// Takes the lock only if it is free at once.
    pub fn try_now(device: &str) -> Option<Flock<File>> {
        Self::try_take(device).ok().flatten()
    }

    /// Notes the job's phase for `dispatcher list`.
    pub fn set_phase(&mut self, phase: &str) {
        phase.clone_into(&mut self.holder.phase);
        self.publish();
    }

    fn publish(&self) {
        // Atomically, so a reader never sees half of it.
        let tmp = self
            .info
            .with_extension(format!("json.{}", self.holder.pid));
        if let Ok(text) = serde_json::to_vec(&self.holder) {
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &self.info);
            }
        }
    }
}

impl Drop for DeviceLock {
    fn drop(&mut self) {
        // Before the flock goes: a new holder never mistakes us for a dead one.
        let _ = std::fs::remove_file(&self.info);
    }
}

/// The jobs running on this host: every held lock's holder.
pub fn running() -> Vec<Holder> {
    let Ok(entries) = std::fs::read_dir(locks_dir()) else {
        return Vec::new();
    };
    let mut all: Vec<Holder> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| read_holder(&p))
        // A holder removes its claim when done; one whose pid is gone died.
        // (Probing the flock itself would take it for a moment and could turn
        // away a job starting then.)
        .filter(|h| alive(h.pid))
        .collect();
    all.sort_by(|a, b| a.since.cmp(&b.since).then(a.device.cmp(&b.device)));
    all
}

/// How long ago `since` was, for people.
pub fn elapsed(since: u64) -> Duration {
    Duration::from_secs(now().saturating_sub(since))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests share one process and one run dir; each uses its own devices.
    fn dir() {
        static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        DIR.get_or_init(|| {
            let d = tempfile::tempdir().expect("tmp");
            std::env::set_var("FERRY_RUN_DIR", d.path());
            d
        });
    }

    #[tokio::test]
    async fn a_busy_device_fails_at_once_or_after_the_wait_and_is_free_after_drop() {
        dir();
        let out = Path::new("/tmp/out");
        let (held, stale) = DeviceLock::acquire("dev-a", "one", out, Duration::ZERO)
            .await
            .expect("free");
        assert_eq!(stale, None);
        let e = DeviceLock::acquire("dev-a", "two", out, Duration::ZERO)
            .await
            .err()
            .expect("busy");
        assert!(
            matches!(&e, LockError::Busy { holder, .. } if holder.contains("job one")),
            "{e}"
        );
        let e = DeviceLock::acquire("dev-a", "two", out, Duration::from_millis(500))
            .await
            .err()
            .expect("still busy");
        assert!(matches!(e, LockError::Timeout { .. }), "{e}");
        assert!(running()
            .iter()
            .any(|h| h.device == "dev-a" && h.job == "one"));
        drop(held);
        assert!(!running().iter().any(|h| h.device == "dev-a"));
        DeviceLock::acquire("dev-a", "two", out, Duration::ZERO)
            .await
            .expect("free again");
    }

    #[tokio::test]
    async fn a_claim_left_by_a_dead_dispatcher_is_broken_with_a_message() {
        dir();
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let dead = child.id();
        child.wait().expect("wait");
        std::fs::create_dir_all(locks_dir()).expect("dir");
        let left = Holder {
            device: "dev-b".into(),
            job: "crashed".into(),
            pid: dead,
            output: "/tmp/x".into(),
            since: 0,
            phase: "test".into(),
        };
        std::fs::write(
            locks_dir().join("dev-b.json"),
            serde_json::to_vec(&left).expect("json"),
        )
        .expect("write");
        let (_held, stale) =
            DeviceLock::acquire("dev-b", "next", Path::new("/tmp"), Duration::ZERO)
                .await
                .expect("a dead holder holds nothing");
        let stale = stale.expect("reported").message;
        assert!(
            stale.contains("job crashed") && stale.contains("died"),
            "{stale}"
        );
    }
}
