//! Records the test agent writes on its rootfs: a compact, framed,
//! crash-safe binary format (specified in `proto/RECORDS.md`, version
//! [`VERSION`]).
//!
//! Records are the source of truth for results: they are written and
//! fdatasync'd on the board before anything is mirrored to the console, and
//! the dispatcher reads them back after the board returns to its master
//! image. A file starts with a [`Header`] holding what is constant (boot,
//! job, agent version, start time); each record is a frame with its length,
//! sequence number, CRC32C, kind and time since the header's start. Test
//! output travels as byte chunks, not one record per line, so binary output
//! and invalid UTF-8 survive byte for byte. The [`Reader`] streams a file
//! in bounded memory and resyncs after a torn or corrupt frame, reporting
//! every gap with its size.

use std::io::Read;

use serde::{Deserialize, Serialize};

/// Folder (relative to the test rootfs) the test agent owns.
pub const FERRY_DIR: &str = "ferry";
/// Folder (relative to the test rootfs) holding the records; every regular
/// file in it is a records file and is fetched.
pub const RECORDS_DIR: &str = "ferry/records";
/// The test agent's first records file, inside [`RECORDS_DIR`]; it starts
/// a new file ([`agent_file`]) every [`ROTATE_BYTES`], so no one file grows
/// past what a master agent returns per file.
pub const RECORDS_FILE: &str = "agent-0000.ferryrec";
/// Size after which the test agent starts its next records file.
pub const ROTATE_BYTES: u64 = 256 << 20;

/// Name of the test agent's records file number `index` (name order is
/// write order).
pub fn agent_file(index: u32) -> String {
    format!("agent-{index:04}{RECORDS_SUFFIX}")
}
/// Suffix of every records file (helpers that cannot reach the agent write
/// `helper-<pid>.ferryrec` beside the agent's file).
pub const RECORDS_SUFFIX: &str = ".ferryrec";
/// The plan file (protobuf `ferry.plan.v1.TestPlan`), relative to the test rootfs.
pub const PLAN_FILE: &str = "ferry/plan.pb";

/// First bytes of every records file.
pub const MAGIC: &[u8; 8] = b"FERRYREC";
/// Version of the format this crate writes and reads.
pub const VERSION: u16 = 1;
/// First two bytes of every frame: where the reader looks to resync.
pub const SYNC: [u8; 2] = [0xF5, 0x7E];
/// Bytes of a frame before its body: sync, length, CRC32C.
pub const FRAME_HEAD: usize = 10;
/// Largest body a frame may have; a larger length is corruption.
pub const MAX_BODY: usize = 1 << 20;
/// Largest chunk of output one record carries (writers split larger ones).
pub const MAX_CHUNK: usize = 256 * 1024;

/// What is constant for every record of a file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The boot id the records were written in.
    pub boot: String,
    /// The job named in the plan ("" when the plan could not be read).
    pub job: String,
    /// The writing agent's version.
    pub agent_version: String,
    /// Microseconds since the Unix epoch, on the board's clock, when the
    /// file was started; record times are offsets from it.
    pub start_us: u64,
    /// Who writes this file ("test-agent", "helper").
    pub writer: String,
}

/// One record: when, on which boot, and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Microseconds since the Unix epoch, on the board's clock.
    pub ts_us: u64,
    /// The boot id the record was written in (from the file's header).
    pub boot: String,
    /// What happened.
    #[serde(flatten)]
    pub body: Body,
}

/// Why output was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropReason {
    /// The definition printed more than its output quota.
    DefinitionQuota,
    /// The job printed more than its output quota.
    JobQuota,
    /// The test rootfs ran out of space.
    DiskFull,
}

