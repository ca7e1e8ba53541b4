//! bmaptool's block map (the `.bmap` XML next to a sparse image): which
//! ranges of the image hold data, each with its checksum, so only those
//! are written and each is verified as it passes.
//!
//! Versions 1.x checksum with SHA-1 (`sha1=` on each range, `BmapFileSHA1`);
//! 2.x name the algorithm in `ChecksumType` (sha256 in practice) and put it
//! in `chksum=` and `BmapFileChecksum`. The file's own checksum is taken
//! with its value replaced by zeros, as bmaptool does.

use quick_xml::events::Event;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Why a bmap was refused.
#[derive(Debug, thiserror::Error)]
#[error("bmap: {0}")]
pub struct BmapError(pub String);

/// A checksum algorithm a bmap uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumKind {
    /// bmap 1.x.
    Sha1,
    /// bmap 2.x.
    Sha256,
}

/// A running range checksum.
pub enum RangeHasher {
    /// SHA-1.
    Sha1(Sha1),
    /// SHA-256.
    Sha256(Sha256),
}

impl RangeHasher {
    /// A fresh hasher of `kind`.
    pub fn new(kind: ChecksumKind) -> Self {
        match kind {
            ChecksumKind::Sha1 => RangeHasher::Sha1(Sha1::new()),
            ChecksumKind::Sha256 => RangeHasher::Sha256(Sha256::new()),
        }
    }
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            RangeHasher::Sha1(h) => h.update(data),
            RangeHasher::Sha256(h) => h.update(data),
        }
    }
    /// The lowercase hex digest; the hasher starts over.
    pub fn finish(&mut self) -> String {
        match self {
            RangeHasher::Sha1(h) => ferry_proto::hex(&h.finalize_reset()),
            RangeHasher::Sha256(h) => ferry_proto::hex(&h.finalize_reset()),
        }
    }
}

/// One mapped range, in bytes of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte (the image's end for a partial last block).
    pub end: u64,
    /// Expected checksum (lowercase hex).
    pub checksum: String,
}

/// A parsed bmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    /// Size of the image it maps.
    pub image_size: u64,
    /// Block size the ranges count in.
    pub block_size: u64,
    /// Checksum algorithm of the ranges.
    pub kind: ChecksumKind,
    /// Mapped ranges in increasing, non-overlapping order.
    pub ranges: Vec<MappedRange>,
}

