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
    check_results_yaml(&run, "lava-style");
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
    check_results_yaml(&run, "raise");
    // The records still all came back (through the live stream) and the
    // board was powered off.
    assert_eq!(run.boot_roles(), ["master", "test"], "{}", run.dump());
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

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn definitions_from_a_git_repository_run_in_its_tree_with_the_commit_in_the_results() {
    let board = SimBoard::new();
    // A test-definitions repository, reached as file:// (never the network).
    let repo = board.tmp.path().join("test-definitions");
    let auto = repo.join("automated/linux/linaro-style");
    std::fs::create_dir_all(&auto).expect("repo");
    git(&repo, &["init", "-q", "-b", "master", "."]);
    git(&repo, &["config", "user.email", "qa@example.org"]);
    git(&repo, &["config", "user.name", "qa"]);
    std::fs::write(auto.join("linaro-style.yaml"), definition_text()).expect("def");
    std::fs::write(
        auto.join("hello.sh"),
        "#!/bin/sh\nlava-test-case repo-script --result pass\n",
    )
    .expect("script");
    std::fs::set_permissions(
        auto.join("hello.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    std::fs::write(
        auto.join("hello.yaml"),
        "metadata:\n  format: Lava-Test Test Definition 1.0\n  name: hello\nrun:\n  steps:\n    - cd ./automated/linux/linaro-style/\n    - ./hello.sh\n",
    )
    .expect("def");
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "definitions"]);
    git(&repo, &["tag", "2024.01"]);
    let tagged = git(&repo, &["rev-parse", "HEAD"]);
    // A later commit on the branch: the branch gives it, the tag does not.
    std::fs::write(
        auto.join("hello.sh"),
        "#!/bin/sh\nlava-test-case repo-script --result fail\n",
    )
    .expect("script");
    git(&repo, &["commit", "-q", "-am", "later"]);
    let tip = git(&repo, &["rev-parse", "HEAD"]);
    let url = format!("file://{}", repo.display());
    let job = board.job(
        "git.yaml",
        &format!("job: git-defs\ntimeouts: {{job: 5m, deploy: 1m, test: 3m}}\ntest:\n  definitions:\n    - from: git\n      repository: {url}\n      path: automated/linux/linaro-style/linaro-style.yaml\n      branch: master\n      history: false\n      parameters: {{ITERATIONS: 3}}\n    - repository: {url}\n      path: automated/linux/linaro-style/hello.yaml\n      revision: 2024.01\n      history: false\n"),
    );
    let cache = board.tmp.path().join("cache");
    let cache_env = cache.display().to_string();
    let run = board.run_env(&job, &[("FERRY_CACHE_DIR", &cache_env)]);
    run.expect_outcome("complete");
    let mut expected = linaro_style("linaro-style");
    expected.push(row("hello", "repo-script", "pass"));
    expected.push(row("lava", "hello", "pass"));
    assert_eq!(full(&run), sorted(expected), "{}", run.dump());
    // The lava rows carry where each definition came from.
    let results = run.json("results.json");
    let lava = |name: &str| {
        results
            .as_array()
            .and_then(|a| a.iter().find(|r| r["suite"] == "lava" && r["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no lava row {name}"))
    };
    let l = lava("linaro-style");
    assert_eq!(
        (
            l["repository"].as_str(),
            l["path"].as_str(),
            l["revision"].as_str(),
            l["commit_id"].as_str()
        ),
        (
            Some(url.as_str()),
            Some("automated/linux/linaro-style/linaro-style.yaml"),
            Some("master"),
            Some(tip.as_str())
        )
    );
    let h = lava("hello");
    assert_eq!(
        (h["revision"].as_str(), h["commit_id"].as_str()),
        (Some("2024.01"), Some(tagged.as_str()))
    );
    assert!(
        h["duration"]
            .as_str()
            .is_some_and(|d| d.parse::<f64>().is_ok()),
        "{h}"
    );
    // Cached by commit, without history.
    assert!(cache
        .join("git")
        .join(&tip)
        .join("automated/linux/linaro-style/hello.sh")
        .is_file());
    assert!(!cache.join("git").join(&tip).join(".git").exists());

    let cases = check_results_yaml(&run, "git-defs");
    let hello = cases
        .iter()
        .find(|c| c["suite"] == "lava" && c["name"] == "hello")
        .expect("lava hello");
    assert_eq!(
        hello["metadata"]["commit_id"].as_str(),
        Some(tagged.as_str())
    );
    assert_eq!(hello["metadata"]["repository"].as_str(), Some(url.as_str()));
}

