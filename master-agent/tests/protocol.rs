//! The real `master-agent` binary on a simulated platform, driven over
//! gRPC: the console token gate and the lifecycle rules.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ferry_proto::console::{Announcement, TokenLine};
use ferry_proto::master::v1 as pb;
use ferry_proto::master::v1::master_agent_client::MasterAgentClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

const BIN: &str = env!("CARGO_BIN_EXE_master-agent");

/// A mount table with only `/` on it.
const ROOT_MOUNT: &str = "22 1 254:0 / / rw - ext4 /dev/vda rw\n";

struct Agent {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    announcement: Announcement,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start() -> Self {
        Self::start_with("")
    }

    /// Starts the usual simulated board with `extra` top-level config keys.
    fn start_with(extra: &str) -> Self {
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
             \x20     testrootfs: {dir: root}\n      masterroot: {file: masterroot}\n      unlisted: {file: unlisted}\n\
             \x20   mountinfo: mountinfo\nrecords: {max_file_bytes: 65536}\n"
                .to_string()
                + extra,
        )
        .expect("w");
        std::fs::write(d.join("mountinfo"), ROOT_MOUNT).expect("w");
        Self::launch(dir)
    }

    /// Starts the agent on `dir/agent.yaml`.
    fn launch(dir: tempfile::TempDir) -> Self {
        let d = dir.path();
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
            dir,
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
        std::fs::read(self.dir.path().join(name)).expect("read")
    }

    /// A started agent that has accepted token "t", and a client.
    async fn authed() -> (Self, MasterAgentClient<Channel>) {
        Self::authed_with("").await
    }

    /// [`Agent::authed`] with `extra` top-level config keys.
    async fn authed_with(extra: &str) -> (Self, MasterAgentClient<Channel>) {
        let mut agent = Agent::start_with(extra);
        agent.send_token("boot-1", "t");
        agent.wait_for("token accepted");
        let c = agent.client().await;
        (agent, c)
    }

    /// A client over TLS pinned to the announced certificate, carrying no
    /// token by itself.
    async fn client(&self) -> MasterAgentClient<Channel> {
        let channel = ferry_dispatcher::client::channel(&self.announcement, None, &timeouts())
            .await
            .expect("connect");
        MasterAgentClient::new(channel)
    }
}

fn timeouts() -> ferry_dispatcher::device::Timeouts {
    ferry_dispatcher::device::Timeouts {
        rpc: Duration::from_secs(10),
        ..Default::default()
    }
}

type DeployStream = tokio_stream::Iter<std::vec::IntoIter<pb::DeployRequest>>;

