//! Outcome classes and exit codes, the contract with schedulers, and the one
//! place that decides them: a failure is a typed [`Kind`] raised in a
//! [`Phase`], and [`class`] maps the pair to a [`Class`]. Nothing else in
//! the dispatcher picks a class; [`Verdict`] combines the failures of a run
//! (the earliest decides, later ones are kept beside it).
//!
//! | class | exit code | meaning |
//! | --- | --- | --- |
//! | `complete` | 0 | the job ran; test results may pass or fail |
//! | `internal-error` | 1 | a bug in the dispatcher itself (board still powered off, outputs written) |
//! | `job-error` | 2 | the job or device file is wrong |
//! | `infrastructure-error` | 3 | the lab failed (power, console, agent, network) |
//! | `test-error` | 4 | the software under test broke the run |
//! | `canceled` | 5 | SIGTERM or SIGINT |
//!
//! A scheduler retries infrastructure errors and marks the board unhealthy.

use serde::Serialize;

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// The job ran to the end.
    Complete,
    /// The job or device file is wrong.
    JobError,
    /// The lab failed.
    InfrastructureError,
    /// The software under test broke the run.
    TestError,
    /// Stopped by a signal.
    Canceled,
    /// A bug in the dispatcher itself; the board was still powered off.
    InternalError,
}

impl Class {
    /// Every class, in exit-code order.
    pub const ALL: [Class; 6] = [
        Class::Complete,
        Class::InternalError,
        Class::JobError,
        Class::InfrastructureError,
        Class::TestError,
        Class::Canceled,
    ];

    /// The exit code schedulers see.
    pub fn exit_code(self) -> u8 {
        match self {
            Class::Complete => 0,
            Class::JobError => 2,
            Class::InfrastructureError => 3,
            Class::TestError => 4,
            Class::Canceled => 5,
            Class::InternalError => INTERNAL_ERROR_EXIT,
        }
    }

    /// Its name in `outcome.json`.
    pub fn name(self) -> &'static str {
        match self {
            Class::Complete => "complete",
            Class::JobError => "job-error",
            Class::InfrastructureError => "infrastructure-error",
            Class::TestError => "test-error",
            Class::Canceled => "canceled",
            Class::InternalError => "internal-error",
        }
    }
}

/// Exit code for a bug in the dispatcher itself.
pub const INTERNAL_ERROR_EXIT: u8 = 1;

/// Where a run was when something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Reading the job and device files, taking the device.
    Setup,
    /// Powering the board on, opening its console.
    Power,
    /// Waiting for the master agent, handing it a token.
    Boot,
    /// Deploying images.
    Deploy,
    /// Installing the test agent, setting the boot-once flag, rebooting.
    Install,
    /// The test image's boot, until the board is back in its master image.
    Test,
    /// Returning the records.
    Fetch,
    /// Powering the board off at the end.
    PowerOff,
}

impl Phase {
    /// Every phase, in the order a run goes through them.
    pub const ALL: [Phase; 8] = [
        Phase::Setup,
        Phase::Power,
        Phase::Boot,
        Phase::Deploy,
        Phase::Install,
        Phase::Test,
        Phase::Fetch,
        Phase::PowerOff,
    ];

    /// Its name in events, the device lock and messages.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Power => "power-on",
            Phase::Boot => "waiting for the master agent",
            Phase::Deploy => "deploy",
            Phase::Install => "install",
            Phase::Test => "test",
            Phase::Fetch => "fetching results",
            Phase::PowerOff => "power-off",
        }
    }

    /// Its short name, in `outcome.json` and the README's table.
    pub fn key(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Power => "power",
            Phase::Boot => "boot",
            Phase::Deploy => "deploy",
            Phase::Install => "install",
            Phase::Test => "test",
            Phase::Fetch => "fetch",
            Phase::PowerOff => "power-off",
        }
    }
}

