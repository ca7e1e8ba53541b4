//! The LAVA helpers test writers already call: `lava-test-case`,
//! `lava-test-set`, `lava-test-reference`, `lava-test-raise` and
//! `lava-background-process-start`/`-stop`. They hand their records to the
//! agent (on disk before they return; when the agent cannot be reached,
//! written to a records file of their own), print LAVA's signal line for
//! live viewers, and leave the files LAVA's shell helpers leave under
//! `$LAVA_RESULT_DIR` (`results/<case>/result`, `measurement`, `units`;
//! `results/<name>/bg_run.sh` and `pid`).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use ferry_proto::record::{Body, Header, Outcome, RECORDS_SUFFIX};

use crate::records::{now_us, write_alone};
use crate::VERSION;

/// Why a helper call was refused.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// Not started by the test agent.
    #[error("{0} is not set: helpers only work inside a definition run by ferry's test-agent")]
    NoContext(&'static str),
    /// Wrong arguments.
    #[error("usage: {0}")]
    Usage(&'static str),
    /// A bad value.
    #[error("{0}")]
    Invalid(String),
    /// Neither the agent nor a file of the helper's own took the record.
    #[error("cannot record: the agent said {agent}; writing alone: {alone}")]
    NotRecorded {
        /// Why the agent did not take it.
        agent: String,
        /// Why the helper's own file failed.
        alone: String,
    },
    /// The set state file could not be used.
    #[error("test set state {path}: {source}")]
    SetState {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

const CASE_USAGE: &str = "lava-test-case NAME --result pass|fail|skip|unknown [--measurement N --units U] | lava-test-case NAME --shell CMD...";
const SET_USAGE: &str = "lava-test-set start NAME | lava-test-set stop";
const REFERENCE_USAGE: &str =
    "lava-test-reference NAME --result pass|fail|skip|unknown --reference URL";
const RAISE_USAGE: &str = "lava-test-raise MESSAGE";
const BG_START_USAGE: &str = "lava-background-process-start NAME --cmd PROCESS";
const BG_STOP_USAGE: &str = "lava-background-process-stop NAME";

/// What the test agent told the helper through the environment.
struct Context {
    records: PathBuf,
    socket: String,
    job: String,
    definition: String,
    boot: String,
    run_dir: PathBuf,
}

impl Context {
    fn from_env() -> Result<Self, HelperError> {
        let var =
            |name: &'static str| std::env::var(name).map_err(|_| HelperError::NoContext(name));
        Ok(Context {
            records: var("FERRY_RECORDS")?.into(),
            socket: var("FERRY_AGENT_SOCKET")?,
            job: std::env::var("FERRY_JOB").unwrap_or_default(),
            definition: var("FERRY_DEFINITION")?,
            boot: var("FERRY_BOOT_ID")?,
            run_dir: var("FERRY_RUN_DIR")?.into(),
        })
    }

    /// `$LAVA_RESULT_DIR/results/<name>`, as LAVA's helpers make it.
    fn result_dir(&self, name: &str) -> Result<PathBuf, HelperError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(HelperError::Invalid(format!("bad name {name:?}")));
        }
        let dir = self.run_dir.join("results").join(name);
        std::fs::create_dir_all(&dir).map_err(|source| HelperError::SetState {
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    fn set_file(&self) -> PathBuf {
        self.run_dir.join("current-set")
    }

    fn current_set(&self) -> Option<String> {
        std::fs::read_to_string(self.set_file())
            .ok()
            .filter(|s| !s.is_empty())
    }

    /// Records `body` through the agent, or alone when it is unreachable.
    fn record(&self, body: Body) -> Result<(), HelperError> {
        let Err(why) = crate::socket::send(&self.socket, &body) else {
            return Ok(());
        };
        let start_us = now_us();
        let dir = self.records.parent().unwrap_or(&self.records);
        let path = dir.join(format!(
            "helper-{}-{start_us}{RECORDS_SUFFIX}",
            std::process::id()
        ));
        let header = Header {
            boot: self.boot.clone(),
            job: self.job.clone(),
            agent_version: VERSION.into(),
            start_us,
            writer: "helper".into(),
        };
        write_alone(&path, header, &body).map_err(|e| HelperError::NotRecorded {
            agent: why.to_string(),
            alone: e.to_string(),
        })
    }
}

/// A parsed `lava-test-case` call.
#[derive(Debug, PartialEq)]
enum CaseCall {
    Result {
        case: String,
        result: Outcome,
        measurement: Option<f64>,
        units: Option<String>,
    },
    Shell {
        case: String,
        command: Vec<String>,
    },
}

fn parse_case(args: &[String]) -> Result<CaseCall, HelperError> {
    let (case, rest) = args.split_first().ok_or(HelperError::Usage(CASE_USAGE))?;
    if case.is_empty() || case.starts_with("--") || case.chars().any(char::is_whitespace) {
        return Err(HelperError::Invalid(format!("bad test case id {case:?}")));
    }
    let (mut result, mut measurement, mut units) = (None, None, None);
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(HelperError::Usage(CASE_USAGE));
        match flag.as_str() {
            "--shell" => {
                let command: Vec<String> = it.cloned().collect();
                if command.is_empty() {
                    return Err(HelperError::Usage(CASE_USAGE));
                }
                return Ok(CaseCall::Shell {
                    case: case.clone(),
                    command,
                });
            }
            "--result" => {
                let v = value()?;
                result = Some(Outcome::parse(&v).ok_or_else(|| {
                    HelperError::Invalid(format!(
                        "bad result {v:?}: use pass, fail, skip or unknown"
                    ))
                })?);
            }
            "--measurement" => {
                let v = value()?;
                measurement = Some(v.parse::<f64>().ok().filter(|m| m.is_finite()).ok_or_else(
                    || HelperError::Invalid(format!("bad measurement {v:?}: must be a number")),
                )?);
            }
            "--units" => units = Some(value()?),
            _ => return Err(HelperError::Usage(CASE_USAGE)),
        }
    }
    let result = result.ok_or(HelperError::Usage(CASE_USAGE))?;
    Ok(CaseCall::Result {
        case: case.clone(),
        result,
        measurement,
        units,
    })
}

fn record_case(
    ctx: &Context,
    case: String,
    result: Outcome,
    measurement: Option<f64>,
    units: Option<String>,
) -> Result<(), HelperError> {
    let mut signal = format!(
        "<LAVA_SIGNAL_TESTCASE TEST_CASE_ID={case} RESULT={}",
        result.as_str()
    );
    if let Some(m) = measurement {
        signal.push_str(&format!(" MEASUREMENT={m}"));
    }
    if let Some(u) = &units {
        signal.push_str(&format!(" UNITS={u}"));
    }
    // The files LAVA's lava-test-case leaves (best effort: the record is what counts).
    if let Ok(dir) = ctx.result_dir(&case) {
        let _ = std::fs::write(dir.join("result"), format!("{}\n", result.as_str()));
        if let Some(u) = &units {
            let _ = std::fs::write(dir.join("units"), format!("{u}\n"));
        }
        if let Some(m) = measurement {
            let _ = std::fs::write(dir.join("measurement"), format!("{m}\n"));
        }
    }
    ctx.record(Body::Result {
        definition: ctx.definition.clone(),
        case,
        result,
        measurement,
        units,
        set: ctx.current_set(),
        reference: None,
    })?;
    println!("{signal}>");
    Ok(())
}

fn test_case(args: &[String]) -> Result<(), HelperError> {
    let ctx = Context::from_env()?;
    match parse_case(args)? {
        CaseCall::Result {
            case,
            result,
            measurement,
            units,
        } => record_case(&ctx, case, result, measurement, units),
        CaseCall::Shell { case, command } => {
            // LAVA: pass when the command exits 0; the helper itself succeeds.
            let ok = Command::new("/bin/sh")
                .arg("-c")
                .arg(command.join(" "))
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            let result = if ok { Outcome::Pass } else { Outcome::Fail };
            record_case(&ctx, case, result, None, None)
        }
    }
}

fn test_set(args: &[String]) -> Result<(), HelperError> {
    let ctx = Context::from_env()?;
    let path = ctx.set_file();
    let state = |r: std::io::Result<()>| {
        r.map_err(|source| HelperError::SetState {
            path: path.clone(),
            source,
        })
    };
    match args {
        [cmd, name] if cmd == "start" => {
            if name.is_empty() || name.chars().any(char::is_whitespace) {
                return Err(HelperError::Invalid(format!("bad test set name {name:?}")));
            }
            state(std::fs::write(&path, name))?;
            ctx.record(Body::SetStarted {
                definition: ctx.definition.clone(),
                set: name.clone(),
            })?;
            println!("<LAVA_SIGNAL_TESTSET START {name}>");
        }
        [cmd] if cmd == "stop" => {
            let set = ctx
                .current_set()
                .ok_or_else(|| HelperError::Invalid("no test set was started".into()))?;
            state(std::fs::remove_file(&path))?;
            ctx.record(Body::SetStopped {
                definition: ctx.definition.clone(),
                set,
            })?;
            println!("<LAVA_SIGNAL_TESTSET STOP>");
        }
        _ => return Err(HelperError::Usage(SET_USAGE)),
    }
    Ok(())
}

/// `lava-test-reference NAME --result R --reference URL`: a result with a link.
fn test_reference(args: &[String]) -> Result<(), HelperError> {
    let ctx = Context::from_env()?;
    let (case, rest) = args
        .split_first()
        .ok_or(HelperError::Usage(REFERENCE_USAGE))?;
    if case.is_empty() || case.starts_with("--") || case.chars().any(char::is_whitespace) {
        return Err(HelperError::Invalid(format!("bad test case id {case:?}")));
    }
    let (mut result, mut reference) = (None, None);
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .cloned()
            .ok_or(HelperError::Usage(REFERENCE_USAGE))?;
        match flag.as_str() {
            "--result" => {
                result = Some(Outcome::parse(&value).ok_or_else(|| {
                    HelperError::Invalid(format!(
                        "bad result {value:?}: use pass, fail, skip or unknown"
                    ))
                })?)
            }
            "--reference" => reference = Some(value),
            _ => return Err(HelperError::Usage(REFERENCE_USAGE)),
        }
    }
    let (Some(result), Some(reference)) = (result, reference) else {
        return Err(HelperError::Usage(REFERENCE_USAGE));
    };
    ctx.record(Body::Result {
        definition: ctx.definition.clone(),
        case: case.clone(),
        result,
        measurement: None,
        units: None,
        set: ctx.current_set(),
        reference: Some(reference.clone()),
    })?;
    println!(
        "<LAVA_SIGNAL_TESTREFERENCE {case} {} {reference}>",
        result.as_str()
    );
    Ok(())
}

/// `lava-test-raise MESSAGE`: records the abort (a test error for the job),
/// then ends the definition: LAVA stops the test action at this signal, so
/// nothing after it in the definition, or in later definitions, runs.
fn test_raise(args: &[String]) -> Result<(), HelperError> {
    let ctx = Context::from_env()?;
    let message = args.join(" ");
    if message.trim().is_empty() {
        return Err(HelperError::Usage(RAISE_USAGE));
    }
    let _ = std::fs::write(ctx.run_dir.join(crate::runner::ABORTED_FILE), &message);
    ctx.record(Body::Aborted {
        definition: ctx.definition.clone(),
        class: "test-error".into(),
        message: message.clone(),
    })?;
    println!("<LAVA_SIGNAL_TESTRAISE {message}>");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // The definition's shell and everything it started share this process
    // group (the runner made it); ending it ends the definition.
    let _ = nix::sys::signal::killpg(nix::unistd::getpgrp(), nix::sys::signal::Signal::SIGTERM);
    Err(HelperError::Invalid(format!("raised: {message}")))
}

/// `lava-background-process-start NAME --cmd PROCESS`: LAVA's `bg_run.sh`
/// (PROCESS started again every second until stopped), its pid in
/// `results/NAME/pid`.
fn background_start(args: &[String]) -> Result<(), HelperError> {
    let ctx = Context::from_env()?;
    let (name, rest) = args
        .split_first()
        .ok_or(HelperError::Usage(BG_START_USAGE))?;
    let process = match rest.split_first() {
        Some((flag, cmd)) if flag == "--cmd" && !cmd.is_empty() => cmd.join(" "),
        _ => return Err(HelperError::Usage(BG_START_USAGE)),
    };
    let dir = ctx.result_dir(name)?;
    let script = dir.join("bg_run.sh");
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| HelperError::SetState { path, source }
    };
    std::fs::write(
        &script,
        format!("set -e\ntrap \"exit\" HUP INT TERM\nwhile true; do\n    {process} &\n    sleep 1\ndone\n"),
    )
    .map_err(io(&script))?;
    let child = Command::new("/bin/sh")
        .arg(&script)
        .spawn()
        .map_err(io(&script))?;
    let pid = dir.join("pid");
    std::fs::write(&pid, format!("{}\n", child.id())).map_err(io(&pid))?;
    Ok(())
}

/// `lava-background-process-stop NAME`: stops what `-start` started.
fn background_stop(args: &[String]) -> Result<(), HelperError> {
    let ctx = Context::from_env()?;
    let [name] = args else {
        return Err(HelperError::Usage(BG_STOP_USAGE));
    };
    let path = ctx.run_dir.join("results").join(name).join("pid");
    let text = std::fs::read_to_string(&path).map_err(|source| HelperError::SetState {
        path: path.clone(),
        source,
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| HelperError::Invalid(format!("{}: not a pid", path.display())))?;
    // As LAVA: a process already gone is not an error.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    Ok(())
}

fn exit(name: &str, r: Result<(), HelperError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the helper called `name`, if there is one by that name.
pub fn dispatch(name: &str, args: &[String]) -> Option<ExitCode> {
    match name {
        "lava-test-case" => Some(exit(name, test_case(args))),
        "lava-test-set" => Some(exit(name, test_set(args))),
        "lava-test-reference" => Some(exit(name, test_reference(args))),
        "lava-test-raise" => Some(exit(name, test_raise(args))),
        "lava-background-process-start" => Some(exit(name, background_start(args))),
        "lava-background-process-stop" => Some(exit(name, background_stop(args))),
        _ => None,
    }
}

/// Names the helpers answer to, for the bundle's symlinks.
pub const HELPERS: [&str; 6] = [
    "lava-test-case",
    "lava-test-set",
    "lava-test-reference",
    "lava-test-raise",
    "lava-background-process-start",
    "lava-background-process-stop",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn parses_lava_forms() {
        assert_eq!(
            parse_case(&args(&["boot", "--result", "pass"])).expect("ok"),
            CaseCall::Result {
                case: "boot".into(),
                result: Outcome::Pass,
                measurement: None,
                units: None
            }
        );
        assert_eq!(
            parse_case(&args(&[
                "speed",
                "--result",
                "pass",
                "--measurement",
                "12.5",
                "--units",
                "MB/s"
            ]))
            .expect("ok"),
            CaseCall::Result {
                case: "speed".into(),
                result: Outcome::Pass,
                measurement: Some(12.5),
                units: Some("MB/s".into())
            }
        );
        assert_eq!(
            parse_case(&args(&["t", "--shell", "test", "-d", "/"])).expect("ok"),
            CaseCall::Shell {
                case: "t".into(),
                command: args(&["test", "-d", "/"])
            }
        );
    }

    #[test]
    fn refuses_bad_calls() {
        for bad in [
            &["x"][..],
            &["x", "--result", "maybe"],
            &["x", "--result", "pass", "--measurement", "fast"],
            &["x", "--result"],
            &["--result", "pass"],
            &["x", "--shell"],
            &["x", "--frobnicate"],
        ] {
            assert!(parse_case(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
