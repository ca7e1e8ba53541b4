//! One job, end to end: power, console, announcement, token, deploy,
//! install, boot once into the test image, wait for the board to come back,
//! fetch the records, write the output folder, power off. Every path ends
//! with the board powered off and the output folder written.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ferry_proto::console::{Announcement, Role};
use ferry_proto::record::{Body, Record};
use serde_json::json;

use crate::client::Session;
use crate::console::{Console, KernelStarts, Signal};
use crate::device::Device;
use crate::events::EventLog;
use crate::job::Job;
use crate::lock::DeviceLock;
use crate::outcome::{Class, Failure, Kind, Outcome, Phase, Verdict};
use crate::output::{self, Boot};
use crate::power;
use crate::progress::DeployProgress;
use crate::report;
use crate::timings::Marks;

/// What the run has learned so far; kept outside the job's future so a
/// timeout or cancellation still writes it to the output folder.
#[derive(Default)]
struct Progress {
    phase: Option<Phase>,
    /// The board was rebooted into the test image: every definition of the
    /// plan then gets a `lava` result, `unknown` if it never finished.
    tested: bool,
    boots: Vec<Boot>,
    /// The board's records other than output (results, sets, definitions,
    /// agent records): bounded by the plan, not by what tests print.
    records: Vec<Record>,
    /// The only address the dispatcher dials: the device file's, else the
    /// job's first master announcement's.
    pinned: Option<SocketAddr>,
    /// Warnings learned while running (records the board refused to return).
    warnings: Vec<String>,
    /// The moments the boot-phase timings lie between.
    marks: Marks,
    /// When kernels started on the console (kept if the console goes).
    kernels: Vec<KernelStarts>,
    /// Every failure so far, with its phase: decides the outcome.
    verdict: Verdict,
    /// The first report of each kind of kernel trouble in the test boot's kernel log.
    kernel_trouble: Vec<crate::kernel_trouble::Report>,
}

/// One job's run.
struct Ctx {
    /// The device's lock, released explicitly once the board is off.
    lock: Mutex<Option<DeviceLock>>,
    device: Device,
    job: Job,
    out: PathBuf,
    events: Arc<EventLog>,
    progress: Mutex<Progress>,
}

impl Ctx {
    fn progress<T>(&self, f: impl FnOnce(&mut Progress) -> T) -> Option<T> {
        self.progress.lock().ok().map(|mut p| f(&mut p))
    }
    fn set_phase(&self, p: Phase) {
        injected_panic(p);
        if let Ok(mut l) = self.lock.lock() {
            if let Some(l) = l.as_mut() {
                l.set_phase(p.name());
            }
        }
        self.progress(|s| {
            s.phase = Some(p);
            s.tested |= p == Phase::Test;
        });
        self.events
            .event("dispatcher", json!({ "phase": p.name() }));
    }
    /// Enters phase `p` (see [`injected_pause`]).
    async fn enter(&self, p: Phase) {
        self.set_phase(p);
        injected_pause(p).await;
    }
    /// Notes a moment for the boot-phase timings (the first time only).
    fn mark(&self, which: fn(&mut Marks) -> &mut Option<SystemTime>) {
        self.progress(|s| {
            which(&mut s.marks).get_or_insert_with(SystemTime::now);
        });
    }
    fn phase(&self) -> Phase {
        self.progress(|s| s.phase).flatten().unwrap_or(Phase::Setup)
    }
    /// Notes a failure in `phase` (the earliest one decides the outcome).
    fn fail(&self, phase: Phase, f: Failure) {
        self.progress(|s| s.verdict.note(phase, f));
    }
    /// Whether a master announcement names the pinned address (pinning it
    /// when nothing is pinned yet). Another address is never dialed: the
    /// line may come from anything that can write to the console.
    fn pins(&self, a: &Announcement) -> bool {
        let mut pinned = self.progress(|s| s.pinned).flatten();
        let ok = crate::board::pins(&mut pinned, a, &self.events);
        self.progress(|s| s.pinned = pinned);
        ok
    }
    fn saw(&self, a: &Announcement) {
        let role = a.role.as_str();
        if a.role == Role::Test {
            self.mark(|m| &mut m.test);
        }
        self.events.event(
            "dispatcher",
            json!({ "kind": "boot", "role": role, "boot": a.boot, "version": a.version, "addr": a.addr.map(|x| x.to_string()) }),
        );
        self.progress(|s| {
            if !s.boots.iter().any(|x| x.boot == a.boot) {
                s.boots.push(Boot {
                    role,
                    boot: a.boot.clone(),
                    version: a.version.clone(),
                });
            }
        });
    }
}

