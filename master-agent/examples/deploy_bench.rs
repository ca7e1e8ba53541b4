//! Deploy benchmark: Ferry's deploy pipeline against the shell pipelines
//! labs use, on the same inputs and the same file-backed partition.
//!
//! `cargo run --release -p ferry-master-agent --example deploy_bench [-- DIR]`
//! (DIR: where the inputs and the partition file go; default a temporary
//! folder). `FERRY_BENCH_MIB` sets the image size (default 1024),
//! `FERRY_BENCH_RUNS` the repetitions (default 3; medians are printed),
//! `FERRY_BENCH_CASES` a comma-separated list of words picking cases by name.
//! Needs gzip, xz, zstd, dd and, for the sparse peer, bmaptool.
//!
//! Throttled target (`FERRY_BENCH_THROTTLE_MBPS`, default 100; 0 skips):
//! as root, a loop device over a file in DIR, writes limited by the cgroup
//! v1 `blkio.throttle.write_bps_device` (or cgroup v2 `io.max`) of a cgroup
//! this process moves into (the peers, its children, follow it): slow
//! media, where skipping holes is the gain. When neither works it says why
//! and skips those cases.
//!
//! Ferry runs in this process through the simulated board's platform code
//! (a file partition opened by `SimPlatform`), without the gRPC hop; its
//! peak memory is this process's high-water mark (`VmHWM`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ferry_master_agent::deploy::{self, Bmap, Compression, ImageSpec};
use ferry_master_agent::platform::sim::{SimConfig, SimPartition, SimPlatform};
use ferry_master_agent::platform::{Platform, WriteTarget};
use sha2::{Digest, Sha256};

fn sh(cmd: &str) -> f64 {
    let t = Instant::now();
    let st = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .status()
        .expect("bash");
    assert!(st.success(), "{cmd} failed");
    t.elapsed().as_secs_f64()
}

fn sha_file(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).expect("open");
    std::io::copy(&mut f, &mut h).expect("read");
    ferry_proto::hex(&h.finalize())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A fresh partition file of `size` bytes (so every run writes the same).
fn fresh_partition(path: &Path, size: u64) {
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("size");
}

fn ferry(target: impl FnOnce() -> WriteTarget, input: &Path, bmap: Option<&Bmap>) -> f64 {
    let sha = sha_file(input);
    let t = Instant::now();
    let target = target();
    let spec = ImageSpec {
        partition: "part".into(),
        sha256: sha,
        compression: Compression::Detect,
        source_size: std::fs::metadata(input).expect("meta").len(),
        bmap: bmap.cloned(),
        readback: false,
        progress: Default::default(),
    };
    let file = std::fs::File::open(input).expect("open");
    deploy::write_image(file, target, &spec).expect("deploy");
    t.elapsed().as_secs_f64()
}

/// A loop device over a file, its writes throttled to `mbps` MB/s for this
/// process (and its children) through a cgroup; undone on drop.
struct Throttled {
    device: PathBuf,
    cgroup: PathBuf,
    root_procs: PathBuf,
}

impl Throttled {
    fn new(backing: &Path, size: u64, mbps: u64) -> Result<Self, String> {
        let f = std::fs::File::create(backing).map_err(|e| e.to_string())?;
        f.set_len(size).map_err(|e| e.to_string())?;
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&device)
            .map_err(|e| e.to_string())?
            .rdev();
        let dev = format!(
            "{}:{}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        );
        let bps = mbps * 1_000_000;
        let name = format!("ferry-bench-{}", std::process::id());
        let attempt = || -> Result<(PathBuf, PathBuf), String> {
            let v2 = Path::new("/sys/fs/cgroup");
            let v2_ok = std::fs::read_to_string(v2.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|w| w == "io"));
            if v2_ok {
                let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+io");
                let cg = v2.join(&name);
                std::fs::create_dir(&cg).map_err(|e| format!("cgroup v2: {e}"))?;
                std::fs::write(cg.join("io.max"), format!("{dev} wbps={bps}"))
                    .map_err(|e| format!("io.max: {e}"))?;
                return Ok((cg, v2.join("cgroup.procs")));
            }
            let v1 = Path::new("/sys/fs/cgroup/blkio");
            let cg = v1.join(&name);
            std::fs::create_dir(&cg)
                .map_err(|e| format!("no cgroup v2 io controller; blkio v1: {e}"))?;
            std::fs::write(
                cg.join("blkio.throttle.write_bps_device"),
                format!("{dev} {bps}"),
            )
            .map_err(|e| format!("blkio.throttle.write_bps_device: {e}"))?;
            Ok((cg, v1.join("cgroup.procs")))
        };
        let (cgroup, root_procs) = attempt().inspect_err(|_| {
            let _ = Command::new("losetup").arg("-d").arg(&device).status();
        })?;
        let t = Throttled {
            device,
            cgroup,
            root_procs,
        };
        std::fs::write(
            t.cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .map_err(|e| format!("joining the cgroup: {e}"))?;
        Ok(t)
    }

