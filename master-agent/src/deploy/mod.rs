//! Writing an image to a partition: decompress while writing, hash what was
//! received, write only what holds data, refuse to overflow the partition,
//! sync before acknowledging, and leave a partition whose deploy failed
//! unbootable.
//!
//! Transport-free: the source is any `Read` (the gRPC stream, an HTTP
//! download, a file in tests); this runs on blocking threads, as a
//! pipeline of three: reading and hashing the file as given, decoding it,
//! and placing it on the partition ([`sparse`]), joined by bounded queues
//! of 1 MiB buffers that are recycled, so memory stays flat.

pub mod bmap;
pub mod format;
pub mod rootfs;
pub mod sparse;

use std::io::{BufRead, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

pub use self::bmap::Bmap;
pub use self::format::Compression;
pub use self::rootfs::Unpacked;
use self::sparse::Placer;
use crate::platform::WriteTarget;

/// Size of reads and writes: large, so the disk sees big sequential writes.
const BLOCK: usize = 1 << 20;
/// Buffers in flight between two stages.
const DEPTH: usize = 4;
/// Bytes zeroed at the start of a partition whose deploy failed.
const INVALIDATE: u64 = 1 << 20;

/// How far a deploy has got, updated by its threads and read by whoever
/// reports it (the gRPC service streams it to the dispatcher).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of the file as given received.
    pub received: AtomicU64,
    /// Size of that file; 0 if unknown.
    pub source_size: AtomicU64,
    /// Bytes of the decoded image placed (or unpacked).
    pub image: AtomicU64,
    /// Bytes read back (`verify: readback`); the deploy is in that stage
    /// once `reading_back` is set.
    pub read_back: AtomicU64,
    /// The written image is being read back.
    pub reading_back: AtomicBool,
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
    /// The image's block map: only its ranges are written, each verified.
    pub bmap: Option<Bmap>,
    /// Read the written image back from the partition (past the page
    /// cache) and check it: its sha256, or each bmap range's checksum.
    pub readback: bool,
    /// Where the deploy reports how far it has got.
    pub progress: Arc<Progress>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Bytes received.
    pub received: u64,
    /// Bytes of the (decompressed) image.
    pub image: u64,
    /// Bytes written to the partition (holes and unmapped ranges are not).
    pub written: u64,
    /// sha256 of the bytes received.
    pub sha256: String,
    /// The compression that was decoded.
    pub compression: Compression,
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
    /// A bmap range's bytes do not match its checksum.
    #[error("bmap range {start}..{end} of the image for {partition:?} has checksum {actual}, the bmap says {expected}; partition invalidated")]
    RangeChecksum {
        /// The partition.
        partition: String,
        /// First byte of the range.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The bmap's checksum.
        expected: String,
        /// What was written.
        actual: String,
    },
    /// The image and its bmap disagree (length).
    #[error("image for {partition:?} does not match its bmap: {why}")]
    Bmap {
        /// The partition.
        partition: String,
        /// How.
        why: String,
    },
    /// What was read back from the partition is not what was written.
    #[error("read back from partition {partition:?}, {what} has sha256 {actual}, {expected} was written; partition invalidated")]
    Readback {
        /// The partition.
        partition: String,
        /// The image, or which bmap range.
        what: String,
        /// The checksum of what was written.
        expected: String,
        /// The checksum of what was read back.
        actual: String,
    },
    /// The job asks for something this image cannot have.
    #[error("image for {partition:?}: {why}")]
    Unsupported {
        /// The partition.
        partition: String,
        /// What and why.
        why: String,
    },
    /// A rootfs tarball that cannot be unpacked inside its filesystem.
    #[error("rootfs tarball for {partition:?}: {source}; partition invalidated")]
    Rootfs {
        /// The partition.
        partition: String,
        /// What was refused.
        source: rootfs::UnpackError,
    },
    /// The compressed data is corrupt or truncated.
    #[error("image for {partition:?} is corrupt ({compression}): {source}")]
    Corrupt {
        /// The partition.
        partition: String,
        /// The decoder.
        compression: &'static str,
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

/// A stage ended because the next one stopped taking its output (whose own
/// result says why).
struct Stopped;

/// Buffers handed back and forth between two stages.
struct Pool {
    give: SyncSender<Vec<u8>>,
    /// Only one stage takes from a pool: the lock is never contended.
    take: Mutex<Receiver<Vec<u8>>>,
}

impl Pool {
    fn new() -> Self {
        let (give, take) = sync_channel(DEPTH + 2);
        for _ in 0..DEPTH + 2 {
            let _ = give.send(Vec::with_capacity(BLOCK));
        }
        Pool {
            give,
            take: Mutex::new(take),
        }
    }
    /// An empty buffer: a recycled one, or a new one once the other side is gone.
    fn get(&self) -> Vec<u8> {
        let recycled = self.take.lock().ok().and_then(|t| t.recv().ok());
        let mut b = recycled.unwrap_or_else(|| Vec::with_capacity(BLOCK));
        b.clear();
        b
    }
}

/// Fills `buf` up to `BLOCK` bytes from `r`; fewer only at the end.
fn fill(r: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.resize(BLOCK, 0);
    let mut n = 0;
    while n < BLOCK {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                buf.truncate(n);
                return Err(e);
            }
        }
    }
    buf.truncate(n);
    Ok(())
}

