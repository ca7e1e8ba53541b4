//! End to end on the simulated board: the real dispatcher, master agent and
//! test agent as separate processes, talking over a pty and gRPC.

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::{bin, r, smoke_job_results, workspace, Run, SimBoard};
use sha2::{Digest, Sha256};

#[test]
fn smoke_job_runs_end_to_end_with_exact_results() {
    let board = SimBoard::new();
    let run = board.run(&workspace().join("examples/jobs/smoke.yaml"));
    run.expect_outcome("complete");
    assert_eq!(run.results(), smoke_job_results(), "{}", run.dump());
    let rss = run.json("outcome.json")["dispatcher_peak_rss_kib"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        rss > 1024,
        "the dispatcher reports its own peak memory: {rss} KiB"
    );
    let measured = &run.json("results.json")[2];
    assert_eq!(measured["measurement"], 0.1);
    assert_eq!(measured["units"], "seconds");
    assert_eq!(measured["set"], "timing");

    let junit = run.text("junit.xml");
    assert!(
        junit.contains(
            "<testsuites name=\"smoke\" tests=\"9\" failures=\"1\" errors=\"1\" skipped=\"1\">"
        ),
        "{junit}"
    );
    assert!(
        junit.contains(
            "<testsuite name=\"checks\" tests=\"3\" failures=\"1\" errors=\"1\" skipped=\"0\">"
        ),
        "{junit}"
    );

    // The live record stream brought every record: no boot to fetch them.
    assert_eq!(run.boot_roles(), ["master", "test"], "{}", run.dump());
    assert!(run.text("events.jsonl").contains("\"stream-kept\""));

    // The firmware image landed, decompressed, on its partition.
    let part = std::fs::read(board.board.join("parts/firmware")).expect("firmware partition");
    assert_eq!(
        format!("{:x}", Sha256::digest(&part[..1 << 20])),
        "73104fe9b6e01a37c714c5314a79ba6ac980aca296cdc8c365bff0f2706a2e56"
    );
    // Every console byte is in the log, every output line in the events,
    // and each definition's output, exact, in test-output/.
    assert!(run.text("console.log").contains("FERRY-AGENT role=test"));
    assert!(run.text("events.jsonl").contains("hello from Linux\\n"));
    assert!(run
        .text("test-output/smoke.stdout")
        .contains("hello from Linux\n"));
    assert!(String::from_utf8_lossy(&run.output.stdout).contains("complete (exit 0)"));
    // Where the time went: every phase of a whole run (the simulated board
    // prints a kernel banner too).
    let phases = &run.json("outcome.json")["phases"];
    for p in [
        "power_to_kernel",
        "kernel_to_master",
        "power_to_master",
        "deploy",
        "reboot_to_test",
        "test",
        "stream_end",
    ] {
        assert!(
            phases[p].as_f64().is_some_and(|s| s >= 0.0),
            "{p}: {phases}"
        );
    }
    assert!(
        String::from_utf8_lossy(&run.output.stdout).contains("\n  phases: power-on > kernel "),
        "{}",
        run.dump()
    );
    assert!(
        !board.powered(),
        "the board must be powered off after the job"
    );
}

#[test]
fn a_definition_failing_midway_ends_it_and_the_next_one_runs() {
    let board = SimBoard::new();
    let job = board.job(
        "midway.yaml",
        r#"job: midway
timeouts: {job: 2m, test: 1m}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: breaks}
        run:
          steps:
            - lava-test-case before --result pass
            - "false"
            - lava-test-case after --result pass
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: next}
        run: {steps: ["lava-test-case runs --result pass"]}
"#,
    );
    // Twice into the same output folder, on the same board: each run's
    // results are its own (the board's and the folder's old records are gone).
    for _ in 0..2 {
        let run = board.run(&job);
        run.expect_outcome("complete");
        assert_eq!(
            run.results(),
            vec![
                r("breaks", "before", "pass"),
                r("next", "runs", "pass"),
                r("lava", "breaks", "fail"),
                r("lava", "next", "pass")
            ],
            "{}",
            run.dump()
        );
        assert!(!board.powered());
    }
}