    fn target(&self) -> WriteTarget {
        use std::io::Seek;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.device)
            .expect("open loop device");
        let capacity = file.seek(std::io::SeekFrom::End(0)).expect("size");
        WriteTarget {
            file,
            capacity,
            path: self.device.clone(),
            readback_fault: None,
        }
    }
}

impl Drop for Throttled {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.root_procs, std::process::id().to_string());
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// A case: its name, Ferry's input, the bmap Ferry uses, the peer's command.
type Case<'b> = (&'static str, String, Option<&'b Bmap>, String);

/// The 75%-holes cases on `target`: without a bmap against `dd`, with one
/// against `bmaptool copy`.
fn holes_cases<'b>(
    sparse: &str,
    bmap: Option<&'b Bmap>,
    bmap_file: &str,
    target: &str,
    dd: &dyn Fn(&str) -> String,
) -> Vec<Case<'b>> {
    let mut cases = vec![(
        "75% holes, no bmap",
        sparse.to_string(),
        None,
        dd(&format!("if={sparse}")),
    )];
    if let Some(b) = bmap {
        cases.push((
            "75% holes, bmap",
            sparse.to_string(),
            Some(b),
            format!("bmaptool -q copy --bmap {bmap_file} {sparse} {target}"),
        ));
    }
    cases
}

/// Times each case for Ferry and its peer, `runs` times each, and prints medians.
fn run_cases(
    prefix: &str,
    cases: &[Case],
    runs: usize,
    fresh: &dyn Fn(),
    open: &dyn Fn() -> WriteTarget,
) {
    // FERRY_BENCH_CASES: only the cases whose name holds one of these words.
    let only = std::env::var("FERRY_BENCH_CASES").unwrap_or_default();
    for (name, input, bmap, peer) in cases {
        let full = format!("{prefix}{name}");
        if !only.is_empty() && !only.split(',').any(|w| full.contains(w.trim())) {
            continue;
        }
        let (mut f, mut q) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            fresh();
            f.push(ferry(open, Path::new(input), *bmap));
            fresh();
            q.push(sh(peer));
        }
        let (fm, qm) = (median(f), median(q));
        let name = format!("{prefix}{name}");
        println!("{name:<30} {fm:>8.2} {qm:>8.2} {:>11.2}  {peer}", fm / qm);
    }
}

