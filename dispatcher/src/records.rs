//! The board's records, read back in bounded memory: each fetched records
//! file (kept raw in `board/`) is streamed once, record by record, into
//! `events.jsonl` (output as whole lines: text when UTF-8, base64 when not),
//! into `test-output/<definition>.<stream>` (the output byte for byte), and
//! into a [`Summary`] holding only what the results need (results, sets,
//! definition and agent records) — never the output itself, so the
//! dispatcher's memory does not grow with what a test prints.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ferry_proto::record::{Body, Item, Reader, Record, Stream};
use serde_json::json;

use crate::events::{from_micros, EventLog};

/// Folder of the output folder holding each definition's output, exact.
pub const OUTPUT_DIR: &str = "test-output";
/// Longest piece of an unfinished line held back to join the next chunk.
const MAX_LINE: usize = 64 * 1024;

/// What the run needs from the records besides the files written.
#[derive(Debug, Default)]
pub struct Summary {
    /// Every record other than output and kernel messages, in file order.
    pub records: Vec<Record>,
    /// Problems worth a warning in `outcome.json`: gaps, unreadable files,
    /// output that was dropped on the board.
    pub warnings: Vec<String>,
    /// Bytes of test output read.
    pub output_bytes: u64,
    /// Kernel trouble in the kernel messages (which are not kept).
    pub kernel: crate::kernel_trouble::Scanner,
}

/// One definition's stream: its exact file, and the unfinished line.
struct Sink {
    file: Option<BufWriter<File>>,
    partial: Vec<u8>,
}

/// A definition name from the board, made safe as a file name.
fn file_name(definition: &str, stream: Stream) -> String {
    let safe: String = definition
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.{}", stream.as_str())
}

struct Ingest<'a> {
    events: &'a EventLog,
    out_dir: PathBuf,
    sinks: BTreeMap<(String, Stream), Sink>,
    summary: Summary,
}

impl Ingest<'_> {
    fn output(&mut self, at_us: u64, boot: &str, definition: String, stream: Stream, data: &[u8]) {
        self.summary.output_bytes += data.len() as u64;
        let key = (definition, stream);
        let out_dir = &self.out_dir;
        let sink = self.sinks.entry(key.clone()).or_insert_with(|| {
            let path = out_dir.join(file_name(&key.0, key.1));
            Sink {
                file: File::create(path)
                    .ok()
                    .map(|f| BufWriter::with_capacity(256 * 1024, f)),
                partial: Vec::new(),
            }
        });
        if let Some(f) = sink.file.as_mut() {
            if f.write_all(data).is_err() {
                sink.file = None;
            }
        }
        // Events carry whole lines: the unfinished end waits for the next chunk.
        let cut = data.iter().rposition(|b| *b == b'\n').map(|i| i + 1);
        let lines = match cut {
            Some(cut) => {
                let mut lines = std::mem::take(&mut sink.partial);
                lines.extend_from_slice(&data[..cut]);
                sink.partial.extend_from_slice(&data[cut..]);
                lines
            }
            None => {
                sink.partial.extend_from_slice(data);
                if sink.partial.len() < MAX_LINE {
                    return;
                }
                std::mem::take(&mut sink.partial)
            }
        };
        self.output_event(at_us, boot, &key.0, stream, &lines);
    }

    fn output_event(&self, at_us: u64, boot: &str, definition: &str, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut fields = json!({ "kind": "output", "definition": definition, "stream": stream.as_str(), "boot": boot });
        if let Some(obj) = fields.as_object_mut() {
            match std::str::from_utf8(bytes) {
                Ok(text) => obj.insert("text".into(), json!(text)),
                Err(_) => obj.insert(
                    "base64".into(),
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
                ),
            };
        }
        self.events.event_at(from_micros(at_us), "test", fields);
    }

    fn record(&mut self, r: Record) {
        let mut fields = serde_json::to_value(&r.body).unwrap_or_default();
        if let Some(obj) = fields.as_object_mut() {
            obj.insert("boot".into(), json!(r.boot));
        }
        self.events.event_at(from_micros(r.ts_us), "test", fields);
        match &r.body {
            Body::Kernel { line, .. } => {
                self.summary.kernel.line(line);
                return;
            }
            Body::OutputDropped {
                definition,
                reason,
                bytes,
            } => self.summary.warnings.push(format!(
                "definition {definition}: {bytes} bytes of output were not recorded: {}",
                reason.describe()
            )),
            Body::KernelLost { messages } => self.summary.warnings.push(format!(
                "the board's kernel log overran: {messages} kernel messages were lost"
            )),
            _ => {}
        }
        self.summary.records.push(r);
    }

    fn file(&mut self, path: &Path) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let problem = |s: &mut Self, what: String| {
            s.events.event(
                "dispatcher",
                json!({ "kind": "records-problem", "file": name, "message": what }),
            );
            s.summary
                .warnings
                .push(format!("records file {name}: {what}"));
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => return problem(self, e.to_string()),
        };
        let (reader, header_gap) = match Reader::new(BufReader::with_capacity(256 * 1024, file)) {
            Ok(r) => r,
            Err(e) => return problem(self, e.to_string()),
        };
        if let Some(g) = header_gap {
            problem(self, format!("damaged header: {g}"));
        }
        for item in reader {
            match item {
                Ok(Item::Record(Record {
                    ts_us,
                    boot,
                    body:
                        Body::Output {
                            definition,
                            stream,
                            data,
                        },
                })) => self.output(ts_us, &boot, definition, stream, &data),
                Ok(Item::Record(r)) => self.record(r),
                Ok(Item::Gap(g)) => problem(self, g.to_string()),
                Ok(Item::Unreadable { offset, why }) => {
                    problem(self, format!("record at offset {offset} unreadable: {why}"))
                }
                Err(e) => return problem(self, e.to_string()),
            }
        }
    }

    fn finish(mut self) -> Summary {
        for ((definition, stream), mut sink) in std::mem::take(&mut self.sinks) {
            let rest = std::mem::take(&mut sink.partial);
            self.output_event(0, "", &definition, stream, &rest);
            if let Some(mut f) = sink.file.take() {
                let _ = f.flush();
            }
        }
        self.events.flush();
        self.summary
    }
}

