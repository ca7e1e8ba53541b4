//! The receiving side of the test agent's live record stream
//! (`proto/RECORDS.md`, "Live stream").
//!
//! Before the test boot the dispatcher opens a [`Listener`]: TLS with a
//! certificate made for this job, on the device file's `network.stream`
//! address, and a token made for this stream only; [`Listener::plan`] is
//! what the test plan carries to the agent. The agent dials in and sends
//! the bytes of its records files as it writes them; they are kept in a
//! staging folder of the output folder, and published to whoever
//! [`Listener::subscribe`]s (a live view). When the agent's closing
//! manifest matches every byte received, [`Listener::kept`] resolves and
//! [`Kept::adopt`] moves the files where a fetch would have put them, so
//! the output folder is the same either way. A stream that is cut, never
//! comes, or does not match never resolves `kept`: the run then fetches
//! through the master image as before.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::plan::v1::RecordStream;
use ferry_proto::stream::{Decoder, FileDigest, Hello, Manifest, Message, Verdict};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, watch};

use crate::events::EventLog;

/// The name in the listener's certificate (only its fingerprint is checked).
pub const SERVER_NAME: &str = "ferry-dispatcher";

/// Most records files one stream may carry.
const MAX_FILES: usize = 10_000;

/// Why the listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// No address or namespace to listen on.
    #[error("listening for the record stream on {addr}: {source}")]
    Bind {
        /// The device file's `network.stream`.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The staging folder.
    #[error("record stream staging folder in {dir}: {source}")]
    Staging {
        /// The output folder.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate or TLS configuration.
    #[error("record stream TLS: {0}")]
    Tls(String),
}

/// Bytes of a records file as they arrived, for live consumers.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The records file's name.
    pub file: Arc<str>,
    /// Where the bytes go in it.
    pub offset: u64,
    /// The bytes (whole record frames, or a file's header).
    pub bytes: Arc<[u8]>,
}

/// A stream that ended with every byte matching the agent's manifest.
#[derive(Debug)]
pub struct Kept {
    /// The files, as the manifest lists them.
    pub manifest: Manifest,
    staging: PathBuf,
}

/// The stream's state, as [`Listener::kept`] watches it.
#[derive(Debug, Clone, Default)]
enum State {
    #[default]
    Waiting,
    Kept(Arc<Manifest>),
    /// Cut, refused or not matching: no later connection is accepted.
    Failed,
}

