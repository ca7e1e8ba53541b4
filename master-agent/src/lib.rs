//! Ferry's master agent: the gRPC server baked into a board's master image.
//!
//! It announces itself on the console until a dispatcher answers with this
//! boot's token, then serves the dispatcher: deploy images to partitions,
//! install the bundled test agent and the job's plan on the test rootfs,
//! select it for one boot, reboot, and return the recorded results once the
//! board is back.
//!
//! Module map: [`agent`] is the transport-free core and lifecycle,
//! [`service`] the gRPC shim, [`platform`] the hardware seam (real Linux or
//! the simulated board), [`deploy`] (with [`download`] for URL images), [`install`] and [`results`] the
//! operations, [`console`] and [`auth`] the serial-line trust.

pub mod agent;
pub mod auth;
pub mod config;
pub mod connections;
pub mod console;
pub mod deploy;
pub mod download;
pub mod exec;
pub mod install;
pub mod platform;
pub mod results;
pub mod service;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ferry_proto::console::{Announcement, Role};
use ferry_proto::master::v1::master_agent_server::MasterAgentServer;
use tonic::service::interceptor::InterceptedService;

use crate::agent::Agent;
use crate::auth::Auth;
use crate::config::{Config, PlatformConfig};
use crate::platform::linux::LinuxPlatform;
use crate::platform::sim::SimPlatform;
use crate::platform::Platform;
use crate::service::Service;
use crate::tls::TlsIdentity;

/// This agent's version; its bundled test agent must match.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the agent could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The console could not be opened.
    #[error("console {path}: {source}")]
    Console {
        /// The tty.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server failed.
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
    /// No TLS identity could be made.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The address to announce: configured, the listen address, or the first
/// non-loopback IPv4 address of an interface that is up.
fn advertise_ip(config: &Config) -> Option<IpAddr> {
    if let Some(ip) = config.advertise {
        return Some(ip);
    }
    if !config.listen.ip().is_unspecified() {
        return Some(config.listen.ip());
    }
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    addrs
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|v4| v4.ip())))
        .find(|ip| !ip.is_loopback())
        .map(IpAddr::V4)
}

/// Builds the platform the configuration names.
pub fn platform(config: &Config) -> Arc<dyn Platform> {
    match &config.platform {
        PlatformConfig::Linux(c) => Arc::new(LinuxPlatform::new(
            c.clone(),
            config.boot_flag_partition.clone(),
        )),
        PlatformConfig::Sim(c) => Arc::new(SimPlatform::new(
            c.clone(),
            config.boot_flag_partition.clone(),
        )),
    }
}

/// Runs the agent for this boot until the board reboots.
///
/// # Errors
/// See [`ServeError`].
pub async fn run(config: Config, boot_id: String) -> Result<(), ServeError> {
    tls::install_crypto_provider();
    let identity = TlsIdentity::generate()?;
    let (reader, console) =
        console::open(config.console.as_deref()).map_err(|source| ServeError::Console {
            path: config
                .console
                .as_ref()
                .map_or("stdio".into(), |p| p.display().to_string()),
            source,
        })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?
        .port();

    let auth = Arc::new(Auth::default());
    console::read_tokens(reader, boot_id.clone(), auth.clone(), console.clone());
    let bundle_version = match install::bundle_version(&config.test_agent_bundle) {
        Ok(v) if v == VERSION => v,
        Ok(v) => {
            console::say(
                &console,
                &format!("[ferry] master-agent: WARNING bundled test agent is {v}, not {VERSION}"),
            );
            v
        }
        Err(e) => {
            console::say(&console, &format!("[ferry] master-agent: WARNING {e}"));
            format!("unavailable: {e}")
        }
    };

    let announce_config = config.clone();
    let boot = boot_id.clone();
    let fingerprint = identity.fingerprint.clone();
    let make = move || Announcement {
        role: Role::Master,
        version: VERSION.into(),
        boot: boot.clone(),
        addr: Some(SocketAddr::new(
            advertise_ip(&announce_config).unwrap_or(announce_config.listen.ip()),
            port,
        )),
        cert: Some(fingerprint.clone()),
    };
    tokio::spawn(console::announce(
        console.clone(),
        make,
        config.announce_interval,
        auth.clone(),
    ));

    let idle = config.stream_idle_timeout;
    let config_handshake = config.tls_handshake_timeout;
    // The network is hostile too: bounded messages, calls, time and silence.
    let (max_message, max_calls) = (config.max_message_bytes, config.max_concurrent_calls);
    let (call_timeout, keepalive) = (config.call_timeout, config.keepalive);
    let max_connections = config.max_connections;
    let agent = Arc::new(Agent::new(platform(&config), config, boot_id, console));
    let check = auth.clone();
    let service = InterceptedService::new(
        MasterAgentServer::new(Service::new(agent, idle, bundle_version))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        move |req: tonic::Request<()>| {
            check.check(req.metadata())?;
            Ok(req)
        },
    );
    tonic::transport::Server::builder()
        .tls_config(identity.server_config(config_handshake))?
        .timeout(call_timeout)
        .concurrency_limit_per_connection(max_calls)
        // Past the limit a call is refused (UNAVAILABLE), not queued.
        .load_shed(true)
        .max_concurrent_streams(u32::try_from(max_calls).unwrap_or(u32::MAX))
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive))
        .add_service(service)
        .serve_with_incoming(connections::capped(listener, max_connections))
        .await?;
    Ok(())
}
