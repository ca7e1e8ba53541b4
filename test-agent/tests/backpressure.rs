//! A producer that outruns the disk: `yes` against a records writer that
//! stores 1 MiB/s. The test agent's memory must stay bounded (the pipe
//! fills and `yes` blocks) and the definition's timeout must still end it.
//! Alone in its own test binary, so the process's peak memory is the
//! agent's.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::plan::v1::{Definition, TestPlan};
use ferry_proto::record::Header;
use ferry_test_agent::mirror::Mirror;
use ferry_test_agent::records::{Settings, Storage, Writer};
use ferry_test_agent::runner::{run_plan, RunContext};

/// A disk that takes `rate` bytes per second.
struct SlowDisk {
    rate: f64,
    stored: Arc<AtomicU64>,
}

impl Storage for SlowDisk {
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        std::thread::sleep(Duration::from_secs_f64(buf.len() as f64 / self.rate));
        self.stored.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn cut(&mut self, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("field")
}

#[test]
fn memory_stays_bounded_when_yes_outruns_the_disk() {
    let dir = tempfile::tempdir().expect("tmp");
    let stored = Arc::new(AtomicU64::new(0));
    let disk = SlowDisk {
        rate: 1024.0 * 1024.0,
        stored: stored.clone(),
    };
    let writer = Writer::start(
        Box::new(disk),
        Path::new("slow-disk"),
        Header::default(),
        Settings::default(),
    )
    .expect("writer");
    let ctx = RunContext {
        root: dir.path().into(),
        records: dir.path().into(),
        socket: "ferry-backpressure-test".into(),
        job: "j".into(),
        boot_id: "b".into(),
    };
    let plan = TestPlan {
        job: "j".into(),
        definitions: vec![Definition {
            name: "yes".into(),
            steps: vec!["yes".into()],
            timeout_seconds: 4,
            ..Default::default()
        }],
        ..Default::default()
    };
    let mirror = Mirror::start(Box::new(std::io::sink()));
    // Peak memory from here on.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let before = status_kib("VmRSS:");
    let started = Instant::now();
    run_plan(&ctx, &plan, &writer.recorder(), &mirror).expect("run");
    let took = started.elapsed();
    let peak = status_kib("VmHWM:");
    let stats = writer.close().expect("close");
    mirror.finish(Duration::from_secs(1));
    let stored = stored.load(Ordering::Relaxed);
    println!(
        "rss before {before} KiB, peak {peak} KiB; stored {stored} bytes in {took:?}; kept {} bytes of output",
        stats.output_kept
    );
    // `yes` alone writes GiB/s: without backpressure the queue would hold
    // gigabytes after 4 s. Bounded: queue, pipe chunks, one batch.
    assert!(
        peak.saturating_sub(before) < 24 * 1024,
        "peak {peak} KiB from {before} KiB"
    );
    // The disk was the limit (about 1 MiB/s for the 4 s timeout, plus
    // what is queued when it fires)...
    assert!(stored < 16 << 20, "stored {stored}");
    assert!(stats.output_kept > 1 << 20, "kept {}", stats.output_kept);
    // ...and the flood did not keep the definition past its timeout.
    assert!(took < Duration::from_secs(15), "took {took:?}");
}