/// A Deploy call writing `data` (claimed to hash to `sha256`) to `partition`.
fn deploy_req(
    partition: &str,
    data: Vec<u8>,
    sha256: String,
    token: &str,
) -> Request<DeployStream> {
    let header = pb::DeployHeader {
        partition: partition.into(),
        sha256,
        compression: pb::Compression::None as i32,
        source_size: data.len() as u64,
        source_name: "test".into(),
        ..Default::default()
    };
    let msgs = vec![
        pb::DeployRequest {
            msg: Some(pb::deploy_request::Msg::Header(header)),
        },
        pb::DeployRequest {
            msg: Some(pb::deploy_request::Msg::Data(data)),
        },
    ];
    authed(tokio_stream::iter(msgs), token)
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    ferry_proto::hex(&sha2::Sha256::digest(data))
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
    let (agent, mut c) = Agent::authed().await;

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

    let deploy = |partition: &str, data: Vec<u8>, _size: u64| {
        deploy_req(partition, data, "0".repeat(64), "t")
    };
    // Never written, whatever the caller names: each refused before a byte.
    for (partition, why) in [
        ("bootsel", "boot selection"),
        ("masterroot", "boots from it"),
        ("unlisted", "not in this board's `allowed_partitions`"),
        ("nope", "not in this board's `allowed_partitions`"),
    ] {
        let before = std::fs::read(agent.dir.path().join(partition)).ok();
        let e = done(c.deploy(deploy(partition, vec![1; 10], 10)))
            .await
            .expect_err(partition);
        assert_eq!(
            e.code(),
            Code::PermissionDenied,
            "{partition}: {}",
            e.message()
        );
        assert!(e.message().contains(why), "{partition}: {}", e.message());
        assert_eq!(
            std::fs::read(agent.dir.path().join(partition)).ok(),
            before,
            "{partition} unchanged"
        );
    }
    for bad in ["../small", "small/", ".hidden", "a b"] {
        let e = done(c.deploy(deploy(bad, vec![1; 10], 10)))
            .await
            .expect_err(bad);
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {}", e.message());
    }
    assert_eq!(agent.file("small"), vec![0u8; 4096], "small unchanged");
    // Allowed, but the board has no such partition.
    let e = done(c.deploy(deploy("gone", vec![1; 10], 10)))
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
        ..Default::default()
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
    let e = done(c.deploy(deploy("small", vec![1; 8192], 8192)))
        .await
        .expect_err("too big");
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    let e = done(c.deploy(deploy("small", vec![1; 100], 100)))
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

#[tokio::test]
async fn a_mounted_partition_or_an_unreadable_mount_table_is_never_written() {
    let (agent, mut c) = Agent::authed().await;
    let table = agent.dir.path().join("mountinfo");
    let small = agent.dir.path().join("small");
    let image = vec![7u8; 100];

    let mounted = format!(
        "{ROOT_MOUNT}40 22 7:3 / /mnt/small rw - ext4 {} rw\n",
        small.display()
    );
    for (state, code, why) in [
        (
            Some(mounted.as_str()),
            Code::PermissionDenied,
            "mounted at /mnt/small",
        ),
        (
            Some("22 1 254:0 / / rw\n"),
            Code::FailedPrecondition,
            "cannot tell what is mounted",
        ),
        (
            None,
            Code::FailedPrecondition,
            "cannot tell what is mounted",
        ),
    ] {
        match state {
            Some(text) => std::fs::write(&table, text).expect("w"),
            None => std::fs::remove_file(&table).expect("rm"),
        }
        let e = done(c.deploy(deploy_req("small", image.clone(), sha256(&image), "t")))
            .await
            .expect_err(why);
        assert_eq!(
            (e.code(), e.message().contains(why)),
            (code, true),
            "{}",
            e.message()
        );
        assert_eq!(
            agent.file("small"),
            vec![0u8; 4096],
            "{why}: small unchanged"
        );
    }
    // The same call lands once the table says it may: the refusals were the mount state.
    std::fs::write(&table, ROOT_MOUNT).expect("w");
    done(c.deploy(deploy_req("small", image.clone(), sha256(&image), "t")))
        .await
        .expect("unmounted");
    assert_eq!(&agent.file("small")[..100], &image[..]);
}

/// Runs a command the Linux-platform tests need (root, util-linux, e2fsprogs).
fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd}: {e} (the Linux platform tests need util-linux and e2fsprogs)")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {} (the Linux platform tests need root and loop devices)",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A 4 MiB loop device, unmounted and detached on drop.
struct Loop {
    dev: String,
    mounted: Option<std::path::PathBuf>,
    _backing: tempfile::NamedTempFile,
}

impl Loop {
    fn new() -> Self {
        let backing = tempfile::NamedTempFile::new().expect("tmp");
        backing.as_file().set_len(4 << 20).expect("size");
        let dev = sh(
            "losetup",
            &["--find", "--show", &backing.path().display().to_string()],
        );
        Loop {
            dev,
            mounted: None,
            _backing: backing,
        }
    }

    fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    fn head(&self) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.dev).expect("open loop");
        let mut buf = vec![0u8; 1 << 16];
        std::io::Read::read_exact(&mut f, &mut buf).expect("read loop");
        buf
    }

    fn mount(&mut self, at: &std::path::Path) {
        sh("mkfs.ext4", &["-q", "-F", &self.dev]);
        sh("mount", &[&self.dev, &at.display().to_string()]);
        self.mounted = Some(at.into());
    }

    fn unmount(&mut self) {
        if let Some(at) = self.mounted.take() {
            sh("umount", &[&at.display().to_string()]);
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(at) = self.mounted.take() {
            let _ = Command::new("umount").arg(at).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A Linux-platform agent whose sysfs lists `parts` as (device, GPT name,
/// major:minor), device nodes under `dev`, reading `mountinfo`.
fn linux_agent(
    parts: &[(&str, &str, &str)],
    dev: &std::path::Path,
    mountinfo: &std::path::Path,
) -> Agent {
    let dir = tempfile::tempdir().expect("tmp");
    for (node, label, majmin) in parts {
        let d = dir.path().join("block").join(node);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("partition"), "1").expect("w");
        std::fs::write(
            d.join("uevent"),
            format!("DEVNAME={node}\nPARTNAME={label}\n"),
        )
        .expect("w");
        std::fs::write(d.join("size"), "8192\n").expect("w");
        std::fs::write(d.join("dev"), format!("{majmin}\n")).expect("w");
    }
    std::fs::write(
        dir.path().join("agent.yaml"),
        format!(
            "listen: 127.0.0.1:0\ntest_agent_bundle: missing.tgz\nannounce_interval: 200ms\n\
             allowed_partitions: [testrootfs]\nplatform:\n  linux:\n    sysfs_block: {}\n    dev: {}\n    mountinfo: {}\n",
            dir.path().join("block").display(),
            dev.display(),
            mountinfo.display()
        ),
    )
    .expect("w");
    let mut agent = Agent::launch(dir);
    agent.send_token("boot-1", "t");
    agent.wait_for("token accepted");
    agent
}

#[tokio::test]
async fn a_second_partition_labelled_like_the_target_is_refused_before_a_byte() {
    let dev = tempfile::tempdir().expect("tmp");
    for node in ["vdb2", "vdb9"] {
        std::fs::write(dev.path().join(node), [0xee; 4096]).expect("w");
    }
    let table = dev.path().join("mountinfo");
    std::fs::write(&table, ROOT_MOUNT).expect("w");
    let agent = linux_agent(
        &[
            ("vdb2", "testrootfs", "4095:2"),
            ("vdb9", "testrootfs", "4095:9"),
        ],
        dev.path(),
        &table,
    );
    let mut c = agent.client().await;
    let image = vec![7u8; 100];
    let e = done(c.deploy(deploy_req("testrootfs", image.clone(), sha256(&image), "t")))
        .await
        .expect_err("duplicate label");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("carried by 2 partitions"),
        "{}",
        e.message()
    );
    for node in ["vdb2", "vdb9"] {
        assert_eq!(
            std::fs::read(dev.path().join(node)).expect("r"),
            [0xee; 4096],
            "{node}"
        );
    }
}

#[tokio::test]
async fn a_claimed_or_mounted_block_device_is_refused_before_a_byte() {
    let mut lo = Loop::new();
    let majmin = std::fs::read_to_string(format!("/sys/class/block/{}/dev", lo.name()))
        .expect("loop dev")
        .trim()
        .to_string();
    let parts = [(lo.name().to_string(), "testrootfs", majmin.as_str())];
    let parts: Vec<(&str, &str, &str)> =
        parts.iter().map(|(a, b, c)| (a.as_str(), *b, *c)).collect();
    let tmp = tempfile::tempdir().expect("tmp");
    // A mount table that says nothing is mounted: only O_EXCL can catch it.
    let lying = tmp.path().join("mountinfo");
    std::fs::write(&lying, ROOT_MOUNT).expect("w");
    let blind = linux_agent(&parts, Path::new("/dev"), &lying);
    let mut c = blind.client().await;
    let image = vec![7u8; 100];
    let call = |c: &mut MasterAgentClient<Channel>| {
        let mut c = c.clone();
        let image = image.clone();
        async move { done(c.deploy(deploy_req("testrootfs", image.clone(), sha256(&image), "t"))).await }
    };

    // Claimed by another exclusive opener.
    let before = lo.head();
    let claim = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(&lo.dev)
        .expect("claim");
    let e = call(&mut c).await.expect_err("claimed");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("in use"), "{}", e.message());
    drop(claim);
    assert_eq!(lo.head(), before, "claimed device unchanged");

    // Mounted, with a mount table that does not say so.
    let at = tmp.path().join("mnt");
    std::fs::create_dir(&at).expect("mkdir");
    lo.mount(&at);
    let before = lo.head();
    let e = call(&mut c).await.expect_err("mounted");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("in use"), "{}", e.message());
    // Mounted, seen in the real mount table.
    let seeing = linux_agent(&parts, Path::new("/dev"), Path::new("/proc/self/mountinfo"));
    let mut c2 = seeing.client().await;
    let e = call(&mut c2).await.expect_err("mounted");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("mounted at"), "{}", e.message());
    assert_eq!(lo.head(), before, "mounted device unchanged");

    // Released, the same call lands: the refusals were the claim and the mount.
    lo.unmount();
    call(&mut c2).await.expect("free device");
    assert_eq!(&lo.head()[..100], &image[..]);
}

