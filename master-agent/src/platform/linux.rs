//! A real Linux board: GPT partitions found by label through sysfs, ext4
//! mounts, and reboot(2).
//!
//! The disk is shared with test images, which run as root and may rewrite
//! the partition table: a label carried by two partitions is refused, what
//! is mounted is read fail-closed, and block devices are opened with
//! `O_EXCL`, which the kernel refuses while anything else (a mount, a
//! device mapper, another exclusive opener) holds the device.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount, MsFlags};
use serde::Deserialize;

use super::mountinfo::{self, Mount};
use super::{
    MkfsConfig, Mounted, NewFilesystem, PartitionInfo, Platform, PlatformError, WriteTarget,
};

/// Settings of the Linux platform.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LinuxConfig {
    /// Filesystem type of test rootfs partitions.
    pub fstype: String,
    /// Where partitions get mounted.
    pub mount_root: PathBuf,
    /// Where block devices are listed.
    pub sysfs_block: PathBuf,
    /// Where device nodes are.
    pub dev: PathBuf,
    /// What is mounted (read fail-closed before every write or mount).
    pub mountinfo: PathBuf,
    /// How a rootfs tarball's filesystem is made.
    pub mkfs: MkfsConfig,
}

impl Default for LinuxConfig {
    fn default() -> Self {
        LinuxConfig {
            fstype: "ext4".into(),
            mount_root: "/run/ferry/mnt".into(),
            sysfs_block: "/sys/class/block".into(),
            dev: "/dev".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            mkfs: MkfsConfig::default(),
        }
    }
}

/// The Linux platform.
#[derive(Debug)]
pub struct LinuxPlatform {
    config: LinuxConfig,
    boot_flag: String,
}

/// A partition found in sysfs.
#[derive(Debug)]
struct Found {
    name: String,
    node: PathBuf,
    size: u64,
    majmin: String,
}

impl LinuxPlatform {
    /// A Linux board; `boot_flag` names the boot-selection partition.
    pub fn new(config: LinuxConfig, boot_flag: String) -> Self {
        LinuxPlatform { config, boot_flag }
    }

