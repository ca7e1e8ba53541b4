//! The live record stream: every byte the records writer puts in a records
//! file is also sent, as it is written, to the dispatcher named in the plan
//! (TLS, the dispatcher's certificate pinned by the plan, the plan's stream
//! token first). At the end the agent reads back every records file left on
//! the board and sends their digests; when the dispatcher received exactly
//! that, it needs no boot into the master image to fetch them.
//!
//! The stream never slows or stops the run: bytes go to a sender thread
//! through a queue bounded in bytes, and anything wrong (no network, a cut
//! connection, a queue over its bound) only ends the stream; the records on
//! disk stay what they are and the dispatcher fetches them as before.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_proto::pin::{provider, PinnedCert};
use ferry_proto::plan::v1::RecordStream;
use ferry_proto::record::agent_file;
use ferry_proto::stream::{
    Decoder, FileDigest, Hello, Manifest, Message, Verdict, MAX_DATA, PREAMBLE,
};
use rustls::pki_types::ServerName;
use sha2::Digest;

use crate::records::{Files, Storage};

/// The name the agent asks the dispatcher's listener for (only the pinned
/// certificate decides).
pub const SERVER_NAME: &str = "ferry-dispatcher";

/// Most bytes waiting for the network before the stream gives up (the
/// records are then fetched): a slow network must not hold the run's
/// memory.
const MAX_QUEUED: usize = 64 << 20;

/// Why the stream did not deliver.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    /// The plan's stream settings are unusable.
    #[error("the plan's stream address {0:?} is not ip:port")]
    Address(String),
    /// Connecting, the TLS handshake or a write failed.
    #[error("stream to {addr}: {why}")]
    Network {
        /// The dispatcher's address.
        addr: SocketAddr,
        /// What failed.
        why: String,
    },
    /// More was recorded than the network carried in time.
    #[error("more than {MAX_QUEUED} bytes waited for the network")]
    Backlog,
    /// The writer cut a file back to a length the stream had passed.
    #[error("a records file was cut back after it was streamed")]
    Cut,
    /// The dispatcher answered the manifest with no verdict in time.
    #[error("no verdict from the dispatcher: {0}")]
    NoVerdict(String),
    /// The dispatcher did not keep the stream.
    #[error("the dispatcher did not keep the stream: {0}")]
    Refused(String),
}

enum Cmd {
    File(String),
    Data { offset: u64, bytes: Vec<u8> },
    End(Manifest),
}

/// What the producers and the sender thread share.
#[derive(Default)]
struct Shared {
    /// Bytes queued and not yet written to the network.
    queued: AtomicUsize,
    broken: AtomicBool,
    /// The first thing that went wrong.
    failure: Mutex<Option<StreamError>>,
    /// Names of the files streamed (as the writer made them).
    files: Mutex<BTreeSet<String>>,
}

impl Shared {
    fn fail(&self, e: StreamError) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            if let Ok(mut f) = self.failure.lock() {
                *f = Some(e);
            }
        }
    }

    fn failure(&self) -> Option<StreamError> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

/// What producers hold: queue bytes for the sender (the sender thread has
/// no sink, so the queue closes when the producers are gone).
#[derive(Clone)]
struct Sink {
    tx: Sender<Cmd>,
    shared: Arc<Shared>,
}

impl Sink {
    fn fail(&self, e: StreamError) {
        self.shared.fail(e);
    }

    fn send(&self, cmd: Cmd) {
        let s = &self.shared;
        if s.broken.load(Ordering::SeqCst) {
            return;
        }
        if let Cmd::Data { bytes, .. } = &cmd {
            if s.queued.fetch_add(bytes.len(), Ordering::SeqCst) + bytes.len() > MAX_QUEUED {
                s.fail(StreamError::Backlog);
                return;
            }
        }
        if let Cmd::File(name) = &cmd {
            if let Ok(mut f) = s.files.lock() {
                f.insert(name.clone());
            }
        }
        let _ = self.tx.send(cmd);
    }

