//! Power control: the device file's shell commands, each with a timeout.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::process::Command;

use crate::device::Device;
use crate::events::EventLog;
use crate::outcome::Failure;

/// Runs one power command in the device file's folder.
///
/// # Errors
/// An infrastructure error when it fails, cannot start or times out.
pub async fn command(
    what: &str,
    cmd: &str,
    dir: &Path,
    timeout: Duration,
    events: &EventLog,
) -> Result<(), Failure> {
    events.event("power", json!({ "action": what, "command": cmd }));
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own process group: a command that hangs is killed whole, with
        // whatever it started, not just its shell.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::power(format!("power {what} command could not start: {e}: {cmd}")))?;
    let group = child.id().map(|id| nix::unistd::Pid::from_raw(id as i32));
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => {
            if let Some(g) = group {
                let _ = nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGKILL);
            }
            return Err(Failure::power(format!(
                "power {what} command timed out after {timeout:?}: {cmd}"
            )));
        }
        Ok(Err(e)) => {
            return Err(Failure::power(format!(
                "power {what} command failed to run: {e}: {cmd}"
            )))
        }
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    events.event("power", json!({ "action": what, "exit_code": out.status.code(), "stdout": stdout, "stderr": stderr }));
    if !out.status.success() {
        return Err(Failure::power(format!(
            "power {what} command failed ({}): {cmd}: {}",
            out.status,
            stderr.trim()
        )));
    }
    Ok(())
}

/// Hard reset: `reset`, or `off` then `on`.
///
/// # Errors
/// An infrastructure error from the commands.
pub async fn reset(device: &Device, events: &EventLog) -> Result<(), Failure> {
    let t = device.timeouts.power;
    match (&device.power.reset, &device.power.on) {
        (Some(reset), _) => command("reset", reset, &device.dir, t, events).await,
        (None, Some(on)) => {
            command("off", &device.power.off, &device.dir, t, events).await?;
            command("on", on, &device.dir, t, events).await
        }
        (None, None) => Err(Failure::job(
            "device file has neither power.reset nor power.on",
        )),
    }
}

/// Powers off.
///
/// # Errors
/// An infrastructure error from the command.
pub async fn off(device: &Device, events: &EventLog) -> Result<(), Failure> {
    command(
        "off",
        &device.power.off,
        &device.dir,
        device.timeouts.power,
        events,
    )
    .await
}

/// Brings the board up from a known state: off, then `on` (or `reset`).
/// Returns when the `on` (or `reset`) command started: the power-on.
/// A failing `off` here is only a warning: the board is about to be
/// powered on, and `on` failing too is what ends the job.
///
/// # Errors
/// An infrastructure error from the commands.
pub async fn start(device: &Device, events: &EventLog) -> Result<SystemTime, Failure> {
    if let Err(f) = off(device, events).await {
        events.say(
            "dispatcher",
            format!("warning: {}; powering on anyway", f.message),
        );
    }
    let t = device.timeouts.power;
    let at = SystemTime::now();
    match (&device.power.on, &device.power.reset) {
        (Some(on), _) => command("on", on, &device.dir, t, events).await,
        (None, Some(reset)) => command("reset", reset, &device.dir, t, events).await,
        (None, None) => Err(Failure::job(
            "device file has neither power.on nor power.reset",
        )),
    }
    .map(|()| at)
}
