//! Image compression: told by the job or detected from the first bytes, and
//! the streaming decoder for each.

use std::io::{BufRead, Read};

/// How the bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Look at the first bytes.
    Detect,
    /// Raw image.
    None,
    /// gzip (one or more members).
    Gzip,
    /// xz (one or more streams).
    Xz,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// Its name in messages and the job file.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Detect => "detect",
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }

    /// Resolves `Detect` from the first bytes of the file (anything without a
    /// known magic number is raw).
    pub fn resolve(self, head: &[u8]) -> Compression {
        if self != Compression::Detect {
            return self;
        }
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The decompressed image size the file's header states, when it does
    /// (a zstd frame written from a file of known size), so an image that
    /// cannot fit is refused before writing.
    pub fn stated_size(self, head: &[u8]) -> Option<u64> {
        match self {
            Compression::Zstd => zstd::zstd_safe::get_frame_content_size(head).ok().flatten(),
            _ => None,
        }
    }

    /// Whether the file whose first bytes are `head` (with this compression,
    /// resolved) is a tar archive: `ustar` at byte 257 of its decoded start.
    /// A disk image never carries it there (a partition table's boot code or
    /// a filesystem's reserved start).
    pub fn is_tarball(self, head: &[u8]) -> bool {
        self.tarball(head) == Some(true)
    }

    /// [`Compression::is_tarball`], or `None` while `head` is too short to
    /// tell (its decoded start does not reach the magic yet).
    pub fn tarball(self, head: &[u8]) -> Option<bool> {
        let mut start = Vec::with_capacity(512);
        let decoded = match self.decoder(head) {
            Ok(Some(mut d)) => {
                let _ = d.by_ref().take(512).read_to_end(&mut start);
                &start[..]
            }
            Ok(None) => head,
            Err(_) => return Some(false),
        };
        decoded.get(257..262).map(|m| m == b"ustar")
    }

    /// A streaming decoder reading `input`; `None` for a raw image.
    ///
    /// # Errors
    /// When the decoder cannot be set up.
    pub fn decoder<'a, R: BufRead + Send + 'a>(
        self,
        input: R,
    ) -> std::io::Result<Option<Box<dyn Read + Send + 'a>>> {
        Ok(match self {
            Compression::None | Compression::Detect => None,
            Compression::Gzip => Some(Box::new(flate2::bufread::MultiGzDecoder::new(input))),
            // Concatenated streams too, as `xz -dc` reads them.
            Compression::Xz => Some(Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(
                input,
            ))),
            // Frames one after another, as `zstd -dc` reads them; the default
            // window limit (128 MiB) refuses `--long=31` images rather than
            // taking 2 GiB of memory.
            Compression::Zstd => Some(Box::new(zstd::stream::read::Decoder::with_buffer(input)?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes_are_recognised_and_an_explicit_choice_wins() {
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0x00, 0];
        assert_eq!(
            Compression::Detect.resolve(&[0x1f, 0x8b, 8]),
            Compression::Gzip
        );
        assert_eq!(Compression::Detect.resolve(&xz), Compression::Xz);
        assert_eq!(
            Compression::Detect.resolve(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::Detect.resolve(b"hsqs"), Compression::None);
        assert_eq!(Compression::Detect.resolve(&[]), Compression::None);
        assert_eq!(Compression::None.resolve(&[0x1f, 0x8b]), Compression::None);
    }

    #[test]
    fn a_tarball_is_told_from_an_image_through_its_compression() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_cksum();
        tar.append_data(&mut h, "etc/x", &b"abc"[..]).expect("tar");
        let tar = tar.into_inner().expect("tar");
        let zst = zstd::bulk::compress(&tar, 3).expect("zstd");
        assert!(Compression::None.is_tarball(&tar));
        assert!(Compression::Zstd.is_tarball(&zst));
        assert!(!Compression::None.is_tarball(&vec![0u8; 4096]));
        assert!(
            !Compression::Zstd.is_tarball(&zstd::bulk::compress(&[0u8; 4096], 3).expect("zstd"))
        );
        // Truncated compressed input: not a tarball, no panic.
        assert!(!Compression::Zstd.is_tarball(&zst[..6]));
    }
}