/// Why waiting for the master agent stopped without it.
enum Interrupted {
    Panic(String),
    Closed(String),
    Timeout,
    /// The test image booted (only when the caller asked to be told).
    TestBoot,
}

/// Waits until `deadline` for a master announcement from a boot other than
/// `not`, noting every boot announced on the way (a test boot included;
/// with `stop_on_test`, a test boot ends the wait).
async fn next_master(
    ctx: &Ctx,
    console: &mut Console,
    not: Option<&str>,
    deadline: tokio::time::Instant,
    stop_on_test: bool,
) -> Result<Announcement, Interrupted> {
    loop {
        match console.next_signal(deadline, &ctx.events).await {
            Signal::Announce(a) if a.role == Role::Test => {
                ctx.saw(&a);
                if stop_on_test {
                    return Err(Interrupted::TestBoot);
                }
            }
            Signal::Announce(a) if Some(a.boot.as_str()) != not && ctx.pins(&a) => {
                ctx.saw(&a);
                return Ok(a);
            }
            // The previous boot still repeating itself, or an address we do not dial.
            Signal::Announce(_) => {}
            Signal::Panic(line) => return Err(Interrupted::Panic(line)),
            Signal::Closed(why) => return Err(Interrupted::Closed(why)),
            Signal::Timeout => return Err(Interrupted::Timeout),
        }
    }
}

/// Waits for the master agent of a new boot while the board is the lab's
/// responsibility: anything in the way is an infrastructure error; with
/// `stop_on_test`, a test boot too (the `bool` says which).
async fn wait_master_or_test(
    ctx: &Ctx,
    console: &mut Console,
    not: Option<&str>,
    timeout: Duration,
    stop_on_test: bool,
) -> Result<Announcement, (Failure, bool)> {
    let deadline = tokio::time::Instant::now() + timeout;
    next_master(ctx, console, not, deadline, stop_on_test)
        .await
        .map_err(|why| {
            let test_boot = matches!(why, Interrupted::TestBoot);
            (wait_failure(why, timeout), test_boot)
        })
}

fn wait_failure(why: Interrupted, timeout: Duration) -> Failure {
    match why {
        Interrupted::TestBoot => Failure::new(
            Kind::UnexpectedTestBoot,
            "the test image booted where the master image was expected",
        ),
        Interrupted::Panic(line) => Failure::new(
            Kind::KernelPanic,
            format!("kernel panic while booting the master image: {line}"),
        ),
        Interrupted::Closed(why) => Failure::console(format!(
            "console closed while waiting for the master agent: {why}"
        )),
        Interrupted::Timeout => Failure::new(
            Kind::NoMaster,
            format!("the master agent did not announce itself within {timeout:?}"),
        ),
    }
}

/// Hands the boot a fresh token and opens an authenticated session.
async fn authenticate(
    ctx: &Ctx,
    console: &mut Console,
    a: &Announcement,
) -> Result<Session, Failure> {
    crate::board::authenticate(&ctx.device, &ctx.events, console, a).await
}

