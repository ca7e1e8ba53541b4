//! The records file on the test rootfs and the one thread that writes it.
//!
//! Everything the agent records (output chunks from the runner, results
//! from the helpers, kernel messages) goes through a bounded queue to the
//! writer thread: a producer faster than the disk blocks on the queue (and
//! so, through the runner, the test blocks on its pipe) instead of being
//! buffered without limit. The writer coalesces output into chunks, writes
//! each batch of frames with one `write`, `fdatasync`s on a short interval
//! and before acknowledging a durable record (result, set, definition,
//! agent), applies the job's output quotas, and when the disk fills up
//! releases the space reserved at start and keeps recording everything but
//! output, saying how much output it dropped.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_proto::record::{
    agent_file, Body, DropReason, Encoder, Header, Stream, MAX_CHUNK, ROTATE_BYTES,
};

/// Why recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The records file could not be written or synced.
    #[error("records file {path}: {source}")]
    Io {
        /// The records file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The writer thread is gone (it failed earlier, or was closed).
    #[error("the records writer has stopped")]
    Stopped,
    /// A durable record was not acknowledged in time.
    #[error("the records writer did not confirm a record within {0:?}")]
    Timeout(Duration),
    /// The record was refused for lack of space, even after the reserve was released.
    #[error("record not stored: {0}")]
    NotStored(String),
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Output limits of a run, from the plan; 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Bytes of output each definition may record.
    pub definition: u64,
    /// Bytes of output the whole run may record.
    pub job: u64,
}

/// How the writer behaves; [`Settings::default`] is what the agent uses.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Output limits.
    pub quotas: Quotas,
    /// Records the queue holds before producers block (each at most one
    /// output chunk, so this bounds the queue's memory).
    pub queue: usize,
    /// Longest output waits to be coalesced into a bigger chunk.
    pub hold: Duration,
    /// Longest written records wait for `fdatasync`.
    pub sync_interval: Duration,
    /// Longest a durable record waits for its acknowledgement.
    pub durable_timeout: Duration,
    /// A file of this many bytes is made at start and deleted when the disk
    /// fills up, so results can still be recorded.
    pub reserve: Option<(PathBuf, u64)>,
    /// A records file that reached this size is closed and the next one
    /// started (when the storage can).
    pub rotate: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            quotas: Quotas::default(),
            queue: 16,
            hold: Duration::from_millis(100),
            sync_interval: Duration::from_millis(250),
            durable_timeout: Duration::from_secs(60),
            reserve: None,
            rotate: ROTATE_BYTES,
        }
    }
}

/// Where frames go: a file, or (in tests) something slower.
pub trait Storage: Send {
    /// Appends `buf` whole, or fails.
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()>;
    /// `fdatasync`.
    fn sync(&mut self) -> std::io::Result<()>;
    /// Cuts the file back to `len` bytes (a failed append left part of a batch).
    fn cut(&mut self, len: u64) -> std::io::Result<()>;
    /// Starts the next file with `header` (synced) and appends there from
    /// now on; `Ok(false)` when this storage is one file only.
    fn next_file(&mut self, _header: &[u8]) -> std::io::Result<bool> {
        Ok(false)
    }
}

/// The agent's records files in a folder: `agent-0000.ferryrec`, then
/// `agent-0001.ferryrec`...
pub struct Files {
    dir: PathBuf,
    index: u32,
    file: File,
}

impl Files {
    /// Creates the first file in `dir`.
    ///
    /// # Errors
    /// When it cannot be created.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        Ok(Files {
            dir: dir.into(),
            index: 0,
            file: Self::open(&dir.join(agent_file(0)))?,
        })
    }

    /// The name of the file being written.
    pub fn name(&self) -> String {
        agent_file(self.index)
    }

    fn open(path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
    }
}

