//! A deploy's progress as people and tools see it: a bar on a terminal
//! (indicatif, on stderr), and `deploy-progress` events in `events.jsonl`,
//! throttled to one a second or every 5 %, whichever comes first, plus a
//! last one when the deploy ends.
//!
//! The API is three calls, so any view (the terminal, a live view) can
//! follow a deploy: [`DeployProgress::new`], [`DeployProgress::update`] with
//! each report from the board, [`DeployProgress::finish`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::events::EventLog;

/// Events are at least this far apart, unless the percentage moved by
/// [`EVENT_PERCENT`].
const EVENT_EVERY: Duration = Duration::from_secs(1);
/// A move of this many percent is recorded at once.
const EVENT_PERCENT: u64 = 5;

/// One report from the board.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Bytes of the file as given received.
    pub received: u64,
    /// Size of that file; 0 if unknown.
    pub size: u64,
    /// Bytes of the decoded image placed.
    pub image: u64,
    /// "writing" or "readback".
    pub stage: String,
    /// Bytes read back so far.
    pub read_back: u64,
}

impl From<&ferry_proto::master::v1::DeployProgress> for Report {
    fn from(p: &ferry_proto::master::v1::DeployProgress) -> Self {
        Report {
            received: p.bytes_received,
            size: p.source_size,
            image: p.image_bytes,
            stage: p.stage.clone(),
            read_back: p.readback_bytes,
        }
    }
}

/// Figures derived from a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// Percent of the file received, when its size is known.
    pub percent: Option<u64>,
    /// MiB of the file received per second since the start.
    pub mib_per_s: f64,
    /// Seconds left at that rate, when the size is known.
    pub eta_s: Option<f64>,
}

impl Report {
    /// Percent, rate and time left, `elapsed` after the deploy started.
    pub fn figures(&self, elapsed: Duration) -> Figures {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = self.received as f64 / secs;
        let known = self.size > 0;
        Figures {
            percent: known.then(|| (self.received.min(self.size) * 100) / self.size),
            mib_per_s: rate / f64::from(1u32 << 20),
            eta_s: (known && rate > 0.0)
                .then(|| self.size.saturating_sub(self.received) as f64 / rate),
        }
    }
}

/// When an event is due: the first, then at most one a second unless the
/// percentage moved by 5 or more.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<(Instant, Option<u64>)>,
}

impl Throttle {
    /// Whether to record a report at `now` with `percent` done.
    pub fn due(&mut self, now: Instant, percent: Option<u64>) -> bool {
        let due = match self.last {
            None => true,
            Some((at, last_pct)) => {
                now.duration_since(at) >= EVENT_EVERY
                    || matches!((percent, last_pct), (Some(p), Some(l)) if p >= l + EVENT_PERCENT)
            }
        };
        if due {
            self.last = Some((now, percent));
        }
        due
    }
}

/// One deploy's progress: its bar (on a terminal) and its events.
pub struct DeployProgress {
    events: Arc<EventLog>,
    image: String,
    to: String,
    started: Instant,
    throttle: Throttle,
    bar: Option<ProgressBar>,
    last: Report,
}

impl DeployProgress {
    /// Starts following the deploy of `image` to partition `to`; the bar is
    /// drawn when stderr is a terminal.
    pub fn new(events: Arc<EventLog>, image: &str, to: &str) -> Self {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(format!("deploy {to}"));
            bar
        });
        DeployProgress {
            events,
            image: image.into(),
            to: to.into(),
            started: Instant::now(),
            throttle: Throttle::default(),
            bar,
            last: Report::default(),
        }
    }

    /// Takes a report from the board.
    pub fn update(&mut self, report: Report) {
        let now = Instant::now();
        let figures = report.figures(now.duration_since(self.started));
        if let Some(bar) = &self.bar {
            if report.stage == "readback" {
                bar.set_message(format!("readback {}", self.to));
                bar.set_length(report.image);
                bar.set_position(report.read_back);
            } else {
                if report.size > 0 {
                    bar.set_length(report.size);
                }
                bar.set_position(report.received);
            }
        }
        if self.throttle.due(now, figures.percent) {
            self.record(&report, &figures);
        }
        self.last = report;
    }

    /// Ends the bar and records the last event (all bytes, when it succeeded).
    pub fn finish(mut self, received: Option<u64>) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let mut last = self.last.clone();
        if let Some(n) = received {
            last.received = n;
            last.stage = "done".into();
            // The whole file has arrived: its size is known now.
            if last.size == 0 {
                last.size = n;
            }
        }
        let figures = last.figures(self.started.elapsed());
        self.record(&last, &figures);
    }

    fn record(&self, r: &Report, f: &Figures) {
        self.events.event(
            "dispatcher",
            json!({
                "kind": "deploy-progress",
                "image": self.image,
                "to": self.to,
                "stage": r.stage,
                "bytes_received": r.received,
                "source_size": r.size,
                "image_bytes": r.image,
                "readback_bytes": r.read_back,
                "percent": f.percent,
                "mib_per_s": (f.mib_per_s * 100.0).round() / 100.0,
                "eta_s": f.eta_s.map(|e| (e * 10.0).round() / 10.0),
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_once_a_second_or_every_five_percent() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = Throttle::default();
        assert!(t.due(ms(0), Some(0)), "the first");
        assert!(!t.due(ms(100), Some(2)));
        assert!(!t.due(ms(200), Some(4)));
        assert!(t.due(ms(300), Some(5)), "5 % moved");
        assert!(!t.due(ms(900), Some(9)));
        assert!(t.due(ms(1300), Some(9)), "a second passed");
        let mut unknown = Throttle::default();
        assert!(unknown.due(ms(0), None));
        assert!(!unknown.due(ms(999), None));
        assert!(unknown.due(ms(1000), None));
    }

    #[test]
    fn rate_percent_and_eta_follow_from_a_report() {
        let r = Report {
            received: 50 << 20,
            size: 200 << 20,
            ..Report::default()
        };
        let f = r.figures(Duration::from_secs(5));
        assert_eq!(f.percent, Some(25));
        assert!((f.mib_per_s - 10.0).abs() < 1e-9);
        assert_eq!(f.eta_s, Some(15.0));
        let unknown = Report {
            received: 1 << 20,
            ..Report::default()
        }
        .figures(Duration::from_secs(1));
        assert_eq!((unknown.percent, unknown.eta_s), (None, None));
    }
}
