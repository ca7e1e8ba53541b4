//! Several runs of one job: repeated to root out flaky tests
//! (`--repeat N`), or its definitions sharded across boards
//! (`--shard-across DEVICE...`). Each run has its own folder under the
//! output folder; the output folder itself gets the merged view.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use futures_util::future::join_all;
use serde::Serialize;
use serde_json::{json, Value};

use crate::outcome::{Class, Outcome};
use crate::run::{run_with, Options};

/// One run of a job, and how it ended.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// 1-based run (or shard) number.
    pub run: usize,
    /// The device file it ran on.
    pub device: PathBuf,
    /// Its output folder.
    pub output: PathBuf,
    /// Its outcome class.
    pub class: &'static str,
    /// Its exit code.
    pub exit_code: u8,
    /// Its outcome message.
    pub message: String,
}

/// The class of several runs: complete when all are, else the one a
/// scheduler must act on first.
fn worst(classes: impl IntoIterator<Item = Class>) -> Class {
    let rank = |c: Class| match c {
        Class::InternalError => 0,
        Class::Canceled => 1,
        Class::JobError => 2,
        Class::InfrastructureError => 3,
        Class::TestError => 4,
        Class::Complete => 5,
    };
    classes
        .into_iter()
        .min_by_key(|c| rank(*c))
        .unwrap_or(Class::Complete)
}

fn summary_of(run: usize, device: &Path, output: PathBuf, o: &Outcome) -> RunSummary {
    RunSummary {
        run,
        device: device.into(),
        output,
        class: o.class.name(),
        exit_code: o.class.exit_code(),
        message: o.message.clone(),
    }
}