impl Storage for Files {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file.append(buf)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync()
    }
    fn cut(&mut self, len: u64) -> std::io::Result<()> {
        self.file.cut(len)
    }
    fn next_file(&mut self, header: &[u8]) -> std::io::Result<bool> {
        let path = self.dir.join(agent_file(self.index + 1));
        let started = Self::open(&path).and_then(|mut f| {
            f.write_all(header)?;
            f.sync_data()?;
            Ok(f)
        });
        match started {
            Ok(f) => {
                self.file = f;
                self.index += 1;
                Ok(true)
            }
            Err(e) => {
                // No room for a new file: the current one goes on.
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }
}

impl Storage for File {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.write_all(buf)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
    fn cut(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.seek(SeekFrom::Start(len)).map(|_| ())
    }
}

/// An acknowledgement: `Ok` once the record is on disk.
type Ack = SyncSender<Result<(), String>>;

enum Msg {
    Record {
        at: u64,
        body: Body,
        ack: Option<Ack>,
    },
    Close,
}

/// A handle producers share; sending blocks while the queue is full.
#[derive(Clone)]
pub struct Recorder {
    tx: SyncSender<Msg>,
    durable_timeout: Duration,
}

impl Recorder {
    /// Queues a chunk of output (split when larger than a record holds).
    ///
    /// # Errors
    /// When the writer has stopped.
    pub fn output(
        &self,
        definition: &str,
        stream: Stream,
        data: Vec<u8>,
    ) -> Result<(), RecordError> {
        let at = now_us();
        if data.len() <= MAX_CHUNK {
            return self.send(
                at,
                Body::Output {
                    definition: definition.into(),
                    stream,
                    data,
                },
            );
        }
        for part in data.chunks(MAX_CHUNK) {
            self.send(
                at,
                Body::Output {
                    definition: definition.into(),
                    stream,
                    data: part.to_vec(),
                },
            )?;
        }
        Ok(())
    }

    /// Queues a record without waiting for it to reach the disk.
    ///
    /// # Errors
    /// When the writer has stopped.
    pub fn record(&self, body: Body) -> Result<(), RecordError> {
        self.send(now_us(), body)
    }

    fn send(&self, at: u64, body: Body) -> Result<(), RecordError> {
        self.tx
            .send(Msg::Record {
                at,
                body,
                ack: None,
            })
            .map_err(|_| RecordError::Stopped)
    }

    /// Records `body` and returns once it is on disk.
    ///
    /// # Errors
    /// When it could not be stored, or was not confirmed in time.
    pub fn durable(&self, body: Body) -> Result<(), RecordError> {
        let (ack, done) = sync_channel(1);
        self.tx
            .send(Msg::Record {
                at: now_us(),
                body,
                ack: Some(ack),
            })
            .map_err(|_| RecordError::Stopped)?;
        match done.recv_timeout(self.durable_timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(RecordError::NotStored(why)),
            Err(RecvTimeoutError::Timeout) => Err(RecordError::Timeout(self.durable_timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(RecordError::Stopped),
        }
    }
}

/// What the writer did, for the agent's last words on the console.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes in the records files.
    pub file_bytes: u64,
    /// Output bytes recorded.
    pub output_kept: u64,
    /// Output bytes dropped (quota or full disk).
    pub output_dropped: u64,
    /// Whether the disk filled up.
    pub disk_full: bool,
}

/// The writer thread; close it to flush, sync and close the file.
pub struct Writer {
    recorder: Recorder,
    thread: Option<JoinHandle<Result<Stats, RecordError>>>,
}

impl Writer {
    /// Creates the agent's first records file in `dir` (its header from
    /// `header`) and starts the writer thread.
    ///
    /// # Errors
    /// When the file cannot be created or its header written.
    pub fn create(dir: &Path, header: Header, settings: Settings) -> Result<Self, RecordError> {
        let files = Files::create(dir).map_err(|source| RecordError::Io {
            path: dir.join(agent_file(0)),
            source,
        })?;
        Self::start(Box::new(files), dir, header, settings)
    }

    /// Starts a writer on any storage (the tests' slow disk).
    ///
    /// # Errors
    /// When the header cannot be written.
    pub fn start(
        mut storage: Box<dyn Storage>,
        path: &Path,
        header: Header,
        settings: Settings,
    ) -> Result<Self, RecordError> {
        let io = |source| RecordError::Io {
            path: path.into(),
            source,
        };
        let head = header.encode();
        storage.append(&head).map_err(io)?;
        storage.sync().map_err(io)?;
        if let Some((reserve, bytes)) = &settings.reserve {
            // Best effort: without it, results may be lost on a full disk,
            // but the run itself must go on.
            let _ = make_reserve(reserve, *bytes);
        }
        let (tx, rx) = sync_channel(settings.queue.max(1));
        let recorder = Recorder {
            tx,
            durable_timeout: settings.durable_timeout,
        };
        let state = State {
            enc: Encoder::new(header.start_us),
            header,
            storage,
            path: path.into(),
            len: head.len() as u64,
            settings,
            pending: None,
            batch: Vec::new(),
            acks: Vec::new(),
            durable: false,
            unsynced_since: None,
            counts: BTreeMap::new(),
            job_kept: 0,
            disk_full: false,
            stats: Stats::default(),
        };
        let thread = std::thread::Builder::new()
            .name("records".into())
            .spawn(move || state.run(rx))
            .map_err(io)?;
        Ok(Writer {
            recorder,
            thread: Some(thread),
        })
    }

    /// A handle to record with.
    pub fn recorder(&self) -> Recorder {
        self.recorder.clone()
    }

    /// Writes what is queued, syncs, closes the file and stops the thread;
    /// later records from other handles fail with [`RecordError::Stopped`].
    ///
    /// # Errors
    /// The writer's first failure.
    pub fn close(mut self) -> Result<Stats, RecordError> {
        let _ = self.recorder.tx.send(Msg::Close);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => Err(RecordError::Stopped),
        }
    }
}

fn make_reserve(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    let len = i64::try_from(bytes).unwrap_or(i64::MAX);
    if nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len).is_err() {
        // No fallocate here (some filesystems): write the zeros.
        let zeros = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
    }
    f.sync_all()
}

