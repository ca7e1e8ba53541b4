//! The real `master-agent` binary on a simulated platform, driven over
//! gRPC: the console token gate and the lifecycle rules.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ferry_proto::console::{Announcement, TokenLine};
use ferry_proto::master::v1 as pb;
use ferry_proto::master::v1::master_agent_client::MasterAgentClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

const BIN: &str = env!("CARGO_BIN_EXE_master-agent");

struct Agent {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    announcement: Announcement,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        std::fs::create_dir_all(d.join("root")).expect("mkdir");
        std::fs::write(d.join("bootsel"), [0u8; 512]).expect("w");
        std::fs::write(d.join("small"), [0u8; 4096]).expect("w");
        // Partitions a job must never write, with bytes to compare after.
        std::fs::write(d.join("masterroot"), [0x5au8; 4096]).expect("w");
        std::fs::write(d.join("unlisted"), [0xa5u8; 4096]).expect("w");
        std::fs::write(
            d.join("agent.yaml"),
            "listen: 127.0.0.1:0\ntest_agent_bundle: missing.tgz\nannounce_interval: 200ms\n\
             allowed_partitions: [small, testrootfs, gone]\nboot_partitions: [masterroot]\n\
             platform:\n  sim:\n    partitions:\n      bootsel: {file: bootsel}\n      small: {file: small}\n\
             \x20     testrootfs: {dir: root}\n      masterroot: {file: masterroot}\n      unlisted: {file: unlisted}\n",
        )
        .expect("w");
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(d.join("agent.yaml"))
            .args(["--boot-id", "boot-1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let announcement = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(10))
                .expect("announcement");
            if let Some(Ok(a)) = Announcement::find(&line) {
                break a;
            }
        };
        Agent {
            child,
            stdin,
            lines,
            announcement,
            _dir: dir,
        }
    }

    fn send_token(&mut self, boot: &str, token: &str) {
        writeln!(
            self.stdin,
            "{}",
            TokenLine {
                boot: boot.into(),
                token: token.into()
            }
        )
        .expect("write");
    }

    fn wait_for(&self, text: &str) {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no {text:?}"));
            if line.contains(text) {
                return;
            }
        }
    }

    /// A file of the board's folder.
    fn file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self._dir.path().join(name)).expect("read")
    }

    async fn client(&self) -> MasterAgentClient<Channel> {
        let addr = self.announcement.addr.expect("addr");
        MasterAgentClient::connect(format!("http://{addr}"))
            .await
            .expect("connect")
    }
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        ferry_proto::bearer(token).parse().expect("ascii"),
    );
    r
}

#[tokio::test]
async fn calls_need_the_token_written_on_this_boots_console() {
    let mut agent = Agent::start();
    assert_eq!(agent.announcement.boot, "boot-1");
    let mut c = agent.client().await;

    let e = c
        .get_info(Request::new(pb::GetInfoRequest {}))
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("no token has been issued"),
        "{}",
        e.message()
    );

    // A token for another boot is not ours.
    agent.send_token("boot-0", "stale");
    agent.send_token("boot-1", "s3cret");
    agent.wait_for("token accepted");
    for bad in ["stale", "s3cre", "s3cret2", ""] {
        let e = c
            .get_info(authed(pb::GetInfoRequest {}, bad))
            .await
            .expect_err(bad);
        assert_eq!(e.code(), Code::Unauthenticated, "{bad}");
    }
    let info = c
        .get_info(authed(pb::GetInfoRequest {}, "s3cret"))
        .await
        .expect("authed")
        .into_inner();
    assert_eq!(
        (
            info.boot_id.as_str(),
            info.platform.as_str(),
            info.state.as_str()
        ),
        ("boot-1", "sim", "ready")
    );

    // Once answered, the agent stops announcing.
    while agent.lines.recv_timeout(Duration::from_millis(600)).is_ok() {}
    assert!(
        agent
            .lines
            .recv_timeout(Duration::from_millis(600))
            .is_err(),
        "still announcing"
    );
}