async fn steps(ctx: &Ctx) -> Result<(), Failure> {
    let d = &ctx.device;
    let retries = d.retries.with(&ctx.job.retries);
    ctx.enter(Phase::Power).await;
    let mut attempt = Attempts::new("power", retries.power);
    let on = loop {
        match power::start(d, &ctx.events).await {
            Ok(on) => break attempt.succeeded(ctx, on),
            Err(f) => attempt.failed(ctx, f).await?,
        }
    };
    ctx.progress(|s| s.marks.power_on = Some(on));
    let mut console = Console::open(&d.console, d.timeouts.console, ctx.events.clone()).await?;
    ctx.progress(|s| s.kernels.push(console.kernel_starts()));

    ctx.enter(Phase::Boot).await;
    let mut attempt = Attempts::new("boot", retries.boot);
    let master = loop {
        // A retry starts from a hard reset.
        match reach_master(ctx, &mut console, None, attempt.retrying()).await {
            Ok(m) => break attempt.succeeded(ctx, m),
            Err(f) => attempt.failed(ctx, f).await?,
        }
    };
    ctx.mark(|m| &mut m.master);
    let mut attempt = Attempts::new("connect", retries.connect);
    let mut session = loop {
        match authenticate(ctx, &mut console, &master).await {
            Ok(s) => break attempt.succeeded(ctx, s),
            Err(f) => attempt.failed(ctx, f).await?,
        }
    };

    ctx.enter(Phase::Deploy).await;
    let deploy_deadline = Instant::now() + ctx.job.timeouts.deploy;
    for entry in &ctx.job.deploy {
        let left = deploy_deadline.saturating_duration_since(Instant::now());
        let started = Instant::now();
        let mut shown = DeployProgress::new(
            ctx.events.clone(),
            &entry.image.display().to_string(),
            &entry.to,
        );
        let r = session
            .deploy(entry, left, &mut |p| shown.update(p.into()))
            .await;
        shown.finish(r.as_ref().ok().map(|r| r.bytes_received));
        let r = r?;
        let secs = started.elapsed().as_secs_f64();
        ctx.events.event("dispatcher", json!({ "kind": "deployed", "image": entry.image, "to": entry.to,
            "bytes_received": r.bytes_received, "bytes_written": r.bytes_written, "sha256": r.sha256, "seconds": secs,
            "mib_per_s": r.bytes_written as f64 / (1 << 20) as f64 / secs.max(1e-9) }));
        ctx.events.say(
            "dispatcher",
            format!(
                "deployed {} to {} ({} bytes written in {secs:.2}s)",
                entry.image.display(),
                entry.to,
                r.bytes_written
            ),
        );
    }
    if ctx.job.plan.definitions.is_empty() {
        return Ok(());
    }

    ctx.enter(Phase::Install).await;
    let part = d.test_rootfs.as_str();
    let mut stream = crate::stream::for_device(d, &ctx.out, ctx.events.clone()).await;
    let mut plan = ctx.job.plan.clone();
    plan.stream = stream.as_ref().map(crate::stream::Listener::plan);
    let installed = session.install(part, plan).await?;
    ctx.events.say(
        "dispatcher",
        format!(
            "test agent {} installed on {part} ({} hook)",
            installed.test_agent_version, installed.boot_hook
        ),
    );
    session.boot_once(part).await?;
    session.reboot().await?;
    ctx.mark(|m| &mut m.reboot);
    drop(session);

    ctx.enter(Phase::Test).await;
    let deadline = tokio::time::Instant::now() + ctx.job.timeouts.test;
    // What went wrong in the test boot is noted as it is found (it decides
    // the outcome, whatever fetching the results then meets); getting the
    // board back to its master image is the lab's part again.
    let test_failed = |f: Failure| {
        ctx.events.say("dispatcher", format!("{f}: hard reset"));
        ctx.fail(Phase::Test, f);
        ctx.set_phase(Phase::Fetch);
    };
    let ended = test_end(ctx, &mut console, stream.as_mut(), &master.boot, deadline).await;
    let back = match ended {
        TestEnd::Streamed(kept) => return adopt_stream(ctx, &kept),
        TestEnd::Board(Ok(back)) => back,
        TestEnd::Board(Err(why)) => {
            test_failed(match why {
                Interrupted::Panic(line) => Failure::new(
                    Kind::KernelPanic,
                    format!("kernel panic in the test image: {line}"),
                ),
                // (No TestBoot: this wait does not stop on one.)
                Interrupted::Timeout | Interrupted::TestBoot => Failure::new(
                    Kind::TestHung,
                    format!(
                        "the test image did not return within the test timeout ({:?}); the board was hard reset",
                        ctx.job.timeouts.test
                    ),
                ),
                Interrupted::Closed(reason) => Failure::console(format!(
                    "console closed during the test ({reason}); the board was hard reset to fetch the results"
                )),
            });
            reach_master(ctx, &mut console, Some(&master.boot), true).await?
        }
    };

    ctx.mark(|m| &mut m.back);
    let mut attempt = Attempts::new("fetch", retries.fetch);
    let mut back = back;
    loop {
        match fetch_records(ctx, &mut console, &back).await {
            Ok(()) => break attempt.succeeded(ctx, ()),
            Err(f) => {
                attempt.failed(ctx, f).await?;
                // Back to a fresh master boot; what the failed try fetched
                // is fetched again whole.
                back = reach_master(ctx, &mut console, Some(&back.boot), true).await?;
                for dir in [output::BOARD_DIR, crate::records::OUTPUT_DIR] {
                    let _ = std::fs::remove_dir_all(ctx.out.join(dir));
                }
            }
        }
    }
    judge_test_boot(ctx);
    Ok(())
}

