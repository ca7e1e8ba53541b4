//! Placing the decoded image on the partition: data written with large
//! positioned writes, all-zero stretches made to read back as zeros without
//! writing them (a hole punched where the target can), and with a bmap only
//! its mapped ranges written, each checked against its checksum.

use std::os::unix::fs::FileExt;

use super::bmap::{Bmap, RangeHasher};
use super::DeployError;
use crate::platform::WriteTarget;

/// Zero detection works on stretches of this size: smaller zero runs are
/// written like data (a punch per 4 KiB would cost more than the write).
const GRAIN: usize = 64 << 10;

/// Every this many bytes written, writeback of what was written is started
/// (and the pages written before, clean by then, are dropped): the medium
/// writes while the rest of the image is still decoding, instead of all at
/// the final sync, and the page cache does not fill with the image.
const KICK: u64 = 8 << 20;

/// Whether every byte is zero; folds 4 KiB at a time so it vectorises,
/// stopping at the first stretch holding data.
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// How bytes are chosen for writing.
enum Mode<'b> {
    /// Everything written except zero stretches; `pending` is a zero run
    /// not yet made (it may continue in the next block).
    Holes {
        pending: Option<(u64, u64)>,
        punch: bool,
    },
    /// Only the bmap's ranges; `next` is the first range not yet complete.
    Bmap {
        bmap: &'b Bmap,
        next: usize,
        hasher: RangeHasher,
        /// Where the last range ended (the start of the unmapped gap after it).
        gap_from: u64,
        /// Unmapped gaps are punched: only in a file (the simulated board),
        /// where it is free. A block device charges the zeroing like a
        /// write (slow media, I/O throttles), and bmaptool leaves them too.
        punch_gaps: bool,
    },
}

/// Writes a decoded image block by block.
pub struct Placer<'a, 'b> {
    target: &'a WriteTarget,
    partition: &'a str,
    offset: u64,
    written: u64,
    /// Where writeback was last started up to.
    kicked: u64,
    /// Something was written or punched.
    touched: bool,
    mode: Mode<'b>,
}

impl<'a, 'b> Placer<'a, 'b> {
    /// Starts at the beginning of `target`, following `bmap` when there is one.
    pub fn new(target: &'a WriteTarget, partition: &'a str, bmap: Option<&'b Bmap>) -> Self {
        let mode = match bmap {
            Some(bmap) => Mode::Bmap {
                bmap,
                next: 0,
                hasher: RangeHasher::new(bmap.kind),
                gap_from: 0,
                punch_gaps: target
                    .file
                    .metadata()
                    .is_ok_and(|m| m.file_type().is_file()),
            },
            None => Mode::Holes {
                pending: None,
                punch: true,
            },
        };
        Placer {
            target,
            partition,
            offset: 0,
            written: 0,
            kicked: 0,
            touched: false,
            mode,
        }
    }

    /// Bytes of the image seen so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the partition was changed (written or punched).
    pub fn touched(&self) -> bool {
        self.touched
    }