/// Stage one: reads the file as given and hashes it. When the decoder failed
/// (`drain`), the rest is still read and hashed so a transfer corruption is
/// told apart from a corrupt file.
fn read_stage(
    source: impl Read,
    out: SyncSender<Vec<u8>>,
    pool: &Pool,
    drain: &AtomicBool,
    progress: &Progress,
) -> Result<(u64, String), Result<DeployError, Stopped>> {
    // Counted as it arrives, not per block, so a slow source shows progress.
    let mut source = Counted(source, &progress.received);
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    let mut open = true;
    // Once the next stage is gone, one buffer is reused for draining.
    let mut spare: Option<Vec<u8>> = None;
    loop {
        let mut buf = spare.take().unwrap_or_else(|| pool.get());
        fill(&mut source, &mut buf).map_err(|source| {
            Ok(DeployError::Source {
                partition: String::new(),
                received: count + buf.len() as u64,
                source,
            })
        })?;
        if buf.is_empty() {
            return Ok((count, ferry_proto::hex(&hasher.finalize())));
        }
        hasher.update(&buf);
        count += buf.len() as u64;
        if open {
            if let Err(back) = out.send(buf) {
                open = false;
                spare = Some(back.0);
            }
        } else {
            spare = Some(buf);
        }
        if !open && !drain.load(Ordering::Acquire) {
            return Err(Err(Stopped));
        }
    }
}

