//! The LAVA result helpers test writers already call: `lava-test-case` and
//! `lava-test-set`. They hand their records to the agent (on disk before
//! they return; when the agent cannot be reached, written to a records file
//! of their own) and print LAVA's signal line for live viewers.

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
    ctx.record(Body::Result {
        definition: ctx.definition.clone(),
        case,
        result,
        measurement,
        units,
        set: ctx.current_set(),
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
        _ => None,
    }
}

/// Names the helpers answer to, for the bundle's symlinks.
pub const HELPERS: [&str; 2] = ["lava-test-case", "lava-test-set"];

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
