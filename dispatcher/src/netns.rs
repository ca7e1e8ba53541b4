//! Dialing the board, from inside its network namespace when it has one.
//!
//! A socket belongs to the namespace it was created in, so the socket is
//! made on a short-lived thread that has joined the namespace (never a pool
//! thread: their namespace would leak to unrelated work).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use tokio::net::TcpStream;

/// Where a namespace's handle lives: a name under /run/netns, or a path.
pub fn path(namespace: &str) -> PathBuf {
    if namespace.contains('/') {
        PathBuf::from(namespace)
    } else {
        PathBuf::from("/run/netns").join(namespace)
    }
}

/// Connects to `addr`, inside `namespace` when given.
///
/// # Errors
/// When the namespace cannot be joined or the connection fails in time.
pub async fn connect(
    addr: SocketAddr,
    namespace: Option<&str>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let Some(ns) = namespace else {
        return tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?;
    };
    let ns = path(ns);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| -> std::io::Result<std::net::TcpStream> {
            let handle = std::fs::File::open(&ns).map_err(|e| {
                std::io::Error::new(e.kind(), format!("network namespace {}: {e}", ns.display()))
            })?;
            setns(handle, CloneFlags::CLONE_NEWNET).map_err(|e| {
                std::io::Error::other(format!("joining network namespace {}: {e}", ns.display()))
            })?;
            let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })();
        let _ = tx.send(result);
    });
    let std_stream = rx
        .await
        .map_err(|_| std::io::Error::other("namespace dialer thread died"))??;
    TcpStream::from_std(std_stream)
}