/// Output of one definition, as counted against its quota.
#[derive(Default)]
struct Count {
    kept: u64,
    dropped: u64,
    reason: Option<DropReason>,
}

struct Pending {
    at: u64,
    since: Instant,
    definition: String,
    stream: Stream,
    data: Vec<u8>,
}

struct State {
    /// What every file of this writer starts with (its time renewed).
    header: Header,
    storage: Box<dyn Storage>,
    path: PathBuf,
    /// Length of the file up to its last whole frame.
    len: u64,
    enc: Encoder,
    settings: Settings,
    /// Output waiting to grow into a bigger chunk.
    pending: Option<Pending>,
    /// Records to write with the next `write`.
    batch: Vec<(u64, Body)>,
    acks: Vec<Ack>,
    /// The batch holds a record that must be synced at once.
    durable: bool,
    unsynced_since: Option<Instant>,
    counts: BTreeMap<String, Count>,
    job_kept: u64,
    disk_full: bool,
    stats: Stats,
}

/// Largest batch written with one `write`.
const BATCH_BYTES: usize = 1 << 20;

impl State {
    fn io(&self, source: std::io::Error) -> RecordError {
        RecordError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) -> Result<Stats, RecordError> {
        let mut closing = false;
        while !closing {
            let now = Instant::now();
            let deadline = [
                self.pending.as_ref().map(|p| p.since + self.settings.hold),
                self.unsynced_since.map(|t| t + self.settings.sync_interval),
            ]
            .into_iter()
            .flatten()
            .min();
            let first = match deadline {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(d) => rx.recv_timeout(d.saturating_duration_since(now)),
            };
            match first {
                Ok(Msg::Close) | Err(RecvTimeoutError::Disconnected) => closing = true,
                Ok(Msg::Record { at, body, ack }) => {
                    self.take(at, body, ack);
                    // Everything already queued joins this batch.
                    let mut size = 0usize;
                    while size < BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(Msg::Record { at, body, ack }) => {
                                if let Body::Output { data, .. } = &body {
                                    size += data.len();
                                }
                                self.take(at, body, ack);
                            }
                            Ok(Msg::Close) | Err(TryRecvError::Disconnected) => {
                                closing = true;
                                break;
                            }
                            Err(TryRecvError::Empty) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let held_long = self
                .pending
                .as_ref()
                .is_some_and(|p| p.since.elapsed() >= self.settings.hold);
            if closing || held_long || self.durable {
                self.flush_pending();
            }
            if let Err(e) = self.write_batch() {
                self.fail_acks(&e);
                return Err(e);
            }
            let sync_due = self
                .unsynced_since
                .is_some_and(|t| t.elapsed() >= self.settings.sync_interval);
            if self.durable || sync_due || closing {
                if let Err(e) = self.sync() {
                    self.fail_acks(&e);
                    return Err(e);
                }
            }
        }
        // Definitions still counting drops (the run was cut short) say so.
        let open: Vec<String> = self
            .counts
            .iter()
            .filter(|(_, c)| c.dropped > 0)
            .map(|(d, _)| d.clone())
            .collect();
        for d in open {
            self.report_drops(&d, now_us());
        }
        self.write_batch()?;
        self.sync()?;
        if let Some((reserve, _)) = &self.settings.reserve {
            let _ = std::fs::remove_file(reserve);
        }
        self.stats.file_bytes += self.len;
        self.stats.disk_full = self.disk_full;
        Ok(self.stats)
    }

    fn fail_acks(&mut self, e: &RecordError) {
        for ack in self.acks.drain(..) {
            let _ = ack.send(Err(e.to_string()));
        }
    }

    /// Takes one record into the batch (output into the pending chunk).
    fn take(&mut self, at: u64, body: Body, ack: Option<Ack>) {
        match body {
            Body::Output {
                definition,
                stream,
                data,
            } => self.take_output(at, definition, stream, data),
            body => {
                if let Body::DefinitionFinished { definition, .. } = &body {
                    self.report_drops(&definition.clone(), at);
                }
                self.flush_pending();
                self.durable |= body.is_durable() || ack.is_some();
                self.batch.push((at, body));
                if let Some(ack) = ack {
                    self.acks.push(ack);
                }
            }
        }
    }

    fn take_output(&mut self, at: u64, definition: String, stream: Stream, mut data: Vec<u8>) {
        let q = self.settings.quotas;
        let count = self.counts.entry(definition.clone()).or_default();
        let limit = |quota: u64, used: u64| {
            if quota == 0 {
                u64::MAX
            } else {
                quota.saturating_sub(used)
            }
        };
        let room_def = limit(q.definition, count.kept);
        let room_job = limit(q.job, self.job_kept);
        let (room, reason) = if self.disk_full {
            (0, DropReason::DiskFull)
        } else if room_def <= room_job {
            (room_def, DropReason::DefinitionQuota)
        } else {
            (room_job, DropReason::JobQuota)
        };
        let len = data.len() as u64;
        if len > room {
            let keep = room as usize;
            count.dropped += len - room;
            count.reason.get_or_insert(reason);
            self.stats.output_dropped += len - room;
            data.truncate(keep);
        }
        if data.is_empty() {
            return;
        }
        count.kept += data.len() as u64;
        self.job_kept += data.len() as u64;
        match &mut self.pending {
            Some(p)
                if p.definition == definition
                    && p.stream == stream
                    && p.data.len() + data.len() <= MAX_CHUNK =>
            {
                p.data.extend_from_slice(&data);
            }
            _ => {
                self.flush_pending();
                self.pending = Some(Pending {
                    at,
                    since: Instant::now(),
                    definition,
                    stream,
                    data,
                });
            }
        }
    }

    fn flush_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            self.batch.push((
                p.at,
                Body::Output {
                    definition: p.definition,
                    stream: p.stream,
                    data: p.data,
                },
            ));
        }
    }

