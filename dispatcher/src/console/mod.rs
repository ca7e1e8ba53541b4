//! The board's console: opened from the device file (tty, TCP serial server
//! raw or telnet, or a command), every byte logged with its time, lines
//! scanned for agent announcements and kernel panics, and the token written
//! back.

mod telnet;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferry_proto::console::{kernel_banner, kernel_panic, Announcement, TokenLine};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::device::Console as Spec;
use crate::events::EventLog;
use crate::outcome::Failure;

/// What the console reader saw.
#[derive(Debug)]
enum Seen {
    Line(String),
    Closed(String),
}

/// Something worth acting on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// An agent announced itself.
    Announce(Announcement),
    /// The kernel panicked.
    Panic(String),
    /// The console went away.
    Closed(String),
    /// Nothing of interest before the deadline.
    Timeout,
}

type Reader = Pin<Box<dyn AsyncRead + Send>>;
type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// The writing half, shared with the reader (which answers telnet options).
type Shared = Arc<tokio::sync::Mutex<Writer>>;

/// When each kernel printed its first line (`Linux version`) on a console,
/// noted by its reader as the line arrives; a clone keeps the list after the
/// console is gone (for the run's boot-phase timings).
#[derive(Debug, Clone, Default)]
pub struct KernelStarts(Arc<std::sync::Mutex<Vec<SystemTime>>>);

impl KernelStarts {
    /// The times, in order.
    pub fn times(&self) -> Vec<SystemTime> {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }
    fn push(&self, at: SystemTime) {
        if let Ok(mut t) = self.0.lock() {
            t.push(at);
        }
    }
}