/// How the test boot ended.
enum TestEnd {
    /// The live stream brought every record: no fetch.
    Streamed(crate::stream::Kept),
    /// The board came back to its master image, or did not.
    Board(Result<Announcement, Interrupted>),
}

/// Waits for the end of the test boot: the live stream's verified end
/// (unless the job fetches always) or the board's next master boot.
async fn test_end(
    ctx: &Ctx,
    console: &mut Console,
    stream: Option<&mut crate::stream::Listener>,
    master: &str,
    deadline: tokio::time::Instant,
) -> TestEnd {
    if let Some(stream) = stream {
        tokio::select! {
            r = next_master(ctx, console, Some(master), deadline, false) => return TestEnd::Board(r),
            kept = stream.kept() => {
                if ctx.job.fetch == crate::job::Fetch::Auto {
                    return TestEnd::Streamed(kept);
                }
                ctx.events.say("dispatcher", "live record stream complete; fetching anyway (records.fetch: always)");
                if let Some(dir) = std::env::var_os("FERRY_STREAM_COPY") {
                    if let Err(e) = kept.copy_to(Path::new(&dir)) {
                        ctx.events.say("dispatcher", format!("FERRY_STREAM_COPY: {e}"));
                    }
                }
            }
        }
    }
    TestEnd::Board(next_master(ctx, console, Some(master), deadline, false).await)
}

/// Takes the streamed records as the fetched ones: same folder, same
/// reading, same judgement; the board is then powered off, not rebooted.
fn adopt_stream(ctx: &Ctx, kept: &crate::stream::Kept) -> Result<(), Failure> {
    ctx.mark(|m| &mut m.streamed);
    let board_dir = ctx.out.join(output::BOARD_DIR);
    if let Err(e) = kept.adopt(&board_dir) {
        // The output folder is the job's: as when it cannot be written.
        return Err(Failure::job(format!(
            "keeping the streamed records in {}: {e}",
            board_dir.display()
        )));
    }
    load_records(ctx, &board_dir);
    ctx.events.say(
        "dispatcher",
        format!(
            "live record stream kept {} record file(s) (sha256 {}): no boot into the master image to fetch them",
            kept.manifest.files.len(),
            kept.manifest.sha256
        ),
    );
    judge_test_boot(ctx);
    Ok(())
}

/// The tries of one step (see [`crate::device::Retries`]): each failed
/// one, and a success after a failure, is an `attempt` event.
struct Attempts {
    step: &'static str,
    retry: crate::device::Retry,
    done: u32,
}

impl Attempts {
    fn new(step: &'static str, retry: crate::device::Retry) -> Self {
        Attempts {
            step,
            retry,
            done: 0,
        }
    }
    /// Whether the next try is a retry.
    fn retrying(&self) -> bool {
        self.done > 0
    }
    fn of(&self) -> u32 {
        self.retry.attempts.max(1)
    }
    fn succeeded<T>(&mut self, ctx: &Ctx, v: T) -> T {
        self.done += 1;
        ctx.events.event(
            "dispatcher",
            json!({ "kind": "attempt", "step": self.step, "attempt": self.done, "of": self.of(), "ok": true }),
        );
        v
    }
    /// Notes a failed try: `Ok` after the pause when another try is left,
    /// else the failure.
    async fn failed(&mut self, ctx: &Ctx, f: Failure) -> Result<(), Failure> {
        self.done += 1;
        let last = self.done >= self.of();
        ctx.events.event(
            "dispatcher",
            json!({ "kind": "attempt", "step": self.step, "attempt": self.done, "of": self.of(), "ok": false,
                "error": f.message, "retry_in": (!last).then(|| format!("{:?}", self.retry.interval)) }),
        );
        if last {
            return Err(f);
        }
        ctx.events.say(
            "dispatcher",
            format!(
                "{} failed (attempt {} of {}): {}; trying again in {:?}",
                self.step,
                self.done,
                self.of(),
                f.message,
                self.retry.interval
            ),
        );
        ctx.progress(|s| {
            s.warnings.push(format!(
                "{} attempt {} of {} failed (retried): {}",
                self.step,
                self.done,
                self.of(),
                f.message
            ))
        });
        tokio::time::sleep(self.retry.interval).await;
        Ok(())
    }
}

