//! Faults of the lab and of the test image on the simulated board: each ends
//! in its outcome class with the board off, nothing left running, and every
//! result recorded before the fault returned.

use std::path::Path;
use std::process::Command;

use ferry_tests::{bin, processes_mentioning, r, Row, SimBoard};

const JOB: &str = r#"job: faults
timeouts: {job: 2m, test: 6s}
# These faults are about the fetch through the master image.
records: {fetch: always}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: work}
        run:
          steps:
            - lava-test-case recorded --result pass
"#;

fn complete_results() -> Vec<Row> {
    vec![r("work", "recorded", "pass"), r("lava", "work", "pass")]
}

/// A board whose device file's power commands are edited by `edit`
/// (`ON`, `OFF` and `RESET` stand for the simulated board's own).
fn board_with_power(on: &str, off: &str, timeout: &str) -> SimBoard {
    SimBoard::with_device(|text| {
        let cmd = |action: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{action}: ")))
                .expect("example power command")
                .to_string()
        };
        let (real_on, real_off) = (cmd("on"), cmd("off"));
        text.replace(
            &format!("on: {real_on}"),
            &format!("on: {}", on.replace("ON", &real_on)),
        )
        .replace(
            &format!("off: {real_off}"),
            &format!("off: {}", off.replace("OFF", &real_off)),
        )
        .replace("power: 60s", &format!("power: {timeout}"))
    })
}