    /// Records how much of `definition`'s output was dropped, once.
    fn report_drops(&mut self, definition: &str, at: u64) {
        let Some(count) = self.counts.get_mut(definition) else {
            return;
        };
        if count.dropped == 0 {
            return;
        }
        let body = Body::OutputDropped {
            definition: definition.into(),
            reason: count.reason.unwrap_or(DropReason::DefinitionQuota),
            bytes: count.dropped,
        };
        count.dropped = 0;
        self.flush_pending();
        self.durable = true;
        self.batch.push((at, body));
    }

    fn encode(&mut self, items: &[(u64, Body)]) -> Vec<u8> {
        let mut buf = Vec::new();
        for (at, body) in items {
            self.enc.frame(*at, body, &mut buf);
        }
        buf
    }

    /// Writes the batch with one `write`. On a full disk: cuts the file
    /// back to its last whole frame, releases the reserve, drops the
    /// batch's output (counted) and writes the rest.
    fn write_batch(&mut self) -> Result<(), RecordError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(&mut self.batch);
        let first_seq = self.enc.next_seq();
        let buf = self.encode(&items);
        match self.storage.append(&buf) {
            Ok(()) => {
                self.committed(&items, buf.len());
                self.maybe_rotate()?;
                return Ok(());
            }
            Err(e) if !is_no_space(&e) => return Err(self.io(e)),
            Err(_) => {}
        }
        self.storage.cut(self.len).map_err(|e| self.io(e))?;
        self.enc.rewind(first_seq);
        if !self.disk_full {
            self.disk_full = true;
            if let Some((reserve, _)) = &self.settings.reserve {
                let _ = std::fs::remove_file(reserve);
            }
        }
        let mut rest = Vec::new();
        let mut dropped: Vec<String> = Vec::new();
        for (at, body) in items {
            match body {
                Body::Output {
                    definition, data, ..
                } => {
                    let c = self.counts.entry(definition.clone()).or_default();
                    let n = data.len() as u64;
                    c.kept = c.kept.saturating_sub(n);
                    c.dropped += n;
                    c.reason.get_or_insert(DropReason::DiskFull);
                    self.job_kept = self.job_kept.saturating_sub(n);
                    self.stats.output_dropped += n;
                    if !dropped.contains(&definition) {
                        dropped.push(definition);
                    }
                }
                Body::DefinitionFinished { ref definition, .. } if dropped.contains(definition) => {
                    let d = definition.clone();
                    let mut c = self.counts.remove(&d).unwrap_or_default();
                    rest.push((
                        at,
                        Body::OutputDropped {
                            definition: d.clone(),
                            reason: c.reason.take().unwrap_or(DropReason::DiskFull),
                            bytes: c.dropped,
                        },
                    ));
                    c.dropped = 0;
                    self.counts.insert(d, c);
                    rest.push((at, body));
                }
                other => rest.push((at, other)),
            }
        }
        let buf = self.encode(&rest);
        match self.storage.append(&buf) {
            Ok(()) => {
                self.committed(&rest, buf.len());
                Ok(())
            }
            Err(e) => {
                // Not even the records fit: cut back and say so to waiters.
                let _ = self.storage.cut(self.len);
                self.enc.rewind(first_seq);
                let e = self.io(e);
                self.fail_acks(&e);
                self.durable = false;
                // Keep going: later records may fit once the test frees space.
                Ok(())
            }
        }
    }

    /// Starts the next file once this one is big enough: everything so far
    /// synced, the new file with its own header, numbering from 0 again.
    fn maybe_rotate(&mut self) -> Result<(), RecordError> {
        if self.settings.rotate == 0 || self.len < self.settings.rotate {
            return Ok(());
        }
        self.sync()?;
        self.stats.file_bytes += self.len;
        let mut header = self.header.clone();
        header.start_us = now_us();
        let head = header.encode();
        match self.storage.next_file(&head) {
            Ok(true) => {
                self.len = head.len() as u64;
                self.enc = Encoder::new(header.start_us);
            }
            // One file only, or no room for another: this one goes on.
            Ok(false) | Err(_) => {
                self.stats.file_bytes -= self.len;
                self.settings.rotate = 0;
            }
        }
        Ok(())
    }

    fn committed(&mut self, items: &[(u64, Body)], bytes: usize) {
        self.len += bytes as u64;
        for (_, body) in items {
            if let Body::Output { data, .. } = body {
                self.stats.output_kept += data.len() as u64;
            }
        }
        self.unsynced_since.get_or_insert_with(Instant::now);
    }

    fn sync(&mut self) -> Result<(), RecordError> {
        if self.unsynced_since.is_some() {
            self.storage.sync().map_err(|e| self.io(e))?;
            self.unsynced_since = None;
        }
        for ack in self.acks.drain(..) {
            let _ = ack.send(Ok(()));
        }
        self.durable = false;
        Ok(())
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT
    ) || e.kind() == std::io::ErrorKind::StorageFull
}

