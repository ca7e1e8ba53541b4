//! Reading back what the test agent recorded on a test rootfs.

use std::io::Read;
use std::path::Path;

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use ferry_proto::record::RECORDS_DIR;

/// Size of the chunks files are streamed in.
pub const CHUNK: usize = 256 * 1024;

/// Why the records could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading records {path} on the test rootfs: {source}")]
pub struct ResultsError {
    /// Path inside the rootfs.
    pub path: String,
    /// Why (including a symlink that would leave the rootfs).
    pub source: std::io::Error,
}

/// Calls `each(name, bytes, last)` for every chunk of every regular file in
/// the records folder, in name order; stops early when `each` returns false.
/// A missing records folder means the test agent never ran: no files.
///
/// # Errors
/// When a file cannot be read.
pub fn for_each_chunk(
    rootfs: &Path,
    mut each: impl FnMut(&str, Vec<u8>, bool) -> bool,
) -> Result<(), ResultsError> {
    let err = |path: &str| {
        let path = path.to_string();
        move |source| ResultsError { path, source }
    };
    let root = Dir::open_ambient_dir(rootfs, ambient_authority()).map_err(err("/"))?;
    let dir = match root.open_dir(RECORDS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(RECORDS_DIR)(e)),
    };
    let mut names = Vec::new();
    for entry in dir.entries().map_err(err(RECORDS_DIR))? {
        let entry = entry.map_err(err(RECORDS_DIR))?;
        // Only plain files: a planted symlink or device is not a record.
        if entry.file_type().map_err(err(RECORDS_DIR))?.is_file() {
            names.push(entry.file_name().to_string_lossy().to_string());
        }
    }
    names.sort();
    for name in names {
        let mut file = dir.open(&name).map_err(err(&name))?;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf).map_err(err(&name))?;
            buf.truncate(n);
            // End of file: an empty chunk marks the file complete.
            let last = n == 0;
            if !each(&name, buf, last) {
                return Ok(());
            }
            if last {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_files_and_ignores_planted_links() {
        let t = tempfile::tempdir().expect("tmp");
        let rec = t.path().join(RECORDS_DIR);
        std::fs::create_dir_all(&rec).expect("mkdir");
        let big = vec![b'x'; CHUNK + 10];
        std::fs::write(rec.join("records.jsonl"), &big).expect("w");
        std::os::unix::fs::symlink("/etc/passwd", rec.join("passwd")).expect("symlink");
        let mut got: Vec<(String, usize, bool)> = Vec::new();
        for_each_chunk(t.path(), |n, b, last| {
            got.push((n.into(), b.len(), last));
            true
        })
        .expect("read");
        assert_eq!(
            got,
            vec![
                ("records.jsonl".into(), CHUNK, false),
                ("records.jsonl".into(), 10, false),
                ("records.jsonl".into(), 0, true)
            ]
        );
    }

    #[test]
    fn no_records_folder_means_no_files() {
        let t = tempfile::tempdir().expect("tmp");
        let mut n = 0;
        for_each_chunk(t.path(), |_, _, _| {
            n += 1;
            true
        })
        .expect("ok");
        assert_eq!(n, 0);
    }
}
