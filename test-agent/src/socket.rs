//! How the helpers (`lava-test-case`, `lava-test-set`: separate processes
//! started by the test's steps) hand their records to the agent, which is
//! the only writer of the records file: one JSON record per connection on
//! an abstract Unix socket (nothing on the test rootfs to clean up), and a
//! reply once the record is on disk.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_proto::record::Body;

use crate::records::Recorder;

/// Longest a helper's request may take to arrive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a helper waits for the agent's reply (the agent waits at most
/// its durable-record timeout for the disk).
const REPLY_TIMEOUT: Duration = Duration::from_secs(75);
/// Largest request accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Why a helper could not hand over its record.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// No agent listening, or the connection broke.
    #[error("agent socket {name}: {source}")]
    Io {
        /// The socket's abstract name.
        name: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The agent refused or could not store the record.
    #[error("agent refused the record: {0}")]
    Refused(String),
}

/// The socket name of the agent with process id `pid`.
pub fn name_for(pid: u32) -> String {
    format!("ferry-test-agent.{pid}")
}

/// Serves helpers on `name` until the process ends, recording through `rec`.
///
/// # Errors
/// When the socket cannot be bound.
pub fn serve(name: &str, rec: Recorder) -> std::io::Result<JoinHandle<()>> {
    let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?)?;
    Ok(std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            // One at a time: a helper call is one small record.
            let _ = answer(conn, &rec);
        }
    }))
}

fn answer(conn: UnixStream, rec: &Recorder) -> std::io::Result<()> {
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Body>(&line) {
        Ok(
            body @ (Body::Result { .. }
            | Body::SetStarted { .. }
            | Body::SetStopped { .. }
            | Body::AgentMessage { .. }
            | Body::Aborted { .. }),
        ) => match rec.durable(body) {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        },
        Ok(other) => format!("error: helpers may not record {}", other.kind_name()),
        Err(e) => format!("error: bad record: {e}"),
    };
    (&conn).write_all(format!("{reply}\n").as_bytes())
}

/// Hands `body` to the agent listening on `name`; returns once it is on disk.
///
/// # Errors
/// When no agent answers, or it could not store the record.
pub fn send(name: &str, body: &Body) -> Result<(), SocketError> {
    let io = |source| SocketError::Io {
        name: name.into(),
        source,
    };
    let conn =
        UnixStream::connect_addr(&SocketAddr::from_abstract_name(name).map_err(io)?).map_err(io)?;
    conn.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(io)?;
    conn.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
    let mut req = serde_json::to_vec(body).unwrap_or_default();
    req.push(b'\n');
    (&conn).write_all(&req).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply).map_err(io)?;
    match reply.trim_end() {
        "ok" => Ok(()),
        other => Err(SocketError::Refused(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Settings, Writer};
    use ferry_proto::record::{Header, Item, Outcome, Reader};

    #[test]
    fn a_helper_record_is_on_disk_when_send_returns() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(ferry_proto::record::RECORDS_FILE);
        let w = Writer::create(dir.path(), Header::default(), Settings::default()).expect("w");
        let name = format!("ferry-test-socket.{}", std::process::id());
        serve(&name, w.recorder()).expect("serve");
        let result = Body::Result {
            definition: "d".into(),
            case: "c".into(),
            result: Outcome::Fail,
            measurement: Some(2.5),
            units: Some("ms".into()),
            set: Some("s".into()),
            reference: None,
        };
        send(&name, &result).expect("send");
        let (reader, _) = Reader::new(std::fs::File::open(&path).expect("open")).expect("hdr");
        let got: Vec<Body> = reader
            .filter_map(|i| match i.expect("item") {
                Item::Record(r) => Some(r.body),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![result]);
        // Helpers cannot forge the agent's own records.
        let forged = send(&name, &Body::AgentFinished {});
        assert!(matches!(forged, Err(SocketError::Refused(_))), "{forged:?}");
        assert!(send("ferry-test-socket.nobody", &Body::AgentFinished {}).is_err());
        w.close().expect("close");
    }
}
