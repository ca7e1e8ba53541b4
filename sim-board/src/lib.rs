//! A simulated board for Ferry: the real `master-agent` and `test-agent`
//! binaries as processes, a pty as the serial console, files and folders as
//! partitions, and power commands like a lab PDU's.
//!
//! `on` starts a supervisor (the "board") in the background; it owns the
//! pty, boots the master image (the master agent) or, when the boot-once
//! flag is set, the test image (the rootfs folder's init scripts), and
//! treats the end of that OS as a reboot. `reset` is a hard reset: the
//! running OS is killed and the board boots again, flag rules included.
//! `off` stops everything; both lose what the test boot never synced
//! ([`cache`]). No VM and no root needed.

pub mod cache;
pub mod cli;
pub mod layout;
pub mod supervisor;
