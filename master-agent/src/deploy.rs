//! Writing an image to a partition: decompress while writing, hash what was
//! received, refuse to overflow the partition, sync before acknowledging,
//! and leave a partition whose deploy failed unbootable.
//!
//! Transport-free: the source is any `Read` (the gRPC stream, a file in
//! tests); this runs on a blocking thread.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::platform::WriteTarget;

/// Size of reads and writes: large, so the disk sees big sequential writes.
const BLOCK: usize = 1 << 20;
/// Bytes zeroed at the start of a partition whose deploy failed.
const INVALIDATE: u64 = 1 << 20;

/// How the bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Look at the first bytes.
    Detect,
    /// Raw image.
    None,
    /// gzip (one or more members).
    Gzip,
}

/// What to write and how to check it.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Target partition name, for messages.
    pub partition: String,
    /// Expected sha256 (lowercase hex) of the bytes received.
    pub sha256: String,
    /// Compression of the bytes received.
    pub compression: Compression,
    /// Size of the source, when known (checked against a raw image's target).
    pub source_size: u64,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Bytes received.
    pub received: u64,
    /// Bytes written to the partition.
    pub written: u64,
    /// sha256 of the bytes received.
    pub sha256: String,
}

/// Why a deploy failed. In every case after the first byte was written the
/// partition has been invalidated.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The image does not fit.
    #[error("image does not fit partition {partition:?}: it holds {capacity} bytes, the image needs {needed}{}", if *.known { "" } else { " or more" })]
    TooLarge {
        /// The partition.
        partition: String,
        /// Its size.
        capacity: u64,
        /// Bytes the image needs (at least).
        needed: u64,
        /// Whether `needed` is the full size or only how far it got.
        known: bool,
    },
    /// The received bytes do not hash to the expected value.
    #[error("sha256 mismatch on partition {partition:?}: expected {expected}, received {actual}; partition invalidated")]
    Checksum {
        /// The partition.
        partition: String,
        /// What the job said.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// The compressed data is corrupt or truncated.
    #[error("image for {partition:?} is corrupt: {source}")]
    Corrupt {
        /// The partition.
        partition: String,
        /// The decoder's error.
        source: std::io::Error,
    },
    /// The source stopped delivering (connection dropped, timed out).
    #[error("image stream for {partition:?} broke after {received} bytes: {source}")]
    Source {
        /// The partition.
        partition: String,
        /// Bytes received before it broke.
        received: u64,
        /// Why.
        source: std::io::Error,
    },
    /// Writing or syncing the partition failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The device or file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The error kind a source reports when the transfer itself broke, so it is
/// told apart from a decoder error.
pub const SOURCE_BROKE: std::io::ErrorKind = std::io::ErrorKind::BrokenPipe;

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Writes the image read from `source` to `target` and verifies it.
///
/// # Errors
/// See [`DeployError`]; the partition is invalidated on every error after
/// writing began.
pub fn write_image(
    source: impl Read,
    mut target: WriteTarget,
    spec: &ImageSpec,
) -> Result<Written, DeployError> {
    let mut input = BufReader::with_capacity(
        BLOCK,
        Hashing {
            inner: source,
            hasher: Sha256::new(),
            count: 0,
        },
    );
    let classify = |e: std::io::Error, received: u64| {
        if e.kind() == SOURCE_BROKE {
            DeployError::Source {
                partition: spec.partition.clone(),
                received,
                source: e,
            }
        } else {
            DeployError::Corrupt {
                partition: spec.partition.clone(),
                source: e,
            }
        }
    };
    let head = input.fill_buf().map_err(|e| classify(e, 0))?;
    let gzip = match spec.compression {
        Compression::Gzip => true,
        Compression::None => false,
        Compression::Detect => head.starts_with(&[0x1f, 0x8b]),
    };
    if !gzip && spec.source_size > target.capacity {
        return Err(DeployError::TooLarge {
            partition: spec.partition.clone(),
            capacity: target.capacity,
            needed: spec.source_size,
            known: true,
        });
    }

    let result = copy(&mut input, gzip, &mut target, spec).and_then(|written| {
        // Bytes after the image (none for a well-formed source) still count in the hash.
        std::io::copy(&mut input, &mut std::io::sink())
            .map_err(|e| classify(e, input.get_ref().count))?;
        target
            .file
            .sync_all()
            .map_err(|source| DeployError::Write {
                path: target.path.clone(),
                source,
            })?;
        let received = input.get_ref().count;
        let actual = ferry_proto::hex(&input.get_ref().hasher.clone().finalize());
        if !actual.eq_ignore_ascii_case(&spec.sha256) {
            return Err(DeployError::Checksum {
                partition: spec.partition.clone(),
                expected: spec.sha256.clone(),
                actual,
            });
        }
        Ok(Written {
            received,
            written,
            sha256: actual,
        })
    });
    result.inspect_err(|_| {
        if let Err(inv) = invalidate(&mut target) {
            tracing::error!(
                "could not invalidate {} after a failed deploy: {inv}",
                target.path.display()
            );
        }
    })
}

fn copy(
    input: &mut BufReader<Hashing<impl Read>>,
    gzip: bool,
    target: &mut WriteTarget,
    spec: &ImageSpec,
) -> Result<u64, DeployError> {
    let mut decoder: Box<dyn Read + '_> = if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(&mut *input))
    } else {
        Box::new(&mut *input)
    };
    target
        .file
        .seek(SeekFrom::Start(0))
        .map_err(|source| DeployError::Write {
            path: target.path.clone(),
            source,
        })?;
    let mut buf = vec![0u8; BLOCK];
    let mut written = 0u64;
    loop {
        // Fill the whole block so writes stay large and aligned.
        let mut filled = 0;
        while filled < BLOCK {
            match decoder.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == SOURCE_BROKE => {
                    return Err(DeployError::Source {
                        partition: spec.partition.clone(),
                        received: written,
                        source: e,
                    })
                }
                Err(e) => {
                    return Err(DeployError::Corrupt {
                        partition: spec.partition.clone(),
                        source: e,
                    })
                }
            }
        }
        if filled == 0 {
            return Ok(written);
        }
        if written + filled as u64 > target.capacity {
            return Err(DeployError::TooLarge {
                partition: spec.partition.clone(),
                capacity: target.capacity,
                needed: written + filled as u64,
                known: false,
            });
        }
        target
            .file
            .write_all(&buf[..filled])
            .map_err(|source| DeployError::Write {
                path: target.path.clone(),
                source,
            })?;
        written += filled as u64;
    }
}

