//! `ferry-sim-board --board DIR on|off|reset|run`: see the crate docs.

use std::process::ExitCode;

fn main() -> ExitCode {
    ferry_sim_board::cli::main()
}
