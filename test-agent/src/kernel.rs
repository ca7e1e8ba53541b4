//! The kernel log, recorded beside the test output: an oops or a WARNING
//! during a test belongs to its story, and the console that shows it may
//! drop or garble it. Records come from `/dev/kmsg` (one message per read,
//! `level,seq,usec,flags;text`), starting with what the kernel kept since
//! boot.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_proto::record::Body;

use crate::records::RecordLog;

/// Messages at this level or worse (warning) are synced at once; the rest
/// in batches, since a boot alone logs hundreds.
const URGENT_LEVEL: u8 = 4;
/// Longest a routine message waits before it is synced.
const BATCH: Duration = Duration::from_millis(200);

/// Parses one `/dev/kmsg` record; `None` for continuation (dictionary)
/// lines and anything malformed.
pub fn parse(record: &str) -> Option<Body> {
    let (head, text) = record.split_once(';')?;
    let mut fields = head.split(',');
    let prio: u32 = fields.next()?.parse().ok()?;
    let _seq = fields.next()?;
    let kernel_us = fields.next()?.parse().ok()?;
    Some(Body::Kernel {
        level: (prio & 7) as u8,
        kernel_us,
        line: text.trim_end().to_string(),
    })
}

/// Records the kernel log from `source` into the records file until the
/// source ends (never, for `/dev/kmsg`: the board reboots first).
pub fn spawn(source: PathBuf, records: PathBuf, boot: String) {
    std::thread::spawn(move || {
        let (Ok(file), Ok(mut log)) = (
            std::fs::File::open(&source),
            RecordLog::open(&records, &boot),
        ) else {
            return; // no kernel log here (or not readable): the run goes on without it
        };
        let mut last_sync = Instant::now();
        // Each read of /dev/kmsg returns one whole record.
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { return };
            let Some(body) = parse(&line) else { continue };
            let urgent = matches!(body, Body::Kernel { level, .. } if level <= URGENT_LEVEL);
            if log.append(body).is_err() {
                return;
            }
            if urgent || last_sync.elapsed() >= BATCH {
                let _ = log.sync();
                last_sync = Instant::now();
            }
        }
        let _ = log.sync();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kmsg_records() {
        assert_eq!(
            parse("4,339,5140900,-;WARNING: CPU: 0 PID: 1 at foo.c:12 bar+0x1/0x2"),
            Some(Body::Kernel {
                level: 4,
                kernel_us: 5_140_900,
                line: "WARNING: CPU: 0 PID: 1 at foo.c:12 bar+0x1/0x2".into()
            })
        );
        // Facility bits above the level are dropped (here: 3 << 3 | 6).
        assert!(matches!(
            parse("30,1,2,-;systemd[1]: hi"),
            Some(Body::Kernel { level: 6, .. })
        ));
        assert_eq!(parse(" SUBSYSTEM=virtio"), None);
        assert_eq!(parse("garbage"), None);
    }

    #[test]
    fn records_a_kernel_log() {
        let dir = tempfile::tempdir().expect("tmp");
        let kmsg = dir.path().join("kmsg");
        std::fs::write(
            &kmsg,
            "6,1,100,-;Linux version 6.1\n SUBSYSTEM=x\n3,2,200,-;oops\n",
        )
        .expect("w");
        let records = dir.path().join("r.jsonl");
        spawn(kmsg, records.clone(), "b".into());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&records).unwrap_or_default();
            let (got, _) = ferry_proto::record::Record::parse_all(&text);
            if got.len() == 2 {
                assert!(
                    matches!(&got[1].body, Body::Kernel { level: 3, line, .. } if line == "oops")
                );
                break;
            }
            assert!(Instant::now() < deadline, "records: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
