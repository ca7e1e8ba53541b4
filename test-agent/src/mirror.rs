//! Best-effort mirror of the run to the console.
//!
//! A serial console carries ~10 KiB/s, far less than a test can print, so
//! the mirror never blocks the run: lines go through a bounded queue to a
//! writer thread, and when the queue is full they are dropped and counted.
//! The mirror says how many it skipped; the records on disk stay complete.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How many lines may wait for the console before lines are dropped.
const QUEUE_LINES: usize = 4096;

/// Handle to the mirror thread.
pub struct Mirror {
    tx: Option<SyncSender<String>>,
    skipped: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Mirror {
    /// Starts a mirror writing to `console`.
    pub fn start(mut console: Box<dyn Write + Send>) -> Self {
        let (tx, rx) = sync_channel::<String>(QUEUE_LINES);
        let skipped = Arc::new(AtomicU64::new(0));
        let seen = skipped.clone();
        let thread = std::thread::spawn(move || {
            let mut reported = 0;
            for line in rx {
                let now = seen.load(Ordering::Relaxed);
                if now > reported {
                    let _ = writeln!(
                        console,
                        "[ferry] console mirror skipped {} lines (all are in the records)",
                        now - reported
                    );
                    reported = now;
                }
                // A console that went away must not stop the run.
                let _ = console.write_all(line.as_bytes());
                let _ = console.write_all(b"\n");
                let _ = console.flush();
            }
        });
        Mirror {
            tx: Some(tx),
            skipped,
            thread: Some(thread),
        }
    }

    /// Queues a line; drops it (and counts it) when the console is behind.
    pub fn line(&self, line: String) {
        if let Some(tx) = &self.tx {
            if let Err(TrySendError::Full(_)) = tx.try_send(line) {
                self.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts lines the caller chose not to queue (far more than the
    /// console could carry), so the console still says how many it missed.
    pub fn skip(&self, lines: u64) {
        self.skipped.fetch_add(lines, Ordering::Relaxed);
    }

    /// Lines dropped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Writes what is queued and stops the thread, waiting at most
    /// `within`: a console that stopped taking bytes (flow control, a
    /// hung UART) must never hold up the reboot. Returns whether the
    /// queue was written in time.
    pub fn finish(mut self, within: Duration) -> bool {
        self.tx.take();
        let Some(t) = self.thread.take() else {
            return true;
        };
        let deadline = Instant::now() + within;
        while !t.is_finished() {
            if Instant::now() >= deadline {
                return false; // left behind: the process ends or reboots anyway
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = t.join();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A console that takes a long time per write, like a slow UART.
    struct Slow(Arc<Mutex<Vec<u8>>>);
    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_micros(200));
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_slow_console_drops_and_counts_lines_without_blocking() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let mirror = Mirror::start(Box::new(Slow(out.clone())));
        let n = 20_000;
        for i in 0..n {
            mirror.line(format!("line {i}"));
        }
        let skipped = mirror.skipped();
        assert!(mirror.finish(Duration::from_secs(60)));
        let text = String::from_utf8(out.lock().expect("lock").clone()).expect("utf8");
        let written = text.lines().filter(|l| l.starts_with("line ")).count() as u64;
        assert!(skipped > 0, "a console this slow must fall behind");
        assert_eq!(written + skipped, n);
        assert!(text.contains("console mirror skipped"));
    }

    /// A console stopped by XOFF: every write blocks for a long time.
    struct Stuck;
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_secs(30));
            Err(std::io::Error::other("gave up"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_console_does_not_hold_up_the_end() {
        let mirror = Mirror::start(Box::new(Stuck));
        mirror.line("one".into());
        mirror.line("two".into());
        let started = Instant::now();
        assert!(!mirror.finish(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
