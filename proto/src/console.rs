//! Lines exchanged on the serial console, and what makes a console line
//! count.
//!
//! The console is shared with the kernel, the bootloader, the test image and
//! the tests themselves, so nothing on it may steer a job unless its source
//! is proven:
//! - agent lines ([`Announcement`], [`TokenLine`]) start a console line (only
//!   control bytes and terminal escapes may precede the marker) and carry a
//!   short checksum: a line that was cut or interleaved with other output
//!   fails the check and is ignored (agents repeat until answered);
//! - a kernel panic counts only in the kernel's own format ([`kernel_panic`]);
//! - test output mirrored to the console goes through [`mirror_output`]: it is
//!   tagged with [`OUTPUT_TAG`] and every marker in it is escaped, so it can
//!   never be taken for an agent or kernel line, even when the kernel cuts it.

use std::fmt;
use std::net::SocketAddr;

use sha2::{Digest, Sha256};

/// Marker that starts an agent announcement.
pub const ANNOUNCE_MARKER: &str = "FERRY-AGENT";
/// Marker that starts a token line written by the dispatcher.
pub const TOKEN_MARKER: &str = "FERRY-TOKEN";
/// What the kernel prints when it gives up; the board goes nowhere by itself.
pub const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// Start of every line of test output mirrored to the console.
pub const OUTPUT_TAG: &str = "| ";

/// Text that steers the dispatcher when it starts a console line. Mirrored
/// test output has each one escaped (its first `-` becomes `\-`).
const TRIGGERS: [&str; 3] = [ANNOUNCE_MARKER, TOKEN_MARKER, PANIC_MARKER];

