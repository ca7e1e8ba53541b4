//! Command line: `test-agent run|bundle|version`, and the helpers when
//! invoked as `lava-test-case` / `lava-test-set`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ferry_proto::console::{Announcement, Role};
use ferry_proto::plan::v1::TestPlan;
use ferry_proto::record::{Body, Header, FERRY_DIR, PLAN_FILE, RECORDS_DIR, RECORDS_FILE};
use prost::Message;

use crate::mirror::Mirror;
use crate::records::{now_us, Quotas, Settings, Writer};
use crate::runner::{run_plan, RunContext};
use crate::stream::Live;
use crate::{bundle, helpers, VERSION};

#[derive(Parser)]
#[command(name = "test-agent", version = VERSION, about = "Ferry's test agent: runs the test plan inside the test image")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the plan found on the rootfs, record everything, then reboot.
    Run(RunArgs),
    /// Write the tarball the master image carries (this binary plus helpers).
    Bundle {
        /// Where to write the .tar.gz.
        #[arg(long)]
        output: PathBuf,
    },
}

/// How to get back to the master image once the plan is done.
#[derive(Clone, Copy, ValueEnum)]
enum RebootMode {
    /// sync and reboot(2): a real board.
    System,
    /// Exit; the simulated board treats the test image's end as a reboot.
    Exit,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Root of the test rootfs holding `ferry/`.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Console to mirror the run to (default: standard output).
    #[arg(long)]
    console: Option<PathBuf>,
    /// Boot id (default: /proc/sys/kernel/random/boot_id; the simulated board sets it).
    #[arg(long, env = "FERRY_BOOT_ID")]
    boot_id: Option<String>,
    /// How to return to the master image.
    #[arg(long, value_enum)]
    reboot: RebootMode,
    /// Kernel log to record (e.g. /dev/kmsg); none when absent.
    #[arg(long)]
    kmsg: Option<PathBuf>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    let name = Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let rest: Vec<String> = args.collect();
    if let Some(code) = helpers::dispatch(name, &rest) {
        return code;
    }
    match Cli::parse().command {
        Cmd::Run(args) => run(args),
        Cmd::Bundle { output } => match bundle::write(&output) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("test-agent: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Space set aside at start (`ferry/reserve`) and released when the disk
/// fills up, so results and the agent's own records still fit.
const RESERVE_BYTES: u64 = 2 << 20;
/// Longest the console mirror may take to write what is queued at the end.
const MIRROR_DRAIN: Duration = Duration::from_secs(5);

/// Opens the console for the mirror. Flow control off: a stray XOFF
/// byte (or a viewer's ^S) must not stop the run's last words or reboot.
fn open_console(path: &Path) -> std::io::Result<std::fs::File> {
    let f = OpenOptions::new().write(true).open(path)?;
    if let Ok(mut t) = nix::sys::termios::tcgetattr(&f) {
        use nix::sys::termios::{InputFlags, SetArg};
        t.input_flags.remove(InputFlags::IXON | InputFlags::IXOFF);
        let _ = nix::sys::termios::tcsetattr(&f, SetArg::TCSANOW, &t);
    }
    Ok(f)
}

fn boot_id(given: Option<String>) -> String {
    given
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn run(args: RunArgs) -> ExitCode {
    let console: Box<dyn Write + Send> = match &args.console {
        Some(p) => match open_console(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!(
                    "test-agent: console {}: {e}; mirroring to stdout",
                    p.display()
                );
                Box::new(std::io::stdout())
            }
        },
        None => Box::new(std::io::stdout()),
    };
    let boot = boot_id(args.boot_id);
    // Steps run in their own folders: the root must not depend on ours.
    let root = std::path::absolute(&args.root).unwrap_or(args.root.clone());
    let mirror = Mirror::start(console);
    // A leading newline: agent lines count only at the start of a console line.
    mirror.line(format!(
        "\n{}",
        Announcement {
            role: Role::Test,
            version: VERSION.into(),
            boot: boot.clone(),
            addr: None,
            cert: None,
        }
    ));

    let (ran, live) = run_recorded(&root, &boot, &mirror, args.kmsg);
    let code = match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            mirror.line(format!("[ferry] test-agent: {e}"));
            ExitCode::FAILURE
        }
    };
    // The records writer is closed by now; a clean filesystem spares the
    // master image a journal replay when it mounts this rootfs to fetch
    // the records, and tells the live stream the records are final.
    let clean = match args.reboot {
        // Nothing to remount; what the tests wrote must survive a power-off
        // that may follow the stream at once.
        RebootMode::Exit => {
            nix::unistd::sync();
            true
        }
        RebootMode::System => remount_read_only(&root),
    };
    if let Some(live) = live {
        mirror.line(match live.finish(&root.join(RECORDS_DIR), clean) {
            Ok(()) => "[ferry] live stream: the dispatcher holds every record".into(),
            Err(e) => format!(
                "[ferry] live stream: {e}; the records stay on the board for the master image to fetch"
            ),
        });
    }
    mirror.line("[ferry] test-agent done; rebooting to the master image".into());
    if !mirror.finish(MIRROR_DRAIN) {
        eprintln!("test-agent: the console took no output for {MIRROR_DRAIN:?}; going on");
    }
    match args.reboot {
        RebootMode::Exit => code,
        RebootMode::System => {
            let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            eprintln!("test-agent: reboot failed: {e:?}");
            ExitCode::FAILURE
        }
    }
}

/// Syncs and remounts `root` read-only; whether that worked. The records
/// are already synced, so a failure loses nothing, but it is said on the
/// console.
fn remount_read_only(root: &Path) -> bool {
    nix::unistd::sync();
    use nix::mount::{mount, MsFlags};
    match mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "test-agent: remounting {} read-only failed ({e}); synced instead",
                root.display()
            );
            nix::unistd::sync();
            false
        }
    }
}