impl DropReason {
    /// How people read it.
    pub fn describe(self) -> &'static str {
        match self {
            DropReason::DefinitionQuota => "the definition's output quota was reached",
            DropReason::JobQuota => "the job's output quota was reached",
            DropReason::DiskFull => "the test rootfs was full",
        }
    }
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Body {
    /// The test agent started a run of the plan.
    AgentStarted {
        /// The test agent's version.
        version: String,
        /// The job named in the plan.
        job: String,
    },
    /// A definition started.
    DefinitionStarted {
        /// The definition (suite) name.
        definition: String,
    },
    /// A chunk of what a definition's steps printed on one stream: raw
    /// bytes, newlines included; a chunk may hold many lines or part of one.
    Output {
        /// The definition (suite) name.
        definition: String,
        /// Which stream it came from.
        stream: Stream,
        /// The bytes, exactly as printed.
        data: Vec<u8>,
    },
    /// A test case result, from `lava-test-case`.
    Result {
        /// The definition (suite) name.
        definition: String,
        /// The test case id.
        case: String,
        /// The result.
        result: Outcome,
        /// A measurement, when given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        measurement: Option<f64>,
        /// The measurement's units, when given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        units: Option<String>,
        /// The test set the case belongs to, when inside one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<String>,
        /// A URL, from `lava-test-reference`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// `lava-test-set start NAME`.
    SetStarted {
        /// The definition (suite) name.
        definition: String,
        /// The set name.
        set: String,
    },
    /// `lava-test-set stop`.
    SetStopped {
        /// The definition (suite) name.
        definition: String,
        /// The set that was stopped.
        set: String,
    },
    /// A definition ended.
    DefinitionFinished {
        /// The definition (suite) name.
        definition: String,
        /// Exit status of its shell; `None` when killed.
        exit_code: Option<i32>,
        /// Whether its own timeout ended it.
        timed_out: bool,
        /// Wall time in milliseconds.
        duration_ms: u64,
    },
    /// The agent itself had something to say (e.g. a definition could not start).
    AgentMessage {
        /// Severity: "info", "warn" or "error".
        level: String,
        /// The message.
        message: String,
    },
    /// A kernel log message (from `/dev/kmsg`) seen during the run.
    Kernel {
        /// Syslog level: 0 emergency .. 7 debug.
        level: u8,
        /// The kernel's own timestamp, microseconds since boot.
        kernel_us: u64,
        /// The message.
        line: String,
    },
    /// The kernel's log buffer overran before the agent read it: `messages`
    /// were lost; capture went on.
    KernelLost {
        /// How many messages were overwritten unread.
        messages: u64,
    },
    /// Output of a definition that was counted but not kept.
    OutputDropped {
        /// The definition (suite) name.
        definition: String,
        /// Why.
        reason: DropReason,
        /// Bytes printed but not recorded.
        bytes: u64,
    },
    /// The test agent finished the plan and is about to reboot.
    AgentFinished {},
    /// The run was aborted in `definition`: it stopped there and no later
    /// definition ran (`lava-test-raise`, or an `install.deps` the image
    /// cannot install). `class` is the job's outcome class.
    Aborted {
        /// The definition (suite) name.
        definition: String,
        /// `test-error` or `job-error`.
        class: String,
        /// Why.
        message: String,
    },
}

/// Output stream of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// Its name, as in records and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A test case result, as LAVA spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Passed.
    Pass,
    /// Failed.
    Fail,
    /// Skipped.
    Skip,
    /// Ran, but the result is not known.
    Unknown,
}

impl Outcome {
    /// Parses LAVA's spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pass" => Some(Outcome::Pass),
            "fail" => Some(Outcome::Fail),
            "skip" => Some(Outcome::Skip),
            "unknown" => Some(Outcome::Unknown),
            _ => None,
        }
    }

    /// LAVA's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
            Outcome::Unknown => "unknown",
        }
    }
}

/// Kind bytes of the frames, and the JSON tag of each (see RECORDS.md).
const KINDS: [(u8, &str); 13] = [
    (1, "agent-started"),
    (2, "definition-started"),
    (3, "output"),
    (4, "result"),
    (5, "set-started"),
    (6, "set-stopped"),
    (7, "definition-finished"),
    (8, "agent-message"),
    (9, "kernel"),
    (10, "kernel-lost"),
    (11, "output-dropped"),
    (12, "agent-finished"),
    (13, "aborted"),
];
const KIND_OUTPUT: u8 = 3;
const KIND_KERNEL: u8 = 9;

