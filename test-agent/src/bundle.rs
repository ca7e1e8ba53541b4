//! The test-agent tarball the master image carries.
//!
//! The running binary packs itself, so the tarball always holds exactly the
//! test agent built with the master agent beside it. Layout, relative to the
//! test rootfs: `ferry/VERSION`, `ferry/bin/test-agent`, and the helpers as
//! symlinks to it.

use std::fs::File;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use tar::{Builder, EntryType, Header};

use crate::helpers::HELPERS;
use crate::VERSION;

/// Why the bundle could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing test-agent bundle {path}: {source}")]
pub struct BundleError {
    /// The tarball being written.
    pub path: String,
    /// The I/O error.
    pub source: std::io::Error,
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// Writes the bundle of the running test agent to `output` (gzip'd tar).
///
/// # Errors
/// When the binary cannot be read or the tarball written.
pub fn write(output: &Path) -> Result<(), BundleError> {
    let err = |source| BundleError {
        path: output.display().to_string(),
        source,
    };
    let exe = std::env::current_exe().map_err(err)?;
    let binary = std::fs::read(&exe).map_err(err)?;
    let file = File::create(output).map_err(err)?;
    // Fast: packing happens on every simulated board's first power-on and
    // at every image build; the few percent a slower level saves do not pay.
    let mut tar = Builder::new(GzEncoder::new(file, Compression::fast()));
    for dir in ["ferry/", "ferry/bin/"] {
        let mut h = header(EntryType::Directory, 0o755, 0);
        tar.append_data(&mut h, dir, std::io::empty())
            .map_err(err)?;
    }
    let version = format!("{VERSION}\n");
    let mut h = header(EntryType::Regular, 0o644, version.len() as u64);
    tar.append_data(&mut h, "ferry/VERSION", version.as_bytes())
        .map_err(err)?;
    let mut h = header(EntryType::Regular, 0o755, binary.len() as u64);
    tar.append_data(&mut h, "ferry/bin/test-agent", binary.as_slice())
        .map_err(err)?;
    for helper in HELPERS {
        let mut h = header(EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, format!("ferry/bin/{helper}"), "test-agent")
            .map_err(err)?;
    }
    let gz = tar.into_inner().map_err(err)?;
    gz.finish().map_err(err)?.sync_all().map_err(err)?;
    Ok(())
}
