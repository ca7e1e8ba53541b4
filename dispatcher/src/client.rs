//! The dispatcher's side of the master agent API: connect (through the
//! board's network namespace, over TLS pinned to the announced certificate),
//! authenticate with the console-issued token, and give every call a
//! deadline.

use std::path::Path;
use std::time::Duration;

use ferry_proto::console::Announcement;
use ferry_proto::master::v1 as pb;
use ferry_proto::master::v1::master_agent_client::MasterAgentClient;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use crate::device::Timeouts;
use crate::job::{Compression, DeployEntry};
use crate::netns;
use crate::outcome::{Failure, Kind};
use crate::tls::{self, PinnedCert};

/// Size of the chunks images are streamed in.
const CHUNK: usize = 256 * 1024;

type Auth = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send + Sync>;

/// An authenticated connection to one boot's master agent.
pub struct Session {
    client: MasterAgentClient<InterceptedService<Channel, Auth>>,
    rpc: Duration,
    keepalive: Duration,
}

/// Maps a refused call to a failure kind: the agent refuses bad input with
/// input codes ([`Kind::Refused`]; `outcome::class` says whose fault that is
/// in each phase), anything else is the agent's or the network's.
pub fn failure(what: &str, status: &Status) -> Failure {
    let message = format!("{what}: {} ({:?})", status.message(), status.code());
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::DataLoss => Failure::new(Kind::Refused, message),
        _ => Failure::agent(message),
    }
}

