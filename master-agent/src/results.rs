//! Reading back what the test agent recorded on a test rootfs.
//!
//! The rootfs is the test image's, so the records folder is hostile: its
//! entries may be symlinks out of it, FIFOs that would block a reader,
//! sparse files of many gigabytes, or names no path should carry. Record
//! files are returned as opaque bytes (their format is the test agent's and
//! the dispatcher's business); everything else is refused or cut to the
//! configured limits, and each refusal is reported in the stream, so the
//! job completes with everything valid and says what it did not get.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use cap_std::ambient_authority;
use cap_std::fs::{Dir, FileType, FileTypeExt};
use ferry_proto::record::RECORDS_DIR;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use serde::Deserialize;

/// Size of the chunks files are streamed in.
pub const CHUNK: usize = 256 * 1024;

/// Refusals reported one by one; beyond this, one summary.
pub const MAX_REPORTED: usize = 100;

/// How much FetchResults returns (`records:` in the agent's config).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RecordLimits {
    /// Bytes returned of one file; a longer file is cut here (default 1 GiB).
    pub max_file_bytes: u64,
    /// Bytes returned in all; files past it are cut or skipped (default 2 GiB).
    pub max_total_bytes: u64,
    /// Files returned, in name order; later ones are skipped (default 1000).
    pub max_files: usize,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            max_file_bytes: 1 << 30,
            max_total_bytes: 2 << 30,
            max_files: 1000,
        }
    }
}

/// One item of the results stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A piece of a file; `eof` on the last (empty) one.
    Chunk {
        /// The file's name in the records folder.
        name: String,
        /// Its bytes, in order.
        data: Vec<u8>,
        /// The file is complete.
        eof: bool,
    },
    /// An entry not returned in full.
    Refused {
        /// The entry's name as found (lossy UTF-8).
        name: String,
        /// Why, for people.
        reason: String,
        /// Its first bytes were sent (cut at a limit) rather than nothing.
        truncated: bool,
    },
}

/// Why the records could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("reading records {path} on the test rootfs: {source}")]
pub struct ResultsError {
    /// Path inside the rootfs.
    pub path: String,
    /// Why.
    pub source: std::io::Error,
}

fn kind(t: &FileType) -> &'static str {
    if t.is_symlink() {
        "a symlink (not followed)"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device node"
    } else {
        "not a regular file"
    }
}

/// Counts refusals so a folder of a million bad entries is one line, not a million.
struct Reporter<'a, F: FnMut(Item) -> bool> {
    each: &'a mut F,
    refused: usize,
}

impl<F: FnMut(Item) -> bool> Reporter<'_, F> {
    fn send(&mut self, item: Item) -> bool {
        (self.each)(item)
    }

    fn refuse(&mut self, name: &str, reason: String, truncated: bool) -> bool {
        self.refused += 1;
        if self.refused > MAX_REPORTED && !truncated {
            return true;
        }
        self.send(Item::Refused {
            name: name.into(),
            reason,
            truncated,
        })
    }

    fn finish(&mut self) -> bool {
        if self.refused > MAX_REPORTED {
            let more = self.refused - MAX_REPORTED;
            return self.send(Item::Refused {
                name: RECORDS_DIR.into(),
                reason: format!(
                    "{more} more entries refused (only the first {MAX_REPORTED} are named)"
                ),
                truncated: false,
            });
        }
        true
    }
}

/// Opens `name` (a plain name, checked) in `dir` without following a
/// symlink and without blocking on a FIFO; the inner `Err` says why it is
/// not a regular file after all (it may have changed since it was listed).
fn open_plain(dir: &Dir, name: &str) -> std::io::Result<Result<(File, u64), String>> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = match nix::fcntl::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ELOOP) => return Ok(Err("a symlink (not followed)".into())),
        Err(e) => return Err(e.into()),
    };
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Err("not a regular file when opened".into()));
    }
    Ok(Ok((file, meta.len())))
}