/// An open console.
pub struct Console {
    writer: Shared,
    telnet: bool,
    lines: mpsc::UnboundedReceiver<Seen>,
    closed: Option<String>,
    /// The reader task: it holds the reading half (and a tty's exclusive
    /// lock), so it ends with the console.
    reader: tokio::task::JoinHandle<()>,
    kernels: KernelStarts,
    _child: Option<tokio::process::Child>,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn open_once(
    spec: &Spec,
) -> std::io::Result<(Reader, Writer, Option<tokio::process::Child>)> {
    match spec {
        Spec::Tty { path, baud } => {
            let port =
                tokio_serial::SerialStream::open(&tokio_serial::new(path.to_string_lossy(), *baud))
                    .map_err(std::io::Error::from)?;
            let (r, w) = tokio::io::split(port);
            Ok((Box::pin(r), Box::pin(w), None))
        }
        Spec::Tcp(addr) | Spec::Telnet(addr) => {
            let s = tokio::net::TcpStream::connect(addr.as_str()).await?;
            let (r, w) = s.into_split();
            Ok((Box::pin(r), Box::pin(w), None))
        }
        Spec::Command(cmd) => {
            let mut child = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let (Some(r), Some(w)) = (child.stdout.take(), child.stdin.take()) else {
                return Err(std::io::Error::other("console command has no stdio"));
            };
            Ok((Box::pin(r), Box::pin(w), Some(child)))
        }
    }
}

fn describe(spec: &Spec) -> String {
    match spec {
        Spec::Tty { path, baud } => format!("tty {} at {baud} baud", path.display()),
        Spec::Tcp(a) => format!("TCP serial server {a}"),
        Spec::Telnet(a) => format!("telnet serial server {a}"),
        Spec::Command(c) => format!("console command `{c}`"),
    }
}

impl Console {
    /// Opens the console, retrying until `timeout` (a pty or serial server
    /// may appear only once the board is powered).
    ///
    /// # Errors
    /// An infrastructure error when it cannot be opened in time.
    pub async fn open(
        spec: &Spec,
        timeout: Duration,
        events: Arc<EventLog>,
    ) -> Result<Self, Failure> {
        let deadline = Instant::now() + timeout;
        let (reader, writer, child) = loop {
            match open_once(spec).await {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => {
                    return Err(Failure::console(format!(
                        "cannot open console ({}): {e}",
                        describe(spec)
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        events.event(
            "dispatcher",
            json!({ "message": format!("console open: {}", describe(spec)) }),
        );
        let (tx, lines) = mpsc::unbounded_channel();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let telnet = matches!(spec, Spec::Telnet(_));
        let kernels = KernelStarts::default();
        let reader = tokio::spawn(read(
            reader,
            tx,
            events,
            telnet.then(|| writer.clone()),
            kernels.clone(),
        ));
        Ok(Console {
            writer,
            telnet,
            lines,
            closed: None,
            reader,
            kernels,
            _child: child,
        })
    }

    /// Writes this boot's token line.
    ///
    /// # Errors
    /// An infrastructure error when the console cannot be written in time.
    pub async fn send_token(&mut self, line: &TokenLine, timeout: Duration) -> Result<(), Failure> {
        // Lead with a newline so the token never joins a half-typed line.
        let text = format!("\n{line}\n").into_bytes();
        let text = if self.telnet {
            telnet::escape(&text)
        } else {
            text
        };
        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(&text).await?;
            w.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::console(format!(
                "writing the token to the console: {e}"
            ))),
            Err(_) => Err(Failure::console(
                "writing the token to the console timed out",
            )),
        }
    }

    /// Drops lines already received: after a hard reset they describe the
    /// boot that was cut short, not the next one.
    pub fn discard_pending(&mut self) {
        while let Ok(seen) = self.lines.try_recv() {
            if let Seen::Closed(reason) = seen {
                self.closed = Some(reason);
            }
        }
    }

    /// When kernels started on this console (shared with its reader).
    pub fn kernel_starts(&self) -> KernelStarts {
        self.kernels.clone()
    }

    /// Whether the console has closed (a new one must be opened).
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Waits for the next announcement, panic or close, until `deadline`.
    pub async fn next_signal(&mut self, deadline: Instant, events: &EventLog) -> Signal {
        if let Some(reason) = &self.closed {
            return Signal::Closed(reason.clone());
        }
        loop {
            let seen = match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Err(_) => return Signal::Timeout,
                Ok(None) => Seen::Closed("console reader stopped".into()),
                Ok(Some(s)) => s,
            };
            match seen {
                Seen::Closed(reason) => {
                    self.closed = Some(reason.clone());
                    return Signal::Closed(reason);
                }
                Seen::Line(line) => {
                    // Only the kernel's own line: test output that mentions a
                    // panic (kernel test suites print them) is not one.
                    if let Some(panic) = kernel_panic(&line) {
                        return Signal::Panic(panic.to_string());
                    }
                    match Announcement::find(&line) {
                        Some(Ok(a)) => return Signal::Announce(a),
                        Some(Err(e)) => {
                            events.say("dispatcher", format!("ignored a garbled announcement: {e}"))
                        }
                        None => {}
                    }
                }
            }
        }
    }
}

/// Console bytes are logged as one event per line (or per pause, or per
/// 4 KiB), stamped with the time its first byte arrived: a UART hands bytes
/// over a few at a time, and an event per read would bloat the log.
const EVENT_PAUSE: Duration = Duration::from_millis(50);
const EVENT_MAX: usize = 4096;

/// Reads the console until it closes: log every byte, hand on whole lines.
/// On a telnet connection, commands are stripped and answered through `telnet`.
async fn read(
    mut reader: Reader,
    tx: mpsc::UnboundedSender<Seen>,
    events: Arc<EventLog>,
    telnet: Option<Shared>,
    kernels: KernelStarts,
) {
    let mut decoder = telnet::Decoder::default();
    let (mut data, mut reply) = (Vec::new(), Vec::new());
    let mut raw = vec![0u8; 4096];
    let mut line: Vec<u8> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut since = SystemTime::now();
    // When the line being gathered began to arrive.
    let mut line_at = since;
    let closed = |why: String, pending: &[u8], since| {
        if !pending.is_empty() {
            events.console(pending, since);
        }
        let _ = tx.send(Seen::Closed(why));
    };
    loop {
        let read = if pending.is_empty() {
            Ok(reader.read(&mut raw).await)
        } else {
            tokio::time::timeout(EVENT_PAUSE, reader.read(&mut raw)).await
        };
        let n = match read {
            Err(_) => {
                // A pause: log the partial line now, so it is not held back.
                events.console(&pending, since);
                pending.clear();
                continue;
            }
            Ok(Ok(0)) => return closed("end of file".into(), &pending, since),
            Ok(Err(e)) => return closed(e.to_string(), &pending, since),
            Ok(Ok(n)) => n,
        };
        let bytes = match &telnet {
            None => &raw[..n],
            Some(writer) => {
                data.clear();
                reply.clear();
                decoder.feed(&raw[..n], &mut data, &mut reply);
                if !reply.is_empty() {
                    let mut w = writer.lock().await;
                    // A failed answer shows up as a closed console on the next read.
                    let _ = w.write_all(&reply).await;
                    let _ = w.flush().await;
                }
                &data[..]
            }
        };
        let now = SystemTime::now();
        for &b in bytes {
            if pending.is_empty() {
                since = now;
            }
            pending.push(b);
            if b == b'\n' || pending.len() >= EVENT_MAX {
                events.console(&pending, since);
                pending.clear();
            }
            if b == b'\n' {
                let text = String::from_utf8_lossy(&line).into_owned();
                if kernel_banner(&text) {
                    kernels.push(line_at);
                }
                let _ = tx.send(Seen::Line(text));
                line.clear();
            } else if line.len() < 64 * 1024 {
                if line.is_empty() {
                    line_at = now;
                }
                line.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::console::Role;
    use tokio::io::AsyncBufReadExt;

    fn announcement() -> Announcement {
        Announcement {
            role: Role::Master,
            version: "1".into(),
            boot: "b1".into(),
            addr: Some("192.0.2.2:7070".parse().expect("addr")),
            cert: Some("ab".repeat(32)),
        }
    }

    fn events() -> (tempfile::TempDir, Arc<EventLog>) {
        let dir = tempfile::tempdir().expect("tmp");
        let log = Arc::new(EventLog::create(dir.path()).expect("log"));
        (dir, log)
    }

    /// A TCP serial server (as ser2net serves a port): kernel noise, a cut
    /// announcement, then a whole one; the token must arrive back.
    #[tokio::test]
    async fn tcp_console_finds_the_announcement_and_carries_the_token() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let line = announcement().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut noise = b"[    1.0] virtio_net\r\n\x00\xff\r\n\x1b[0m".to_vec();
            noise.extend_from_slice(format!("{}[ 1.1] cut\r\n{line}\r\n", &line[..30]).as_bytes());
            s.write_all(&noise).await.expect("write");
            let mut lines = tokio::io::BufReader::new(s).lines();
            loop {
                let l = lines.next_line().await.expect("read").expect("line");
                if let Some(Ok(t)) = TokenLine::find(&l) {
                    return t;
                }
            }
        });
        let (dir, log) = events();
        let mut c = Console::open(
            &Spec::Tcp(addr.to_string()),
            Duration::from_secs(5),
            log.clone(),
        )
        .await
        .expect("open");
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            c.next_signal(deadline, &log).await,
            Signal::Announce(announcement())
        );
        let token = TokenLine {
            boot: "b1".into(),
            token: "abc".into(),
        };
        c.send_token(&token, Duration::from_secs(5))
            .await
            .expect("token");
        assert_eq!(server.await.expect("server"), token);
        log.flush();
        let raw = std::fs::read(dir.path().join("console.log")).expect("console.log");
        assert!(raw.windows(2).any(|w| w == [0u8, 0xff]), "raw bytes kept");
        assert!(std::fs::read_to_string(dir.path().join("events.jsonl"))
            .expect("events")
            .contains("garbled announcement"));
    }

    #[tokio::test]
    async fn command_console_sees_panics_and_closes() {
        let (_dir, log) = events();
        let cmd = Spec::Command(
            "echo '[  5.0] Kernel panic - not syncing: VFS: Unable to mount root fs'".into(),
        );
        let mut c = Console::open(&cmd, Duration::from_secs(5), log.clone())
            .await
            .expect("open");
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(
            matches!(c.next_signal(deadline, &log).await, Signal::Panic(l) if l.contains("Unable to mount"))
        );
        assert!(matches!(
            c.next_signal(deadline, &log).await,
            Signal::Closed(_)
        ));
    }

    #[tokio::test]
    async fn a_console_that_never_appears_is_an_infrastructure_error() {
        let (_dir, log) = events();
        let spec = Spec::Tty {
            path: "/nonexistent/tty".into(),
            baud: 115_200,
        };
        let e = Console::open(&spec, Duration::from_millis(300), log)
            .await
            .err()
            .expect("fails");
        assert_eq!(e.kind, crate::outcome::Kind::Console);
        assert!(e.message.contains("/nonexistent/tty"), "{}", e.message);
    }
}