/// Whether the test image booted and finished is decided by the test
/// agent's own records; its console announcement is only a hint (a lost or
/// garbled line must not fail a job that ran).
fn judge_test_boot(ctx: &Ctx) {
    let records = ctx.progress(|s| s.records.clone()).unwrap_or_default();
    let ran = records
        .iter()
        .any(|r| matches!(r.body, Body::AgentStarted { .. }));
    let announced = ctx
        .progress(|s| s.boots.iter().any(|b| b.role == Role::Test.as_str()))
        .unwrap_or(false);
    if ran && !announced {
        ctx.events.say(
            "dispatcher",
            "the test agent's console announcement was not seen; its records show it ran",
        );
    }
    let finished = records
        .iter()
        .any(|r| matches!(r.body, Body::AgentFinished {}));
    let problem = if let Some(f) = report::aborted(&records) {
        f
    } else if !ran {
        Failure::new(
            Kind::TestAgentMissing,
            if announced {
                "the test agent announced itself but recorded nothing"
            } else {
                "the board came back to its master image without the test agent ever running"
            },
        )
    } else if !finished {
        let error = records.iter().find_map(|r| match &r.body {
            Body::AgentMessage { level, message } if level == "error" => Some(message.clone()),
            _ => None,
        });
        Failure::new(
            Kind::TestAgentUnfinished,
            match error {
                Some(m) => format!("the test agent did not finish the plan: {m}"),
                None => "the test agent did not finish the plan".into(),
            },
        )
    } else {
        return;
    };
    ctx.fail(Phase::Test, problem);
}

/// Returns the test agent's records through the master agent of `back`.
async fn fetch_records(
    ctx: &Ctx,
    console: &mut Console,
    back: &Announcement,
) -> Result<(), Failure> {
    ctx.enter(Phase::Fetch).await;
    let mut session = authenticate(ctx, console, back).await?;
    // A reused output folder's old records were cleared at the start.
    let board_dir = ctx.out.join(output::BOARD_DIR);
    let d = &ctx.device;
    let fetched = session
        .fetch(
            &d.test_rootfs,
            &board_dir,
            d.timeouts.fetch,
            d.timeouts.fetch_idle,
        )
        .await;
    load_records(ctx, &board_dir);
    let fetched = fetched?;
    ctx.mark(|m| &mut m.fetched);
    for w in &fetched.warnings {
        ctx.events.say("dispatcher", format!("warning: {w}"));
    }
    ctx.progress(|s| s.warnings.extend(fetched.warnings.iter().cloned()));
    ctx.events.say(
        "dispatcher",
        format!("fetched {} record file(s)", fetched.files.len()),
    );
    Ok(())
}

/// After a cancel or a job timeout while the board ran the test image:
/// hard reset it to its master image and fetch what the test agent had
/// recorded, so no result recorded before the end is lost. Bounded by the
/// device's own timeouts; a second signal stops it.
async fn salvage(ctx: &Ctx) -> Result<(), Failure> {
    let d = &ctx.device;
    let first_master = ctx
        .progress(|s| s.boots.first().map(|b| b.boot.clone()))
        .flatten();
    let mut console = Console::open(&d.console, d.timeouts.console, ctx.events.clone()).await?;
    let back = recover(
        ctx,
        &mut console,
        first_master.as_deref().unwrap_or_default(),
        "the job is ending while the board runs the test image",
    )
    .await?;
    fetch_records(ctx, &mut console, &back).await
}

/// Forces the board back to its master image after a test boot went wrong:
/// hard reset, reopen the console if it closed, wait for a new master boot.
async fn recover(
    ctx: &Ctx,
    console: &mut Console,
    old_master: &str,
    why: &str,
) -> Result<Announcement, Failure> {
    ctx.events.say("dispatcher", format!("{why}: hard reset"));
    reach_master(ctx, console, Some(old_master), true).await
}

/// Brings the board to a master boot other than `not`, after a hard reset
/// when `reset_first`. When the test image boots instead (its boot-once
/// flag was still set: a reset before the bootloader consumed it, or a job
/// that died mid-way), one more hard reset finds the master.
async fn reach_master(
    ctx: &Ctx,
    console: &mut Console,
    not: Option<&str>,
    reset_first: bool,
) -> Result<Announcement, Failure> {
    let d = &ctx.device;
    for last in [false, true] {
        if reset_first || last {
            power::reset(d, &ctx.events).await?;
            console.discard_pending();
            if console.is_closed() {
                *console =
                    Console::open(&d.console, d.timeouts.console, ctx.events.clone()).await?;
                ctx.progress(|s| s.kernels.push(console.kernel_starts()));
            }
        }
        match wait_master_or_test(ctx, console, not, d.timeouts.announce, !last).await {
            Err((_, true)) => ctx.events.say(
                "dispatcher",
                "the test image booted where the master image was expected (its boot-once flag was still set): hard reset",
            ),
            other => return other.map_err(|(f, _)| f),
        }
    }
    Err(Failure::new(
        Kind::UnexpectedTestBoot,
        "the board did not return to its master image",
    ))
}

