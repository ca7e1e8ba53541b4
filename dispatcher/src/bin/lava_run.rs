//! `lava-run`: lava-worker's per-job program, running the job with Ferry
//! (see `ferry_dispatcher::lava_run`).

use std::process::ExitCode;

fn main() -> ExitCode {
    ferry_dispatcher::lava_run::main()
}