impl Body {
    /// Its kind byte in a frame.
    pub fn kind(&self) -> u8 {
        match self {
            Body::AgentStarted { .. } => 1,
            Body::DefinitionStarted { .. } => 2,
            Body::Output { .. } => KIND_OUTPUT,
            Body::Result { .. } => 4,
            Body::SetStarted { .. } => 5,
            Body::SetStopped { .. } => 6,
            Body::DefinitionFinished { .. } => 7,
            Body::AgentMessage { .. } => 8,
            Body::Kernel { .. } => KIND_KERNEL,
            Body::KernelLost { .. } => 10,
            Body::OutputDropped { .. } => 11,
            Body::AgentFinished {} => 12,
            Body::Aborted { .. } => 13,
        }
    }

    /// Its kind's name, as in `events.jsonl`.
    pub fn kind_name(&self) -> &'static str {
        let k = self.kind();
        KINDS
            .iter()
            .find(|(b, _)| *b == k)
            .map(|(_, n)| *n)
            .unwrap_or("unknown")
    }

    /// Whether it must be on disk before the agent goes on (everything
    /// except output and kernel messages, which are synced in batches).
    pub fn is_durable(&self) -> bool {
        !matches!(self, Body::Output { .. } | Body::Kernel { .. })
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Body::Output {
                definition,
                stream,
                data,
            } => {
                out.push(match stream {
                    Stream::Stdout => 1,
                    Stream::Stderr => 2,
                });
                put_varint(out, definition.len() as u64);
                out.extend_from_slice(definition.as_bytes());
                out.extend_from_slice(data);
            }
            Body::Kernel {
                level,
                kernel_us,
                line,
            } => {
                out.push(*level);
                put_varint(out, *kernel_us);
                out.extend_from_slice(line.as_bytes());
            }
            other => {
                // The rare structured records are JSON without their tag
                // (the kind byte says it): readable, and open to new fields.
                let mut value = serde_json::to_value(other).unwrap_or_default();
                if let Some(obj) = value.as_object_mut() {
                    obj.remove("kind");
                }
                // A map of strings and numbers always serialises.
                let _ = serde_json::to_writer(&mut *out, &value);
            }
        }
    }

    fn decode_payload(kind: u8, payload: &[u8]) -> Result<Body, String> {
        match kind {
            KIND_OUTPUT => {
                let (&stream, rest) = payload.split_first().ok_or("empty output record")?;
                let stream = match stream {
                    1 => Stream::Stdout,
                    2 => Stream::Stderr,
                    s => return Err(format!("unknown stream {s}")),
                };
                let (len, rest) = get_varint(rest).ok_or("bad definition length")?;
                let len = usize::try_from(len).map_err(|_| "bad definition length")?;
                if len > rest.len() {
                    return Err("definition name past the record's end".into());
                }
                let (name, data) = rest.split_at(len);
                Ok(Body::Output {
                    definition: String::from_utf8_lossy(name).into_owned(),
                    stream,
                    data: data.to_vec(),
                })
            }
            KIND_KERNEL => {
                let (&level, rest) = payload.split_first().ok_or("empty kernel record")?;
                let (kernel_us, text) = get_varint(rest).ok_or("bad kernel time")?;
                Ok(Body::Kernel {
                    level,
                    kernel_us,
                    line: String::from_utf8_lossy(text).into_owned(),
                })
            }
            k => {
                let name = KINDS
                    .iter()
                    .find(|(b, _)| *b == k)
                    .map(|(_, n)| *n)
                    .ok_or_else(|| format!("unknown record kind {k}"))?;
                let mut value: serde_json::Value =
                    serde_json::from_slice(payload).map_err(|e| e.to_string())?;
                let obj = value
                    .as_object_mut()
                    .ok_or("record payload is not an object")?;
                obj.insert("kind".into(), name.into());
                serde_json::from_value(value).map_err(|e| e.to_string())
            }
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &bytes[i + 1..]));
        }
    }
    None
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

impl Header {
    /// The file's first bytes: magic, version, length, JSON, CRC32C.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(json.len() + 18);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }
}

/// Writes frames for one file: numbers them and times them from the header.
#[derive(Debug, Clone)]
pub struct Encoder {
    start_us: u64,
    seq: u32,
}

impl Encoder {
    /// An encoder for a file whose header says `start_us`.
    pub fn new(start_us: u64) -> Self {
        Encoder { start_us, seq: 0 }
    }

