//! The test partition's write cache: what a test boot wrote to its rootfs
//! and never synced is lost when the board is hard reset or its power is
//! cut, as on a real board, so a missing `fsync` shows up as lost data (a
//! lost record) instead of surviving by luck of the host's page cache.
//!
//! The model: at the start of a test boot, every file of the partition is
//! durable at its size. The test OS runs under `strace` (seccomp-filtered,
//! so only the sync calls stop it; attached to the OS's init, not its
//! parent), which reports each `fsync`,
//! `fdatasync`, `sync_file_range`, `sync` and `syncfs`; a file synced is
//! durable at its size when the report is read (`sync`/`syncfs`: every
//! file). On a reset or power cut the partition is rolled back: a file is
//! cut to its durable size, and one created in this boot and never synced
//! is removed. A clean reboot keeps everything (the OS syncs on its way
//! down). What it does not model: overwrites inside a file's durable part
//! (only appends are rolled back), deleted or renamed files (they stay
//! deleted or renamed), directory syncs (a synced file's name is taken as
//! durable with it), and a write racing its own sync (it counts as synced).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// Longest wait for strace to attach to the test OS.
const ATTACH: Duration = Duration::from_secs(5);

fn strace() -> Option<&'static Path> {
    ["/usr/bin/strace", "/bin/strace"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
}

/// Longest wait for strace's last reports once the OS is killed.
const DRAIN: Duration = Duration::from_secs(2);

/// Durable sizes of the partition's files.
#[derive(Debug, Default)]
struct State {
    /// Files as they were when the boot started.
    at_boot: HashMap<PathBuf, u64>,
    /// Durable size of each file synced in this boot.
    synced: HashMap<PathBuf, u64>,
}

/// One test boot's view of its partition.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    state: Arc<Mutex<State>>,
    /// Ends when strace's report does (the traced OS is gone): every sync
    /// that returned has been read.
    drained: Arc<Mutex<Option<Receiver<()>>>>,
}

/// The system calls that make data durable.
const SYNC_CALLS: &str = "fsync,fdatasync,sync_file_range,sync,syncfs";

fn files(root: &Path) -> HashMap<PathBuf, u64> {
    let mut out = HashMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                dirs.push(e.path());
            } else if meta.is_file() {
                out.insert(e.path(), meta.len());
            }
        }
    }
    out
}

impl Cache {
    /// Starts a boot on the partition at `root`: everything there is durable.
    pub fn start(root: &Path) -> Self {
        Cache {
            root: root.to_path_buf(),
            state: Arc::new(Mutex::new(State {
                at_boot: files(root),
                synced: HashMap::new(),
            })),
            drained: Arc::new(Mutex::new(None)),
        }
    }

    /// Whether `strace` is installed (without it, no model: a boot then
    /// runs as before, and says so on the console).
    pub fn available(&self) -> bool {
        strace().is_some()
    }

