//! `dispatcher run --device DEVICE.yaml --output DIR JOB.yaml`.

use std::process::ExitCode;

fn main() -> ExitCode {
    ferry_dispatcher::cli::main()
}