/// Reads the blocks of a queue as one stream (a decoder's input), returning
/// each buffer to its pool once read.
struct QueueReader<'p> {
    queue: Receiver<Vec<u8>>,
    pool: &'p Pool,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for QueueReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = out.len().min(avail.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for QueueReader<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos == self.buf.len() {
            match self.queue.recv() {
                Ok(next) => {
                    let used = std::mem::replace(&mut self.buf, next);
                    let _ = self.pool.give.try_send(used);
                    self.pos = 0;
                }
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.buf[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

/// Stage two: decodes into full blocks.
fn decode_stage(
    input: QueueReader<'_>,
    compression: Compression,
    out: SyncSender<Vec<u8>>,
    pool: &Pool,
    drain: &AtomicBool,
) -> Result<(), Result<std::io::Error, Stopped>> {
    // The failure flag is raised before the decoder (and with it the queue
    // from the reader) is dropped, so the reader knows to drain.
    let failed = |e: std::io::Error| {
        drain.store(true, Ordering::Release);
        Err(Ok(e))
    };
    let mut decoder = match compression.decoder(input) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(()),
        Err(e) => return failed(e),
    };
    loop {
        let mut buf = pool.get();
        if let Err(e) = fill(&mut decoder, &mut buf) {
            return failed(e);
        }
        if buf.is_empty() {
            return Ok(());
        }
        out.send(buf).map_err(|_| Err(Stopped))?;
    }
}

/// Writes the image read from `source` to `target` and verifies it.
///
/// # Errors
/// See [`DeployError`]; the partition is invalidated on every error after
/// writing began.
pub fn write_image(
    source: impl Read + Send,
    target: WriteTarget,
    spec: &ImageSpec,
) -> Result<Written, DeployError> {
    let (result, touched) = pipeline(source, &target, spec);
    // A refusal before the first byte (an image known not to fit) leaves
    // the partition as it was; any other failure leaves it unbootable, even
    // one before the first write (the old image was not what the job wanted).
    result.inspect_err(|e| {
        if !touched && matches!(e, DeployError::TooLarge { known: true, .. }) {
            return;
        }
        if let Err(inv) = invalidate(&target) {
            tracing::error!(
                "could not invalidate {} after a failed deploy: {inv}",
                target.path.display()
            );
        }
    })
}

/// Runs the stages; also says whether the partition was touched.
fn pipeline(
    source: impl Read + Send,
    target: &WriteTarget,
    spec: &ImageSpec,
) -> (Result<Written, DeployError>, bool) {
    let partition = spec.partition.as_str();
    let too_large = |needed: u64| DeployError::TooLarge {
        partition: partition.into(),
        capacity: target.capacity,
        needed,
        known: true,
    };
    if let Some(b) = &spec.bmap {
        if b.image_size > target.capacity {
            return (Err(too_large(b.image_size)), false);
        }
    }
    let drain = AtomicBool::new(false);
    let (read_pool, decode_pool) = (Pool::new(), Pool::new());
    std::thread::scope(|scope| {
        let (raw_tx, raw_rx) = sync_channel::<Vec<u8>>(DEPTH);
        let reader = scope.spawn(|| read_stage(source, raw_tx, &read_pool, &drain, &spec.progress));

        // The first block decides the format (and, raw, whether it fits).
        let first = raw_rx.recv().ok();
        let head = first.as_deref().unwrap_or_default();
        let compression = spec.compression.resolve(head);
        let stated = match compression {
            Compression::None => Some(spec.source_size).filter(|s| *s > 0),
            c => c.stated_size(head),
        };
        let early = stated.filter(|s| *s > target.capacity).map(too_large);

        let mut placer = Placer::new(target, partition, spec.bmap.as_ref());
        // Readback of a decoded image needs its hash (a raw one's is the file's).
        let mut decoded_hash =
            (spec.readback && spec.bmap.is_none() && compression != Compression::None)
                .then(Sha256::new);
        let (placed, decoded) = match (early, compression) {
            (Some(e), _) => {
                drop(raw_rx);
                (Err(e), Ok(()))
            }
            (None, Compression::None | Compression::Detect) => {
                let placed = first.into_iter().chain(raw_rx.iter()).try_for_each(|b| {
                    let r = placer.put(&b);
                    spec.progress
                        .image
                        .store(placer.offset(), Ordering::Relaxed);
                    let _ = read_pool.give.try_send(b);
                    r
                });
                (placed, Ok(()))
            }
            (None, c) => {
                let (dec_tx, dec_rx) = sync_channel::<Vec<u8>>(DEPTH);
                let input = QueueReader {
                    queue: raw_rx,
                    pool: &read_pool,
                    buf: first.unwrap_or_default(),
                    pos: 0,
                };
                let (decode_pool, drain) = (&decode_pool, &drain);
                let decoder =
                    scope.spawn(move || decode_stage(input, c, dec_tx, decode_pool, drain));
                let placed = dec_rx.iter().try_for_each(|b| {
                    if let Some(h) = decoded_hash.as_mut() {
                        h.update(&b);
                    }
                    let r = placer.put(&b);
                    spec.progress
                        .image
                        .store(placer.offset(), Ordering::Relaxed);
                    let _ = decode_pool.give.try_send(b);
                    r
                });
                drop(dec_rx);
                let decoded = decoder
                    .join()
                    .unwrap_or_else(|_| Err(Ok(std::io::Error::other("the decoder panicked"))));
                (placed, decoded)
            }
        };
        let image = placer.offset();
        let touched = placer.touched();
        let placed = placed.and_then(|()| placer.finish());
        let read = reader.join().unwrap_or_else(|_| {
            Err(Ok(DeployError::Source {
                partition: String::new(),
                received: 0,
                source: std::io::Error::other("the reader panicked"),
            }))
        });

        let result = verdict(
            spec,
            compression,
            image,
            read,
            placed,
            decoded,
            Some(target),
        );
        let result = result.and_then(|w| {
            if spec.readback {
                let expected = decoded_hash
                    .map_or_else(|| w.sha256.clone(), |h| ferry_proto::hex(&h.finalize()));
                read_back(target, spec, w.image, &expected)?;
            }
            Ok(w)
        });
        (result, touched)
    })
}

/// Which failure to report: a broken transfer, then a file that is not
/// what the job said, then the partition's or the bmap's word, then the
/// decoder's (a file that is what the job said but does not decode).
fn verdict(
    spec: &ImageSpec,
    compression: Compression,
    image: u64,
    read: Result<(u64, String), Result<DeployError, Stopped>>,
    placed: Result<u64, DeployError>,
    decoded: Result<(), Result<std::io::Error, Stopped>>,
    target: Option<&WriteTarget>,
) -> Result<Written, DeployError> {
    let partition = spec.partition.as_str();
    {
        let (received, sha256) = match read {
            Err(Ok(DeployError::Source {
                received, source, ..
            })) => {
                return Err(DeployError::Source {
                    partition: partition.into(),
                    received,
                    source,
                })
            }
            Err(Ok(e)) => return Err(e),
            Ok(r) => Some(r),
            Err(Err(Stopped)) => None,
        }
        .unzip();
        // Refused before writing (the reader may have finished a small file meanwhile).
        if let Err(e @ DeployError::TooLarge { known: true, .. }) = placed {
            return Err(e);
        }
        if let Some(actual) = sha256
            .as_ref()
            .filter(|a| !a.eq_ignore_ascii_case(&spec.sha256))
        {
            return Err(DeployError::Checksum {
                partition: partition.into(),
                expected: spec.sha256.clone(),
                actual: actual.clone(),
            });
        }
        // A decoder that failed ends its output early, which the writer may
        // have reported first (a tarball cut short): the decoder's word wins.
        match decoded {
            Err(Ok(source)) => {
                return Err(DeployError::Corrupt {
                    partition: partition.into(),
                    compression: compression.name(),
                    source,
                })
            }
            Err(Err(Stopped)) | Ok(()) => {}
        }
        let written = placed?;
        let (Some(received), Some(sha256)) = (received, sha256) else {
            return Err(DeployError::Source {
                partition: partition.into(),
                received: 0,
                source: std::io::Error::other("the reader stopped early"),
            });
        };
        if let Some(target) = target {
            target
                .file
                .sync_all()
                .map_err(|source| DeployError::Write {
                    path: target.path.clone(),
                    source,
                })?;
        }
        Ok(Written {
            received,
            image,
            written,
            sha256,
            compression,
        })
    }
}

/// Reads the image back from the partition, past the page cache, and
/// checks it: the whole image against `expected` (its sha256), or with a
/// bmap each mapped range against its checksum.
fn read_back(
    target: &WriteTarget,
    spec: &ImageSpec,
    image: u64,
    expected: &str,
) -> Result<(), DeployError> {
    let io_err = |source| DeployError::Write {
        path: target.path.clone(),
        source,
    };
    if let Some(at) = target.readback_fault {
        let mut b = [0u8; 1];
        target.file.read_exact_at(&mut b, at).map_err(io_err)?;
        target
            .file
            .write_all_at(&[b[0] ^ 0xff], at)
            .map_err(io_err)?;
        target.file.sync_all().map_err(io_err)?;
    }
    // Written pages are clean after the sync: dropping them makes the
    // reads below come from the medium.
    let _ = nix::fcntl::posix_fadvise(
        &target.file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    let mut buf = vec![0u8; BLOCK];
    let progress = &spec.progress;
    progress.reading_back.store(true, Ordering::Relaxed);
    let mut hash_range = |start: u64, end: u64, h: &mut dyn FnMut(&[u8])| {
        let mut at = start;
        while at < end {
            let n = BLOCK.min((end - at) as usize);
            target
                .file
                .read_exact_at(&mut buf[..n], at)
                .map_err(io_err)?;
            h(&buf[..n]);
            at += n as u64;
            progress.read_back.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok::<(), DeployError>(())
    };
    let mismatch = |what: String, expected: &str, actual: String| DeployError::Readback {
        partition: spec.partition.clone(),
        what,
        expected: expected.into(),
        actual,
    };
    match &spec.bmap {
        None => {
            let mut h = Sha256::new();
            hash_range(0, image, &mut |b| h.update(b))?;
            let actual = ferry_proto::hex(&h.finalize());
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(mismatch(
                    format!("the image ({image} bytes)"),
                    expected,
                    actual,
                ));
            }
        }
        Some(bmap) => {
            let mut h = bmap::RangeHasher::new(bmap.kind);
            for r in &bmap.ranges {
                hash_range(r.start, r.end, &mut |b| h.update(b))?;
                let actual = h.finish();
                if actual != r.checksum {
                    return Err(mismatch(
                        format!("bmap range {}..{}", r.start, r.end),
                        &r.checksum,
                        actual,
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Unpacks the rootfs tarball read from `source` (compressed or not) into
/// What a rootfs tarball cannot be asked for: a bmap (it maps a disk
/// image) or a read-back (the files are not a byte range to read back).
/// Checked before the partition's filesystem is made.
///
/// # Errors
/// [`DeployError::Bmap`] or [`DeployError::Unsupported`].
pub fn check_rootfs_spec(spec: &ImageSpec) -> Result<(), DeployError> {
    if spec.bmap.is_some() {
        return Err(DeployError::Bmap {
            partition: spec.partition.clone(),
            why: "a bmap maps a disk image; this image is a rootfs tarball".into(),
        });
    }
    if spec.readback {
        return Err(DeployError::Unsupported {
            partition: spec.partition.clone(),
            why: "verify: readback reads back a disk image; this image is a rootfs tarball (its sha256 is still checked)".into(),
        });
    }
    Ok(())
}

/// Unpacks the (possibly compressed) rootfs tarball `source` into
/// `root`, a fresh filesystem of `capacity` bytes, confined to it (see
/// [`rootfs`]), and verifies the file as given. Reading and hashing,
/// decoding and unpacking run on their own threads. The caller makes the
/// filesystem and, on error, invalidates the partition.
///
/// # Errors
/// See [`DeployError`]; a refused entry is [`DeployError::Rootfs`].
pub fn write_rootfs(
    source: impl Read + Send,
    root: &cap_std::fs::Dir,
    capacity: u64,
    spec: &ImageSpec,
) -> Result<(Written, Unpacked), DeployError> {
    let partition = spec.partition.as_str();
    check_rootfs_spec(spec)?;
    let drain = AtomicBool::new(false);
    let (read_pool, decode_pool) = (Pool::new(), Pool::new());
    std::thread::scope(|scope| {
        let (raw_tx, raw_rx) = sync_channel::<Vec<u8>>(DEPTH);
        let reader = scope.spawn(|| read_stage(source, raw_tx, &read_pool, &drain, &spec.progress));
        let first = raw_rx.recv().ok();
        let compression = spec
            .compression
            .resolve(first.as_deref().unwrap_or_default());
        let raw = QueueReader {
            queue: raw_rx,
            pool: &read_pool,
            buf: first.unwrap_or_default(),
            pos: 0,
        };
        let (unpacked, image, decoded) = match compression {
            Compression::None | Compression::Detect => {
                let (u, n) = unpack_stream(root, raw, capacity, &drain, &spec.progress);
                (u, n, Ok(()))
            }
            c => {
                let (dec_tx, dec_rx) = sync_channel::<Vec<u8>>(DEPTH);
                let (decode_pool, drain) = (&decode_pool, &drain);
                let decoder = scope.spawn(move || decode_stage(raw, c, dec_tx, decode_pool, drain));
                let input = QueueReader {
                    queue: dec_rx,
                    pool: decode_pool,
                    buf: Vec::new(),
                    pos: 0,
                };
                let (u, n) = unpack_stream(root, input, capacity, drain, &spec.progress);
                let decoded = decoder
                    .join()
                    .unwrap_or_else(|_| Err(Ok(std::io::Error::other("the decoder panicked"))));
                (u, n, decoded)
            }
        };
        let read = reader.join().unwrap_or_else(|_| {
            Err(Ok(DeployError::Source {
                partition: String::new(),
                received: 0,
                source: std::io::Error::other("the reader panicked"),
            }))
        });
        let (placed, unpacked) = match unpacked {
            Ok(u) => (Ok(u.bytes), u),
            Err(source) => (
                Err(DeployError::Rootfs {
                    partition: partition.into(),
                    source,
                }),
                Unpacked::default(),
            ),
        };
        let written = verdict(spec, compression, image, read, placed, decoded, None)?;
        Ok((written, unpacked))
    })
}

/// Unpacks the decoded tar stream `input`, then reads it to its end (so the
/// whole file is hashed); on failure tells the reader to go on hashing.
/// Returns also the decoded bytes read.
fn unpack_stream(
    root: &cap_std::fs::Dir,
    input: QueueReader<'_>,
    limit: u64,
    drain: &AtomicBool,
    progress: &Progress,
) -> (Result<Unpacked, rootfs::UnpackError>, u64) {
    let mut input = Counted(input, &progress.image);
    let r = rootfs::unpack(root, &mut input, limit).and_then(|u| {
        std::io::copy(&mut input, &mut std::io::sink())
            .map(|_| u)
            .map_err(rootfs::UnpackError::Read)
    });
    if r.is_err() {
        drain.store(true, Ordering::Release);
    }
    (r, progress.image.load(Ordering::Relaxed))
}

/// A reader that counts the bytes read through it.
struct Counted<'a, R>(R, &'a AtomicU64);

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// What a deploy's file holds, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// A disk or partition image, written block for block.
    Image,
    /// A rootfs tarball, unpacked into a fresh filesystem.
    Tarball,
}

/// Bytes looked at to tell a tarball from an image (a compressed file's
/// first tar header needs a few KiB at most).
const SNIFF: u64 = 64 << 10;

/// Reads the start of `source` to tell what it holds, and gives back a
/// reader of the whole file (a read error is replayed in its place, so the
/// pipeline reports it as it would any other).
pub fn sniff(mut source: impl Read, compression: Compression) -> (impl Read, Content) {
    let mut head = Vec::new();
    let mut error = None;
    // Only as much as it takes to tell (usually the first read), so the
    // pipeline (and its progress) starts at once.
    let tarball = loop {
        let mut piece = [0u8; 16 << 10];
        let room = (SNIFF as usize).saturating_sub(head.len()).min(piece.len());
        match source.read(&mut piece[..room]) {
            Ok(0) => break compression.resolve(&head).is_tarball(&head),
            Ok(n) => head.extend_from_slice(&piece[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error = Some(e);
                break false;
            }
        }
        if let Some(t) = compression.resolve(&head).tarball(&head) {
            break t;
        }
        if head.len() as u64 >= SNIFF {
            break false;
        }
    };
    let content = if tarball {
        Content::Tarball
    } else {
        Content::Image
    };
    let replay = Replay {
        head: std::io::Cursor::new(head),
        error,
        rest: source,
    };
    (replay, content)
}

/// The sniffed start, then a read error if there was one, then the rest.
struct Replay<R> {
    head: std::io::Cursor<Vec<u8>>,
    error: Option<std::io::Error>,
    rest: R,
}

impl<R: Read> Read for Replay<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.head.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.rest.read(buf)
    }
}

/// Zeroes the start of the partition so nothing boots a half-written image
/// (for a filesystem, its superblock).
///
/// # Errors
/// When writing or syncing fails.
pub fn invalidate(target: &WriteTarget) -> std::io::Result<()> {
    let n = INVALIDATE.min(target.capacity) as usize;
    target.file.write_all_at(&vec![0u8; n], 0)?;
    target.file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::{Cursor, Write};

    fn sha(data: &[u8]) -> String {
        ferry_proto::hex(&Sha256::digest(data))
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).expect("gz");
        e.finish().expect("gz")
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(data).expect("xz");
        e.finish().expect("xz")
    }

    /// A zstd frame that states its content size, as `zstd FILE` writes it.
    fn zst(data: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(data, 3).expect("zstd")
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
                readback_fault: None,
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
            bmap: None,
            readback: false,
            progress: Default::default(),
        }
    }

    fn image() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
    }

    /// An image with zero stretches: inside a block, across a block
    /// boundary, and at the end.
    fn holey() -> Vec<u8> {
        let mut img = image();
        for (a, b) in [
            (200_000, 600_000),
            (900_000, 1_300_000),
            (2_700_000, 3_000_000),
        ] {
            img[a..b].fill(0);
        }
        img
    }

    #[test]
    fn every_format_lands_byte_for_byte_and_holes_read_back_as_zeros() {
        let img = holey();
        for (name, source) in [
            ("none", img.clone()),
            ("gzip", gz(&img)),
            ("xz", xz(&img)),
            ("zstd", zst(&img)),
        ] {
            let dir = tempfile::tempdir().expect("tmp");
            // The partition held other bytes: holes must be zeros afterwards.
            let (t, path) = target(&dir, 4_000_000, 0xee);
            let w = write_image(
                Cursor::new(&source),
                t,
                &spec(sha(&source), source.len() as u64),
            )
            .expect(name);
            assert_eq!(w.compression.name(), name);
            assert_eq!(w.image, img.len() as u64, "{name}");
            assert!(
                w.written < img.len() as u64 - 700_000,
                "{name}: holes were written ({})",
                w.written
            );
            let on_disk = std::fs::read(path).expect("read");
            assert!(on_disk[..img.len()] == img[..], "{name}: differs on disk");
            assert!(
                on_disk[img.len()..].iter().all(|b| *b == 0xee),
                "{name}: wrote past the image"
            );
        }
    }

    #[test]
    fn a_named_compression_is_used_and_a_wrong_one_is_corrupt() {
        let img = image();
        let source = zst(&img);
        let dir = tempfile::tempdir().expect("tmp");
        let (t, _) = target(&dir, 4_000_000, 0);
        let mut s = spec(sha(&source), 0);
        s.compression = Compression::Xz;
        let err = write_image(Cursor::new(&source), t, &s).expect_err("not xz");
        assert!(
            matches!(
                err,
                DeployError::Corrupt {
                    compression: "xz",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_corrupted_byte_in_a_compressed_file_is_a_checksum_mismatch() {
        let img = image();
        for good in [gz(&img), xz(&img), zst(&img)] {
            let mut bad = good.clone();
            let at = bad.len() / 3;
            bad[at] ^= 0x40;
            let dir = tempfile::tempdir().expect("tmp");
            let (t, path) = target(&dir, 4_000_000, 0xee);
            let err = write_image(Cursor::new(&bad), t, &spec(sha(&good), 0)).expect_err("bad");
            assert!(
                matches!(&err, DeployError::Checksum { actual, .. } if *actual == sha(&bad)),
                "{err}"
            );
            let on_disk = std::fs::read(path).expect("read");
            assert!(
                on_disk[..INVALIDATE as usize].iter().all(|b| *b == 0),
                "invalidated"
            );
        }
    }

    #[test]
    fn a_zstd_image_stating_a_size_too_large_is_refused_before_writing() {
        let img = image();
        let source = zst(&img);
        let dir = tempfile::tempdir().expect("tmp");
        let (t, path) = target(&dir, 2_000_000, 0xee);
        let err = write_image(Cursor::new(&source), t, &spec(sha(&source), 0)).expect_err("big");
        assert!(
            matches!(
                err,
                DeployError::TooLarge {
                    known: true,
                    needed: 3_000_000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(std::fs::read(path)
            .expect("read")
            .iter()
            .all(|b| *b == 0xee));
    }

    #[test]
    fn with_a_bmap_only_mapped_ranges_are_written_and_each_is_checked() {
        let img = holey();
        let text = bmap::tests::make(&img, 4096, &[(0, 48), (146, 219), (317, 659)]);
        let map = Bmap::parse(&text).expect("bmap");
        let source = zst(&img);
        let dir = tempfile::tempdir().expect("tmp");
        let (t, path) = target(&dir, 4_000_000, 0xee);
        let mut s = spec(sha(&source), 0);
        s.bmap = Some(map.clone());
        let w = write_image(Cursor::new(&source), t, &s).expect("deploy");
        assert_eq!(w.written, map.mapped_bytes());
        let on_disk = std::fs::read(&path).expect("read");
        assert!(
            on_disk[..img.len()] == img[..],
            "unmapped ranges read back as the image's zeros"
        );

        // A range whose data differs from its checksum: refused, invalidated.
        let mut other = img.clone();
        other[150 * 4096 + 5] ^= 1;
        let source = zst(&other);
        let (t, _) = target(&dir, 4_000_000, 0xee);
        let mut s = spec(sha(&source), 0);
        s.bmap = Some(map.clone());
        let err = write_image(Cursor::new(&source), t, &s).expect_err("range");
        assert!(
            matches!(err, DeployError::RangeChecksum { start, .. } if start == 146 * 4096),
            "{err}"
        );
        assert!(std::fs::read(&path).expect("read")[..INVALIDATE as usize]
            .iter()
            .all(|b| *b == 0));

        // An image longer than its bmap says.
        let mut longer = img.clone();
        longer.extend_from_slice(&[1; 5000]);
        let (t, _) = target(&dir, 4_000_000, 0xee);
        let mut s = spec(sha(&longer), 0);
        s.bmap = Some(map.clone());
        let err = write_image(Cursor::new(&longer), t, &s).expect_err("longer");
        assert!(matches!(err, DeployError::Bmap { .. }), "{err}");

        // A bmap for an image larger than the partition: refused before writing.
        let (t, path) = target(&dir, 2_000_000, 0xee);
        let mut s = spec(sha(&img), 0);
        s.bmap = Some(map);
        let err = write_image(Cursor::new(&img), t, &s).expect_err("big");
        assert!(
            matches!(err, DeployError::TooLarge { known: true, .. }),
            "{err}"
        );
        assert!(std::fs::read(path)
            .expect("read")
            .iter()
            .all(|b| *b == 0xee));
    }

    #[test]
    fn readback_passes_a_good_write_and_catches_a_flipped_byte_naming_both_hashes() {
        let img = holey();
        let text = bmap::tests::make(&img, 4096, &[(0, 48), (146, 219), (317, 659)]);
        let map = Bmap::parse(&text).expect("bmap");
        for (name, source, bmap) in [
            ("raw", img.clone(), None),
            ("gzip", gz(&img), None),
            ("zstd+bmap", zst(&img), Some(map)),
        ] {
            let dir = tempfile::tempdir().expect("tmp");
            let mut s = spec(sha(&source), 0);
            s.readback = true;
            s.bmap = bmap;
            let (t, _) = target(&dir, 4_000_000, 0xee);
            write_image(Cursor::new(&source), t, &s).expect(name);

            // The medium changes a byte inside the data (a mapped range).
            let (mut t, path) = target(&dir, 4_000_000, 0xee);
            t.readback_fault = Some(150 * 4096 + 7);
            let err = write_image(Cursor::new(&source), t, &s).expect_err(name);
            let DeployError::Readback {
                expected, actual, ..
            } = &err
            else {
                panic!("{name}: {err}");
            };
            assert_ne!(expected, actual);
            let msg = err.to_string();
            assert!(
                msg.contains(expected.as_str()) && msg.contains(actual.as_str()),
                "{msg}"
            );
            if s.bmap.is_none() {
                assert_eq!(*expected, sha(&img), "{name}: the decoded image's hash");
            }
            let on_disk = std::fs::read(path).expect("read");
            assert!(
                on_disk[..INVALIDATE as usize].iter().all(|b| *b == 0),
                "{name}: invalidated"
            );
        }
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
        // The job's sha256 is of the truncated file: it is what was given, and it does not decode.
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

    #[test]
    fn a_tarball_cannot_be_read_back_or_mapped_and_is_refused_before_mkfs() {
        let mut s = spec(String::new(), 0);
        assert!(check_rootfs_spec(&s).is_ok());
        s.readback = true;
        let err = check_rootfs_spec(&s).expect_err("readback");
        assert!(matches!(err, DeployError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("readback"), "{err}");
    }
}
