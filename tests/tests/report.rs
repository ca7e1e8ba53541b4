//! `report.html` in a real browser: Debian's headless Chromium, driven over
//! the DevTools protocol, opens the report of a real job on the simulated
//! board, reads the results table, turns the kernel source off and checks
//! that exactly the kernel lines went, and keeps a screenshot
//! (`target/tmp/report-screenshot.png`).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ferry_tests::SimBoard;
use serde_json::{json, Value};
use tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium, killed with its whole process group on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: String,
}

impl Browser {
    fn start() -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1600",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium never said where DevTools listens");
        Browser {
            child,
            _profile: profile,
            ws: url.trim().to_string(),
        }
    }

    /// A new page showing `url`, attached over the browser's own socket.
    fn page(&self, url: &str) -> Page {
        let (socket, _) = tungstenite::connect(&self.ws).expect("DevTools websocket");
        let mut page = Page {
            socket,
            next: 0,
            session: None,
        };
        let target = page.call("Target.createTarget", json!({ "url": url }));
        let attached = page.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        page.session = attached["sessionId"].as_str().map(str::to_string);
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// One page, spoken to with DevTools commands.
struct Page {
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next: u64,
    /// The page's session on the browser's socket, once attached.
    session: Option<String>,
}

impl Page {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.socket
            .send(Message::text(msg.to_string()))
            .expect("send");
        loop {
            let reply = self.socket.read().expect("read");
            let Message::Text(text) = reply else { continue };
            let v: Value = serde_json::from_str(&text).expect("json");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` (which returns a JSON string) and parses it.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true }),
        );
        let text = r["result"]["value"].as_str().unwrap_or("null").to_string();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
}

/// Visible timeline rows per source.
const VISIBLE: &str = r#"JSON.stringify((function(){var c={};document.querySelectorAll('#timeline tbody tr').forEach(function(r){if(r.style.display!=='none'){c[r.dataset.src]=(c[r.dataset.src]||0)+1;}});return c;})())"#;

fn job_text() -> String {
    r#"job: report
timeouts: {job: 2m, test: 30s}
test:
  definitions:
    - inline:
        metadata: {format: Lava-Test Test Definition 1.0, name: work}
        run:
          steps:
            - echo to-stdout-first
            - echo to-stderr >&2
            - 'echo "4,3,5000000,-;WARNING: CPU: 0 PID: 1 at ferry/report.c:1 report_warn+0x0/0x10" > "$FERRY_KMSG"'
            - sleep 0.3
            - echo to-stdout-after
            - lava-test-case shown --result pass
            - lava-test-case measured --result pass --measurement 42 --units ms
"#
    .to_string()
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-screenshot.png")
}

#[test]
fn the_report_opens_in_chromium_with_its_results_and_a_kernel_toggle() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!("skipped: {CHROMIUM} is not installed (.ci/run installs Debian's chromium)");
        return;
    }
    let board = SimBoard::new();
    let run = board.run(&board.job("report.yaml", &job_text()));
    run.expect_outcome("test-error"); // the kernel's WARNING
    let report = run.dir.join("report.html");
    assert!(report.exists(), "no report.html: {}", run.dump());
    // `dispatcher report` writes the same page again from the files.
    let again = Command::new(ferry_tests::bin("dispatcher"))
        .arg("report")
        .arg(&run.dir)
        .output()
        .expect("dispatcher report");
    assert!(again.status.success(), "{again:?}");

    let browser = Browser::start();
    let mut page = browser.page(&format!("file://{}", report.display()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let loaded = "JSON.stringify(document.readyState === 'complete' && !!document.getElementById('timeline'))";
    while page.eval(loaded) != json!(true) {
        assert!(Instant::now() < deadline, "report.html never loaded");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The results table shows every result of results.json, in order.
    let shown = page.eval(
        r#"JSON.stringify(Array.from(document.querySelectorAll('#results tbody tr')).map(function(r){return [r.cells[0].textContent,r.cells[1].textContent,r.cells[2].textContent];}))"#,
    );
    let want: Vec<Value> = run
        .json("results.json")
        .as_array()
        .expect("results")
        .iter()
        .map(|r| json!([r["suite"], r["name"], r["result"]]))
        .collect();
    assert_eq!(shown, Value::Array(want), "results table");
    assert!(
        shown.to_string().contains(r#"["kernel","warning","fail"]"#),
        "{shown}"
    );

    // Turning the kernel source off hides exactly the kernel lines.
    let before = page.eval(VISIBLE);
    let kernel = before["kernel"].as_u64().unwrap_or(0);
    assert!(kernel >= 1, "kernel lines shown: {before}");
    assert!(before["stdout"].as_u64() >= Some(2), "{before}");
    page.eval("JSON.stringify(document.getElementById('src-kernel').click())");
    let after = page.eval(VISIBLE);
    let mut expected = before.clone();
    if let Some(o) = expected.as_object_mut() {
        o.remove("kernel");
    }
    assert_eq!(after, expected, "only the kernel lines hide");

    // The warning is marked where it happened: between the test's stdout lines.
    let order = page.eval(
        r#"JSON.stringify(Array.from(document.querySelectorAll('#timeline tbody tr')).filter(function(r){return /to-stdout|report_warn/.test(r.textContent)&&(r.dataset.src==='stdout'||r.dataset.src==='kernel');}).map(function(r){return r.dataset.src+(r.classList.contains('kwarn')?'!':'');}))"#,
    );
    assert_eq!(
        order,
        json!(["stdout", "kernel!", "stdout"]),
        "one time order, the warning marked"
    );

    // Turned back on, and kept as a picture of the page.
    page.eval("JSON.stringify(document.getElementById('src-kernel').click())");
    let shot = page.call(
        "Page.captureScreenshot",
        json!({ "format": "png", "captureBeyondViewport": true }),
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("png data"))
        .expect("base64");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(screenshot_path(), &png).expect("keep the screenshot");
    eprintln!("screenshot: {}", screenshot_path().display());
}
