//! The gRPC service: authenticate (done by the interceptor), trace, call the
//! core, map the error. Errors become gRPC codes here and nowhere else.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::master::v1 as pb;
use ferry_proto::master::v1::master_agent_server::MasterAgent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::agent::{Agent, AgentError};
use crate::deploy::{Bmap, Compression, DeployError, ImageSpec, Progress, Written, SOURCE_BROKE};
use crate::download::DownloadError;
use crate::exec::{ExecError, ExecSpec, Exit, Output};
use crate::install::InstallError;
use crate::platform::PlatformError;
use crate::results::Item;

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let msg = e.to_string();
        match e {
            AgentError::Precondition(_) | AgentError::Busy(_) => Status::failed_precondition(msg),
            AgentError::BadName { .. } => Status::invalid_argument(msg),
            AgentError::NotAllowed { .. } => Status::permission_denied(msg),
            AgentError::Platform(p) => match p {
                PlatformError::NoSuchPartition(_) => Status::not_found(msg),
                PlatformError::Protected { .. } => Status::permission_denied(msg),
                // The board's disk or mount table is not as it should be: the lab's problem.
                PlatformError::NotMountable { .. }
                | PlatformError::DuplicateLabel { .. }
                | PlatformError::MountState { .. } => Status::failed_precondition(msg),
                PlatformError::Io { .. } => Status::internal(msg),
            },
            AgentError::Deploy(d) => match d {
                DeployError::TooLarge { .. } => Status::out_of_range(msg),
                DeployError::Checksum { .. } | DeployError::RangeChecksum { .. } => {
                    Status::data_loss(msg)
                }
                // The bytes were right and the medium gave others back: the
                // board's fault whatever the source (a URL's DATA_LOSS is the job's).
                DeployError::Readback { .. } => Status::internal(msg),
                // A full or failing partition is the board's, not the tarball's.
                DeployError::Rootfs {
                    source: crate::deploy::rootfs::UnpackError::Write { .. },
                    ..
                } => Status::internal(msg),
                DeployError::Rootfs {
                    source: crate::deploy::rootfs::UnpackError::TooLarge { .. },
                    ..
                } => Status::out_of_range(msg),
                DeployError::Corrupt { .. }
                | DeployError::Bmap { .. }
                | DeployError::Unsupported { .. }
                | DeployError::Rootfs { .. } => Status::invalid_argument(msg),
                DeployError::Source { .. } => Status::aborted(msg),
                DeployError::Write { .. } => Status::internal(msg),
            },
            AgentError::BadBmap(_) => Status::invalid_argument(msg),
            AgentError::Download(d) => match d {
                // The job named a URL that is not one, or the server refuses it.
                DownloadError::BadUrl { .. } | DownloadError::TooBig { .. } => {
                    Status::invalid_argument(msg)
                }
                DownloadError::Status { status, .. } if status.is_client_error() => {
                    Status::not_found(msg)
                }
                DownloadError::Status { .. } | DownloadError::Failed { .. } => {
                    Status::unavailable(msg)
                }
            },
            AgentError::Install(i) => match i {
                // The test rootfs is what the job deployed: its fault is the job's.
                InstallError::Rootfs { .. } => Status::invalid_argument(msg),
                InstallError::Bundle { .. }
                | InstallError::Hostile { .. }
                | InstallError::Version { .. } => Status::failed_precondition(msg),
            },
            AgentError::Results(_) | AgentError::BootHook { .. } => Status::internal(msg),
            AgentError::Task(_) => Status::internal(msg),
            AgentError::Exec(x) => match x {
                ExecError::Invalid(_) => Status::invalid_argument(msg),
                ExecError::Spawn { source, .. } => match source.kind() {
                    std::io::ErrorKind::NotFound => Status::not_found(msg),
                    std::io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
                    _ => Status::internal(msg),
                },
                ExecError::TimedOut { .. } => Status::deadline_exceeded(msg),
                ExecError::ClientGone { .. } => Status::cancelled(msg),
                ExecError::Wait { .. } => Status::internal(msg),
            },
        }
    }
}

/// The gRPC face of an [`Agent`].
pub struct Service {
    agent: Arc<Agent>,
    idle: Duration,
    bundle_version: String,
}

impl Service {
    /// Serves `agent`; a deploy stream idle for `idle` is abandoned.
    /// `bundle_version` is what the bundled test agent's tarball says, read
    /// once at start (it cannot change while the master image runs).
    pub fn new(agent: Arc<Agent>, idle: Duration, bundle_version: String) -> Self {
        Service {
            agent,
            idle,
            bundle_version,
        }
    }
}

