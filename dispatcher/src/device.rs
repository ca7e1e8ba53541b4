//! The device file: how to power, hear and reach one board. It arrives with
//! each job (the dispatcher has no global config). Relative paths, and the
//! power commands' working folder, are the device file's folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::outcome::Failure;
use crate::yaml;

/// Shell commands that control the board's power, as a PDU client is called.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Power {
    /// Power on.
    pub on: Option<String>,
    /// Power off; run at the end of every job.
    pub off: String,
    /// Hard reset; used when the board must be forced back (off then on when absent).
    pub reset: Option<String>,
}

/// Where the console is, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleFile {
    tty: Option<PathBuf>,
    #[serde(default = "default_baud")]
    baud: u32,
    tcp: Option<String>,
    telnet: Option<String>,
    command: Option<String>,
}

fn default_baud() -> u32 {
    115_200
}

/// Where the console is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// A tty (serial adapter or pty) at a baud rate.
    Tty {
        /// The device path.
        path: PathBuf,
        /// Baud rate.
        baud: u32,
    },
    /// A TCP serial server in raw mode (ser2net `tcp`), `host:port`.
    Tcp(String),
    /// A serial server's telnet port (ser2net `telnet`), `host:port`.
    Telnet(String),
    /// A command whose stdin/stdout is the console.
    Command(String),
}

/// Network settings for reaching the agent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Network namespace (by name, under /run/netns, or a path) the board's
    /// network lives in; the dispatcher dials the agent from inside it.
    pub namespace: Option<String>,
    /// The master agent's address (`ip:port`). When given, the dispatcher
    /// dials only this address; otherwise it pins the address of the job's
    /// first master announcement. Either way it never dials another.
    pub address: Option<std::net::SocketAddr>,
    /// Where the dispatcher listens for the test agent's live record
    /// stream (`ip:port`, port 0 for any free one): an address of this
    /// host the test image can reach (inside `namespace` when given).
    /// Absent: no stream; the records are fetched through the master image.
    pub stream: Option<std::net::SocketAddr>,
    /// The address the test agent dials for the stream, when it is not
    /// `stream` itself (a port forwarded to it); default: `stream` with
    /// the port bound.
    pub stream_address: Option<std::net::SocketAddr>,
}

/// Device timeouts: every wait on the board has one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// One power command.
    #[serde(with = "humantime_serde")]
    pub power: Duration,
    /// Opening the console once power is on.
    #[serde(with = "humantime_serde")]
    pub console: Duration,
    /// From power-on or reboot to the master agent's announcement.
    #[serde(with = "humantime_serde")]
    pub announce: Duration,
    /// One agent call (connect included), deploys and fetches aside.
    #[serde(with = "humantime_serde")]
    pub rpc: Duration,
    /// Fetching the recorded results back, from the call to the last byte.
    #[serde(with = "humantime_serde")]
    pub fetch: Duration,
    /// How long the results stream may go without a chunk.
    #[serde(with = "humantime_serde")]
    pub fetch_idle: Duration,
    /// A board that answers no HTTP/2 ping for this long is dead: its
    /// connection is dropped and the call under way fails.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            power: Duration::from_secs(30),
            console: Duration::from_secs(10),
            announce: Duration::from_secs(120),
            rpc: Duration::from_secs(30),
            fetch: Duration::from_secs(300),
            fetch_idle: Duration::from_secs(30),
            keepalive: Duration::from_secs(20),
        }
    }
}

/// How many times one step is tried, and the pause between tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Tries in all (0 counts as 1: the step is always tried once).
    #[serde(default = "one")]
    pub attempts: u32,
    /// Pause after a failed try.
    #[serde(with = "humantime_serde", default)]
    pub interval: Duration,
}

fn one() -> u32 {
    1
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 1,
            interval: Duration::ZERO,
        }
    }
}

/// Retries of the steps that change nothing on the board: powering on,
/// booting to the master image and connecting to its agent (only before
/// anything is deployed), and fetching the records (after a hard reset back
/// to the master image). Deploys, installs and the test boot are never
/// retried: they change the test image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retries {
    /// `power.off` then `power.on` (or `reset`).
    pub power: Retry,
    /// Power-on to the master agent's announcement (a retry hard resets).
    pub boot: Retry,
    /// Token, TLS connection and first call to the master agent.
    pub connect: Retry,
    /// Fetching the records (a retry hard resets back to the master image).
    pub fetch: Retry,
}

/// A job's overrides of its device's [`Retries`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetriesOverride {
    /// Overrides `power`.
    pub power: Option<Retry>,
    /// Overrides `boot`.
    pub boot: Option<Retry>,
    /// Overrides `connect`.
    pub connect: Option<Retry>,
    /// Overrides `fetch`.
    pub fetch: Option<Retry>,
}