impl Bmap {
    /// Bytes the ranges cover.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// Parses and checks a bmap file (its own checksum included).
    ///
    /// # Errors
    /// Malformed XML, missing fields, ranges out of order or past the
    /// image, an unknown checksum type, or a file checksum that does not match.
    pub fn parse(text: &str) -> Result<Bmap, BmapError> {
        let err = |m: String| BmapError(m);
        let mut reader = quick_xml::Reader::from_str(text);
        let mut path: Vec<String> = Vec::new();
        let (mut image_size, mut block_size, mut kind_name) = (None, None, None);
        let mut file_sum: Option<(String, ChecksumKind)> = None;
        let mut version = String::new();
        let mut raw_ranges: Vec<(String, String)> = Vec::new();
        let mut range_sum = String::new();
        loop {
            match reader.read_event() {
                Err(e) => return Err(err(format!("malformed XML: {e}"))),
                Ok(Event::Eof) => break,
                Ok(Event::Start(s)) => {
                    let name = String::from_utf8_lossy(s.name().as_ref()).into_owned();
                    if name == "bmap" {
                        for a in s.attributes().flatten() {
                            if a.key.as_ref() == b"version" {
                                version = String::from_utf8_lossy(&a.value).into_owned();
                            }
                        }
                    }
                    if name == "Range" {
                        range_sum.clear();
                        for a in s.attributes().flatten() {
                            if matches!(a.key.as_ref(), b"chksum" | b"sha1") {
                                range_sum = String::from_utf8_lossy(&a.value)
                                    .trim()
                                    .to_ascii_lowercase();
                            }
                        }
                    }
                    path.push(name);
                }
                Ok(Event::End(_)) => {
                    path.pop();
                }
                Ok(Event::Text(t)) => {
                    let value = t
                        .xml_content()
                        .map_err(|e| err(format!("bad text: {e}")))?
                        .trim()
                        .to_string();
                    if value.is_empty() {
                        continue;
                    }
                    let number = |what: &str| {
                        value
                            .parse::<u64>()
                            .map_err(|_| err(format!("{what} {value:?} is not a number")))
                    };
                    match path.last().map(String::as_str) {
                        Some("ImageSize") => image_size = Some(number("ImageSize")?),
                        Some("BlockSize") => block_size = Some(number("BlockSize")?),
                        Some("ChecksumType") => kind_name = Some(value.to_ascii_lowercase()),
                        Some("BmapFileChecksum") => file_sum = Some((value, ChecksumKind::Sha256)),
                        Some("BmapFileSHA1") => file_sum = Some((value, ChecksumKind::Sha1)),
                        Some("Range") => raw_ranges.push((value, range_sum.clone())),
                        _ => {}
                    }
                }
                Ok(_) => {}
            }
        }
        let major = version.split('.').next().unwrap_or("");
        let kind = match (major, kind_name.as_deref()) {
            ("1", _) => ChecksumKind::Sha1,
            (_, Some("sha256")) => ChecksumKind::Sha256,
            (_, Some("sha1")) => ChecksumKind::Sha1,
            (_, other) => {
                return Err(err(format!(
                    "version {version:?} with checksum type {other:?} is not supported (sha1 or sha256)"
                )))
            }
        };
        let image_size = image_size.ok_or_else(|| err("no ImageSize".into()))?;
        let block_size = block_size
            .filter(|b| *b > 0)
            .ok_or_else(|| err("no BlockSize".into()))?;
        let (sum, sum_kind) = file_sum.ok_or_else(|| err("no BmapFileChecksum".into()))?;
        let mut h = RangeHasher::new(if major == "1" {
            ChecksumKind::Sha1
        } else {
            sum_kind
        });
        h.update(text.replacen(&sum, &"0".repeat(sum.len()), 1).as_bytes());
        let actual = h.finish();
        if !actual.eq_ignore_ascii_case(&sum) {
            return Err(err(format!(
                "the file's own checksum is {actual}, it says {sum}: the bmap is damaged"
            )));
        }
        let mut ranges: Vec<MappedRange> = Vec::with_capacity(raw_ranges.len());
        for (text, checksum) in raw_ranges {
            let (a, b) = text.split_once('-').unwrap_or((&text, &text));
            let parse = |s: &str| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| err(format!("range {text:?} is not FIRST-LAST")))
            };
            let (first, last) = (parse(a)?, parse(b)?);
            let start = first
                .checked_mul(block_size)
                .filter(|s| *s < image_size && first <= last)
                .ok_or_else(|| err(format!("range {text:?} lies outside the image")))?;
            let end = last
                .checked_add(1)
                .and_then(|l| l.checked_mul(block_size))
                .ok_or_else(|| err(format!("range {text:?} overflows")))?
                .min(image_size);
            if ranges.last().is_some_and(|p| p.end > start) {
                return Err(err(format!(
                    "range {text:?} overlaps or precedes the one before"
                )));
            }
            if checksum.is_empty() {
                return Err(err(format!("range {text:?} has no checksum")));
            }
            ranges.push(MappedRange {
                start,
                end,
                checksum,
            });
        }
        Ok(Bmap {
            image_size,
            block_size,
            kind,
            ranges,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A bmap 2.0 file for `image` mapping the given block ranges, made the
    /// way bmaptool makes it (file checksum over the text with zeros).
    pub(crate) fn make(image: &[u8], block: u64, ranges: &[(u64, u64)]) -> String {
        let sum = |d: &[u8]| ferry_proto::hex(&Sha256::digest(d));
        let mut body = String::new();
        for (a, b) in ranges {
            let s = ((a * block) as usize).min(image.len());
            let e = (((b + 1) * block) as usize).min(image.len());
            body += &format!(
                "        <Range chksum=\"{}\"> {a}-{b} </Range>\n",
                sum(&image[s..e])
            );
        }
        let text = |file: &str| {
            format!(
                "<?xml version=\"1.0\" ?>\n<bmap version=\"2.0\">\n    <ImageSize> {} </ImageSize>\n    <BlockSize> {block} </BlockSize>\n    <BlocksCount> {} </BlocksCount>\n    <MappedBlocksCount> 0 </MappedBlocksCount>\n    <ChecksumType> sha256 </ChecksumType>\n    <BmapFileChecksum> {file} </BmapFileChecksum>\n    <BlockMap>\n{body}    </BlockMap>\n</bmap>\n",
                image.len(),
                (image.len() as u64).div_ceil(block)
            )
        };
        let zeros = "0".repeat(64);
        text(&sum(text(&zeros).as_bytes()))
    }

    #[test]
    fn parses_ranges_in_bytes_with_a_partial_last_block() {
        let image = vec![7u8; 10_000];
        let b = Bmap::parse(&make(&image, 4096, &[(0, 0), (2, 2)])).expect("parse");
        assert_eq!(b.image_size, 10_000);
        assert_eq!(b.kind, ChecksumKind::Sha256);
        assert_eq!(
            b.ranges
                .iter()
                .map(|r| (r.start, r.end))
                .collect::<Vec<_>>(),
            [(0, 4096), (8192, 10_000)]
        );
        assert_eq!(b.mapped_bytes(), 4096 + 1808);
    }

    #[test]
    fn a_damaged_or_inconsistent_bmap_is_refused() {
        let image = vec![7u8; 10_000];
        let good = make(&image, 4096, &[(0, 0), (2, 2)]);
        let damaged = good.replacen("2-2", "1-2", 1);
        assert!(Bmap::parse(&damaged)
            .expect_err("damaged")
            .0
            .contains("own checksum"));
        let outside = make(&image, 4096, &[(3, 3)]);
        assert!(Bmap::parse(&outside)
            .expect_err("outside")
            .0
            .contains("outside"));
        let overlapping = make(&image, 4096, &[(0, 1), (1, 2)]);
        assert!(Bmap::parse(&overlapping)
            .expect_err("overlap")
            .0
            .contains("overlaps"));
        assert!(Bmap::parse("<bmap").is_err());
    }
}
