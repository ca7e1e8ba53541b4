//! The lab on one machine, with simulated boards: `lab up/down/status`,
//! one job per device, stale locks, `list` and `cancel`, `--repeat` and
//! sharding. Each test has its own run dir (`FERRY_RUN_DIR`), so its locks
//! and `list` see only its own jobs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::{bin, processes_mentioning, r, rows, Row};

/// A lab folder and a run dir of its own.
struct Lab {
    tmp: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        Lab {
            tmp: tempfile::tempdir().expect("tmp"),
        }
    }
    fn dir(&self) -> PathBuf {
        self.tmp.path().join("lab")
    }
    fn run_dir(&self) -> PathBuf {
        self.tmp.path().join("run")
    }
    fn dispatcher(&self) -> Command {
        let mut c = Command::new(bin("dispatcher"));
        c.env("FERRY_RUN_DIR", self.run_dir());
        c
    }
    fn cmd(&self, args: &[&str]) -> Output {
        let out = self.dispatcher().args(args).output().expect("dispatcher");
        eprintln!(
            "$ dispatcher {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
    fn up(&self, scenario: &str) -> Vec<PathBuf> {
        let s = self.tmp.path().join("scenario.yaml");
        std::fs::write(&s, scenario).expect("scenario");
        let lab = self.dir();
        let out = self.cmd(&["lab", "up", "--lab", p(&lab), p(&s)]);
        assert!(out.status.success());
        let mut devices: Vec<PathBuf> = std::fs::read_dir(lab.join("devices"))
            .expect("devices")
            .flatten()
            .map(|e| e.path())
            .collect();
        devices.sort();
        devices
    }
    fn job(&self, name: &str, text: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, text).expect("job");
        path
    }
    /// Starts `dispatcher run` in the background.
    fn start(&self, device: &Path, job: &Path, out: &str) -> Child {
        self.dispatcher()
            .args(["run", "--device", p(device), "--output"])
            .arg(self.tmp.path().join(out))
            .arg(job)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn")
    }
    fn out(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    /// Waits until `dispatcher list` shows `n` jobs in the test phase.
    fn wait_testing(&self, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = String::from_utf8_lossy(&self.cmd(&["list"]).stdout).into_owned();
            if list.lines().filter(|l| l.contains(" test ")).count() >= n {
                return list;
            }
            assert!(
                Instant::now() < deadline,
                "jobs never reached the test phase:\n{list}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    /// Waits until a run's console shows `needle` (the test has got there).
    fn wait_console(&self, out: &str, needle: &str) {
        let log = self.out(out).join("console.log");
        let deadline = Instant::now() + Duration::from_secs(60);
        let text =
            || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
        while !text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} never on the console\n{}\n--- console:\n{}",
                dump(&self.out(out)),
                text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    /// Asserts nothing the lab started is left.
    fn assert_nothing_left(&self) {
        let lab = self.dir();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !processes_mentioning(&lab).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            processes_mentioning(&lab),
            Vec::<i32>::new(),
            "processes left"
        );
        for sub in ["boards", "devices", "lab.json"] {
            assert!(!lab.join(sub).exists(), "{sub} left");
        }
    }
}

impl Drop for Lab {
    /// A failed test still leaves nothing running.
    fn drop(&mut self) {
        if self.dir().join("lab.json").exists() {
            let _ = self
                .dispatcher()
                .args(["lab", "down", "--force", "--lab"])
                .arg(self.dir())
                .output();
        }
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A run's outcome and the tail of its log, for failure messages.
fn dump(out: &Path) -> String {
    let outcome = std::fs::read_to_string(out.join("outcome.json")).unwrap_or_default();
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap_or_default();
    let tail: Vec<&str> = events.lines().rev().take(30).collect();
    format!(
        "{outcome}\n--- events (last 30, newest first):\n{}",
        tail.join("\n")
    )
}

fn class_of(out: &Path) -> String {
    let text = std::fs::read_to_string(out.join("outcome.json")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["class"].as_str().unwrap_or("(none)").to_string()
}

fn results(out: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    rows(&serde_json::from_str(&text).expect("json")).expect("an array")
}

const QUICK: &str = r#"job: quick
timeouts: {job: 2m, test: 1m}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: quick}
        run:
          steps:
            - lava-test-case ok --result pass
"#;

/// A job that sleeps in its test (long enough to be caught running).
fn sleeper(secs: u32) -> String {
    format!(
        r#"job: sleeper
timeouts: {{job: 5m, test: 4m}}
test:
  definitions:
    - inline:
        metadata: {{format: Lava-Test Test Definition 1.0, name: sleeper}}
        run:
          steps:
            - lava-test-case before --result pass
            - sleep {secs}
            - lava-test-case after --result pass
"#
    )
}

#[test]
fn three_boards_come_up_run_jobs_at_once_and_go_down_leaving_nothing() {
    let lab = Lab::new();
    let devices = lab.up("boards: [{name: sim, kind: sim, count: 3}]\n");
    assert_eq!(devices.len(), 3);
    let text = std::fs::read_to_string(&devices[0]).expect("device");
    assert!(text.contains(&format!(
        "{}/boards/sim-1/console",
        std::fs::canonicalize(lab.dir()).expect("c").display()
    )));
    let job = lab.job("quick.yaml", QUICK);
    let mut children: Vec<Child> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| lab.start(d, &job, &format!("out-{i}")))
        .collect();
    for (i, c) in children.iter_mut().enumerate() {
        let ok = c.wait().expect("wait").success();
        assert!(ok, "{}", dump(&lab.out(&format!("out-{i}"))));
    }
    for i in 0..3 {
        let out = lab.out(&format!("out-{i}"));
        assert_eq!(class_of(&out), "complete");
        assert_eq!(results(&out)[0], r("quick", "ok", "pass"));
    }
    let status =
        String::from_utf8_lossy(&lab.cmd(&["lab", "status", "--lab", p(&lab.dir())]).stdout)
            .into_owned();
    assert_eq!(
        status
            .lines()
            .filter(|l| l.contains(" off ") && l.contains("idle"))
            .count(),
        3,
        "{status}"
    );
    assert!(lab
        .cmd(&["lab", "down", "--lab", p(&lab.dir())])
        .status
        .success());
    lab.assert_nothing_left();
}

#[test]
fn down_refuses_while_jobs_run_and_force_stops_everything_even_after_kill_9() {
    let lab = Lab::new();
    let devices = lab.up("boards: [{name: sim, kind: sim, count: 2}]\n");
    let job = lab.job("sleeper.yaml", &sleeper(300));
    let mut a = lab.start(&devices[0], &job, "out-a");
    let mut b = lab.start(&devices[1], &job, "out-b");
    lab.wait_testing(2);
    let refused = lab.cmd(&["lab", "down", "--lab", p(&lab.dir())]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "down must refuse while jobs run"
    );
    // kill -9 one dispatcher and its board's supervisor: orphans remain.
    let _ = b.kill();
    let _ = b.wait();
    let sup =
        std::fs::read_to_string(lab.dir().join("boards/sim-2/supervisor.pid")).unwrap_or_default();
    if let Ok(pid) = sup.trim().parse::<i32>() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let down = lab.cmd(&["lab", "down", "--force", "--lab", p(&lab.dir())]);
    assert!(down.status.success());
    // The running job was canceled the scheduler's way and kept its results.
    assert_eq!(a.wait().expect("wait").code(), Some(5));
    assert_eq!(class_of(&lab.out("out-a")), "canceled");
    lab.assert_nothing_left();
}

#[test]
fn two_jobs_on_one_device_never_overlap_and_no_wait_fails_at_once() {
    let lab = Lab::new();
    let devices = lab.up("boards: [{name: sim, kind: sim, count: 1}]\n");
    let job = lab.job("sleeper.yaml", &sleeper(3));
    let mut first = lab.start(&devices[0], &job, "out-1");
    lab.wait_testing(1);
    let started = Instant::now();
    let busy = lab
        .dispatcher()
        .args(["run", "--no-wait", "--device", p(&devices[0]), "--output"])
        .arg(lab.out("out-busy"))
        .arg(&job)
        .output()
        .expect("run");
    assert_eq!(
        busy.status.code(),
        Some(3),
        "--no-wait on a busy device is an infrastructure error"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "--no-wait must not wait"
    );
    let msg = std::fs::read_to_string(lab.out("out-busy/outcome.json")).expect("outcome");
    assert!(msg.contains("busy with job sleeper"), "{msg}");
    // A waiting job runs after the first, never during it.
    let mut second = lab.start(&devices[0], &job, "out-2");
    assert!(first.wait().expect("wait").success());
    assert!(second.wait().expect("wait").success());
    let span = |out: &str| {
        let text = std::fs::read_to_string(lab.out(out).join("events.jsonl")).expect("events");
        let power: Vec<String> = text
            .lines()
            .filter(|l| l.contains("\"source\":\"power\""))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["ts"].as_str().map(str::to_string))
            .collect();
        (
            power.first().cloned().expect("power events"),
            power.last().cloned().expect("power events"),
        )
    };
    let (a, b) = (span("out-1"), span("out-2"));
    // RFC 3339 UTC stamps of one format compare as text.
    assert!(a.1 < b.0, "jobs overlapped: first {a:?}, second {b:?}");
    lab.cmd(&["lab", "down", "--force", "--lab", p(&lab.dir())]);
    lab.assert_nothing_left();
}

#[test]
fn a_lock_left_by_a_killed_dispatcher_is_broken_with_a_message() {
    let lab = Lab::new();
    let devices = lab.up("boards: [{name: sim, kind: sim, count: 1}]\n");
    let job = lab.job("sleeper.yaml", &sleeper(300));
    let mut a = lab.start(&devices[0], &job, "out-a");
    lab.wait_testing(1);
    let _ = a.kill();
    let _ = a.wait();
    let quick = lab.job("quick.yaml", QUICK);
    let mut b = lab.start(&devices[0], &quick, "out-b");
    let ok = b.wait().expect("wait").success();
    assert!(ok, "{}", dump(&lab.out("out-b")));
    let events = std::fs::read_to_string(lab.out("out-b/events.jsonl")).expect("events");
    assert!(
        events.contains("broke a stale lock on device sim-1."),
        "{events}"
    );
    assert!(events.contains("job sleeper"));
    lab.cmd(&["lab", "down", "--force", "--lab", p(&lab.dir())]);
    lab.assert_nothing_left();
}

#[test]
fn list_shows_a_running_job_and_cancel_stops_it_cleanly() {
    let lab = Lab::new();
    let devices = lab.up("boards: [{name: sim, kind: sim, count: 1}]\n");
    let job = lab.job("sleeper.yaml", &sleeper(300));
    let mut a = lab.start(&devices[0], &job, "out-a");
    let list = lab.wait_testing(1);
    lab.wait_console("out-a", "TEST_CASE_ID=before");
    assert!(
        list.contains("sleeper") && list.contains("sim-1.") && list.contains("out-a"),
        "{list}"
    );
    let json = String::from_utf8_lossy(&lab.cmd(&["list", "--json"]).stdout).into_owned();
    let row: serde_json::Value =
        serde_json::from_str(json.lines().next().expect("a row")).expect("json");
    assert_eq!(row["pid"].as_u64(), Some(u64::from(a.id())));
    let canceled = lab.cmd(&["cancel", "sleeper"]).status.success();
    assert!(canceled, "{}", dump(&lab.out("out-a")));
    assert_eq!(a.wait().expect("wait").code(), Some(5));
    assert_eq!(class_of(&lab.out("out-a")), "canceled");
    assert!(
        results(&lab.out("out-a")).contains(&r("sleeper", "before", "pass")),
        "results recorded before the cancel are kept"
    );
    assert_eq!(
        lab.cmd(&["cancel", "sleeper"]).status.code(),
        Some(2),
        "nothing left to cancel"
    );
    assert!(
        String::from_utf8_lossy(&lab.cmd(&["list"]).stdout)
            .lines()
            .count()
            == 1
    );
    lab.cmd(&["lab", "down", "--lab", p(&lab.dir())]);
    lab.assert_nothing_left();
}

#[test]
fn repeat_reports_a_changing_result_as_flaky_and_a_steady_one_as_stable() {
    let lab = Lab::new();
    let devices = lab.up("boards: [{name: sim, kind: sim, count: 2}]\n");
    let counter = lab.tmp.path().join("counter");
    let job = lab.job(
        "coin.yaml",
        &format!(
            r#"job: coin
timeouts: {{job: 2m, test: 1m}}
test:
  definitions:
    - inline:
        metadata: {{format: Lava-Test Test Definition 1.0, name: coin}}
        run:
          steps:
            - lava-test-case steady --result pass
            - "n=$(cat {c} 2>/dev/null || echo 0); echo $((n + 1)) > {c}; if [ $((n % 2)) = 0 ]; then lava-test-case coin --result pass; else lava-test-case coin --result fail; fi"
"#,
            c = counter.display()
        ),
    );
    let out = lab.out("repeat");
    let run = lab
        .dispatcher()
        .args([
            "run",
            "--repeat",
            "5",
            "--device",
            p(&devices[0]),
            "--device",
            p(&devices[1]),
            "--output",
        ])
        .arg(&out)
        .arg(&job)
        .output()
        .expect("run");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let flakes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("flakes.json")).expect("flakes"))
            .expect("json");
    assert_eq!(flakes["runs"].as_array().map(Vec::len), Some(5));
    assert_eq!(flakes["flaky"], serde_json::json!(["coin/coin"]));
    let case = |name: &str| {
        flakes["cases"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name).cloned())
            .expect("case")
    };
    assert_eq!(case("steady")["flaky"], false);
    assert_eq!(case("steady")["pass_rate"], 1.0);
    assert_eq!(case("coin")["pass_rate"], 0.6);
    let boards: std::collections::BTreeSet<String> = case("coin")["seen"]
        .as_array()
        .expect("seen")
        .iter()
        .filter_map(|s| s["board"].as_str().map(str::to_string))
        .collect();
    assert_eq!(boards.len(), 2, "runs spread over both boards");
    assert!(std::fs::read_to_string(out.join("summary.txt"))
        .expect("summary")
        .contains("FLAKY"));
    lab.cmd(&["lab", "down", "--lab", p(&lab.dir())]);
    lab.assert_nothing_left();
}

