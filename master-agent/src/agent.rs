//! The agent's transport-free core: the board's lifecycle and the operations
//! a dispatcher asks for. The gRPC service is a thin shim over this.
//!
//! Lifecycle: `ready` (deploys, installs, fetches allowed) -> `installed`
//! (test agent on a partition) -> `boot-selected` -> `rebooting`. Calls out
//! of order are refused, and a partition is never used by two calls at once.

use std::collections::HashSet;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::plan::v1::TestPlan;
use prost::Message;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::console::{say, ConsoleWriter};
use crate::deploy::{self, DeployError, ImageSpec, Written, SOURCE_BROKE};
use crate::download;
use crate::exec::{self, ExecError, ExecSpec, Exit, Output};

/// The largest bmap fetched (a bmap of a 64 GiB image is well under 1 MiB).
const BMAP_LIMIT: u64 = 16 << 20;
use crate::install::{self, InstallError, Installed};
use crate::platform::{self, PartitionInfo, Platform, PlatformError};
use crate::results::{self, ResultsError};

/// Where the board is in a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for work.
    Ready,
    /// The test agent is installed on this partition.
    Installed(String),
    /// The next boot is this partition.
    BootSelected(String),
    /// A reboot is under way.
    Rebooting,
}

impl Phase {
    /// Its name in replies.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Ready => "ready",
            Phase::Installed(_) => "installed",
            Phase::BootSelected(_) => "boot-selected",
            Phase::Rebooting => "rebooting",
        }
    }
}

/// Why an operation failed; mapped to gRPC codes in one place (`service`).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Refused in the current phase.
    #[error("{0}")]
    Precondition(String),
    /// The partition is in use by another call.
    #[error("partition {0:?} is busy with another call")]
    Busy(String),
    /// A name from the network outside the wire charset.
    #[error("{what} name refused: {source}")]
    BadName {
        /// What kind of name ("partition", "suite").
        what: &'static str,
        /// Why.
        source: ferry_proto::names::NameError,
    },
    /// The partition is not one this board lets jobs use.
    #[error("partition {partition:?} {why}")]
    NotAllowed {
        /// The partition.
        partition: String,
        /// Why, naming the config key.
        why: String,
    },
    /// From the platform.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// From writing an image.
    #[error(transparent)]
    Deploy(#[from] DeployError),
    /// From downloading an image or a bmap.
    #[error(transparent)]
    Download(#[from] crate::download::DownloadError),
    /// The job's bmap is not a valid bmap.
    #[error(transparent)]
    BadBmap(#[from] crate::deploy::bmap::BmapError),
    /// From installing the test side.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// From reading records.
    #[error(transparent)]
    Results(#[from] ResultsError),
    /// The board's boot-once command failed.
    #[error("boot-once command `{command}` failed: {why}")]
    BootHook {
        /// The command.
        command: String,
        /// Exit status and stderr, or why it could not run.
        why: String,
    },
    /// From running a command.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// A blocking task died.
    #[error("internal task failed: {0}")]
    Task(String),
}

struct Lifecycle {
    phase: Phase,
    busy: HashSet<String>,
}

/// The agent: one per boot.
pub struct Agent {
    platform: Arc<dyn Platform>,
    config: Config,
    boot_id: String,
    version: String,
    console: ConsoleWriter,
    state: Arc<Mutex<Lifecycle>>,
}

/// Releases a partition claimed by a call. The blocking work owns it: a call
/// whose client gave up (or whose deadline passed) keeps its partition until
/// the work on it has really stopped.
struct Claim {
    state: Arc<Mutex<Lifecycle>>,
    partition: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            s.busy.remove(&self.partition);
        }
    }
}

/// A `Read` over chunks arriving on a channel (from the gRPC stream).
pub struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    /// Reads what `rx` delivers until it closes.
    pub fn new(rx: mpsc::Receiver<std::io::Result<Vec<u8>>>) -> Self {
        ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(std::io::Error::new(SOURCE_BROKE, e.to_string())),
                Some(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Task(e.to_string()))?
}

/// Makes a fresh filesystem on the partition and unpacks the rootfs tarball
/// into it; on any failure the partition is invalidated.
fn deploy_rootfs(
    platform: &dyn Platform,
    source: impl Read + Send,
    spec: &ImageSpec,
) -> Result<(Written, deploy::Unpacked), AgentError> {
    // Refused before the partition's filesystem is wiped.
    deploy::check_rootfs_spec(spec)?;
    let made = platform.make_filesystem(&spec.partition);
    let result = made.map_err(AgentError::from).and_then(|fs| {
        let root =
            cap_std::fs::Dir::open_ambient_dir(fs.mounted.path(), cap_std::ambient_authority())
                .map_err(PlatformError::io("opening", fs.mounted.path()))?;
        let unpacked = deploy::write_rootfs(source, &root, fs.capacity, spec);
        drop(root);
        let finished = fs.mounted.unmount();
        let unpacked = unpacked?;
        finished?;
        Ok(unpacked)
    });
    if result.is_err() {
        let invalidated = platform
            .open_for_write(&spec.partition)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|t| deploy::invalidate(&t));
        if let Err(e) = invalidated {
            tracing::error!(
                "could not invalidate {} after a failed deploy: {e}",
                spec.partition
            );
        }
    }
    result
}

