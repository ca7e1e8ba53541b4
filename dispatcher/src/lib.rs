//! Ferry's dispatcher: runs one job on one board, called once per job by a
//! scheduler, and reports through its exit code and output folder.
//!
//! Module map: [`run`] is the job from power-on to results; [`job`] and
//! [`device`] read the user's files; [`power`], [`console`] and [`client`]
//! (with [`netns`] and [`tls`]) talk to the board; [`records`] streams the
//! board's records back ([`stream`] receives them live from the test agent); [`events`] and [`report`] write the
//! output folder ([`output`] the files schedulers read, [`timings`] the boot
//! phases; [`kernel_trouble`] the kernel's reports as results, [`fs_check`]
//! its reports of unclean filesystems as warnings); [`outcome`]
//! is the exit-code contract and decides every class. [`lava_run`] is
//! `lava-run` for lava-worker ([`lava_device`] reads its device dictionary,
//! [`lava_log`] posts its log).

pub mod board;
pub mod cli;
pub mod client;
pub mod console;
pub mod device;
pub mod events;
pub mod exec;
pub mod fs_check;
pub mod git;
pub mod html;
pub mod job;
pub mod jobs;
pub mod kernel_trouble;
pub mod lab;
pub mod lava_device;
pub mod lava_job;
pub mod lava_log;
pub mod lava_run;
pub mod lock;
pub mod netns;
pub mod outcome;
pub mod output;
pub mod power;
pub mod progress;
pub mod records;
pub mod report;
pub mod run;
pub mod runs;
pub mod stream;
pub mod timings;
pub mod tls;
pub mod yaml;