/// Writes one record straight to a file of its own: how a helper records
/// when it cannot reach the agent (the agent was killed, say), so the
/// result still survives.
///
/// # Errors
/// When the file cannot be written and synced.
pub fn write_alone(path: &Path, header: Header, body: &Body) -> Result<(), RecordError> {
    let io = |source| RecordError::Io {
        path: path.into(),
        source,
    };
    let mut buf = header.encode();
    Encoder::new(header.start_us).frame(now_us(), body, &mut buf);
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
        .map_err(io)?;
    f.write_all(&buf).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::record::{Item, Outcome, Reader, Record};
    use std::sync::{Arc, Mutex};

    fn header() -> Header {
        Header {
            boot: "b".into(),
            job: "j".into(),
            agent_version: "t".into(),
            start_us: now_us(),
            writer: "test".into(),
        }
    }

    fn result(case: &str) -> Body {
        Body::Result {
            definition: "d".into(),
            case: case.into(),
            result: Outcome::Pass,
            measurement: None,
            units: None,
            set: None,
            reference: None,
        }
    }

    fn read(path: &Path) -> (Vec<Record>, usize) {
        let f = File::open(path).expect("open");
        let (reader, gap) = Reader::new(std::io::BufReader::new(f)).expect("header");
        let mut gaps = usize::from(gap.is_some());
        let mut records = Vec::new();
        for item in reader {
            match item.expect("item") {
                Item::Record(r) => records.push(r),
                _ => gaps += 1,
            }
        }
        (records, gaps)
    }

    fn output_of(records: &[Record]) -> Vec<u8> {
        records
            .iter()
            .filter_map(|r| match &r.body {
                Body::Output { data, .. } => Some(data.as_slice()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }

    #[test]
    fn output_is_coalesced_and_results_are_durable_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(agent_file(0));
        let w = Writer::create(dir.path(), header(), Settings::default()).expect("writer");
        let rec = w.recorder();
        for _ in 0..1000 {
            rec.output("d", Stream::Stdout, b"x\n".to_vec())
                .expect("out");
        }
        rec.durable(result("a")).expect("durable");
        // The result is on disk when durable() returns, after the output.
        let (records, gaps) = read(&path);
        assert_eq!(gaps, 0);
        assert_eq!(output_of(&records), b"x\n".repeat(1000));
        assert!(matches!(
            records.last().map(|r| &r.body),
            Some(Body::Result { .. })
        ));
        assert!(
            records.len() < 10,
            "2000 bytes of output in {} records",
            records.len()
        );
        let stats = w.close().expect("close");
        assert_eq!(stats.output_kept, 2000);
    }

    #[test]
    fn quotas_cut_output_exactly_and_say_how_much() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(agent_file(0));
        let settings = Settings {
            quotas: Quotas {
                definition: 1000,
                job: 1500,
            },
            ..Settings::default()
        };
        let w = Writer::create(dir.path(), header(), settings).expect("writer");
        let rec = w.recorder();
        let finished = |d: &str| Body::DefinitionFinished {
            definition: d.into(),
            exit_code: Some(0),
            timed_out: false,
            duration_ms: 1,
        };
        rec.output("a", Stream::Stdout, vec![b'a'; 1200])
            .expect("a");
        rec.durable(finished("a")).expect("a done");
        rec.output("b", Stream::Stderr, vec![b'b'; 700]).expect("b");
        rec.durable(result("after")).expect("result");
        rec.durable(finished("b")).expect("b done");
        w.close().expect("close");
        let (records, _) = read(&path);
        let drops: Vec<_> = records
            .iter()
            .filter_map(|r| match &r.body {
                Body::OutputDropped {
                    definition,
                    reason,
                    bytes,
                } => Some((definition.as_str(), *reason, *bytes)),
                _ => None,
            })
            .collect();
        assert_eq!(
            drops,
            vec![
                ("a", DropReason::DefinitionQuota, 200),
                ("b", DropReason::JobQuota, 200)
            ]
        );
        assert_eq!(output_of(&records).len(), 1500);
        assert!(records.iter().any(|r| r.body == result("after")));
    }

    /// A disk of `room` bytes that fails with ENOSPC beyond it.
    struct SmallDisk {
        data: Arc<Mutex<Vec<u8>>>,
        room: usize,
    }
    impl Storage for SmallDisk {
        fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
            let mut d = self
                .data
                .lock()
                .map_err(|_| std::io::Error::other("lock"))?;
            let fit = self.room.saturating_sub(d.len()).min(buf.len());
            d.extend_from_slice(&buf[..fit]);
            if fit < buf.len() {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
            Ok(())
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn cut(&mut self, len: u64) -> std::io::Result<()> {
            let mut d = self
                .data
                .lock()
                .map_err(|_| std::io::Error::other("lock"))?;
            d.truncate(len as usize);
            Ok(())
        }
    }

    #[test]
    fn a_full_disk_drops_output_but_keeps_results_and_says_so() {
        let data = Arc::new(Mutex::new(Vec::new()));
        let disk = SmallDisk {
            data: data.clone(),
            room: 64 * 1024,
        };
        let dir = tempfile::tempdir().expect("tmp");
        let reserve = dir.path().join("reserve");
        let settings = Settings {
            reserve: Some((reserve.clone(), 4096)),
            ..Settings::default()
        };
        let w = Writer::start(Box::new(disk), Path::new("mem"), header(), settings).expect("w");
        assert!(reserve.exists());
        let rec = w.recorder();
        for i in 0..40 {
            rec.output("d", Stream::Stdout, vec![b'o'; 4000])
                .expect("out");
            if i % 10 == 9 {
                rec.durable(result(&format!("r{i}"))).expect("result kept");
            }
        }
        rec.durable(Body::DefinitionFinished {
            definition: "d".into(),
            exit_code: Some(0),
            timed_out: false,
            duration_ms: 1,
        })
        .expect("finished");
        let stats = w.close().expect("close");
        assert!(stats.disk_full);
        assert!(!reserve.exists(), "the reserve is released");
        let bytes = data.lock().expect("lock").clone();
        let (reader, _) = Reader::new(bytes.as_slice()).expect("header");
        let records: Vec<Record> = reader
            .map(|i| match i.expect("item") {
                Item::Record(r) => r,
                other => panic!("the file has no holes: {other:?}"),
            })
            .collect();
        let results = records
            .iter()
            .filter(|r| matches!(r.body, Body::Result { .. }))
            .count();
        assert_eq!(results, 4);
        let kept = output_of(&records).len() as u64;
        let dropped: u64 = records
            .iter()
            .filter_map(|r| match r.body {
                Body::OutputDropped {
                    bytes,
                    reason: DropReason::DiskFull,
                    ..
                } => Some(bytes),
                _ => None,
            })
            .sum();
        assert_eq!(kept + dropped, 160_000);
        assert_eq!(kept, stats.output_kept);
        assert!(matches!(
            records.last().map(|r| &r.body),
            Some(Body::DefinitionFinished { .. })
        ));
    }

    #[test]
    fn helper_fallback_file_reads_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("helper-1.ferryrec");
        write_alone(&path, header(), &result("x")).expect("write");
        let (records, gaps) = read(&path);
        assert_eq!((records.len(), gaps), (1, 0));
        assert!(
            write_alone(&path, header(), &result("y")).is_err(),
            "never overwrites"
        );
    }

    #[test]
    fn big_output_is_spread_over_files_that_each_read_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let settings = Settings {
            rotate: 300_000,
            ..Settings::default()
        };
        let w = Writer::create(dir.path(), header(), settings).expect("writer");
        let rec = w.recorder();
        for i in 0..40u8 {
            rec.output("d", Stream::Stdout, vec![b'a' + i % 26; 50_000])
                .expect("out");
        }
        rec.durable(result("end")).expect("result");
        let stats = w.close().expect("close");
        let mut records = Vec::new();
        let mut i = 0;
        while dir.path().join(agent_file(i)).exists() {
            let (r, gaps) = read(&dir.path().join(agent_file(i)));
            assert_eq!(gaps, 0);
            records.extend(r);
            i += 1;
        }
        // A file is closed after the batch that takes it past the size.
        assert!(i >= 2, "{i} files for 2 MB in 300 kB files");
        let expected: Vec<u8> = (0..40u8)
            .flat_map(|i| vec![b'a' + i % 26; 50_000])
            .collect();
        assert!(output_of(&records) == expected);
        assert!(matches!(
            records.last().map(|r| &r.body),
            Some(Body::Result { .. })
        ));
        let on_disk: u64 = (0..i)
            .map(|n| {
                std::fs::metadata(dir.path().join(agent_file(n)))
                    .expect("meta")
                    .len()
            })
            .sum();
        assert_eq!(stats.file_bytes, on_disk);
        for n in 0..i {
            let len = std::fs::metadata(dir.path().join(agent_file(n)))
                .expect("meta")
                .len();
            assert!(
                len < 300_000 + (BATCH_BYTES + MAX_CHUNK) as u64 + 4096,
                "file {n}: {len}"
            );
        }
    }
}