    /// The sequence number the next frame gets.
    pub fn next_seq(&self) -> u32 {
        self.seq
    }

    /// Goes back to `seq`: the frames from it on were never stored (a
    /// failed write was cut off) and will be numbered again.
    pub fn rewind(&mut self, seq: u32) {
        self.seq = seq;
    }

    /// Appends one frame for `body`, recorded at `at_us` (Unix microseconds),
    /// to `out`. Output larger than [`MAX_CHUNK`] must be split by the caller.
    pub fn frame(&mut self, at_us: u64, body: &Body, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&SYNC);
        out.extend_from_slice(&[0; 8]); // length and CRC, filled below
        let body_start = out.len();
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.push(body.kind());
        put_varint(out, at_us.saturating_sub(self.start_us));
        body.encode_payload(out);
        let len = (out.len() - body_start) as u32;
        let len_bytes = len.to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), &out[body_start..]);
        out[start + 2..start + 6].copy_from_slice(&len_bytes);
        out[start + 6..start + 10].copy_from_slice(&crc.to_le_bytes());
        self.seq = self.seq.wrapping_add(1);
    }
}

/// Bytes of a records file that could not be read as records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// Offset in the file of the first unreadable byte.
    pub offset: u64,
    /// How many bytes were skipped.
    pub bytes: u64,
    /// Records lost, when the sequence numbers around the gap tell.
    pub records: Option<u64>,
    /// Whether the gap runs to the end of the file (a torn last write).
    pub at_end: bool,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unreadable bytes at offset {}",
            self.bytes, self.offset
        )?;
        if let Some(n) = self.records {
            write!(f, " ({n} records lost)")?;
        }
        if self.at_end {
            write!(f, " (torn end of file)")?;
        }
        Ok(())
    }
}

/// What the reader found next.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A whole, valid record.
    Record(Record),
    /// Bytes that were not a valid record, skipped.
    Gap(Gap),
    /// A valid frame of a kind or shape this reader does not know.
    Unreadable {
        /// Offset of the frame.
        offset: u64,
        /// Why.
        why: String,
    },
}

/// Why a records file cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading the underlying file failed.
    #[error("reading records: {0}")]
    Io(#[from] std::io::Error),
    /// The file does not start with [`MAGIC`].
    #[error("not a Ferry records file (no FERRYREC header)")]
    NotRecords,
    /// A version this reader does not know.
    #[error("records format version {0} is not supported (this reader knows {VERSION})")]
    Version(u16),
}

/// How many bytes the reader asks its source for at once.
const READ_CHUNK: usize = 64 * 1024;

/// Streams the records of one file in bounded memory (at most one frame
/// plus a read chunk), resyncing after torn or corrupt frames.
pub struct Reader<R> {
    src: R,
    buf: Vec<u8>,
    pos: usize,
    /// File offset of `buf[pos]`.
    offset: u64,
    eof: bool,
    header: Header,
    expected_seq: Option<u32>,
}

enum Frame {
    Valid { len: usize },
    Invalid,
    NeedMore,
}

impl<R: Read> Reader<R> {
    /// Reads the header of `src`. A header whose checksum fails is reported
    /// by the first item as a gap, and records are still read.
    ///
    /// # Errors
    /// When `src` is not a records file of a known version, or cannot be read.
    pub fn new(src: R) -> Result<(Self, Option<Gap>), ReadError> {
        let mut r = Reader {
            src,
            buf: Vec::with_capacity(READ_CHUNK * 2),
            pos: 0,
            offset: 0,
            eof: false,
            header: Header::default(),
            expected_seq: None,
        };
        r.fill(14)?;
        if r.available() < 14 || &r.buf[..8] != MAGIC {
            return Err(ReadError::NotRecords);
        }
        let version = u16::from_le_bytes([r.buf[8], r.buf[9]]);
        if version != VERSION {
            return Err(ReadError::Version(version));
        }
        let len = le_u32(&r.buf[10..14]) as usize;
        if len <= MAX_BODY && r.fill(14 + len + 4)? {
            let crc = le_u32(&r.buf[14 + len..]);
            let parsed = (crc32c::crc32c(&r.buf[..14 + len]) == crc)
                .then(|| serde_json::from_slice::<Header>(&r.buf[14..14 + len]).ok())
                .flatten();
            if let Some(h) = parsed {
                r.header = h;
                r.consume(14 + len + 4);
                return Ok((r, None));
            }
        }
        // A damaged header: skip to the first frame that reads.
        let skipped = r.resync(true)?;
        let gap = Gap {
            offset: 0,
            bytes: skipped,
            records: None,
            at_end: r.available() == 0,
        };
        Ok((r, Some(gap)))
    }

