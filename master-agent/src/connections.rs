//! Connections from the lab network, which the agent treats as hostile: at
//! most `max_connections` open at once, so a flood of idle or half-open
//! connections cannot exhaust the board (each one past the cap is closed as
//! it arrives; keepalive and the TLS handshake timeout free the rest).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted connection holding one of the `max_connections`
/// places until it closes.
pub struct Capped {
    io: TcpStream,
    _place: OwnedSemaphorePermit,
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts connections while fewer than `max` are open; one past the cap is
/// closed at once (its peer sees the connection reset).
pub fn capped(listener: TcpListener, max: usize) -> ReceiverStream<Result<Capped, std::io::Error>> {
    let (tx, rx) = mpsc::channel(1);
    let places = Arc::new(Semaphore::new(max.max(1)));
    tokio::spawn(async move {
        loop {
            let (io, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "refusing a connection: {max} already open");
                continue;
            };
            let _ = io.set_nodelay(true);
            let capped = Capped { io, _place: place };
            if tx.send(Ok(capped)).await.is_err() {
                return; // the server stopped
            }
        }
    });
    ReceiverStream::new(rx)
}
