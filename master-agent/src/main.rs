//! `master-agent --config FILE`: serve the board until it reboots.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "master-agent", version = ferry_master_agent::VERSION, about = "Ferry's master agent")]
struct Cli {
    /// The agent's configuration file.
    #[arg(long, default_value = "/etc/ferry/master-agent.yaml")]
    config: PathBuf,
    /// Boot id (default: /proc/sys/kernel/random/boot_id).
    #[arg(long)]
    boot_id: Option<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Logs go to a serial console: no colour escapes.
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    let result = (|| -> anyhow::Result<()> {
        let config = ferry_master_agent::config::Config::load(&cli.config)?;
        let boot_id = match cli.boot_id {
            Some(b) => b,
            None => std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
                .trim()
                .to_string(),
        };
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(ferry_master_agent::run(config, boot_id))?;
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("master-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