/// Nothing of the board, nor the marker a fault's process carries, is left.
fn assert_nothing_left(board: &SimBoard, marker: &str) {
    assert!(!board.powered(), "board left powered");
    let left = processes_mentioning(Path::new(marker));
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[test]
fn a_power_on_command_that_fails_is_an_infrastructure_error() {
    let board = board_with_power("exit 7", "OFF", "20s");
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("infrastructure-error");
    assert!(msg.contains("power on") && msg.contains('7'), "{msg}");
    assert_nothing_left(&board, "exit 7");
}

#[test]
fn a_power_on_command_that_hangs_is_killed_at_the_power_timeout() {
    let board = board_with_power("sleep 601", "OFF", "2s");
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("infrastructure-error");
    assert!(msg.contains("timed out"), "{msg}");
    assert_nothing_left(&board, "sleep 601");
}

#[test]
fn a_power_off_that_fails_keeps_every_result_but_is_an_infrastructure_error() {
    let board = board_with_power("ON", "OFF; exit 3", "20s");
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("infrastructure-error");
    assert!(msg.contains("results complete"), "{msg}");
    assert_eq!(run.results(), complete_results(), "{}", run.dump());
    assert!(!board.powered());
}

/// Prepares the board's folder and adds an init script to its test image.
fn with_test_init_script(board: &SimBoard, name: &str, body: &str) {
    let out = Command::new(bin("ferry-sim-board"))
        .arg("--board")
        .arg(&board.board)
        .arg("prepare")
        .output()
        .expect("prepare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = board.board.join("parts/testrootfs/etc/init.d").join(name);
    std::fs::write(&script, body).expect("script");
}

#[test]
fn a_test_image_that_never_boots_is_a_test_error_after_the_test_timeout() {
    let board = SimBoard::new();
    // Its init hangs before the test agent's turn: the image never comes up.
    with_test_init_script(&board, "S00hang", "sleep 602\n");
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("test-error");
    assert!(
        msg.contains("did not return within the test timeout"),
        "{msg}"
    );
    assert_eq!(
        run.results(),
        vec![r("lava", "work", "unknown")],
        "{}",
        run.dump()
    );
    assert_eq!(run.boot_roles(), ["master", "master"], "{}", run.dump());
    assert_nothing_left(&board, "sleep 602");
}

#[test]
fn a_board_that_returns_without_its_records_is_a_test_error() {
    let board = SimBoard::new();
    // After the test agent ran, something in the test image wipes the records.
    with_test_init_script(
        &board,
        "S99zz-wipe",
        "rm -rf \"$FERRY_ROOT/ferry/records\"\n",
    );
    let run = board.run(&board.job("f.yaml", JOB));
    let msg = run.expect_outcome("test-error");
    assert!(
        msg.contains("never running") || msg.contains("recorded nothing"),
        "{msg}"
    );
    assert_eq!(
        run.results(),
        vec![r("lava", "work", "unknown")],
        "{}",
        run.dump()
    );
    assert!(!board.powered());
}

/// A job whose test passes while the (simulated) kernel reports a WARNING
/// with its trace: the line goes to the kernel log the sim's test agent
/// reads, in `/dev/kmsg`'s `level,seq,usec,flags;text` form.
fn kernel_warning_job(health_check: bool) -> String {
    format!(
        r#"job: kernel
timeouts: {{job: 2m, test: 30s}}
health_check: {health_check}
test:
  definitions:
    - inline:
        metadata: {{format: Lava-Test Test Definition 1.0, name: work}}
        run:
          steps:
            - 'echo "4,3,5000000,-;WARNING: CPU: 0 PID: 1 at ferry/sim.c:1 ferry_warn+0x0/0x10" > "$FERRY_KMSG"'
            - 'echo "4,4,5000001,-;Call Trace:" > "$FERRY_KMSG"'
            - 'echo "4,5,5000002,-;---[ end trace 0000000000000000 ]---" > "$FERRY_KMSG"'
            - 'echo "6,6,5000003,-;random: quiet again" > "$FERRY_KMSG"'
            - sleep 1
            - lava-test-case recorded --result pass
"#
    )
}

#[test]
fn a_kernel_warning_is_a_failed_kernel_result_and_a_test_error_though_every_test_passed() {
    let board = SimBoard::new();
    let run = board.run(&board.job("k.yaml", &kernel_warning_job(true)));
    let msg = run.expect_outcome("test-error");
    assert!(
        msg.contains("kernel reported trouble") && msg.contains("ferry_warn"),
        "{msg}"
    );
    let mut want = complete_results();
    want.push(r("kernel", "warning", "fail"));
    assert_eq!(run.results(), want, "{}", run.dump());
    let rows = run.json("results.json");
    let kernel = rows
        .as_array()
        .and_then(|a| a.iter().find(|r| r["suite"] == "kernel"))
        .expect("kernel row");
    assert_eq!(
        kernel["message"].as_str(),
        Some("WARNING: CPU: 0 PID: 1 at ferry/sim.c:1 ferry_warn+0x0/0x10\nCall Trace:\n---[ end trace 0000000000000000 ]---"),
        "{kernel}"
    );
    let outcome = run.json("outcome.json");
    assert_eq!(
        outcome["failures"][0]["kind"], "kernel-trouble",
        "{outcome}"
    );
    assert_eq!(outcome["failures"][0]["phase"], "test", "{outcome}");
    // A health check whose kernel complained: the software's fault, not the board's.
    assert_eq!(outcome["health"]["health_check"], true, "{outcome}");
    assert_eq!(outcome["health"]["take_offline"], false, "{outcome}");
    assert_nothing_left(&board, "ferry_warn");
}

#[test]
fn a_health_check_whose_power_off_fails_takes_the_board_offline_a_normal_job_does_not() {
    let board = board_with_power("ON", "OFF; exit 3", "20s");
    for health_check in [true, false] {
        let job = format!("{JOB}health_check: {health_check}\n");
        let run = board.run(&board.job(&format!("h{health_check}.yaml"), &job));
        run.expect_outcome("infrastructure-error");
        let health = &run.json("outcome.json")["health"];
        assert_eq!(health["health_check"], health_check, "{health}");
        assert_eq!(health["take_offline"], health_check, "{health}");
        if health_check {
            let reason = health["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("power off"), "{health}");
        }
        assert_eq!(run.results(), complete_results(), "{}", run.dump());
    }
}

#[test]
fn a_reboot_ends_every_process_of_the_test_boot_even_one_in_its_own_session() {
    let board = SimBoard::new();
    // Two background processes left by a test: one in its own session (not
    // in the board's), one plain. Either, alive once the test boot is over
    // (its kernel log gone), leaves a file on the test partition.
    let job = r#"job: leftovers
timeouts: {job: 2m, test: 30s}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: work}
        run:
          steps:
            - 'setsid sh -c "while [ -p \"$FERRY_KMSG\" ]; do sleep 0.05; done; touch \"$FERRY_ROOT/survived-setsid\"" </dev/null >/dev/null 2>&1 &'
            - 'sh -c "while [ -p \"$FERRY_KMSG\" ]; do sleep 0.05; done; touch \"$FERRY_ROOT/survived-plain\"" </dev/null >/dev/null 2>&1 &'
            - lava-test-case recorded --result pass
"#;
    let run = board.run(&board.job("l.yaml", job));
    run.expect_outcome("complete");
    assert_eq!(run.results(), complete_results(), "{}", run.dump());
    // Power off also ends what is left: look only after the board's own
    // shutdown, for the files a survivor of the reboot would have made.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let root = board.board.join("parts/testrootfs");
    for name in ["survived-setsid", "survived-plain"] {
        assert!(
            !root.join(name).exists(),
            "{name}: a process outlived its boot"
        );
    }
    assert_nothing_left(&board, "survived-");
}

/// Starts `dispatcher run` of `job` on `board` in the background, writing to `out`.
fn spawn_dispatcher(board: &SimBoard, job: &Path, out: &Path) -> std::process::Child {
    ferry_tests::spawn_dispatch(&board.device, job, out, &[])
}

/// Waits (at most 60 s) until the run writing `out` entered `phase`.
fn wait_for_phase(out: &Path, phase: &str) {
    ferry_tests::wait_for_phase(out, phase, std::time::Duration::from_secs(60));
}

#[test]
fn a_dispatcher_killed_with_sigkill_leaves_a_marker_the_next_run_cleans_up_after() {
    let board = SimBoard::new();
    let slow = board.job(
        "slow.yaml",
        r#"job: killed
timeouts: {job: 2m, test: 60s}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: slow}
        run:
          steps:
            - sleep 607
"#,
    );
    let dead_out = board.tmp.path().join("out-killed");
    let mut dispatcher = spawn_dispatcher(&board, &slow, &dead_out);
    wait_for_phase(&dead_out, "test");
    dispatcher.kill().expect("SIGKILL");
    let _ = dispatcher.wait();
    // Nothing could clean up: the board is still on, running the test.
    assert!(
        board.powered(),
        "the killed dispatcher's board should still be on"
    );
    assert!(!dead_out.join("outcome.json").exists());

    let run = board.run(&board.job("next.yaml", JOB));
    run.expect_outcome("complete");
    assert_eq!(run.results(), complete_results(), "{}", run.dump());
    let events = run.text("events.jsonl");
    assert!(
        events.contains("\"kind\":\"stale-lock\"") && events.contains("\"job\":\"killed\""),
        "{events}"
    );
    let warnings = run.json("outcome.json")["warnings"].to_string();
    assert!(
        warnings.contains("broke a stale lock") && warnings.contains("board powered off"),
        "{warnings}"
    );
    // The dead job's folder got the outcome it never wrote.
    let dead: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dead_out.join("outcome.json")).expect("dead job's outcome"),
    )
    .expect("json");
    assert_eq!(dead["class"], "internal-error", "{dead}");
    assert!(
        dead["message"]
            .as_str()
            .is_some_and(|m| m.contains("killed during test")),
        "{dead}"
    );
    assert_nothing_left(&board, "sleep 607");
}

