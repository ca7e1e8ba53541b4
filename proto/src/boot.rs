//! The boot-once flag: the contract between the master agent, which sets it,
//! and the master image's init (or the simulated board), which reads and
//! clears it before booting the test image once.
//!
//! It is the first 512-byte sector of the boot-selection partition:
//! `FERRY-BOOT-ONCE <partition>\n`, zero-padded. A zeroed sector means
//! "boot the master image". The shell form, for a busybox init:
//! `dd if=$DEV bs=512 count=1 | tr -d '\0' | head -n1`.

/// First word of a set flag.
pub const MAGIC: &str = "FERRY-BOOT-ONCE";
/// Size of the flag area.
pub const SIZE: usize = 512;

/// The sector that selects `partition` for the next boot.
pub fn encode(partition: &str) -> [u8; SIZE] {
    let mut sector = [0u8; SIZE];
    let text = format!("{MAGIC} {partition}\n");
    let n = text.len().min(SIZE);
    sector[..n].copy_from_slice(&text.as_bytes()[..n]);
    sector
}

/// The partition a flag sector selects, if any.
pub fn decode(sector: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(sector);
    let first = text.trim_start_matches('\0').lines().next()?;
    let partition = first.strip_prefix(MAGIC)?.trim().trim_end_matches('\0');
    (!partition.is_empty()).then(|| partition.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_blank_means_master() {
        assert_eq!(decode(&encode("testrootfs")), Some("testrootfs".into()));
        assert_eq!(decode(&[0u8; SIZE]), None);
        assert_eq!(decode(b"garbage"), None);
    }
}
