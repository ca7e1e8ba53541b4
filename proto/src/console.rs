//! Lines exchanged on the serial console.
//!
//! The console is shared with the kernel, the bootloader and whatever else
//! prints there, so each line carries a short checksum: a line that was cut
//! or interleaved with other output fails the check and is ignored (the
//! agent repeats its announcement until it is answered).

use std::fmt;
use std::net::SocketAddr;

use sha2::{Digest, Sha256};

/// Marker that starts an agent announcement.
pub const ANNOUNCE_MARKER: &str = "FERRY-AGENT";
/// Marker that starts a token line written by the dispatcher.
pub const TOKEN_MARKER: &str = "FERRY-TOKEN";

/// Which agent announced itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The master agent, running from the master image.
    Master,
    /// The test agent, running in the test image.
    Test,
}

impl Role {
    /// Its name on the console.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Test => "test",
        }
    }
}

/// An agent's announcement: who it is, which boot, and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The announcing agent.
    pub role: Role,
    /// The agent's version.
    pub version: String,
    /// The boot id; a new one on every boot.
    pub boot: String,
    /// The gRPC address (the master agent only).
    pub addr: Option<SocketAddr>,
}

/// A token line: the dispatcher hands a boot its per-job token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLine {
    /// The boot the token is for; other boots ignore it.
    pub boot: String,
    /// The token gRPC calls must carry.
    pub token: String,
}

/// Why a line that carried a marker was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The checksum did not match: the line was cut or mixed with other output.
    #[error("checksum mismatch (line garbled on the console)")]
    Checksum,
    /// A required field is absent.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// A field has a value that cannot be used.
    #[error("bad value for `{field}`: {value:?}")]
    BadValue {
        /// The field's name.
        field: &'static str,
        /// The value seen.
        value: String,
    },
}

fn checksum(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    crate::hex(&digest[..4])
}

/// Appends ` sum=<checksum>` to a line body.
fn seal(body: String) -> String {
    let sum = checksum(&body);
    format!("{body} sum={sum}")
}

/// Finds `marker` in `line` and checks the trailing checksum; returns the
/// key=value fields. `None` when the marker is absent.
fn unseal<'a>(line: &'a str, marker: &str) -> Option<Result<Vec<(&'a str, &'a str)>, LineError>> {
    // Take the last marker: a garbled earlier copy may precede a good one.
    let start = line.rfind(marker)?;
    let text = line[start..].trim_end_matches(['\r', '\n', ' ']);
    let Some((body, sum)) = text.rsplit_once(" sum=") else {
        return Some(Err(LineError::Missing("sum")));
    };
    if checksum(body) != sum {
        return Some(Err(LineError::Checksum));
    }
    let fields = body[marker.len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    Some(Ok(fields))
}

fn field<'a>(fields: &[(&'a str, &'a str)], name: &'static str) -> Result<&'a str, LineError> {
    fields
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| *v)
        .filter(|v| !v.is_empty())
        .ok_or(LineError::Missing(name))
}

impl Announcement {
    /// Looks for an announcement in one console line. `None` when the line
    /// holds none; an error when it holds a damaged one.
    pub fn find(line: &str) -> Option<Result<Self, LineError>> {
        let fields = match unseal(line, ANNOUNCE_MARKER)? {
            Ok(f) => f,
            Err(e) => return Some(Err(e)),
        };
        Some(Self::from_fields(&fields))
    }

    fn from_fields(fields: &[(&str, &str)]) -> Result<Self, LineError> {
        let role = match field(fields, "role")? {
            "master" => Role::Master,
            "test" => Role::Test,
            other => {
                return Err(LineError::BadValue {
                    field: "role",
                    value: other.into(),
                })
            }
        };
        let addr = match (role, field(fields, "addr")) {
            (_, Ok(a)) => Some(a.parse().map_err(|_| LineError::BadValue {
                field: "addr",
                value: a.into(),
            })?),
            (Role::Master, Err(e)) => return Err(e),
            (Role::Test, Err(_)) => None,
        };
        Ok(Announcement {
            role,
            version: field(fields, "version")?.into(),
            boot: field(fields, "boot")?.into(),
            addr,
        })
    }
}

