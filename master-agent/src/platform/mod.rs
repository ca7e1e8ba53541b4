//! The platform seam: everything that touches the board's hardware.
//!
//! Block devices, mounts, boot selection and reboot sit behind [`Platform`],
//! with a real Linux implementation and a simulated-board one, so the agent's
//! logic (deploy, install, results) is the same code on both. All methods
//! block; callers run them on blocking threads.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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
