//! Unpacking a rootfs tarball into a fresh filesystem, confined to it.
//!
//! The tarball is hostile: every entry is placed through `cap-std`, which
//! resolves paths inside the new filesystem and refuses any that would
//! leave it (a `..`, an absolute path, a symlink pointing out). Symlinks are
//! stored as given (an absolute target means the rootfs's own root once it
//! boots) but never followed out of the tree while unpacking; hard links
//! must name an entry inside it; device nodes and FIFOs are skipped
//! (devtmpfs provides `/dev`); the bytes unpacked are bounded by the
//! partition's size.

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use cap_std::fs::{Dir, OpenOptions};

/// Entries one tarball may hold: bounds the work a hostile one can cause.
pub const MAX_ENTRIES: u64 = 10_000_000;

/// Stream bytes the tar reader may consume between two entries' data: the
/// next header, padding, GNU long names and PAX records (which it holds in
/// memory whole), and the data of entries that are not unpacked. Beyond it
/// a small compressed tarball could make the agent allocate gigabytes.
pub const MAX_METADATA: u64 = 1 << 20;

/// What was unpacked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Regular files.
    pub files: u64,
    /// Folders.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Hard links.
    pub hardlinks: u64,
    /// Device nodes and FIFOs, not created.
    pub skipped: u64,
    /// Bytes of file data written.
    pub bytes: u64,
}

/// Why unpacking stopped.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry that would reach outside the filesystem, or is malformed.
    #[error("tarball entry {entry:?} refused: {why}")]
    Hostile {
        /// The entry's path as the tarball gives it.
        entry: String,
        /// Why.
        why: String,
    },
    /// More data or entries than the partition can take.
    #[error("tarball unpacks to more than {limit} {what}")]
    TooLarge {
        /// What ran over ("bytes", "entries").
        what: &'static str,
        /// The bound.
        limit: u64,
    },
    /// The tar stream itself is unreadable (corrupt, truncated, or the
    /// stream under it failed).
    #[error("reading the tarball: {0}")]
    Read(std::io::Error),
    /// Writing to the new filesystem failed (the partition, not the tarball).
    #[error("writing tarball entry {entry:?} to the partition: {source}")]
    Write {
        /// The entry's path as the tarball gives it.
        entry: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Checks an entry path: relative, plain components only.
fn plain(path: &Path, entry: &str) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(hostile(entry, "it climbs out with `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(hostile(entry, "it is an absolute path"))
            }
        }
    }
    Ok(out)
}

fn hostile(entry: &str, why: impl Into<String>) -> UnpackError {
    UnpackError::Hostile {
        entry: entry.into(),
        why: why.into(),
    }
}

/// A write into the tree failed. A path that would leave it (cap-std's
/// refusal) or that the tree's shape forbids (a file where a folder must
/// be, a loop of links) is the tarball's fault; a full or failing disk is
/// the partition's.
fn placing(entry: &str) -> impl FnOnce(std::io::Error) -> UnpackError + '_ {
    use std::io::ErrorKind as K;
    move |e| {
        let tarballs_fault = e.raw_os_error() == Some(nix::libc::ELOOP)
            || matches!(
                e.kind(),
                K::PermissionDenied
                    | K::AlreadyExists
                    | K::NotADirectory
                    | K::IsADirectory
                    | K::DirectoryNotEmpty
                    | K::NotFound
                    | K::InvalidInput
                    | K::InvalidFilename
                    | K::TooManyLinks
            );
        if tarballs_fault {
            hostile(
                entry,
                format!("cannot be placed inside the filesystem: {e}"),
            )
        } else {
            UnpackError::Write {
                entry: entry.into(),
                source: e,
            }
        }
    }
}

/// The tar stream with a byte allowance the unpacker sets before each step.
struct Allowance<R> {
    inner: R,
    left: Rc<Cell<u64>>,
}

impl<R: Read> Read for Allowance<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left.get();
        if left == 0 {
            return Err(std::io::Error::other(
                "more tar metadata than the unpacker allows",
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// Copies an entry's data into `file`, telling a failing read (the
/// tarball) from a failing write (the partition).
fn copy_data(entry: &mut impl Read, file: &mut impl Write, name: &str) -> Result<u64, UnpackError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(UnpackError::Read(e)),
        };
        file.write_all(&buf[..n])
            .map_err(|source| UnpackError::Write {
                entry: name.into(),
                source,
            })?;
        total += n as u64;
    }
}