#[test]
fn a_hard_reset_loses_only_what_the_test_boot_never_synced() {
    let board = SimBoard::new();
    // The test resets its own board (as a watchdog or a PDU glitch would)
    // right after writing without a sync: a file of its own, and bytes at
    // the end of the test agent's records file, after everything the agent
    // wrote was synced (a quiet second: it syncs within 250 ms).
    let reset = format!(
        "{} --board {} reset",
        bin("ferry-sim-board").display(),
        board.board.display()
    );
    let job = format!(
        r#"job: unsynced
timeouts: {{job: 2m, test: 60s}}
test:
  definitions:
    - inline:
        metadata: {{format: Lava-Test Test Definition 1.0, name: work}}
        run:
          steps:
            - lava-test-case before-reset --result pass
            - echo synced | dd of="$FERRY_ROOT/synced.txt" conv=fsync 2>/dev/null
            - echo unsynced > "$FERRY_ROOT/unsynced.txt"
            - sleep 1
            - printf 'NEVER-SYNCED' >> "$FERRY_RECORDS" && {reset}
            - sleep 608
"#
    );
    let run = board.run(&board.job("u.yaml", &job));
    let msg = run.expect_outcome("test-error");
    assert!(msg.contains("did not finish"), "{msg}");
    // Every result synced before the reset is there; no gap in the records.
    assert_eq!(
        run.results(),
        vec![
            r("work", "before-reset", "pass"),
            r("lava", "work", "unknown")
        ],
        "{}",
        run.dump()
    );
    let outcome = run.json("outcome.json");
    assert!(
        !outcome["warnings"].to_string().contains("records"),
        "{outcome}"
    );
    let fetched = std::fs::read(run.dir.join("board/agent-0000.ferryrec")).expect("records");
    assert!(
        !fetched.windows(12).any(|w| w == b"NEVER-SYNCED"),
        "unsynced bytes survived the reset"
    );
    let root = board.board.join("parts/testrootfs");
    assert_eq!(
        std::fs::read_to_string(root.join("synced.txt"))
            .ok()
            .as_deref(),
        Some("synced\n")
    );
    assert!(
        !root.join("unsynced.txt").exists(),
        "a never-synced file survived"
    );
    assert!(
        run.text("console.log").contains("lost unsynced writes"),
        "{}",
        run.dump()
    );
    assert_nothing_left(&board, "sleep 608");
}