    /// Partitions with a GPT name, from `/sys/class/block/*/uevent`.
    fn scan(&self) -> Result<Vec<Found>, PlatformError> {
        let dir = &self.config.sysfs_block;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(PlatformError::io("listing", dir))? {
            let entry = entry.map_err(PlatformError::io("listing", dir))?;
            let base = entry.path();
            if !base.join("partition").exists() {
                continue; // whole disks are never targets
            }
            let Ok(uevent) = std::fs::read_to_string(base.join("uevent")) else {
                continue;
            };
            let field = |k: &str| {
                uevent
                    .lines()
                    .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                    .map(str::to_string)
            };
            let (Some(devname), Some(name)) = (field("DEVNAME"), field("PARTNAME")) else {
                continue;
            };
            let sectors: u64 = std::fs::read_to_string(base.join("size"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            let majmin = std::fs::read_to_string(base.join("dev"))
                .unwrap_or_default()
                .trim()
                .to_string();
            found.push(Found {
                name,
                node: self.config.dev.join(devname),
                size: sectors * 512,
                majmin,
            });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// The one partition carrying `name`.
    fn find(&self, name: &str) -> Result<Found, PlatformError> {
        let mut matching: Vec<Found> = self
            .scan()?
            .into_iter()
            .filter(|f| f.name == name)
            .collect();
        match matching.len() {
            0 => Err(PlatformError::NoSuchPartition(name.into())),
            1 => Ok(matching.remove(0)),
            _ => Err(PlatformError::DuplicateLabel {
                name: name.into(),
                devices: matching.into_iter().map(|f| f.node).collect(),
            }),
        }
    }

    /// Why a partition must not be written or mounted, if it must not.
    fn protection(&self, part: &Found, mounts: &[Mount]) -> Option<String> {
        if part.name == self.boot_flag {
            return Some("it holds the boot selection".into());
        }
        // A mounted partition backs the running system (or someone's data).
        mounts
            .iter()
            .find(|m| m.majmin == part.majmin)
            .map(|m| format!("it is mounted at {}", m.mount_point.display()))
    }

    /// The partition `name`, if it exists once and nothing protects it.
    fn usable(&self, name: &str) -> Result<Found, PlatformError> {
        let part = self.find(name)?;
        let mounts = mountinfo::read(&self.config.mountinfo)?;
        match self.protection(&part, &mounts) {
            Some(why) => Err(PlatformError::Protected {
                name: name.into(),
                why,
            }),
            None => Ok(part),
        }
    }

    /// Opens a block device for writing, exclusively: the kernel refuses
    /// with `EBUSY` while it is mounted or otherwise claimed.
    fn open_device(name: &str, node: &Path) -> Result<File, PlatformError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
            .open(node)
            .map_err(|source| {
                if source.raw_os_error() == Some(nix::libc::EBUSY) {
                    PlatformError::Protected {
                        name: name.into(),
                        why: format!(
                            "{} is in use (mounted or claimed by someone else: exclusive open refused)",
                            node.display()
                        ),
                    }
                } else {
                    PlatformError::Io {
                        what: "opening",
                        path: node.into(),
                        source,
                    }
                }
            })?;
        let meta = file
            .metadata()
            .map_err(PlatformError::io("reading", node))?;
        if !meta.file_type().is_block_device() {
            return Err(PlatformError::Io {
                what: "checking",
                path: node.into(),
                source: std::io::Error::other("not a block device"),
            });
        }
        Ok(file)
    }
}

impl Platform for LinuxPlatform {
    fn kind(&self) -> &'static str {
        "linux"
    }

    fn partitions(&self) -> Result<Vec<PartitionInfo>, PlatformError> {
        let found = self.scan()?;
        // Listing is informational: unknown mount state lists nothing as writable.
        let mounts = mountinfo::read(&self.config.mountinfo).ok();
        let labels = |name: &str| found.iter().filter(|f| f.name == name).count();
        Ok(found
            .iter()
            .map(|f| {
                let deployable = labels(&f.name) == 1
                    && mounts
                        .as_ref()
                        .is_some_and(|m| self.protection(f, m).is_none());
                PartitionInfo {
                    name: f.name.clone(),
                    size: f.size,
                    deployable,
                    mountable: deployable,
                }
            })
            .collect())
    }

    fn open_for_write(&self, name: &str) -> Result<WriteTarget, PlatformError> {
        let part = self.usable(name)?;
        let file = Self::open_device(name, &part.node)?;
        Ok(WriteTarget {
            file,
            capacity: part.size,
            path: part.node,
            readback_fault: None,
        })
    }

    fn open_boot_flag(&self) -> Result<File, PlatformError> {
        Self::open_device(&self.boot_flag, &self.find(&self.boot_flag)?.node)
    }

    fn mount(&self, name: &str, writable: bool) -> Result<Mounted, PlatformError> {
        let part = self.usable(name).map_err(PlatformError::for_mount)?;
        let target = self.config.mount_root.join(name);
        std::fs::create_dir_all(&target).map_err(PlatformError::io("creating", &target))?;
        let flags = if writable {
            MsFlags::empty()
        } else {
            MsFlags::MS_RDONLY
        };
        // Hostile test images must not get device nodes or setuid binaries run by us.
        let flags = flags | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        mount(
            Some(&part.node),
            &target,
            Some(self.config.fstype.as_str()),
            flags,
            None::<&str>,
        )
        .map_err(|e| PlatformError::Io {
            what: "mounting",
            path: part.node.clone(),
            source: e.into(),
        })?;
        let at = target.clone();
        Ok(Mounted::new(
            target,
            Box::new(move || {
                nix::unistd::sync();
                umount(&at).map_err(|e| PlatformError::Io {
                    what: "unmounting",
                    path: at.clone(),
                    source: e.into(),
                })
            }),
        ))
    }

    fn make_filesystem(&self, name: &str) -> Result<NewFilesystem, PlatformError> {
        // The same checks as a write; the exclusive open is closed again
        // before mkfs, which opens the device exclusively itself.
        let target = self.open_for_write(name)?;
        let (capacity, node) = (target.capacity, target.path.clone());
        drop(target);
        self.config.mkfs.run(&[], &node)?;
        let mounted = self.mount(name, true)?;
        Ok(NewFilesystem { mounted, capacity })
    }

    fn reboot(&self) -> Result<(), PlatformError> {
        nix::unistd::sync();
        let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        Err(PlatformError::Io {
            what: "rebooting",
            path: "/".into(),
            source: std::io::Error::other(format!("{e:?}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs, /dev and mountinfo: the platform reads only these.
    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new() -> Self {
            let f = Fake {
                dir: tempfile::tempdir().expect("tempdir"),
            };
            std::fs::create_dir_all(f.dir.path().join("dev")).expect("mkdir");
            f.mountinfo("22 1 254:0 / / rw - ext4 /dev/vda rw\n");
            f
        }

        /// A block device `dev` (a partition when `part` names it) whose
        /// node holds 4 KiB of `0xee`.
        fn add(&self, dev: &str, part: Option<&str>, majmin: &str) {
            let d = self.dir.path().join("block").join(dev);
            std::fs::create_dir_all(&d).expect("mkdir");
            let mut uevent = format!("MAJOR=254\nDEVNAME={dev}\nDEVTYPE=partition\n");
            if let Some(p) = part {
                uevent.push_str(&format!("PARTNAME={p}\n"));
                std::fs::write(d.join("partition"), "1").expect("w");
            }
            std::fs::write(d.join("uevent"), uevent).expect("w");
            std::fs::write(d.join("size"), "8\n").expect("w");
            std::fs::write(d.join("dev"), format!("{majmin}\n")).expect("w");
            std::fs::write(self.node(dev), [0xee; 4096]).expect("w");
        }

        fn node(&self, dev: &str) -> PathBuf {
            self.dir.path().join("dev").join(dev)
        }

        fn mountinfo(&self, text: &str) {
            std::fs::write(self.dir.path().join("mountinfo"), text).expect("w");
        }

        fn platform(&self) -> LinuxPlatform {
            LinuxPlatform::new(
                LinuxConfig {
                    sysfs_block: self.dir.path().join("block"),
                    dev: self.dir.path().join("dev"),
                    mountinfo: self.dir.path().join("mountinfo"),
                    ..LinuxConfig::default()
                },
                "bootsel".into(),
            )
        }

        fn untouched(&self, dev: &str) -> bool {
            std::fs::read(self.node(dev)).expect("read") == [0xee; 4096]
        }
    }

    #[test]
    fn finds_partitions_by_gpt_name_and_skips_disks() {
        let f = Fake::new();
        f.add("vda", None, "254:0");
        f.add("vda1", Some("bootsel"), "254:1");
        f.add("vda2", Some("testrootfs"), "254:2");
        let p = f.platform();
        let parts = p.partitions().expect("scan");
        let names: Vec<_> = parts
            .iter()
            .map(|p| (p.name.as_str(), p.size, p.deployable))
            .collect();
        assert_eq!(
            names,
            vec![("bootsel", 8 * 512, false), ("testrootfs", 8 * 512, true)]
        );
        assert!(matches!(
            p.open_for_write("bootsel"),
            Err(PlatformError::Protected { .. })
        ));
        assert!(matches!(
            p.open_for_write("nope"),
            Err(PlatformError::NoSuchPartition(_))
        ));
        // Past every check, a regular file is still not a block device.
        assert!(matches!(
            p.open_for_write("testrootfs"),
            Err(PlatformError::Io {
                what: "checking",
                ..
            })
        ));
        assert!(f.untouched("vda1") && f.untouched("vda2"));
    }

    #[test]
    fn a_second_partition_named_like_the_target_is_refused() {
        let f = Fake::new();
        f.add("vda2", Some("testrootfs"), "254:2");
        // Planted by a test image: same GPT name on another partition.
        f.add("vda3", Some("testrootfs"), "254:3");
        let p = f.platform();
        let e = p.open_for_write("testrootfs").expect_err("duplicate");
        assert!(
            matches!(&e, PlatformError::DuplicateLabel { devices, .. } if devices.len() == 2),
            "{e}"
        );
        assert!(matches!(
            p.mount("testrootfs", true),
            Err(PlatformError::DuplicateLabel { .. })
        ));
        assert!(p.partitions().expect("scan").iter().all(|x| !x.deployable));
        assert!(f.untouched("vda2") && f.untouched("vda3"));
    }

    #[test]
    fn mount_state_is_read_fail_closed() {
        let f = Fake::new();
        f.add("vda2", Some("testrootfs"), "254:2");
        let p = f.platform();
        f.mountinfo(
            "22 1 254:0 / / rw - ext4 /dev/vda rw\n31 22 254:2 / /srv rw - ext4 /dev/vda2 rw\n",
        );
        let e = p.open_for_write("testrootfs").expect_err("mounted");
        assert!(
            matches!(&e, PlatformError::Protected { why, .. } if why.contains("/srv")),
            "{e}"
        );
        assert!(matches!(
            p.mount("testrootfs", false),
            Err(PlatformError::NotMountable { .. })
        ));
        for table in [Some("not a mount table\n"), Some(""), None] {
            match table {
                Some(t) => f.mountinfo(t),
                None => std::fs::remove_file(f.dir.path().join("mountinfo")).expect("rm"),
            }
            let e = p.open_for_write("testrootfs").expect_err("unknown state");
            assert!(
                matches!(e, PlatformError::MountState { .. }),
                "{table:?}: {e}"
            );
            assert!(matches!(
                p.mount("testrootfs", false),
                Err(PlatformError::MountState { .. })
            ));
            assert!(!p.partitions().expect("scan")[0].deployable);
        }
        assert!(f.untouched("vda2"));
    }
}