    fn file(&self, name: String) {
        self.send(Cmd::File(name));
    }

    fn data(&self, offset: u64, bytes: &[u8]) {
        for (i, piece) in bytes.chunks(MAX_DATA).enumerate() {
            self.send(Cmd::Data {
                offset: offset + (i * MAX_DATA) as u64,
                bytes: piece.to_vec(),
            });
        }
    }
}

/// The records files, each byte also handed to the stream once written.
pub struct Tee {
    inner: Files,
    sink: Sink,
    /// Length of the current file as streamed.
    len: u64,
}

impl Storage for Tee {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.append(buf)?;
        self.sink.data(self.len, buf);
        self.len += buf.len() as u64;
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn cut(&mut self, len: u64) -> std::io::Result<()> {
        // The writer cuts back only what a failed append left, which was
        // never streamed.
        if len != self.len {
            self.sink.fail(StreamError::Cut);
        }
        self.inner.cut(len)
    }
    fn next_file(&mut self, header: &[u8]) -> std::io::Result<bool> {
        let started = self.inner.next_file(header)?;
        if started {
            self.sink.file(self.inner.name());
            self.sink.data(0, header);
            self.len = header.len() as u64;
        }
        Ok(started)
    }
}

/// A running stream: its sender thread and the handle to end it with.
pub struct Live {
    sink: Sink,
    addr: SocketAddr,
    thread: JoinHandle<Result<Verdict, StreamError>>,
}

impl Live {
    /// Starts streaming to the plan's dispatcher (connecting in the
    /// background) and returns the records storage that feeds it, over
    /// the agent's first records file in `dir`.
    ///
    /// # Errors
    /// An unusable address, or a first records file that cannot be made.
    pub fn start(
        plan: &RecordStream,
        boot: &str,
        dir: &Path,
    ) -> Result<(Live, std::io::Result<Tee>), StreamError> {
        let addr: SocketAddr = plan
            .address
            .parse()
            .map_err(|_| StreamError::Address(plan.address.clone()))?;
        let (tx, rx) = channel();
        let sink = Sink {
            tx,
            shared: Arc::new(Shared::default()),
        };
        let hello = Hello {
            token: plan.token.clone(),
            boot: boot.into(),
        };
        let pin = plan.cert_sha256.clone();
        let timeout = Duration::from_millis(u64::from(plan.timeout_ms.max(1)));
        let s = sink.shared.clone();
        let thread = std::thread::Builder::new()
            .name("stream".into())
            .spawn(move || {
                let r = send_all(addr, &pin, hello, timeout, rx, &s);
                if let Err(e) = &r {
                    s.fail(e.clone());
                }
                r
            })
            .map_err(|e| StreamError::Network {
                addr,
                why: format!("starting the sender: {e}"),
            })?;
        let tee = Files::create(dir).map(|inner| {
            sink.file(agent_file(0));
            Tee {
                inner,
                sink: sink.clone(),
                len: 0,
            }
        });
        Ok((Live { sink, addr, thread }, tee))
    }

