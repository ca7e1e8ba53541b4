//! The live record stream: while the test agent writes its records files it
//! sends the very same bytes to the dispatcher over TLS, and at the end a
//! manifest with the digest of every file it left on the board. When the
//! dispatcher received exactly that, it has the records without booting
//! the master image to fetch them. `proto/RECORDS.md` ("Live stream")
//! documents the wire format; this module is its one implementation, a
//! codec over bytes that both the (blocking) agent and the (async)
//! dispatcher drive.

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// What the agent sends first, before any message: magic and version.
pub const PREAMBLE: &[u8; 10] = b"FERRYSTR\x01\x00";

/// Longest message payload accepted.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Most record bytes one `data` message carries.
pub const MAX_DATA: usize = 256 * 1024;

/// Bytes before each message's payload: kind (1), payload length (4, LE).
const HEAD: usize = 5;

/// One message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Agent, first message: who is streaming.
    Hello(Hello),
    /// Agent: the `data` that follows belongs to this records file.
    File {
        /// The file's name in the records folder.
        name: String,
    },
    /// Agent: bytes of the current file, at `offset` (always its length so far).
    Data {
        /// Where the bytes go in the file.
        offset: u64,
        /// The bytes, exactly as written to the file.
        bytes: Vec<u8>,
    },
    /// Agent, last message: everything recorded, read back from the board.
    End(Manifest),
    /// Dispatcher, the answer to `End`.
    Verdict(Verdict),
}

/// The agent's first message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The plan's stream token.
    pub token: String,
    /// The test boot's id.
    pub boot: String,
}

/// One records file as it is on the board at the end of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Name in the records folder.
    pub name: String,
    /// Its length.
    pub bytes: u64,
    /// sha256 (lowercase hex) of its bytes.
    pub sha256: String,
}

/// Every records file left on the board, and whether the board's
/// filesystem was left clean (remounted read-only, or nothing to remount).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The files, in name order.
    pub files: Vec<FileDigest>,
    /// [`digest`] of `files`: everything recorded.
    pub sha256: String,
    /// The records are final: every writer closed and the filesystem
    /// remounted read-only (or synced where there is nothing to remount).
    pub clean: bool,
    /// Entries of the records folder that are not regular files (a
    /// symlink, a FIFO...): only the master agent's fetch reports those,
    /// so the dispatcher then fetches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<String>,
}

/// The dispatcher's answer to the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The stream matched the manifest and was kept: no fetch will follow.
    pub kept: bool,
    /// Why not, for the console.
    #[serde(default)]
    pub reason: String,
}

/// The digest of everything recorded: sha256 over one line per file
/// (`name bytes sha256\n`, in the order given).
pub fn digest(files: &[FileDigest]) -> String {
    let mut h = sha2::Sha256::new();
    for f in files {
        h.update(format!("{} {} {}\n", f.name, f.bytes, f.sha256).as_bytes());
    }
    crate::hex(&h.finalize())
}

impl Manifest {
    /// A manifest of `files` (sorted by name here).
    pub fn new(mut files: Vec<FileDigest>, clean: bool) -> Self {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Manifest {
            sha256: digest(&files),
            files,
            clean,
            others: Vec::new(),
        }
    }
}

/// Why a stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer did not start with [`PREAMBLE`].
    #[error("not a Ferry record stream (wrong preamble)")]
    Preamble,
    /// A message kind this side does not know.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// A payload over [`MAX_PAYLOAD`].
    #[error("message of {0} bytes is over the limit")]
    TooLong(usize),
    /// A payload that does not parse.
    #[error("malformed {kind} message: {why}")]
    Malformed {
        /// The message kind.
        kind: &'static str,
        /// What is wrong.
        why: String,
    },
}

fn json<T: Serialize>(kind: u8, value: &T, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(value).unwrap_or_default();
    frame(kind, &payload, out);
}

fn frame(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

impl Message {
    /// Appends this message's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => json(1, h, out),
            Message::File { name } => frame(2, name.as_bytes(), out),
            Message::Data { offset, bytes } => {
                out.push(3);
                out.extend_from_slice(&((bytes.len() + 8) as u32).to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(bytes);
            }
            Message::End(m) => json(4, m, out),
            Message::Verdict(v) => json(5, v, out),
        }
    }

    fn decode(kind: u8, p: &[u8]) -> Result<Self, StreamError> {
        fn parse<T: for<'a> Deserialize<'a>>(
            kind: &'static str,
            p: &[u8],
        ) -> Result<T, StreamError> {
            serde_json::from_slice(p).map_err(|e| StreamError::Malformed {
                kind,
                why: e.to_string(),
            })
        }
        Ok(match kind {
            1 => Message::Hello(parse("hello", p)?),
            2 => Message::File {
                name: String::from_utf8(p.to_vec()).map_err(|e| StreamError::Malformed {
                    kind: "file",
                    why: e.to_string(),
                })?,
            },
            3 => {
                let (offset, bytes) = p.split_at_checked(8).ok_or(StreamError::Malformed {
                    kind: "data",
                    why: "shorter than its offset".into(),
                })?;
                let mut o = [0u8; 8];
                o.copy_from_slice(offset);
                Message::Data {
                    offset: u64::from_le_bytes(o),
                    bytes: bytes.to_vec(),
                }
            }
            4 => Message::End(parse("end", p)?),
            5 => Message::Verdict(parse("verdict", p)?),
            k => return Err(StreamError::Kind(k)),
        })
    }
}