/// One line of test output as the test agent mirrors it to the console:
/// tagged, with every trigger escaped. The records keep the exact bytes;
/// this is for people watching, and can never pass for an agent or kernel
/// line wherever the console cuts it.
pub fn mirror_output(line: &str) -> String {
    let mut out = String::with_capacity(OUTPUT_TAG.len() + line.len());
    out.push_str(OUTPUT_TAG);
    let mut rest = line;
    'scan: while !rest.is_empty() {
        for t in TRIGGERS {
            if rest.starts_with(t) {
                let dash = t.find('-').unwrap_or(0);
                out.push_str(&t[..dash]);
                out.push('\\');
                out.push_str(&t[dash..]);
                rest = &rest[t.len()..];
                continue 'scan;
            }
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}

/// The line with what may precede a console line's real start removed:
/// carriage returns, NULs and other control bytes, and terminal escape
/// sequences (colour resets the previous program left behind).
pub fn line_start(line: &str) -> &str {
    let mut s = line;
    loop {
        let before = s.len();
        s = s.trim_start_matches(|c: char| c.is_control() && c != '\x1b');
        if let Some(esc) = s.strip_prefix("\x1b[") {
            // CSI: parameters and intermediates, then one final byte.
            let end = esc
                .find(|c: char| ('@'..='~').contains(&c))
                .map_or(esc.len(), |i| i + 1);
            s = &esc[end..];
        } else if let Some(esc) = s.strip_prefix('\x1b') {
            s = esc;
        }
        if s.len() == before {
            return s;
        }
    }
}

/// A kernel message's text: the line after the kernel's own time stamp
/// (`[   12.345678] `) when it prints one, else the whole line.
fn kernel_text(line: &str) -> Option<&str> {
    let s = line_start(line);
    match s.strip_prefix('[') {
        Some(stamped) => {
            let (stamp, rest) = stamped.split_once(']')?;
            let stamp = stamp.trim_start();
            let (secs, frac) = stamp.split_once('.')?;
            let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
            if !digits(secs) || !digits(frac) {
                return None;
            }
            rest.strip_prefix(' ')
        }
        None => Some(s),
    }
}

/// The kernel's panic line, when `line` is one: `Kernel panic - not
/// syncing...` at the start of the line, after the kernel's own time stamp
/// (`[   12.345678] `) when it prints one. Not the closing `---[ end Kernel
/// panic` line, and never text that merely contains the words.
pub fn kernel_panic(line: &str) -> Option<&str> {
    let text = kernel_text(line)?;
    text.starts_with(PANIC_MARKER)
        .then(|| text.trim_end_matches(['\r', '\n', ' ']))
}

/// Whether `line` is a Linux kernel's first line (`Linux version ...`, in the
/// kernel's format): a boot's kernel started.
pub fn kernel_banner(line: &str) -> bool {
    kernel_text(line).is_some_and(|t| t.starts_with("Linux version "))
}

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
    /// The sha256 (lowercase hex) of the agent's TLS certificate, DER-encoded:
    /// `cert=sha256:<hex>` on the line. The master agent makes a new one at
    /// each boot; the dispatcher accepts exactly that certificate.
    pub cert: Option<String>,
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

/// Checks that `line` starts with `marker` and ends with its checksum;
/// returns the key=value fields. `None` when the line does not start with
/// the marker (text elsewhere in a line proves nothing about its source).
fn unseal<'a>(line: &'a str, marker: &str) -> Option<Result<Vec<(&'a str, &'a str)>, LineError>> {
    let text = line_start(line);
    if !text.starts_with(marker) {
        return None;
    }
    let text = text.trim_end_matches(['\r', '\n', ' ']);
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
        let cert = match field(fields, "cert") {
            Ok(c) => Some(
                c.strip_prefix("sha256:")
                    .filter(|hex| crate::is_sha256(hex))
                    .map(str::to_ascii_lowercase)
                    .ok_or_else(|| LineError::BadValue {
                        field: "cert",
                        value: c.into(),
                    })?,
            ),
            Err(_) => None,
        };
        Ok(Announcement {
            role,
            version: field(fields, "version")?.into(),
            boot: field(fields, "boot")?.into(),
            addr,
            cert,
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
        if let Some(cert) = &self.cert {
            body.push_str(&format!(" cert=sha256:{cert}"));
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
            cert: Some("ab".repeat(32)),
        }
    }

    #[test]
    fn announcement_round_trips() {
        let line = master().to_string();
        assert_eq!(Announcement::find(&line), Some(Ok(master())));
    }

    #[test]
    fn announcement_survives_control_bytes_escapes_and_crlf() {
        let line = format!("\r\x00\x1b[0m\x1b[?25h{}\r\n", master());
        assert_eq!(Announcement::find(&line), Some(Ok(master())));
    }

    #[test]
    fn a_marker_that_does_not_start_the_line_proves_nothing() {
        for prefix in [
            "[    2.345678] ",         // a /dev/kmsg write: the kernel's format
            "[    2.345678] random: ", // kernel text the line was cut into
            "| ",                      // mirrored test output
            "echo ",
        ] {
            let line = format!("{prefix}{}", master());
            assert_eq!(Announcement::find(&line), None, "{line:?}");
            let token = TokenLine {
                boot: "b".into(),
                token: "t".into(),
            };
            assert_eq!(TokenLine::find(&format!("{prefix}{token}")), None);
        }
    }

    #[test]
    fn mirrored_output_never_passes_for_an_agent_or_kernel_line() {
        let token = TokenLine {
            boot: "b".into(),
            token: "t".into(),
        };
        let hostile = [
            master().to_string(),
            token.to_string(),
            "[    5.000000] Kernel panic - not syncing: VFS".to_string(),
            format!("xx{}yy[ 1.0] Kernel panic - not syncing{}", master(), token),
            "Kernel panic - not syncing".to_string(),
        ];
        for text in hostile {
            let mirrored = mirror_output(&text);
            assert!(mirrored.starts_with(OUTPUT_TAG));
            // Wherever the console cuts the mirrored line (a kernel message
            // ending in a newline can land anywhere in it), no piece is an
            // agent or kernel line.
            for cut in 0..=mirrored.len() {
                let Some(piece) = mirrored.get(cut..) else {
                    continue;
                };
                assert_eq!(Announcement::find(piece), None, "{piece:?}");
                assert_eq!(TokenLine::find(piece), None, "{piece:?}");
                assert_eq!(kernel_panic(piece), None, "{piece:?}");
            }
            for t in TRIGGERS {
                assert!(!mirrored.contains(t), "{mirrored:?} contains {t:?}");
            }
        }
        assert_eq!(
            mirror_output("FERRY-AGENT x"),
            "| FERRY\\-AGENT x",
            "escaped, still readable"
        );
        assert_eq!(mirror_output("plain ünïcode"), "| plain ünïcode");
    }

    #[test]
    fn kernel_banners_only_in_the_kernels_format() {
        for line in [
            "[    0.000000] Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org)",
            "Linux version 6.1.0 (builder) #1 SMP\r",
        ] {
            assert!(kernel_banner(line), "{line:?}");
        }
        for line in [
            "test says: Linux version 6.1",
            "[ferry] Linux version 6.1",
            "[    0.000000] Command line: console=ttyS0",
        ] {
            assert!(!kernel_banner(line), "{line:?}");
        }
    }

    #[test]
    fn kernel_panics_only_in_the_kernels_format() {
        let yes = [
            "[    5.123456] Kernel panic - not syncing: VFS: Unable to mount root fs\r",
            "[12345.000001] Kernel panic - not syncing: Attempted to kill init!",
            "\x1b[0mKernel panic - not syncing: Fatal exception",
        ];
        for line in yes {
            assert!(kernel_panic(line).is_some(), "{line:?}");
        }
        let no = [
            "[    5.123456] ---[ end Kernel panic - not syncing: VFS ]---",
            "test says: Kernel panic - not syncing",
            "| Kernel panic \\- not syncing",
            "[ 5.1x] Kernel panic - not syncing",
            "[    5.123456]Kernel panic - not syncing",
            "",
        ];
        for line in no {
            assert_eq!(kernel_panic(line), None, "{line:?}");
        }
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
    fn the_certificate_fingerprint_is_on_the_line_and_checked() {
        let line = master().to_string();
        assert!(
            line.contains(&format!(" cert=sha256:{} ", "ab".repeat(32))),
            "{line}"
        );
        // Upper-case hex is the same fingerprint.
        let line = seal(format!(
            "{ANNOUNCE_MARKER} role=master version=1 boot=b addr=192.0.2.2:7070 cert=sha256:{}",
            "AB".repeat(32)
        ));
        let a = Announcement::find(&line)
            .and_then(Result::ok)
            .expect("announcement");
        assert_eq!(a.cert, Some("ab".repeat(32)));
        for bad in [
            "ab".repeat(32),
            format!("md5:{}", "ab".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("sha256:{}", "zz".repeat(32)),
        ] {
            let line = seal(format!(
                "{ANNOUNCE_MARKER} role=master version=1 boot=b addr=192.0.2.2:7070 cert={bad}"
            ));
            assert_eq!(
                Announcement::find(&line),
                Some(Err(LineError::BadValue {
                    field: "cert",
                    value: bad.clone()
                })),
                "{bad}"
            );
        }
        // Test agents serve no TLS: their lines have no fingerprint.
        let line = seal(format!("{ANNOUNCE_MARKER} role=test version=1 boot=b"));
        let a = Announcement::find(&line)
            .and_then(Result::ok)
            .expect("test announcement");
        assert_eq!(a.cert, None);
    }

    #[test]
    fn token_round_trips() {
        let t = TokenLine {
            boot: "b1".into(),
            token: "abcdef".into(),
        };
        assert_eq!(TokenLine::find(&format!("\r{t}\n")), Some(Ok(t)));
    }
}