/// What went wrong, as a type: the class follows from it and the [`Phase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The job file, device file, output folder or an input they name
    /// (image, definition, bmap) is wrong.
    JobInput,
    /// The master agent refused a request as invalid (`INVALID_ARGUMENT`,
    /// `NOT_FOUND`, `OUT_OF_RANGE`, `PERMISSION_DENIED`, `DATA_LOSS`).
    Refused,
    /// Another job holds the device.
    DeviceBusy,
    /// A power command failed, hung or could not start.
    Power,
    /// The console could not be opened or written, or closed.
    Console,
    /// The master agent's connection, TLS or a call failed, or the
    /// transfer was corrupted on the way.
    Agent,
    /// The board's master image did not announce itself in time.
    NoMaster,
    /// The test image booted where the master image was expected, twice.
    UnexpectedTestBoot,
    /// A kernel panic line on the console.
    KernelPanic,
    /// The test image did not come back within the job's test timeout.
    TestHung,
    /// The test agent never ran, or recorded nothing.
    TestAgentMissing,
    /// The test agent did not finish its plan.
    TestAgentUnfinished,
    /// A definition called `lava-test-raise`.
    Raised,
    /// The test boot's kernel log reported an oops, BUG, WARNING, panic,
    /// hung task or soft lockup.
    KernelTrouble,
    /// The job's own timeout.
    JobTimeout,
    /// SIGTERM or SIGINT.
    Canceled,
    /// A bug in the dispatcher (a panic).
    Bug,
}

impl Kind {
    /// Every kind, in the README table's order.
    pub const ALL: [Kind; 17] = [
        Kind::JobInput,
        Kind::Refused,
        Kind::DeviceBusy,
        Kind::Power,
        Kind::Console,
        Kind::Agent,
        Kind::NoMaster,
        Kind::UnexpectedTestBoot,
        Kind::KernelPanic,
        Kind::TestHung,
        Kind::TestAgentMissing,
        Kind::TestAgentUnfinished,
        Kind::Raised,
        Kind::KernelTrouble,
        Kind::JobTimeout,
        Kind::Canceled,
        Kind::Bug,
    ];

    /// Its name in `outcome.json` and the README's table.
    pub fn key(self) -> &'static str {
        match self {
            Kind::JobInput => "job-input",
            Kind::Refused => "refused",
            Kind::DeviceBusy => "device-busy",
            Kind::Power => "power",
            Kind::Console => "console",
            Kind::Agent => "agent",
            Kind::NoMaster => "no-master",
            Kind::UnexpectedTestBoot => "unexpected-test-boot",
            Kind::KernelPanic => "kernel-panic",
            Kind::TestHung => "test-hung",
            Kind::TestAgentMissing => "test-agent-missing",
            Kind::TestAgentUnfinished => "test-agent-unfinished",
            Kind::Raised => "raised",
            Kind::KernelTrouble => "kernel-trouble",
            Kind::JobTimeout => "job-timeout",
            Kind::Canceled => "canceled",
            Kind::Bug => "bug",
        }
    }
}

/// The one decision: the class of a failure of `kind` in `phase`.
///
/// The board belongs to the lab until the test image is booted and again
/// once it is back in its master image: what breaks outside the test boot
/// is the lab's (or the job's, for what it asked for), never the software
/// under test's; what the test image does is never the lab's.
pub fn class(phase: Phase, kind: Kind) -> Class {
    use Class::*;
    match kind {
        Kind::JobInput => JobError,
        // The job's own requests are deploys and installs; a refusal of
        // anything else the dispatcher asked is the lab's.
        Kind::Refused => match phase {
            Phase::Deploy | Phase::Install => JobError,
            _ => InfrastructureError,
        },
        Kind::DeviceBusy
        | Kind::Power
        | Kind::Console
        | Kind::Agent
        | Kind::NoMaster
        | Kind::UnexpectedTestBoot => InfrastructureError,
        // A panic of the master image is the lab's; of the test image, the
        // software under test's.
        Kind::KernelPanic | Kind::JobTimeout => match phase {
            Phase::Test => TestError,
            _ => InfrastructureError,
        },
        Kind::TestHung
        | Kind::TestAgentMissing
        | Kind::TestAgentUnfinished
        | Kind::Raised
        | Kind::KernelTrouble => TestError,
        Kind::Canceled => Canceled,
        Kind::Bug => InternalError,
    }
}

