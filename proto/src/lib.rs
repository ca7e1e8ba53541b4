//! Ferry's wire contract, owned in one place.
//!
//! - [`master::v1`]: the master agent's gRPC API (generated from `proto/`).
//! - [`plan::v1`]: the test plan the dispatcher sends and the test agent runs.
//! - [`boot`]: the boot-once flag the master image's init reads.
//! - [`console`]: the lines agents and dispatcher exchange on the serial console.
//! - [`names`]: the one charset for names that cross the wire.
//! - [`record`]: the records the test agent writes on its rootfs and the
//!   dispatcher reads back.
//! - [`stream`]: the live record stream from the test agent to the dispatcher.
//! - [`pin`]: TLS certificate pinning, for whoever dials a Ferry listener.
//!
//! Versioned packages let a newer dispatcher keep talking to boards whose
//! master image was flashed long ago.

pub mod boot;
pub mod console;
pub mod names;
pub mod pin;
pub mod record;
pub mod stream;

/// The master agent's API, generated from `proto/ferry/master`.
pub mod master {
    /// Version 1 of the master agent API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("ferry.master.v1");
    }
}

/// The test plan, generated from `proto/ferry/plan`.
pub mod plan {
    /// Version 1 of the test plan.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("ferry.plan.v1");
    }
}

/// Lowercase hex of `bytes`: how digests travel in the contract
/// (`DeployHeader.sha256`, the console lines' checksum).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of `bytes` in lowercase hex: image digests, and the fingerprint of
/// a TLS certificate (of its DER encoding) as announced on the console.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Whether `s` is a sha256 as the contract spells it: 64 hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The gRPC metadata key that carries the console-issued token.
pub const AUTH_METADATA_KEY: &str = "authorization";

/// The value of [`AUTH_METADATA_KEY`] for a token.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
