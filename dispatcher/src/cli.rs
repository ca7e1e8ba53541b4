//! Command line of the dispatcher.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::outcome::{Class, INTERNAL_ERROR_EXIT};
use crate::run::Options;

#[derive(Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "Ferry's dispatcher: run one job on one board"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn env_var(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a job. Exit codes: 0 complete, 1 internal error, 2 job error,
    /// 3 infrastructure error, 4 test error, 5 canceled.
    Run {
        /// The device file (how to power, hear and reach the board); give
        /// several to spread `--repeat` runs over them.
        #[arg(long, required_unless_present = "shard_across")]
        device: Vec<PathBuf>,
        /// Output folder (created if missing).
        #[arg(long)]
        output: PathBuf,
        /// Fail at once (infrastructure error) when another job holds the
        /// device, instead of waiting for it within the job timeout.
        #[arg(long)]
        no_wait: bool,
        /// Run the job N times and report flaky cases (`flakes.json`).
        #[arg(long, value_name = "N", conflicts_with = "shard_across")]
        repeat: Option<usize>,
        /// Split the job's definitions across these devices, run them at
        /// once, and merge the results.
        #[arg(long, value_name = "DEVICE", num_args = 1.., conflicts_with = "device")]
        shard_across: Vec<PathBuf>,
        /// The job file.
        job: PathBuf,
    },
    /// Run one command on a board's master image and exit with its status:
    /// 124 timed out, 125 Ferry failed, 126 not runnable, 127 not found,
    /// 128+N killed by signal N. The board is powered on if its master
    /// agent is not announcing itself, and powered off afterwards unless
    /// --keep-on.
    Exec {
        /// The device file.
        #[arg(long)]
        device: PathBuf,
        /// The command's process group is killed after this long.
        #[arg(long, default_value = "30s", value_parser = duration)]
        timeout: Duration,
        /// How long to listen for a master agent already announcing itself
        /// before powering the board on.
        #[arg(long, default_value = "5s", value_parser = duration)]
        probe: Duration,
        /// Leave the board powered on afterwards.
        #[arg(long)]
        keep_on: bool,
        /// `NAME=VALUE` for the command's environment (repeatable).
        #[arg(long = "env", value_name = "NAME=VALUE", value_parser = env_var)]
        env: Vec<(String, String)>,
        /// Working folder on the board.
        #[arg(long)]
        cwd: Option<String>,
        /// Write console.log and events.jsonl here.
        #[arg(long)]
        logs: Option<PathBuf>,
        /// The command and its arguments (after `--`).
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Print the Ferry job a LAVA v2 job file translates to. Exit 2 listing
    /// every key Ferry cannot honour.
    Translate {
        /// The LAVA job file.
        job: PathBuf,
    },
    /// Write OUTPUT-DIR/report.html again from the folder's files (a
    /// self-contained page: summary, results, every source on one
    /// timeline, memory charts). Exit 3 when it cannot be written.
    Report {
        /// A job's output folder.
        output: PathBuf,
    },
    /// List the jobs running on this host (from the device locks).
    List {
        /// One JSON object per job instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running job by job or device name, as SIGTERM does: its
    /// board is powered off and its outputs written. Exit 0 when it ended,
    /// 2 when no such job runs, 3 when it did not end in time.
    Cancel {
        /// A job name or a device name.
        target: String,
        /// How long to wait for it to end.
        #[arg(long, default_value = "60s", value_parser = duration)]
        timeout: Duration,
    },
    /// A lab of boards on this machine.
    Lab {
        #[command(subcommand)]
        command: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Write a device file per board of SCENARIO (default: one simulated
    /// board) as DIR/devices/NAME-N.yaml.
    Up {
        /// The lab folder.
        #[arg(long)]
        lab: PathBuf,
        /// The scenario file.
        scenario: Option<PathBuf>,
    },
    /// Power every board off, stop all they run, remove their state.
    /// Refuses while jobs run unless --force (which cancels them). Exit 0
    /// when nothing is left, 3 when something could not be removed.
    Down {
        /// The lab folder.
        #[arg(long)]
        lab: PathBuf,
        /// Cancel running jobs and stop everything that can be stopped.
        #[arg(long)]
        force: bool,
        /// Bound on each power-off and on the clean-up.
        #[arg(long, default_value = "30s", value_parser = duration)]
        timeout: Duration,
    },
    /// Each board: device file, powered or not, the job using it.
    Status {
        /// The lab folder.
        #[arg(long)]
        lab: PathBuf,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ferry=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dispatcher: cannot start the runtime: {e}");
            return ExitCode::from(INTERNAL_ERROR_EXIT);
        }
    };
    match cli.command {
        Cmd::Run {
            device,
            output,
            no_wait,
            repeat,
            shard_across,
            job,
        } => {
            let opts = Options {
                no_wait,
                shard: None,
            };
            let outcome = runtime.block_on(async {
                if !shard_across.is_empty() {
                    return crate::runs::shard(&job, &shard_across, &output, opts).await;
                }
                if let Some(n) = repeat {
                    return crate::runs::repeat(&job, &device, &output, n, opts).await;
                }
                let Some(device) = device.first().cloned() else {
                    return crate::outcome::Outcome::of(
                        crate::outcome::Phase::Setup,
                        crate::outcome::Failure::job("no --device given"),
                    );
                };
                // A panic outside the job's steps (which run::run catches
                // itself) still powers the board off and writes the outcome.
                let (j, d, o) = (job.clone(), device.clone(), output.clone());
                match tokio::spawn(async move { crate::run::run_with(&j, &d, &o, opts).await })
                    .await
                {
                    Ok(outcome) => outcome,
                    Err(e) => crate::run::after_panic(&device, &output, e).await,
                }
            });
            ExitCode::from(outcome.class.exit_code())
        }
        Cmd::Exec {
            device,
            timeout,
            probe,
            keep_on,
            env,
            cwd,
            logs,
            command,
        } => ExitCode::from(runtime.block_on(crate::exec::exec(crate::exec::Request {
            device,
            argv: command,
            env,
            cwd,
            timeout,
            probe,
            keep_on,
            logs,
        }))),
        Cmd::Translate { job } => match crate::job::translate_lava(&job) {
            Ok(text) => {
                use std::io::Write as _;
                // A closed stdout (| head) is not an error.
                let _ = std::io::stdout().write_all(text.as_bytes());
                ExitCode::SUCCESS
            }
            Err(f) => {
                eprintln!("dispatcher: {}", f.message);
                ExitCode::from(2)
            }
        },
        Cmd::Report { output } => match crate::html::write(&output, None) {
            Ok(()) => {
                println!("{}", output.join(crate::html::FILE).display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dispatcher report: {e}");
                ExitCode::from(Class::InfrastructureError.exit_code())
            }
        },
        Cmd::List { json } => {
            let jobs = crate::lock::running();
            if json {
                for j in &jobs {
                    println!("{}", serde_json::to_string(j).unwrap_or_default());
                }
            } else {
                print!("{}", crate::jobs::table(&jobs));
            }
            ExitCode::SUCCESS
        }
        Cmd::Cancel { target, timeout } => {
            match runtime.block_on(crate::jobs::cancel(&target, timeout)) {
                Ok(done) => {
                    for h in done {
                        println!(
                            "canceled {h} on {}; outputs in {}",
                            h.device,
                            h.output.display()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dispatcher cancel: {e}");
                    let class = match e {
                        crate::jobs::CancelError::NotFound(_) => Class::JobError,
                        _ => Class::InfrastructureError,
                    };
                    ExitCode::from(class.exit_code())
                }
            }
        }
        Cmd::Lab { command } => runtime.block_on(lab(command)),
    }
}

async fn lab(cmd: LabCmd) -> ExitCode {
    let fail = |e: crate::lab::LabError| {
        eprintln!("dispatcher lab: {e}");
        let class = match e {
            crate::lab::LabError::Io { .. } => Class::InfrastructureError,
            _ => Class::JobError,
        };
        ExitCode::from(class.exit_code())
    };
    match cmd {
        LabCmd::Up { lab, scenario } => {
            let scenario = match scenario {
                Some(p) => match crate::lab::load_scenario(&p) {
                    Ok(s) => s,
                    Err(e) => return fail(e),
                },
                None => crate::lab::Scenario::default(),
            };
            match crate::lab::up(&lab, &scenario) {
                Ok(l) => {
                    for b in &l.boards {
                        println!("{:<24} {}", b.device, b.device_file.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        LabCmd::Down {
            lab,
            force,
            timeout,
        } => match crate::lab::down(&lab, force, timeout).await {
            Ok(left) if left.items.is_empty() => {
                println!("lab {} is down; nothing left", lab.display());
                ExitCode::SUCCESS
            }
            Ok(left) => {
                eprintln!(
                    "dispatcher lab down: could not remove: {}",
                    left.items.join(", ")
                );
                ExitCode::from(Class::InfrastructureError.exit_code())
            }
            Err(e) => fail(e),
        },
        LabCmd::Status { lab } => match crate::lab::status(&lab) {
            Ok(boards) => {
                for b in boards {
                    println!(
                        "{:<24} {:<8} {:<4} {}",
                        b.board.device,
                        if b.powered { "on" } else { "off" },
                        format!("{:?}", b.board.kind).to_lowercase(),
                        b.job
                            .map_or_else(|| "idle".to_string(), |h| format!("{h}, {}", h.phase))
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}