/// Calls `each` for every item of the records folder: the chunks of every
/// regular file, in name order, within `limits`, and a refusal for
/// everything not returned in full. Stops early when `each` returns false.
/// A missing records folder means the test agent never ran: no files.
///
/// # Errors
/// When the rootfs or the records folder's listing cannot be read (a file
/// that cannot be read, or a folder that cannot be opened inside the
/// rootfs, is a refusal instead).
pub fn for_each_item(
    rootfs: &Path,
    limits: &RecordLimits,
    mut each: impl FnMut(Item) -> bool,
) -> Result<(), ResultsError> {
    let err = |path: &str| {
        let path = path.to_string();
        move |source| ResultsError { path, source }
    };
    let mut out = Reporter {
        each: &mut each,
        refused: 0,
    };
    let root = Dir::open_ambient_dir(rootfs, ambient_authority()).map_err(err("/"))?;
    match root.symlink_metadata(RECORDS_DIR) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Ok(m) if m.is_symlink() => {
            out.refuse(
                RECORDS_DIR,
                "the records folder is a symlink (not followed)".into(),
                false,
            );
            return Ok(());
        }
        _ => {}
    }
    // cap-std refuses any path (a symlinked `ferry/`, say) that leaves the rootfs.
    let dir = match root.open_dir(RECORDS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        // A test image that replaced `ferry/` with a way out loses its records, not the job.
        Err(e) => {
            let why = format!("the records folder cannot be opened inside the test rootfs: {e}");
            out.refuse(RECORDS_DIR, why, false);
            return Ok(());
        }
    };

    let mut entries = Vec::new();
    for entry in dir.entries().map_err(err(RECORDS_DIR))? {
        let entry = entry.map_err(err(RECORDS_DIR))?;
        let raw = entry.file_name();
        let name = raw.to_string_lossy().to_string();
        let ok = match (raw.to_str(), entry.file_type().map_err(err(&name))?) {
            (None, _) => Err("its name is not UTF-8".to_string()),
            (Some(n), t) => match ferry_proto::names::check(n) {
                Err(e) => Err(e.to_string()),
                Ok(()) if !t.is_file() => Err(kind(&t).to_string()),
                Ok(()) => Ok(()),
            },
        };
        entries.push((name, ok));
    }
    // Name order, refusals included, so two fetches of one folder read the same.
    entries.sort();
    let mut names = Vec::new();
    for (name, ok) in entries {
        match ok {
            Ok(()) => names.push(name),
            Err(why) => {
                if !out.refuse(&name, why, false) {
                    return Ok(());
                }
            }
        }
    }
    if names.len() > limits.max_files {
        for name in names.split_off(limits.max_files) {
            let why = format!(
                "skipped: more than {} files (`records.max_files`)",
                limits.max_files
            );
            if !out.refuse(&name, why, false) {
                return Ok(());
            }
        }
    }

    let mut total = 0u64;
    for name in names {
        let opened =
            open_plain(&dir, &name).unwrap_or_else(|e| Err(format!("cannot be opened: {e}")));
        let (file, len) = match opened {
            Ok(f) => f,
            Err(why) => {
                if !out.refuse(&name, why, false) {
                    return Ok(());
                }
                continue;
            }
        };
        let room = limits.max_total_bytes.saturating_sub(total);
        let limit = limits.max_file_bytes.min(room);
        if limit == 0 && len > 0 {
            let why = format!(
                "skipped: {len} bytes, and the {} bytes of `records.max_total_bytes` are used up",
                limits.max_total_bytes
            );
            if !out.refuse(&name, why, false) {
                return Ok(());
            }
            continue;
        }
        let mut reader = file.take(limit);
        let mut sent = 0u64;
        let mut broke = None;
        loop {
            let mut buf = vec![0u8; CHUNK];
            // A read error ends the file where it broke, reported below.
            let n = reader.read(&mut buf).unwrap_or_else(|e| {
                broke = Some(e);
                0
            });
            buf.truncate(n);
            sent += n as u64;
            // End of file (or of what may be sent): an empty chunk marks it complete.
            let eof = n == 0;
            if !out.send(Item::Chunk {
                name: name.clone(),
                data: buf,
                eof,
            }) {
                return Ok(());
            }
            if eof {
                break;
            }
        }
        total += sent;
        if let Some(e) = broke {
            let why = format!("truncated: reading failed after {sent} of {len} bytes: {e}");
            if !out.refuse(&name, why, true) {
                return Ok(());
            }
        } else if len > sent {
            let key = if limit < limits.max_file_bytes {
                "records.max_total_bytes"
            } else {
                "records.max_file_bytes"
            };
            let why =
                format!("truncated: only the first {sent} of {len} bytes were sent (`{key}`)");
            if !out.refuse(&name, why, true) {
                return Ok(());
            }
        }
    }
    out.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    type Files = Vec<(String, Vec<u8>)>;
    type Refusals = Vec<(String, String, bool)>;

    /// Collects the stream: files by name, and refusals.
    fn fetch(rootfs: &Path, limits: &RecordLimits) -> (Files, Refusals) {
        let mut files: Files = Vec::new();
        let mut refused = Vec::new();
        let mut open = false;
        for_each_item(rootfs, limits, |item| {
            match item {
                Item::Chunk { name, data, eof } => {
                    if !open {
                        files.push((name.clone(), Vec::new()));
                        open = true;
                    }
                    let last = files.last_mut().expect("file");
                    assert_eq!(last.0, name, "chunks of one file arrive together");
                    last.1.extend_from_slice(&data);
                    open = !eof;
                }
                Item::Refused {
                    name,
                    reason,
                    truncated,
                } => refused.push((name, reason, truncated)),
            }
            true
        })
        .expect("fetch");
        (files, refused)
    }

    fn records(t: &tempfile::TempDir) -> std::path::PathBuf {
        let rec = t.path().join(RECORDS_DIR);
        std::fs::create_dir_all(&rec).expect("mkdir");
        rec
    }

    #[test]
    fn streams_files_in_chunks_with_an_empty_last_one() {
        let t = tempfile::tempdir().expect("tmp");
        let big = vec![b'x'; CHUNK + 10];
        std::fs::write(records(&t).join("records.jsonl"), &big).expect("w");
        let mut got: Vec<(usize, bool)> = Vec::new();
        for_each_item(t.path(), &RecordLimits::default(), |item| {
            if let Item::Chunk { data, eof, .. } = item {
                got.push((data.len(), eof));
            }
            true
        })
        .expect("read");
        assert_eq!(got, vec![(CHUNK, false), (10, false), (0, true)]);
    }

    #[test]
    fn hostile_entries_are_refused_and_named_and_the_rest_returned_byte_exact() {
        let t = tempfile::tempdir().expect("tmp");
        let rec = records(&t);
        let good = b"{\"kind\":\"agent-started\"}\n{\"kind\":\"res".to_vec(); // torn last record
        std::fs::write(rec.join("a.jsonl"), &good).expect("w");
        let binary = vec![0xff, 0xfe, 0x00, 0x80, b'\n'];
        std::fs::write(rec.join("b.bin"), &binary).expect("w");
        std::fs::write(t.path().join("secret"), "outside").expect("w");
        std::os::unix::fs::symlink("../../secret", rec.join("link")).expect("symlink");
        std::os::unix::fs::symlink("/etc/passwd", rec.join("passwd")).expect("symlink");
        nix::unistd::mkfifo(&rec.join("fifo"), Mode::S_IRWXU).expect("mkfifo");
        std::fs::create_dir(rec.join("sub")).expect("mkdir");
        std::fs::write(rec.join(".hidden"), "h").expect("w");
        std::fs::write(rec.join(std::ffi::OsStr::from_bytes(b"bad\xffname")), "x").expect("w");
        let sparse = std::fs::File::create(rec.join("sparse")).expect("create");
        sparse.set_len(10 << 30).expect("10 GiB sparse");
        let limits = RecordLimits {
            max_file_bytes: 1 << 20,
            ..RecordLimits::default()
        };

        let (files, refused) = fetch(t.path(), &limits);
        let names: Vec<_> = files.iter().map(|(n, d)| (n.as_str(), d.len())).collect();
        assert_eq!(
            names,
            [("a.jsonl", good.len()), ("b.bin", 5), ("sparse", 1 << 20)]
        );
        assert_eq!(files[0].1, good);
        assert_eq!(files[1].1, binary);
        let why = |n: &str| {
            refused
                .iter()
                .find(|r| r.0 == n)
                .map(|r| (r.1.clone(), r.2))
                .unwrap_or_else(|| panic!("{n} not reported: {refused:?}"))
        };
        assert!(why("link").0.contains("symlink"));
        assert!(why("passwd").0.contains("symlink"));
        assert!(why("fifo").0.contains("FIFO"));
        assert!(why("sub").0.contains("folder"));
        assert!(why(".hidden").0.contains("not [A-Za-z0-9_]"));
        assert!(why("bad\u{fffd}name").0.contains("not UTF-8"));
        let (sparse_why, cut) = why("sparse");
        assert!(
            cut && sparse_why.contains("1048576 of 10737418240")
                && sparse_why.contains("max_file_bytes"),
            "{sparse_why}"
        );
        assert_eq!(refused.len(), 7, "{refused:?}");
    }

    #[test]
    fn the_total_and_the_file_count_are_capped() {
        let t = tempfile::tempdir().expect("tmp");
        let rec = records(&t);
        for (name, n) in [("1", 600), ("2", 600), ("3", 600), ("4", 0)] {
            std::fs::write(rec.join(name), vec![b'a'; n]).expect("w");
        }
        let limits = RecordLimits {
            max_file_bytes: 1000,
            max_total_bytes: 1000,
            max_files: 3,
        };
        let (files, refused) = fetch(t.path(), &limits);
        let sizes: Vec<_> = files.iter().map(|(n, d)| (n.as_str(), d.len())).collect();
        assert_eq!(sizes, [("1", 600), ("2", 400)]);
        let reasons: Vec<_> = refused.iter().map(|r| (r.0.as_str(), r.2)).collect();
        assert_eq!(reasons, [("4", false), ("2", true), ("3", false)]);
        assert!(refused[0].1.contains("max_files"));
        assert!(refused[1].1.contains("max_total_bytes"));
        assert!(refused[2].1.contains("used up"));
    }

    #[test]
    fn a_records_folder_leading_out_of_the_rootfs_is_refused_not_followed() {
        // A symlink in place of `ferry/records`, or of `ferry` itself.
        for (link, said) in [
            (RECORDS_DIR, "is a symlink"),
            ("ferry", "inside the test rootfs"),
        ] {
            let t = tempfile::tempdir().expect("tmp");
            let outside = t.path().join("outside");
            std::fs::create_dir_all(outside.join("records")).expect("mkdir");
            std::fs::write(outside.join("records.jsonl"), "secret").expect("w");
            std::fs::write(outside.join("records/records.jsonl"), "secret").expect("w");
            let root = t.path().join("root");
            std::fs::create_dir_all(root.join("ferry")).expect("mkdir");
            let _ = std::fs::remove_dir(root.join(link));
            std::os::unix::fs::symlink(&outside, root.join(link)).expect("symlink");
            let (files, refused) = fetch(&root, &RecordLimits::default());
            assert!(files.is_empty(), "{link}: {files:?}");
            assert!(refused[0].1.contains(said), "{link}: {refused:?}");
        }
    }

    #[test]
    fn a_folder_of_many_bad_entries_is_reported_in_bounded_lines() {
        let t = tempfile::tempdir().expect("tmp");
        let rec = records(&t);
        for i in 0..(MAX_REPORTED + 50) {
            std::fs::create_dir(rec.join(format!("d{i}"))).expect("mkdir");
        }
        let (_, refused) = fetch(t.path(), &RecordLimits::default());
        assert_eq!(refused.len(), MAX_REPORTED + 1);
        assert!(
            refused[MAX_REPORTED].1.contains("50 more entries"),
            "{:?}",
            refused[MAX_REPORTED]
        );
    }

    #[test]
    fn no_records_folder_means_no_files() {
        let t = tempfile::tempdir().expect("tmp");
        let (files, refused) = fetch(t.path(), &RecordLimits::default());
        assert!(files.is_empty() && refused.is_empty());
    }
}