impl Agent {
    /// An agent for this boot.
    pub fn new(
        platform: Arc<dyn Platform>,
        config: Config,
        boot_id: String,
        console: ConsoleWriter,
    ) -> Self {
        Agent {
            platform,
            config,
            boot_id,
            version: crate::VERSION.into(),
            console,
            state: Arc::new(Mutex::new(Lifecycle {
                phase: Phase::Ready,
                busy: HashSet::new(),
            })),
        }
    }

    /// This boot's id.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// The longest any call may run.
    pub fn call_timeout(&self) -> Duration {
        self.config.call_timeout
    }

    /// The longest timeout an Exec call may ask for.
    pub fn exec_max_timeout(&self) -> Duration {
        self.config.exec_max_timeout
    }

    /// The platform's kind.
    pub fn platform_kind(&self) -> &'static str {
        self.platform.kind()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.state
            .lock()
            .map(|s| s.phase.clone())
            .unwrap_or(Phase::Rebooting)
    }

    fn with_state<T>(
        &self,
        f: impl FnOnce(&mut Lifecycle) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| AgentError::Task("state lock poisoned".into()))?;
        f(&mut s)
    }

    /// Refuses a partition name a job may not use on this board: outside
    /// the charset, never writable, or not in `allowed_partitions`. Checked
    /// before the platform is asked anything about it.
    fn allowed(&self, partition: &str) -> Result<(), AgentError> {
        ferry_proto::names::check(partition).map_err(|source| AgentError::BadName {
            what: "partition",
            source,
        })?;
        let refuse = |why: String| {
            Err(AgentError::NotAllowed {
                partition: partition.into(),
                why,
            })
        };
        if let Some(why) = self.config.protected(partition) {
            return refuse(format!("is never written for a job: {why}"));
        }
        if !self
            .config
            .allowed_partitions
            .iter()
            .any(|p| p == partition)
        {
            return refuse(format!(
                "is not in this board's `allowed_partitions` (master agent config): {:?}",
                self.config.allowed_partitions
            ));
        }
        Ok(())
    }

    /// Claims `partition` if it is allowed and the phase allows `what`.
    fn claim(&self, partition: &str, what: &str) -> Result<Claim, AgentError> {
        self.allowed(partition)?;
        self.with_state(|s| {
            if matches!(s.phase, Phase::BootSelected(_) | Phase::Rebooting) {
                return Err(AgentError::Precondition(format!(
                    "cannot {what} while {}",
                    s.phase.name()
                )));
            }
            if !s.busy.insert(partition.into()) {
                return Err(AgentError::Busy(partition.into()));
            }
            Ok(())
        })?;
        Ok(Claim {
            state: self.state.clone(),
            partition: partition.into(),
        })
    }

    /// The partitions a job may name: those of `allowed_partitions` the
    /// board has.
    ///
    /// # Errors
    /// When they cannot be listed.
    pub async fn partitions(&self) -> Result<Vec<PartitionInfo>, AgentError> {
        let p = self.platform.clone();
        let mut all = blocking(move || Ok(p.partitions()?)).await?;
        all.retain(|p| self.config.allowed_partitions.contains(&p.name));
        Ok(all)
    }

    /// Writes an image arriving on `chunks` to its partition.
    ///
    /// # Errors
    /// Phase, busy partition, platform or deploy errors.
    pub async fn deploy(
        &self,
        spec: ImageSpec,
        chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    ) -> Result<Written, AgentError> {
        let claim = self.claim(&spec.partition, "deploy")?;
        let platform = self.platform.clone();
        let name = spec.partition.clone();
        say(
            &self.console,
            &format!("[ferry] master-agent: deploying {} to {name}", spec.sha256),
        );
        let console = self.console.clone();
        let written = blocking(move || {
            let _claim = claim;
            let (source, content) = deploy::sniff(ChannelReader::new(chunks), spec.compression);
            match content {
                deploy::Content::Image => {
                    let target = platform.open_for_write(&spec.partition)?;
                    Ok(deploy::write_image(source, target, &spec)?)
                }
                deploy::Content::Tarball => {
                    let (written, n) = deploy_rootfs(&*platform, source, &spec)?;
                    say(
                        &console,
                        &format!(
                            "[ferry] master-agent: unpacked {} files, {} folders, {} symlinks, {} hard links ({} device nodes skipped) to {}",
                            n.files, n.dirs, n.symlinks, n.hardlinks, n.skipped, spec.partition
                        ),
                    );
                    Ok(written)
                }
            }
        })
        .await?;
        // A new image under an installed test agent undoes the install.
        self.with_state(|s| {
            if s.phase == Phase::Installed(name.clone()) {
                s.phase = Phase::Ready;
            }
            Ok(())
        })?;
        Ok(written)
    }

    /// Downloads the image at `url` (resuming dropped connections) and
    /// writes it like [`Agent::deploy`], all before `deadline`.
    ///
    /// # Errors
    /// Download errors before the first byte, then as [`Agent::deploy`].
    pub async fn deploy_url(
        &self,
        mut spec: ImageSpec,
        url: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Written, AgentError> {
        self.allowed(&spec.partition)?;
        let client = download::client(self.config.download_connect_timeout)?;
        let d = download::Download::start(client, url, self.retry(), deadline).await?;
        // The server's word on the size lets a raw image that cannot fit be
        // refused before the first byte is written.
        spec.source_size = d.size.unwrap_or(0);
        spec.progress
            .source_size
            .store(spec.source_size, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(8);
        let pump = tokio::spawn(d.pump(tx));
        let r = self.deploy(spec, rx).await;
        pump.abort();
        r
    }

    /// Fetches and parses a bmap from `url` before `deadline`.
    ///
    /// # Errors
    /// Download errors, or not a valid bmap.
    pub async fn fetch_bmap(
        &self,
        url: &str,
        deadline: tokio::time::Instant,
    ) -> Result<deploy::Bmap, AgentError> {
        let client = download::client(self.config.download_connect_timeout)?;
        let body = download::small(client, url, self.retry(), deadline, BMAP_LIMIT).await?;
        let text = String::from_utf8(body)
            .map_err(|_| deploy::bmap::BmapError("not UTF-8 text".into()))?;
        Ok(deploy::Bmap::parse(&text)?)
    }

    fn retry(&self) -> download::Retry {
        download::Retry {
            retries: self.config.download_retries,
            backoff: self.config.download_backoff,
            idle: self.config.stream_idle_timeout,
        }
    }

    /// Installs the test agent and `plan` on `partition`.
    ///
    /// # Errors
    /// Phase, busy partition, a suite name outside the charset (the test
    /// agent makes paths of them), mount or install errors.
    pub async fn install(
        &self,
        partition: String,
        plan: &TestPlan,
    ) -> Result<Installed, AgentError> {
        for d in &plan.definitions {
            ferry_proto::names::check(&d.name).map_err(|source| AgentError::BadName {
                what: "suite",
                source,
            })?;
        }
        let plan = plan.encode_to_vec();
        let claim = self.claim(&partition, "install the test agent")?;
        let platform = self.platform.clone();
        let bundle = self.config.test_agent_bundle.clone();
        let version = self.version.clone();
        let part = partition.clone();
        let installed = blocking(move || {
            let _claim = claim;
            let mounted = platform.mount(&part, true)?;
            let installed = install::install(mounted.path(), &bundle, &plan, &version)?;
            mounted.unmount()?;
            Ok(installed)
        })
        .await?;
        self.with_state(|s| {
            s.phase = Phase::Installed(partition);
            Ok(())
        })?;
        Ok(installed)
    }

    /// Selects `partition` for the next boot only.
    ///
    /// # Errors
    /// Unless the test agent was installed on that partition first.
    pub async fn set_boot_once(&self, partition: String) -> Result<(), AgentError> {
        self.allowed(&partition)?;
        self.with_state(|s| match &s.phase {
            Phase::Installed(p) if *p == partition => Ok(()),
            other => Err(AgentError::Precondition(format!(
                "install the test agent on {partition:?} before selecting it for boot (state: {})",
                other.name()
            ))),
        })?;
        match &self.config.boot_once_command {
            Some(command) => self.run_boot_hook(command, &partition).await?,
            None => {
                let platform = self.platform.clone();
                let part = partition.clone();
                blocking(move || Ok(platform::set_boot_once(platform.as_ref(), &part)?)).await?;
            }
        }
        self.with_state(|s| {
            s.phase = Phase::BootSelected(partition);
            Ok(())
        })
    }

    /// Runs the board's own boot-once command for `partition`.
    async fn run_boot_hook(&self, command: &str, partition: &str) -> Result<(), AgentError> {
        let fail = |why: String| AgentError::BootHook {
            command: command.into(),
            why,
        };
        let run = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .env("FERRY_PARTITION", partition)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(self.config.boot_once_timeout, run)
            .await
            .map_err(|_| {
                fail(format!(
                    "timed out after {:?}",
                    self.config.boot_once_timeout
                ))
            })?
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Runs a command for a lab engineer (see [`exec`]), in any phase but a
    /// reboot.
    ///
    /// # Errors
    /// A bad request, a reboot under way, or the command's own failure.
    pub async fn exec(
        &self,
        spec: ExecSpec,
        stdin: mpsc::Receiver<Vec<u8>>,
        out: mpsc::Sender<Output>,
    ) -> Result<Exit, AgentError> {
        spec.check(self.config.exec_max_timeout)?;
        self.with_state(|s| match s.phase {
            Phase::Rebooting => Err(AgentError::Precondition(
                "cannot run a command while rebooting".into(),
            )),
            _ => Ok(()),
        })?;
        tracing::info!(argv = ?spec.argv, timeout = ?spec.timeout, "exec");
        Ok(exec::run(spec, stdin, out).await?)
    }

    /// Starts a reboot shortly after the caller has replied.
    ///
    /// # Errors
    /// When a reboot is already under way.
    pub fn reboot(self: &Arc<Self>) -> Result<(), AgentError> {
        self.with_state(|s| {
            if s.phase == Phase::Rebooting {
                return Err(AgentError::Precondition(
                    "a reboot is already under way".into(),
                ));
            }
            s.phase = Phase::Rebooting;
            Ok(())
        })?;
        let agent = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(agent.config.reboot_delay).await;
            say(&agent.console, "[ferry] master-agent: rebooting");
            let platform = agent.platform.clone();
            let result = tokio::task::spawn_blocking(move || platform.reboot()).await;
            say(
                &agent.console,
                &format!("[ferry] master-agent: reboot failed: {result:?}"),
            );
        });
        Ok(())
    }

    /// Streams the records on `partition` into `tx`, within the configured
    /// limits, with a refusal for everything not returned in full.
    ///
    /// # Errors
    /// Phase, busy partition, mount or read errors.
    pub async fn fetch(
        self: &Arc<Self>,
        partition: String,
        tx: mpsc::Sender<results::Item>,
    ) -> Result<(), AgentError> {
        let claim = self.claim(&partition, "fetch results")?;
        let platform = self.platform.clone();
        let limits = self.config.records.clone();
        blocking(move || {
            let _claim = claim;
            let mounted = platform.mount(&partition, false)?;
            results::for_each_item(mounted.path(), &limits, |item| {
                tx.blocking_send(item).is_ok()
            })?;
            mounted.unmount()?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PlatformConfig;
    use crate::platform::sim::{SimConfig, SimPartition, SimPlatform};

    /// Size of the `disk` file partition.
    const DISK: usize = 4_000_000;

    fn agent(dir: &std::path::Path, hook: Option<String>) -> Agent {
        std::fs::create_dir_all(dir.join("root")).expect("mkdir");
        std::fs::write(dir.join("bootsel"), [0u8; 512]).expect("w");
        std::fs::write(dir.join("disk"), vec![0xeeu8; DISK]).expect("w");
        let sim = SimConfig {
            partitions: [
                (
                    "bootsel".to_string(),
                    SimPartition::File(dir.join("bootsel")),
                ),
                (
                    "testrootfs".to_string(),
                    SimPartition::Dir(dir.join("root")),
                ),
                ("disk".to_string(), SimPartition::File(dir.join("disk"))),
            ]
            .into(),
            mountinfo: None,
            mkfs: Default::default(),
            readback_fault: None,
        };
        let text =
            "test_agent_bundle: none\nallowed_partitions: [testrootfs, disk]\nplatform: {linux: {}}\n\
             download_backoff: 10ms\nstream_idle_timeout: 2s\n";
        let mut config = Config::parse(text, dir).expect("config");
        config.platform = PlatformConfig::Sim(sim.clone());
        config.boot_once_command = hook;
        let console: ConsoleWriter = Arc::new(std::sync::Mutex::new(Box::new(std::io::sink())));
        Agent::new(
            Arc::new(SimPlatform::new(sim, "bootsel".into())),
            config,
            "b".into(),
            console,
        )
    }

    fn installed(agent: &Agent, partition: &str) {
        let _ = agent.with_state(|s| {
            s.phase = Phase::Installed(partition.into());
            Ok(())
        });
    }

    #[tokio::test]
    async fn the_flag_is_written_unless_the_board_has_its_own_command() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = agent(dir.path(), None);
        installed(&a, "testrootfs");
        a.set_boot_once("testrootfs".into()).await.expect("flag");
        let flag = std::fs::read(dir.path().join("bootsel")).expect("flag");
        assert_eq!(ferry_proto::boot::decode(&flag), Some("testrootfs".into()));
        assert_eq!(a.phase(), Phase::BootSelected("testrootfs".into()));

        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("selected");
        let a = agent(
            dir.path(),
            Some(format!("echo \"$FERRY_PARTITION\" > {}", out.display())),
        );
        installed(&a, "testrootfs");
        a.set_boot_once("testrootfs".into()).await.expect("hook");
        assert_eq!(
            std::fs::read_to_string(&out).expect("hook ran"),
            "testrootfs\n"
        );
        assert!(
            std::fs::read(dir.path().join("bootsel"))
                .expect("flag")
                .iter()
                .all(|b| *b == 0),
            "flag untouched"
        );
    }

    #[tokio::test]
    async fn a_failing_boot_hook_is_reported_and_nothing_is_selected() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = agent(dir.path(), Some("echo no env >&2; exit 3".into()));
        installed(&a, "testrootfs");
        let e = a
            .set_boot_once("testrootfs".into())
            .await
            .expect_err("fails");
        assert!(e.to_string().contains("no env"), "{e}");
        assert_eq!(a.phase(), Phase::Installed("testrootfs".into()));
    }

    /// How the loopback image server misbehaves.
    #[derive(Clone, Copy, Default)]
    struct Serve {
        /// The first response stops after this many body bytes.
        cut_first: Option<usize>,
        /// Every response stops after this many body bytes.
        cut_every: Option<usize>,
        /// Range requests are ignored (200 with the whole file).
        no_ranges: bool,
    }

    /// Serves `body` over HTTP/1.1 on loopback; returns the URL and a count
    /// of requests (the Range header each carried).
    async fn server(
        body: Vec<u8>,
        how: Serve,
    ) -> (String, Arc<std::sync::Mutex<Vec<Option<String>>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/image.bin", listener.local_addr().expect("addr"));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let body = Arc::new(body);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (body, log) = (body.clone(), log.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if sock.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let range = head
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .map(|r| r.trim_end_matches('-').to_string());
                    let first = {
                        let mut l = log.lock().expect("log");
                        l.push(range.clone());
                        l.len() == 1
                    };
                    let from = match (&range, how.no_ranges) {
                        (Some(r), false) => r.parse::<usize>().unwrap_or(0),
                        _ => 0,
                    };
                    let status = if from > 0 {
                        format!(
                            "206 Partial Content\r\ncontent-range: bytes {from}-{}/{}",
                            body.len() - 1,
                            body.len()
                        )
                    } else {
                        "200 OK".to_string()
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\netag: \"v1\"\r\naccept-ranges: bytes\r\nconnection: close\r\n\r\n",
                        body.len() - from
                    );
                    let cut = how.cut_every.or(how.cut_first.filter(|_| first));
                    let end = cut.map_or(body.len(), |c| (from + c).min(body.len()));
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let _ = sock.write_all(&body[from..end]).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (url, seen)
    }

    fn sha(data: &[u8]) -> String {
        use sha2::Digest;
        ferry_proto::hex(&sha2::Sha256::digest(data))
    }

    fn url_spec(sha256: String) -> ImageSpec {
        ImageSpec {
            partition: "disk".into(),
            sha256,
            compression: deploy::Compression::Detect,
            source_size: 0,
            bmap: None,
            readback: false,
            progress: Default::default(),
        }
    }

    fn deadline() -> tokio::time::Instant {
        tokio::time::Instant::now() + std::time::Duration::from_secs(30)
    }

    fn image() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect()
    }

    /// A file of the ext4 filesystem image at `fs`, read with debugfs.
    fn debugfs_cat(fs: &std::path::Path, path: &str) -> String {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(fs)
            .output()
            .expect("debugfs (e2fsprogs) runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[tokio::test]
    async fn a_rootfs_tarball_from_a_url_becomes_a_filesystem_on_the_partition() {
        use crate::deploy::rootfs::tests::Tarball;
        let dir = tempfile::tempdir().expect("tmp");
        let a = agent(dir.path(), None);
        let tar = Tarball::default()
            .dir("./")
            .dir("etc/")
            .file("etc/hostname", b"from-tarball\n")
            .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
            .done();
        let source = zstd::bulk::compress(&tar, 3).expect("zstd");
        let (url, _) = server(source.clone(), Serve::default()).await;
        let w = a
            .deploy_url(url_spec(sha(&source)), &url, deadline())
            .await
            .expect("deploy");
        assert_eq!(w.compression, deploy::Compression::Zstd);
        assert_eq!(w.image, tar.len() as u64);
        let disk = dir.path().join("disk");
        assert_eq!(debugfs_cat(&disk, "/etc/hostname"), "from-tarball\n");
        assert!(!dir.path().join("disk.rootfs").exists(), "staging removed");
    }

    #[tokio::test]
    async fn a_hostile_tarball_fails_the_deploy_writes_nothing_outside_and_invalidates() {
        use crate::deploy::rootfs::tests::Tarball;
        let dir = tempfile::tempdir().expect("tmp");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("outside");
        let a = agent(dir.path(), None);
        let tar = Tarball::default()
            .file("etc/ok", b"fine")
            .symlink("esc", &outside.display().to_string())
            .file("esc/pwned", b"x")
            .done();
        let (url, _) = server(tar.clone(), Serve::default()).await;
        let e = a
            .deploy_url(url_spec(sha(&tar)), &url, deadline())
            .await
            .expect_err("hostile");
        assert!(
            matches!(e, AgentError::Deploy(DeployError::Rootfs { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("esc/pwned"), "names the entry: {e}");
        assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0);
        let disk = std::fs::read(dir.path().join("disk")).expect("disk");
        assert!(disk[..1 << 20].iter().all(|b| *b == 0), "invalidated");
    }

    #[tokio::test]
    async fn a_url_image_cut_mid_way_is_resumed_by_range() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = agent(dir.path(), None);
        let img = image();
        let (url, seen) = server(
            img.clone(),
            Serve {
                cut_first: Some(1_234_567),
                ..Serve::default()
            },
        )
        .await;
        let w = a
            .deploy_url(url_spec(sha(&img)), &url, deadline())
            .await
            .expect("deploy");
        assert_eq!(w.received, img.len() as u64);
        let on_disk = std::fs::read(dir.path().join("disk")).expect("read");
        assert!(on_disk[..img.len()] == img[..]);
        assert_eq!(
            *seen.lock().expect("seen"),
            [None, Some("1234567".to_string())],
            "one resume from the cut"
        );
    }

    #[tokio::test]
    async fn a_corrupted_byte_from_a_url_is_caught_and_the_partition_invalidated() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = agent(dir.path(), None);
        let img = image();
        let mut bad = img.clone();
        bad[2_000_000] ^= 1;
        let (url, _) = server(bad, Serve::default()).await;
        let e = a
            .deploy_url(url_spec(sha(&img)), &url, deadline())
            .await
            .expect_err("bad");
        assert!(
            matches!(e, AgentError::Deploy(DeployError::Checksum { .. })),
            "{e}"
        );
        let on_disk = std::fs::read(dir.path().join("disk")).expect("read");
        assert!(on_disk[..1 << 20].iter().all(|b| *b == 0), "invalidated");
    }

    #[tokio::test]
    async fn a_stream_that_keeps_breaking_or_cannot_resume_fails_cleanly() {
        let img = image();
        for how in [
            Serve {
                cut_every: Some(300_000),
                ..Serve::default()
            },
            Serve {
                cut_first: Some(700_000),
                no_ranges: true,
                ..Serve::default()
            },
        ] {
            let dir = tempfile::tempdir().expect("tmp");
            let a = agent(dir.path(), None);
            let (url, seen) = server(img.clone(), how).await;
            let e = a
                .deploy_url(url_spec(sha(&img)), &url, deadline())
                .await
                .expect_err("truncated");
            assert!(
                matches!(e, AgentError::Deploy(DeployError::Source { .. })),
                "{e}"
            );
            let on_disk = std::fs::read(dir.path().join("disk")).expect("read");
            assert!(on_disk[..1 << 20].iter().all(|b| *b == 0), "invalidated");
            let tries = seen.lock().expect("seen").len();
            // Every 300 kB cut makes progress, so five resumes are made; a
            // server that ignores Range is given up on at once.
            assert_eq!(tries, if how.no_ranges { 2 } else { 6 }, "{tries} requests");
        }
    }

    #[tokio::test]
    async fn a_url_image_larger_than_its_partition_is_refused_before_writing() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = agent(dir.path(), None);
        let img = vec![1u8; DISK + 1];
        let (url, _) = server(img.clone(), Serve::default()).await;
        let e = a
            .deploy_url(url_spec(sha(&img)), &url, deadline())
            .await
            .expect_err("big");
        assert!(
            matches!(
                e,
                AgentError::Deploy(DeployError::TooLarge { known: true, .. })
            ),
            "{e}"
        );
        let on_disk = std::fs::read(dir.path().join("disk")).expect("read");
        assert!(on_disk.iter().all(|b| *b == 0xee), "nothing written");
    }

    #[tokio::test]
    async fn a_missing_url_is_the_jobs_error_and_a_bad_scheme_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = agent(dir.path(), None);
        let (url, _) = server(Vec::new(), Serve::default()).await;
        // The server answers everything; a refused port stands for a dead host.
        let e = a
            .deploy_url(url_spec(sha(b"")), "ftp://example/x", deadline())
            .await
            .expect_err("scheme");
        assert!(
            matches!(
                e,
                AgentError::Download(crate::download::DownloadError::BadUrl { .. })
            ),
            "{e}"
        );
        let dead = url.replace(&url[7..url.rfind('/').unwrap_or(7)], "127.0.0.1:1");
        let e = a
            .deploy_url(url_spec(sha(b"")), &dead, deadline())
            .await
            .expect_err("dead");
        assert!(
            matches!(
                e,
                AgentError::Download(crate::download::DownloadError::Failed { .. })
            ),
            "{e}"
        );
    }
}