#[test]
fn a_job_sharded_over_three_boards_returns_every_record_once() {
    let lab = Lab::new();
    let devices = lab.up("boards: [{name: sim, kind: sim, count: 3}]\n");
    let mut defs = String::new();
    for i in 1..=5 {
        defs.push_str(&format!(
            "    - inline:\n        metadata: {{format: Lava-Test Test Definition 1.0, name: d{i}}}\n        run:\n          steps:\n            - lava-test-case c{i} --result pass\n"
        ));
    }
    let job = lab.job(
        "wide.yaml",
        &format!("job: wide\ntimeouts: {{job: 2m, test: 1m}}\ntest:\n  definitions:\n{defs}"),
    );
    let out = lab.out("sharded");
    let run = lab
        .dispatcher()
        .args(["run", "--output"])
        .arg(&out)
        .arg("--shard-across")
        .args(&devices)
        .arg("--")
        .arg(&job)
        .output()
        .expect("run");
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stderr),
        dump(&out.join("shard-1"))
    );
    let text = std::fs::read_to_string(out.join("results.json")).expect("results");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).expect("json");
    let mut cases: Vec<String> = rows
        .iter()
        .filter(|r| r["suite"] != "lava")
        .map(|r| {
            format!(
                "{}/{}",
                r["suite"].as_str().unwrap_or(""),
                r["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    cases.sort();
    assert_eq!(cases, ["d1/c1", "d2/c2", "d3/c3", "d4/c4", "d5/c5"]);
    let boards: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["board"].as_str()).collect();
    assert_eq!(boards.len(), 3, "{text}");
    assert_eq!(class_of(&out), "complete");
    lab.cmd(&["lab", "down", "--lab", p(&lab.dir())]);
    lab.assert_nothing_left();
}
