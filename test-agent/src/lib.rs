//! Ferry's test agent: started by the test image's boot, it runs the test
//! plan the master agent left on the rootfs, records every line and result
//! as fsync'd, append-only records on that rootfs, mirrors them to the
//! console for people watching, then reboots the board back to its master
//! image.
//!
//! It is deliberately synchronous: it waits on child processes and writes
//! files, and it must run on the smallest test images.

pub mod bundle;
pub mod cli;
pub mod helpers;
pub mod kernel;
pub mod mirror;
pub mod parse;
pub mod records;
pub mod runner;
pub mod socket;
pub mod stream;

/// This agent's version; the master agent bundles the same.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
