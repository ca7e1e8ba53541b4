//! `test-agent`: see the crate docs. Also answers as `lava-test-case` and
//! `lava-test-set` when invoked under those names (symlinks in `ferry/bin`).

use std::process::ExitCode;

fn main() -> ExitCode {
    ferry_test_agent::cli::main()
}
