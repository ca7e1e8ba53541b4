//! `lava-run` replaced: the program lava-worker starts once per job, with
//! lava-run's command line, running the job with Ferry.
//!
//! lava-worker (Debian 12's lava-dispatcher 2023.01, `lava_dispatcher/worker.py`)
//! writes `job.yaml`, `device.yaml` (the rendered device dictionary) and
//! `dispatcher.yaml` into a folder per job and runs
//! `nice lava-run --device=… --dispatcher=… --output-dir=… --job-id=… --url=…
//! --token=… --job-log-interval=… [--debug] job.yaml [--env-dut=…]` with the
//! environment the server's `env.yaml` gives, from that environment's PATH.
//! It sends SIGTERM to cancel (again after 60 s, SIGKILL after 120 s), and
//! once the process is gone reads `result.yaml` (`result: pass|fail`,
//! `error_type`, `error_msg`), `description.yaml` and the process's stderr
//! (which the server shows as the failure comment, so it stays empty unless
//! something crashed).
//!
//! Here: the device dictionary becomes a Ferry device file
//! ([`crate::lava_device`]), the LAVA job runs as `dispatcher run` runs it
//! (translated by [`crate::lava_job`]) with Ferry's output folder in
//! `OUTPUT-DIR/ferry/`, its `events.jsonl` is followed into LAVA log lines
//! (console output as `target`, the dispatcher's steps as `info`), each
//! result is logged as `lvl: results` once the records are back, and the
//! job's own `lava`/`job` result last, as lava-run does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

use crate::lava_log::{Log, Sink};
use crate::outcome::{Class, Outcome, Phase};

/// lava-run's command line (`lava-run --help` of LAVA 2023.01).
#[derive(Parser, Debug)]
#[command(
    name = "lava-run",
    version,
    about = "Ferry's lava-run: run one LAVA job (started by lava-worker)"
)]
pub struct Args {
    /// Job identifier.
    #[arg(long, value_name = "ID")]
    pub job_id: String,
    /// Folder for the job's files (result.yaml, description.yaml, ferry/).
    #[arg(long, value_name = "DIR")]
    pub output_dir: PathBuf,
    /// Check the job and device, write description.yaml, run nothing.
    #[arg(long)]
    pub validate: bool,
    /// lava-server's URL, where the job log is posted.
    #[arg(long)]
    pub url: Option<String>,
    /// The job's token for the server.
    #[arg(long)]
    pub token: Option<String>,
    /// Seconds between two posts of the job log.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub job_log_interval: u64,
    /// The rendered device dictionary.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// lava-worker's dispatcher configuration (accepted; Ferry needs none).
    #[arg(long, value_name = "PATH")]
    pub dispatcher: Option<PathBuf>,
    /// The DUT environment file (accepted; Ferry's test plans carry the
    /// job's parameters instead).
    #[arg(long, value_name = "PATH")]
    pub env_dut: Option<PathBuf>,
    /// lava-run's remote-debugger switch (accepted, ignored).
    #[arg(long)]
    pub debug: bool,
    /// The job definition.
    pub definition: PathBuf,
}

/// The `error_type` lava-server knows for each of Ferry's classes
/// (`lava_common.exceptions`); `Bug`, `Configuration` and `Infrastructure`
/// are the ones it counts against the device.
pub fn error_type(class: Class) -> &'static str {
    match class {
        Class::Complete => "",
        Class::JobError => "Job",
        Class::InfrastructureError => "Infrastructure",
        Class::TestError => "Test",
        Class::Canceled => "Canceled",
        Class::InternalError => "Bug",
    }
}

