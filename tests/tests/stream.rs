//! The live record stream on the simulated board: what it brings is what a
//! fetch brings, byte for byte; a stream cut mid-test, or one the board
//! cannot reach, falls back to the fetch through the master image with
//! nothing lost; `records.fetch: always` fetches even after a whole stream.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::{free_port, r, Row, SimBoard};

/// Two cases around a pause, so a test can act while the agent sleeps.
fn job(extra: &str) -> String {
    format!(
        r#"job: streaming
timeouts: {{job: 2m, test: 1m}}
{extra}test:
  definitions:
    - inline:
        metadata: {{format: Lava-Test Test Definition 1.0, name: pausing}}
        run:
          steps:
            - lava-test-case before --result pass
            - echo printed before the pause
            - sleep 3
            - echo printed after the pause
            - lava-test-case after --result pass
"#
    )
}

fn results() -> Vec<Row> {
    vec![
        r("pausing", "before", "pass"),
        r("pausing", "after", "pass"),
        r("lava", "pausing", "pass"),
    ]
}

fn stream_event(run: &ferry_tests::Run, kind: &str) -> bool {
    run.text("events.jsonl")
        .contains(&format!("\"kind\":\"{kind}\""))
}

#[test]
fn a_forced_fetch_brings_back_the_very_bytes_the_stream_did() {
    let board = SimBoard::new();
    let job = board.job("forced.yaml", &job("records: {fetch: always}\n"));
    let copy = board.tmp.path().join("streamed");
    let run = board.run_env(
        &job,
        &[("FERRY_STREAM_COPY", copy.to_str().expect("utf-8"))],
    );
    run.expect_outcome("complete");
    assert_eq!(run.results(), results(), "{}", run.dump());
    assert!(stream_event(&run, "stream-kept"), "{}", run.dump());
    // Fetched anyway.
    assert_eq!(
        run.boot_roles(),
        ["master", "test", "master"],
        "{}",
        run.dump()
    );
    ferry_tests::assert_same_records(&copy, &run.dir.join("board"));
    let phases = &run.json("outcome.json")["phases"];
    assert!(phases["fetch"].as_f64().is_some(), "{phases}");
}

#[test]
fn a_kept_stream_gives_the_output_a_fetch_would() {
    // The same job twice on one board: streamed, then fetched.
    let board = SimBoard::new();
    let streamed = board.run(&board.job("streamed.yaml", &job("")));
    streamed.expect_outcome("complete");
    assert_eq!(
        streamed.boot_roles(),
        ["master", "test"],
        "{}",
        streamed.dump()
    );
    let fetched = board.run(&board.job("fetched.yaml", &job("records: {fetch: always}\n")));
    fetched.expect_outcome("complete");
    // Rows the same (durations are the runs' own).
    assert_eq!(streamed.results(), results());
    assert_eq!(fetched.results(), results());
    for d in ["test-output", "board"] {
        let (a, b) = (
            ferry_tests::folder_files(&streamed.dir.join(d)),
            ferry_tests::folder_files(&fetched.dir.join(d)),
        );
        assert_eq!(
            a.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            b.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            "{d}"
        );
        if d == "test-output" {
            assert_eq!(a, b, "{d}");
        }
    }
}

/// A TCP forwarder the test can cut: every connection through it is shut
/// down at once, and later ones are refused.
#[derive(Clone)]
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let p = Proxy {
            port,
            cut: Arc::new(AtomicBool::new(false)),
            forwarded: Arc::new(AtomicU64::new(0)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let (cut, forwarded, conns) = (p.cut.clone(), p.forwarded.clone(), p.conns.clone());
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                if let Ok(mut c) = conns.lock() {
                    c.extend([down.try_clone(), up.try_clone()].into_iter().flatten());
                }
                for (mut from, mut to) in [
                    (down.try_clone(), up.try_clone()),
                    (up.try_clone(), down.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let forwarded = forwarded.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            forwarded.fetch_add(n as u64, Ordering::SeqCst);
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        p
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        if let Ok(c) = self.conns.lock() {
            for s in c.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A board whose test agent dials `advertised` for the stream, while the
/// dispatcher listens on `listen`.
fn board_streaming(listen: u16, advertised: u16) -> SimBoard {
    SimBoard::with_device(|d| {
        d.replace(
            "  stream: 127.0.0.1:0\n",
            &format!("  stream: 127.0.0.1:{listen}\n  stream_address: 127.0.0.1:{advertised}\n"),
        )
    })
}

#[test]
fn a_stream_cut_mid_test_falls_back_to_the_fetch_with_nothing_lost() {
    let listen = free_port();
    let proxy = Proxy::start(listen);
    let board = board_streaming(listen, proxy.port);
    assert!(std::fs::read_to_string(&board.device)
        .expect("device")
        .contains("stream_address"));
    let job = board.job("cut.yaml", &job(""));
    let p = proxy.clone();
    let cutter = std::thread::spawn(move || {
        // Cut once the stream has started, while the test sleeps.
        let start = Instant::now();
        while p.forwarded.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(90) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(1500));
        p.cut();
        start.elapsed()
    });
    let run = board.run(&job);
    let waited = cutter.join().expect("cutter");
    assert!(waited < Duration::from_secs(90), "the stream never started");
    run.expect_outcome("complete");
    assert_eq!(run.results(), results(), "{}", run.dump());
    assert!(!stream_event(&run, "stream-kept"), "{}", run.dump());
    assert!(stream_event(&run, "stream-failed"), "{}", run.dump());
    assert_eq!(
        run.boot_roles(),
        ["master", "test", "master"],
        "{}",
        run.dump()
    );
    let out = run.text("test-output/pausing.stdout");
    assert!(
        out.contains("printed before the pause\n") && out.contains("printed after the pause\n"),
        "{out}"
    );
    assert!(!board.powered());
}

#[test]
fn a_board_that_cannot_reach_the_stream_falls_back_to_the_fetch() {
    // Nothing listens where the board is sent: as a test image without a
    // network, the agent cannot connect.
    let board = board_streaming(0, free_port());
    let run = board.run(&board.job("unreachable.yaml", &job("")));
    run.expect_outcome("complete");
    assert_eq!(run.results(), results(), "{}", run.dump());
    assert!(!stream_event(&run, "stream-kept"), "{}", run.dump());
    assert_eq!(
        run.boot_roles(),
        ["master", "test", "master"],
        "{}",
        run.dump()
    );
    assert!(
        run.text("console.log")
            .contains("live stream: stream to 127.0.0.1:"),
        "{}",
        run.dump()
    );
}
