//! The simulated board: partitions are files (block devices) or folders
//! (filesystems), and reboot is the process exiting so the simulated board
//! starts the next boot.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    mountinfo, MkfsConfig, Mounted, NewFilesystem, PartitionInfo, Platform, PlatformError,
    WriteTarget,
};

/// One simulated partition.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SimPartition {
    /// A file standing for a block device: images are written to it.
    File(PathBuf),
    /// A folder standing for a mounted filesystem.
    Dir(PathBuf),
}

/// The simulated board's layout.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Partitions by name.
    pub partitions: BTreeMap<String, SimPartition>,
    /// A file in `/proc/self/mountinfo` format standing for the board's
    /// mount table: a partition whose path is a mount's source is mounted,
    /// and is neither written nor mounted again. Read fail-closed like the
    /// real one; without it nothing is mounted.
    #[serde(default)]
    pub mountinfo: Option<PathBuf>,
    /// How a rootfs tarball's filesystem is made: the host's mkfs, run on
    /// the partition file with `-d` (filled from a staging folder).
    #[serde(default)]
    pub mkfs: MkfsConfig,
    /// Test fault: flip the byte at this offset of a deployed image after
    /// it is written and synced, before `verify: readback` reads it.
    #[serde(default)]
    pub readback_fault: Option<u64>,
}

/// The simulated platform.
#[derive(Debug)]
pub struct SimPlatform {
    config: SimConfig,
    boot_flag: String,
}

impl SimPlatform {
    /// A simulated board with these partitions; `boot_flag` names the boot-selection one.
    pub fn new(config: SimConfig, boot_flag: String) -> Self {
        SimPlatform { config, boot_flag }
    }

    fn get(&self, name: &str) -> Result<&SimPartition, PlatformError> {
        self.config
            .partitions
            .get(name)
            .ok_or_else(|| PlatformError::NoSuchPartition(name.into()))
    }

    /// Refuses a partition the simulated mount table says is mounted.
    fn unmounted(&self, name: &str, path: &Path) -> Result<(), PlatformError> {
        let Some(table) = &self.config.mountinfo else {
            return Ok(());
        };
        match mountinfo::read(table)?.iter().find(|m| m.source == path) {
            Some(m) => Err(PlatformError::Protected {
                name: name.into(),
                why: format!("it is mounted at {}", m.mount_point.display()),
            }),
            None => Ok(()),
        }
    }
}

/// Removes a staging folder, read-only folders a tarball made included
/// (the agent here is not root, so their modes would stop the removal).
fn remove_staging(dir: &Path) -> Result<(), PlatformError> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&d) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(PlatformError::io("removing", dir)(e))
        }
        _ => Ok(()),
    }
}

fn open_rw(path: &PathBuf) -> Result<File, PlatformError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(PlatformError::io("opening", path))
}

impl Platform for SimPlatform {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn partitions(&self) -> Result<Vec<PartitionInfo>, PlatformError> {
        self.config
            .partitions
            .iter()
            .map(|(name, p)| {
                Ok(match p {
                    SimPartition::File(path) => PartitionInfo {
                        name: name.clone(),
                        size: std::fs::metadata(path)
                            .map_err(PlatformError::io("reading", path))?
                            .len(),
                        deployable: *name != self.boot_flag,
                        mountable: false,
                    },
                    SimPartition::Dir(_) => PartitionInfo {
                        name: name.clone(),
                        size: 0,
                        deployable: false,
                        mountable: true,
                    },
                })
            })
            .collect()
    }

    fn open_for_write(&self, name: &str) -> Result<WriteTarget, PlatformError> {
        if name == self.boot_flag {
            return Err(PlatformError::Protected {
                name: name.into(),
                why: "it holds the boot selection".into(),
            });
        }
        match self.get(name)? {
            SimPartition::File(path) => {
                self.unmounted(name, path)?;
                let file = open_rw(path)?;
                // A file partition has a fixed size, like a block device.
                let capacity = file
                    .metadata()
                    .map_err(PlatformError::io("reading", path))?
                    .len();
                Ok(WriteTarget {
                    file,
                    capacity,
                    path: path.clone(),
                    readback_fault: self.config.readback_fault,
                })
            }
            SimPartition::Dir(_) => Err(PlatformError::Protected {
                name: name.into(),
                why: "on the simulated board it is a folder, not a block device".into(),
            }),
        }
    }

    fn open_boot_flag(&self) -> Result<File, PlatformError> {
        match self.get(&self.boot_flag)? {
            SimPartition::File(path) => open_rw(path),
            SimPartition::Dir(_) => Err(PlatformError::NotMountable {
                name: self.boot_flag.clone(),
                why: "the boot-selection partition must be a file".into(),
            }),
        }
    }

    fn mount(&self, name: &str, _writable: bool) -> Result<Mounted, PlatformError> {
        match self.get(name)? {
            SimPartition::Dir(path) => {
                self.unmounted(name, path)
                    .map_err(PlatformError::for_mount)?;
                Ok(Mounted::folder(path.clone()))
            }
            SimPartition::File(_) => Err(PlatformError::NotMountable {
                name: name.into(),
                why: "on the simulated board only folder partitions hold filesystems".into(),
            }),
        }
    }

    /// A file partition cannot be mounted without privileges: the tarball
    /// is unpacked into a staging folder beside it, and "unmounting" makes
    /// the filesystem on the file from that folder (`mkfs -d`), then
    /// removes the folder.
    fn make_filesystem(&self, name: &str) -> Result<NewFilesystem, PlatformError> {
        let target = self.open_for_write(name)?;
        let (capacity, file) = (target.capacity, target.path.clone());
        drop(target);
        let staging = PathBuf::from(format!("{}.rootfs", file.display()));
        remove_staging(&staging)?;
        std::fs::create_dir(&staging).map_err(PlatformError::io("creating", &staging))?;
        let mkfs = self.config.mkfs.clone();
        let at = staging.clone();
        let mounted = Mounted::new(
            staging,
            Box::new(move || {
                let made = mkfs.run(&["-d".as_ref(), at.as_os_str()], &file);
                made.and(remove_staging(&at))
            }),
        );
        Ok(NewFilesystem { mounted, capacity })
    }

    fn reboot(&self) -> Result<(), PlatformError> {
        // The simulated board boots again when its OS process ends.
        std::process::exit(0)
    }
}