/// Reads messages out of bytes as they arrive, in any pieces.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    /// Still waiting for [`PREAMBLE`].
    preamble: bool,
}

impl Decoder {
    /// A decoder for the dispatcher's side, which first expects [`PREAMBLE`].
    pub fn after_preamble() -> Self {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            preamble: true,
        }
    }

    /// A decoder for the agent's side (the dispatcher sends no preamble).
    pub fn new() -> Self {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            preamble: false,
        }
    }

    /// Adds bytes received.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `None` until one has arrived.
    ///
    /// # Errors
    /// A wrong preamble, an unknown kind, an oversize or malformed message:
    /// the stream cannot be trusted after it.
    pub fn next_message(&mut self) -> Result<Option<Message>, StreamError> {
        let rest = &self.buf[self.pos..];
        if self.preamble {
            let n = rest.len().min(PREAMBLE.len());
            if rest[..n] != PREAMBLE[..n] {
                return Err(StreamError::Preamble);
            }
            if n < PREAMBLE.len() {
                return Ok(None);
            }
            self.preamble = false;
            self.pos += PREAMBLE.len();
            return self.next_message();
        }
        if rest.len() < HEAD {
            return Ok(None);
        }
        let kind = rest[0];
        let len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if len > MAX_PAYLOAD + 8 {
            return Err(StreamError::TooLong(len));
        }
        if rest.len() < HEAD + len {
            return Ok(None);
        }
        let m = Message::decode(kind, &rest[HEAD..HEAD + len])?;
        self.pos += HEAD + len;
        // Keep the buffer from growing with what was read.
        if self.pos > (1 << 20) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(Some(m))
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        let files = vec![FileDigest {
            name: "agent-0000.ferryrec".into(),
            bytes: 3,
            sha256: crate::sha256_hex(b"abc"),
        }];
        vec![
            Message::Hello(Hello {
                token: "t".into(),
                boot: "b".into(),
            }),
            Message::File {
                name: "agent-0000.ferryrec".into(),
            },
            Message::Data {
                offset: 7,
                bytes: (0..=255u8).collect(),
            },
            Message::Data {
                offset: 0,
                bytes: Vec::new(),
            },
            Message::End(Manifest::new(files, true)),
            Message::Verdict(Verdict {
                kept: false,
                reason: "digest".into(),
            }),
        ]
    }

    #[test]
    fn messages_read_back_from_any_split() {
        let mut bytes = PREAMBLE.to_vec();
        for m in all() {
            m.encode(&mut bytes);
        }
        for step in [1, 3, 7, bytes.len()] {
            let mut d = Decoder::after_preamble();
            let mut got = Vec::new();
            for piece in bytes.chunks(step) {
                d.push(piece);
                while let Some(m) = d.next_message().expect("valid") {
                    got.push(m);
                }
            }
            assert_eq!(got, all(), "pieces of {step}");
        }
    }

    #[test]
    fn a_wrong_preamble_or_kind_or_size_is_refused() {
        let mut d = Decoder::after_preamble();
        d.push(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_message(), Err(StreamError::Preamble)));

        let mut d = Decoder::new();
        d.push(&[9, 0, 0, 0, 0]);
        assert!(matches!(d.next_message(), Err(StreamError::Kind(9))));

        let mut d = Decoder::new();
        d.push(&[3, 0xff, 0xff, 0xff, 0x7f]);
        assert!(matches!(d.next_message(), Err(StreamError::TooLong(_))));

        let mut d = Decoder::new();
        d.push(&[3, 2, 0, 0, 0, 1, 2]);
        assert!(matches!(
            d.next_message(),
            Err(StreamError::Malformed { kind: "data", .. })
        ));
    }

    #[test]
    fn the_digest_covers_names_sizes_and_contents() {
        let f = |name: &str, data: &[u8]| FileDigest {
            name: name.into(),
            bytes: data.len() as u64,
            sha256: crate::sha256_hex(data),
        };
        let a = Manifest::new(vec![f("b", b"2"), f("a", b"1")], true);
        assert_eq!(a.files[0].name, "a");
        let b = Manifest::new(vec![f("a", b"1"), f("b", b"2")], false);
        assert_eq!(a.sha256, b.sha256);
        assert_ne!(
            a.sha256,
            Manifest::new(vec![f("a", b"1"), f("b", b"3")], true).sha256
        );
        assert_ne!(
            a.sha256,
            Manifest::new(vec![f("a", b"1"), f("c", b"2")], true).sha256
        );
        assert_ne!(a.sha256, Manifest::new(vec![f("a", b"1")], true).sha256);
    }
}
