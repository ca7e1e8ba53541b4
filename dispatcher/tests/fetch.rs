//! The dispatcher's results fetch against boards that stop answering: an
//! in-process master agent over TLS that stalls mid-stream, one behind a
//! link that freezes (as a hung or SIGSTOPped board does), and one that
//! trickles forever. Each fetch ends within its limits, keeping what arrived.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use ferry_dispatcher::client::Session;
use ferry_dispatcher::device::Timeouts;
use ferry_proto::console::{Announcement, Role};
use ferry_proto::master::v1 as pb;
use ferry_proto::master::v1::master_agent_server::{MasterAgent, MasterAgentServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// How the fake board's results stream behaves.
#[derive(Clone, Copy)]
enum Behaviour {
    /// One whole file and half of another, then nothing (connection alive).
    Stall,
    /// The same, then a chunk every 100 ms forever.
    Trickle,
}

const FIRST: &[u8] = b"{\"one\":1}\n{\"two\":2}\n";
const PART: &[u8] = b"{\"three\":3}\n{\"fo";

struct Board {
    behaviour: Behaviour,
    /// Told when the first chunks are out.
    sent: watch::Sender<bool>,
}

type Chunks = Pin<Box<dyn Stream<Item = Result<pb::ResultsChunk, Status>> + Send>>;

fn unused<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this test"))
}

#[tonic::async_trait]
impl MasterAgent for Board {
    async fn get_info(
        &self,
        _: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::AgentInfo>, Status> {
        unused()
    }
    type DeployStream = Pin<Box<dyn Stream<Item = Result<pb::DeployEvent, Status>> + Send>>;
    async fn deploy(
        &self,
        _: Request<Streaming<pb::DeployRequest>>,
    ) -> Result<Response<Self::DeployStream>, Status> {
        unused()
    }
    async fn install_test_agent(
        &self,
        _: Request<pb::InstallTestAgentRequest>,
    ) -> Result<Response<pb::InstallTestAgentReply>, Status> {
        unused()
    }
    async fn set_boot_once(
        &self,
        _: Request<pb::SetBootOnceRequest>,
    ) -> Result<Response<pb::SetBootOnceReply>, Status> {
        unused()
    }
    async fn reboot(
        &self,
        _: Request<pb::RebootRequest>,
    ) -> Result<Response<pb::RebootReply>, Status> {
        unused()
    }

    type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecReply, Status>> + Send>>;

    async fn exec(
        &self,
        _: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        unused()
    }

    type FetchResultsStream = Chunks;

    async fn fetch_results(
        &self,
        _: Request<pb::FetchResultsRequest>,
    ) -> Result<Response<Chunks>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let behaviour = self.behaviour;
        let sent = self.sent.clone();
        tokio::spawn(async move {
            let chunk = |path: &str, data: &[u8], eof| {
                Ok(pb::ResultsChunk {
                    path: path.into(),
                    data: data.to_vec(),
                    eof,
                    refused: None,
                })
            };
            for c in [
                chunk("a.jsonl", FIRST, false),
                chunk("a.jsonl", b"", true),
                chunk("b.jsonl", PART, false),
            ] {
                if tx.send(c).await.is_err() {
                    return;
                }
            }
            let _ = sent.send(true);
            match behaviour {
                Behaviour::Stall => {
                    // Keep the stream open, sending nothing.
                    tx.closed().await;
                }
                Behaviour::Trickle => loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if tx.send(chunk("b.jsonl", b"x", false)).await.is_err() {
                        return;
                    }
                },
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves a fake board over TLS on loopback; returns its address, the
/// certificate's fingerprint and a receiver told when the first chunks are out.
async fn serve(behaviour: Behaviour) -> (SocketAddr, String, watch::Receiver<bool>) {
    let made = rcgen::generate_simple_self_signed(vec!["ferry-master-agent".to_string()])
        .expect("certificate");
    let fingerprint = ferry_proto::sha256_hex(made.cert.der());
    let identity =
        tonic::transport::Identity::from_pem(made.cert.pem(), made.signing_key.serialize_pem());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (sent, sent_rx) = watch::channel(false);
    let board = Board { behaviour, sent };
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .expect("tls")
            .add_service(MasterAgentServer::new(board))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    (addr, fingerprint, sent_rx)
}

/// Copies `from` to `to` until `freeze` turns true, then holds both open and
/// silent.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut freeze: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = freeze.wait_for(|f| *f) => break,
        };
        if *freeze.borrow() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Frozen: both halves stay open (owned by this future), nothing passes.
    std::future::pending::<()>().await;
}

/// A TCP relay to `to` that forwards until `freeze` turns true, then holds
/// both connections open and silent: a board that stopped answering.
async fn freezing_link(to: SocketAddr, freeze: watch::Receiver<bool>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(server) = tokio::net::TcpStream::connect(to).await else {
            return;
        };
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        tokio::join!(pipe(cr, sw, freeze.clone()), pipe(sr, cw, freeze));
    });
    addr
}