fn compression(c: i32) -> Compression {
    match pb::Compression::try_from(c) {
        Ok(pb::Compression::None) => Compression::None,
        Ok(pb::Compression::Gzip) => Compression::Gzip,
        Ok(pb::Compression::Xz) => Compression::Xz,
        Ok(pb::Compression::Zstd) => Compression::Zstd,
        _ => Compression::Detect,
    }
}

type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecReply, Status>> + Send>>;
fn reply(w: Written) -> pb::DeployReply {
    pb::DeployReply {
        bytes_received: w.received,
        bytes_written: w.written,
        sha256: w.sha256,
        image_bytes: w.image,
        compression: w.compression.name().into(),
    }
}

type DeployEvents = Pin<Box<dyn Stream<Item = Result<pb::DeployEvent, Status>> + Send>>;

/// How often a running deploy reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The caller's deadline (`grpc-timeout`: digits and a unit, H M S m u n).
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deploy's progress as a reply message.
fn progress_event(p: &Progress) -> pb::DeployEvent {
    use std::sync::atomic::Ordering::Relaxed;
    let readback = p.reading_back.load(Relaxed);
    pb::DeployEvent {
        event: Some(pb::deploy_event::Event::Progress(pb::DeployProgress {
            bytes_received: p.received.load(Relaxed),
            source_size: p.source_size.load(Relaxed),
            image_bytes: p.image.load(Relaxed),
            stage: if readback { "readback" } else { "writing" }.into(),
            readback_bytes: p.read_back.load(Relaxed),
        })),
    }
}

