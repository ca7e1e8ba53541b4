//! Outcome classes and exit codes: the contract with schedulers.
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

/// A failure that ends the job, with its class and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// The outcome class.
    pub class: Class,
    /// What happened, and where.
    pub message: String,
}

impl Failure {
    /// A job error.
    pub fn job(message: impl Into<String>) -> Self {
        Failure {
            class: Class::JobError,
            message: message.into(),
        }
    }
    /// An infrastructure error.
    pub fn infra(message: impl Into<String>) -> Self {
        Failure {
            class: Class::InfrastructureError,
            message: message.into(),
        }
    }
    /// A bug in the dispatcher.
    pub fn internal(message: impl Into<String>) -> Self {
        Failure {
            class: Class::InternalError,
            message: message.into(),
        }
    }
    /// A test error.
    pub fn test(message: impl Into<String>) -> Self {
        Failure {
            class: Class::TestError,
            message: message.into(),
        }
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

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Self {
        Outcome {
            class: f.class,
            message: f.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let all = [
            (Class::Complete, 0, "complete"),
            (Class::JobError, 2, "job-error"),
            (Class::InfrastructureError, 3, "infrastructure-error"),
            (Class::TestError, 4, "test-error"),
            (Class::Canceled, 5, "canceled"),
            (Class::InternalError, 1, "internal-error"),
        ];
        for (class, code, name) in all {
            assert_eq!((class.exit_code(), class.name()), (code, name));
            assert_eq!(
                serde_json::to_value(class).expect("json"),
                serde_json::json!(name)
            );
        }
    }
}