fn with_deadline<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Opens a channel to the master agent an announcement names, through the
/// board's network namespace, over TLS accepting only the certificate the
/// announcement's fingerprint names.
///
/// # Errors
/// An infrastructure error when the announcement has no address or
/// fingerprint, the agent presents another certificate, or it cannot be
/// reached within the `rpc` timeout.
pub async fn channel(
    a: &Announcement,
    namespace: Option<String>,
    timeouts: &Timeouts,
) -> Result<Channel, Failure> {
    let rpc = timeouts.rpc;
    let addr = a
        .addr
        .ok_or_else(|| Failure::agent("master announcement without an address"))?;
    let cert = a.cert.as_deref().ok_or_else(|| {
        Failure::agent(format!(
            "the master announcement of boot {} has no certificate fingerprint (cert=): \
             the master agent is older than TLS support, or the line is not its own",
            a.boot
        ))
    })?;
    let pin = PinnedCert::new(cert);
    let tls = ClientTlsConfig::new().domain_name(tls::SERVER_NAME);
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| Failure::agent(format!("agent address {addr}: {e}")))?
        .connect_timeout(rpc)
        // A board that stops answering (hung, powered off, cable pulled)
        // leaves the connection open: HTTP/2 pings find out.
        .http2_keep_alive_interval(timeouts.keepalive / 2)
        .keep_alive_timeout(timeouts.keepalive / 2)
        .keep_alive_while_idle(true)
        .tls_config_with_verifier(tls, pin.clone())
        .map_err(|e| Failure::agent(format!("TLS configuration: {e}")))?;
    // The board's link may come up a moment after the agent announces:
    // retry refused or unreachable connections until the deadline.
    let deadline = tokio::time::Instant::now() + rpc;
    loop {
        let ns = namespace.clone();
        let connector = tower::service_fn(move |_| {
            let ns = ns.clone();
            async move {
                netns::connect(addr, ns.as_deref(), rpc)
                    .await
                    .map(TokioIo::new)
            }
        });
        match endpoint.connect_with_connector(connector).await {
            Ok(channel) => return Ok(channel),
            Err(_) if pin.refused().is_some() => {
                return Err(Failure::agent(format!(
                    "the agent at {addr} presented certificate sha256:{}, not sha256:{cert} \
                     as announced on the console: refused",
                    pin.refused().unwrap_or_default()
                )));
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(Failure::agent(format!(
                    "cannot connect to the master agent at {addr}: {e}"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

impl Session {
    /// Connects to the agent an announcement names (see [`channel`]); every
    /// call carries `token`, inside TLS.
    ///
    /// # Errors
    /// See [`channel`].
    pub async fn connect(
        a: &Announcement,
        namespace: Option<String>,
        token: &str,
        timeouts: &Timeouts,
    ) -> Result<Self, Failure> {
        let channel = channel(a, namespace, timeouts).await?;
        let bearer: MetadataValue<_> = ferry_proto::bearer(token)
            .parse()
            .map_err(|_| Failure::agent("token is not valid metadata"))?;
        let auth: Auth = Box::new(move |mut req: Request<()>| {
            req.metadata_mut()
                .insert(ferry_proto::AUTH_METADATA_KEY, bearer.clone());
            Ok(req)
        });
        Ok(Session {
            client: MasterAgentClient::with_interceptor(channel, auth),
            rpc: timeouts.rpc,
            keepalive: timeouts.keepalive,
        })
    }

    /// Asks who the agent is; the raw status lets the caller poll until
    /// the agent has read its token.
    ///
    /// # Errors
    /// The call's status.
    pub async fn info(&mut self) -> Result<pb::AgentInfo, Status> {
        let r = self
            .client
            .get_info(with_deadline(pb::GetInfoRequest {}, self.rpc))
            .await;
        r.map(|r| r.into_inner())
    }

    /// Streams one image to the agent, hashing it on the way: a file that
    /// does not match the job's sha256 is the job's fault, while a mismatch
    /// seen only by the agent means the transfer was corrupted.
    ///
    /// # Errors
    /// The mapped failure.
    pub async fn deploy(
        &mut self,
        entry: &DeployEntry,
        timeout: Duration,
        on_progress: &mut (dyn FnMut(&pb::DeployProgress) + Send),
    ) -> Result<pb::DeployReply, Failure> {
        let bmap = match entry.bmap.as_deref() {
            Some(b) if !crate::job::is_url(b) => tokio::fs::read_to_string(b)
                .await
                .map_err(|e| Failure::job(format!("bmap {b}: {e}")))?,
            _ => String::new(),
        };
        let mut header = pb::DeployHeader {
            partition: entry.to.clone(),
            sha256: entry.sha256.to_ascii_lowercase(),
            compression: match entry.compression {
                None => pb::Compression::Unspecified,
                Some(Compression::None) => pb::Compression::None,
                Some(Compression::Gzip) => pb::Compression::Gzip,
                Some(Compression::Xz) => pb::Compression::Xz,
                Some(Compression::Zstd) => pb::Compression::Zstd,
            } as i32,
            source_size: 0,
            source_name: entry.image.display().to_string(),
            url: String::new(),
            bmap,
            bmap_url: entry
                .bmap
                .clone()
                .filter(|b| crate::job::is_url(b))
                .unwrap_or_default(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            verify_readback: entry.verify == crate::job::Verify::Readback,
        };
        if let Some(url) = entry.url() {
            // The board downloads it: the stream carries the header only.
            header.url = url.to_string();
            let msg = pb::DeployRequest {
                msg: Some(pb::deploy_request::Msg::Header(header)),
            };
            let r = self
                .client
                .deploy(with_deadline(tokio_stream::iter([msg]), timeout))
                .await;
            return deploy_result(r, on_progress)
                .await
                .map_err(|s| failure(&format!("deploying {url} to {}", entry.to), &s));
        }
        let mut file = tokio::fs::File::open(&entry.image)
            .await
            .map_err(|e| Failure::job(format!("image {}: {e}", entry.image.display())))?;
        header.source_size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = mpsc::channel(4);
        let path = entry.image.clone();
        let reader = tokio::spawn(async move {
            let mut hasher = Sha256::new();
            let msg = |m| pb::DeployRequest { msg: Some(m) };
            if tx
                .send(msg(pb::deploy_request::Msg::Header(header)))
                .await
                .is_err()
            {
                return Ok(ferry_proto::hex(&hasher.finalize()));
            }
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(ferry_proto::hex(&hasher.finalize()));
                }
                buf.truncate(n);
                hasher.update(&buf);
                if tx
                    .send(msg(pb::deploy_request::Msg::Data(buf)))
                    .await
                    .is_err()
                {
                    return Ok(String::new()); // the agent stopped reading; its status says why
                }
            }
        });
        let result = self
            .client
            .deploy(with_deadline(ReceiverStream::new(rx), timeout))
            .await;
        let result = deploy_result(result, on_progress).await;
        let local = reader
            .await
            .map_err(|e| Failure::agent(format!("image reader: {e}")))?;
        let local =
            local.map_err(|e| Failure::job(format!("reading image {}: {e}", path.display())))?;
        if !local.is_empty() && !local.eq_ignore_ascii_case(&entry.sha256) {
            return Err(Failure::job(format!(
                "image {} has sha256 {local}, but the job says {}",
                path.display(),
                entry.sha256
            )));
        }
        match result {
            Ok(r) => Ok(r),
            // The file is what the job says: what failed is the transfer or
            // the board's medium (read back), the lab's side either way.
            Err(s) if s.code() == Code::DataLoss => Err(Failure::agent(format!(
                "image {} failed verification on the board (it matches the job's sha256 here): {}",
                path.display(),
                s.message()
            ))),
            Err(s) => Err(failure(
                &format!("deploying {} to {}", path.display(), entry.to),
                &s,
            )),
        }
    }

    /// Installs the test agent and plan on `partition`.
    ///
    /// # Errors
    /// The mapped failure.
    pub async fn install(
        &mut self,
        partition: &str,
        plan: ferry_proto::plan::v1::TestPlan,
    ) -> Result<pb::InstallTestAgentReply, Failure> {
        let req = pb::InstallTestAgentRequest {
            partition: partition.into(),
            plan: Some(plan),
        };
        let r = self
            .client
            .install_test_agent(with_deadline(req, self.rpc))
            .await;
        r.map(|r| r.into_inner())
            .map_err(|s| failure("InstallTestAgent", &s))
    }

    /// Selects `partition` for the next boot only.
    ///
    /// # Errors
    /// The mapped failure.
    pub async fn boot_once(&mut self, partition: &str) -> Result<(), Failure> {
        let req = pb::SetBootOnceRequest {
            partition: partition.into(),
        };
        let r = self
            .client
            .set_boot_once(with_deadline(req, self.rpc))
            .await;
        r.map(|_| ()).map_err(|s| failure("SetBootOnce", &s))
    }

    /// Asks the board to reboot.
    ///
    /// # Errors
    /// The mapped failure.
    pub async fn reboot(&mut self) -> Result<(), Failure> {
        let r = self
            .client
            .reboot(with_deadline(pb::RebootRequest {}, self.rpc))
            .await;
        r.map(|_| ()).map_err(|s| failure("Reboot", &s))
    }

    /// Runs a command on the board: `start` first, then what arrives on
    /// `stdin` (its end closes the command's stdin); every piece of output
    /// goes to `output` as it comes. The call's deadline is the command's
    /// timeout plus the `rpc` timeout, so the agent's own timeout (with its
    /// message) comes first.
    ///
    /// # Errors
    /// The call's status: `DEADLINE_EXCEEDED` when the command ran past its
    /// timeout, `NOT_FOUND`/`PERMISSION_DENIED` when it could not start.
    pub async fn exec(
        &mut self,
        start: pb::ExecStart,
        mut stdin: mpsc::Receiver<Vec<u8>>,
        mut output: impl FnMut(pb::exec_reply::Msg),
    ) -> Result<pb::exec_exit::Status, Status> {
        let deadline = Duration::from_millis(start.timeout_ms) + self.rpc;
        let (tx, rx) = mpsc::channel(4);
        let feed = tokio::spawn(async move {
            let first = pb::ExecRequest {
                msg: Some(pb::exec_request::Msg::Start(start)),
            };
            if tx.send(first).await.is_err() {
                return;
            }
            while let Some(bytes) = stdin.recv().await {
                let msg = pb::ExecRequest {
                    msg: Some(pb::exec_request::Msg::Stdin(bytes)),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let result = async {
            let mut replies = self
                .client
                .exec(with_deadline(ReceiverStream::new(rx), deadline))
                .await?
                .into_inner();
            loop {
                match replies.message().await? {
                    Some(pb::ExecReply {
                        msg: Some(pb::exec_reply::Msg::Exit(exit)),
                    }) => {
                        return exit.status.ok_or_else(|| {
                            Status::unknown("the agent sent an exit without a status")
                        })
                    }
                    Some(pb::ExecReply { msg: Some(m) }) => output(m),
                    Some(pb::ExecReply { msg: None }) => {}
                    None => {
                        return Err(Status::unknown(
                            "the agent ended the stream without the command's exit status",
                        ))
                    }
                }
            }
        }
        .await;
        feed.abort();
        result
    }

    /// Fetches the records on `partition` into `dir`: the files written, and
    /// a warning for each entry the agent refused or cut (a symlink, a FIFO,
    /// a file past its size limit...).
    /// The whole fetch must end within `timeout` and the stream may not pause
    /// longer than `idle`.
    ///
    /// # Errors
    /// The mapped failure; what arrived before it stays written.
    pub async fn fetch(
        &mut self,
        partition: &str,
        dir: &Path,
        timeout: Duration,
        idle: Duration,
    ) -> Result<Fetched, Failure> {
        let req = pb::FetchResultsRequest {
            partition: partition.into(),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        // A stalled board must not hold the job: every wait ends at the
        // next idle limit or the overall deadline, whichever comes first.
        let stalled = |what: &str| {
            if tokio::time::Instant::now() >= deadline {
                Failure::agent(format!(
                    "fetching results did not finish within {timeout:?} ({what})"
                ))
            } else {
                Failure::agent(format!(
                    "the board sent no results for {idle:?} while fetching them ({what})"
                ))
            }
        };
        let next_limit = || deadline.min(tokio::time::Instant::now() + idle);
        let mut stream = tokio::time::timeout_at(
            next_limit(),
            self.client.fetch_results(with_deadline(req, timeout)),
        )
        .await
        .map_err(|_| stalled("no reply to FetchResults"))?
        .map_err(|s| failure("FetchResults", &s))?
        .into_inner();
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure::agent(format!("creating {}: {e}", dir.display())))?;
        let mut fetched = Fetched::default();
        let mut current: Option<(String, std::fs::File)> = None;
        while let Some(chunk) = tokio::time::timeout_at(next_limit(), stream.message())
            .await
            .map_err(|_| stalled(&format!("{} file(s) complete", fetched.files.len())))?
            .map_err(|s| match s.code() {
                // Not the agent's answer: the connection itself went.
                Code::Unknown | Code::Unavailable | Code::Cancelled => Failure::agent(format!(
                    "the connection to the board broke while fetching results \
                     ({} file(s) complete; a board silent for {:?} counts as dead): {}",
                    fetched.files.len(),
                    self.keepalive,
                    s.message()
                )),
                _ => failure("FetchResults", &s),
            })?
        {
            if let Some(r) = chunk.refused {
                fetched.warnings.push(format!(
                    "board record {:?} {}: {}",
                    r.path,
                    if r.truncated {
                        "cut short"
                    } else {
                        "not fetched"
                    },
                    r.reason
                ));
                continue;
            }
            // Names come from the board: a plain name only, never a path.
            let name = chunk.path;
            ferry_proto::names::check(&name)
                .map_err(|e| Failure::agent(format!("agent sent a bad record file name: {e}")))?;
            if current.as_ref().map(|(n, _)| n != &name).unwrap_or(true) {
                let f = std::fs::File::create(dir.join(&name)).map_err(|e| {
                    Failure::agent(format!("writing {}: {e}", dir.join(&name).display()))
                })?;
                current = Some((name.clone(), f));
            }
            if let Some((_, f)) = current.as_mut() {
                use std::io::Write;
                f.write_all(&chunk.data)
                    .map_err(|e| Failure::agent(format!("writing {name}: {e}")))?;
            }
            if chunk.eof {
                if let Some((n, f)) = current.take() {
                    let _ = f.sync_all();
                    fetched.files.push(n);
                }
            }
        }
        Ok(fetched)
    }
}

/// What a fetch brought back.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Record files written, in the order they arrived.
    pub files: Vec<String>,
    /// What the agent refused or cut, one line each.
    pub warnings: Vec<String>,
}

/// Reads a Deploy reply stream: progress to `on_progress`, then the result.
async fn deploy_result(
    call: Result<tonic::Response<tonic::Streaming<pb::DeployEvent>>, Status>,
    on_progress: &mut (dyn FnMut(&pb::DeployProgress) + Send),
) -> Result<pb::DeployReply, Status> {
    use pb::deploy_event::Event;
    let mut events = call?.into_inner();
    loop {
        match events.message().await? {
            Some(pb::DeployEvent {
                event: Some(Event::Progress(p)),
            }) => on_progress(&p),
            Some(pb::DeployEvent {
                event: Some(Event::Done(r)),
            }) => return Ok(r),
            Some(pb::DeployEvent { event: None }) => {}
            None => {
                return Err(Status::unknown(
                    "the agent ended the deploy without a result",
                ))
            }
        }
    }
}