/// An owner id the tarball gives, refused when it does not fit (rather
/// than silently becoming root).
fn id(value: u64, what: &str, entry: &str) -> Result<u32, UnpackError> {
    u32::try_from(value).map_err(|_| hostile(entry, format!("{what} {value} is out of range")))
}

/// Splits `path` into its parent folder (opened inside `root`, symlinks
/// resolved inside it) and its last component.
fn parent_of<'p>(root: &Dir, path: &'p Path, entry: &str) -> Result<(Dir, &'p Path), UnpackError> {
    let name = path
        .file_name()
        .map(Path::new)
        .ok_or_else(|| hostile(entry, "no file name"))?;
    let parent = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => {
            root.create_dir_all(p).map_err(placing(entry))?;
            root.open_dir(p).map_err(placing(entry))?
        }
        None => root.try_clone().map_err(placing(entry))?,
    };
    Ok((parent, name))
}

/// Sets owner (when running as root) and then mode (chown clears set-id bits).
fn own(fd: impl AsFd, uid: u32, gid: u32, mode: u32, as_root: bool) -> std::io::Result<()> {
    if as_root {
        nix::unistd::fchown(
            &fd,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )?;
    }
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(mode))?;
    Ok(())
}

/// The same for a folder: cap-std holds folders as `O_PATH` descriptors,
/// which take no `fchown`, so the calls name `.` inside the (already
/// confined) folder.
fn own_dir(dir: &Dir, uid: u32, gid: u32, mode: u32, as_root: bool) -> std::io::Result<()> {
    if as_root {
        nix::unistd::fchownat(
            dir,
            ".",
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::empty(),
        )?;
    }
    nix::sys::stat::fchmodat(
        dir,
        ".",
        nix::sys::stat::Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )?;
    Ok(())
}