/// A failure that ends the job (or, found later, stands beside the one
/// that did): its kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// What went wrong; with the phase, it decides the class.
    pub kind: Kind,
    /// What happened, and where.
    pub message: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
    /// The job, device file or an input they name is wrong.
    pub fn job(message: impl Into<String>) -> Self {
        Self::new(Kind::JobInput, message)
    }
    /// A power command failed.
    pub fn power(message: impl Into<String>) -> Self {
        Self::new(Kind::Power, message)
    }
    /// The console failed.
    pub fn console(message: impl Into<String>) -> Self {
        Self::new(Kind::Console, message)
    }
    /// The master agent or the way to it failed.
    pub fn agent(message: impl Into<String>) -> Self {
        Self::new(Kind::Agent, message)
    }
    /// A bug in the dispatcher.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Bug, message)
    }
    /// Its class in `phase`.
    pub fn class_in(&self, phase: Phase) -> Class {
        class(phase, self.kind)
    }
}

/// How a run ended, for the output folder and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The class.
    pub class: Class,
    /// What happened.
    pub message: String,
}

impl Outcome {
    /// The outcome of `failure` in `phase`.
    pub fn of(phase: Phase, failure: Failure) -> Self {
        Outcome {
            class: failure.class_in(phase),
            message: failure.message,
        }
    }
}

/// One failure of a run, where it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Noted {
    /// The phase.
    pub phase: Phase,
    /// The kind.
    pub kind: Kind,
    /// Its class there.
    pub class: Class,
    /// The message.
    pub message: String,
}

/// Every failure of a run, in the order they happened, and what they make
/// of it: the earliest failure decides the class (a fetch that fails after
/// the test image hung does not turn a test error into the lab's); later
/// ones are kept in `outcome.json` (`failures`) and count for health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    failures: Vec<Noted>,
}

/// A health check's answer: whether the scheduler should take the board offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// The job was a health check (`health_check: true`).
    pub health_check: bool,
    /// Take the board offline.
    pub take_offline: bool,
    /// Why (the first infrastructure failure), when it should.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Verdict {
    /// Notes `failure`, raised in `phase`.
    pub fn note(&mut self, phase: Phase, failure: Failure) {
        self.failures.push(Noted {
            phase,
            kind: failure.kind,
            class: failure.class_in(phase),
            message: failure.message,
        });
    }

    /// The failures, earliest first.
    pub fn failures(&self) -> &[Noted] {
        &self.failures
    }

    /// The run's outcome: the earliest failure's class and message, or
    /// `complete`.
    pub fn outcome(&self) -> Outcome {
        match self.failures.first() {
            Some(f) => Outcome {
                class: f.class,
                message: f.message.clone(),
            },
            None => Outcome {
                class: Class::Complete,
                message: "job complete".into(),
            },
        }
    }

    /// A health check's answer: the board goes offline on any
    /// infrastructure error of the run, first or later (a power off that
    /// failed after a test error still says the lab is broken); never for
    /// what the software under test did, nor on a job that is not a health check.
    pub fn health(&self, health_check: bool) -> Health {
        let reason = self
            .failures
            .iter()
            .find(|f| f.class == Class::InfrastructureError)
            .map(|f| f.message.clone())
            .filter(|_| health_check);
        Health {
            health_check,
            take_offline: reason.is_some(),
            reason,
        }
    }
}

