//! The master agent's configuration, baked into the master image
//! (`/etc/ferry/master-agent.yaml` by convention).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::platform::linux::LinuxConfig;
use crate::platform::sim::{SimConfig, SimPartition};
use crate::results::RecordLimits;

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
    /// The partitions a job may name (Deploy, InstallTestAgent,
    /// SetBootOnce, FetchResults); every other name is refused. The device
    /// file's list is the dispatcher's view; this is the board's own word.
    pub allowed_partitions: Vec<String>,
    /// The partitions this master image boots from (its kernel, rootfs,
    /// firmware): never written for a job, and refused in
    /// `allowed_partitions`.
    #[serde(default)]
    pub boot_partitions: Vec<String>,
    /// The partition holding the boot-once flag (never written for a job).
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
    /// How much FetchResults returns: `{max_file_bytes, max_total_bytes,
    /// max_files}`, defaults 1 GiB, 2 GiB, 1000.
    #[serde(default)]
    pub records: RecordLimits,
    /// How long a client may take to finish its TLS handshake.
    #[serde(default = "default_handshake", with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Largest gRPC message the agent decodes or sends (a Deploy chunk is
    /// 256 KiB); larger is refused before it is buffered.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Calls served at once on one connection (also its HTTP/2 streams).
    #[serde(default = "default_max_calls")]
    pub max_concurrent_calls: usize,
    /// Longest any call may run, whatever deadline the caller sent (or none):
    /// a caller that never finishes cannot hold a partition forever.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub call_timeout: Duration,
    /// HTTP/2 ping interval; a peer that does not answer within the same
    /// time is dropped, and its calls with it.
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub keepalive: Duration,
    /// Connections open at once; one more is closed as it arrives.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// The longest timeout an `Exec` call may ask for.
    #[serde(default = "default_exec_max", with = "humantime_serde")]
    pub exec_max_timeout: Duration,
    /// How often a dropped image download is resumed (by `Range`) before
    /// the deploy fails; all within the job's deploy timeout.
    #[serde(default = "default_download_retries")]
    pub download_retries: u32,
    /// Pause before the first resume; doubled on each, at most 8x.
    #[serde(default = "default_download_backoff", with = "humantime_serde")]
    pub download_backoff: Duration,
    /// How long connecting to an image server may take.
    #[serde(default = "default_download_connect", with = "humantime_serde")]
    pub download_connect_timeout: Duration,
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
fn default_handshake() -> Duration {
    Duration::from_secs(10)
}
fn default_max_message() -> usize {
    4 << 20
}
fn default_max_calls() -> usize {
    8
}
fn default_call_timeout() -> Duration {
    Duration::from_secs(2 * 3600)
}
fn default_max_connections() -> usize {
    8
}
fn default_exec_max() -> Duration {
    Duration::from_secs(3600)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(20)
}
fn default_download_retries() -> u32 {
    5
}
fn default_download_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_download_connect() -> Duration {
    Duration::from_secs(15)
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
    /// Bad YAML, unknown key or a refused value.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ParseError,
    },
}

/// Why a configuration text was refused.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Bad YAML or unknown key (the message carries line and column).
    #[error(transparent)]
    Yaml(#[from] serde_norway::Error),
    /// A key whose value would be unsafe.
    #[error("key `{key}`: {why}")]
    Key {
        /// The key.
        key: &'static str,
        /// Why.
        why: String,
    },
}