/// `results.yaml` holds every result of `results.json`, in LAVA's export
/// shape; returns its entries.
fn check_results_yaml(run: &Run, job: &str) -> Vec<serde_json::Value> {
    let results = run.json("results.json");
    let yaml: serde_json::Value =
        serde_norway::from_str(&run.text("results.yaml")).expect("results.yaml");
    let cases = yaml.as_array().expect("a list");
    assert_eq!(cases.len(), results.as_array().map_or(0, Vec::len));
    for (c, r) in cases.iter().zip(results.as_array().into_iter().flatten()) {
        assert_eq!(c["job"], job);
        assert_eq!(c["suite"], r["suite"]);
        assert_eq!(c["name"], r["name"]);
        assert_eq!(c["result"], r["result"]);
        assert_eq!(c["metadata"]["definition"], r["suite"]);
        assert_eq!(c["metadata"]["case"], r["name"]);
        assert_eq!(c["metadata"]["result"], r["result"]);
        match r["measurement"].as_f64() {
            Some(m) => {
                assert_eq!(
                    c["measurement"]
                        .as_str()
                        .and_then(|s| s.parse::<f64>().ok()),
                    Some(m)
                );
                assert_eq!(c["unit"], r["units"]);
                assert_eq!(c["metadata"]["measurement"].as_f64(), Some(m));
            }
            None => assert_eq!(c["measurement"], "None"),
        }
        for k in [
            "set",
            "reference",
            "duration",
            "repository",
            "path",
            "revision",
            "commit_id",
        ] {
            if !r[k].is_null() {
                assert_eq!(c["metadata"][k], r[k], "{k} of {r}");
            }
        }
        for k in [
            "level",
            "url",
            "id",
            "logged",
            "log_start_line",
            "log_end_line",
        ] {
            assert!(c[k].is_string(), "{k} in {c}");
        }
    }
    cases.clone()
}

#[test]
fn a_lava_job_gives_the_results_of_its_ferry_translation() {
    let lava_job = workspace().join("examples/lava/smoke-lava-job.yaml");
    let ferry_job = workspace().join("examples/lava/smoke-ferry-job.yaml");
    let board = SimBoard::new();
    let lava = board.run(&lava_job);
    lava.expect_outcome("complete");
    let ferry = board.run(&ferry_job);
    ferry.expect_outcome("complete");
    let mut sleep = row("smoke", "sleep-time", "pass");
    sleep.3 = Some(0.1);
    sleep.4 = Some("seconds".into());
    sleep.5 = Some("timing".into());
    let expected = sorted(vec![
        row("smoke", "greeting", "pass"),
        sleep,
        row("smoke", "not-yet", "skip"),
        row("smoke", "uart", "pass"),
        row("smoke", "spi", "fail"),
        row("lava", "smoke", "pass"),
    ]);
    assert_eq!(full(&lava), expected, "{}", lava.dump());
    assert_eq!(full(&ferry), expected, "{}", ferry.dump());
    check_results_yaml(&lava, "smoke_under_LAVA");
    // The deploy happened from the LAVA job's images.
    assert!(lava.text("events.jsonl").contains("firmware"));

    // `dispatcher translate` prints the Ferry job it ran.
    let out = std::process::Command::new(ferry_tests::bin("dispatcher"))
        .args(["translate"])
        .arg(&lava_job)
        .output()
        .expect("translate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_norway::from_slice(&out.stdout).expect("yaml");
    assert_eq!(printed["job"], "smoke_under_LAVA");
    assert_eq!(printed["timeouts"]["test"], "300s");
    assert_eq!(printed["deploy"][0]["to"], "firmware");
    assert_eq!(
        printed["test"]["definitions"][0]["inline"]["metadata"]["name"],
        "smoke"
    );
}

#[test]
fn a_lava_job_with_keys_ferry_cannot_honour_exits_2_listing_them_all() {
    let board = SimBoard::new();
    let job = board.job(
        "multinode.yaml",
        "job_name: multinode\ndevice_type: sim\ntimeouts:\n  job: {minutes: 5}\nprotocols:\n  lava-multinode: {roles: {a: {count: 2}}}\nactions:\n- deploy:\n    to: lxc\n    images:\n      rootfs: {url: 'ftp://example.org/rootfs.ext4.bz2', compression: bz2}\n    failure_retry: 3\n- boot:\n    method: fastboot\n    docker: {image: adb}\n- test:\n    interactive:\n    - name: shell\n    definitions:\n    - from: url\n      path: x.yaml\n      name: x\n- command:\n    name: pdu_reboot\n",
    );
    let run = board.run(&job);
    let message = run.expect_outcome("job-error");
    let file = job.display().to_string();
    for expected in [
        format!("{file}:5: protocols"),
        format!("{file}:11: actions[0].deploy.images.rootfs.url"),
        format!("{file}:11: actions[0].deploy.images.rootfs.compression"),
        format!("{file}:12: actions[0].deploy.failure_retry"),
        format!("{file}:15: actions[1].boot.docker"),
        format!("{file}:17: actions[2].test.interactive"),
        format!("{file}:20: actions[2].test.definitions[0].from"),
        format!("{file}:23: actions[3].command"),
    ] {
        assert!(message.contains(&expected), "{expected}\nin:\n{message}");
    }
    assert!(
        message.contains("Ferry cannot honour 8 key(s)"),
        "{message}"
    );
    assert!(!board.powered(), "nothing was powered for a job error");
}