    /// Bytes actually written to the partition.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn write_err(&self) -> impl FnOnce(std::io::Error) -> DeployError + '_ {
        |source| DeployError::Write {
            path: self.target.path.clone(),
            source,
        }
    }

    fn write_at(&mut self, data: &[u8], at: u64) -> Result<(), DeployError> {
        self.touched = true;
        self.target
            .file
            .write_all_at(data, at)
            .map_err(self.write_err())?;
        self.written += data.len() as u64;
        let end = at + data.len() as u64;
        if end >= self.kicked + KICK {
            // DONTNEED starts writeback of dirty pages and drops clean ones;
            // advice only, so its failure changes nothing.
            let from = self.kicked.saturating_sub(KICK);
            let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(end - from)) else {
                return Ok(());
            };
            let _ = nix::fcntl::posix_fadvise(
                &self.target.file,
                off,
                len,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            self.kicked = end;
        }
        Ok(())
    }

    /// Makes a zero run read back as zeros: punched, or written when the
    /// target cannot punch.
    fn zero(&mut self, start: u64, len: u64) -> Result<(), DeployError> {
        let Mode::Holes { punch, .. } = self.mode else {
            return Ok(());
        };
        if punch {
            self.touched = true;
            if self.target.punch(start, len).map_err(self.write_err())? {
                return Ok(());
            }
            if let Mode::Holes { punch, .. } = &mut self.mode {
                *punch = false;
            }
        }
        let zeros = vec![0u8; GRAIN.min(len as usize)];
        let mut at = start;
        while at < start + len {
            let n = zeros.len().min((start + len - at) as usize);
            self.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Places the next `block` of the image.
    ///
    /// # Errors
    /// The image overflows the partition or its bmap, a range's checksum
    /// does not match, or writing fails.
    pub fn put(&mut self, block: &[u8]) -> Result<(), DeployError> {
        let start = self.offset;
        let end = start + block.len() as u64;
        if end > self.target.capacity {
            return Err(DeployError::TooLarge {
                partition: self.partition.into(),
                capacity: self.target.capacity,
                needed: end,
                known: false,
            });
        }
        self.offset = end;
        match self.mode {
            Mode::Holes { .. } => self.put_holes(block, start),
            Mode::Bmap { .. } => self.put_mapped(block, start),
        }
    }

    fn put_holes(&mut self, block: &[u8], start: u64) -> Result<(), DeployError> {
        let mut data_from: Option<usize> = None;
        for (i, grain) in block.chunks(GRAIN).enumerate() {
            let at = i * GRAIN;
            if is_zero(grain) {
                if let Some(d) = data_from.take() {
                    self.write_at(&block[d..at], start + d as u64)?;
                }
                let (zs, zl) = (start + at as u64, grain.len() as u64);
                let Mode::Holes { pending, .. } = &mut self.mode else {
                    unreachable!("put_holes runs in holes mode")
                };
                match pending {
                    Some((s, l)) if *s + *l == zs => *l += zl,
                    _ => {
                        if let Some((s, l)) = pending.replace((zs, zl)) {
                            self.zero(s, l)?;
                        }
                    }
                }
            } else if data_from.is_none() {
                if let Mode::Holes { pending, .. } = &mut self.mode {
                    if let Some((s, l)) = pending.take() {
                        self.zero(s, l)?;
                    }
                }
                data_from = Some(at);
            }
        }
        if let Some(d) = data_from {
            self.write_at(&block[d..], start + d as u64)?;
        }
        Ok(())
    }

    fn put_mapped(&mut self, block: &[u8], start: u64) -> Result<(), DeployError> {
        let end = start + block.len() as u64;
        loop {
            let Mode::Bmap {
                bmap,
                next,
                hasher,
                gap_from,
                punch_gaps,
            } = &mut self.mode
            else {
                unreachable!("put_mapped runs in bmap mode")
            };
            let bmap: &'b Bmap = *bmap;
            if end > bmap.image_size {
                return Err(DeployError::Bmap {
                    partition: self.partition.into(),
                    why: format!(
                        "the image is longer than the bmap's ImageSize {}",
                        bmap.image_size
                    ),
                });
            }
            let Some(range) = bmap.ranges.get(*next) else {
                return Ok(());
            };
            if range.start >= end {
                return Ok(());
            }
            let (s, e) = (range.start.max(start), range.end.min(end));
            let piece = &block[(s - start) as usize..(e - start) as usize];
            hasher.update(piece);
            let gap = (*gap_from, range.start);
            let done = range.end <= end;
            let check = done.then(|| {
                (
                    hasher.finish(),
                    range.checksum.clone(),
                    range.start,
                    range.end,
                )
            });
            if done {
                *next += 1;
                *gap_from = range.end;
            }
            // Unmapped blocks are the image's don't-care: made to read as
            // zeros when that is free, never written.
            if *punch_gaps && s == range.start && gap.1 > gap.0 {
                self.touched = true;
                let _ = self.target.punch(gap.0, gap.1 - gap.0);
            }
            self.write_at(piece, s)?;
            let Some((actual, expected, rs, re)) = check else {
                // The range goes on in the next block.
                return Ok(());
            };
            {
                if actual != expected {
                    return Err(DeployError::RangeChecksum {
                        partition: self.partition.into(),
                        start: rs,
                        end: re,
                        expected,
                        actual,
                    });
                }
            }
        }
    }

    /// Ends the image: the last zero run is made, a bmap must have seen
    /// its whole image. Returns the bytes written.
    ///
    /// # Errors
    /// A short image under a bmap, or writing fails.
    pub fn finish(mut self) -> Result<u64, DeployError> {
        match &mut self.mode {
            Mode::Holes { pending, .. } => {
                if let Some((s, l)) = pending.take() {
                    self.zero(s, l)?;
                }
            }
            Mode::Bmap {
                bmap,
                gap_from,
                punch_gaps,
                ..
            } => {
                let (bmap, gap_from) = (*bmap, *gap_from);
                if *punch_gaps && gap_from < self.offset {
                    let _ = self.target.punch(gap_from, self.offset - gap_from);
                }
                if self.offset != bmap.image_size {
                    return Err(DeployError::Bmap {
                        partition: self.partition.into(),
                        why: format!(
                            "the image ended after {} bytes, the bmap says {}",
                            self.offset, bmap.image_size
                        ),
                    });
                }
            }
        }
        Ok(self.written)
    }
}
