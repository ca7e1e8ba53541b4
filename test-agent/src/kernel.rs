//! The kernel log, recorded beside the test output: an oops or a WARNING
//! during a test belongs to its story, and the console that shows it may
//! drop or garble it. Records come from `/dev/kmsg` (one message per read,
//! `level,seq,usec,flags;text`), starting with what the kernel kept since
//! boot. Capture never stops silently: a kernel buffer that overran before
//! it was read (`EPIPE`) becomes a "lost N messages" record and capture
//! goes on, and a log that cannot be opened is itself a record.

use std::io::Read;
use std::path::PathBuf;
use std::thread::JoinHandle;

use ferry_proto::record::Body;

use crate::records::Recorder;

/// Messages at this level or worse (warning) are synced at once; the rest
/// with the writer's next periodic sync, since a boot alone logs hundreds.
const URGENT_LEVEL: u8 = 4;

/// Parses one `/dev/kmsg` record into its sequence number and record;
/// `None` for continuation (dictionary) lines and anything malformed.
pub fn parse(record: &str) -> Option<(u64, Body)> {
    let (head, text) = record.split_once(';')?;
    let mut fields = head.split(',');
    let prio: u32 = fields.next()?.parse().ok()?;
    let seq = fields.next()?.parse().ok()?;
    let kernel_us = fields.next()?.parse().ok()?;
    Some((
        seq,
        Body::Kernel {
            level: (prio & 7) as u8,
            kernel_us,
            line: text.trim_end().to_string(),
        },
    ))
}

/// Records the kernel log from `source` until the source ends or the
/// records writer stops (for `/dev/kmsg`: when the agent closes its records).
pub fn spawn(source: PathBuf, rec: Recorder) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut file = match std::fs::File::open(&source) {
            Ok(f) => f,
            Err(e) => {
                let _ = rec.durable(Body::AgentMessage {
                    level: "warn".into(),
                    message: format!(
                        "kernel log capture could not start: {}: {e}",
                        source.display()
                    ),
                });
                return;
            }
        };
        let mut last_seq: Option<u64> = None;
        let mut buf = vec![0u8; 16 * 1024];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                // Overrun: the oldest unread messages were overwritten. The
                // next read returns the oldest one left; its sequence
                // number tells how many were lost.
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = rec.durable(Body::AgentMessage {
                        level: "warn".into(),
                        message: format!("kernel log capture stopped: {}: {e}", source.display()),
                    });
                    return;
                }
            };
            carry.extend_from_slice(&buf[..n]);
            // /dev/kmsg gives one whole record per read; a plain file (the
            // tests) may cut one, so only whole lines are parsed.
            let whole = carry.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let lines: Vec<u8> = carry.drain(..whole).collect();
            for line in String::from_utf8_lossy(&lines).lines() {
                let Some((seq, body)) = parse(line) else {
                    continue;
                };
                if let Some(last) = last_seq {
                    if seq > last + 1 {
                        let lost = Body::KernelLost {
                            messages: seq - last - 1,
                        };
                        if rec.record(lost).is_err() {
                            return;
                        }
                    }
                }
                last_seq = Some(seq);
                let urgent = matches!(body, Body::Kernel { level, .. } if level <= URGENT_LEVEL);
                let sent = if urgent {
                    rec.durable(body)
                } else {
                    rec.record(body)
                };
                if sent.is_err() {
                    return; // the records are closed: the run is over
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Settings, Writer};
    use ferry_proto::record::{Header, Item, Reader};

    #[test]
    fn parses_kmsg_records() {
        assert_eq!(
            parse("4,339,5140900,-;WARNING: CPU: 0 PID: 1 at foo.c:12 bar+0x1/0x2"),
            Some((
                339,
                Body::Kernel {
                    level: 4,
                    kernel_us: 5_140_900,
                    line: "WARNING: CPU: 0 PID: 1 at foo.c:12 bar+0x1/0x2".into()
                }
            ))
        );
        // Facility bits above the level are dropped (here: 3 << 3 | 6).
        assert!(matches!(
            parse("30,1,2,-;systemd[1]: hi"),
            Some((1, Body::Kernel { level: 6, .. }))
        ));
        assert_eq!(parse(" SUBSYSTEM=virtio"), None);
        assert_eq!(parse("garbage"), None);
    }

    fn capture(kmsg: &str, exists: bool) -> Vec<Body> {
        let dir = tempfile::tempdir().expect("tmp");
        let source = dir.path().join("kmsg");
        if exists {
            std::fs::write(&source, kmsg).expect("w");
        }
        let path = dir.path().join(ferry_proto::record::RECORDS_FILE);
        let w = Writer::create(dir.path(), Header::default(), Settings::default()).expect("w");
        spawn(source, w.recorder()).join().expect("thread");
        w.close().expect("close");
        let f = std::fs::File::open(&path).expect("open");
        let (reader, _) = Reader::new(f).expect("header");
        reader
            .filter_map(|i| match i.expect("item") {
                Item::Record(r) => Some(r.body),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn records_the_log_and_counts_messages_lost_to_an_overrun() {
        let got = capture(
            "6,1,100,-;Linux version 6.1\n SUBSYSTEM=x\n3,2,200,-;oops\n6,9,300,-;after the overrun\n",
            true,
        );
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(matches!(&got[1], Body::Kernel { level: 3, line, .. } if line == "oops"));
        assert_eq!(got[2], Body::KernelLost { messages: 6 });
        assert!(matches!(&got[3], Body::Kernel { line, .. } if line == "after the overrun"));
    }

    #[test]
    fn a_log_that_cannot_be_opened_is_a_record() {
        let got = capture("", false);
        assert!(
            matches!(&got[..], [Body::AgentMessage { level, message }] if level == "warn" && message.contains("could not start")),
            "{got:?}"
        );
    }
}
