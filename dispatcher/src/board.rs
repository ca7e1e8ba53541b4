//! Reaching a board's master agent, shared by `dispatcher run` and
//! `dispatcher exec`: which announcements may be dialed (the pinned
//! address), and handing a boot its token on the console until an
//! authenticated, TLS-pinned session works.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_proto::console::{Announcement, TokenLine};
use serde_json::json;

use crate::client::Session;
use crate::console::Console;
use crate::device::Device;
use crate::events::EventLog;
use crate::outcome::Failure;

/// How often the token line is written again until the boot authenticates:
/// a line garbled on the console is simply ignored by the agent.
const TOKEN_REPEAT: Duration = Duration::from_secs(1);

/// A fresh token for one boot: 244 random bits.
pub fn new_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Whether a master announcement names the pinned address (pinning it
/// when nothing is pinned yet). Another address is never dialed: the line
/// may come from anything that can write to the console.
pub fn pins(pinned: &mut Option<SocketAddr>, a: &Announcement, events: &EventLog) -> bool {
    let Some(addr) = a.addr else { return false };
    let pinned = *pinned.get_or_insert(addr);
    if pinned != addr {
        events.event(
            "dispatcher",
            json!({ "kind": "ignored-announcement", "boot": a.boot, "addr": addr.to_string(),
                "message": format!("a master announcement names {addr}, but the board is pinned at {pinned}: ignored") }),
        );
    }
    pinned == addr
}

/// Hands the boot a fresh token and opens an authenticated session.
///
/// # Errors
/// An infrastructure error when the console, the connection or the agent
/// fails, or the agent answering is not the announced boot.
pub async fn authenticate(
    device: &Device,
    events: &EventLog,
    console: &mut Console,
    a: &Announcement,
) -> Result<Session, Failure> {
    let rpc = device.timeouts.rpc;
    let addr = a
        .addr
        .ok_or_else(|| Failure::agent("master announcement without an address"))?;
    let token = new_token();
    let line = TokenLine {
        boot: a.boot.clone(),
        token: token.clone(),
    };
    console.send_token(&line, rpc).await?;
    events.say(
        "dispatcher",
        format!("token sent to boot {}; connecting to {addr}", a.boot),
    );
    let mut session = Session::connect(
        a,
        device.network.namespace.clone(),
        &token,
        &device.timeouts,
    )
    .await?;
    // The agent reads the token from its console concurrently: poll until it
    // has, writing the line again now and then in case it was garbled.
    let deadline = Instant::now() + rpc;
    let mut repeat = Instant::now() + TOKEN_REPEAT;
    loop {
        match session.info().await {
            Ok(info) => {
                events.event("agent", json!({ "kind": "info", "version": info.version, "boot": info.boot_id,
                    "platform": info.platform, "state": info.state, "test_agent_version": info.test_agent_version,
                    "partitions": info.partitions.iter().map(|p| json!({"name": p.name, "size": p.size_bytes, "deployable": p.deployable})).collect::<Vec<_>>() }));
                if info.boot_id != a.boot {
                    return Err(Failure::agent(format!(
                        "agent at {addr} is boot {}, not the announced {}",
                        info.boot_id, a.boot
                    )));
                }
                return Ok(session);
            }
            Err(s) if s.code() == tonic::Code::Unauthenticated && Instant::now() < deadline => {
                if Instant::now() >= repeat {
                    console.send_token(&line, rpc).await?;
                    repeat = Instant::now() + TOKEN_REPEAT;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => return Err(crate::client::failure("GetInfo", &s)),
        }
    }
}
