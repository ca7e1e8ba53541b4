//! Dialing the board, from inside its network namespace when it has one.
//!
//! A socket belongs to the namespace it was created in, so the socket is
//! made on a short-lived thread that has joined the namespace (never a pool
//! thread: their namespace would leak to unrelated work).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use tokio::net::{TcpListener, TcpStream};

/// Where a namespace's handle lives: a name under /run/netns, or a path.
pub fn path(namespace: &str) -> PathBuf {
    if namespace.contains('/') {
        PathBuf::from(namespace)
    } else {
        PathBuf::from("/run/netns").join(namespace)
    }
}

/// Runs `make` on a short-lived thread that joined `namespace`: the
/// sockets it makes belong to that namespace.
async fn in_namespace<T: Send + 'static>(
    namespace: &str,
    make: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let ns = path(namespace);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| -> std::io::Result<T> {
            let handle = std::fs::File::open(&ns).map_err(|e| {
                std::io::Error::new(e.kind(), format!("network namespace {}: {e}", ns.display()))
            })?;
            setns(handle, CloneFlags::CLONE_NEWNET).map_err(|e| {
                std::io::Error::other(format!("joining network namespace {}: {e}", ns.display()))
            })?;
            make()
        })();
        let _ = tx.send(result);
    });
    rx.await
        .map_err(|_| std::io::Error::other("namespace thread died"))?
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
    let std_stream = in_namespace(ns, move || {
        let s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .await?;
    TcpStream::from_std(std_stream)
}

/// Listens on `addr`, inside `namespace` when given.
///
/// # Errors
/// When the namespace cannot be joined or the address cannot be bound.
pub async fn listen(addr: SocketAddr, namespace: Option<&str>) -> std::io::Result<TcpListener> {
    let Some(ns) = namespace else {
        return TcpListener::bind(addr).await;
    };
    let std_listener = in_namespace(ns, move || {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .await?;
    TcpListener::from_std(std_listener)
}
