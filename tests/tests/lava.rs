//! LAVA compatibility on the simulated board: test definitions in the style
//! of Linaro's test-definitions (helpers, a parse pattern with a fixupdict,
//! params overridden by the job, `--shell` cases, a test set, a reference,
//! a background process, a raise), their results as records, and the
//! outcome classes LAVA gives them.

use ferry_tests::{workspace, Run, SimBoard};

/// `(suite, name, result, measurement, units, set, reference)` of every result, sorted
/// (pattern results and helper results are recorded by different threads).
type Full = (
    String,
    String,
    String,
    Option<f64>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn full(run: &Run) -> Vec<Full> {
    let v = run.json("results.json");
    let mut rows: Vec<Full> = v
        .as_array()
        .unwrap_or_else(|| panic!("results.json\n{}", run.dump()))
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().map(str::to_string);
            (
                s("suite").unwrap_or_default(),
                s("name").unwrap_or_default(),
                s("result").unwrap_or_default(),
                r["measurement"].as_f64(),
                s("units"),
                s("set"),
                s("reference"),
            )
        })
        .collect();
    rows.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    rows
}

fn row(suite: &str, name: &str, result: &str) -> Full {
    (
        suite.into(),
        name.into(),
        result.into(),
        None,
        None,
        None,
        None,
    )
}

/// Every result `examples/lava/linaro-style.yaml` gives under `suite` with
/// ITERATIONS overridden to 3.
fn linaro_style(suite: &str) -> Vec<Full> {
    let mut m = row(suite, "mem-read", "pass");
    m.3 = Some(812.5);
    m.4 = Some("MB/s".into());
    let mut d = row(suite, "disk-write", "pass");
    d.3 = Some(12.0);
    d.4 = Some("MB/s".into());
    d.5 = Some("io".into());
    let mut r = row(suite, "build-log", "pass");
    r.6 = Some("https://ci.example.org/build/42".into());
    vec![
        row(suite, "iterations-overridden", "pass"),
        row(suite, "label-kept", "pass"),
        row(suite, "shell-fails", "fail"),
        m,
        row(suite, "mem-write", "fail"),
        row(suite, "cache-flush", "skip"),
        d,
        r,
        // A repeated case id is kept twice, as LAVA does today (its old
        // "Duplicate test_case_id" JobError was dead code, removed in 2019).
        row(suite, "repeated", "pass"),
        row(suite, "repeated", "fail"),
        row(suite, "result-files", "pass"),
        row(suite, "background-ran", "pass"),
        row("lava", suite, "pass"),
    ]
}

fn sorted(mut v: Vec<Full>) -> Vec<Full> {
    v.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    v
}

fn definition_text() -> String {
    std::fs::read_to_string(workspace().join("examples/lava/linaro-style.yaml"))
        .expect("example definition")
}

/// The definition's text indented to sit under `inline:` in a job.
fn inline(text: &str, indent: usize) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{}{l}\n", " ".repeat(indent)))
        .collect()
}

#[test]
fn linaro_style_definitions_from_path_and_inline_give_every_result() {
    let board = SimBoard::new();
    let defs = board.tmp.path().join("jobs/defs");
    std::fs::create_dir_all(&defs).expect("defs");
    std::fs::write(defs.join("linaro-style.yaml"), definition_text()).expect("def");
    let job = board.job(
        "lava-style.yaml",
        &format!(
            "job: lava-style\ntimeouts: {{job: 5m, deploy: 1m, test: 3m}}\ntest:\n  definitions:\n    - path: defs/linaro-style.yaml\n      name: from-path\n      parameters: {{ITERATIONS: 3}}\n    - name: from-inline\n      parameters: {{ITERATIONS: 3}}\n      inline:\n{}",
            inline(&definition_text(), 8)
        ),
    );
    let run = board.run(&job);
    run.expect_outcome("complete");
    let mut expected = linaro_style("from-path");
    expected.extend(linaro_style("from-inline"));
    assert_eq!(full(&run), sorted(expected), "{}", run.dump());
    // The pattern read the steps' output on the board: the signal lines
    // mirrored to the console were not needed.
    let console = run.text("console.log");
    assert!(
        console
            .contains("LAVA_SIGNAL_TESTREFERENCE build-log pass https://ci.example.org/build/42"),
        "{console}"
    );
}