/// The rows of a run's `results.json` (none when it has none).
fn results_of(dir: &Path) -> Vec<Value> {
    std::fs::read(dir.join("results.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<Value>>(&b).ok())
        .unwrap_or_default()
}

fn device_name(device: &Path) -> String {
    crate::device::Device::load(device)
        .map(|d| d.name)
        .unwrap_or_else(|_| device.display().to_string())
}

fn put(out: &Path, name: &str, text: &str) {
    let _ = std::fs::write(out.join(name), text);
}

/// Runs `job` `times` times. With several devices, the runs are spread over
/// them (each device runs its share one after another, devices at once).
/// Writes `flakes.json` and `summary.txt`: every case whose result changed
/// between runs, with the runs and boards where it did, and per-case pass
/// rates.
pub async fn repeat(
    job: &Path,
    devices: &[PathBuf],
    out: &Path,
    times: usize,
    opts: Options,
) -> Outcome {
    if let Err(e) = std::fs::create_dir_all(out) {
        return Outcome {
            class: Class::JobError,
            message: format!("output folder {}: {e}", out.display()),
        };
    }
    // Run k goes to device k % n.
    let lanes = devices.iter().enumerate().map(|(lane, device)| async move {
        let mut done = Vec::new();
        for k in (lane..times).step_by(devices.len().max(1)) {
            let dir = out.join(format!("run-{}", k + 1));
            let o = run_with(job, device, &dir, opts).await;
            let canceled = o.class == Class::Canceled;
            done.push(summary_of(k + 1, device, dir, &o));
            if canceled {
                break;
            }
        }
        done
    });
    let mut runs: Vec<RunSummary> = join_all(lanes).await.into_iter().flatten().collect();
    runs.sort_by_key(|r| r.run);

    // Per case: its result in each run that reported it.
    let mut cases: BTreeMap<(String, String), Vec<Seen>> = BTreeMap::new();
    for r in &runs {
        let board = device_name(&r.device);
        for row in results_of(&r.output) {
            let key = (
                row["suite"].as_str().unwrap_or_default().to_string(),
                row["name"].as_str().unwrap_or_default().to_string(),
            );
            let result = row["result"].as_str().unwrap_or_default().to_string();
            cases
                .entry(key)
                .or_default()
                .push((r.run, board.clone(), result));
        }
    }
    let mut flaky = Vec::new();
    let mut report = Vec::new();
    for ((suite, name), seen) in &cases {
        let pass = seen.iter().filter(|s| s.2 == "pass").count();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for s in seen {
            *counts.entry(s.2.as_str()).or_default() += 1;
        }
        let is_flaky = counts.len() > 1 || seen.len() < runs.len();
        let entry = json!({
            "suite": suite, "name": name,
            "runs": seen.len(), "missing_in": runs.len() - seen.len(),
            "results": counts,
            "pass_rate": pass as f64 / runs.len().max(1) as f64,
            "flaky": is_flaky,
            "seen": seen.iter().map(|(run, board, result)| json!({"run": run, "board": board, "result": result})).collect::<Vec<_>>(),
        });
        if is_flaky {
            flaky.push(format!("{suite}/{name}"));
        }
        report.push(entry);
    }
    let class = worst(runs.iter().map(|r| class_named(r.class)));
    let message = format!(
        "{} run(s): {} complete; {} flaky case(s){}",
        runs.len(),
        runs.iter().filter(|r| r.class == "complete").count(),
        flaky.len(),
        if flaky.is_empty() {
            String::new()
        } else {
            format!(": {}", flaky.join(", "))
        }
    );
    let flakes = json!({ "runs": runs, "cases": report, "flaky": flaky, "class": class, "exit_code": class.exit_code() });
    put(out, "flakes.json", &format!("{:#}\n", flakes));
    let mut s = format!(
        "ferry: job repeated {} time(s): {}\n",
        runs.len(),
        class.name()
    );
    for r in &runs {
        let _ = writeln!(
            s,
            "  run {:>3} on {:<24} {}",
            r.run,
            device_name(&r.device),
            r.class
        );
    }
    for c in &report {
        let _ = writeln!(
            s,
            "  {:<6} {:>5.1}% pass  {}/{}",
            if c["flaky"] == true {
                "FLAKY"
            } else {
                "stable"
            },
            c["pass_rate"].as_f64().unwrap_or(0.0) * 100.0,
            c["suite"].as_str().unwrap_or_default(),
            c["name"].as_str().unwrap_or_default()
        );
    }
    put(out, "summary.txt", &s);
    print!("{s}");
    Outcome { class, message }
}

/// A case's result in one run: (run, board, result).
type Seen = (usize, String, String);

fn class_named(name: &str) -> Class {
    [
        Class::Complete,
        Class::JobError,
        Class::InfrastructureError,
        Class::TestError,
        Class::Canceled,
        Class::InternalError,
    ]
    .into_iter()
    .find(|c| c.name() == name)
    .unwrap_or(Class::InternalError)
}

/// Runs `job` with its definitions split across `devices` (definition i on
/// device i mod n), all at once, and merges the results into `out`:
/// `results.json` with each row's `board`, `outcome.json` with every shard.
pub async fn shard(job: &Path, devices: &[PathBuf], out: &Path, opts: Options) -> Outcome {
    if let Err(e) = std::fs::create_dir_all(out) {
        return Outcome {
            class: Class::JobError,
            message: format!("output folder {}: {e}", out.display()),
        };
    }
    let count = devices.len();
    let shards = devices.iter().enumerate().map(|(i, device)| async move {
        let dir = out.join(format!("shard-{}", i + 1));
        let o = run_with(
            job,
            device,
            &dir,
            Options {
                shard: Some((i, count)),
                ..opts
            },
        )
        .await;
        summary_of(i + 1, device, dir, &o)
    });
    let runs = join_all(shards).await;
    let mut merged = Vec::new();
    for r in &runs {
        let board = device_name(&r.device);
        for mut row in results_of(&r.output) {
            if let Some(obj) = row.as_object_mut() {
                obj.insert("board".into(), json!(board));
            }
            merged.push(row);
        }
    }
    let class = worst(runs.iter().map(|r| class_named(r.class)));
    let message = runs
        .iter()
        .filter(|r| r.class != "complete")
        .map(|r| format!("shard {}: {}", r.run, r.message))
        .collect::<Vec<_>>()
        .join("; ");
    let message = if message.is_empty() {
        format!("{count} shard(s) complete")
    } else {
        message
    };
    put(
        out,
        "results.json",
        &format!("{:#}\n", Value::Array(merged)),
    );
    let outcome = json!({ "class": class, "exit_code": class.exit_code(), "message": message, "shards": runs });
    put(out, "outcome.json", &format!("{:#}\n", outcome));
    Outcome { class, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_class_is_the_one_to_act_on() {
        assert_eq!(worst([Class::Complete, Class::Complete]), Class::Complete);
        assert_eq!(
            worst([
                Class::Complete,
                Class::TestError,
                Class::InfrastructureError
            ]),
            Class::InfrastructureError
        );
        assert_eq!(
            worst([Class::Canceled, Class::InternalError]),
            Class::InternalError
        );
        for c in [
            Class::Complete,
            Class::JobError,
            Class::Canceled,
            Class::InternalError,
        ] {
            assert_eq!(class_named(c.name()), c);
        }
    }
}