fn main() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = env("FERRY_BENCH_MIB", 1024);
    let throttle_mbps = env("FERRY_BENCH_THROTTLE_MBPS", 100);
    let runs = env("FERRY_BENCH_RUNS", 3) as usize;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| tmp.path().to_path_buf(), PathBuf::from);
    std::fs::create_dir_all(&dir).expect("dir");
    let d = |n: &str| dir.join(n).display().to_string();
    let part = dir.join("partition");
    let size = mib << 20;

    // Inputs: a dense image of base64 text (compresses about 4:3, like a
    // rootfs of binaries), and a sparse one: the same with 3 of every 4
    // MiB zero (holes).
    // Inputs a previous run left in DIR (complete: the zstd file is made
    // last) are reused: making the xz file takes minutes.
    let made = std::fs::metadata(d("dense.img")).is_ok_and(|m| m.len() == size)
        && std::fs::metadata(d("dense.img.zst")).is_ok();
    if made {
        eprintln!(
            "deploy_bench: reusing the {mib} MiB inputs in {}",
            dir.display()
        );
    } else {
        eprintln!("deploy_bench: making {mib} MiB inputs in {}", dir.display());
        sh(&format!(
        "set -e; head -c 48M /dev/urandom | base64 -w0 > {seed}; \
         for i in $(seq 1 {reps}); do cat {seed}; done | head -c {size} > {dense}; \
         cp {dense} {sparse}; \
         for i in $(seq 0 {last}); do [ $((i % 4)) -eq 0 ] || fallocate -p -o $((i * 1048576)) -l 1048576 {sparse}; done; \
         gzip -6 -c {dense} > {dense}.gz & xz -T2 -6 -c {dense} > {dense}.xz; wait; zstd -q -3 -c {dense} > {dense}.zst",
        seed = d("seed"),
        reps = mib / 64 + 1,
        dense = d("dense.img"),
        sparse = d("sparse.img"),
        last = mib - 1,
    ));
    }
    let bmap = if Command::new("bmaptool").arg("--version").output().is_ok() {
        sh(&format!(
            "bmaptool -q create -o {} {}",
            d("sparse.bmap"),
            d("sparse.img")
        ));
        Some(Bmap::parse(&std::fs::read_to_string(d("sparse.bmap")).expect("bmap")).expect("parse"))
    } else {
        eprintln!(
            "deploy_bench: no bmaptool (apt-get install bmap-tools): sparse with bmap skipped"
        );
        None
    };

    let sim = SimConfig {
        partitions: [("part".to_string(), SimPartition::File(part.clone()))].into(),
        mountinfo: None,
        mkfs: Default::default(),
        readback_fault: None,
    };
    let platform = SimPlatform::new(sim, "bootsel".into());
    let p = part.display();
    let dd = |input: &str| {
        format!("dd of={p} bs=1M conv=notrunc,fsync status=none iflag=fullblock {input}")
    };
    let (dense, sparse) = (d("dense.img"), d("sparse.img"));
    let mut cases: Vec<Case> = vec![
        ("raw vs dd", dense.clone(), None, dd(&format!("if={dense}"))),
        (
            "raw vs tee sha256|dd",
            dense.clone(),
            None,
            format!("tee < {dense} >(sha256sum > /dev/null) | {}", dd("")),
        ),
        (
            "gzip",
            format!("{dense}.gz"),
            None,
            format!("gzip -dc {dense}.gz | {}", dd("")),
        ),
        (
            "xz",
            format!("{dense}.xz"),
            None,
            format!("xz -dc {dense}.xz | {}", dd("")),
        ),
        (
            "zstd",
            format!("{dense}.zst"),
            None,
            format!("zstd -qdc {dense}.zst | {}", dd("")),
        ),
    ];
    cases.extend(holes_cases(
        &sparse,
        bmap.as_ref(),
        &d("sparse.bmap"),
        &p.to_string(),
        &dd,
    ));
    println!("deploy_bench: {mib} MiB images, {runs} runs, medians in seconds; partition {p}");
    println!(
        "{:<30} {:>8} {:>8} {:>11}  peer",
        "case", "ferry", "peer", "ferry/peer"
    );
    let fresh_file = || {
        fresh_partition(&part, size + (64 << 20));
        sh("sync");
    };
    let open_file = || platform.open_for_write("part").expect("open");
    run_cases("", &cases, runs, &fresh_file, &open_file);

    if throttle_mbps > 0 {
        match Throttled::new(&dir.join("throttled.img"), size + (64 << 20), throttle_mbps) {
            Err(why) => println!("throttled target: not measured here ({why})"),
            Ok(t) => {
                let dev = t.device.display().to_string();
                let dd = |input: &str| {
                    format!("dd of={dev} bs=1M conv=fsync status=none iflag=fullblock {input}")
                };
                let mut slow: Vec<Case> =
                    vec![("raw vs dd", dense.clone(), None, dd(&format!("if={dense}")))];
                slow.extend(holes_cases(
                    &sparse,
                    bmap.as_ref(),
                    &d("sparse.bmap"),
                    &dev,
                    &dd,
                ));
                println!("throttled target: {dev}, writes limited to {throttle_mbps} MB/s");
                // Each run starts from a device that reads all zeros and holds no data.
                let fresh_dev = || {
                    sh(&format!("blkdiscard {dev} && sync"));
                };
                let open_dev = || t.target();
                run_cases("throttled ", &slow, runs, &fresh_dev, &open_dev);
            }
        }
    }
    println!(
        "ferry peak RSS (whole benchmark process): {} MiB",
        vm_hwm_kib() / 1024
    );
    let _ = std::fs::remove_file(&part);
}