#[test]
fn an_unknown_key_is_a_job_error_naming_file_line_and_key() {
    let board = SimBoard::new();
    let job = board.job(
        "typo.yaml",
        "job: typo\ntimeouts: {job: 1m}\ntset:\n  definitions: []\n",
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("job-error");
    assert!(
        msg.contains("typo.yaml:3:1") && msg.contains("unknown field `tset`"),
        "{msg}"
    );
    assert!(String::from_utf8_lossy(&run.output.stdout).contains("unknown field `tset`"));
    assert_eq!(run.json("results.json"), serde_json::json!([]));
    assert!(!board.powered(), "a job error must not leave the board on");
}

#[test]
fn an_unreachable_console_is_an_infrastructure_error() {
    let board = SimBoard::with_device(|d| {
        d.replace("tty: ", "tty: /nonexistent/ferry-console # was: ")
            .replace("console: 10s", "console: 1s")
    });
    let job = board.job("any.yaml", "job: any\n");
    let run = board.run(&job);
    let msg = run.expect_outcome("infrastructure-error");
    assert!(msg.contains("cannot open console"), "{}", run.dump());
    assert!(!board.powered(), "powered off on the error path too");
}

#[test]
fn a_hung_test_image_is_hard_reset_and_earlier_results_are_kept() {
    let board = SimBoard::new();
    let job = board.job(
        "hang.yaml",
        r#"job: hang
timeouts: {job: 2m, test: 4s}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: hangs}
        run:
          steps:
            - lava-test-case recorded --result pass
            - sleep 600
      timeout: 10m
"#,
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("test-error");
    assert!(msg.contains("hard reset"), "{}", run.dump());
    assert_eq!(
        run.results(),
        vec![
            r("hangs", "recorded", "pass"),
            r("lava", "hangs", "unknown")
        ],
        "{}",
        run.dump()
    );
    assert_eq!(run.boot_roles(), ["master", "test", "master"]);
    assert!(run.text("console.log").contains("hard reset"));
    assert!(!board.powered());
}

#[test]
fn sigterm_cancels_powers_off_and_keeps_the_output() {
    let board = SimBoard::new();
    let job = board.job(
        "long.yaml",
        "job: long\ntest:\n  definitions:\n    - inline:\n        metadata: {format: Lava-Test Test Definition 1.0, name: slow}\n        run: {steps: [\"sleep 600\"]}\n",
    );
    let out = board.tmp.path().join("out-cancel");
    let mut child = Command::new(ferry_tests::bin("dispatcher"))
        .arg("run")
        .arg("--device")
        .arg(&board.device)
        .arg("--output")
        .arg(&out)
        .arg(&job)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until the test image is running, then cancel.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&std::fs::read(out.join("console.log")).unwrap_or_default())
        .contains("role=test")
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("test image never started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let output = child.wait_with_output().expect("output");
    let run = Run { output, dir: out };
    let msg = run.expect_outcome("canceled");
    assert!(msg.contains("SIGTERM"), "{msg}");
    assert!(!board.powered(), "canceled jobs power the board off");
}

#[test]
fn an_image_that_does_not_match_its_sha256_is_a_job_error_and_never_booted() {
    let board = SimBoard::new();
    let image = workspace().join("examples/jobs/images/firmware.img.gz");
    let job = board.job(
        "badsum.yaml",
        &format!(
            "job: badsum\ndeploy:\n  - image: {}\n    to: firmware\n    sha256: {}\ntest:\n  definitions:\n    - path: {}\n",
            image.display(),
            "ab".repeat(32),
            workspace().join("examples/jobs/defs/smoke.yaml").display()
        ),
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("job-error");
    assert!(
        msg.contains(&"ab".repeat(32)) && msg.contains("55376c69c6e1"),
        "both hashes: {msg}"
    );
    assert_eq!(
        run.boot_roles(),
        ["master"],
        "the test image must not be booted"
    );
    let part = std::fs::read(board.board.join("parts/firmware")).expect("partition");
    assert!(
        part[..1 << 20].iter().all(|b| *b == 0),
        "the partition is invalidated, not half-written"
    );
    assert!(!board.powered());
}

#[test]
fn deploy_progress_is_recorded_in_events_with_the_last_at_every_byte() {
    let board = SimBoard::new();
    let image = workspace().join("examples/jobs/images/firmware.img.gz");
    let total = std::fs::metadata(&image).expect("image").len();
    let job = board.job(
        "progress.yaml",
        &format!(
            "job: progress\ndeploy:\n  - image: {}\n    to: firmware\n    sha256: 55376c69c6e130098e3bb28ef20af97ef9a78f720015cc5d216dae90d85865ca\n",
            image.display()
        ),
    );
    let run = board.run(&job);
    run.expect_outcome("complete");
    let progress: Vec<serde_json::Value> = run
        .text("events.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["kind"] == "deploy-progress")
        .collect();
    let last = progress.last().expect("progress events");
    assert_eq!(
        (
            last["stage"].as_str(),
            last["bytes_received"].as_u64(),
            last["source_size"].as_u64(),
            last["percent"].as_u64()
        ),
        (Some("done"), Some(total), Some(total), Some(100)),
        "{last}"
    );
    assert!(last["mib_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{last}");
    assert_eq!(last["to"], "firmware");
}

#[test]
fn a_medium_that_changes_a_byte_fails_readback_before_any_boot_naming_both_hashes() {
    let board = SimBoard::new();
    let prepared = Command::new(bin("ferry-sim-board"))
        .arg("--board")
        .arg(&board.board)
        .arg("prepare")
        .status()
        .expect("ferry-sim-board prepare");
    assert!(prepared.success());
    // The simulated medium flips a byte after the image is written and synced.
    let config = board.board.join("master-agent.yaml");
    let text = std::fs::read_to_string(&config).expect("agent config");
    std::fs::write(&config, format!("{text}    readback_fault: 5000\n")).expect("agent config");
    let image = workspace().join("examples/jobs/images/firmware.img.gz");
    let decoded = {
        use std::io::Read;
        let mut d = flate2::read::GzDecoder::new(std::fs::File::open(&image).expect("image"));
        let mut v = Vec::new();
        d.read_to_end(&mut v).expect("gunzip");
        v
    };
    let decoded_sha = ferry_proto::hex(&Sha256::digest(&decoded));
    let job = board.job(
        "readback.yaml",
        &format!(
            "job: readback\ndeploy:\n  - image: {}\n    to: firmware\n    sha256: 55376c69c6e130098e3bb28ef20af97ef9a78f720015cc5d216dae90d85865ca\n    verify: readback\ntest:\n  definitions:\n    - path: {}\n",
            image.display(),
            workspace().join("examples/jobs/defs/smoke.yaml").display()
        ),
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("infrastructure-error");
    assert!(msg.contains("read back"), "{msg}");
    assert!(
        msg.contains(&decoded_sha),
        "the written image's hash: {msg}"
    );
    let actual = msg
        .split("has sha256 ")
        .nth(1)
        .and_then(|s| s.get(..64))
        .unwrap_or_default();
    assert!(
        ferry_proto::is_sha256(actual) && actual != decoded_sha,
        "the read-back hash: {msg}"
    );
    assert_eq!(
        run.boot_roles(),
        ["master"],
        "the test image must not be booted"
    );
    let part = std::fs::read(board.board.join("parts/firmware")).expect("partition");
    assert!(
        part[..1 << 20].iter().all(|b| *b == 0),
        "the partition is invalidated"
    );
}

#[test]
fn a_killed_test_agent_is_a_test_error_and_its_records_are_kept() {
    let board = SimBoard::new();
    let job = board.job(
        "killed.yaml",
        r#"job: killed
timeouts: {test: 1m}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: dies}
        run:
          steps:
            - lava-test-case first --result pass
            - lava-test-case second --result fail
            - kill -9 $PPID
            - sleep 5
"#,
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("test-error");
    assert!(msg.contains("did not finish"), "{}", run.dump());
    assert_eq!(
        run.results(),
        vec![
            r("dies", "first", "pass"),
            r("dies", "second", "fail"),
            r("lava", "dies", "unknown")
        ],
        "{}",
        run.dump()
    );
    assert!(!board.powered());
}

#[test]
fn a_console_that_closes_mid_test_is_an_infrastructure_error() {
    let board = SimBoard::new();
    // The step cuts the board's power from inside: its console goes away.
    let off = format!(
        "{} --board {} off",
        ferry_tests::bin("ferry-sim-board").display(),
        board.board.display()
    );
    let job = board.job(
        "cut.yaml",
        &format!(
            "job: cut\ntimeouts: {{test: 1m}}\ntest:\n  definitions:\n    - inline:\n        metadata: {{format: Lava-Test Test Definition 1.0, name: cut}}\n        run: {{steps: [\"lava-test-case before --result pass\", \"{off}\"]}}\n"
        ),
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("infrastructure-error");
    assert!(msg.contains("console closed"), "{}", run.dump());
    // The board was brought back and what was recorded before the cut returned.
    assert_eq!(
        run.results(),
        vec![r("cut", "before", "pass"), r("lava", "cut", "unknown")],
        "{}",
        run.dump()
    );
    assert_eq!(run.boot_roles(), ["master", "test", "master"]);
    assert!(!board.powered());
}

/// The smoke job with the console behind ser2net, raw or telnet.
fn through_ser2net(telnet: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut port = 0;
    let mut server = None;
    let (key, label) = if telnet {
        ("telnet", "telnet serial server")
    } else {
        ("tcp", "TCP serial server")
    };
    let board = SimBoard::with_device(|d| {
        let tty_line = d
            .lines()
            .find(|l| l.trim_start().starts_with("tty: "))
            .expect("tty line")
            .to_string();
        let tty = std::path::PathBuf::from(tty_line.trim_start().trim_start_matches("tty: "));
        let (s, p) = ferry_tests::Ser2net::start(tmp.path(), &tty, telnet);
        server = Some(s);
        port = p;
        d.replace(&tty_line, &format!("  {key}: 127.0.0.1:{p}"))
            .replace("  baud: 115200\n", "")
    });
    let run = board.run(&workspace().join("examples/jobs/smoke.yaml"));
    run.expect_outcome("complete");
    assert_eq!(run.results(), smoke_job_results(), "{}", run.dump());
    assert!(run
        .text("events.jsonl")
        .contains(&format!("{label} 127.0.0.1:{port}")));
    drop(server);
    assert!(!board.powered());
}

#[test]
fn the_console_can_be_reached_through_ser2net_raw() {
    through_ser2net(false);
}

#[test]
fn the_console_can_be_reached_through_ser2net_telnet() {
    through_ser2net(true);
}

#[test]
fn hostile_records_are_refused_with_warnings_and_the_job_completes() {
    let board = SimBoard::new();
    let job = board.job(
        "hostile.yaml",
        r#"job: hostile
timeouts: {test: 1m}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: hostile}
        run:
          steps:
            - d=$(dirname "$FERRY_RECORDS"); mkfifo "$d/fifo"; ln -s /etc/passwd "$d/passwd"; printf '\303\050\377' > "$d/junk.bin"
            - printf 'not a record \377\n' >> "$FERRY_RECORDS"
            - lava-test-case after --result pass
"#,
    );
    let run = board.run(&job);
    run.expect_outcome("complete");
    assert_eq!(
        run.results(),
        vec![r("hostile", "after", "pass"), r("lava", "hostile", "pass")],
        "{}",
        run.dump()
    );
    let warnings = run.json("outcome.json")["warnings"].to_string();
    assert!(
        warnings.contains("\\\"fifo\\\" not fetched: a FIFO")
            && warnings.contains("\\\"passwd\\\" not fetched: a symlink"),
        "{warnings}"
    );
    assert!(run.text("events.jsonl").contains("warning: board record"));
    assert_eq!(
        std::fs::read(run.dir.join("board/junk.bin")).expect("fetched"),
        [0xc3, 0x28, 0xff],
        "other files come back byte-exact"
    );
}

#[test]
fn a_definition_over_its_output_quota_completes_with_the_truncation_recorded() {
    let board = SimBoard::new();
    let job = board.job(
        "quota.yaml",
        r#"job: quota
timeouts: {job: 2m, test: 1m}
quotas: {definition_output: 64KiB}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: noisy}
        run:
          steps:
            - lava-test-case before --result pass
            - yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 1000000
            - lava-test-case after --result pass
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: next}
        run: {steps: ["echo still here", "lava-test-case later --result pass"]}
"#,
    );
    let run = board.run(&job);
    run.expect_outcome("complete");
    assert_eq!(
        run.results(),
        vec![
            r("noisy", "before", "pass"),
            r("noisy", "after", "pass"),
            r("next", "later", "pass"),
            r("lava", "noisy", "pass"),
            r("lava", "next", "pass")
        ],
        "{}",
        run.dump()
    );
    // Exactly the quota was kept, and outcome.json says how much was not.
    let kept = std::fs::read(run.dir.join("test-output/noisy.stdout")).expect("output");
    assert_eq!(kept.len(), 64 << 10);
    let warnings = run.json("outcome.json")["warnings"].to_string();
    assert!(
        warnings.contains("definition noisy:") && warnings.contains("output quota"),
        "{warnings}\n{}",
        run.dump()
    );
    assert!(run
        .text("test-output/next.stdout")
        .starts_with("still here\n"));
    assert!(!board.powered());
}

#[test]
fn floods_of_two_byte_lines_and_binary_output_come_back_byte_exact() {
    let board = SimBoard::new();
    let job = board.job(
        "bytes.yaml",
        r#"job: bytes
timeouts: {job: 2m, test: 1m}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: bytes}
        run:
          steps:
            - yes | head -c 2000000
            - i=0; while [ $i -lt 256 ]; do printf "\\$(printf %o $i)"; i=$((i+1)); done >&2
            - lava-test-case done --result pass
"#,
    );
    let run = board.run(&job);
    run.expect_outcome("complete");
    assert_eq!(
        run.results(),
        vec![r("bytes", "done", "pass"), r("lava", "bytes", "pass")],
        "{}",
        run.dump()
    );
    let mut expected = b"y\n".repeat(1_000_000);
    expected.extend_from_slice(b"<LAVA_SIGNAL_TESTCASE TEST_CASE_ID=done RESULT=pass>\n");
    let stdout = std::fs::read(run.dir.join("test-output/bytes.stdout")).expect("stdout");
    assert_eq!(stdout.len(), expected.len());
    assert!(stdout == expected, "stdout differs");
    let stderr = std::fs::read(run.dir.join("test-output/bytes.stderr")).expect("stderr");
    assert_eq!(stderr, (0..=255u8).collect::<Vec<u8>>());
    // The events carry the lines that are not UTF-8 as base64, not as lossy text.
    let events = run.text("events.jsonl");
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"stream\":\"stderr\"") && l.contains("\"base64\":")),
        "{}",
        run.dump()
    );
}