#[tokio::test]
async fn hostile_records_are_refused_and_reported_and_the_fetch_completes() {
    let (agent, mut c) = Agent::authed().await;
    let rec = agent.dir.path().join("root/ferry/records");
    std::fs::create_dir_all(&rec).expect("mkdir");
    let torn = b"{\"kind\":\"agent-started\"}\n{\"kind\":\"resu".to_vec();
    std::fs::write(rec.join("records.jsonl"), &torn).expect("w");
    let binary = vec![0xc3, 0x28, 0xff, 0x00, b'\n'];
    std::fs::write(rec.join("z.bin"), &binary).expect("w");
    std::fs::File::create(rec.join("sparse"))
        .expect("create")
        .set_len(10 << 30)
        .expect("10 GiB sparse");
    nix::unistd::mkfifo(&rec.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    std::fs::write(agent.dir.path().join("secret"), "master's own").expect("w");
    std::os::unix::fs::symlink("../../../secret", rec.join("escape")).expect("symlink");

    let mut stream = tokio::time::timeout(
        Duration::from_secs(20),
        c.fetch_results(authed(
            pb::FetchResultsRequest {
                partition: "testrootfs".into(),
            },
            "t",
        )),
    )
    .await
    .expect("no hang")
    .expect("fetch")
    .into_inner();
    let mut files: Vec<(String, Vec<u8>, bool)> = Vec::new();
    let mut refused = Vec::new();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("no hang")
        .expect("stream")
    {
        if let Some(r) = m.refused {
            refused.push((r.path, r.reason, r.truncated));
            continue;
        }
        match files.last_mut() {
            Some(f) if f.0 == m.path && !f.2 => {
                f.1.extend_from_slice(&m.data);
                f.2 = m.eof;
            }
            _ => files.push((m.path, m.data, m.eof)),
        }
    }
    let got: Vec<_> = files
        .iter()
        .map(|f| (f.0.as_str(), f.1.len(), f.2))
        .collect();
    assert_eq!(
        got,
        [
            ("records.jsonl", torn.len(), true),
            ("sparse", 65536, true),
            ("z.bin", 5, true)
        ]
    );
    assert_eq!(files[0].1, torn, "a torn last record comes back as it is");
    assert_eq!(files[2].1, binary, "invalid UTF-8 comes back byte-exact");
    let reasons: Vec<_> = refused.iter().map(|r| (r.0.as_str(), r.2)).collect();
    assert_eq!(
        reasons,
        [("escape", false), ("fifo", false), ("sparse", true)],
        "{refused:?}"
    );
    assert!(refused[0].1.contains("symlink"), "{refused:?}");
    assert!(refused[1].1.contains("FIFO"), "{refused:?}");
    assert!(refused[2].1.contains("65536 of 10737418240"), "{refused:?}");
}

/// Every RPC of the service, called with `token` (none when `None`):
/// (name, status). The names must cover `master.proto`'s `rpc` lines.
async fn call_every_rpc(
    c: &mut MasterAgentClient<Channel>,
    token: Option<&str>,
) -> Vec<(&'static str, tonic::Status)> {
    fn req<T>(msg: T, token: Option<&str>) -> Request<T> {
        match token {
            Some(t) => authed(msg, t),
            None => Request::new(msg),
        }
    }
    let header = pb::DeployRequest {
        msg: Some(pb::deploy_request::Msg::Header(pb::DeployHeader {
            partition: "small".into(),
            sha256: "0".repeat(64),
            compression: pb::Compression::None as i32,
            source_size: 4,
            source_name: "x".into(),
            ..Default::default()
        })),
    };
    let data = pb::DeployRequest {
        msg: Some(pb::deploy_request::Msg::Data(vec![0xff; 4])),
    };
    let part = || "testrootfs".to_string();
    let mut out = Vec::new();
    let mut push = |name, r: Result<(), tonic::Status>| {
        out.push((name, r.expect_err(name)));
    };
    push(
        "GetInfo",
        c.get_info(req(pb::GetInfoRequest {}, token))
            .await
            .map(drop),
    );
    push(
        "Deploy",
        done(c.deploy(req(tokio_stream::iter(vec![header, data]), token)))
            .await
            .map(drop),
    );
    push(
        "InstallTestAgent",
        c.install_test_agent(req(
            pb::InstallTestAgentRequest {
                partition: part(),
                plan: None,
            },
            token,
        ))
        .await
        .map(drop),
    );
    push(
        "SetBootOnce",
        c.set_boot_once(req(pb::SetBootOnceRequest { partition: part() }, token))
            .await
            .map(drop),
    );
    push(
        "Reboot",
        c.reboot(req(pb::RebootRequest {}, token)).await.map(drop),
    );
    push(
        "FetchResults",
        c.fetch_results(req(pb::FetchResultsRequest { partition: part() }, token))
            .await
            .map(drop),
    );
    let marker = std::env::temp_dir().join(format!("ferry-exec-unauthed-{}", std::process::id()));
    let start = pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Start(pb::ExecStart {
            argv: vec!["touch".into(), marker.display().to_string()],
            timeout_ms: 5000,
            ..Default::default()
        })),
    };
    push(
        "Exec",
        c.exec(req(tokio_stream::iter(vec![start]), token))
            .await
            .map(drop),
    );
    assert!(!marker.exists(), "Exec ran a command without the token");
    out
}