impl Config {
    /// Why partition `name` is never written for a job, if it is not.
    pub fn protected(&self, name: &str) -> Option<&'static str> {
        if name == self.boot_flag_partition {
            Some("it holds the boot selection (`boot_flag_partition`)")
        } else if self.boot_partitions.iter().any(|p| p == name) {
            Some("the master image boots from it (`boot_partitions`)")
        } else {
            None
        }
    }

    /// Refuses names outside the wire charset and an allowlist that
    /// includes what the master image itself needs.
    fn check(&self) -> Result<(), ParseError> {
        let names = std::iter::once(("boot_flag_partition", &self.boot_flag_partition))
            .chain(self.boot_partitions.iter().map(|p| ("boot_partitions", p)))
            .chain(
                self.allowed_partitions
                    .iter()
                    .map(|p| ("allowed_partitions", p)),
            );
        for (key, name) in names {
            ferry_proto::names::check(name).map_err(|e| ParseError::Key {
                key,
                why: e.to_string(),
            })?;
        }
        for name in &self.allowed_partitions {
            if let Some(why) = self.protected(name) {
                return Err(ParseError::Key {
                    key: "allowed_partitions",
                    why: format!("partition {name:?} can never be written for a job: {why}"),
                });
            }
        }
        Ok(())
    }
}

impl Config {
    /// Parses a configuration; relative paths are taken from `base`.
    ///
    /// # Errors
    /// Bad YAML, unknown keys, or a boot partition in the allowlist.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ParseError> {
        let mut c: Config = serde_norway::from_str(text)?;
        c.check()?;
        c.test_agent_bundle = base.join(&c.test_agent_bundle);
        if let PlatformConfig::Sim(sim) = &mut c.platform {
            for p in sim.partitions.values_mut() {
                match p {
                    SimPartition::File(f) | SimPartition::Dir(f) => *f = base.join(&*f),
                }
            }
            if let Some(m) = &mut sim.mountinfo {
                *m = base.join(&*m);
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
            "test_agent_bundle: /usr/share/ferry/test-agent.tar.gz\nallowed_partitions: [testrootfs]\nplatform: {linux: {}}\n",
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
            "test_agent_bundle: b.tgz\nallowed_partitions: [testrootfs]\nannounce_interval: 500ms\nplatform:\n  sim:\n    partitions:\n      testrootfs: {dir: parts/root}\n",
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
            "test_agent_bundle: b\nplatform: {linux: {}}\nlisten_port: 1\nallowed_partitions: []\n",
            Path::new("/"),
        )
        .expect_err("unknown");
        let msg = err.to_string();
        assert!(
            msg.contains("listen_port") && msg.contains("line 3"),
            "{msg}"
        );
    }

    #[test]
    fn boot_partitions_can_never_be_allowed() {
        let dir = tempfile::tempdir().expect("tmp");
        for (extra, allowed, named) in [
            ("", "[testrootfs, bootsel]", "bootsel"),
            ("boot_flag_partition: sel\n", "[sel]", "sel"),
            (
                "boot_partitions: [rootfs-a, kernel]\n",
                "[testrootfs, kernel]",
                "kernel",
            ),
        ] {
            let path = dir.path().join("agent.yaml");
            std::fs::write(
                &path,
                format!("test_agent_bundle: b\n{extra}allowed_partitions: {allowed}\nplatform: {{linux: {{}}}}\n"),
            )
            .expect("write");
            let msg = Config::load(&path).expect_err(named).to_string();
            assert!(
                msg.starts_with(&path.display().to_string())
                    && msg.contains("key `allowed_partitions`")
                    && msg.contains(&format!("{named:?}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn the_allowlist_is_required_and_its_names_plain() {
        let e = Config::parse(
            "test_agent_bundle: b\nplatform: {linux: {}}\n",
            Path::new("/"),
        )
        .expect_err("required");
        assert!(e.to_string().contains("allowed_partitions"), "{e}");
        let e = Config::parse(
            "test_agent_bundle: b\nallowed_partitions: [../sda]\nplatform: {linux: {}}\n",
            Path::new("/"),
        )
        .expect_err("path");
        assert!(e.to_string().contains("key `allowed_partitions`"), "{e}");
    }

    #[test]
    fn the_virtual_boards_config_parses_and_allows_only_its_test_rootfs() {
        let text = include_str!("../../images/master/master-agent.yaml");
        let c = Config::parse(text, Path::new("/")).expect("images/master/master-agent.yaml");
        assert_eq!(c.allowed_partitions, ["testrootfs"]);
        assert!(c.protected("bootsel").is_some());
    }
}