    /// The file's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn available(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        self.offset += n as u64;
    }

    /// Makes at least `n` bytes available unless the source ends first;
    /// returns whether they are.
    fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.available() < n && !self.eof {
            if self.pos > 0
                && (self.pos >= READ_CHUNK || self.buf.len() + READ_CHUNK > self.buf.capacity())
            {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let old = self.buf.len();
            self.buf.resize(old + READ_CHUNK, 0);
            let got = loop {
                match self.src.read(&mut self.buf[old..]) {
                    Ok(g) => break g,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.buf.truncate(old);
                        return Err(e);
                    }
                }
            };
            self.buf.truncate(old + got);
            if got == 0 {
                self.eof = true;
            }
        }
        Ok(self.available() >= n)
    }

    /// Checks the frame at `pos + at`.
    fn check(&mut self, at: usize) -> std::io::Result<Frame> {
        if !self.fill(at + FRAME_HEAD)? {
            return Ok(Frame::NeedMore);
        }
        let b = &self.buf[self.pos + at..];
        if b[..2] != SYNC {
            return Ok(Frame::Invalid);
        }
        let len = le_u32(&b[2..6]) as usize;
        if !(6..=MAX_BODY).contains(&len) {
            return Ok(Frame::Invalid);
        }
        if !self.fill(at + FRAME_HEAD + len)? {
            return Ok(Frame::NeedMore);
        }
        let b = &self.buf[self.pos + at..];
        let crc = le_u32(&b[6..10]);
        let body = &b[FRAME_HEAD..FRAME_HEAD + len];
        if crc32c::crc32c_append(crc32c::crc32c(&b[2..6]), body) == crc {
            Ok(Frame::Valid { len })
        } else {
            Ok(Frame::Invalid)
        }
    }

    /// Skips bytes until a valid frame starts at `pos` (or the source
    /// ends); returns how many were skipped. `here` says whether the frame
    /// at `pos` itself may be the one.
    fn resync(&mut self, here: bool) -> std::io::Result<u64> {
        let mut skipped = 0u64;
        if !here {
            self.consume(1);
            skipped = 1;
        }
        loop {
            if !self.fill(SYNC.len())? {
                let rest = self.available();
                self.consume(rest);
                return Ok(skipped + rest as u64);
            }
            // Jump to the next sync marker in what is buffered.
            let window = &self.buf[self.pos..];
            match window.windows(2).position(|w| w == SYNC) {
                None => {
                    // Keep a last byte: it may start a marker.
                    let n = window.len() - 1;
                    self.consume(n);
                    skipped += n as u64;
                    if self.eof {
                        let rest = self.available();
                        self.consume(rest);
                        return Ok(skipped + rest as u64);
                    }
                    continue;
                }
                Some(n) => {
                    self.consume(n);
                    skipped += n as u64;
                }
            }
            match self.check(0)? {
                Frame::Valid { .. } => return Ok(skipped),
                Frame::Invalid | Frame::NeedMore => {
                    self.consume(1);
                    skipped += 1;
                }
            }
        }
    }

    fn decode(&mut self, len: usize) -> Item {
        let offset = self.offset;
        let body = &self.buf[self.pos + FRAME_HEAD..self.pos + FRAME_HEAD + len];
        let seq = le_u32(&body[..4]);
        let kind = body[4];
        let decoded = get_varint(&body[5..])
            .ok_or_else(|| "bad time".to_string())
            .and_then(|(t, payload)| Ok((t, Body::decode_payload(kind, payload)?)));
        self.consume(FRAME_HEAD + len);
        self.expected_seq = Some(seq.wrapping_add(1));
        match decoded {
            Ok((t, body)) => Item::Record(Record {
                ts_us: self.header.start_us.saturating_add(t),
                boot: self.header.boot.clone(),
                body,
            }),
            Err(why) => Item::Unreadable { offset, why },
        }
    }

    /// The next record or gap; `None` at the end of the file.
    ///
    /// # Errors
    /// When the source cannot be read.
    pub fn next_item(&mut self) -> Result<Option<Item>, ReadError> {
        if !self.fill(1)? {
            return Ok(None);
        }
        match self.check(0)? {
            Frame::Valid { len } => Ok(Some(self.decode(len))),
            Frame::Invalid | Frame::NeedMore => {
                let offset = self.offset;
                let before = self.expected_seq;
                let bytes = self.resync(false)?;
                let at_end = self.available() == 0;
                // The next frame's number tells how many records the gap held.
                let records = match (before, at_end) {
                    (Some(expected), false) => {
                        let next = le_u32(&self.buf[self.pos + FRAME_HEAD..]);
                        Some(u64::from(next.wrapping_sub(expected)))
                    }
                    _ => None,
                };
                Ok(Some(Item::Gap(Gap {
                    offset,
                    bytes,
                    records,
                    at_end,
                })))
            }
        }
    }
}