/// The `rpc` names declared in `master.proto`.
fn declared_rpcs() -> Vec<String> {
    include_str!("../../proto/proto/ferry/master/v1/master.proto")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(|n| n.trim().to_string())
        .collect()
}

#[tokio::test]
async fn every_rpc_refuses_a_missing_or_wrong_token_and_does_nothing() {
    let mut agent = Agent::start();
    let mut c = agent.client().await;
    agent.send_token("boot-1", "right");
    agent.wait_for("token accepted");
    for token in [None, Some("wrong"), Some("right2"), Some("")] {
        let refused = call_every_rpc(&mut c, token).await;
        let mut names: Vec<String> = refused.iter().map(|(n, _)| n.to_string()).collect();
        let mut declared = declared_rpcs();
        names.sort();
        declared.sort();
        assert_eq!(names, declared, "the table covers every rpc");
        for (name, status) in refused {
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{name} with {token:?}: {}",
                status.message()
            );
        }
    }
    // Nothing was done: not rebooted, nothing written, nothing selected.
    let info = c
        .get_info(authed(pb::GetInfoRequest {}, "right"))
        .await
        .expect("the right token still works")
        .into_inner();
    assert_eq!(info.state, "ready");
    let small = agent.file("small");
    assert!(small.iter().all(|b| *b == 0), "Deploy wrote bytes");
}