/// One job's record stream listener.
pub struct Listener {
    addr: SocketAddr,
    cert_sha256: String,
    token: String,
    timeout: Duration,
    staging: tempfile::TempDir,
    state: watch::Receiver<State>,
    live: broadcast::Sender<Chunk>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Listens on `addr` (inside `namespace` when given) with a fresh
    /// certificate and token; staging files go to a folder in `out`.
    /// `timeout` bounds the handshake and hello, and is what the agent gets
    /// for connecting and for the verdict.
    ///
    /// # Errors
    /// When the address cannot be bound or the staging folder made.
    pub async fn open(
        addr: SocketAddr,
        namespace: Option<&str>,
        out: &Path,
        timeout: Duration,
        events: Arc<EventLog>,
    ) -> Result<Self, ListenError> {
        let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| ListenError::Tls(e.to_string()))?;
        let cert = made.cert.der().clone();
        let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
            .map_err(|e| ListenError::Tls(e.to_string()))?;
        let cert_sha256 = ferry_proto::sha256_hex(cert.as_ref());
        let acceptor = acceptor(cert, key)?;
        let listener = crate::netns::listen(addr, namespace)
            .await
            .map_err(|source| ListenError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ListenError::Bind { addr, source })?;
        let staging = tempfile::Builder::new()
            .prefix(".stream-")
            .tempdir_in(out)
            .map_err(|source| ListenError::Staging {
                dir: out.into(),
                source,
            })?;
        let token = new_token();
        let (state_tx, state) = watch::channel(State::Waiting);
        let (live, _) = broadcast::channel(1024);
        let session = Session {
            token: token.clone(),
            timeout,
            staging: staging.path().into(),
            live: live.clone(),
            events,
        };
        let task = tokio::spawn(async move {
            session.serve(listener, acceptor, state_tx).await;
        });
        Ok(Listener {
            addr: bound,
            cert_sha256,
            token,
            timeout,
            staging,
            state,
            live,
            task,
        })
    }

    /// What the test plan carries: where to dial, whom to trust, the token.
    pub fn plan(&self) -> RecordStream {
        RecordStream {
            address: self.addr.to_string(),
            cert_sha256: self.cert_sha256.clone(),
            token: self.token.clone(),
            timeout_ms: u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX),
        }
    }

    /// The bytes of every records file as they arrive (a consumer that
    /// falls behind loses chunks, told by the receiver's `Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Chunk> {
        self.live.subscribe()
    }

    /// Resolves once a stream has ended with every byte matching its
    /// manifest; never, when the stream is cut, refused or does not match
    /// (the caller waits for the board instead).
    pub async fn kept(&mut self) -> Kept {
        loop {
            if let State::Kept(m) = &*self.state.borrow_and_update() {
                return Kept {
                    manifest: (**m).clone(),
                    staging: self.staging.path().into(),
                };
            }
            if self.state.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

/// Opens the job's listener when the device file names a
/// `network.stream` address; `None` (said in the events) when it does not
/// or the listener cannot be opened: the records are then fetched.
pub async fn for_device(
    device: &crate::device::Device,
    out: &Path,
    events: Arc<EventLog>,
) -> Option<Listener> {
    let addr = device.network.stream?;
    let ns = device.network.namespace.as_deref();
    match Listener::open(addr, ns, out, device.timeouts.rpc, events.clone()).await {
        Ok(mut l) => {
            if let Some(a) = device.network.stream_address {
                l.addr = a;
            }
            events.event(
                "dispatcher",
                json!({ "kind": "stream-listening", "address": l.addr.to_string() }),
            );
            Some(l)
        }
        Err(e) => {
            events.say(
                "dispatcher",
                format!("no live record stream ({e}): the records will be fetched"),
            );
            None
        }
    }
}

impl Kept {
    /// Copies the streamed files into `dir` (tests compare them with the
    /// fetched ones: `FERRY_STREAM_COPY`).
    ///
    /// # Errors
    /// When a file cannot be copied.
    pub fn copy_to(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for f in &self.manifest.files {
            std::fs::copy(self.staging.join(&f.name), dir.join(&f.name))?;
        }
        Ok(())
    }

    /// Moves the streamed files into `board_dir`, where a fetch puts them.
    ///
    /// # Errors
    /// When a file cannot be moved.
    pub fn adopt(&self, board_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(board_dir)?;
        for f in &self.manifest.files {
            std::fs::rename(self.staging.join(&f.name), board_dir.join(&f.name))?;
        }
        Ok(())
    }
}

fn acceptor(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<tokio_rustls::TlsAcceptor, ListenError> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(crate::tls::provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ListenError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| ListenError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// 32 random bytes in hex, from the kernel's generator (through uuid's).
fn new_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    ferry_proto::hex(&[a.as_bytes().as_slice(), b.as_bytes().as_slice()].concat())
}

/// Compares without an early exit, so timing tells nothing about the token.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The server side of one stream's TLS connection.
type ServerTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// One records file being received.
struct Incoming {
    file: tokio::fs::File,
    len: u64,
    hash: sha2::Sha256,
}

/// Why a stream was not kept.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ferry_proto::stream::StreamError),
    #[error("{0}")]
    Refused(String),
}

struct Session {
    token: String,
    timeout: Duration,
    staging: PathBuf,
    live: broadcast::Sender<Chunk>,
    events: Arc<EventLog>,
}

impl Session {
    /// Accepts connections until one has authenticated, then receives its
    /// stream (kept or not) and accepts no more. Handshakes run side by
    /// side, so a peer that connects and stalls cannot hold the agent up;
    /// connections without the token are dropped and do not count.
    async fn serve(
        self,
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        state: watch::Sender<State>,
    ) {
        let this = Arc::new(self);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let accepting = {
            let this = this.clone();
            async move {
                loop {
                    let Ok((tcp, peer)) = listener.accept().await else {
                        continue;
                    };
                    let (this, acceptor, tx) = (this.clone(), acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        if let Some(authenticated) = this.handshake(&acceptor, tcp, peer).await {
                            let _ = tx.send(authenticated).await;
                        }
                    });
                }
            }
        };
        let (tls, d, hello, peer) = tokio::select! {
            () = accepting => return,
            got = rx.recv() => match got {
                Some(got) => got,
                None => return,
            },
        };
        this.say(
            json!({ "kind": "stream-connected", "peer": peer.to_string(), "boot": hello.boot }),
        );
        match this.receive(tls, d).await {
            Ok(m) => {
                this.say(json!({ "kind": "stream-kept", "files": m.files, "sha256": m.sha256 }));
                let _ = state.send(State::Kept(Arc::new(m)));
            }
            Err(e) => {
                this.say(json!({ "kind": "stream-failed", "why": e.to_string() }));
                this.events.say(
                    "dispatcher",
                    format!("live record stream not kept ({e}): the records will be fetched"),
                );
                let _ = state.send(State::Failed);
            }
        }
    }

    /// TLS, then the hello with this stream's token, within the timeout;
    /// `None` (said in the events) for anything else.
    async fn handshake(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> Option<(ServerTls, Decoder, Hello, SocketAddr)> {
        let _ = tcp.set_nodelay(true);
        let hello = tokio::time::timeout(self.timeout, async {
            let mut tls = acceptor.accept(tcp).await?;
            let mut d = Decoder::after_preamble();
            let hello = next(&mut tls, &mut d).await?;
            Ok::<_, Broken>((tls, d, hello))
        })
        .await;
        let why = match hello {
            Ok(Ok((tls, d, Message::Hello(h)))) if same_token(&h.token, &self.token) => {
                return Some((tls, d, h, peer))
            }
            Ok(Ok(_)) => "no valid stream token".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no hello within {:?}", self.timeout),
        };
        self.say(json!({ "kind": "stream-refused", "peer": peer.to_string(), "why": why }));
        None
    }

    fn say(&self, v: serde_json::Value) {
        self.events.event("dispatcher", v);
    }

    /// Receives files until the manifest; answers it with the verdict.
    async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut tls: S,
        mut d: Decoder,
    ) -> Result<Manifest, Broken> {
        let mut files: BTreeMap<String, Incoming> = BTreeMap::new();
        let mut current: Option<String> = None;
        let manifest = loop {
            match next(&mut tls, &mut d).await? {
                Message::File { name } => {
                    ferry_proto::names::check(&name)
                        .map_err(|e| Broken::Refused(format!("records file name: {e}")))?;
                    if !files.contains_key(&name) {
                        if files.len() >= MAX_FILES {
                            return Err(Broken::Refused(format!("more than {MAX_FILES} files")));
                        }
                        let file = tokio::fs::File::create(self.staging.join(&name)).await?;
                        files.insert(
                            name.clone(),
                            Incoming {
                                file,
                                len: 0,
                                hash: sha2::Sha256::new(),
                            },
                        );
                    }
                    current = Some(name);
                }
                Message::Data { offset, bytes } => {
                    let name = current
                        .as_ref()
                        .ok_or_else(|| Broken::Refused("data before any file".into()))?;
                    let f = files
                        .get_mut(name)
                        .ok_or_else(|| Broken::Refused("data for no file".into()))?;
                    if offset != f.len {
                        return Err(Broken::Refused(format!(
                            "{name}: data at offset {offset}, expected {}",
                            f.len
                        )));
                    }
                    f.file.write_all(&bytes).await?;
                    f.hash.update(&bytes);
                    f.len += bytes.len() as u64;
                    let _ = self.live.send(Chunk {
                        file: name.as_str().into(),
                        offset,
                        bytes: bytes.into(),
                    });
                }
                Message::End(m) => break m,
                Message::Hello(_) | Message::Verdict(_) => {
                    return Err(Broken::Refused("unexpected message".into()))
                }
            }
        };
        let mut received = Vec::new();
        for (name, mut f) in files {
            f.file.flush().await?;
            received.push(FileDigest {
                name,
                bytes: f.len,
                sha256: ferry_proto::hex(&f.hash.finalize()),
            });
        }
        let verdict = check(&manifest, &received);
        let kept = verdict.is_ok();
        let answer = Verdict {
            kept,
            reason: verdict.as_ref().err().cloned().unwrap_or_default(),
        };
        let mut buf = Vec::new();
        Message::Verdict(answer).encode(&mut buf);
        // The verdict is a courtesy: the agent goes on either way.
        let _ = tokio::time::timeout(self.timeout, async {
            tls.write_all(&buf).await?;
            tls.flush().await?;
            tls.shutdown().await
        })
        .await;
        verdict.map(|()| manifest).map_err(Broken::Refused)
    }
}

/// Whether what arrived is exactly what the manifest lists, and the
/// manifest says the records are final.
fn check(manifest: &Manifest, received: &[FileDigest]) -> Result<(), String> {
    if manifest.sha256 != ferry_proto::stream::digest(&manifest.files) {
        return Err("the manifest's digest does not match its files".into());
    }
    if !manifest.clean {
        return Err("the board's filesystem was not left clean".into());
    }
    if let Some(other) = manifest.others.first() {
        return Err(format!(
            "the records folder holds {other:?}, not a regular file: the fetch reports it"
        ));
    }
    let listed: BTreeMap<&str, &FileDigest> = manifest
        .files
        .iter()
        .map(|f| (f.name.as_str(), f))
        .collect();
    for r in received {
        match listed.get(r.name.as_str()) {
            None => return Err(format!("{} was streamed but is not on the board", r.name)),
            Some(l) if *l != r => {
                return Err(format!(
                    "{}: the board has {} bytes (sha256 {}), the stream brought {} (sha256 {})",
                    r.name, l.bytes, l.sha256, r.bytes, r.sha256
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(missing) = manifest
        .files
        .iter()
        .find(|l| !received.iter().any(|r| r.name == l.name))
    {
        return Err(format!(
            "{} is on the board but was not streamed",
            missing.name
        ));
    }
    Ok(())
}

/// Reads until the decoder has a whole message.
async fn next<S: AsyncRead + Unpin>(s: &mut S, d: &mut Decoder) -> Result<Message, Broken> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(m) = d.next_message()? {
            return Ok(m);
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(Broken::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the stream was cut before its end",
            )));
        }
        d.push(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::stream::{Hello, PREAMBLE};

    async fn listener(dir: &Path) -> Listener {
        let events = Arc::new(EventLog::create(dir).expect("events"));
        Listener::open(
            "127.0.0.1:0".parse().expect("addr"),
            None,
            dir,
            Duration::from_secs(5),
            events,
        )
        .await
        .expect("listen")
    }

    /// Dials `plan` as a test agent would and sends `msgs` after the
    /// preamble; returns the verdict, if one came.
    async fn agent(plan: &RecordStream, pin: &str, msgs: &[Message]) -> Option<Verdict> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(crate::tls::PinnedCert::new(pin))
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(plan.address.as_str())
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .ok()?;
        let mut buf = PREAMBLE.to_vec();
        for m in msgs {
            m.encode(&mut buf);
        }
        tls.write_all(&buf).await.ok()?;
        tls.flush().await.ok()?;
        match next(&mut tls, &mut Decoder::new()).await {
            Ok(Message::Verdict(v)) => Some(v),
            _ => None,
        }
    }

    fn messages(token: &str, data: &[u8], listed: &[u8]) -> Vec<Message> {
        let f = |d: &[u8]| FileDigest {
            name: "agent-0000.ferryrec".into(),
            bytes: d.len() as u64,
            sha256: ferry_proto::sha256_hex(d),
        };
        vec![
            Message::Hello(Hello {
                token: token.into(),
                boot: "b".into(),
            }),
            Message::File {
                name: "agent-0000.ferryrec".into(),
            },
            Message::Data {
                offset: 0,
                bytes: data[..2].to_vec(),
            },
            Message::Data {
                offset: 2,
                bytes: data[2..].to_vec(),
            },
            Message::End(Manifest::new(vec![f(listed)], true)),
        ]
    }

    #[tokio::test]
    async fn only_a_stream_with_the_token_and_every_byte_is_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut l = listener(dir.path()).await;
        let plan = l.plan();
        let mut live = l.subscribe();

        // The wrong token: dropped, and the listener still waits.
        assert_eq!(
            agent(
                &plan,
                &plan.cert_sha256,
                &messages("guess", b"records", b"records")
            )
            .await,
            None
        );
        // Another certificate pinned: the agent refuses the listener.
        assert_eq!(
            agent(
                &plan,
                &"00".repeat(32),
                &messages(&plan.token, b"records", b"records")
            )
            .await,
            None
        );
        // A peer that connects and says nothing does not hold the agent up
        // (the hello timeout is 5 s).
        let _stalled = tokio::net::TcpStream::connect(plan.address.as_str())
            .await
            .expect("stalled peer");
        let started = std::time::Instant::now();
        // The right token and every byte: kept.
        let v = agent(
            &plan,
            &plan.cert_sha256,
            &messages(&plan.token, b"records", b"records"),
        )
        .await
        .expect("verdict");
        assert!(v.kept, "{v:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        let kept = tokio::time::timeout(Duration::from_secs(5), l.kept())
            .await
            .expect("kept");
        let board = dir.path().join("board");
        kept.adopt(&board).expect("adopt");
        assert_eq!(
            std::fs::read(board.join("agent-0000.ferryrec")).expect("file"),
            b"records"
        );
        let first = live.recv().await.expect("chunk");
        assert_eq!(
            (&*first.file, first.offset, &*first.bytes),
            ("agent-0000.ferryrec", 0, &b"re"[..])
        );
    }

    #[tokio::test]
    async fn a_stream_that_does_not_match_the_board_is_not_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut l = listener(dir.path()).await;
        let plan = l.plan();
        let v = agent(
            &plan,
            &plan.cert_sha256,
            &messages(&plan.token, b"records", b"recordz"),
        )
        .await
        .expect("verdict");
        assert!(!v.kept && v.reason.contains("sha256"), "{v:?}");
        // Never resolves: the run fetches instead.
        assert!(tokio::time::timeout(Duration::from_millis(300), l.kept())
            .await
            .is_err());
    }
}