async fn session(addr: SocketAddr, cert: String, timeouts: &Timeouts) -> Session {
    let a = Announcement {
        role: Role::Master,
        version: "test".into(),
        boot: "b".into(),
        addr: Some(addr),
        cert: Some(cert),
    };
    Session::connect(&a, None, "t", timeouts)
        .await
        .expect("connect")
}

fn timeouts(keepalive: Duration) -> Timeouts {
    Timeouts {
        rpc: Duration::from_secs(10),
        keepalive,
        ..Default::default()
    }
}

/// Asserts what arrived before the stall is on disk: the whole first file
/// and the start of the second.
fn kept(dir: &std::path::Path) {
    assert_eq!(std::fs::read(dir.join("a.jsonl")).expect("a"), FIRST);
    let b = std::fs::read(dir.join("b.jsonl")).expect("b");
    assert!(b.starts_with(PART), "{:?}", String::from_utf8_lossy(&b));
}

#[tokio::test]
async fn a_stream_that_stalls_ends_at_the_idle_limit_keeping_what_arrived() {
    let (addr, cert, _) = serve(Behaviour::Stall).await;
    let t = timeouts(Duration::from_secs(20));
    let mut s = session(addr, cert, &t).await;
    let dir = tempfile::tempdir().expect("tmp");
    let started = Instant::now();
    let e = s
        .fetch(
            "testrootfs",
            dir.path(),
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
        .await
        .expect_err("stalled");
    let took = started.elapsed();
    eprintln!("stalled stream ended after {took:?}: {}", e.message);
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        e.message.contains("sent no results for 1s"),
        "{}",
        e.message
    );
    assert_eq!(
        e.class_in(ferry_dispatcher::outcome::Phase::Fetch),
        ferry_dispatcher::outcome::Class::InfrastructureError
    );
    kept(dir.path());
}

#[tokio::test]
async fn a_board_that_stops_answering_is_found_dead_by_keepalive() {
    let (server, cert, mut sent) = serve(Behaviour::Stall).await;
    let (freeze, frozen) = watch::channel(false);
    let link = freezing_link(server, frozen).await;
    // The idle limit is far away: only the keepalive can end this early.
    let t = timeouts(Duration::from_secs(2));
    let mut s = session(link, cert, &t).await;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().to_path_buf();
    let fetch = tokio::spawn(async move {
        let started = Instant::now();
        let r = s
            .fetch(
                "testrootfs",
                &path,
                Duration::from_secs(120),
                Duration::from_secs(60),
            )
            .await;
        (r, started.elapsed())
    });
    sent.wait_for(|s| *s).await.expect("first chunks sent");
    // Let the first chunks cross, then freeze the link.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = freeze.send(true);
    let (r, took) = fetch.await.expect("join");
    let e = r.expect_err("dead board");
    eprintln!("dead board found after {took:?}: {}", e.message);
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(
        e.class_in(ferry_dispatcher::outcome::Phase::Fetch),
        ferry_dispatcher::outcome::Class::InfrastructureError
    );
    kept(dir.path());
}

#[tokio::test]
async fn a_stream_that_never_ends_stops_at_the_fetch_deadline() {
    let (addr, cert, _) = serve(Behaviour::Trickle).await;
    let t = timeouts(Duration::from_secs(20));
    let mut s = session(addr, cert, &t).await;
    let dir = tempfile::tempdir().expect("tmp");
    let started = Instant::now();
    let e = s
        .fetch(
            "testrootfs",
            dir.path(),
            Duration::from_secs(2),
            Duration::from_secs(1),
        )
        .await
        .expect_err("never ends");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert!(
        e.message.contains("did not finish within 2s") || e.message.contains("DeadlineExceeded"),
        "{}",
        e.message
    );
    kept(dir.path());
}