#[tokio::test]
async fn tls_is_pinned_to_the_announced_certificate_and_required() {
    let mut agent = Agent::start();
    let announced = agent
        .announcement
        .cert
        .clone()
        .expect("cert= in the announcement");
    assert!(ferry_proto::is_sha256(&announced), "{announced}");
    agent.send_token("boot-1", "t");
    agent.wait_for("token accepted");

    // A dispatcher pinned to another certificate refuses this server at
    // once (before any token is sent), naming both fingerprints.
    let mut forged = agent.announcement.clone();
    forged.cert = Some("ab".repeat(32));
    let started = std::time::Instant::now();
    let e = ferry_dispatcher::client::channel(&forged, None, &timeouts())
        .await
        .expect_err("another certificate");
    assert!(
        e.message.contains(&announced) && e.message.contains(&"ab".repeat(32)),
        "{}",
        e.message
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused without retrying until the deadline"
    );

    // An announcement without a fingerprint is not dialed at all.
    let mut bare = agent.announcement.clone();
    bare.cert = None;
    let e = ferry_dispatcher::client::channel(&bare, None, &timeouts())
        .await
        .expect_err("no fingerprint");
    assert!(
        e.message.contains("no certificate fingerprint"),
        "{}",
        e.message
    );

    // Without TLS the agent cannot be called at all, even with the token.
    let addr = agent.announcement.addr.expect("addr");
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5));
    if let Ok(channel) = plain.connect().await {
        let e = MasterAgentClient::new(channel)
            .get_info(authed(pb::GetInfoRequest {}, "t"))
            .await
            .expect_err("plaintext");
        assert_ne!(e.code(), Code::Ok);
    }

    // Pinned to the announced certificate, the call goes through.
    let info = agent
        .client()
        .await
        .get_info(authed(pb::GetInfoRequest {}, "t"))
        .await
        .expect("pinned")
        .into_inner();
    assert_eq!(info.boot_id, "boot-1");
}

#[tokio::test]
async fn a_deploy_reports_its_progress_while_the_image_streams_then_its_result() {
    let (_agent, mut c) = Agent::authed().await;
    let image: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = pb::DeployHeader {
        partition: "small".into(),
        sha256: sha256(&image),
        source_size: image.len() as u64,
        ..Default::default()
    };
    let send = |m| pb::DeployRequest { msg: Some(m) };
    tx.send(send(pb::deploy_request::Msg::Header(header)))
        .await
        .expect("send");
    tx.send(send(pb::deploy_request::Msg::Data(image[..1000].to_vec())))
        .await
        .expect("send");
    let mut events = c
        .deploy(authed(tokio_stream::wrappers::ReceiverStream::new(rx), "t"))
        .await
        .expect("call")
        .into_inner();
    // The rest is held back until the agent has said it has the first 1000 bytes.
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events
                .message()
                .await
                .expect("stream")
                .expect("event")
                .event
            {
                Some(pb::deploy_event::Event::Progress(p)) if p.bytes_received == 1000 => break p,
                Some(pb::deploy_event::Event::Done(r)) => panic!("done before all data: {r:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("a progress event for the first 1000 bytes");
    assert_eq!((seen.source_size, seen.stage.as_str()), (4096, "writing"));
    tx.send(send(pb::deploy_request::Msg::Data(image[1000..].to_vec())))
        .await
        .expect("send");
    drop(tx);
    let reply = loop {
        match events
            .message()
            .await
            .expect("stream")
            .expect("event")
            .event
        {
            Some(pb::deploy_event::Event::Done(r)) => break r,
            _ => {}
        }
    };
    assert_eq!(reply.bytes_received, 4096);
    assert!(
        events.message().await.expect("end").is_none(),
        "the result is last"
    );
}

#[tokio::test]
async fn oversized_messages_and_calls_that_never_end_are_cut_off() {
    let (agent, mut c) = Agent::authed_with("max_message_bytes: 1048576\ncall_timeout: 2s\n").await;

    let big = vec![1u8; 2 << 20];
    let e = done(c.deploy(deploy_req("small", big.clone(), sha256(&big), "t")))
        .await
        .expect_err("too large");
    assert!(
        e.message().contains("too large"),
        "{:?}: {}",
        e.code(),
        e.message()
    );

    // A caller that sends a header and then nothing, with no deadline of its own.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let header = pb::DeployHeader {
        partition: "small".into(),
        sha256: "0".repeat(64),
        ..Default::default()
    };
    tx.send(pb::DeployRequest {
        msg: Some(pb::deploy_request::Msg::Header(header)),
    })
    .await
    .expect("send");
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        done(c.deploy(authed(tokio_stream::wrappers::ReceiverStream::new(rx), "t"))),
    )
    .await
    .expect("the agent ends the call")
    .expect_err("cut off");
    assert_eq!(e.code(), Code::Cancelled, "{}", e.message());
    println!("silent call ended after {:?}", started.elapsed());
    drop(tx);

    // The partition is free again once the abandoned writer has stopped.
    let image = vec![9u8; 100];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match done(c.deploy(deploy_req("small", image.clone(), sha256(&image), "t"))).await {
            Ok(_) => break,
            Err(e) if e.message().contains("busy") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{:?}: {}", e.code(), e.message()),
        }
    }
    assert_eq!(&agent.file("small")[..100], &image[..]);
}

