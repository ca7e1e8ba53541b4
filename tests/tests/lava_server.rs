//! Ferry under a real LAVA: Debian 12's lava-server (its own PostgreSQL
//! cluster) and two lava-worker processes, started here by
//! `tests/lava-server/lab` and stopped on every path; two simulated boards
//! registered as devices of type `ferry-sim`, one per worker (one console a
//! pty, the other behind ser2net as `connection_command: telnet …`), whose
//! jobs run through Ferry's `lava-run`. Three LAVA jobs are submitted through the
//! REST API; one is canceled while its test runs. Skipped (saying so) when
//! lava-server is not installed or not root, or with FERRY_SKIP_LAVA=1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::{bin, free_port, workspace, SimBoard};
use serde_json::Value;

/// The lab; `lab down` on drop, whatever happened.
struct Lab {
    dir: PathBuf,
    url: String,
    token: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = Command::new(workspace().join("tests/lava-server/lab"))
            .arg("down")
            .arg(&self.dir)
            .output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!("lab down: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
    }
}

impl Lab {
    fn curl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "-H"])
            .arg(format!("Authorization: Token {}", self.token))
            .args(args)
            .output()
            .expect("curl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    fn get(&self, path: &str) -> String {
        let (ok, body) = self.curl(&["-f", &format!("{}{path}", self.url)]);
        assert!(ok, "GET {path}: {body}\n{}", self.logs());
        body
    }

    fn json(&self, path: &str) -> Value {
        let body = self.get(path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    fn submit(&self, definition: &str) -> u64 {
        let (_, body) = self.curl(&[
            "--data-urlencode",
            &format!("definition={definition}"),
            &format!("{}/api/v0.2/jobs/", self.url),
        ]);
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        v["job_ids"][0]
            .as_u64()
            .unwrap_or_else(|| panic!("submit: {body}"))
    }

    fn job(&self, id: u64) -> Value {
        self.json(&format!("/api/v0.2/jobs/{id}/"))
    }

    /// Waits until `done` holds for job `id`, up to `limit`.
    fn wait(&self, id: u64, limit: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let j = self.job(id);
            if done(&j) {
                return j;
            }
            assert!(
                start.elapsed() < limit,
                "job {id} not {what} after {limit:?}: {j}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `(suite, name, result)` of every test case lava-server holds for job `id`.
    fn results(&self, id: u64) -> Vec<(String, String, String, String)> {
        let text = self.get(&format!("/api/v0.2/jobs/{id}/yaml/"));
        let v: serde_norway::Value =
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("results yaml: {e}: {text}"));
        let mut rows: Vec<_> = v
            .as_sequence()
            .map(|s| {
                s.iter()
                    .map(|r| {
                        let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                        (f("suite"), f("name"), f("result"), f("measurement"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.sort();
        rows
    }

    /// The server's and workers' logs, for a failing assertion.
    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["worker-1", "worker-2", "scheduler", "gunicorn"] {
            let path = self.dir.join("log");
            if let Ok(rd) = std::fs::read_dir(&path) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if name.contains(f) {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(40).collect();
                        s += &format!("--- {name}\n");
                        for l in tail.into_iter().rev() {
                            s += l;
                            s.push('\n');
                        }
                    }
                }
            }
        }
        s
    }
}

/// A device dictionary for `board`: its console a tty (`ferry_console_tty`)
/// or, given a port, LAVA's usual `connection_command`, a telnet to ser2net.
fn device_dict(board: &SimBoard, name: &str, telnet: Option<u16>) -> String {
    let sim = bin("ferry-sim-board").display().to_string();
    let b = board.board.display();
    let console = match telnet {
        Some(port) => format!("{{% set connection_command = 'telnet 127.0.0.1 {port}' %}}"),
        None => format!("{{% set ferry_console_tty = '{b}/console' %}}"),
    };
    format!(
        "{{% extends 'ferry-sim.jinja2' %}}
{{% set power_on_command = '{sim} --board {b} on' %}}
{{% set power_off_command = '{sim} --board {b} off' %}}
{{% set hard_reset_command = '{sim} --board {b} reset' %}}
{{% set ferry_device = '{name}' %}}
{console}
"
    )
}

/// The smoke definition of `examples/lava/smoke-lava-job.yaml`, with
/// `extra` steps, committed to a git repository in `dir`. (lava-server
/// 2023.01's schema refuses `parse.pattern` in an inline definition, so
/// under LAVA the definition comes from git, as a lab's do.)
fn definitions_repo(dir: &Path, extra: &[&str]) -> PathBuf {
    let job = std::fs::read_to_string(workspace().join("examples/lava/smoke-lava-job.yaml"))
        .expect("example job");
    let doc: serde_norway::Value = serde_norway::from_str(&job).expect("example yaml");
    let mut def = doc["actions"][2]["test"]["definitions"][0]["repository"].clone();
    let steps = def["run"]["steps"]
        .as_sequence_mut()
        .expect("example steps");
    steps.extend(extra.iter().map(|s| serde_norway::Value::from(*s)));
    std::fs::create_dir_all(dir).expect("repo dir");
    std::fs::write(
        dir.join("smoke.yaml"),
        serde_norway::to_string(&def).expect("yaml"),
    )
    .expect("definition");
    for args in [
        &["init", "-q", "-b", "main"][..],
        &["add", "smoke.yaml"],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "smoke",
        ],
    ] {
        let ok = Command::new("git")
            .args(args)
            .current_dir(dir)
            .status()
            .expect("git runs")
            .success();
        assert!(ok, "git {args:?}");
    }
    dir.into()
}

/// A LAVA v2 job for device type `ferry-sim`: deploy the example firmware,
/// boot, run the smoke definition from `repo` with GREETING overridden.
fn job(name: &str, repo: &Path) -> String {
    let image = workspace().join("examples/jobs/images/firmware.img.gz");
    format!(
        "job_name: {name}
device_type: ferry-sim
visibility: public
priority: medium
timeouts:
  job: {{minutes: 10}}
  action: {{minutes: 5}}
actions:
- deploy:
    to: flasher
    images:
      firmware:
        url: file://{image}
        compression: gz
        sha256sum: 55376c69c6e130098e3bb28ef20af97ef9a78f720015cc5d216dae90d85865ca
- boot:
    method: minimal
    prompts: ['root@sim:']
- test:
    definitions:
    - from: git
      repository: {repo}
      path: smoke.yaml
      name: smoke
      parameters: {{GREETING: bonjour}}
",
        image = image.display(),
        repo = repo.display()
    )
}

/// Seconds since the epoch of lava-server's `2026-11-28T06:52:28.066110Z`.
fn seconds(t: &str) -> f64 {
    let num = |r: std::ops::Range<usize>| t.get(r).and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs: f64 = t
        .get(17..)
        .map(|s| s.trim_end_matches('Z'))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    (days * 86_400 + num(11..13) * 3600 + num(14..16) * 60) as f64 + secs
}

fn skip() -> Option<&'static str> {
    if std::env::var_os("FERRY_SKIP_LAVA").is_some() {
        return Some("FERRY_SKIP_LAVA is set");
    }
    if !Path::new("/usr/bin/lava-server").exists() || !Path::new("/usr/bin/lava-worker").exists() {
        return Some("lava-server and lava-dispatcher are not installed (.ci/run installs them)");
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (PostgreSQL cluster, /etc/lava-server/dispatcher.d)");
    }
    None
}

#[test]
fn three_jobs_through_lava_server_two_complete_one_canceled() {
    if let Some(why) = skip() {
        eprintln!("skipped: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    // lava-worker finds `lava-run` on the PATH the worker's env.yaml gives.
    let run_dir = tmp.path().join("bin");
    std::fs::create_dir_all(&run_dir).expect("bin dir");
    std::os::unix::fs::symlink(bin("lava-run"), run_dir.join("lava-run")).expect("symlink");
    let boards = [SimBoard::new(), SimBoard::new()];
    let id = std::process::id();
    let workers = [format!("ferry-{id}-w1"), format!("ferry-{id}-w2")];
    // The second board's console is behind ser2net, reached as LAVA labs
    // reach theirs: `connection_command: telnet HOST PORT`.
    let (_ser2net, port) =
        ferry_tests::Ser2net::start(tmp.path(), &boards[1].board.join("console"), true);
    let mut devices = Vec::new();
    for (i, b) in boards.iter().enumerate() {
        let name = format!("ferry-{id}-sim{}", i + 1);
        let dict = tmp.path().join(format!("{name}.jinja2"));
        let telnet = (i == 1).then_some(port);
        std::fs::write(&dict, device_dict(b, &name, telnet)).expect("dict");
        devices.push(format!(
            "{name}:ferry-sim:{}:{}",
            workers[i],
            dict.display()
        ));
    }
    let dir = tmp.path().join("lab");
    let mut lab = Lab {
        dir: dir.clone(),
        url: String::new(),
        token: String::new(),
    };
    let up = Command::new(workspace().join("tests/lava-server/lab"))
        .arg("up")
        .arg(&dir)
        .env("LAB_PG_PORT", free_port().to_string())
        .env("LAB_HTTP_PORT", free_port().to_string())
        .env("LAB_EVENT_PORT", free_port().to_string())
        .env("LAB_WS_PORT", free_port().to_string())
        .env("LAB_WORKERS", workers.join(" "))
        .env("LAB_LAVA_RUN_DIR", &run_dir)
        .env(
            "LAB_DEVICE_TYPES",
            workspace().join("examples/lava/device-types"),
        )
        .env("LAB_DEVICES", devices.join(" "))
        .output()
        .expect("lab runs");
    assert!(
        up.status.success(),
        "lab up: {}{}\n{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr),
        lab.logs()
    );
    let env = std::fs::read_to_string(dir.join("env")).expect("lab env");
    for l in env.lines() {
        if let Some(u) = l.strip_prefix("URL=") {
            lab.url = u.into();
        }
        if let Some(t) = l.strip_prefix("TOKEN=") {
            lab.token = t.into();
        }
    }

    // The long job takes one board and is canceled while its test runs; the
    // first short job takes the other; the second waits for a free board.
    let smoke = definitions_repo(&tmp.path().join("defs"), &[]);
    let slow = definitions_repo(
        &tmp.path().join("slow-defs"),
        &[
            "echo long-job-is-testing",
            "sleep 600",
            "lava-test-case never --result pass",
        ],
    );
    let long = lab.submit(&job("long", &slow));
    let submitted = Instant::now();
    let first = lab.submit(&job("first", &smoke));
    let second = lab.submit(&job("second", &smoke));

    let j = lab.wait(first, Duration::from_secs(300), "finished", |j| {
        j["state"] == "Finished"
    });
    let first_time = submitted.elapsed();
    assert_eq!(j["health"], "Complete", "{j}\n{}", lab.logs());

    // Cancel the long job once its test printed (its log on the server shows it).
    let start = Instant::now();
    loop {
        let (_, log) = lab.curl(&[&format!("{}/api/v0.2/jobs/{long}/logs/", lab.url)]);
        if log.contains("long-job-is-testing") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the long job never reached its test: {}\n{log}\n{}",
            lab.job(long),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    lab.get(&format!("/api/v0.2/jobs/{long}/cancel/"));
    let j = lab.wait(long, Duration::from_secs(180), "finished", |j| {
        j["state"] == "Finished"
    });
    assert_eq!(j["health"], "Canceled", "{j}\n{}", lab.logs());
    let j = lab.wait(second, Duration::from_secs(300), "finished", |j| {
        j["state"] == "Finished"
    });
    assert_eq!(j["health"], "Complete", "{j}\n{}", lab.logs());

    // Every result of the smoke definition, as lava-server stores them.
    let s = |a: &str, b: &str, c: &str, d: &str| (a.into(), b.into(), c.into(), d.into());
    for id in [first, second] {
        let rows = lab.results(id);
        let without_duration: Vec<_> = rows
            .iter()
            .map(|r| {
                if r.0 == "lava" && r.1 == "0_smoke" && r.3.parse::<f64>().is_ok() {
                    (r.0.clone(), r.1.clone(), r.2.clone(), "duration".into())
                } else {
                    r.clone()
                }
            })
            .collect();
        assert_eq!(
            without_duration,
            vec![
                s("0_smoke", "greeting", "pass", "None"),
                s("0_smoke", "not-yet", "skip", "None"),
                s("0_smoke", "sleep-time", "pass", "0.1"),
                s("0_smoke", "spi", "fail", "None"),
                s("0_smoke", "uart", "pass", "None"),
                s("lava", "0_smoke", "pass", "duration"),
                s("lava", "job", "pass", "None"),
            ],
            "job {id}: {rows:?}"
        );
    }
    let canceled = lab.results(long);
    assert!(
        canceled
            .iter()
            .any(|r| r.0 == "lava" && r.1 == "job" && r.2 == "fail"),
        "{canceled:?}"
    );
    assert!(!canceled.iter().any(|r| r.1 == "never"), "{canceled:?}");
    // Both boards ran jobs (so did the console behind ser2net).
    let mut used: Vec<String> = [long, first, second]
        .iter()
        .map(|id| {
            lab.job(*id)["actual_device"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 2, "jobs ran on {used:?}");
    // Both boards are off, and lava-server has both devices idle again.
    for (b, d) in boards.iter().zip(&devices) {
        assert!(!b.powered(), "board {} still powered", b.board.display());
        let name = d.split(':').next().unwrap_or_default();
        let dev = lab.json(&format!("/api/v0.2/devices/{name}/"));
        assert_eq!(dev["state"], "Idle", "{dev}");
    }
    let j = lab.job(first);
    let at = |k: &str| seconds(j[k].as_str().unwrap_or_default());
    eprintln!(
        "lava-server with Ferry, job {first}: submission to result seen through the API {:.1} s; \
         server times: queued {:.1} s, running (lava-run start to end) {:.1} s",
        first_time.as_secs_f64(),
        at("start_time") - at("submit_time"),
        at("end_time") - at("start_time"),
    );
}
