//! Installing the test side on a test rootfs: the bundled test agent, the
//! job's plan, and a hook into the test image's boot.
//!
//! The test rootfs is hostile: it was deployed by a job and may hold
//! symlinks pointing anywhere. Every path is opened through `cap-std`, which
//! resolves symlinks inside the rootfs and refuses to leave it, and the
//! bundle is unpacked entry by entry with only plain relative paths allowed.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, Permissions};
use ferry_proto::record::{FERRY_DIR, PLAN_FILE};
use std::os::unix::fs::PermissionsExt;

/// How the test agent was hooked into the test image's boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootHook {
    /// `/etc/init.d/S99ferry-test-agent`, run by busybox-style `rcS`.
    Sysvinit,
    /// A systemd unit wanted by `multi-user.target`.
    Systemd,
}

impl BootHook {
    /// Its name in replies.
    pub fn as_str(self) -> &'static str {
        match self {
            BootHook::Sysvinit => "sysvinit",
            BootHook::Systemd => "systemd",
        }
    }
}

/// Why the install failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The bundled tarball could not be read.
    #[error("test-agent bundle {path}: {source}")]
    Bundle {
        /// The bundle.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bundle holds an entry that could escape or is not plain.
    #[error("test-agent bundle entry {entry:?} refused: {why}")]
    Hostile {
        /// The entry's path.
        entry: String,
        /// Why.
        why: &'static str,
    },
    /// The bundle is for another version.
    #[error("bundled test agent is version {found}, the master agent is {expected}")]
    Version {
        /// What the bundle says.
        found: String,
        /// This agent's version.
        expected: String,
    },
    /// Writing into the rootfs failed (including a path that would leave it).
    #[error("test rootfs {path}: {source}")]
    Rootfs {
        /// Path inside the rootfs.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn rootfs_err(path: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.into();
    move |source| InstallError::Rootfs { path, source }
}

/// What was installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The test agent's version.
    pub version: String,
    /// The boot hook used.
    pub hook: BootHook,
}

/// Checks an archive path: relative, plain components only.
fn plain(path: &Path, entry: &str) -> Result<PathBuf, InstallError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(InstallError::Hostile {
                    entry: entry.into(),
                    why: "not a plain relative path",
                })
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(InstallError::Hostile {
            entry: entry.into(),
            why: "empty path",
        });
    }
    Ok(out)
}

/// Unpacks a gzip'd tarball into `root`, never outside it.
///
/// # Errors
/// Any entry that is not a plain file, folder or relative in-tree symlink;
/// any write that would leave `root`.
pub fn unpack(root: &Dir, gz: impl Read) -> Result<(), InstallError> {
    let bundle_err = |source| InstallError::Bundle {
        path: "bundle".into(),
        source,
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    for entry in archive.entries().map_err(bundle_err)? {
        let mut entry = entry.map_err(bundle_err)?;
        let raw = entry.path().map_err(bundle_err)?.into_owned();
        let name = raw.display().to_string();
        let path = plain(&raw, &name)?;
        let mode = entry.header().mode().map_err(bundle_err)? & 0o777;
        match entry.header().entry_type() {
            tar::EntryType::Directory => root.create_dir_all(&path).map_err(rootfs_err(&name))?,
            tar::EntryType::Regular => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    root.create_dir_all(parent).map_err(rootfs_err(&name))?;
                }
                // Replace, never write through, whatever is there (a symlink, say).
                let _ = root.remove_file(&path);
                let mut opts = OpenOptions::new();
                opts.write(true).create_new(true);
                let mut file = root.open_with(&path, &opts).map_err(rootfs_err(&name))?;
                std::io::copy(&mut entry, &mut file).map_err(rootfs_err(&name))?;
                file.set_permissions(Permissions::from_std(std::fs::Permissions::from_mode(mode)))
                    .map_err(rootfs_err(&name))?;
            }
            tar::EntryType::Symlink => {
                let target =
                    entry
                        .link_name()
                        .map_err(bundle_err)?
                        .ok_or(InstallError::Hostile {
                            entry: name.clone(),
                            why: "symlink without a target",
                        })?;
                // Only a sibling name: nothing that could point out of the tree.
                if target.components().count() != 1
                    || !matches!(target.components().next(), Some(Component::Normal(_)))
                {
                    return Err(InstallError::Hostile {
                        entry: name,
                        why: "symlink target must be a sibling name",
                    });
                }
                let _ = root.remove_file(&path);
                root.symlink(&target, &path).map_err(rootfs_err(&name))?;
            }
            _ => {
                return Err(InstallError::Hostile {
                    entry: name,
                    why: "only files, folders and symlinks are allowed",
                })
            }
        }
    }
    Ok(())
}