/// Runs the plan with the records open, and closes them (every write
/// synced, the file closed) before returning, whatever happened; with the
/// live stream the plan asked for, still to be finished.
fn run_recorded(
    root: &Path,
    boot: &str,
    mirror: &Mirror,
    kmsg: Option<PathBuf>,
) -> (anyhow::Result<()>, Option<Live>) {
    let mut live = None;
    let ran = run_records(root, boot, mirror, kmsg, &mut live);
    (ran, live)
}

fn run_records(
    root: &Path,
    boot: &str,
    mirror: &Mirror,
    kmsg: Option<PathBuf>,
    live: &mut Option<Live>,
) -> anyhow::Result<()> {
    let dir = root.join(RECORDS_DIR);
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    let plan_path = root.join(PLAN_FILE);
    let plan = std::fs::read(&plan_path)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(TestPlan::decode(b.as_slice())?));
    let header = Header {
        boot: boot.into(),
        job: plan.as_ref().map(|p| p.job.clone()).unwrap_or_default(),
        agent_version: VERSION.into(),
        start_us: now_us(),
        writer: "test-agent".into(),
    };
    let settings = Settings {
        quotas: plan
            .as_ref()
            .map(|p| Quotas {
                definition: p.definition_output_quota,
                job: p.job_output_quota,
            })
            .unwrap_or_default(),
        reserve: Some((root.join(FERRY_DIR).join("reserve"), RESERVE_BYTES)),
        ..Settings::default()
    };
    let records = dir.join(RECORDS_FILE);
    let stream = plan.as_ref().ok().and_then(|p| p.stream.clone());
    let writer = match stream.map(|s| Live::start(&s, boot, &dir)) {
        None => Writer::create(&dir, header, settings)?,
        Some(Ok((started, tee))) => {
            let tee = tee.map_err(|e| anyhow::anyhow!("creating {}: {e}", records.display()))?;
            *live = Some(started);
            Writer::start(Box::new(tee), &records, header, settings)?
        }
        Some(Err(e)) => {
            mirror.line(format!("[ferry] live stream: {e}"));
            Writer::create(&dir, header, settings)?
        }
    };
    let rec = writer.recorder();
    let socket = crate::socket::name_for(std::process::id());
    let ran = (|| -> anyhow::Result<()> {
        if let Some(kmsg) = kmsg {
            crate::kernel::spawn(kmsg, rec.clone());
        }
        if let Err(e) = crate::socket::serve(&socket, rec.clone()) {
            // Helpers then write records files of their own.
            rec.durable(Body::AgentMessage {
                level: "warn".into(),
                message: format!("helper socket {socket}: {e}"),
            })?;
        }
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                let message = format!("cannot read the plan {}: {e}", plan_path.display());
                rec.durable(Body::AgentMessage {
                    level: "error".into(),
                    message: message.clone(),
                })?;
                anyhow::bail!(message);
            }
        };
        rec.durable(Body::AgentStarted {
            version: VERSION.into(),
            job: plan.job.clone(),
        })?;
        let ctx = RunContext {
            root: root.into(),
            records: records.clone(),
            socket: socket.clone(),
            job: plan.job.clone(),
            boot_id: boot.into(),
        };
        run_plan(&ctx, &plan, &rec, mirror)?;
        rec.durable(Body::AgentFinished {})?;
        Ok(())
    })();
    drop(rec);
    let closed = writer.close();
    if let Ok(stats) = &closed {
        let mut line = format!(
            "[ferry] records: {} bytes, {} bytes of output kept",
            stats.file_bytes, stats.output_kept
        );
        if stats.output_dropped > 0 {
            line.push_str(&format!(", {} dropped", stats.output_dropped));
        }
        if stats.disk_full {
            line.push_str(" (the test rootfs filled up)");
        }
        mirror.line(line);
    }
    ran?;
    closed?;
    Ok(())
}
