//! The board's filesystems as its kernels reported them on the console: a
//! journal replayed or an error found when a partition was mounted means
//! a boot before did not end cleanly (a reboot with a write in flight, a
//! power cut, a failing medium). That is the lab's concern, not the test's:
//! it becomes an infrastructure warning in `outcome.json`.
//!
//! The kernel prints these when the master image mounts the test partition
//! (to boot the test image, or to fetch its records), so the check covers
//! the first mount after every test boot, whichever job it falls in. A
//! line a test prints can only add a warning, never hide one.

use std::io::BufRead;
use std::path::Path;

/// Most warnings reported (the first ones: a dying disk repeats itself).
const MAX_WARNINGS: usize = 5;

/// What in a kernel line says a filesystem was not clean.
const SIGNS: [(&str, &str); 6] = [
    ("EXT4-fs", "recovery complete"),
    ("EXT4-fs", "recovery required"),
    ("EXT4-fs", "orphan cleanup"),
    ("EXT4-fs error", ""),
    ("EXT4-fs warning", ""),
    ("I/O error, dev", ""),
];

/// Whether one console line reports an unclean filesystem.
pub fn unclean(line: &str) -> bool {
    SIGNS
        .iter()
        .any(|(a, b)| line.contains(a) && (b.is_empty() || line.contains(b)))
}

/// The infrastructure warnings for the console log `console_log`.
pub fn warnings(console_log: &Path) -> Vec<String> {
    let Ok(f) = std::fs::File::open(console_log) else {
        return Vec::new();
    };
    let mut found: Vec<String> = Vec::new();
    // Lossy by line: console bytes need not be UTF-8.
    for line in std::io::BufReader::new(f)
        .split(b'\n')
        .map_while(Result::ok)
    {
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']).trim();
        if unclean(line) && !found.iter().any(|f| f.ends_with(line)) {
            found.push(format!(
                "infrastructure: a filesystem on the board was not clean (a boot before did not end cleanly, or the medium fails): {line}"
            ));
            if found.len() == MAX_WARNINGS {
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_replays_and_errors_are_warned_once_each() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("console.log");
        std::fs::write(
            &log,
            b"[    0.000000] Linux version 6.1\r\n\
              [    1.200000] EXT4-fs (vda2): mounted filesystem with ordered data mode. Quota mode: none.\r\n\
              hello \xff from a test\n\
              [    1.300000] EXT4-fs (vda2): recovery complete\r\n\
              [    1.300000] EXT4-fs (vda2): recovery complete\r\n\
              [    2.000000] EXT4-fs error (device vda2): ext4_lookup:1785: inode #2: comm ls: deleted inode referenced: 13\r\n\
              [    3.000000] I/O error, dev vda, sector 4096 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 2\r\n",
        )
        .expect("write");
        let w = warnings(&log);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(
            w[0].starts_with("infrastructure: ")
                && w[0].ends_with("EXT4-fs (vda2): recovery complete")
        );
        assert!(w[1].contains("deleted inode referenced"));
        assert!(w[2].contains("op 0x1:(WRITE)"));
    }

    #[test]
    fn a_clean_boot_or_no_console_gives_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("console.log");
        std::fs::write(
            &log,
            "[    1.2] EXT4-fs (vda2): mounted filesystem with ordered data mode.\n[    1.3] EXT4-fs (vda2): unmounting filesystem.\n",
        )
        .expect("write");
        assert!(warnings(&log).is_empty());
        assert!(warnings(&dir.path().join("none")).is_empty());
    }
}