#[tokio::test]
async fn a_caller_that_stops_reading_results_does_not_hold_the_partition() {
    let (agent, mut c) = Agent::authed_with("stream_idle_timeout: 1s\n").await;
    let rec = agent.dir.path().join("root/ferry/records");
    std::fs::create_dir_all(&rec).expect("mkdir");
    // More than every buffer on the way holds, so the agent must wait for its reader.
    for i in 0..100 {
        std::fs::write(rec.join(format!("f{i:03}")), vec![b'r'; 65536]).expect("w");
    }
    let fetch = |c: &mut MasterAgentClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.fetch_results(authed(
                pb::FetchResultsRequest {
                    partition: "testrootfs".into(),
                },
                "t",
            ))
            .await
            .expect("fetch")
            .into_inner()
        }
    };
    let mut stalled = fetch(&mut c).await;
    stalled.message().await.expect("first chunk").expect("some");
    // `stalled` is never read again; a second fetch gets the partition once
    // the agent gives up on it.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let bytes = loop {
        let mut s = fetch(&mut c).await;
        let mut bytes = 0;
        let outcome = loop {
            match s.message().await {
                Ok(Some(m)) => bytes += m.data.len(),
                Ok(None) => break Ok(bytes),
                Err(e) => break Err(e),
            }
        };
        match outcome {
            Ok(n) => break n,
            Err(e) if e.message().contains("busy") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{:?}: {}", e.code(), e.message()),
        }
    };
    assert_eq!(bytes, 100 * 65536);
    drop(stalled);
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_a_closed_one_makes_room() {
    let (agent, mut c) = Agent::authed_with("max_connections: 2\n").await;
    let short = ferry_dispatcher::device::Timeouts {
        rpc: Duration::from_secs(2),
        ..Default::default()
    };
    let connect = || ferry_dispatcher::client::channel(&agent.announcement, None, &short);
    // `c` and this one are open; a third is refused.
    let second = connect().await.expect("second connection");
    connect().await.expect_err("a third connection");
    c.get_info(authed(pb::GetInfoRequest {}, "t"))
        .await
        .expect("the open ones still serve");
    drop(second);
    let mut third = MasterAgentClient::new(connect().await.expect("room again"));
    third
        .get_info(authed(pb::GetInfoRequest {}, "t"))
        .await
        .expect("served");
}