/// The names LAVA's dispatcher gives a job's definitions in its results,
/// `INDEX_NAME` in job order (`0_smoke`, `1_ltp`: `test_name` in
/// `lava_dispatcher/actions/deploy/testdef.py`), by Ferry's suite name.
pub fn lava_suite_names(job_text: &str) -> HashMap<String, String> {
    let doc: Value = serde_norway::from_str(job_text).unwrap_or(Value::Null);
    let names = doc["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["test"]["definitions"].as_array())
        .flatten()
        .filter_map(|d| d["name"].as_str());
    names
        .enumerate()
        .map(|(i, n)| (n.to_string(), format!("{i}_{n}")))
        .collect()
}

/// One `results.json` row as the `lvl: results` message LAVA's dispatcher
/// logs: `definition` (the suite, as `names` renames it), `case`, `result`
/// and whatever else the row has (a `lava` row's case is renamed too).
pub fn result_message(row: &Value, names: &HashMap<String, String>) -> Option<Value> {
    let obj = row.as_object()?;
    let rename = |v: &Value| match v.as_str().and_then(|s| names.get(s)) {
        Some(n) => Value::String(n.clone()),
        None => v.clone(),
    };
    let suite = obj.get("suite")?;
    let mut msg = serde_json::Map::new();
    msg.insert("definition".into(), rename(suite));
    let case = obj.get("name")?;
    let case = if suite == crate::report::LAVA_SUITE {
        rename(case)
    } else {
        case.clone()
    };
    msg.insert("case".into(), case);
    msg.insert("result".into(), obj.get("result")?.clone());
    for (k, v) in obj {
        if !["suite", "name", "result"].contains(&k.as_str()) {
            // lava-server stores a measurement as a Decimal made from what
            // it is given: a float 0.1 would become 0.1000000000000000055…,
            // the string "0.1" (as LAVA's own signals carry it) stays 0.1.
            let v = match (k.as_str(), v) {
                ("measurement", Value::Number(n)) => Value::String(n.to_string()),
                _ => v.clone(),
            };
            msg.insert(k.clone(), v);
        }
    }
    Some(Value::Object(msg))
}

/// Entry point of the `lava-run` binary.
pub fn main() -> ExitCode {
    let args = Args::parse();
    // Create the folder first: the log of this program goes there, not to
    // stderr, which lava-worker hands the server as the job's failure comment.
    if let Err(e) = std::fs::create_dir_all(&args.output_dir) {
        eprintln!("lava-run: cannot create {}: {e}", args.output_dir.display());
        return ExitCode::from(1);
    }
    if let Ok(file) = std::fs::File::create(args.output_dir.join("lava-run.log")) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "ferry=info,warn".into()),
            )
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .with_target(false)
            .init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lava-run: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if runtime.block_on(run(args)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs the job; true when it completed.
pub async fn run(args: Args) -> bool {
    let out = std::path::absolute(&args.output_dir).unwrap_or(args.output_dir.clone());
    let interval = Duration::from_secs(args.job_log_interval.max(1));
    let sink = Sink::start(
        args.url.as_deref(),
        &args.job_id,
        args.token.as_deref().unwrap_or_default(),
        interval,
    );
    let log = sink.log();
    log.send(
        "info",
        json!(format!(
            "lava-run (Ferry {}) starting job {}",
            env!("CARGO_PKG_VERSION"),
            args.job_id
        )),
    );
    let outcome = job(&args, &out, &log).await;
    let success = outcome.class == Class::Complete;
    let mut result = serde_json::Map::new();
    result.insert("definition".into(), json!("lava"));
    result.insert("case".into(), json!("job"));
    result.insert(
        "result".into(),
        json!(if success { "pass" } else { "fail" }),
    );
    if success {
        log.send("info", json!("Job finished correctly"));
    } else {
        result.insert("error_msg".into(), json!(outcome.message));
        result.insert("error_type".into(), json!(error_type(outcome.class)));
        log.send(
            "error",
            json!(format!("{}: {}", outcome.class.name(), outcome.message)),
        );
    }
    log.send("results", Value::Object(result.clone()));
    drop(log);
    // lava-worker kills a canceled lava-run after 120 s: leave time to write.
    if !sink.close(Duration::from_secs(90)).await {
        tracing::warn!("lava-server did not take the whole log within 90 s");
    }
    let yaml = serde_norway::to_string(&Value::Object(result)).unwrap_or_default();
    if let Err(e) = std::fs::write(out.join("result.yaml"), yaml) {
        eprintln!("lava-run: cannot write result.yaml: {e}");
    }
    success
}

/// A lab failure found before the run (the device dictionary is the lab's).
fn infra(message: String) -> Outcome {
    Outcome {
        class: Class::InfrastructureError,
        message,
    }
}

/// Device, description, the Ferry run and its results as log lines.
async fn job(args: &Args, out: &Path, log: &Log) -> Outcome {
    // From here a SIGTERM no longer kills the process outright: one that
    // comes before the run starts (which listens for its own) cancels it here.
    let mut early_term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let dict = match std::fs::read_to_string(&args.device) {
        Ok(t) => t,
        Err(e) => return infra(format!("device dictionary {}: {e}", args.device.display())),
    };
    let fallback = format!("lava-job-{}", args.job_id);
    let device_text = match crate::lava_device::translate(&dict, &fallback) {
        Ok(t) => t,
        // A wrong dictionary is the lab's error, not the job's.
        Err(e) => return infra(e.to_string()),
    };
    let device_file = out.join("ferry-device.yaml");
    if let Err(e) = std::fs::write(&device_file, &device_text) {
        return infra(format!("{}: {e}", device_file.display()));
    }
    write_description(out, &args.definition, &device_text);
    let ferry_out = out.join("ferry");
    if args.validate {
        let device = match crate::device::Device::load(&device_file) {
            Ok(d) => d,
            Err(f) => return Outcome::of(Phase::Setup, f),
        };
        return match crate::job::Job::load(&args.definition, &device) {
            Ok(_) => Outcome {
                class: Class::Complete,
                message: "valid".into(),
            },
            Err(f) => Outcome::of(Phase::Setup, f),
        };
    }
    if let Some(term) = early_term.as_mut() {
        if futures_util::FutureExt::now_or_never(term.recv()).is_some() {
            return Outcome {
                class: Class::Canceled,
                message: "canceled by SIGTERM before the run started".into(),
            };
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let follower = tokio::spawn(follow(ferry_out.join("events.jsonl"), log.clone(), stop_rx));
    let (j, d, o) = (
        args.definition.clone(),
        device_file.clone(),
        ferry_out.clone(),
    );
    let outcome = match tokio::spawn(async move {
        crate::run::run_with(&j, &d, &o, crate::run::Options::default()).await
    })
    .await
    {
        Ok(outcome) => outcome,
        Err(e) => crate::run::after_panic(&device_file, &ferry_out, e).await,
    };
    let _ = stop_tx.send(true);
    let _ = follower.await;
    match std::fs::read(ferry_out.join("results.json")) {
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Array(rows)) => {
                let names = std::fs::read_to_string(&args.definition)
                    .map(|t| lava_suite_names(&t))
                    .unwrap_or_default();
                for row in &rows {
                    if let Some(msg) = result_message(row, &names) {
                        log.send("results", msg);
                    }
                }
            }
            _ => log.send("warning", json!("results.json is not an array of results")),
        },
        Err(e) => log.send("warning", json!(format!("no results.json: {e}"))),
    }
    outcome
}

/// What lava-server shows as the job's pipeline: Ferry's steps, in LAVA's
/// `describe()` shape (`job`, `device`, `pipeline` of named actions).
fn write_description(out: &Path, definition: &Path, device_text: &str) {
    let job: Value = std::fs::read_to_string(definition)
        .ok()
        .and_then(|t| serde_norway::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let device: Value = serde_norway::from_str(device_text).unwrap_or(Value::Null);
    let steps = [
        (
            "ferry-power",
            "power the board on (device file's power commands)",
        ),
        (
            "ferry-agent",
            "authenticate the master agent announced on the console",
        ),
        (
            "ferry-deploy",
            "write the job's images through the master agent",
        ),
        ("ferry-install", "install the test agent and the test plan"),
        (
            "ferry-test",
            "boot the test image once; the test agent records every result on the board",
        ),
        (
            "ferry-fetch",
            "fetch the records back from the master agent",
        ),
        (
            "ferry-finalize",
            "write the outputs and power the board off",
        ),
    ];
    let pipeline: Vec<Value> = steps
        .iter()
        .enumerate()
        .map(|(i, (name, description))| {
            json!({
                "class": "ferry",
                "name": name,
                "description": description,
                "summary": name,
                "level": format!("{}", i + 1),
                "max_retries": 1,
            })
        })
        .collect();
    let doc = json!({ "compatibility": 7, "job": job, "device": device, "pipeline": pipeline });
    let text = serde_norway::to_string(&doc).unwrap_or_default();
    if let Err(e) = std::fs::write(out.join("description.yaml"), text) {
        tracing::warn!("description.yaml: {e}");
    }
}

/// Follows Ferry's `events.jsonl` as it grows, sending each event as LAVA
/// log lines, until told to stop (then reads what is left).
async fn follow(path: PathBuf, log: Log, mut stop: tokio::sync::watch::Receiver<bool>) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut pos = 0u64;
    let mut partial = Vec::new();
    let mut console = Console::default();
    loop {
        let stopping = *stop.borrow();
        if let Ok(mut f) = tokio::fs::File::open(&path).await {
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            if len < pos {
                // The run cleared a stale file: start again.
                pos = 0;
                partial.clear();
            }
            if f.seek(std::io::SeekFrom::Start(pos)).await.is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf).await {
                    pos += n as u64;
                    partial.extend_from_slice(&buf);
                }
            }
            while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = partial.drain(..=i).collect();
                if let Ok(ev) = serde_json::from_slice::<Value>(&line) {
                    event(&ev, &log, &mut console);
                }
            }
        }
        if stopping {
            console.flush(&log);
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Console bytes cut into lines for `target` log lines, each stamped with
/// the time its first byte arrived.
#[derive(Default)]
struct Console {
    line: Vec<u8>,
    since: String,
}

impl Console {
    fn push(&mut self, dt: &str, bytes: &[u8], log: &Log) {
        for &b in bytes {
            if self.line.is_empty() {
                self.since = dt.to_string();
            }
            if b == b'\n' {
                self.flush(log);
            } else if b != b'\r' {
                self.line.push(b);
            }
        }
    }
    fn flush(&mut self, log: &Log) {
        if !self.line.is_empty() {
            log.send_at(
                &self.since,
                "target",
                json!(String::from_utf8_lossy(&self.line)),
            );
            self.line.clear();
        }
    }
}

/// One Ferry event as LAVA log lines, stamped with the event's time.
fn event(ev: &Value, log: &Log, console: &mut Console) {
    let source = ev["source"].as_str().unwrap_or("dispatcher");
    let dt = ev["ts"].as_str().unwrap_or_default();
    if source == "console" {
        if let Some(t) = ev["text"].as_str() {
            console.push(dt, t.as_bytes(), log);
        } else if let Some(b) = ev["bytes"].as_array() {
            let bytes: Vec<u8> = b
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u8)
                .collect();
            console.push(dt, &bytes, log);
        }
        return;
    }
    if let Some(m) = ev["message"].as_str() {
        let lvl = if m.starts_with("warning") {
            "warning"
        } else {
            "info"
        };
        log.send_at(dt, lvl, json!(format!("{source}: {m}")));
    } else if let Some(p) = ev["phase"].as_str() {
        log.send_at(dt, "info", json!(format!("{source}: {p}")));
    } else if let Some(obj) = ev.as_object() {
        let mut rest = obj.clone();
        rest.remove("ts");
        rest.remove("source");
        log.send_at(
            dt,
            "debug",
            json!(format!("{source}: {}", Value::Object(rest))),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lava_worker_command_line_parses() {
        // As worker.py builds it: the definition before --env-dut.
        let a = Args::try_parse_from([
            "lava-run",
            "--device=/w/tmp/7/device.yaml",
            "--dispatcher=/w/tmp/7/dispatcher.yaml",
            "--output-dir=/w/tmp/7",
            "--job-id=7",
            "--url=http://server",
            "--token=abc",
            "--job-log-interval=5",
            "/w/tmp/7/job.yaml",
            "--env-dut=/w/tmp/7/env-dut.yaml",
        ])
        .expect("parses");
        assert_eq!(a.job_id, "7");
        assert_eq!(a.job_log_interval, 5);
        assert_eq!(a.definition, PathBuf::from("/w/tmp/7/job.yaml"));
        assert_eq!(a.env_dut, Some(PathBuf::from("/w/tmp/7/env-dut.yaml")));
    }

    #[test]
    fn rows_become_lava_results() {
        let names = lava_suite_names(
            "actions:\n- test:\n    definitions:\n    - {name: smoke}\n    - {name: ltp}\n",
        );
        let m = result_message(
            &json!({"suite": "ltp", "name": "uart", "result": "pass", "measurement": 1.5, "units": "s", "set": "io"}),
            &names,
        )
        .expect("row");
        assert_eq!(
            m,
            json!({"definition": "1_ltp", "case": "uart", "result": "pass", "measurement": "1.5", "units": "s", "set": "io"})
        );
        let l = result_message(
            &json!({"suite": "lava", "name": "smoke", "result": "fail", "duration": "1.25"}),
            &names,
        )
        .expect("row");
        assert_eq!(l["definition"], "lava");
        assert_eq!(l["case"], "0_smoke");
        assert_eq!(l["duration"], "1.25");
        assert!(result_message(&json!({"suite": "x"}), &names).is_none());
    }
}