/// Zeroes the start of the partition so nothing boots a half-written image.
fn invalidate(target: &mut WriteTarget) -> std::io::Result<()> {
    let n = INVALIDATE.min(target.capacity) as usize;
    target.file.seek(SeekFrom::Start(0))?;
    target.file.write_all(&vec![0u8; n])?;
    target.file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::Cursor;

    fn sha(data: &[u8]) -> String {
        ferry_proto::hex(&Sha256::digest(data))
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).expect("gz");
        e.finish().expect("gz")
    }

    fn target(dir: &tempfile::TempDir, size: u64, fill: u8) -> (WriteTarget, PathBuf) {
        let path = dir.path().join("part");
        std::fs::write(&path, vec![fill; size as usize]).expect("write");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        (
            WriteTarget {
                file,
                capacity: size,
                path: path.clone(),
            },
            path,
        )
    }

    fn spec(sha256: String, source_size: u64) -> ImageSpec {
        ImageSpec {
            partition: "p".into(),
            sha256,
            compression: Compression::Detect,
            source_size,
        }
    }

    fn image() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn raw_and_gzip_land_byte_for_byte() {
        let img = image();
        for source in [img.clone(), gz(&img)] {
            let dir = tempfile::tempdir().expect("tmp");
            let (t, path) = target(&dir, 4_000_000, 0xee);
            let w = write_image(
                Cursor::new(&source),
                t,
                &spec(sha(&source), source.len() as u64),
            )
            .expect("deploy");
            assert_eq!(w.written, img.len() as u64);
            assert_eq!(w.received, source.len() as u64);
            let on_disk = std::fs::read(path).expect("read");
            assert_eq!(&on_disk[..img.len()], &img[..]);
        }
    }

    #[test]
    fn a_corrupted_byte_is_caught_and_the_partition_invalidated() {
        let img = image();
        let mut bad = img.clone();
        bad[1000] ^= 1;
        let dir = tempfile::tempdir().expect("tmp");
        let (t, path) = target(&dir, 4_000_000, 0xee);
        let err = write_image(Cursor::new(&bad), t, &spec(sha(&img), bad.len() as u64))
            .expect_err("must fail");
        assert!(
            matches!(&err, DeployError::Checksum { expected, actual, .. }
            if *expected == sha(&img) && *actual == sha(&bad)),
            "{err}"
        );
        let on_disk = std::fs::read(path).expect("read");
        assert!(on_disk[..INVALIDATE as usize].iter().all(|b| *b == 0));
    }

    #[test]
    fn corrupt_or_truncated_gzip_is_corrupt() {
        let img = gz(&image());
        let truncated = &img[..img.len() / 2];
        let dir = tempfile::tempdir().expect("tmp");
        let (t, _) = target(&dir, 4_000_000, 0);
        let err = write_image(Cursor::new(truncated), t, &spec(sha(truncated), 0))
            .expect_err("truncated");
        assert!(matches!(err, DeployError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn too_large_is_refused_before_writing_when_size_is_known() {
        let img = image();
        let dir = tempfile::tempdir().expect("tmp");
        let (t, path) = target(&dir, 1_000_000, 0xee);
        let err = write_image(Cursor::new(&img), t, &spec(sha(&img), img.len() as u64))
            .expect_err("too big");
        assert!(
            matches!(err, DeployError::TooLarge { known: true, .. }),
            "{err}"
        );
        assert!(
            std::fs::read(path)
                .expect("read")
                .iter()
                .all(|b| *b == 0xee),
            "nothing written"
        );
    }

    #[test]
    fn too_large_after_decompression_is_caught_while_writing() {
        let img = gz(&image());
        let dir = tempfile::tempdir().expect("tmp");
        let (t, path) = target(&dir, 1_500_000, 0xee);
        let err = write_image(Cursor::new(&img), t, &spec(sha(&img), img.len() as u64))
            .expect_err("too big");
        assert!(
            matches!(err, DeployError::TooLarge { known: false, .. }),
            "{err}"
        );
        assert_eq!(
            std::fs::metadata(path).expect("meta").len(),
            1_500_000,
            "never grows past the partition"
        );
    }

    /// A source that delivers some bytes and then reports the transfer broke.
    struct Broken(Cursor<Vec<u8>>);
    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(std::io::Error::new(SOURCE_BROKE, "connection dropped")),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn a_broken_stream_is_a_source_error() {
        let img = image();
        let dir = tempfile::tempdir().expect("tmp");
        let (t, _) = target(&dir, 4_000_000, 0);
        let err = write_image(
            Broken(Cursor::new(img[..100_000].to_vec())),
            t,
            &spec(sha(&img), 0),
        )
        .expect_err("broken");
        assert!(matches!(err, DeployError::Source { .. }), "{err}");
    }
}
