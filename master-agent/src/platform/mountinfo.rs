//! What is mounted, from a `/proc/self/mountinfo`-format file, read
//! fail-closed: a file that cannot be read or parsed is an error, never
//! "nothing is mounted", because the answer decides whether a partition may
//! be overwritten.

use std::path::{Path, PathBuf};

use super::PlatformError;

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The device's `major:minor`.
    pub majmin: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// What was mounted (a device node, or a file/folder on the simulated board).
    pub source: PathBuf,
}

/// Undoes the kernel's octal escapes (`\040` for a space) in a path field.
fn unescape(field: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let code = field.get(i + 1..i + 4)?;
            out.push(u8::from_str_radix(code, 8).ok()?);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

fn is_majmin(s: &str) -> bool {
    s.split_once(':').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

/// Parses mountinfo text.
///
/// # Errors
/// The first line that does not have the kernel's shape (with its number),
/// or no mounts at all (a real system always has `/`).
pub fn parse(text: &str) -> Result<Vec<Mount>, String> {
    let mut mounts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields
            .iter()
            .position(|f| *f == "-")
            .ok_or_else(|| bad("no ` - ` separator"))?;
        if sep < 6 || fields.len() < sep + 3 {
            return Err(bad("too few fields"));
        }
        if !is_majmin(fields[2]) {
            return Err(bad("no major:minor in field 3"));
        }
        mounts.push(Mount {
            majmin: fields[2].into(),
            mount_point: unescape(fields[4]).ok_or_else(|| bad("bad escape"))?,
            source: unescape(fields[sep + 2]).ok_or_else(|| bad("bad escape"))?,
        });
    }
    if mounts.is_empty() {
        return Err("lists no mounts at all".into());
    }
    Ok(mounts)
}

/// Reads and parses the mountinfo file at `path`.
///
/// # Errors
/// [`PlatformError::MountState`] when it cannot be read or parsed.
pub fn read(path: &Path) -> Result<Vec<Mount>, PlatformError> {
    let fail = |why: String| PlatformError::MountState {
        path: path.into(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    parse(&text).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &str = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
        25 22 0:5 / /dev rw,nosuid master:2 - devtmpfs udev rw,size=1k\n\
        40 22 7:0 / /mnt/with\\040space rw - ext4 /dev/loop0 rw\n";

    #[test]
    fn parses_the_kernels_format() {
        let m = parse(REAL).expect("parse");
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].majmin, "254:1");
        assert_eq!(m[0].source, Path::new("/dev/vda1"));
        assert_eq!(m[2].mount_point, Path::new("/mnt/with space"));
    }

    #[test]
    fn anything_else_is_an_error_not_an_empty_list() {
        for bad in [
            "",
            "garbage\n",
            "22 1 254:1 / / rw,relatime shared:1 ext4 /dev/vda1 rw\n",
            "22 1 vda / / rw - ext4 /dev/vda1 rw\n",
            "22 1 254:1 / / rw -\n",
            "22 1 254:1 / /\\04 rw - ext4 /dev/vda1 rw\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let mut torn = REAL.to_string();
        torn.push_str("41 22 7:1 / /mnt/b");
        assert!(parse(&torn).is_err(), "a torn last line");
        assert!(matches!(
            read(Path::new("/nonexistent/mountinfo")),
            Err(PlatformError::MountState { .. })
        ));
    }
}