/// Unpacks the tar stream `input` into `root`, never outside it, writing at
/// most `limit` bytes of file data. The stream is read to its end marker.
///
/// # Errors
/// A hostile entry, too much data or metadata, an unreadable stream, or a
/// failing partition.
pub fn unpack(root: &Dir, input: impl Read, limit: u64) -> Result<Unpacked, UnpackError> {
    let as_root = nix::unistd::geteuid().is_root();
    let left = Rc::new(Cell::new(MAX_METADATA));
    let mut archive = tar::Archive::new(Allowance {
        inner: input,
        left: left.clone(),
    });
    let mut iter = archive.entries().map_err(UnpackError::Read)?;
    let mut done = Unpacked::default();
    let mut entries = 0u64;
    // Folder modes and owners are set last, deepest first, as tar does: a
    // read-only folder must not refuse the entries that go into it.
    let mut dirs: Vec<(PathBuf, String, u32, u32, u32)> = Vec::new();
    loop {
        left.set(MAX_METADATA);
        let Some(entry) = iter.next() else { break };
        let mut entry = entry.map_err(|e| {
            if left.get() == 0 {
                UnpackError::TooLarge {
                    what: "bytes of headers, long names and skipped entries in a row",
                    limit: MAX_METADATA,
                }
            } else {
                UnpackError::Read(e)
            }
        })?;
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(UnpackError::TooLarge {
                what: "entries",
                limit: MAX_ENTRIES,
            });
        }
        let kind = entry.header().entry_type();
        // Metadata entries the tar reader has already applied (PAX) or that
        // apply to no path here (a PAX global header's name is arbitrary).
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            continue;
        }
        let raw = entry.path().map_err(UnpackError::Read)?.into_owned();
        let name = raw.display().to_string();
        let path = plain(&raw, &name)?;
        let header = entry.header();
        let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
        let uid = id(header.uid().map_err(UnpackError::Read)?, "uid", &name)?;
        let gid = id(header.gid().map_err(UnpackError::Read)?, "gid", &name)?;
        let mtime = header.mtime().unwrap_or(0);
        if path.as_os_str().is_empty() {
            // `./` itself: the filesystem's root folder.
            if kind.is_dir() {
                dirs.push((path, name, uid, gid, mode));
                continue;
            }
            return Err(hostile(&name, "only a folder may stand for the root"));
        }
        match kind {
            tar::EntryType::Directory => {
                root.create_dir_all(&path).map_err(placing(&name))?;
                dirs.push((path, name, uid, gid, mode));
                done.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                if done.bytes.saturating_add(size) > limit {
                    return Err(UnpackError::TooLarge {
                        what: "bytes",
                        limit,
                    });
                }
                let (parent, base) = parent_of(root, &path, &name)?;
                // Replace, never write through, whatever is there (a symlink, say).
                let _ = parent.remove_file(base);
                let mut opts = OpenOptions::new();
                opts.write(true).create_new(true);
                let mut file = parent.open_with(base, &opts).map_err(placing(&name))?;
                // The entry's own data (a sparse entry's holes are not in the stream).
                left.set(size);
                let n = copy_data(&mut entry, &mut file, &name)?;
                own(&file, uid, gid, mode, as_root).map_err(placing(&name))?;
                let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                let _ = file.into_std().set_modified(when);
                done.bytes += n;
                done.files += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| hostile(&name, "a symlink without a target"))?;
                let (parent, base) = parent_of(root, &path, &name)?;
                let _ = parent.remove_file(base);
                // Stored as given: it is only followed (inside the tree) by
                // later entries, and by the test image once it is its root.
                parent
                    .symlink_contents(&target, base)
                    .map_err(placing(&name))?;
                if as_root {
                    nix::unistd::fchownat(
                        &parent,
                        base,
                        Some(nix::unistd::Uid::from_raw(uid)),
                        Some(nix::unistd::Gid::from_raw(gid)),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| placing(&name)(e.into()))?;
                }
                done.symlinks += 1;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Read)?
                    .ok_or_else(|| hostile(&name, "a hard link without a target"))?;
                let target = plain(&target, &name)?;
                let (parent, base) = parent_of(root, &path, &name)?;
                let _ = parent.remove_file(base);
                // The source is resolved inside the tree; one that leaves it is refused.
                root.hard_link(&target, &parent, base).map_err(|e| {
                    hostile(
                        &name,
                        format!(
                            "hard link to {} cannot be made inside the filesystem: {e}",
                            target.display()
                        ),
                    )
                })?;
                done.hardlinks += 1;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                done.skipped += 1;
            }
            other => {
                return Err(hostile(
                    &name,
                    format!("entry type {other:?} is not a file, folder, link or device"),
                ))
            }
        }
    }
    // Deepest first, so a folder made read-only never blocks its children's.
    dirs.sort_by_key(|(path, ..)| std::cmp::Reverse(path.components().count()));
    for (path, name, uid, gid, mode) in dirs {
        let dir = if path.as_os_str().is_empty() {
            root.try_clone()
        } else {
            root.open_dir(&path)
        }
        .map_err(placing(&name))?;
        own_dir(&dir, uid, gid, mode, as_root).map_err(placing(&name))?;
    }
    Ok(done)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cap_std::ambient_authority;
    use tar::{EntryType, Header};

    /// A tarball built entry by entry, bypassing the tar crate's own path
    /// checks (a hostile tarball is exactly what they would refuse).
    #[derive(Default)]
    pub(crate) struct Tarball(Vec<u8>);

    impl Tarball {
        pub(crate) fn raw(
            &mut self,
            kind: EntryType,
            path: &str,
            link: Option<&str>,
            data: &[u8],
        ) -> &mut Self {
            self.with_mode(
                kind,
                path,
                link,
                data,
                if kind.is_dir() { 0o755 } else { 0o644 },
            )
        }
        pub(crate) fn with_mode(
            &mut self,
            kind: EntryType,
            path: &str,
            link: Option<&str>,
            data: &[u8],
            mode: u32,
        ) -> &mut Self {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            {
                let name = &mut h.as_old_mut().name;
                name.fill(0);
                name[..path.len()].copy_from_slice(path.as_bytes());
            }
            if let Some(l) = link {
                let field = &mut h.as_old_mut().linkname;
                field.fill(0);
                field[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            self.0
                .extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
            self
        }
        pub(crate) fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
            self.raw(EntryType::Regular, path, None, data)
        }
        pub(crate) fn dir(&mut self, path: &str) -> &mut Self {
            self.raw(EntryType::Directory, path, None, b"")
        }
        pub(crate) fn symlink(&mut self, path: &str, to: &str) -> &mut Self {
            self.raw(EntryType::Symlink, path, Some(to), b"")
        }
        pub(crate) fn hardlink(&mut self, path: &str, to: &str) -> &mut Self {
            self.raw(EntryType::Link, path, Some(to), b"")
        }
        pub(crate) fn done(&mut self) -> Vec<u8> {
            let mut v = self.0.clone();
            v.extend_from_slice(&[0; 1024]);
            v
        }
    }

    fn setup() -> (tempfile::TempDir, Dir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(tmp.path().join("root")).expect("root");
        std::fs::create_dir(tmp.path().join("outside")).expect("outside");
        std::fs::write(tmp.path().join("outside/secret"), "keep").expect("secret");
        let root =
            Dir::open_ambient_dir(tmp.path().join("root"), ambient_authority()).expect("open");
        let outside = tmp.path().join("outside");
        (tmp, root, outside)
    }

    /// Everything under `dir`, as sorted relative paths.
    fn listing(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                let e = e.expect("entry");
                let p = e.path();
                out.push(p.strip_prefix(dir).expect("prefix").display().to_string());
                if e.file_type().expect("type").is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_rootfs_unpacks_with_links_modes_and_absolute_symlinks_kept() {
        let (tmp, root, _) = setup();
        let tar = Tarball::default()
            .dir("./")
            .dir("./etc/")
            .file("./etc/hostname", b"board\n")
            .dir("usr/lib")
            .file("usr/lib/libc.so", &[7u8; 3000])
            .symlink("lib", "usr/lib")
            .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
            .hardlink("usr/lib/libc.so.6", "usr/lib/libc.so")
            .raw(EntryType::Char, "dev/console", None, b"")
            .file("lib/through-inner-link", b"ok")
            .done();
        let n = unpack(&root, &tar[..], 1 << 20).expect("unpack");
        assert_eq!(
            n,
            Unpacked {
                files: 3,
                dirs: 2,
                symlinks: 2,
                hardlinks: 1,
                skipped: 1,
                bytes: 3000 + 6 + 2
            }
        );
        let r = tmp.path().join("root");
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).expect("hostname"),
            "board\n"
        );
        assert_eq!(
            std::fs::read_link(r.join("etc/localtime")).expect("link"),
            Path::new("/usr/share/zoneinfo/UTC")
        );
        assert_eq!(
            std::fs::read(r.join("usr/lib/through-inner-link")).expect("inner"),
            b"ok"
        );
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(r.join("usr/lib/libc.so")).expect("a");
        let b = std::fs::metadata(r.join("usr/lib/libc.so.6")).expect("b");
        assert_eq!(a.ino(), b.ino(), "hard link shares the inode");
        assert_eq!(a.mode() & 0o7777, 0o644);
        assert!(!r.join("dev/console").exists(), "device nodes are not made");
    }

    #[test]
    fn hostile_entries_write_nothing_outside_and_say_which_entry() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                Tarball::default().file("../outside/pwned", b"x").done(),
            ),
            (
                "dotdot-inner",
                Tarball::default()
                    .file("a/../../outside/pwned", b"x")
                    .done(),
            ),
            (
                "absolute",
                Tarball::default().file("/tmp/ferry-pwned", b"x").done(),
            ),
            ("symlink-absolute", Vec::new()),
            (
                "symlink-relative",
                Tarball::default()
                    .symlink("esc", "../outside")
                    .file("esc/pwned", b"x")
                    .done(),
            ),
            ("symlink-then-overwrite", Vec::new()),
            (
                "hardlink-dotdot",
                Tarball::default().hardlink("h", "../outside/secret").done(),
            ),
            ("hardlink-through-symlink", Vec::new()),
            // Paths that only the tar reader's own extensions carry.
            (
                "pax-path-dotdot",
                Tarball::default()
                    .raw(
                        EntryType::XHeader,
                        "pax",
                        None,
                        &pax("path", "../outside/pwned"),
                    )
                    .file("innocent", b"x")
                    .done(),
            ),
            (
                "gnu-longname-absolute",
                Tarball::default()
                    .raw(
                        EntryType::GNULongName,
                        "././@LongLink",
                        None,
                        b"/tmp/ferry-pwned\0",
                    )
                    .file("innocent", b"x")
                    .done(),
            ),
        ];
        for (what, tar) in cases {
            let (_tmp, root, outside) = setup();
            let out = outside.display().to_string();
            let tar = match what {
                "symlink-absolute" => Tarball::default()
                    .symlink("esc", &out)
                    .file("esc/pwned", b"x")
                    .done(),
                // A symlink to an outside file, then a file entry of the same name.
                "symlink-then-overwrite" => Tarball::default()
                    .symlink("s", &format!("{out}/secret"))
                    .file("s", b"overwritten")
                    .symlink("d", &out)
                    .file("d/secret", b"overwritten")
                    .done(),
                "hardlink-through-symlink" => Tarball::default()
                    .symlink("esc", &out)
                    .hardlink("h", "esc/secret")
                    .file("h", b"overwritten")
                    .done(),
                _ => tar,
            };
            let err = unpack(&root, &tar[..], 1 << 20).expect_err(what);
            assert!(matches!(err, UnpackError::Hostile { .. }), "{what}: {err}");
            assert_eq!(
                listing(&outside),
                vec!["secret".to_string()],
                "{what}: wrote outside"
            );
            assert_eq!(
                std::fs::read_to_string(outside.join("secret")).expect("secret"),
                "keep",
                "{what}: changed a file outside"
            );
            assert!(!Path::new("/tmp/ferry-pwned").exists(), "{what}");
        }
    }

    /// One PAX extended-header record: `LEN key=value\n`, LEN counting itself.
    fn pax(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    #[test]
    fn metadata_bombs_are_refused_before_they_are_read_into_memory() {
        let big = vec![b'a'; 8 << 20];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "gnu-long-name",
                Tarball::default()
                    .raw(EntryType::GNULongName, "././@LongLink", None, &big)
                    .file("f", b"x")
                    .done(),
            ),
            (
                "pax-header",
                Tarball::default()
                    .raw(EntryType::XHeader, "pax", None, &big)
                    .file("f", b"x")
                    .done(),
            ),
            (
                "skipped-device-with-data",
                Tarball::default()
                    .raw(EntryType::Char, "dev/null", None, &big)
                    .file("f", b"x")
                    .done(),
            ),
        ];
        for (what, tar) in cases {
            let (_tmp, root, _) = setup();
            let err = unpack(&root, &tar[..], 1 << 30).expect_err(what);
            assert!(
                matches!(
                    err,
                    UnpackError::TooLarge {
                        limit: MAX_METADATA,
                        ..
                    }
                ),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn read_only_folders_and_global_headers_do_not_stop_a_rootfs() {
        let (_tmp, root, _) = setup();
        let mut t = Tarball::default();
        // GNU tar names global headers /tmp/GlobalHead.<pid>.<n>: not a path to place.
        t.raw(
            EntryType::XGlobalHeader,
            "/tmp/GlobalHead.1.1",
            None,
            &pax("comment", "x"),
        );
        t.dir("usr/bin/");
        t.file("usr/bin/tool", b"#!/bin/sh\n");
        // usr/lib made read-only by its own entry before its contents come.
        t.with_mode(EntryType::Directory, "usr/lib/", None, b"", 0o555);
        t.file("usr/lib/libx.so", b"elf");
        let tar = t.done();
        let done = unpack(&root, &tar[..], 1 << 20).expect("unpacked");
        assert_eq!(done.files, 2);
        let meta = root.metadata("usr/lib").expect("usr/lib");
        use cap_std::fs::PermissionsExt as _;
        assert_eq!(meta.permissions().mode() & 0o7777, 0o555);
        assert_eq!(root.read_to_string("usr/lib/libx.so").expect("lib"), "elf");
    }

    #[test]
    fn more_data_than_the_partition_holds_is_refused() {
        let (_tmp, root, _) = setup();
        let tar = Tarball::default()
            .file("a", &[1u8; 4000])
            .file("b", &[1u8; 4000])
            .done();
        let err = unpack(&root, &tar[..], 6000).expect_err("too large");
        assert!(
            matches!(err, UnpackError::TooLarge { what: "bytes", .. }),
            "{err}"
        );
    }
}
