//! The platform seam: everything that touches the board's hardware.
//!
//! Block devices, mounts, boot selection and reboot sit behind [`Platform`],
//! with a real Linux implementation and a simulated-board one, so the agent's
//! logic (deploy, install, results) is the same code on both. All methods
//! block; callers run them on blocking threads.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

pub mod linux;
pub mod mountinfo;
pub mod sim;

/// A partition as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Its name (GPT label on a real board).
    pub name: String,
    /// Size in bytes; 0 for a folder on the simulated board.
    pub size: u64,
    /// Images may be written to it.
    pub deployable: bool,
    /// It can be mounted as a filesystem.
    pub mountable: bool,
}

/// A partition opened for writing, with its capacity.
#[derive(Debug)]
pub struct WriteTarget {
    /// The open device (or file).
    pub file: File,
    /// Bytes it can hold.
    pub capacity: u64,
    /// Where it is, for messages.
    pub path: PathBuf,
    /// Test fault (the simulated board's `readback_fault`): the byte at
    /// this offset is flipped after the image is synced and before it is
    /// read back, as failing media would.
    pub readback_fault: Option<u64>,
}

impl WriteTarget {
    /// Makes `len` bytes at `offset` read back as zeros without writing
    /// them: a hole punched in a file (the simulated board), an unmapping
    /// zero-out on a block device (the kernel's `BLKZEROOUT` with unmap,
    /// reached through `fallocate`). `Ok(false)` when the target cannot do
    /// it cheaply (the kernel never falls back to writing zeros here), so
    /// the caller writes the zeros itself.
    ///
    /// # Errors
    /// Any other failure of the call.
    pub fn punch(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(false);
        };
        match fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        ) {
            Ok(()) => Ok(true),
            Err(
                nix::errno::Errno::EOPNOTSUPP
                | nix::errno::Errno::ENOSYS
                | nix::errno::Errno::EINVAL,
            ) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// A fresh filesystem made on a partition, mounted writable.
pub struct NewFilesystem {
    /// Where to fill it; unmounting finishes it.
    pub mounted: Mounted,
    /// The partition's size: the most a rootfs may unpack to.
    pub capacity: u64,
}

/// How a filesystem is made on a partition: the master image's mkfs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MkfsConfig {
    /// The program and its arguments; the device (or file) is appended.
    pub command: Vec<String>,
    /// How long it may run.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for MkfsConfig {
    fn default() -> Self {
        MkfsConfig {
            command: ["mkfs.ext4", "-F", "-q"].map(String::from).to_vec(),
            timeout: Duration::from_secs(600),
        }
    }
}

impl MkfsConfig {
    /// Runs the mkfs command with `extra` arguments on `device`, killing it
    /// at its timeout.
    ///
    /// # Errors
    /// It could not start, failed (its stderr in the message) or timed out.
    pub fn run(&self, extra: &[&OsStr], device: &Path) -> Result<(), PlatformError> {
        let fail = |why: String| PlatformError::Io {
            what: "making a filesystem on",
            path: device.into(),
            source: std::io::Error::other(why),
        };
        let (program, args) = self
            .command
            .split_first()
            .ok_or_else(|| fail("the mkfs command is empty".into()))?;
        let mut child = Command::new(program)
            .args(args)
            .args(extra)
            .arg(device)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("starting {program}: {e}")))?;
        // stderr is read on its own thread so a chatty mkfs cannot block on a full pipe.
        let mut stderr = child.stderr.take();
        let said = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.take(64 << 10).read_to_string(&mut text);
            }
            text
        });
        let deadline = std::time::Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if std::time::Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!(
                        "{program} did not finish within {}",
                        humantime::format_duration(self.timeout)
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(fail(format!("waiting for {program}: {e}"))),
            }
        };
        let said = said.join().unwrap_or_default();
        if status.success() {
            Ok(())
        } else {
            Err(fail(format!("{program} {status}: {}", said.trim())))
        }
    }
}