    /// Ends the stream once the records are final: sends whatever records
    /// file in `dir` the writer did not (a helper's own), then the digest
    /// of every file there as read back, and waits for the dispatcher's
    /// verdict. `clean`: every writer closed and the filesystem read-only.
    ///
    /// # Errors
    /// Whatever ended the stream early, or the dispatcher's refusal.
    pub fn finish(self, dir: &Path, clean: bool) -> Result<(), StreamError> {
        let read_back = read_back(dir, &self.sink);
        match read_back {
            Ok((files, others)) => self.sink.send(Cmd::End(Manifest {
                others,
                ..Manifest::new(files, clean)
            })),
            Err(e) => self.sink.fail(StreamError::Network {
                addr: self.addr,
                why: format!("reading back the records: {e}"),
            }),
        }
        let shared = self.sink.shared.clone();
        // Dropping the last sender lets the thread end once its queue is done.
        drop(self.sink);
        match self.thread.join() {
            Ok(Ok(v)) if v.kept => Ok(()),
            Ok(Ok(v)) => Err(StreamError::Refused(v.reason)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(shared
                .failure()
                .unwrap_or(StreamError::NoVerdict("the sender thread failed".into()))),
        }
    }
}

/// Digests of every regular file in `dir` (a file the stream has not
/// carried is queued whole first), and the names of the other entries.
fn read_back(dir: &Path, sink: &Sink) -> std::io::Result<(Vec<FileDigest>, Vec<String>)> {
    let streamed = sink
        .shared
        .files
        .lock()
        .map(|f| f.clone())
        .unwrap_or_default();
    let (mut files, mut others) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_file() {
            others.push(name);
            continue;
        }
        let new = !streamed.contains(&name);
        if new {
            sink.file(name.clone());
        }
        let mut f = std::fs::File::open(entry.path())?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; MAX_DATA];
        let mut bytes = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            if new {
                sink.data(bytes, &buf[..n]);
            }
            bytes += n as u64;
        }
        files.push(FileDigest {
            name,
            bytes,
            sha256: ferry_proto::hex(&h.finalize()),
        });
    }
    Ok((files, others))
}

/// The sender thread: connect, authenticate, send every command, and after
/// the manifest wait for the verdict.
fn send_all(
    addr: SocketAddr,
    pin: &str,
    hello: Hello,
    timeout: Duration,
    rx: Receiver<Cmd>,
    shared: &Shared,
) -> Result<Verdict, StreamError> {
    let net = |why: String| StreamError::Network { addr, why };
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| net(e.to_string()))?;
    // A stalled network ends the stream instead of the run.
    tcp.set_write_timeout(Some(timeout))
        .and_then(|()| tcp.set_read_timeout(Some(timeout)))
        .and_then(|()| tcp.set_nodelay(true))
        .map_err(|e| net(e.to_string()))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| net(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(PinnedCert::new(pin))
        .with_no_client_auth();
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| net(e.to_string()))?;
    let conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| net(e.to_string()))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut buf = PREAMBLE.to_vec();
    Message::Hello(hello).encode(&mut buf);
    tls.write_all(&buf).map_err(|e| net(e.to_string()))?;
    let mut ended = false;
    while let Ok(first) = rx.recv() {
        if shared.broken.load(Ordering::SeqCst) {
            break;
        }
        // Everything queued goes out in one write.
        buf.clear();
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            let msg = match cmd {
                Cmd::File(name) => Message::File { name },
                Cmd::Data { offset, bytes } => {
                    shared.queued.fetch_sub(bytes.len(), Ordering::SeqCst);
                    Message::Data { offset, bytes }
                }
                Cmd::End(m) => {
                    ended = true;
                    Message::End(m)
                }
            };
            msg.encode(&mut buf);
            if buf.len() < (1 << 20) {
                next = rx.try_recv().ok();
            }
        }
        tls.write_all(&buf)
            .and_then(|()| tls.flush())
            .map_err(|e| net(e.to_string()))?;
        if ended {
            return verdict(&mut tls, timeout).map_err(StreamError::NoVerdict);
        }
    }
    Err(shared.failure().unwrap_or(StreamError::NoVerdict(
        "the run ended without a manifest".into(),
    )))
}

fn verdict(tls: &mut impl Read, timeout: Duration) -> Result<Verdict, String> {
    let deadline = Instant::now() + timeout;
    let mut d = Decoder::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match d.next_message().map_err(|e| e.to_string())? {
            Some(Message::Verdict(v)) => return Ok(v),
            Some(_) => return Err("unexpected message".into()),
            None => {}
        }
        let n = tls.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the dispatcher closed the stream".into());
        }
        d.push(&buf[..n]);
    }
    Err(format!("none within {timeout:?}"))
}