#[tokio::test]
async fn out_of_order_and_unsafe_calls_are_refused_with_the_right_codes() {
    let mut agent = Agent::start();
    agent.send_token("boot-1", "t");
    agent.wait_for("token accepted");
    let mut c = agent.client().await;

    let e = c
        .set_boot_once(authed(
            pb::SetBootOnceRequest {
                partition: "testrootfs".into(),
            },
            "t",
        ))
        .await
        .expect_err("order");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());

    let deploy = |partition: &str, data: Vec<u8>, size: u64| {
        let header = pb::DeployHeader {
            partition: partition.into(),
            sha256: "0".repeat(64),
            compression: pb::Compression::None as i32,
            source_size: size,
            source_name: "test".into(),
        };
        let msgs = vec![
            pb::DeployRequest {
                msg: Some(pb::deploy_request::Msg::Header(header)),
            },
            pb::DeployRequest {
                msg: Some(pb::deploy_request::Msg::Data(data)),
            },
        ];
        authed(tokio_stream::iter(msgs), "t")
    };
    // Never written, whatever the caller names: each refused before a byte.
    for (partition, why) in [
        ("bootsel", "boot selection"),
        ("masterroot", "boots from it"),
        ("unlisted", "not in this board's `allowed_partitions`"),
        ("nope", "not in this board's `allowed_partitions`"),
    ] {
        let before = std::fs::read(agent._dir.path().join(partition)).ok();
        let e = c
            .deploy(deploy(partition, vec![1; 10], 10))
            .await
            .expect_err(partition);
        assert_eq!(e.code(), Code::PermissionDenied, "{partition}: {}", e.message());
        assert!(e.message().contains(why), "{partition}: {}", e.message());
        assert_eq!(
            std::fs::read(agent._dir.path().join(partition)).ok(),
            before,
            "{partition} unchanged"
        );
    }
    for bad in ["../small", "small/", ".hidden", "a b"] {
        let e = c
            .deploy(deploy(bad, vec![1; 10], 10))
            .await
            .expect_err(bad);
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {}", e.message());
    }
    assert_eq!(agent.file("small"), vec![0u8; 4096], "small unchanged");
    // Allowed, but the board has no such partition.
    let e = c
        .deploy(deploy("gone", vec![1; 10], 10))
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    // Suite names become paths on the test rootfs: plain names only.
    let plan = ferry_proto::plan::v1::TestPlan {
        job: "j".into(),
        definitions: vec![ferry_proto::plan::v1::Definition {
            name: "../../etc".into(),
            ..Default::default()
        }],
    };
    let e = c
        .install_test_agent(authed(
            pb::InstallTestAgentRequest {
                partition: "testrootfs".into(),
                plan: Some(plan),
            },
            "t",
        ))
        .await
        .expect_err("suite name");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("suite name"), "{}", e.message());
    // GetInfo lists only what the board lets jobs use.
    let info = c
        .get_info(authed(pb::GetInfoRequest {}, "t"))
        .await
        .expect("info")
        .into_inner();
    let names: Vec<_> = info.partitions.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["small", "testrootfs"]);
    let e = c
        .deploy(deploy("small", vec![1; 8192], 8192))
        .await
        .expect_err("too big");
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    let e = c
        .deploy(deploy("small", vec![1; 100], 100))
        .await
        .expect_err("bad sha");
    assert_eq!(e.code(), Code::DataLoss, "{}", e.message());
    assert!(
        e.message().contains(&"0".repeat(64)),
        "both hashes named: {}",
        e.message()
    );
}

#[tokio::test]
async fn a_later_different_token_line_does_not_replace_the_one_in_use() {
    let mut agent = Agent::start();
    agent.send_token("boot-1", "first");
    agent.wait_for("token accepted");
    let mut c = agent.client().await;
    c.get_info(authed(pb::GetInfoRequest {}, "first"))
        .await
        .expect("first token in use");

    // The dispatcher repeating its line is harmless; someone else's is ignored.
    agent.send_token("boot-1", "first");
    agent.send_token("boot-1", "second");
    agent.wait_for("ignoring a different token");
    let e = c
        .get_info(authed(pb::GetInfoRequest {}, "second"))
        .await
        .expect_err("later token");
    assert_eq!(e.code(), Code::Unauthenticated);
    c.get_info(authed(pb::GetInfoRequest {}, "first"))
        .await
        .expect("the first token still works");
}