impl<R: Read> Iterator for Reader<R> {
    type Item = Result<Item, ReadError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_item().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            boot: "b".into(),
            job: "j".into(),
            agent_version: "0.1.0".into(),
            start_us: 1_000_000,
            writer: "test".into(),
        }
    }

    fn samples() -> Vec<Body> {
        vec![
            Body::AgentStarted {
                version: "0.1.0".into(),
                job: "j".into(),
            },
            Body::DefinitionStarted {
                definition: "d".into(),
            },
            Body::Output {
                definition: "d".into(),
                stream: Stream::Stdout,
                data: b"a\nb\n\xff\x00binary\n".to_vec(),
            },
            Body::Result {
                definition: "d".into(),
                case: "boot".into(),
                result: Outcome::Pass,
                measurement: Some(1.5),
                units: Some("s".into()),
                set: None,
                reference: Some("https://example.org/log".into()),
            },
            Body::Aborted {
                definition: "d".into(),
                class: "test-error".into(),
                message: "no network".into(),
            },
            Body::Kernel {
                level: 3,
                kernel_us: 123_456_789,
                line: "oops".into(),
            },
            Body::KernelLost { messages: 7 },
            Body::OutputDropped {
                definition: "d".into(),
                reason: DropReason::DiskFull,
                bytes: 99,
            },
            Body::DefinitionFinished {
                definition: "d".into(),
                exit_code: None,
                timed_out: true,
                duration_ms: 5,
            },
            Body::AgentFinished {},
        ]
    }

    /// A file of `bodies`, and where each frame starts.
    fn file(bodies: &[Body]) -> (Vec<u8>, Vec<usize>) {
        let mut out = header().encode();
        let mut enc = Encoder::new(1_000_000);
        let mut starts = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            starts.push(out.len());
            enc.frame(1_000_000 + i as u64 * 10, b, &mut out);
        }
        (out, starts)
    }

    fn read(bytes: &[u8]) -> (Vec<Record>, Vec<Gap>) {
        let (reader, gap) = Reader::new(bytes).expect("header");
        let mut records = Vec::new();
        let mut gaps: Vec<Gap> = gap.into_iter().collect();
        for item in reader {
            match item.expect("read") {
                Item::Record(r) => records.push(r),
                Item::Gap(g) => gaps.push(g),
                Item::Unreadable { why, .. } => panic!("unreadable: {why}"),
            }
        }
        (records, gaps)
    }

    #[test]
    fn every_kind_round_trips_with_header_and_times() {
        let bodies = samples();
        let (bytes, _) = file(&bodies);
        let (records, gaps) = read(&bytes);
        assert!(gaps.is_empty(), "{gaps:?}");
        assert_eq!(
            records.iter().map(|r| r.body.clone()).collect::<Vec<_>>(),
            bodies
        );
        assert_eq!(records[3].ts_us, 1_000_030);
        assert!(records.iter().all(|r| r.boot == "b"));
    }

    #[test]
    fn result_payload_is_stable_json() {
        let mut out = Vec::new();
        Encoder::new(0).frame(
            7,
            &Body::Result {
                definition: "smoke".into(),
                case: "boot".into(),
                result: Outcome::Pass,
                measurement: None,
                units: None,
                set: None,
                reference: None,
            },
            &mut out,
        );
        // sync, len, crc, seq 0, kind 4, time 7, then the JSON.
        assert_eq!(out[..2], SYNC);
        assert_eq!(out[10..16], [0, 0, 0, 0, 4, 7]);
        assert_eq!(
            &out[16..],
            br#"{"case":"boot","definition":"smoke","result":"pass"}"#
        );
    }

    #[test]
    fn a_torn_last_record_is_a_gap_at_the_end_and_the_rest_is_kept() {
        let bodies = samples();
        let (mut bytes, starts) = file(&bodies);
        let last = *starts.last().expect("frames");
        let cut = bytes.len() - 3;
        bytes.truncate(cut);
        let (records, gaps) = read(&bytes);
        assert_eq!(records.len(), bodies.len() - 1);
        assert_eq!(
            gaps,
            vec![Gap {
                offset: last as u64,
                bytes: (cut - last) as u64,
                records: None,
                at_end: true
            }]
        );
    }

    #[test]
    fn a_corrupt_record_in_the_middle_is_a_gap_with_its_size_and_records_lost() {
        let bodies = samples();
        let (mut bytes, starts) = file(&bodies);
        // Flip a byte inside the output record's data (frame 2).
        bytes[starts[2] + 20] ^= 0x40;
        let (records, gaps) = read(&bytes);
        let mut expected = bodies.clone();
        expected.remove(2);
        assert_eq!(
            records.into_iter().map(|r| r.body).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(
            gaps,
            vec![Gap {
                offset: starts[2] as u64,
                bytes: (starts[3] - starts[2]) as u64,
                records: Some(1),
                at_end: false
            }]
        );
    }

    #[test]
    fn garbage_between_frames_and_a_smashed_length_are_skipped() {
        let bodies = samples();
        let (bytes, starts) = file(&bodies);
        let mut damaged = bytes[..starts[4]].to_vec();
        damaged.extend_from_slice(&[0xF5, 0x7E, 0xff, 0xff, 0x0f, 0, 1, 2, 3]); // a fake frame
        damaged.extend_from_slice(&bytes[starts[4]..]);
        // And a record whose length field says 1 MiB.
        let at = starts[6] + 9;
        damaged[at + 2..at + 6].copy_from_slice(&(MAX_BODY as u32).to_le_bytes());
        let (records, gaps) = read(&damaged);
        assert_eq!(records.len(), bodies.len() - 1);
        assert_eq!(gaps.len(), 2, "{gaps:?}");
        assert_eq!(gaps[0].bytes, 9);
        assert_eq!(gaps[0].records, Some(0));
        assert_eq!(gaps[1].records, Some(1));
    }

    #[test]
    fn big_output_streams_through_a_small_reader_buffer() {
        // 8 MiB of 2-byte lines in 256 KiB chunks, read back byte for byte.
        let data: Vec<u8> = b"a\n".repeat(4 << 20);
        let mut out = header().encode();
        let mut enc = Encoder::new(0);
        for chunk in data.chunks(MAX_CHUNK) {
            enc.frame(
                1,
                &Body::Output {
                    definition: "d".into(),
                    stream: Stream::Stderr,
                    data: chunk.to_vec(),
                },
                &mut out,
            );
        }
        assert!(
            out.len() < data.len() + data.len() / 100,
            "stored {}",
            out.len()
        );
        let (reader, _) = Reader::new(out.as_slice()).expect("header");
        let mut back = Vec::new();
        for item in reader {
            if let Item::Record(Record {
                body: Body::Output { data, .. },
                ..
            }) = item.expect("item")
            {
                back.extend_from_slice(&data);
            }
        }
        assert!(back == data);
    }

    #[test]
    fn not_a_records_file_is_refused() {
        assert!(matches!(
            Reader::new(&b"{\"ts_us\":1}\n"[..]),
            Err(ReadError::NotRecords)
        ));
    }
}