    /// Traces process `pid` (stopped, so nothing runs untraced) and every
    /// process it starts, reading strace's report from a FIFO at `report`.
    /// strace is not the OS's parent: the OS's end is still the reboot,
    /// whatever background processes it left (strace would wait for them).
    ///
    /// # Errors
    /// When the FIFO or strace cannot be started, or strace does not
    /// attach within 5 s.
    pub fn attach(&self, pid: Pid, report: &Path) -> Result<(), String> {
        let strace = strace().ok_or("strace not found")?;
        // Stopped first: continued before its own stop, it would stop for good.
        let deadline = Instant::now() + ATTACH;
        while crate::supervisor::stat_field(pid, 3).as_deref() != Some("T") {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the test OS ({pid}) did not stop within {ATTACH:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = std::fs::remove_file(report);
        nix::unistd::mkfifo(report, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| format!("{}: {e}", report.display()))?;
        let cache = self.clone();
        let (done, drained) = channel::<()>();
        if let Ok(mut d) = self.drained.lock() {
            *d = Some(drained);
        }
        let fifo = report.to_path_buf();
        std::thread::spawn(move || {
            let _done = done;
            // Opening blocks until strace opens its end.
            let Ok(f) = std::fs::File::open(&fifo) else {
                return;
            };
            let _ = std::fs::remove_file(&fifo);
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                cache.reported(&line);
            }
        });
        Command::new(strace)
            .args([
                "-f",
                "--seccomp-bpf",
                "-qq",
                "-e",
                "signal=none",
                "-y",
                "-e",
            ])
            .arg(format!("trace={SYNC_CALLS}"))
            .arg("-o")
            .arg(report)
            .arg("-p")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("strace: {e}"))?;
        let deadline = Instant::now() + ATTACH;
        while Instant::now() < deadline {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let tracer = status
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .map(str::trim);
            if tracer.is_some_and(|t| t != "0") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(format!("strace did not attach to {pid} within {ATTACH:?}"))
    }

    /// Reads one line of strace's report.
    fn reported(&self, line: &str) {
        // `1234 fdatasync(5</path/file>) = 0`, `1234 sync() = 0`, or an
        // `<unfinished ...>` half of one (taken at entry: lenient).
        let call = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.split('(').next())
            .unwrap_or_default();
        match call {
            "sync" | "syncfs" => {
                let now = files(&self.root);
                if let Ok(mut s) = self.state.lock() {
                    s.synced.extend(now);
                }
            }
            "fsync" | "fdatasync" | "sync_file_range" => {
                let Some(path) = line
                    .split_once('<')
                    .and_then(|(_, rest)| rest.split_once('>'))
                    .map(|(p, _)| PathBuf::from(p))
                else {
                    return;
                };
                if !path.starts_with(&self.root) {
                    return;
                }
                if let Ok(meta) = std::fs::metadata(&path) {
                    if let Ok(mut s) = self.state.lock() {
                        s.synced.insert(path, meta.len());
                    }
                }
            }
            _ => {}
        }
    }

    /// The board lost power or was reset: undoes what was never synced.
    /// Returns what was lost, one line per file, for the board's console.
    pub fn lose_unsynced(&self) -> Vec<String> {
        // Every sync that returned before the OS died counts: read the
        // report to its end first.
        if let Some(d) = self.drained.lock().ok().and_then(|mut d| d.take()) {
            let _ = d.recv_timeout(DRAIN);
        }
        let Ok(s) = self.state.lock() else {
            return Vec::new();
        };
        let mut lost = Vec::new();
        for (path, size) in files(&self.root) {
            let durable = s.synced.get(&path).or_else(|| s.at_boot.get(&path));
            match durable {
                None => {
                    if std::fs::remove_file(&path).is_ok() {
                        lost.push(format!("{} (never synced: gone)", path.display()));
                    }
                }
                Some(&d) if size > d => {
                    let cut = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(d));
                    if cut.is_ok() {
                        lost.push(format!("{} ({} unsynced bytes)", path.display(), size - d));
                    }
                }
                Some(_) => {}
            }
        }
        lost.sort();
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_keeps_synced_data_and_loses_the_rest() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        std::fs::write(root.join("old"), b"before the boot").expect("old");
        let cache = Cache::start(root);
        std::fs::write(root.join("old"), b"before the boot, and after").expect("append");
        std::fs::write(root.join("synced"), b"durable").expect("synced");
        cache.reported(&format!(
            "99 fdatasync(3<{}>) = 0",
            root.join("synced").display()
        ));
        std::fs::write(root.join("synced"), b"durable, then not").expect("more");
        std::fs::write(root.join("new"), b"never synced").expect("new");
        let lost = cache.lose_unsynced();
        assert_eq!(lost.len(), 3, "{lost:?}");
        assert_eq!(
            std::fs::read(root.join("old")).expect("old"),
            b"before the boot"
        );
        assert_eq!(
            std::fs::read(root.join("synced")).expect("synced"),
            b"durable"
        );
        assert!(!root.join("new").exists());
    }

    #[test]
    fn sync_makes_everything_durable() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        let cache = Cache::start(root);
        std::fs::write(root.join("a"), b"a").expect("a");
        cache.reported("7 sync() = 0");
        assert!(cache.lose_unsynced().is_empty());
        assert_eq!(std::fs::read(root.join("a")).expect("a"), b"a");
    }
}
