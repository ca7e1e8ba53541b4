//! Command line of the dispatcher.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::outcome::INTERNAL_ERROR_EXIT;

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

#[derive(Subcommand)]
enum Cmd {
    /// Run a job. Exit codes: 0 complete, 2 job error, 3 infrastructure
    /// error, 4 test error, 5 canceled (1: a bug in the dispatcher).
    Run {
        /// The device file (how to power, hear and reach the board).
        #[arg(long)]
        device: PathBuf,
        /// Output folder (created if missing).
        #[arg(long)]
        output: PathBuf,
        /// The job file.
        job: PathBuf,
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
            job,
        } => {
            // A panic outside the job's steps (which run::run catches itself)
            // still powers the board off and writes the outcome.
            let outcome = runtime.block_on(async {
                let (j, d, o) = (job.clone(), device.clone(), output.clone());
                match tokio::spawn(async move { crate::run::run(&j, &d, &o).await }).await {
                    Ok(outcome) => outcome,
                    Err(e) => crate::run::after_panic(&device, &output, e).await,
                }
            });
            ExitCode::from(outcome.class.exit_code())
        }
    }
}