/// Streams whatever record files arrived into the output folder and the
/// event log, keeping what the results need.
fn load_records(ctx: &Ctx, dir: &Path) {
    let summary =
        tokio::task::block_in_place(|| crate::records::ingest(dir, &ctx.out, &ctx.events));
    ctx.progress(|s| {
        s.records = summary.records;
        s.warnings.extend(summary.warnings);
        s.kernel_trouble = summary.kernel.reports().to_vec();
    });
}

/// What a failed steps task says: its panic message, for the outcome.
fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .map_or_else(|| "panic".into(), |m| format!("panic: {m}"))
}

/// The last resort when [`run`] itself panicked: power the board off and
/// write the outcome, so the scheduler still gets an answer and a board that
/// is off.
pub async fn after_panic(device_path: &Path, out: &Path, e: tokio::task::JoinError) -> Outcome {
    let outcome = Outcome::of(
        Phase::Setup,
        Failure::internal(format!("the dispatcher failed: {}", panic_message(e))),
    );
    let Ok(events) = EventLog::append(out) else {
        return outcome;
    };
    events.say("dispatcher", &outcome.message);
    let device = Device::load(device_path).ok();
    if let Some(d) = &device {
        if let Err(f) = power::off(d, &events).await {
            events.say("dispatcher", format!("power off failed: {}", f.message));
        }
    }
    output::write(&output::Report {
        out,
        job: None,
        device: device.as_ref().map(|d| d.name.as_str()),
        warnings: &[],
        outcome: &outcome,
        boots: &[],
        results: &[],
        phases: None,
        started: SystemTime::now(),
        verdict: None,
    });
    outcome
}

/// Fault injection for tests of the dispatcher's own failure path: with
/// `FERRY_DISPATCHER_PANIC_AT=<phase>` the dispatcher panics on entering
/// that phase (`deploy`, `install`, `test`, `fetching results`...).
fn injected_panic(phase: Phase) {
    if std::env::var("FERRY_DISPATCHER_PANIC_AT").is_ok_and(|p| p == phase.name()) {
        panic!("injected by FERRY_DISPATCHER_PANIC_AT={}", phase.name());
    }
}

/// Fault injection for tests of what happens during a phase: with
/// `FERRY_DISPATCHER_PAUSE_AT=<phase>:<seconds>` the dispatcher waits that
/// long on first entering that phase, before doing anything there (a test
/// then cancels the job, or kills the agent, at a known point).
async fn injected_pause(phase: Phase) {
    static PAUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(v) = std::env::var("FERRY_DISPATCHER_PAUSE_AT") else {
        return;
    };
    let Some((name, secs)) = v.rsplit_once(':') else {
        return;
    };
    let Ok(secs) = secs.parse::<f64>() else {
        return;
    };
    if name == phase.name() && !PAUSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }
}

/// Waits for SIGTERM or SIGINT.
pub(crate) async fn cancelled() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// What a job does on finding the marker a dispatcher killed mid-job left
/// on the device (its lock's claim): powers the board off (the dead job
/// may have left it on), gives the dead job's output folder the outcome it
/// never wrote, and says so (event `stale-lock`, a warning in
/// `outcome.json`). Returns the warning.
async fn clean_up_after_dead(
    device: &Device,
    job: &str,
    stale: &crate::lock::Stale,
    events: &EventLog,
) -> String {
    let h = &stale.holder;
    events.say("dispatcher", &stale.message);
    let power = match power::off(device, events).await {
        Ok(()) => "board powered off".to_string(),
        Err(f) => format!("powering the board off failed: {}", f.message),
    };
    let dead_outcome = h.output.join("outcome.json");
    let marked = if h.output.is_dir() && !dead_outcome.exists() {
        let text = json!({
            "class": Class::InternalError,
            "exit_code": Class::InternalError.exit_code(),
            "message": format!("the dispatcher (pid {}) was killed during {}; job {job} found its device left behind and cleaned up", h.pid, h.phase),
            "job": h.job,
            "device": h.device,
        });
        let tmp = h.output.join(".outcome.json.tmp");
        let written = std::fs::write(&tmp, format!("{text:#}\n"))
            .and_then(|()| std::fs::rename(&tmp, &dead_outcome));
        match written {
            Ok(()) => format!(
                "; its output folder {} marked internal-error",
                h.output.display()
            ),
            Err(e) => format!(
                "; its output folder {} could not be marked: {e}",
                h.output.display()
            ),
        }
    } else {
        String::new()
    };
    events.event(
        "dispatcher",
        json!({ "kind": "stale-lock", "job": h.job, "pid": h.pid, "phase": h.phase,
            "output": h.output, "power": power, "marked": !marked.is_empty() }),
    );
    let warning = format!("{}: {power}{marked}", stale.message);
    events.say("dispatcher", &warning);
    warning
}