/// Streams every records file in `board` (name order) into `events` and
/// `out/test-output/`, returning what the results need.
pub fn ingest(board: &Path, out: &Path, events: &EventLog) -> Summary {
    let out_dir = out.join(OUTPUT_DIR);
    // A reused output folder: only this job's output may be there.
    let _ = std::fs::remove_dir_all(&out_dir);
    let mut ingest = Ingest {
        events,
        out_dir: out_dir.clone(),
        sinks: BTreeMap::new(),
        summary: Summary::default(),
    };
    let mut names: Vec<PathBuf> = match std::fs::read_dir(board) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => return ingest.finish(),
    };
    names.sort();
    if let Err(e) = std::fs::create_dir_all(&out_dir) {
        ingest
            .summary
            .warnings
            .push(format!("creating {}: {e}", out_dir.display()));
    }
    for path in names {
        ingest.file(&path);
    }
    ingest.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::record::{Encoder, Header, Outcome};

    fn write_file(path: &Path, bodies: &[Body]) -> Vec<usize> {
        let mut out = Header {
            boot: "b1".into(),
            job: "j".into(),
            agent_version: "t".into(),
            start_us: 1_000_000,
            writer: "test-agent".into(),
        }
        .encode();
        let mut enc = Encoder::new(1_000_000);
        let mut starts = Vec::new();
        for b in bodies {
            starts.push(out.len());
            enc.frame(2_000_000, b, &mut out);
        }
        std::fs::write(path, &out).expect("write");
        starts
    }

    fn output(data: &[u8]) -> Body {
        Body::Output {
            definition: "d".into(),
            stream: Stream::Stdout,
            data: data.to_vec(),
        }
    }

    #[test]
    fn output_lands_exact_in_files_and_as_lines_in_events() {
        let tmp = tempfile::tempdir().expect("tmp");
        let board = tmp.path().join("board");
        std::fs::create_dir_all(&board).expect("mkdir");
        let result = Body::Result {
            definition: "d".into(),
            case: "c".into(),
            result: Outcome::Pass,
            measurement: None,
            units: None,
            set: None,
            reference: None,
        };
        let starts = write_file(
            &board.join(ferry_proto::record::RECORDS_FILE),
            &[
                output(b"hello wo"),
                output(b"rld\n\xff\xfe bin\nx"),
                result.clone(),
                output(b"lost\n"),
                output(b"y\n"),
            ],
        );
        // Corrupt the "lost" record on disk.
        let path = board.join(ferry_proto::record::RECORDS_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[starts[3] + 18] ^= 1;
        std::fs::write(&path, &bytes).expect("write");

        let events = EventLog::create(tmp.path()).expect("events");
        let summary = ingest(&board, tmp.path(), &events);
        drop(events);
        assert_eq!(
            summary.records.iter().map(|r| &r.body).collect::<Vec<_>>(),
            vec![&result]
        );
        assert_eq!(summary.warnings.len(), 1, "{:?}", summary.warnings);
        assert!(
            summary.warnings[0].contains("(1 records lost)"),
            "{:?}",
            summary.warnings
        );
        let exact = std::fs::read(tmp.path().join("test-output/d.stdout")).expect("output");
        assert_eq!(exact, b"hello world\n\xff\xfe bin\nxy\n");
        let text = std::fs::read_to_string(tmp.path().join("events.jsonl")).expect("events");
        let outputs: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["kind"] == "output")
            .collect();
        assert_eq!(outputs.len(), 2, "{text}");
        assert_eq!(
            outputs[0]["base64"],
            base64::engine::general_purpose::STANDARD.encode(b"hello world\n\xff\xfe bin\n")
        );
        assert_eq!(outputs[1]["text"], "xy\n");
        assert!(text.contains("\"kind\":\"records-problem\""), "{text}");
    }

    #[test]
    fn a_file_that_is_not_records_is_a_warning() {
        let tmp = tempfile::tempdir().expect("tmp");
        let board = tmp.path().join("board");
        std::fs::create_dir_all(&board).expect("mkdir");
        std::fs::write(board.join("records.jsonl"), "{}\n").expect("w");
        let events = EventLog::create(tmp.path()).expect("events");
        let summary = ingest(&board, tmp.path(), &events);
        assert!(summary.records.is_empty());
        assert!(summary.warnings[0].contains("not a Ferry records file"));
    }
}