impl Retries {
    /// These retries with the job's overrides.
    pub fn with(self, o: &RetriesOverride) -> Retries {
        Retries {
            power: o.power.unwrap_or(self.power),
            boot: o.boot.unwrap_or(self.boot),
            connect: o.connect.unwrap_or(self.connect),
            fetch: o.fetch.unwrap_or(self.fetch),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFile {
    device: String,
    power: Power,
    console: ConsoleFile,
    #[serde(default)]
    network: Network,
    partitions: Vec<String>,
    #[serde(default = "default_test_rootfs")]
    test_rootfs: String,
    #[serde(default)]
    timeouts: Timeouts,
    #[serde(default)]
    retries: Retries,
}

fn default_test_rootfs() -> String {
    "testrootfs".into()
}

/// A validated device description.
#[derive(Debug, Clone)]
pub struct Device {
    /// The board's name.
    pub name: String,
    /// The device file.
    pub path: PathBuf,
    /// Folder power commands run in.
    pub dir: PathBuf,
    /// Power commands.
    pub power: Power,
    /// The console.
    pub console: Console,
    /// Network settings.
    pub network: Network,
    /// Partitions jobs may deploy to.
    pub partitions: Vec<String>,
    /// The partition holding the test rootfs.
    pub test_rootfs: String,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Retries (a job may override them).
    pub retries: Retries,
}

impl Device {
    /// Loads and checks a device file.
    ///
    /// # Errors
    /// A job error naming the file, line and key.
    pub fn load(path: &Path) -> Result<Self, Failure> {
        let file: DeviceFile =
            yaml::load(path).map_err(|e| Failure::job(format!("device file {e}")))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let bad = |msg: &str| Failure::job(format!("device file {}: {msg}", path.display()));
        let c = file.console;
        let console = match (c.tty, c.tcp, c.telnet, c.command) {
            (Some(tty), None, None, None) => Console::Tty {
                path: dir.join(tty),
                baud: c.baud,
            },
            (None, Some(addr), None, None) => Console::Tcp(addr),
            (None, None, Some(addr), None) => Console::Telnet(addr),
            (None, None, None, Some(cmd)) => Console::Command(cmd),
            _ => {
                return Err(bad(
                    "console: give exactly one of `tty`, `tcp`, `telnet` or `command`",
                ))
            }
        };
        if file.power.on.is_none() && file.power.reset.is_none() {
            return Err(bad("power: give `on` or `reset` (or both)"));
        }
        if !file.partitions.contains(&file.test_rootfs) {
            return Err(bad(&format!(
                "test_rootfs: {:?} is not listed in `partitions`",
                file.test_rootfs
            )));
        }
        Ok(Device {
            name: file.device,
            path: path.into(),
            dir,
            power: file.power,
            console,
            network: file.network,
            partitions: file.partitions,
            test_rootfs: file.test_rootfs,
            timeouts: file.timeouts,
            retries: file.retries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Device, Failure> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("dev.yaml");
        std::fs::write(&path, text).expect("w");
        Device::load(&path)
    }

    const GOOD: &str = "device: b\npower: {on: 'true', off: 'true'}\nconsole: {tty: console}\npartitions: [testrootfs]\n";

    #[test]
    fn defaults_and_relative_tty() {
        let d = load(GOOD).expect("ok");
        assert!(
            matches!(&d.console, Console::Tty { path, baud: 115_200 } if path.ends_with("console") && path.is_absolute())
        );
        assert_eq!(d.timeouts.rpc, Duration::from_secs(30));
        assert_eq!(d.test_rootfs, "testrootfs");
        assert_eq!(d.network.address, None);
    }

    #[test]
    fn a_pinned_address_is_checked() {
        let d = load(&format!("{GOOD}network: {{address: '192.0.2.2:7070'}}\n")).expect("ok");
        assert_eq!(
            d.network.address,
            Some("192.0.2.2:7070".parse().expect("addr"))
        );
        let e = load(&format!("{GOOD}network: {{address: 'board:7070'}}\n")).expect_err("bad");
        assert!(
            e.message.contains(":5:") && e.message.contains("network.address"),
            "{}",
            e.message
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(&format!("{GOOD}colour: red\n")).expect_err("unknown");
        assert!(
            e.message.contains(":5:1: unknown field `colour`"),
            "{}",
            e.message
        );
        let e = load("device: b\npower: {on: x, off: y}\nconsole: {tty: a, tcp: 'h:1'}\npartitions: [testrootfs]\n")
            .expect_err("two consoles");
        assert!(
            e.message.contains("console: give exactly one"),
            "{}",
            e.message
        );
        let e = load("device: b\npower: {on: x, off: y}\nconsole: {tty: a}\npartitions: [testrootfs]\ntimeouts: {rpc: soon}\n")
            .expect_err("bad duration");
        assert!(
            e.message.contains(":5:") && e.message.contains("timeouts.rpc"),
            "{}",
            e.message
        );
    }
}
