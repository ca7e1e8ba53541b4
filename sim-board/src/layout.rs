//! The board's folder: what a lab engineer would flash once.
//!
//! ```text
//! DIR/board.yaml          which master-agent binary the board runs
//! DIR/master-agent.yaml   the master agent's config (sim platform)
//! DIR/test-agent.tar.gz   the bundled test agent
//! DIR/parts/bootsel       boot-selection partition (file)
//! DIR/parts/testrootfs/   test rootfs partition (folder = filesystem)
//! DIR/parts/firmware      a raw partition images can be deployed to (file)
//! DIR/console             symlink to the pty while the board is on
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Size of the `firmware` partition.
pub const FIRMWARE_SIZE: u64 = 16 << 20;

/// What the supervisor needs to boot the master image.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardFile {
    /// The master agent binary ("flashed" into the master image).
    pub master_agent: PathBuf,
}

/// Paths inside a board folder.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The board folder.
    pub dir: PathBuf,
}

/// Why a board could not be created.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A binary the board needs is missing.
    #[error("{0} not found; build the workspace first (cargo build --workspace --bins)")]
    MissingBinary(PathBuf),
    /// Bundling the test agent failed.
    #[error("test-agent bundle failed: {0}")]
    Bundle(String),
    /// board.yaml is malformed.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_norway::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.into(),
        source,
    }
}

impl Layout {
    /// The layout of `dir`.
    pub fn new(dir: &Path) -> Self {
        Layout { dir: dir.into() }
    }
    /// board.yaml.
    pub fn board_file(&self) -> PathBuf {
        self.dir.join("board.yaml")
    }
    /// The console symlink.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console")
    }
    /// The supervisor's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("supervisor.pid")
    }
    /// The process group of the running OS, for a forced power-off.
    pub fn os_pgid_file(&self) -> PathBuf {
        self.dir.join("os.pgid")
    }
    /// The test boot's kernel log: a FIFO the test agent reads as it reads
    /// `/dev/kmsg` (`level,seq,usec,flags;text` lines); writing a line to it
    /// is how a test makes the simulated kernel report something.
    pub fn kmsg(&self) -> PathBuf {
        self.dir.join("kmsg")
    }
    /// Where strace reports the test boot's sync calls (a FIFO, removed
    /// once opened): see [`crate::cache`].
    pub fn sync_report(&self) -> PathBuf {
        self.dir.join("sync-report")
    }
    /// The supervisor's control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    /// The supervisor's own log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("board.log")
    }
    /// The master agent's config.
    pub fn agent_config(&self) -> PathBuf {
        self.dir.join("master-agent.yaml")
    }
    /// A partition.
    pub fn part(&self, name: &str) -> PathBuf {
        self.dir.join("parts").join(name)
    }

    /// Reads board.yaml.
    ///
    /// # Errors
    /// When it is missing or malformed.
    pub fn load(&self) -> Result<BoardFile, LayoutError> {
        let path = self.board_file();
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        serde_norway::from_str(&text).map_err(|source| LayoutError::Parse { path, source })
    }

    /// Creates the board ("flashes the master image") from the agent
    /// binaries in `agents`, unless it exists already.
    ///
    /// # Errors
    /// When a binary is missing or a file cannot be written.
    pub fn ensure(&self, agents: &Path) -> Result<(), LayoutError> {
        if self.board_file().exists() {
            return Ok(());
        }
        let master = agents.join("master-agent");
        let test = agents.join("test-agent");
        for bin in [&master, &test] {
            if !bin.exists() {
                return Err(LayoutError::MissingBinary(bin.clone()));
            }
        }
        for dir in [
            self.part("testrootfs").join("etc/init.d"),
            self.dir.join("parts"),
        ] {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        let bootsel = self.part("bootsel");
        std::fs::write(&bootsel, vec![0u8; 4096]).map_err(io(&bootsel))?;
        let firmware = self.part("firmware");
        let f = std::fs::File::create(&firmware).map_err(io(&firmware))?;
        f.set_len(FIRMWARE_SIZE).map_err(io(&firmware))?;

        let bundle = self.dir.join("test-agent.tar.gz");
        // A bundle placed here by whoever made the folder (`dispatcher lab up`
        // makes one for all its boards) is kept when it is newer than the
        // test agent; packing one per board is most of a board's set-up.
        let fresh = |p: &Path| -> Option<bool> {
            let made = std::fs::metadata(p).ok()?.modified().ok()?;
            Some(made >= std::fs::metadata(&test).ok()?.modified().ok()?)
        };
        if fresh(&bundle) != Some(true) {
            let out = Command::new(&test)
                .arg("bundle")
                .arg("--output")
                .arg(&bundle)
                .output()
                .map_err(io(&test))?;
            if !out.status.success() {
                return Err(LayoutError::Bundle(
                    String::from_utf8_lossy(&out.stderr).into(),
                ));
            }
        }
        // A real board keeps its address across boots (the dispatcher pins
        // it), so the board gets a port now and keeps it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io(&self.dir))?
            .port();
        let config = format!(
            "# Master agent config of a simulated board (written by ferry-sim-board).
listen: 127.0.0.1:{port}
test_agent_bundle: test-agent.tar.gz
boot_flag_partition: bootsel
# What jobs may name; bootsel (and any boot_partitions) never.
allowed_partitions: [testrootfs, firmware]
announce_interval: 1s
platform:
  sim:
    partitions:
      bootsel: {{file: parts/bootsel}}
      testrootfs: {{dir: parts/testrootfs}}
      firmware: {{file: parts/firmware}}
"
        );
        let path = self.agent_config();
        std::fs::write(&path, config).map_err(io(&path))?;
        let board = serde_norway::to_string(&BoardFile {
            master_agent: master,
        })
        .map_err(|source| LayoutError::Parse {
            path: self.board_file(),
            source,
        })?;
        let path = self.board_file();
        std::fs::write(&path, board).map_err(io(&path))
    }
}
