//! A real Linux board: GPT partitions found by label through sysfs, ext4
//! mounts, and reboot(2).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount, MsFlags};
use serde::Deserialize;

use super::{Mounted, PartitionInfo, Platform, PlatformError, WriteTarget};

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
}

impl Default for LinuxConfig {
    fn default() -> Self {
        LinuxConfig {
            fstype: "ext4".into(),
            mount_root: "/run/ferry/mnt".into(),
            sysfs_block: "/sys/class/block".into(),
            dev: "/dev".into(),
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

    fn find(&self, name: &str) -> Result<Found, PlatformError> {
        self.scan()?
            .into_iter()
            .find(|f| f.name == name)
            .ok_or_else(|| PlatformError::NoSuchPartition(name.into()))
    }

    /// Why a partition must not be written, if it must not.
    fn protection(&self, part: &Found) -> Option<String> {
        if part.name == self.boot_flag {
            return Some("it holds the boot selection".into());
        }
        // A mounted partition backs the running system (or someone's data).
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounted = mountinfo
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some(part.majmin.as_str()));
        mounted.then(|| "it is mounted by the running system".into())
    }

    fn open_device(node: &Path) -> Result<File, PlatformError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(node)
            .map_err(PlatformError::io("opening", node))?;
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
        Ok(self
            .scan()?
            .into_iter()
            .map(|f| {
                let deployable = self.protection(&f).is_none();
                PartitionInfo {
                    name: f.name,
                    size: f.size,
                    deployable,
                    mountable: deployable,
                }
            })
            .collect())
    }

    fn open_for_write(&self, name: &str) -> Result<WriteTarget, PlatformError> {
        let part = self.find(name)?;
        if let Some(why) = self.protection(&part) {
            return Err(PlatformError::Protected {
                name: name.into(),
                why,
            });
        }
        let file = Self::open_device(&part.node)?;
        Ok(WriteTarget {
            file,
            capacity: part.size,
            path: part.node,
        })
    }

    fn open_boot_flag(&self) -> Result<File, PlatformError> {
        Self::open_device(&self.find(&self.boot_flag)?.node)
    }

    fn mount(&self, name: &str, writable: bool) -> Result<Mounted, PlatformError> {
        let part = self.find(name)?;
        if let Some(why) = self.protection(&part) {
            return Err(PlatformError::NotMountable {
                name: name.into(),
                why,
            });
        }
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

    /// A fake sysfs: the scan logic reads only these files.
    #[test]
    fn finds_partitions_by_gpt_name_and_skips_disks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().join("block");
        let mk = |dev: &str, part: Option<&str>, sectors: u64| {
            let d = sys.join(dev);
            std::fs::create_dir_all(&d).expect("mkdir");
            let mut uevent = format!("MAJOR=254\nDEVNAME={dev}\nDEVTYPE=partition\n");
            if let Some(p) = part {
                uevent.push_str(&format!("PARTNAME={p}\n"));
                std::fs::write(d.join("partition"), "1").expect("w");
            }
            std::fs::write(d.join("uevent"), uevent).expect("w");
            std::fs::write(d.join("size"), format!("{sectors}\n")).expect("w");
            std::fs::write(d.join("dev"), "254:1\n").expect("w");
        };
        mk("vda", None, 100_000);
        mk("vda1", Some("bootsel"), 2048);
        mk("vda2", Some("testrootfs"), 81920);
        let p = LinuxPlatform::new(
            LinuxConfig {
                sysfs_block: sys,
                dev: dir.path().join("dev"),
                ..LinuxConfig::default()
            },
            "bootsel".into(),
        );
        let parts = p.partitions().expect("scan");
        let names: Vec<_> = parts
            .iter()
            .map(|p| (p.name.as_str(), p.size, p.deployable))
            .collect();
        assert_eq!(
            names,
            vec![
                ("bootsel", 2048 * 512, false),
                ("testrootfs", 81920 * 512, true)
            ]
        );
        assert!(matches!(
            p.open_for_write("bootsel"),
            Err(PlatformError::Protected { .. })
        ));
        assert!(matches!(
            p.open_for_write("nope"),
            Err(PlatformError::NoSuchPartition(_))
        ));
    }
}
