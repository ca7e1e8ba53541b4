//! End to end on the virtual QEMU board: a real kernel, the master image as
//! initramfs, a GPT disk, a network namespace. Needs root, QEMU and the
//! packages `.ci/run` installs; the images are built (cached) by
//! `images/build`. Set FERRY_SKIP_QEMU=1 to skip these on a machine without them.

use std::io::Read;
use std::process::Command;

use sha2::Digest;
use std::sync::{Mutex, MutexGuard, OnceLock};

use ferry_tests::{
    dispatch, processes_mentioning, r, smoke_cases, smoke_job_results, workspace, Run,
};

/// One virtual board at a time: each takes both cores of a CI machine.
static BOARD: Mutex<()> = Mutex::new(());
static IMAGES: OnceLock<Result<(), String>> = OnceLock::new();

/// The turn to use a virtual board (one at a time), or `None` when
/// FERRY_SKIP_QEMU asks to skip these tests.
fn board_turn() -> Option<MutexGuard<'static, ()>> {
    if std::env::var_os("FERRY_SKIP_QEMU").is_some() {
        eprintln!("FERRY_SKIP_QEMU is set: skipping the virtual board test");
        return None;
    }
    Some(BOARD.lock().unwrap_or_else(|e| e.into_inner()))
}

fn images() {
    let built = IMAGES.get_or_init(|| {
        let out = Command::new(workspace().join("images/build"))
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    if let Err(e) = built {
        panic!("images/build failed (run .ci/run's apt step, as root):\n{e}");
    }
}

/// A virtual board of its own: state folder and network namespace.
struct QemuBoard {
    tmp: tempfile::TempDir,
    device: std::path::PathBuf,
    state: std::path::PathBuf,
    netns: String,
}

impl QemuBoard {
    fn new(name: &str) -> Self {
        Self::with_console(name, None)
    }

    /// A board whose console is QEMU's TCP serial server on `tcp_port`
    /// (as ser2net would serve a real board's UART) instead of a pty.
    fn with_console(name: &str, tcp_port: Option<u16>) -> Self {
        images();
        let tmp = tempfile::tempdir().expect("tmp");
        let state = tmp.path().join("board");
        let netns = format!("ferry-t-{name}-{}", std::process::id());
        let example =
            std::fs::read_to_string(workspace().join("examples/devices/qemu-x86_64.yaml"))
                .expect("example");
        let text = example
            .replace(
                "../../images/qemu-board",
                &workspace().join("images/qemu-board").display().to_string(),
            )
            .replace("../../target/qemu-board", &state.display().to_string())
            .replace("ferry-qemu0", &netns)
            // One lock per device name: each test's board is its own device.
            .replace("device: qemu-x86_64", &format!("device: {netns}"));
        let text = match tcp_port {
            None => text,
            Some(port) => {
                let tty = format!("  tty: {}/console\n  baud: 115200\n", state.display());
                assert!(text.contains(&tty), "example device file changed: {text}");
                text.replace(&tty, &format!("  tcp: 127.0.0.1:{port}\n"))
                    .replace(
                        &format!("--netns {netns}"),
                        &format!("--netns {netns} --console tcp:{port}"),
                    )
            }
        };
        let device = tmp.path().join("qemu.yaml");
        std::fs::write(&device, text).expect("device");
        QemuBoard {
            tmp,
            device,
            state,
            netns,
        }
    }

    /// Writes a job; `{examples}` stands for the example jobs' folder.
    fn job(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.tmp.path().join(format!("{name}.yaml"));
        let examples = workspace().join("examples/jobs");
        std::fs::write(
            &p,
            text.replace("{examples}", &examples.display().to_string()),
        )
        .expect("job");
        p
    }

    fn run(&self, job: &std::path::Path) -> Run {
        dispatch(&self.device, job, &self.tmp.path().join("out"))
    }

    fn run_env(&self, job: &std::path::Path, env: &[(&str, &str)]) -> Run {
        ferry_tests::dispatch_env(&self.device, job, &self.tmp.path().join("out"), env)
    }

    fn qemu_running(&self) -> bool {
        !processes_mentioning(&self.state).is_empty()
    }

    /// Starts `dispatcher run` of `job` in the background, pausing 5 s on
    /// entering `phase` (a deploy under TCG takes about a second: the
    /// test acts during the pause, before its first byte).
    fn spawn(
        &self,
        job: &std::path::Path,
        phase: &str,
    ) -> (std::process::Child, std::path::PathBuf) {
        let out = self.tmp.path().join("out");
        let pause = format!("{phase}:5");
        let child = ferry_tests::spawn_dispatch(
            &self.device,
            job,
            &out,
            &[("FERRY_DISPATCHER_PAUSE_AT", &pause)],
        );
        (child, out)
    }

    /// Nothing of the board is left: QEMU, its namespace.
    fn assert_nothing_left(&self) {
        assert!(!self.qemu_running(), "QEMU must be gone after the job");
        assert!(
            !std::path::Path::new("/run/netns")
                .join(&self.netns)
                .exists(),
            "namespace {} left",
            self.netns
        );
    }
}

/// Waits (at most 5 min) until the run writing `out` entered `phase`.
fn wait_for_phase(out: &std::path::Path, phase: &str) {
    ferry_tests::wait_for_phase(out, phase, std::time::Duration::from_secs(300));
}
impl Drop for QemuBoard {
    fn drop(&mut self) {
        let text = std::fs::read_to_string(&self.device).unwrap_or_default();
        if let Some(off) = text.lines().find_map(|l| l.trim().strip_prefix("off: ")) {
            let _ = Command::new("/bin/sh").arg("-c").arg(off).output();
        }
    }
}

#[test]
fn smoke_job_on_the_virtual_board() {
    let Some(_turn) = board_turn() else { return };
    let board = QemuBoard::new("smoke");
    let run = board.run(&workspace().join("examples/jobs/qemu-smoke.yaml"));
    run.expect_outcome("complete");
    // The same records as the simulated board's smoke job.
    assert_eq!(run.results(), smoke_job_results(), "{}", run.dump());
    // The live stream brought them: no boot into the master image to fetch.
    assert_eq!(run.boot_roles(), ["master", "test"], "{}", run.dump());
    let boots = run.boots();
    assert!(boots[1].1 != boots[0].1, "two distinct boots: {boots:?}");
    assert!(
        run.text("console.log").contains("Linux version 6.1"),
        "a real kernel booted"
    );
    // The guest's reboot into the test image reset the board: a new QEMU
    // process behind the same console.
    let log = std::fs::read_to_string(board.state.join("board.log")).expect("board.log");
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert!(
        count(" guest guest-reset") >= 1 && count(" power-on ") >= 2,
        "{log}"
    );
    // Every boot phase, the kernel's first line between power-on and the
    // master's announcement.
    let phases = &run.json("outcome.json")["phases"];
    let secs = |p: &str| {
        phases[p]
            .as_f64()
            .unwrap_or_else(|| panic!("{p}: {phases}"))
    };
    for p in [
        "power_to_kernel",
        "kernel_to_master",
        "deploy",
        "reboot_to_test",
        "test",
        "stream_end",
    ] {
        assert!(secs(p) >= 0.0, "{p}: {phases}");
    }
    assert!(
        (secs("power_to_kernel") + secs("kernel_to_master") - secs("power_to_master")).abs() < 0.01,
        "{phases}"
    );
    let events = run.text("events.jsonl");
    assert!(events.contains("hello from Linux\\n"));
    assert!(run
        .text("test-output/smoke.stdout")
        .contains("hello from Linux\n"));
    let console = run.text("console.log");
    // The disk held the factory variant of the test image; the test boot
    // ran the deployed one, so the deploy really wrote the partition.
    let build = std::fs::read_to_string(workspace().join("images/out/test-rootfs.build-id"))
        .expect("images/build writes the build id");
    let deployed = format!("ferry-test: test image up: deployed {}", build.trim());
    assert!(
        console.contains(&deployed) && events.contains(&deployed),
        "the deployed image did not boot ({deployed:?}):\n{}",
        run.dump()
    );
    assert!(
        !console.contains("test image up: factory"),
        "the factory image booted"
    );
    // The test boot's kernel log is recorded too, from /dev/kmsg.
    assert!(
        events
            .lines()
            .any(|l| l.contains("\"kind\":\"kernel\"") && l.contains("EXT4-fs (vda2)")),
        "no kernel records"
    );
    assert!(!board.qemu_running(), "QEMU must be gone after the job");
}

#[test]
fn the_live_stream_brings_the_bytes_the_fetch_does() {
    let Some(_turn) = board_turn() else { return };
    let board = QemuBoard::new("stream");
    let smoke = std::fs::read_to_string(workspace().join("examples/jobs/qemu-smoke.yaml"))
        .expect("example job")
        .replace(
            "../../images/out/",
            &format!("{}/images/out/", workspace().display()),
        )
        .replace("path: defs/", "path: {examples}/defs/");
    let job = board.job("forced", &format!("{smoke}records: {{fetch: always}}\n"));
    let copy = board.tmp.path().join("streamed");
    let run = board.run_env(
        &job,
        &[("FERRY_STREAM_COPY", copy.to_str().expect("utf-8"))],
    );
    run.expect_outcome("complete");
    assert_eq!(run.results(), smoke_job_results(), "{}", run.dump());
    let events = run.text("events.jsonl");
    assert!(
        events.contains("\"kind\":\"stream-kept\""),
        "{}",
        run.dump()
    );
    assert_eq!(
        run.boot_roles(),
        ["master", "test", "master"],
        "{}",
        run.dump()
    );
    ferry_tests::assert_same_records(&copy, &run.dir.join("board"));
    // A clean end of the test boot: records closed, rootfs read-only before
    // the reboot, so the master image finds nothing to replay or repair.
    let console = run.text("console.log");
    assert!(
        !console.contains("recovery complete") && !console.contains("I/O error"),
        "the test boot did not end cleanly:\n{}",
        run.dump()
    );
    assert!(!board.qemu_running(), "QEMU must be gone after the job");
}

#[test]
fn a_test_image_without_a_network_falls_back_to_the_fetch() {
    let Some(_turn) = board_turn() else { return };
    let board = QemuBoard::new("nonet");
    // The test image, its rcS without the lines that bring the network up.
    let dir = board.tmp.path();
    let image = dir.join("nonet.ext4");
    let gz = std::fs::read(workspace().join("images/out/test-rootfs.ext4.gz")).expect("image");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut raw)
        .expect("gunzip");
    std::fs::write(&image, raw).expect("write image");
    let rcs = std::fs::read_to_string(workspace().join("images/test/rcS")).expect("rcS");
    // From the network comment to the `fi` closing that block.
    let (head, rest) = rcs
        .split_once("# Network")
        .expect("rcS sets up the network");
    let (_, tail) = rest.split_once("\nfi\n").expect("the network block ends");
    let cut = format!("{head}{tail}");
    assert!(!cut.contains("eth0") && cut.contains("/etc/init.d/S"));
    std::fs::write(dir.join("rcS"), &cut).expect("rcS");
    for req in [
        "rm /etc/init.d/rcS",
        &format!("write {} /etc/init.d/rcS", dir.join("rcS").display()),
        "sif /etc/init.d/rcS mode 0100755",
    ] {
        let out = Command::new("debugfs")
            .args(["-w", "-R", req])
            .arg(&image)
            .output()
            .expect("debugfs");
        assert!(
            out.status.success(),
            "debugfs {req}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sha = format!(
        "{:x}",
        sha2::Sha256::digest(std::fs::read(&image).expect("image"))
    );
    let job = board.job(
        "nonet",
        &format!(
            "job: qemu-nonet\ntimeouts: {{job: 10m, deploy: 5m, test: 3m}}\ndeploy:\n  - image: {}\n    to: testrootfs\n    sha256: {sha}\ntest:\n  definitions:\n    - path: {{examples}}/defs/smoke.yaml\n",
            image.display()
        ),
    );
    let run = board.run(&job);
    run.expect_outcome("complete");
    let mut expected = smoke_cases();
    expected.push(r("lava", "smoke", "pass"));
    assert_eq!(run.results(), expected, "{}", run.dump());
    // The agent could not reach the stream: the records were fetched.
    assert_eq!(
        run.boot_roles(),
        ["master", "test", "master"],
        "{}",
        run.dump()
    );
    let console = run.text("console.log");
    assert!(
        console.contains("[ferry] live stream: stream to 192.0.2.1:"),
        "{}",
        run.dump()
    );
    assert!(!run.text("events.jsonl").contains("\"stream-kept\""));
    assert!(!board.qemu_running(), "QEMU must be gone after the job");
}

#[test]
fn a_hung_test_image_is_hard_reset_back_to_the_master_image() {
    let Some(_turn) = board_turn() else { return };
    let port = ferry_tests::free_port();
    let board = QemuBoard::with_console("hang", Some(port));
    let job = board.job(
        "hang",
        r#"job: qemu-hang
timeouts: {job: 10m, deploy: 5m, test: 30s}
test:
  definitions:
    - path: {examples}/defs/smoke.yaml
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: hangs}
        run:
          steps:
            - lava-test-case before-hang --result pass
            - sleep 100000
      timeout: 1h
"#,
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("test-error");
    assert!(msg.contains("hard reset"), "{}", run.dump());
    assert_eq!(
        run.results(),
        [
            smoke_cases(),
            vec![
                r("hangs", "before-hang", "pass"),
                r("lava", "smoke", "pass"),
                r("lava", "hangs", "unknown")
            ],
        ]
        .concat(),
        "{}",
        run.dump()
    );
    assert_eq!(
        run.boot_roles(),
        ["master", "test", "master"],
        "{}",
        run.dump()
    );
    let events = run.text("events.jsonl");
    assert!(
        events.contains("\"action\":\"reset\""),
        "the board was hard reset"
    );
    assert!(
        events.contains(&format!("TCP serial server 127.0.0.1:{port}")),
        "console over TCP"
    );
    assert!(!board.qemu_running(), "QEMU must be gone after the job");
}

#[test]
fn a_kernel_panic_in_the_test_image_is_a_test_error_and_results_are_kept() {
    let Some(_turn) = board_turn() else { return };
    let board = QemuBoard::new("panic");
    let job = board.job(
        "panic",
        r#"job: qemu-panic
timeouts: {job: 10m, test: 3m}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: panics}
        run:
          steps:
            - lava-test-case before-panic --result pass
            - echo c > /proc/sysrq-trigger
            - lava-test-case never --result pass
"#,
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("test-error");
    assert!(msg.contains("kernel panic"), "{}", run.dump());
    assert_eq!(
        run.results(),
        vec![
            r("panics", "before-panic", "pass"),
            r("lava", "panics", "unknown")
        ],
        "{}",
        run.dump()
    );
    assert_eq!(
        run.boot_roles(),
        ["master", "test", "master"],
        "{}",
        run.dump()
    );
    assert!(!board.qemu_running(), "QEMU must be gone after the job");
}

#[test]
fn a_kernel_warning_in_the_test_boot_is_a_failed_kernel_result() {
    let Some(_turn) = board_turn() else { return };
    let board = QemuBoard::new("warn");
    // A line written to /dev/kmsg is a kernel message like any other: the
    // same text a WARN_ON() starts its report with.
    let job = board.job(
        "warn",
        r#"job: qemu-warn
timeouts: {job: 10m, test: 3m}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: warns}
        run:
          steps:
            - 'echo "WARNING: CPU: 0 PID: 1 at ferry/qemu.c:1 ferry_warn+0x0/0x10" > /dev/kmsg'
            - sleep 1
            - lava-test-case passes --result pass
"#,
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("test-error");
    assert!(msg.contains("kernel reported trouble"), "{}", run.dump());
    assert_eq!(
        run.results(),
        vec![
            r("warns", "passes", "pass"),
            r("lava", "warns", "pass"),
            r("kernel", "warning", "fail")
        ],
        "{}",
        run.dump()
    );
    let rows = run.json("results.json");
    let kernel = rows
        .as_array()
        .and_then(|a| a.iter().find(|r| r["suite"] == "kernel"))
        .expect("kernel row");
    assert!(
        kernel["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("WARNING: CPU: 0 PID: 1 at ferry/qemu.c:1 ferry_warn")),
        "{kernel}"
    );
    assert!(!board.qemu_running(), "QEMU must be gone after the job");
}

#[test]
fn a_test_image_that_never_boots_is_a_test_error_and_the_board_comes_back() {
    let Some(_turn) = board_turn() else { return };
    let board = QemuBoard::new("noboot");
    // A test rootfs with nothing to run (a tarball of an empty /etc): the
    // master agent installs the test agent's hook into it, but there is no
    // init to start.
    let root = board.tmp.path().join("empty-root");
    std::fs::create_dir_all(root.join("etc")).expect("etc");
    let image = board.tmp.path().join("empty-root.tar.gz");
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(&image)
        .arg("-C")
        .arg(&root)
        .arg("etc")
        .status()
        .expect("tar");
    assert!(tar.success());
    let sha = ferry_tests::sha256_hex(&std::fs::read(&image).expect("read"));
    let job = board.job(
        "noboot",
        &format!(
            r#"job: qemu-noboot
timeouts: {{job: 10m, test: 90s}}
deploy:
  - image: {}
    to: testrootfs
    sha256: {sha}
test:
  definitions:
    - inline:
        metadata: {{format: Lava-Test Test Definition 1.0, name: never}}
        run:
          steps:
            - lava-test-case never --result pass
"#,
            image.display()
        ),
    );
    let run = board.run(&job);
    let msg = run.expect_outcome("test-error");
    eprintln!("never-booting test image: {msg}");
    // The master image's init falls back to the master image, as a
    // bootloader with a fallback entry would.
    assert!(msg.contains("without the test agent ever running"), "{msg}");
    assert_eq!(
        run.results(),
        vec![r("lava", "never", "unknown")],
        "{}",
        run.dump()
    );
    assert_eq!(run.boot_roles().first().map(String::as_str), Some("master"));
    assert_eq!(
        run.boot_roles().last().map(String::as_str),
        Some("master"),
        "{}",
        run.dump()
    );
    board.assert_nothing_left();
}

#[test]
fn cancel_in_the_deploy_phase_on_the_virtual_board_ends_within_5s_with_qemu_gone() {
    let Some(_turn) = board_turn() else { return };
    let board = QemuBoard::new("cancel");
    let (child, out) = board.spawn(&workspace().join("examples/jobs/qemu-smoke.yaml"), "deploy");
    wait_for_phase(&out, "deploy");
    let sent = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let output = child.wait_with_output().expect("wait");
    let took = sent.elapsed();
    eprintln!("canceled mid-deploy on QEMU in {took:?}");
    let run = Run { output, dir: out };
    run.expect_outcome("canceled");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    board.assert_nothing_left();
}

#[test]
fn the_network_dropped_in_the_deploy_phase_on_the_virtual_board_is_an_infrastructure_error() {
    let Some(_turn) = board_turn() else { return };
    let board = QemuBoard::new("netcut");
    let (child, out) = board.spawn(&workspace().join("examples/jobs/qemu-smoke.yaml"), "deploy");
    wait_for_phase(&out, "deploy");
    // The host side of the board's link goes down: its cable is pulled.
    let cut = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "ip -n {ns} link set $(ip -n {ns} -o link show | grep -o 'ft[0-9a-f]*' | head -n 1) down",
            ns = board.netns
        ))
        .status()
        .expect("ip");
    assert!(cut.success());
    let output = child.wait_with_output().expect("wait");
    let run = Run { output, dir: out };
    let msg = run.expect_outcome("infrastructure-error");
    eprintln!("network cut mid-deploy on QEMU: {msg}");
    let outcome = run.json("outcome.json");
    assert_eq!(outcome["failures"][0]["phase"], "deploy", "{outcome}");
    board.assert_nothing_left();
}

#[test]
fn exec_uname_on_the_virtual_board() {
    let Some(_turn) = board_turn() else { return };
    let board = QemuBoard::new("exec");
    let started = std::time::Instant::now();
    let out = Command::new(ferry_tests::bin("dispatcher"))
        .arg("exec")
        .arg("--device")
        .arg(&board.device)
        .args(["--timeout", "60s", "--", "uname", "-a"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("dispatcher exec runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dump = format!(
        "exit {:?}\n--- stdout:\n{stdout}\n--- stderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{dump}");
    // The board's own kernel: Debian's cloud kernel on x86_64.
    assert!(
        stdout.starts_with("Linux ") && stdout.contains("x86_64") && stdout.contains("cloud"),
        "{dump}"
    );
    assert!(!board.qemu_running(), "powered off afterwards");
    eprintln!(
        "exec uname -a on the virtual board: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_lab_with_a_virtual_board_runs_a_job_and_goes_down_leaving_nothing() {
    let Some(_turn) = board_turn() else { return };
    images();
    let tmp = tempfile::tempdir().expect("tmp");
    let lab = tmp.path().join("lab");
    let scenario = tmp.path().join("scenario.yaml");
    std::fs::write(
        &scenario,
        "boards: [{name: vm, kind: qemu, console: tcp}]\n",
    )
    .expect("scenario");
    let dispatcher = || {
        let mut c = Command::new(ferry_tests::bin("dispatcher"));
        c.env("FERRY_RUN_DIR", tmp.path().join("run"));
        c
    };
    let up = dispatcher()
        .args(["lab", "up", "--lab"])
        .arg(&lab)
        .arg(&scenario)
        .output()
        .expect("up");
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let device = lab.join("devices/vm-1.yaml");
    let text = std::fs::read_to_string(&device).expect("device file");
    let netns = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("namespace: "))
        .expect("a namespace of its own")
        .to_string();
    let run = dispatch(
        &device,
        &workspace().join("examples/jobs/qemu-lava-smoke.yaml"),
        &tmp.path().join("out"),
    );
    run.expect_outcome("complete");
    assert_eq!(run.results().len(), 6, "{}", run.dump());
    let down = dispatcher()
        .args(["lab", "down", "--lab"])
        .arg(&lab)
        .output()
        .expect("down");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(processes_mentioning(&lab).is_empty(), "processes left");
    assert!(
        !std::path::Path::new("/run/netns").join(&netns).exists(),
        "namespace {netns} left"
    );
    assert!(!lab.join("boards").exists() && !lab.join("devices").exists());
}