/// The job `JOB` with `extra` keys added.
fn job_with(extra: &str) -> String {
    format!("{JOB}{extra}")
}

/// The master agent of the board's running boot, killed with SIGKILL.
fn kill_master_agent(board: &SimBoard) {
    let config = board.board.join("master-agent.yaml");
    let pids = processes_mentioning(&config);
    assert!(!pids.is_empty(), "no master agent running");
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// `(step, attempt, ok)` of every `attempt` event.
fn attempts(run: &ferry_tests::Run) -> Vec<(String, u64, bool)> {
    run.text("events.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["kind"] == "attempt")
        .map(|e| {
            (
                e["step"].as_str().unwrap_or_default().to_string(),
                e["attempt"].as_u64().unwrap_or_default(),
                e["ok"].as_bool().unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn a_power_on_that_fails_once_is_retried_as_the_job_asks() {
    // Lower case only: `board_with_power` replaces `ON`.
    let mark = format!(
        "/tmp/ferry-faults-power-once-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let board = board_with_power(
        &format!("if [ -e {mark} ]; then ON; else touch {mark}; exit 9; fi"),
        "OFF",
        "20s",
    );
    let job = job_with("retries: {power: {attempts: 2, interval: 100ms}}\n");
    let run = board.run(&board.job("p.yaml", &job));
    run.expect_outcome("complete");
    assert_eq!(run.results(), complete_results(), "{}", run.dump());
    let a = attempts(&run);
    assert_eq!(
        a.iter()
            .filter(|(s, _, _)| s == "power")
            .collect::<Vec<_>>(),
        [
            &("power".to_string(), 1, false),
            &("power".to_string(), 2, true)
        ],
        "{a:?}"
    );
    let warnings = run.json("outcome.json")["warnings"].to_string();
    assert!(
        warnings.contains("power attempt 1 of 2 failed"),
        "{warnings}"
    );
    assert!(!board.powered());
    let _ = std::fs::remove_file(&mark);
}

#[test]
fn a_master_agent_killed_before_the_fetch_is_retried_after_a_hard_reset() {
    let board = SimBoard::new();
    // The dispatcher stops on entering the fetch; the test kills the master
    // agent then, so the fetch meets a dead agent.
    let out = board.tmp.path().join("out-killed-fetch");
    let job = board.job(
        "kf.yaml",
        &job_with("retries: {fetch: {attempts: 2, interval: 0s}}\n"),
    );
    let child = ferry_tests::spawn_dispatch(
        &board.device,
        &job,
        &out,
        &[("FERRY_DISPATCHER_PAUSE_AT", "fetching results:2")],
    );
    wait_for_phase(&out, "fetching results");
    kill_master_agent(&board);
    let output = child.wait_with_output().expect("wait");
    let run = ferry_tests::Run { output, dir: out };
    run.expect_outcome("complete");
    assert_eq!(run.results(), complete_results(), "{}", run.dump());
    let fetches: Vec<_> = attempts(&run)
        .into_iter()
        .filter(|(s, _, _)| s == "fetch")
        .collect();
    assert_eq!(
        fetches,
        [
            ("fetch".to_string(), 1, false),
            ("fetch".to_string(), 2, true)
        ],
        "{}",
        run.dump()
    );
    assert_nothing_left(&board, "kf.yaml");
}

/// A job whose test step sleeps after recording a result.
const SLEEPING_JOB: &str = r#"job: cancel
timeouts: {job: 2m, test: 60s}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: work}
        run:
          steps:
            - lava-test-case recorded --result pass
            - sleep 609
"#;

/// Runs `job`, pausing on entering `phase` (with `pause`), sends SIGTERM
/// once there, and checks the job ends canceled
/// within 5 s with the board off and nothing left.
fn cancel_in(phase: &str, pause: bool, job: &str) -> (SimBoard, ferry_tests::Run) {
    let board = SimBoard::new();
    let job = board.job("c.yaml", job);
    let out = board.tmp.path().join("out-cancel");
    let pause_at = format!("{phase}:60");
    let env: &[(&str, &str)] = if pause {
        &[("FERRY_DISPATCHER_PAUSE_AT", &pause_at)]
    } else {
        &[]
    };
    let child = ferry_tests::spawn_dispatch(&board.device, &job, &out, env);
    wait_for_phase(&out, phase);
    if phase == "test" {
        // Until the result is on the board: lava-test-case syncs its record
        // before it prints its signal line, which the console mirrors (a
        // console event in events.jsonl).
        ferry_tests::wait_for_event(
            &out,
            "TEST_CASE_ID=recorded",
            "the test's recorded result",
            std::time::Duration::from_secs(60),
        );
    }
    let sent = std::time::Instant::now();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let output = child.wait_with_output().expect("wait");
    let took = sent.elapsed();
    eprintln!("canceled in {phase} after {took:?}");
    let run = ferry_tests::Run { output, dir: out };
    let msg = run.expect_outcome("canceled");
    assert!(msg.contains("SIGTERM"), "{msg}");
    assert!(
        took < std::time::Duration::from_secs(5),
        "canceling in {phase} took {took:?}"
    );
    assert_nothing_left(&board, "sleep 609");
    assert!(
        processes_mentioning(&board.tmp.path().join("jobs")).is_empty(),
        "a dispatcher process is left"
    );
    (board, run)
}

#[test]
fn cancel_while_booting_ends_within_5s_with_the_board_off() {
    let (_board, run) = cancel_in("waiting for the master agent", true, SLEEPING_JOB);
    assert_eq!(run.results(), vec![], "{}", run.dump());
}

#[test]
fn cancel_during_deploy_ends_within_5s_with_the_board_off() {
    let (_board, run) = cancel_in("deploy", true, SLEEPING_JOB);
    assert_eq!(run.results(), vec![], "{}", run.dump());
}

#[test]
fn cancel_during_the_test_keeps_what_was_recorded_and_ends_within_5s() {
    let (_board, run) = cancel_in("test", false, SLEEPING_JOB);
    assert_eq!(
        run.results(),
        vec![r("work", "recorded", "pass"), r("lava", "work", "unknown")],
        "{}",
        run.dump()
    );
}

#[test]
fn cancel_during_the_fetch_still_fetches_and_ends_within_5s() {
    // Paused on entering the fetch, after a test boot that finished: the
    // records are fetched on the way out (reset, then fetch).
    let (_board, run) = cancel_in("fetching results", true, JOB);
    assert_eq!(run.results(), complete_results(), "{}", run.dump());
}

/// A TCP proxy between the dispatcher and the board's master agent that the
/// test controls: it forwards at most `rate` bytes a second each way, and
/// [`Proxy::cut`] drops the network under the connections open then (their
/// bytes stop flowing, nothing is closed: a pulled cable); connections
/// made later go through.
struct Proxy {
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    fn start(listen: std::net::SocketAddr, to: std::net::SocketAddr, rate: usize) -> Proxy {
        use std::sync::atomic::Ordering;
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let listener = std::net::TcpListener::bind(listen).expect("proxy listens");
        let g = generation.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(board) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                let mine = g.load(Ordering::SeqCst);
                for (mut from, mut into) in [
                    (client.try_clone(), board.try_clone()),
                    (board.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let g = g.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let Ok(n) = from.read(&mut buf) else { return };
                            if n == 0 {
                                let _ = into.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            if g.load(Ordering::SeqCst) != mine {
                                // Cut: swallow everything, send nothing.
                                continue;
                            }
                            if into.write_all(&buf[..n]).is_err() {
                                return;
                            }
                            std::thread::sleep(std::time::Duration::from_secs_f64(
                                n as f64 / rate as f64,
                            ));
                        }
                    });
                }
            }
        });
        Proxy { generation }
    }

    fn cut(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A prepared board whose master agent announces 127.0.0.2 (same port),
/// where a [`Proxy`] to its real address listens; the dispatcher finds a
/// dead connection within 2 s.
fn board_behind_proxy(rate: usize) -> (SimBoard, Proxy) {
    let board = SimBoard::with_device(|d| {
        d.replace(
            "  fetch: 60s\n",
            "  fetch: 60s\n  keepalive: 2s\n  fetch_idle: 3s\n",
        )
    });
    with_test_init_script(&board, "S00nothing", "true\n");
    let config = board.board.join("master-agent.yaml");
    let text = std::fs::read_to_string(&config).expect("agent config");
    let listen: std::net::SocketAddr = text
        .lines()
        .find_map(|l| l.strip_prefix("listen: "))
        .and_then(|a| a.trim().parse().ok())
        .expect("listen address");
    std::fs::write(&config, format!("{text}advertise: 127.0.0.2\n")).expect("advertise");
    let proxy = Proxy::start(
        std::net::SocketAddr::new([127, 0, 0, 2].into(), listen.port()),
        listen,
        rate,
    );
    (board, proxy)
}

/// Runs `job` on `board` in the background; once the run entered `phase`
/// and `after` passed, cuts the proxy's connections; returns the run.
fn run_cutting(
    board: &SimBoard,
    proxy: &Proxy,
    job: &Path,
    phase: &str,
    after: std::time::Duration,
) -> ferry_tests::Run {
    let out = board.tmp.path().join(format!(
        "out-{}",
        job.file_stem().and_then(|s| s.to_str()).unwrap_or("cut")
    ));
    let child = spawn_dispatcher(board, job, &out);
    wait_for_phase(&out, phase);
    std::thread::sleep(after);
    proxy.cut();
    let output = child.wait_with_output().expect("wait");
    ferry_tests::Run { output, dir: out }
}

#[test]
fn the_network_dropped_mid_deploy_is_an_infrastructure_error_with_the_board_off() {
    let (board, proxy) = board_behind_proxy(2 << 20);
    // 12 MiB that do not compress: 6 s through the proxy.
    let dir = board.tmp.path().join("jobs");
    std::fs::create_dir_all(&dir).expect("jobs");
    let image = dir.join("big.img");
    let mut data = vec![0u8; 12 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&image, &data).expect("image");
    let sha = ferry_tests::sha256_hex(&data);
    let job = board.job(
        "deploy-cut.yaml",
        &format!(
            "{JOB}deploy:\n  - image: big.img\n    to: firmware\n    compression: none\n    sha256: {sha}\n"
        ),
    );
    let started = std::time::Instant::now();
    let run = run_cutting(
        &board,
        &proxy,
        &job,
        "deploy",
        std::time::Duration::from_secs(1),
    );
    let msg = run.expect_outcome("infrastructure-error");
    eprintln!("network cut mid-deploy: {msg} ({:?})", started.elapsed());
    let outcome = run.json("outcome.json");
    assert_eq!(outcome["failures"][0]["phase"], "deploy", "{outcome}");
    assert_eq!(outcome["failures"][0]["kind"], "agent", "{outcome}");
    assert_eq!(run.results(), vec![], "{}", run.dump());
    assert_nothing_left(&board, "deploy-cut.yaml");
}

#[test]
fn the_network_dropped_mid_fetch_loses_no_result() {
    // Heavy output: 16 MB of records, 8 s through the proxy.
    let job_text = format!(
        "{}            - yes {} | head -c 12000000\n",
        JOB,
        "0123456789".repeat(10).get(..99).unwrap_or_default()
    );
    for (attempts, class) in [(2, "complete"), (1, "infrastructure-error")] {
        let (board, proxy) = board_behind_proxy(2 << 20);
        let job = board.job(
            &format!("fetch-cut-{attempts}.yaml"),
            &format!("{job_text}retries: {{fetch: {{attempts: {attempts}, interval: 0s}}}}\n"),
        );
        let run = run_cutting(
            &board,
            &proxy,
            &job,
            "fetching results",
            std::time::Duration::from_secs(2),
        );
        let msg = run.expect_outcome(class);
        eprintln!("network cut mid-fetch, {attempts} attempt(s): {class}: {msg}");
        // Fetched again whole after a hard reset: by the retry, or on the
        // way out of a failed job.
        assert_eq!(run.results(), complete_results(), "{}", run.dump());
        let out = std::fs::metadata(run.dir.join("test-output/work.stdout")).expect("output");
        let text = std::fs::read(run.dir.join("test-output/work.stdout")).expect("output");
        let signal = b"<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=recorded RESULT=pass>\n".len() as u64;
        assert_eq!(
            out.len(),
            signal + 12_000_000,
            "all the output came back: {:?}",
            String::from_utf8_lossy(&text[..200.min(text.len())])
        );
        assert_nothing_left(&board, "fetch-cut");
    }
}

#[test]
fn a_test_agent_killed_mid_record_under_heavy_output_keeps_every_synced_result() {
    let board = SimBoard::new();
    let job = board.job(
        "heavy.yaml",
        r#"job: heavy
timeouts: {job: 2m, test: 60s}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: work}
        run:
          steps:
            - lava-test-case before --result pass
            - yes 0123456789abcdef0123456789abcdef0123456789abcdef | head -c 400000000
            - lava-test-case never --result pass
"#,
    );
    let out = board.tmp.path().join("out-heavy");
    let child = spawn_dispatcher(&board, &job, &out);
    wait_for_phase(&out, "test");
    // Once the output flows, kill the test agent (not its steps).
    let agent = board.board.join("parts/testrootfs/ferry/bin/test-agent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let pids = loop {
        let pids = processes_mentioning(&agent);
        if !pids.is_empty() || std::time::Instant::now() > deadline {
            break pids;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!pids.is_empty(), "the test agent never ran");
    std::thread::sleep(std::time::Duration::from_millis(700));
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let output = child.wait_with_output().expect("wait");
    let run = ferry_tests::Run { output, dir: out };
    let msg = run.expect_outcome("test-error");
    assert!(msg.contains("did not finish"), "{msg}");
    assert_eq!(
        run.results(),
        vec![r("work", "before", "pass"), r("lava", "work", "unknown")],
        "{}",
        run.dump()
    );
    assert_nothing_left(&board, "heavy.yaml");
}

/// One timeout kind: its class, its failure kind and phase in `outcome.json`.
fn expect_timeout(run: &ferry_tests::Run, class: &str, kind: &str, phase: &str) -> String {
    let msg = run.expect_outcome(class);
    let first = &run.json("outcome.json")["failures"][0];
    assert_eq!(
        (first["kind"].as_str(), first["phase"].as_str()),
        (Some(kind), Some(phase)),
        "{first}"
    );
    msg
}

#[test]
fn the_job_timeout_during_the_test_is_a_test_error_that_keeps_the_results() {
    let board = SimBoard::new();
    let job = board.job(
        "jt.yaml",
        &SLEEPING_JOB.replace(
            "timeouts: {job: 2m, test: 60s}",
            "timeouts: {job: 6s, test: 60s}",
        ),
    );
    let run = board.run(&job);
    let msg = expect_timeout(&run, "test-error", "job-timeout", "test");
    assert!(msg.contains("job timeout"), "{msg}");
    assert_eq!(
        run.results(),
        vec![r("work", "recorded", "pass"), r("lava", "work", "unknown")],
        "{}",
        run.dump()
    );
    assert_nothing_left(&board, "sleep 609");
}

#[test]
fn the_job_timeout_while_booting_is_an_infrastructure_error() {
    let board = SimBoard::new();
    let job = board.job(
        "jb.yaml",
        &JOB.replace(
            "timeouts: {job: 2m, test: 6s}",
            "timeouts: {job: 3s, test: 6s}",
        ),
    );
    let run = board.run_env(
        &job,
        &[(
            "FERRY_DISPATCHER_PAUSE_AT",
            "waiting for the master agent:30",
        )],
    );
    expect_timeout(&run, "infrastructure-error", "job-timeout", "boot");
    assert_nothing_left(&board, "jb.yaml");
}

#[test]
fn a_console_that_cannot_be_opened_is_an_infrastructure_error_at_the_console_timeout() {
    let board = SimBoard::with_device(|d| {
        d.replace("  console: 10s\n", "  console: 1s\n")
            .replace("/console\n", "/no-such-console\n")
    });
    let run = board.run(&board.job("nc.yaml", JOB));
    let msg = expect_timeout(&run, "infrastructure-error", "console", "power");
    assert!(msg.contains("cannot open console"), "{msg}");
    assert_nothing_left(&board, "nc.yaml");
}