/// Reads `ferry/VERSION` out of a bundle without unpacking it.
///
/// # Errors
/// When the bundle cannot be read or has no version.
pub fn bundle_version(bundle: &Path) -> Result<String, InstallError> {
    let err = |source| InstallError::Bundle {
        path: bundle.into(),
        source,
    };
    let file = std::fs::File::open(bundle).map_err(err)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        if entry.path().map_err(err)?.as_ref() == Path::new("ferry/VERSION") {
            let mut v = String::new();
            entry.read_to_string(&mut v).map_err(err)?;
            return Ok(v.trim().to_string());
        }
    }
    Err(err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "no ferry/VERSION in bundle",
    )))
}

const SYSV_HOOK: &str = "etc/init.d/S99ferry-test-agent";
const SYSV_SCRIPT: &str = r#"#!/bin/sh
# Installed by ferry's master agent: runs the job's test plan, then reboots.
# The simulated board sets FERRY_ROOT, FERRY_REBOOT and FERRY_KMSG (its own
# kernel log, never the host's); a real board uses the defaults.
case "${1:-start}" in start) ;; *) exit 0 ;; esac
root="${FERRY_ROOT:-/}"
kmsg="${FERRY_KMSG-/dev/kmsg}"
exec "$root/ferry/bin/test-agent" run --root "$root" --reboot "${FERRY_REBOOT:-system}" ${kmsg:+--kmsg "$kmsg"}
"#;
const SYSTEMD_UNIT: &str = "etc/systemd/system/ferry-test-agent.service";
const SYSTEMD_WANTS: &str = "etc/systemd/system/multi-user.target.wants/ferry-test-agent.service";
const SYSTEMD_TEXT: &str = "[Unit]
Description=Ferry test agent (runs the job's tests, then reboots)
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/ferry/bin/test-agent run --root / --reboot system --kmsg /dev/kmsg
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

fn write_file(root: &Dir, path: &str, text: &str, mode: u32) -> Result<(), InstallError> {
    if let Some(parent) = Path::new(path).parent() {
        root.create_dir_all(parent).map_err(rootfs_err(path))?;
    }
    let _ = root.remove_file(path);
    root.write(path, text).map_err(rootfs_err(path))?;
    root.set_permissions(
        path,
        Permissions::from_std(std::fs::Permissions::from_mode(mode)),
    )
    .map_err(rootfs_err(path))
}

fn hook(root: &Dir) -> Result<BootHook, InstallError> {
    let systemd = ["lib/systemd/systemd", "usr/lib/systemd/systemd"]
        .iter()
        .any(|p| root.exists(p));
    if systemd {
        write_file(root, SYSTEMD_UNIT, SYSTEMD_TEXT, 0o644)?;
        let wants = Path::new(SYSTEMD_WANTS);
        if let Some(parent) = wants.parent() {
            root.create_dir_all(parent)
                .map_err(rootfs_err(SYSTEMD_WANTS))?;
        }
        let _ = root.remove_file(wants);
        root.symlink("../ferry-test-agent.service", wants)
            .map_err(rootfs_err(SYSTEMD_WANTS))?;
        Ok(BootHook::Systemd)
    } else {
        write_file(root, SYSV_HOOK, SYSV_SCRIPT, 0o755)?;
        Ok(BootHook::Sysvinit)
    }
}

/// Installs the test side into the rootfs mounted at `rootfs`.
///
/// Removes what an earlier job left in `ferry/` (its records included), so
/// the results fetched later are this job's only.
///
/// # Errors
/// See [`InstallError`].
pub fn install(
    rootfs: &Path,
    bundle: &Path,
    plan: &[u8],
    expected_version: &str,
) -> Result<Installed, InstallError> {
    let root = Dir::open_ambient_dir(rootfs, ambient_authority())
        .map_err(rootfs_err(rootfs.display().to_string()))?;
    match root.symlink_metadata(FERRY_DIR) {
        Ok(m) if m.is_dir() => root
            .remove_dir_all(FERRY_DIR)
            .map_err(rootfs_err(FERRY_DIR))?,
        Ok(_) => root.remove_file(FERRY_DIR).map_err(rootfs_err(FERRY_DIR))?,
        Err(_) => {}
    }
    let file = std::fs::File::open(bundle).map_err(|source| InstallError::Bundle {
        path: bundle.into(),
        source,
    })?;
    unpack(&root, file)?;
    let version = root
        .read_to_string("ferry/VERSION")
        .map_err(rootfs_err("ferry/VERSION"))?
        .trim()
        .to_string();
    if version != expected_version {
        return Err(InstallError::Version {
            found: version,
            expected: expected_version.into(),
        });
    }
    root.write(PLAN_FILE, plan).map_err(rootfs_err(PLAN_FILE))?;
    let hook = hook(&root)?;
    Ok(Installed { version, hook })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tar::{EntryType, Header};

    fn tarball(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (path, kind, data) in entries {
            let mut h = Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            match kind {
                EntryType::Symlink | EntryType::Link => {
                    h.set_size(0);
                    // Raw names: set_path/append_link would refuse the hostile ones we need.
                    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
                    h.as_old_mut().linkname[..data.len()].copy_from_slice(data.as_bytes());
                    h.set_cksum();
                    b.append(&h, std::io::empty()).expect("append");
                }
                _ => {
                    h.set_size(data.len() as u64);
                    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
                    h.set_cksum();
                    b.append(&h, data.as_bytes()).expect("append");
                }
            }
        }
        b.into_inner().expect("tar").finish().expect("gz")
    }

    fn rootfs() -> (tempfile::TempDir, PathBuf, Dir) {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("root");
        std::fs::create_dir(&root).expect("mkdir");
        let d = Dir::open_ambient_dir(&root, ambient_authority()).expect("dir");
        (dir, root, d)
    }

    #[test]
    fn unpacks_plain_entries() {
        let (_t, root, d) = rootfs();
        let tgz = tarball(&[
            ("ferry/", EntryType::Directory, ""),
            ("ferry/bin/test-agent", EntryType::Regular, "#!bin"),
            ("ferry/bin/lava-test-case", EntryType::Symlink, "test-agent"),
        ]);
        unpack(&d, tgz.as_slice()).expect("unpack");
        assert_eq!(
            std::fs::read_to_string(root.join("ferry/bin/lava-test-case")).expect("read"),
            "#!bin"
        );
    }

    #[test]
    fn hostile_entries_write_nothing_outside() {
        for (entries, what) in [
            (vec![("../escape", EntryType::Regular, "x")], "dot-dot"),
            (
                vec![("/tmp/abs-escape", EntryType::Regular, "x")],
                "absolute",
            ),
            (
                vec![("ferry/link", EntryType::Symlink, "../../..")],
                "symlink out",
            ),
            (
                vec![("ferry/link", EntryType::Symlink, "/")],
                "absolute symlink",
            ),
            (
                vec![("ferry/hard", EntryType::Link, "/etc/passwd")],
                "hard link",
            ),
            (vec![("ferry/dev", EntryType::Char, "")], "device"),
        ] {
            let (t, _root, d) = rootfs();
            let err = unpack(&d, tarball(&entries).as_slice()).expect_err(what);
            assert!(matches!(err, InstallError::Hostile { .. }), "{what}: {err}");
            assert!(!t.path().join("escape").exists(), "{what}");
        }
    }

    #[test]
    fn a_symlinked_ferry_dir_in_a_hostile_rootfs_cannot_redirect_writes() {
        let (t, root, _d) = rootfs();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        // The test image planted symlinks pointing at the master's own files.
        std::os::unix::fs::symlink(&outside, root.join("ferry")).expect("symlink");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("etc/init.d")).expect("symlink");
        let bundle = t.path().join("bundle.tgz");
        std::fs::write(
            &bundle,
            tarball(&[
                ("ferry/VERSION", EntryType::Regular, "9.9.9\n"),
                ("ferry/bin/test-agent", EntryType::Regular, "x"),
            ]),
        )
        .expect("write");
        let err = install(&root, &bundle, b"plan", "9.9.9").expect_err("init.d escapes");
        assert!(matches!(err, InstallError::Rootfs { .. }), "{err}");
        assert_eq!(
            std::fs::read_dir(&outside).expect("ls").count(),
            0,
            "nothing written outside the rootfs"
        );
        assert!(
            root.join("ferry/bin/test-agent").is_file(),
            "ferry symlink replaced by a real folder"
        );
    }

    #[test]
    fn installs_plan_and_the_right_hook() {
        let (t, root, _d) = rootfs();
        let bundle = t.path().join("bundle.tgz");
        std::fs::write(
            &bundle,
            tarball(&[("ferry/VERSION", EntryType::Regular, "1.0\n")]),
        )
        .expect("w");
        let got = install(&root, &bundle, b"plan", "1.0").expect("install");
        assert_eq!(got.hook, BootHook::Sysvinit);
        assert_eq!(std::fs::read(root.join(PLAN_FILE)).expect("plan"), b"plan");
        assert!(std::fs::read_to_string(root.join(SYSV_HOOK))
            .expect("hook")
            .contains("test-agent\" run"));

        std::fs::create_dir_all(root.join("usr/lib/systemd")).expect("mkdir");
        std::fs::write(root.join("usr/lib/systemd/systemd"), "").expect("w");
        assert_eq!(
            install(&root, &bundle, b"plan", "1.0")
                .expect("install")
                .hook,
            BootHook::Systemd
        );
        assert!(std::fs::read_to_string(root.join(SYSTEMD_WANTS))
            .expect("unit")
            .contains("ExecStart=/ferry/bin/test-agent"));

        let err = install(&root, &bundle, b"plan", "2.0").expect_err("version");
        assert!(matches!(err, InstallError::Version { .. }));
    }
}