/// Receives one deploy (header, then data or a URL) and writes it.
async fn run_deploy(
    agent: Arc<Agent>,
    idle: Duration,
    mut stream: Streaming<pb::DeployRequest>,
    progress: Arc<Progress>,
) -> Result<pb::DeployReply, Status> {
    let first = tokio::time::timeout(idle, stream.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no deploy header received"))??;
    let Some(pb::DeployRequest {
        msg: Some(pb::deploy_request::Msg::Header(h)),
    }) = first
    else {
        return Err(Status::invalid_argument(
            "the first Deploy message must be a header",
        ));
    };
    if !ferry_proto::is_sha256(&h.sha256) {
        return Err(Status::invalid_argument(format!(
            "sha256 {:?} is not 64 hex digits",
            h.sha256
        )));
    }
    // The whole deploy (download included) ends by the job's deadline.
    let deadline = tokio::time::Instant::now()
        + match h.timeout_ms {
            0 => Duration::from_secs(24 * 3600),
            ms => Duration::from_millis(ms),
        };
    let bmap = if !h.bmap.is_empty() {
        Some(Bmap::parse(&h.bmap).map_err(AgentError::from)?)
    } else if !h.bmap_url.is_empty() {
        Some(agent.fetch_bmap(&h.bmap_url, deadline).await?)
    } else {
        None
    };
    progress
        .source_size
        .store(h.source_size, std::sync::atomic::Ordering::Relaxed);
    let spec = ImageSpec {
        partition: h.partition,
        sha256: h.sha256.to_ascii_lowercase(),
        compression: compression(h.compression),
        source_size: h.source_size,
        bmap,
        readback: h.verify_readback,
        progress,
    };
    tracing::info!(partition = %spec.partition, source = %h.source_name, url = %h.url, "deploy");
    if !h.url.is_empty() {
        let written = agent.deploy_url(spec, &h.url, deadline).await?;
        return Ok(reply(written));
    }
    let (tx, rx) = mpsc::channel(8);
    let agent = agent.clone();
    let writer = tokio::spawn(async move { agent.deploy(spec, rx).await });
    loop {
        let next = match tokio::time::timeout(idle, stream.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => break,
            Ok(Err(status)) => {
                let _ = tx
                    .send(Err(std::io::Error::new(
                        SOURCE_BROKE,
                        status.message().to_string(),
                    )))
                    .await;
                break;
            }
            Err(_) => {
                let e = std::io::Error::new(SOURCE_BROKE, format!("no data for {:?}", idle));
                let _ = tx.send(Err(e)).await;
                break;
            }
        };
        match next.msg {
            Some(pb::deploy_request::Msg::Data(d)) => {
                if tx.send(Ok(d)).await.is_err() {
                    break; // the writer stopped early; its error says why
                }
            }
            _ => {
                let e =
                    std::io::Error::new(SOURCE_BROKE, "a second header arrived inside the image");
                let _ = tx.send(Err(e)).await;
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
    Ok(reply(written))
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ResultsChunk, Status>> + Send>>;

#[tonic::async_trait]
impl MasterAgent for Service {
    async fn get_info(
        &self,
        _req: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::AgentInfo>, Status> {
        let partitions = self.agent.partitions().await?;
        Ok(Response::new(pb::AgentInfo {
            version: crate::VERSION.into(),
            boot_id: self.agent.boot_id().into(),
            platform: self.agent.platform_kind().into(),
            partitions: partitions
                .into_iter()
                .map(|p| pb::Partition {
                    name: p.name,
                    size_bytes: p.size,
                    deployable: p.deployable,
                    mountable: p.mountable,
                })
                .collect(),
            test_agent_version: self.bundle_version.clone(),
            state: self.agent.phase().name().into(),
        }))
    }

    type DeployStream = DeployEvents;

    async fn deploy(
        &self,
        req: Request<Streaming<pb::DeployRequest>>,
    ) -> Result<Response<DeployEvents>, Status> {
        // The reply streams while the deploy runs, so the server's call
        // timeout (which ends at the reply's headers) is applied here.
        let limit = grpc_timeout(req.metadata()).map_or(self.agent.call_timeout(), |t| {
            t.min(self.agent.call_timeout())
        });
        let stream = req.into_inner();
        let progress = Arc::new(Progress::default());
        let (tx, rx) = mpsc::channel(4);
        let work = run_deploy(self.agent.clone(), self.idle, stream, progress.clone());
        let work = async move {
            tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                Err(Status::cancelled(format!(
                    "the deploy call ran past its deadline ({})",
                    humantime::format_duration(limit)
                )))
            })
        };
        tokio::spawn(async move {
            tokio::pin!(work);
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let result = loop {
                tokio::select! {
                    r = &mut work => break r,
                    _ = tick.tick() => {
                        // A dispatcher reading slowly misses progress; it never slows the deploy.
                        let _ = tx.try_send(Ok(progress_event(&progress)));
                    }
                }
            };
            let last = result.map(|r| pb::DeployEvent {
                event: Some(pb::deploy_event::Event::Done(r)),
            });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn install_test_agent(
        &self,
        req: Request<pb::InstallTestAgentRequest>,
    ) -> Result<Response<pb::InstallTestAgentReply>, Status> {
        let req = req.into_inner();
        let plan = req
            .plan
            .ok_or_else(|| Status::invalid_argument("no test plan"))?;
        tracing::info!(partition = %req.partition, definitions = plan.definitions.len(), "install test agent");
        let installed = self.agent.install(req.partition, &plan).await?;
        Ok(Response::new(pb::InstallTestAgentReply {
            test_agent_version: installed.version,
            boot_hook: installed.hook.as_str().into(),
        }))
    }

    async fn set_boot_once(
        &self,
        req: Request<pb::SetBootOnceRequest>,
    ) -> Result<Response<pb::SetBootOnceReply>, Status> {
        let partition = req.into_inner().partition;
        tracing::info!(%partition, "boot once");
        self.agent.set_boot_once(partition).await?;
        Ok(Response::new(pb::SetBootOnceReply {}))
    }

    async fn reboot(
        &self,
        _req: Request<pb::RebootRequest>,
    ) -> Result<Response<pb::RebootReply>, Status> {
        tracing::info!("reboot");
        self.agent.reboot()?;
        Ok(Response::new(pb::RebootReply {}))
    }

    type FetchResultsStream = ChunkStream;

    async fn fetch_results(
        &self,
        req: Request<pb::FetchResultsRequest>,
    ) -> Result<Response<Self::FetchResultsStream>, Status> {
        let partition = req.into_inner().partition;
        tracing::info!(%partition, "fetch results");
        let (tx, rx) = mpsc::channel(4);
        let (out_tx, out_rx) = mpsc::channel(4);
        let agent = self.agent.clone();
        let idle = self.idle;
        tokio::spawn(async move {
            let forward = async {
                let mut rx = ReceiverStream::new(rx);
                while let Some(item) = rx.next().await {
                    let chunk = match item {
                        Item::Chunk { name, data, eof } => pb::ResultsChunk {
                            path: name,
                            data,
                            eof,
                            refused: None,
                        },
                        Item::Refused {
                            name,
                            reason,
                            truncated,
                        } => {
                            tracing::warn!(%name, %reason, "record refused");
                            pb::ResultsChunk {
                                refused: Some(pb::Refusal {
                                    path: name,
                                    reason,
                                    truncated,
                                }),
                                ..Default::default()
                            }
                        }
                    };
                    // A caller that stops reading must not hold the partition:
                    // give up after the idle timeout, which ends the reading thread.
                    match tokio::time::timeout(idle, out_tx.send(Ok(chunk))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            tracing::warn!("results reader idle for {idle:?}: fetch abandoned");
                            return;
                        }
                    }
                }
            };
            let (result, ()) = tokio::join!(agent.fetch(partition, tx), forward);
            if let Err(e) = result {
                let _ = tokio::time::timeout(idle, out_tx.send(Err(Status::from(e)))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        req: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut stream = req.into_inner();
        let first = tokio::time::timeout(self.idle, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Exec start message received"))??;
        let Some(pb::ExecRequest {
            msg: Some(pb::exec_request::Msg::Start(start)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first Exec message must carry the command",
            ));
        };
        let mut env: Vec<(String, String)> = start.env.into_iter().collect();
        env.sort();
        let spec = ExecSpec {
            argv: start.argv,
            env,
            cwd: (!start.cwd.is_empty()).then(|| start.cwd.into()),
            timeout: Duration::from_millis(start.timeout_ms),
        };
        // Refuse a bad request as the call's status, before any reply.
        spec.check(self.agent.exec_max_timeout())
            .map_err(|e| Status::from(AgentError::from(e)))?;
        let (in_tx, in_rx) = mpsc::channel(8);
        tokio::spawn(async move {
            // Stdin until the client half-closes (or goes): then EOF.
            while let Ok(Some(m)) = stream.message().await {
                if let Some(pb::exec_request::Msg::Stdin(bytes)) = m.msg {
                    if in_tx.send(bytes).await.is_err() {
                        return;
                    }
                }
            }
        });
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let (reply_tx, reply_rx) = mpsc::channel(16);
        let agent = self.agent.clone();
        tokio::spawn(async move {
            let forward = async {
                loop {
                    let output = tokio::select! {
                        o = out_rx.recv() => o,
                        // The client went away: dropping `out_rx` ends the command.
                        () = reply_tx.closed() => return,
                    };
                    let Some(output) = output else { return };
                    let msg = match output {
                        Output::Stdout(b) => pb::exec_reply::Msg::Stdout(b),
                        Output::Stderr(b) => pb::exec_reply::Msg::Stderr(b),
                    };
                    if reply_tx
                        .send(Ok(pb::ExecReply { msg: Some(msg) }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            };
            let (result, ()) = tokio::join!(agent.exec(spec, in_rx, out_tx), forward);
            let last = match result {
                Ok(exit) => Ok(pb::ExecReply {
                    msg: Some(pb::exec_reply::Msg::Exit(pb::ExecExit {
                        status: Some(match exit {
                            Exit::Code(c) => pb::exec_exit::Status::Code(c),
                            Exit::Signal(s) => pb::exec_exit::Status::Signal(s),
                        }),
                    })),
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = reply_tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(reply_rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::rootfs::UnpackError;
    use tonic::Code;

    fn code(e: DeployError) -> Code {
        Status::from(AgentError::Deploy(e)).code()
    }

    fn rootfs(source: UnpackError) -> DeployError {
        DeployError::Rootfs {
            partition: "p".into(),
            source,
        }
    }

    /// The dispatcher classes input codes as the job's fault and the rest
    /// as the board's: a medium that reads back wrong, or a full or failing
    /// disk under a tarball, must not come out as the job's.
    #[test]
    fn the_boards_faults_never_get_an_input_code() {
        let readback = DeployError::Readback {
            partition: "p".into(),
            what: "image".into(),
            expected: "a".into(),
            actual: "b".into(),
        };
        assert_eq!(code(readback), Code::Internal);
        let write = rootfs(UnpackError::Write {
            entry: "usr/bin/x".into(),
            source: std::io::Error::other("EIO"),
        });
        assert_eq!(code(write), Code::Internal);
        let hostile = rootfs(UnpackError::Hostile {
            entry: "../x".into(),
            why: "climbs".into(),
        });
        assert_eq!(code(hostile), Code::InvalidArgument);
        let large = rootfs(UnpackError::TooLarge {
            what: "bytes",
            limit: 1,
        });
        assert_eq!(code(large), Code::OutOfRange);
    }

    #[test]
    fn a_callers_grpc_timeout_is_read_in_every_unit() {
        let mut meta = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&meta), None);
        for (text, d) in [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("90S", Duration::from_secs(90)),
            ("1500m", Duration::from_millis(1500)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            meta.insert("grpc-timeout", text.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&meta), Some(d), "{text}");
        }
        for bad in ["", "S", "10x", "-1S"] {
            meta.insert("grpc-timeout", bad.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&meta), None, "{bad:?}");
        }
    }
}
