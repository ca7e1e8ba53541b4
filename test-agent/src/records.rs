//! The append-only records file on the test rootfs.
//!
//! Every record is one `write` of one line on a file opened with
//! `O_APPEND`, so the agent and its helper processes can share the file
//! without locks and a crash can at worst tear the last line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_proto::record::{Body, Record};

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
#[error("records file {path}: {source}")]
pub struct RecordError {
    /// The records file.
    pub path: PathBuf,
    /// The I/O error.
    pub source: std::io::Error,
}

/// An open records file.
#[derive(Debug)]
pub struct RecordLog {
    file: File,
    path: PathBuf,
    boot: String,
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl RecordLog {
    /// Opens (creating if needed) the records file for appending.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path, boot: &str) -> Result<Self, RecordError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| RecordError {
                path: path.into(),
                source,
            })?;
        Ok(RecordLog {
            file,
            path: path.into(),
            boot: boot.into(),
        })
    }

    /// Appends one record (not yet synced; see [`RecordLog::sync`]).
    ///
    /// # Errors
    /// When the write fails.
    pub fn append(&mut self, body: Body) -> Result<Record, RecordError> {
        let record = Record {
            ts_us: now_us(),
            boot: self.boot.clone(),
            body,
        };
        self.file
            .write_all(&record.to_line())
            .map_err(|source| RecordError {
                path: self.path.clone(),
                source,
            })?;
        Ok(record)
    }

    /// Appends one record and syncs it to disk before returning.
    ///
    /// # Errors
    /// When the write or the sync fails.
    pub fn append_synced(&mut self, body: Body) -> Result<Record, RecordError> {
        let record = self.append(body)?;
        self.sync()?;
        Ok(record)
    }

    /// Makes everything appended so far durable.
    ///
    /// # Errors
    /// When the sync fails.
    pub fn sync(&mut self) -> Result<(), RecordError> {
        self.file.sync_data().map_err(|source| RecordError {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::record::Outcome;

    #[test]
    fn two_writers_interleave_whole_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.jsonl");
        let mut a = RecordLog::open(&path, "b").expect("open a");
        let mut b = RecordLog::open(&path, "b").expect("open b");
        for i in 0..50 {
            a.append(Body::AgentMessage {
                level: "info".into(),
                message: format!("a{i}"),
            })
            .expect("a");
            b.append_synced(Body::Result {
                definition: "d".into(),
                case: format!("c{i}"),
                result: Outcome::Pass,
                measurement: None,
                units: None,
                set: None,
            })
            .expect("b");
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let (records, errors) = Record::parse_all(&text);
        assert!(errors.is_empty());
        assert_eq!(records.len(), 100);
    }
}
