//! Boot-phase timings of one run, for `outcome.json` and the summary: where
//! a job's time goes between power-on and the fetched records.
//!
//! The run notes the moments it passes ([`Marks`]); the console notes when
//! each kernel printed its first line; the test agent's own records give
//! how long it ran. [`Marks::phases`] turns them into seconds.

use std::time::{Duration, SystemTime};

use ferry_proto::record::{Body, Record};
use serde::Serialize;

/// The moments of one run the phases lie between (host clock).
#[derive(Debug, Default, Clone)]
pub struct Marks {
    /// The power-on (or reset) command started.
    pub power_on: Option<SystemTime>,
    /// The first master agent announced itself.
    pub master: Option<SystemTime>,
    /// The master agent accepted the reboot into the test image.
    pub reboot: Option<SystemTime>,
    /// The test agent announced itself.
    pub test: Option<SystemTime>,
    /// The board was back in its master image (announced).
    pub back: Option<SystemTime>,
    /// The records were fetched.
    pub fetched: Option<SystemTime>,
    /// The live record stream ended with every record (no fetch needed).
    pub streamed: Option<SystemTime>,
}

/// Seconds per phase; `None` where the run did not get there (or, for the
/// kernel, where the console showed no kernel banner).
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Phases {
    /// Power-on command to the kernel's first line (`Linux version`).
    pub power_to_kernel: Option<f64>,
    /// That line to the master agent's announcement.
    pub kernel_to_master: Option<f64>,
    /// Power-on command to the master agent's announcement.
    pub power_to_master: Option<f64>,
    /// The announcement to the reboot request: deploy, install, boot-once.
    pub deploy: Option<f64>,
    /// The reboot request to the test agent's announcement.
    pub reboot_to_test: Option<f64>,
    /// The test agent's run, from its own records (board clock).
    pub test: Option<f64>,
    /// The end of the test agent's run to the master agent's announcement
    /// (the test agent's announcement to it, less its run).
    pub reboot_to_master: Option<f64>,
    /// Back in the master image to the records fetched.
    pub fetch: Option<f64>,
    /// The end of the test agent's run to its live record stream's verified
    /// end (the test agent's announcement to it, less its run): what
    /// replaces `reboot_to_master` and `fetch` when the stream is kept.
    pub stream_end: Option<f64>,
}