/// Runs argv through Exec with `stdin`; returns (stdout, stderr, the end).
async fn exec(
    c: &mut MasterAgentClient<Channel>,
    argv: &[&str],
    stdin: &[u8],
    timeout_ms: u64,
) -> (String, String, Result<pb::exec_exit::Status, tonic::Status>) {
    let mut msgs = vec![pb::ExecRequest {
        msg: Some(pb::exec_request::Msg::Start(pb::ExecStart {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: [("GREETING".to_string(), "hello".to_string())].into(),
            cwd: "/".into(),
            timeout_ms,
        })),
    }];
    if !stdin.is_empty() {
        msgs.push(pb::ExecRequest {
            msg: Some(pb::exec_request::Msg::Stdin(stdin.to_vec())),
        });
    }
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let mut replies = match c.exec(authed(tokio_stream::iter(msgs), "t")).await {
        Ok(r) => r.into_inner(),
        Err(s) => return (String::new(), String::new(), Err(s)),
    };
    let end = loop {
        match replies.message().await {
            Ok(Some(pb::ExecReply { msg: Some(m) })) => match m {
                pb::exec_reply::Msg::Stdout(b) => o.extend(b),
                pb::exec_reply::Msg::Stderr(b) => e.extend(b),
                pb::exec_reply::Msg::Exit(x) => {
                    break x.status.ok_or_else(|| tonic::Status::unknown("no status"))
                }
            },
            Ok(_) => break Err(tonic::Status::unknown("stream ended without an exit")),
            Err(s) => break Err(s),
        }
    };
    (
        String::from_utf8_lossy(&o).into(),
        String::from_utf8_lossy(&e).into(),
        end,
    )
}

#[tokio::test]
async fn exec_streams_output_and_status_and_maps_its_errors() {
    let (_agent, mut c) = Agent::authed_with("exec_max_timeout: 10s\n").await;
    let (o, e, end) = exec(
        &mut c,
        &[
            "sh",
            "-c",
            "cat; echo \"$GREETING from $(pwd)\"; echo err >&2; exit 7",
        ],
        b"in\n",
        5000,
    )
    .await;
    assert_eq!((o.as_str(), e.as_str()), ("in\nhello from /\n", "err\n"));
    assert_eq!(end.expect("exit"), pb::exec_exit::Status::Code(7));

    let (_, _, end) = exec(&mut c, &["sh", "-c", "kill -KILL $$"], b"", 5000).await;
    assert_eq!(end.expect("exit"), pb::exec_exit::Status::Signal(9));

    let (o, _, end) = exec(&mut c, &["sh", "-c", "echo before; sleep 30"], b"", 500).await;
    assert_eq!(o, "before\n", "output before the timeout arrives");
    assert_eq!(end.expect_err("timeout").code(), Code::DeadlineExceeded);

    for (argv, timeout, code) in [
        (&["/nonexistent/ferry-no-such"][..], 1000, Code::NotFound),
        (&[][..], 1000, Code::InvalidArgument),
        (&["true"][..], 60_000, Code::InvalidArgument),
        (&["true"][..], 0, Code::InvalidArgument),
    ] {
        let (_, _, end) = exec(&mut c, argv, b"", timeout).await;
        assert_eq!(end.expect_err("refused").code(), code, "{argv:?} {timeout}");
    }
}

/// Reads a Deploy reply stream to its result (progress is skipped).
async fn done(
    call: impl std::future::Future<
        Output = Result<tonic::Response<tonic::Streaming<pb::DeployEvent>>, tonic::Status>,
    >,
) -> Result<pb::DeployReply, tonic::Status> {
    let mut events = call.await?.into_inner();
    while let Some(e) = events.message().await? {
        if let Some(pb::deploy_event::Event::Done(r)) = e.event {
            return Ok(r);
        }
    }
    Err(tonic::Status::unknown("no result"))
}