impl fmt::Display for Announcement {
    /// The sealed console line, without a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut body = format!(
            "{ANNOUNCE_MARKER} role={} version={} boot={}",
            self.role.as_str(),
            self.version,
            self.boot
        );
        if let Some(addr) = self.addr {
            body.push_str(&format!(" addr={addr}"));
        }
        f.write_str(&seal(body))
    }
}

impl TokenLine {
    /// Looks for a token line in one console line.
    pub fn find(line: &str) -> Option<Result<Self, LineError>> {
        let fields = match unseal(line, TOKEN_MARKER)? {
            Ok(f) => f,
            Err(e) => return Some(Err(e)),
        };
        Some((|| {
            Ok(TokenLine {
                boot: field(&fields, "boot")?.into(),
                token: field(&fields, "token")?.into(),
            })
        })())
    }
}

impl fmt::Display for TokenLine {
    /// The sealed console line, without a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&seal(format!(
            "{TOKEN_MARKER} boot={} token={}",
            self.boot, self.token
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> Announcement {
        Announcement {
            role: Role::Master,
            version: "0.1.0".into(),
            boot: "0b5e0c7e-1111-4e4e-9999-123456789abc".into(),
            addr: Some("192.0.2.2:7070".parse().expect("addr")),
        }
    }

    #[test]
    fn announcement_round_trips() {
        let line = master().to_string();
        assert_eq!(Announcement::find(&line), Some(Ok(master())));
    }

    #[test]
    fn announcement_survives_prefixes_and_crlf() {
        let line = format!(
            "[    2.345678] random: crng init done\x00\x1b[0m{}\r\n",
            master()
        );
        assert_eq!(Announcement::find(&line), Some(Ok(master())));
    }

    #[test]
    fn garbled_announcement_is_rejected() {
        let line = master().to_string();
        // A kernel message cut into the middle of the line, as a UART FIFO does.
        let cut = format!("{}[  3.1] virtio_net{}", &line[..20], &line[20..]);
        assert_eq!(Announcement::find(&cut), Some(Err(LineError::Checksum)));
        let truncated = &line[..line.len() - 3];
        assert_eq!(
            Announcement::find(truncated),
            Some(Err(LineError::Checksum))
        );
    }

    #[test]
    fn lines_without_marker_are_ignored() {
        for line in [
            "",
            "Linux version 6.1.0",
            "FERRY",
            "\u{fffd}\u{fffd}garbage",
        ] {
            assert_eq!(Announcement::find(line), None, "{line:?}");
        }
    }

    #[test]
    fn master_needs_an_address_test_does_not() {
        let line = seal(format!("{ANNOUNCE_MARKER} role=master version=1 boot=b"));
        assert_eq!(
            Announcement::find(&line),
            Some(Err(LineError::Missing("addr")))
        );
        let line = seal(format!("{ANNOUNCE_MARKER} role=test version=1 boot=b"));
        let a = Announcement::find(&line)
            .and_then(Result::ok)
            .expect("test announcement");
        assert_eq!((a.role, a.addr), (Role::Test, None));
    }

    #[test]
    fn bad_values_are_named() {
        let line = seal(format!(
            "{ANNOUNCE_MARKER} role=master version=1 boot=b addr=nowhere"
        ));
        assert_eq!(
            Announcement::find(&line),
            Some(Err(LineError::BadValue {
                field: "addr",
                value: "nowhere".into()
            }))
        );
        let line = seal(format!("{ANNOUNCE_MARKER} role=boss version=1 boot=b"));
        assert!(matches!(
            Announcement::find(&line),
            Some(Err(LineError::BadValue { field: "role", .. }))
        ));
    }

    #[test]
    fn token_round_trips() {
        let t = TokenLine {
            boot: "b1".into(),
            token: "abcdef".into(),
        };
        assert_eq!(TokenLine::find(&format!("noise {t}\n")), Some(Ok(t)));
    }
}
