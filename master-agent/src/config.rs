//! The master agent's configuration, baked into the master image
//! (`/etc/ferry/master-agent.yaml` by convention).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::platform::linux::LinuxConfig;
use crate::platform::sim::{SimConfig, SimPartition};

/// Which platform the agent drives.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum PlatformConfig {
    /// A real Linux board.
    Linux(#[serde(default)] LinuxConfig),
    /// The simulated board.
    Sim(SimConfig),
}

/// Everything the master agent is told at start.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where to serve gRPC; port 0 picks a free one.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address to announce; by default the listen address, or the first
    /// non-loopback IPv4 address when listening on all addresses.
    #[serde(default)]
    pub advertise: Option<IpAddr>,
    /// The console tty; standard input/output when absent.
    #[serde(default)]
    pub console: Option<PathBuf>,
    /// The bundled test-agent tarball.
    pub test_agent_bundle: PathBuf,
    /// The partition holding the boot-once flag.
    #[serde(default = "default_boot_flag")]
    pub boot_flag_partition: String,
    /// Instead of writing the flag: a shell command that selects the
    /// partition in `$FERRY_PARTITION` for the next boot only (e.g.
    /// `fw_setenv ferry_boot_once "$FERRY_PARTITION"` for U-Boot, or
    /// `grub-reboot ...`).
    #[serde(default)]
    pub boot_once_command: Option<String>,
    /// How long `boot_once_command` may run.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub boot_once_timeout: Duration,
    /// How often to repeat the announcement until a dispatcher answers.
    #[serde(default = "default_announce", with = "humantime_serde")]
    pub announce_interval: Duration,
    /// How long the dispatcher may pause inside a deploy stream.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Delay between replying to Reboot and rebooting, so the reply gets out.
    #[serde(default = "default_reboot_delay", with = "humantime_serde")]
    pub reboot_delay: Duration,
    /// The platform: `{linux: {...}}` or `{sim: {partitions: ...}}`.
    #[serde(with = "serde_norway::with::singleton_map_recursive")]
    pub platform: PlatformConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7070))
}
fn default_boot_flag() -> String {
    "bootsel".into()
}
fn default_hook_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_announce() -> Duration {
    Duration::from_secs(2)
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_reboot_delay() -> Duration {
    Duration::from_millis(300)
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bad YAML or unknown key (the message carries line and column).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why, with line and column.
        source: serde_norway::Error,
    },
}

impl Config {
    /// Parses a configuration; relative paths are taken from `base`.
    ///
    /// # Errors
    /// Bad YAML or unknown keys.
    pub fn parse(text: &str, base: &Path) -> Result<Self, serde_norway::Error> {
        let mut c: Config = serde_norway::from_str(text)?;
        c.test_agent_bundle = base.join(&c.test_agent_bundle);
        if let PlatformConfig::Sim(sim) = &mut c.platform {
            for p in sim.partitions.values_mut() {
                match p {
                    SimPartition::File(f) | SimPartition::Dir(f) => *f = base.join(&*f),
                }
            }
        }
        Ok(c)
    }

    /// Loads a configuration file.
    ///
    /// # Errors
    /// See [`ConfigError`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_defaults() {
        let c = Config::parse(
            "test_agent_bundle: /usr/share/ferry/test-agent.tar.gz\nplatform: {linux: {}}\n",
            Path::new("/"),
        )
        .expect("parse");
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.platform, PlatformConfig::Linux(LinuxConfig::default()));
        assert_eq!(c.announce_interval, Duration::from_secs(2));
    }

    #[test]
    fn sim_paths_are_relative_to_the_file() {
        let c = Config::parse(
            "test_agent_bundle: b.tgz\nannounce_interval: 500ms\nplatform:\n  sim:\n    partitions:\n      testrootfs: {dir: parts/root}\n",
            Path::new("/board"),
        )
        .expect("parse");
        assert_eq!(c.test_agent_bundle, Path::new("/board/b.tgz"));
        let PlatformConfig::Sim(sim) = c.platform else {
            panic!("sim")
        };
        assert_eq!(
            sim.partitions["testrootfs"],
            SimPartition::Dir("/board/parts/root".into())
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = Config::parse(
            "test_agent_bundle: b\nplatform: {linux: {}}\nlisten_port: 1\n",
            Path::new("/"),
        )
        .expect_err("unknown");
        let msg = err.to_string();
        assert!(
            msg.contains("listen_port") && msg.contains("line 3"),
            "{msg}"
        );
    }
}