/// How a run treats a device another job is using.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Fail at once (infrastructure error) instead of waiting for the device.
    pub no_wait: bool,
    /// Run only shard `i` of `n`: the plan's definitions `i`, `i + n`...
    pub shard: Option<(usize, usize)>,
}

/// Runs `job` on `device`, writing everything to `out`.
pub async fn run(job_path: &Path, device_path: &Path, out: &Path) -> Outcome {
    run_with(job_path, device_path, out, Options::default()).await
}

/// [`run`] with [`Options`].
pub async fn run_with(job_path: &Path, device_path: &Path, out: &Path, opts: Options) -> Outcome {
    let started = SystemTime::now();
    if let Err(e) = std::fs::create_dir_all(out).and_then(|()| output::clear(out)) {
        return Outcome::of(
            Phase::Setup,
            Failure::job(format!("output folder {}: {e}", out.display())),
        );
    }
    let events = match EventLog::create(out) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            return Outcome::of(
                Phase::Setup,
                Failure::job(format!("output folder {}: {e}", out.display())),
            )
        }
    };
    let unstarted = |f: Failure, device: Option<&Device>| {
        events.say("dispatcher", &f.message);
        let outcome = Outcome::of(Phase::Setup, f);
        output::write(&output::Report {
            out,
            job: None,
            device: device.map(|d| d.name.as_str()),
            warnings: &[],
            outcome: &outcome,
            boots: &[],
            results: &[],
            phases: None,
            started,
            verdict: None,
        });
        outcome
    };
    let device = match Device::load(device_path) {
        Ok(d) => d,
        Err(f) => return unstarted(f, None),
    };
    let job = match Job::load(job_path, &device) {
        Ok(mut j) => {
            if let Some((i, n)) = opts.shard {
                let defs = std::mem::take(&mut j.plan.definitions);
                j.plan.definitions = defs.into_iter().skip(i).step_by(n.max(1)).collect();
            }
            j
        }
        Err(f) => {
            // The board may be on from an earlier job: leave it off, unless
            // another job is using it.
            if DeviceLock::try_now(&device.name).is_some() {
                let _ = power::off(&device, &events).await;
            }
            return unstarted(f, Some(&device));
        }
    };
    for w in &job.warnings {
        events.say("dispatcher", format!("warning: {w}"));
    }
    // One job per device. The wait counts against the job's timeout.
    let waiting = Instant::now();
    let wait = if opts.no_wait {
        Duration::ZERO
    } else {
        job.timeouts.job
    };
    let lock = tokio::select! {
        l = DeviceLock::acquire(&device.name, &job.name, out, wait) => l,
        sig = cancelled() => {
            return unstarted(Failure::new(Kind::Canceled, format!("canceled by {sig} while waiting for device {}", device.name)), Some(&device));
        }
    };
    let mut learned = Vec::new();
    let lock = match lock {
        Ok((lock, stale)) => {
            if let Some(stale) = stale {
                learned.push(clean_up_after_dead(&device, &job.name, &stale, &events).await);
            }
            lock
        }
        // Never power off a board another job is using.
        Err(e) => return unstarted(Failure::new(Kind::DeviceBusy, e.to_string()), Some(&device)),
    };
    let ctx = Arc::new(Ctx {
        lock: Mutex::new(Some(lock)),
        progress: Mutex::new(Progress {
            pinned: device.network.address,
            warnings: learned,
            ..Progress::default()
        }),
        device,
        job,
        out: out.into(),
        events: events.clone(),
    });
    let job_timeout = ctx.job.timeouts.job.saturating_sub(waiting.elapsed());
    // The steps run as their own task so that a bug (a panic) in them still
    // ends here: the board is powered off and the output folder written.
    let mut task = tokio::spawn({
        let ctx = ctx.clone();
        async move { steps(&ctx).await }
    });
    let result = tokio::select! {
        r = tokio::time::timeout(job_timeout, &mut task) => match r {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Failure::internal(format!(
                "the dispatcher failed during {}: {}",
                ctx.phase().name(),
                panic_message(e)
            ))),
            Err(_) => Err(Failure::new(
                Kind::JobTimeout,
                format!("job timeout ({job_timeout:?}) reached during {}", ctx.phase().name()),
            )),
        },
        sig = cancelled() => Err(Failure::new(Kind::Canceled, format!("canceled by {sig}"))),
    };
    task.abort();
    if let Err(f) = &result {
        ctx.fail(ctx.phase(), f.clone());
    }
    // Ended while the board ran the test image, or while its records were
    // being fetched: fetch what it recorded.
    if result.is_err() && matches!(ctx.phase(), Phase::Test | Phase::Fetch) {
        let d = &ctx.device;
        let bound = d.timeouts.console
            + 2 * d.timeouts.power
            + d.timeouts.announce
            + d.timeouts.rpc
            + d.timeouts.fetch;
        let salvaged = tokio::select! {
            r = tokio::time::timeout(bound, salvage(&ctx)) => r.unwrap_or_else(|_| Err(Failure::agent(format!("fetching the records took longer than {bound:?}")))),
            sig = cancelled() => Err(Failure::new(Kind::Canceled, format!("{sig} again: the records were not fetched"))),
        };
        if let Err(f) = salvaged {
            let f = Failure::new(
                f.kind,
                format!(
                    "results recorded on the board could not be fetched: {}",
                    f.message
                ),
            );
            events.say("dispatcher", &f.message);
            ctx.fail(Phase::Fetch, f);
        }
    }
    ctx.set_phase(Phase::PowerOff);
    if let Err(f) = power::off(&ctx.device, &events).await {
        events.say("dispatcher", format!("power off failed: {}", f.message));
        let nothing_before = ctx
            .progress(|s| s.verdict.failures().is_empty())
            .unwrap_or(false);
        let f = if nothing_before {
            Failure::new(f.kind, format!("results complete, but {}", f.message))
        } else {
            f
        };
        ctx.fail(Phase::PowerOff, f);
    }
    let (records, boots, tested, learned) = ctx
        .progress(|s| {
            (
                s.records.clone(),
                s.boots.clone(),
                s.tested,
                s.warnings.clone(),
            )
        })
        .unwrap_or_default();
    events.flush();
    let unclean = crate::fs_check::warnings(&out.join("console.log"));
    let warnings: Vec<String> = (ctx.job.warnings.iter().cloned())
        .chain(learned)
        .chain(unclean)
        .collect();
    let trouble = ctx
        .progress(|s| s.kernel_trouble.clone())
        .unwrap_or_default();
    if let Some(m) = crate::kernel_trouble::summary(&trouble) {
        ctx.fail(Phase::Test, Failure::new(Kind::KernelTrouble, m));
    }
    let verdict = ctx.progress(|s| s.verdict.clone()).unwrap_or_default();
    let outcome = verdict.outcome();
    let health = verdict.health(ctx.job.health_check);
    let mut results = report::results(&ctx.job.plan, &records, tested);
    results.extend(crate::kernel_trouble::results(&trouble));
    let (marks, consoles) = ctx
        .progress(|s| (s.marks.clone(), s.kernels.clone()))
        .unwrap_or_default();
    let kernels: Vec<SystemTime> = consoles.iter().flat_map(KernelStarts::times).collect();
    let phases = marks.phases(&kernels, &records);
    events.event(
        "dispatcher",
        json!({ "kind": "outcome", "class": outcome.class, "message": outcome.message,
            "failures": verdict.failures(), "health": health }),
    );
    output::write(&output::Report {
        out,
        job: Some(&ctx.job.name),
        device: Some(&ctx.device.name),
        warnings: &warnings,
        outcome: &outcome,
        boots: &boots,
        results: &results,
        phases: Some(&phases),
        started,
        verdict: Some((&verdict, health)),
    });
    // The board is off and everything written: the next job may have it.
    if let Ok(mut l) = ctx.lock.lock() {
        l.take();
    }
    outcome
}