/// Seconds from `a` to `b`, to the millisecond, when both happened in order.
fn between(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<f64> {
    let d = b?.duration_since(a?).ok()?;
    Some(millis(d))
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// How long the test agent ran, by its own records (started to finished,
/// in the same boot).
fn test_run(records: &[Record]) -> Option<Duration> {
    let started = records
        .iter()
        .find(|r| matches!(r.body, Body::AgentStarted { .. }))?;
    let finished = records
        .iter()
        .find(|r| matches!(r.body, Body::AgentFinished {}) && r.boot == started.boot)?;
    Some(Duration::from_micros(
        finished.ts_us.checked_sub(started.ts_us)?,
    ))
}

impl Marks {
    /// The phases, given when kernels printed their first line (`kernels`,
    /// in order) and the records fetched.
    pub fn phases(&self, kernels: &[SystemTime], records: &[Record]) -> Phases {
        // The first kernel line between power-on and the master's announcement.
        let kernel = self.power_on.and_then(|on| {
            kernels
                .iter()
                .copied()
                .find(|k| *k >= on && self.master.is_none_or(|m| *k <= m))
        });
        let run = test_run(records);
        let after_run = |end: Option<SystemTime>| match (between(self.test, end), run) {
            (Some(total), Some(run)) => {
                Some(millis(Duration::from_secs_f64(total).saturating_sub(run)))
            }
            _ => None,
        };
        let reboot_to_master = after_run(self.back);
        Phases {
            power_to_kernel: between(self.power_on, kernel),
            kernel_to_master: between(kernel, self.master),
            power_to_master: between(self.power_on, self.master),
            deploy: between(self.master, self.reboot),
            reboot_to_test: between(self.reboot, self.test),
            test: run.map(millis),
            reboot_to_master,
            fetch: between(self.back, self.fetched),
            stream_end: after_run(self.streamed),
        }
    }
}

impl Phases {
    /// One line for the summary, the phases reached, e.g.
    /// `power-on > kernel 0.52s > master 3.10s, deploy 0.90s, ...`.
    pub fn line(&self) -> Option<String> {
        let parts: Vec<String> = [
            ("power-on > kernel", self.power_to_kernel),
            ("kernel > master", self.kernel_to_master),
            (
                "power-on > master",
                self.power_to_master
                    .filter(|_| self.power_to_kernel.is_none()),
            ),
            ("deploy", self.deploy),
            ("reboot > test agent", self.reboot_to_test),
            ("test", self.test),
            ("reboot > master", self.reboot_to_master),
            ("fetch", self.fetch),
            ("test > stream end", self.stream_end),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.map(|s| format!("{name} {s:.2}s")))
        .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1_000_000.0 + secs)
    }

    fn record(ts: f64, boot: &str, body: Body) -> Record {
        Record {
            ts_us: ((500.0 + ts) * 1e6) as u64,
            boot: boot.into(),
            body,
        }
    }

    fn started() -> Body {
        Body::AgentStarted {
            version: "1".into(),
            job: "j".into(),
        }
    }

    #[test]
    fn a_whole_run_gives_every_phase() {
        let marks = Marks {
            power_on: Some(at(0.0)),
            master: Some(at(4.0)),
            reboot: Some(at(5.0)),
            test: Some(at(9.0)),
            back: Some(at(14.0)),
            fetched: Some(at(14.5)),
            streamed: None,
        };
        // A kernel line from before power-on (a previous job) is not this boot's.
        let kernels = [at(-3.0), at(0.75), at(6.0), at(10.5)];
        let records = [
            record(0.0, "t", started()),
            record(1.25, "t", Body::AgentFinished {}),
        ];
        let p = marks.phases(&kernels, &records);
        assert_eq!(
            p,
            Phases {
                power_to_kernel: Some(0.75),
                kernel_to_master: Some(3.25),
                power_to_master: Some(4.0),
                deploy: Some(1.0),
                reboot_to_test: Some(4.0),
                test: Some(1.25),
                reboot_to_master: Some(3.75),
                fetch: Some(0.5),
                stream_end: None,
            }
        );
        assert_eq!(
            p.line().as_deref(),
            Some("power-on > kernel 0.75s, kernel > master 3.25s, deploy 1.00s, reboot > test agent 4.00s, test 1.25s, reboot > master 3.75s, fetch 0.50s")
        );
    }

    #[test]
    fn a_run_cut_short_or_without_a_kernel_banner_leaves_phases_out() {
        let marks = Marks {
            power_on: Some(at(0.0)),
            master: Some(at(2.0)),
            ..Marks::default()
        };
        // The simulated board prints no kernel banner; nothing was fetched.
        let p = marks.phases(&[], &[]);
        assert_eq!(p.power_to_kernel, None);
        assert_eq!(p.power_to_master, Some(2.0));
        assert_eq!(
            (p.deploy, p.test, p.reboot_to_master, p.fetch),
            (None, None, None, None)
        );
        assert_eq!(p.line().as_deref(), Some("power-on > master 2.00s"));
        assert_eq!(Marks::default().phases(&[], &[]).line(), None);
    }

    #[test]
    fn a_kept_stream_replaces_the_reboot_and_the_fetch() {
        let marks = Marks {
            power_on: Some(at(0.0)),
            master: Some(at(2.0)),
            reboot: Some(at(3.0)),
            test: Some(at(5.0)),
            streamed: Some(at(6.5)),
            ..Marks::default()
        };
        let records = [
            record(0.0, "t", started()),
            record(1.25, "t", Body::AgentFinished {}),
        ];
        let p = marks.phases(&[], &records);
        assert_eq!((p.reboot_to_master, p.fetch), (None, None));
        assert_eq!(p.stream_end, Some(0.25));
        assert!(p
            .line()
            .expect("line")
            .ends_with("test 1.25s, test > stream end 0.25s"));
    }

    #[test]
    fn the_test_run_comes_from_one_boots_records() {
        // A finished record of another boot does not end this run.
        let records = [
            record(0.0, "t", started()),
            record(7.0, "other", Body::AgentFinished {}),
        ];
        assert_eq!(test_run(&records), None);
    }
}