#[test]
fn a_raise_ends_the_run_as_a_test_error_keeping_earlier_results() {
    let board = SimBoard::new();
    let job = board.job(
        "raise.yaml",
        "job: raise\ntimeouts: {job: 5m, deploy: 1m, test: 2m}\ntest:\n  definitions:\n    - inline:\n        metadata: {format: Lava-Test Test Definition 1.0, name: before}\n        run: {steps: [lava-test-case first --result pass]}\n    - inline:\n        metadata: {format: Lava-Test Test Definition 1.0, name: raiser}\n        run:\n          steps:\n            - lava-test-case network --shell false\n            - lava-test-raise network unreachable, giving up\n            - lava-test-case never --result pass\n    - inline:\n        metadata: {format: Lava-Test Test Definition 1.0, name: after}\n        run: {steps: [lava-test-case later --result pass]}\n",
    );
    let run = board.run(&job);
    let message = run.expect_outcome("test-error");
    assert_eq!(
        message,
        "lava-test-raise in definition raiser: network unreachable, giving up"
    );
    assert_eq!(
        full(&run),
        sorted(vec![
            row("before", "first", "pass"),
            row("raiser", "network", "fail"),
            row("lava", "before", "pass"),
            // Ended by the raise: as in LAVA, its run is not a pass.
            row("lava", "raiser", "fail"),
            // Never started.
            row("lava", "after", "unknown"),
        ]),
        "{}",
        run.dump()
    );
    // The board still went back to its master image and was powered off.
    assert_eq!(
        run.boot_roles(),
        ["master", "test", "master"],
        "{}",
        run.dump()
    );
    assert!(!board.powered());
}

fn deps_job(board: &SimBoard) -> std::path::PathBuf {
    board.job(
        "deps.yaml",
        "job: deps\ntimeouts: {job: 5m, deploy: 1m, test: 2m}\ntest:\n  definitions:\n    - inline:\n        metadata: {format: Lava-Test Test Definition 1.0, name: needs-tools}\n        install:\n          deps: [curl, iperf3]\n        run: {steps: [lava-test-case ran --result pass]}\n",
    )
}

#[test]
fn install_deps_without_a_package_manager_is_a_job_error_naming_the_definition() {
    let board = SimBoard::new();
    let run = board.run(&deps_job(&board));
    let message = run.expect_outcome("job-error");
    assert!(
        message.contains("definition needs-tools: install.deps [\"curl\", \"iperf3\"]")
            && message.contains("apt-get"),
        "{message}"
    );
    assert_eq!(
        full(&run),
        vec![row("lava", "needs-tools", "unknown")],
        "{}",
        run.dump()
    );
}

#[test]
fn install_deps_go_through_the_images_package_manager() {
    let board = SimBoard::new();
    // An image with opkg (a stand-in that logs its calls).
    let bin = board.board.join("parts/testrootfs/usr/bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let opkg = bin.join("opkg");
    std::fs::write(
        &opkg,
        "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/opkg.log\"\n",
    )
    .expect("opkg");
    std::fs::set_permissions(&opkg, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let run = board.run(&deps_job(&board));
    run.expect_outcome("complete");
    assert_eq!(
        full(&run),
        sorted(vec![
            row("needs-tools", "ran", "pass"),
            row("lava", "needs-tools", "pass"),
        ])
    );
    let log = std::fs::read_to_string(bin.join("opkg.log")).expect("opkg ran");
    assert_eq!(log, "update\ninstall curl iperf3\n");
}