/// The README's table of the class of every (kind, phase) pair, as
/// markdown: `job`, `infra`, `test`, `canceled`, `internal`.
pub fn table_markdown() -> String {
    let short = |c: Class| match c {
        Class::Complete => "complete",
        Class::JobError => "job",
        Class::InfrastructureError => "infra",
        Class::TestError => "test",
        Class::Canceled => "canceled",
        Class::InternalError => "internal",
    };
    let mut s = String::from("| kind |");
    for p in Phase::ALL {
        s += &format!(" {} |", p.key());
    }
    s += "\n| --- |";
    s += &" --- |".repeat(Phase::ALL.len());
    s += "\n";
    for k in Kind::ALL {
        s += &format!("| `{}` |", k.key());
        for p in Phase::ALL {
            s += &format!(" {} |", short(class(p, k)));
        }
        s += "\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use Class::*;

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let all = [
            (Complete, 0, "complete"),
            (JobError, 2, "job-error"),
            (InfrastructureError, 3, "infrastructure-error"),
            (TestError, 4, "test-error"),
            (Canceled, 5, "canceled"),
            (InternalError, 1, "internal-error"),
        ];
        for (class, code, name) in all {
            assert_eq!((class.exit_code(), class.name()), (code, name));
            assert_eq!(
                serde_json::to_value(class).expect("json"),
                serde_json::json!(name)
            );
        }
    }

    /// Every (phase, kind) pair, written out: a change to [`class`] must
    /// change this table too, on purpose.
    #[test]
    fn every_phase_and_kind_has_its_class() {
        const I: Class = InfrastructureError;
        const T: Class = TestError;
        const J: Class = JobError;
        // Columns: setup, power, boot, deploy, install, test, fetch, power-off.
        let table: [(Kind, [Class; 8]); 17] = [
            (Kind::JobInput, [J, J, J, J, J, J, J, J]),
            (Kind::Refused, [I, I, I, J, J, I, I, I]),
            (Kind::DeviceBusy, [I, I, I, I, I, I, I, I]),
            (Kind::Power, [I, I, I, I, I, I, I, I]),
            (Kind::Console, [I, I, I, I, I, I, I, I]),
            (Kind::Agent, [I, I, I, I, I, I, I, I]),
            (Kind::NoMaster, [I, I, I, I, I, I, I, I]),
            (Kind::UnexpectedTestBoot, [I, I, I, I, I, I, I, I]),
            (Kind::KernelPanic, [I, I, I, I, I, T, I, I]),
            (Kind::TestHung, [T, T, T, T, T, T, T, T]),
            (Kind::TestAgentMissing, [T, T, T, T, T, T, T, T]),
            (Kind::TestAgentUnfinished, [T, T, T, T, T, T, T, T]),
            (Kind::Raised, [T, T, T, T, T, T, T, T]),
            (Kind::KernelTrouble, [T, T, T, T, T, T, T, T]),
            (Kind::JobTimeout, [I, I, I, I, I, T, I, I]),
            (Kind::Canceled, [Canceled; 8]),
            (Kind::Bug, [InternalError; 8]),
        ];
        assert_eq!(
            table.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            Kind::ALL.to_vec()
        );
        for (kind, row) in table {
            for (phase, want) in Phase::ALL.into_iter().zip(row) {
                assert_eq!(class(phase, kind), want, "{kind:?} in {phase:?}");
            }
        }
    }

    fn readme() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        std::fs::read_to_string(path).expect("README.md")
    }

    #[test]
    fn the_readme_has_the_class_table() {
        let want = table_markdown();
        assert!(
            readme().contains(&want),
            "README.md's outcome table differs from outcome::class; it should read:\n{want}"
        );
    }

    #[test]
    fn the_readme_exit_code_table_matches() {
        let readme = readme();
        let rows: Vec<(u8, String)> = readme
            .lines()
            .skip_while(|l| !l.starts_with("| exit | class | meaning |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let mut cells = l.split('|').map(str::trim).skip(1);
                let code = cells.next()?.parse().ok()?;
                let class = cells.next()?.trim_matches('`').to_string();
                Some((code, class))
            })
            .collect();
        let want: Vec<(u8, String)> = Class::ALL
            .iter()
            .map(|c| (c.exit_code(), c.name().to_string()))
            .collect();
        assert_eq!(rows, want, "README.md's exit code table");
    }

    #[test]
    fn the_earliest_failure_decides_and_later_ones_count_for_health() {
        let mut v = Verdict::default();
        assert_eq!(v.outcome().class, Complete);
        v.note(Phase::Test, Failure::new(Kind::TestHung, "hung"));
        v.note(Phase::Fetch, Failure::agent("connection broke"));
        assert_eq!(
            v.outcome(),
            Outcome {
                class: TestError,
                message: "hung".into()
            }
        );
        assert_eq!(v.failures().len(), 2);
        assert!(v.health(true).take_offline);
        assert!(!v.health(false).take_offline);

        let mut v = Verdict::default();
        v.note(Phase::Test, Failure::new(Kind::Raised, "raised"));
        v.note(Phase::Test, Failure::new(Kind::KernelTrouble, "WARNING"));
        assert_eq!(v.outcome().class, TestError);
        assert!(
            !v.health(true).take_offline,
            "test failures never take a board offline"
        );

        let mut v = Verdict::default();
        v.note(Phase::PowerOff, Failure::power("off failed"));
        assert_eq!(v.outcome().class, InfrastructureError);
        assert_eq!(v.health(true).reason.as_deref(), Some("off failed"));
    }
}