/// Errors from the platform.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// No partition of that name.
    #[error("no partition named {0:?} on this board")]
    NoSuchPartition(String),
    /// The partition exists but must not be written.
    #[error("partition {name:?} must not be written: {why}")]
    Protected {
        /// The partition.
        name: String,
        /// Why.
        why: String,
    },
    /// More than one partition carries the name (a test image can write a
    /// GPT entry named like the target): which one is meant is unknowable.
    #[error("partition name {name:?} is carried by {} partitions ({}); refusing to guess which is meant", .devices.len(), .devices.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "))]
    DuplicateLabel {
        /// The name.
        name: String,
        /// The devices carrying it.
        devices: Vec<PathBuf>,
    },
    /// What is mounted could not be told, so nothing is written.
    #[error(
        "cannot tell what is mounted from {path}: {why}; refusing to write or mount any partition"
    )]
    MountState {
        /// The mountinfo file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The partition cannot be mounted here.
    #[error("partition {name:?} cannot be mounted: {why}")]
    NotMountable {
        /// The partition.
        name: String,
        /// Why.
        why: String,
    },
    /// An operating-system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl PlatformError {
    /// The same refusal, worded for a mount rather than a write.
    pub fn for_mount(self) -> Self {
        match self {
            PlatformError::Protected { name, why } => PlatformError::NotMountable { name, why },
            e => e,
        }
    }

    /// Wraps an I/O error with what was done and where.
    pub fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| PlatformError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// A mounted filesystem; unmounted on [`Mounted::unmount`] or drop.
pub struct Mounted {
    path: PathBuf,
    unmount: Option<Box<dyn FnOnce() -> Result<(), PlatformError> + Send>>,
}

impl Mounted {
    /// A mount that needs an action to undo.
    pub fn new(
        path: PathBuf,
        unmount: Box<dyn FnOnce() -> Result<(), PlatformError> + Send>,
    ) -> Self {
        Mounted {
            path,
            unmount: Some(unmount),
        }
    }

    /// A folder that is already a filesystem (the simulated board).
    pub fn folder(path: PathBuf) -> Self {
        Mounted {
            path,
            unmount: None,
        }
    }

    /// Where the filesystem is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts, reporting failure (drop only logs it).
    ///
    /// # Errors
    /// When unmounting fails.
    pub fn unmount(mut self) -> Result<(), PlatformError> {
        self.unmount.take().map_or(Ok(()), |f| f())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(f) = self.unmount.take() {
            if let Err(e) = f() {
                tracing::error!("unmounting {}: {e}", self.path.display());
            }
        }
    }
}

/// What the agent needs from a board.
pub trait Platform: Send + Sync + 'static {
    /// "linux" or "sim".
    fn kind(&self) -> &'static str;
    /// Partitions a job may name.
    ///
    /// # Errors
    /// When the board's partitions cannot be listed.
    fn partitions(&self) -> Result<Vec<PartitionInfo>, PlatformError>;
    /// Opens a partition for writing an image, refusing protected ones.
    ///
    /// # Errors
    /// Unknown or protected partition, or an I/O error.
    fn open_for_write(&self, name: &str) -> Result<WriteTarget, PlatformError>;
    /// Opens the boot-selection partition (which jobs may not write).
    ///
    /// # Errors
    /// When it is missing or cannot be opened.
    fn open_boot_flag(&self) -> Result<File, PlatformError>;
    /// Mounts a partition's filesystem.
    ///
    /// # Errors
    /// Unknown or unmountable partition, or the mount failed.
    fn mount(&self, name: &str, writable: bool) -> Result<Mounted, PlatformError>;
    /// Makes a fresh filesystem on a partition that may be written (the
    /// checks of [`Platform::open_for_write`]) and mounts it writable, for
    /// a rootfs tarball to be unpacked into.
    ///
    /// # Errors
    /// As `open_for_write`, or mkfs or the mount failed.
    fn make_filesystem(&self, name: &str) -> Result<NewFilesystem, PlatformError>;
    /// Restarts the board; returns only on failure.
    ///
    /// # Errors
    /// When the reboot could not be started.
    fn reboot(&self) -> Result<(), PlatformError>;
}

/// Writes the boot-once flag naming `partition` and syncs it.
///
/// The master image's init clears the flag before booting the test image, so
/// any later reset (hang, panic, power cut) comes back to the master image.
///
/// # Errors
/// When the flag cannot be written.
pub fn set_boot_once(platform: &dyn Platform, partition: &str) -> Result<(), PlatformError> {
    let mut flag = platform.open_boot_flag()?;
    let path = PathBuf::from("boot flag");
    flag.seek(SeekFrom::Start(0))
        .map_err(PlatformError::io("seeking", &path))?;
    flag.write_all(&ferry_proto::boot::encode(partition))
        .map_err(PlatformError::io("writing", &path))?;
    flag.sync_all().map_err(PlatformError::io("syncing", &path))
}
