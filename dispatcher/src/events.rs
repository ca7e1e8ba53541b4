//! The job's event log: `events.jsonl` (every console chunk, dispatcher step
//! and board record, each with its source and time) and `console.log` (the
//! console's raw bytes).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// Writes events; cheap to share behind an `Arc`.
pub struct EventLog {
    inner: Mutex<Files>,
}

struct Files {
    events: BufWriter<File>,
    console: BufWriter<File>,
}

/// RFC 3339 UTC with microseconds.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// A board record's time.
pub fn from_micros(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

impl EventLog {
    /// Creates the log files in `dir`.
    ///
    /// # Errors
    /// When they cannot be created.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        Ok(EventLog {
            inner: Mutex::new(Files {
                events: BufWriter::new(File::create(dir.join("events.jsonl"))?),
                console: BufWriter::new(File::create(dir.join("console.log"))?),
            }),
        })
    }

    /// Opens the log files in `dir` to append to what is there (after a
    /// dispatcher failure: what was logged so far is kept).
    ///
    /// # Errors
    /// When they cannot be opened.
    pub fn append(dir: &Path) -> std::io::Result<Self> {
        let open = |name| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .map(BufWriter::new)
        };
        Ok(EventLog {
            inner: Mutex::new(Files {
                events: open("events.jsonl")?,
                console: open("console.log")?,
            }),
        })
    }

    fn write(&self, at: SystemTime, source: &str, fields: Value) {
        let mut obj = Map::new();
        obj.insert("ts".into(), json!(timestamp(at)));
        obj.insert("source".into(), json!(source));
        if let Value::Object(f) = fields {
            obj.extend(f);
        }
        if let Ok(mut files) = self.inner.lock() {
            let _ = serde_json::to_writer(&mut files.events, &obj);
            let _ = files.events.write_all(b"\n");
        }
    }

    /// Records an event from `source` ("dispatcher", "power", "agent"...),
    /// flushed at once so people can follow the job live.
    pub fn event(&self, source: &str, fields: Value) {
        self.write(SystemTime::now(), source, fields);
        self.flush();
    }

    /// Records an event with a message, also logged for people at info level.
    pub fn say(&self, source: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(target: "ferry", "{source}: {message}");
        self.event(source, json!({ "message": message }));
    }

    /// Records an event that happened at `at` (a board record).
    pub fn event_at(&self, at: SystemTime, source: &str, fields: Value) {
        self.write(at, source, fields);
    }

    /// Records bytes read from the console, the first of them at `at`: raw
    /// to `console.log`, and as an event (text when UTF-8, else the byte values).
    pub fn console(&self, bytes: &[u8], at: SystemTime) {
        let fields = match std::str::from_utf8(bytes) {
            Ok(text) => json!({ "text": text }),
            Err(_) => json!({ "bytes": bytes }),
        };
        self.write(at, "console", fields);
        if let Ok(mut files) = self.inner.lock() {
            let _ = files.console.write_all(bytes);
        }
        self.flush();
    }

    /// Flushes both files.
    pub fn flush(&self) {
        if let Ok(mut files) = self.inner.lock() {
            let _ = files.events.flush();
            let _ = files.console.flush();
        }
    }
}
