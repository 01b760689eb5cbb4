//! The agent's WireGuard data plane: one TUN device, one UDP socket, a boringtun
//! `noise::Tunn` per peer, and the pure logic that decides which peers to have.
//!
//! The controller-facing code computes the desired peers with [`select_peers`], diffs them
//! against [`DataPlane::peers`] with [`reconcile`], and hands the changes to
//! [`DataPlane::apply`].
//!
//! ```no_run
//! # async fn demo(me: zonemesh_agent::dataplane::MeshMember,
//! #               members: Vec<zonemesh_agent::dataplane::MeshMember>,
//! #               config: zonemesh_agent::dataplane::DataPlaneConfig) -> anyhow::Result<()> {
//! use zonemesh_agent::dataplane::{DataPlane, reconcile, select_peers};
//! let mut dp = DataPlane::start(config).await?; // TUN + routes + UDP socket
//! let mut events = dp.take_events().expect("first call"); // unknown keys etc.
//! // on every mesh snapshot or delta:
//! let desired = select_peers(&me, &members, &|_zone| false);
//! dp.apply(reconcile(&desired, &dp.peers()));
//! for peer in dp.status() { println!("{} {:?}", peer.name, peer.last_handshake); }
//! # let _ = events.try_recv();
//! dp.shutdown().await; // stops all tasks, removes the device and routes
//! # Ok(()) }
//! ```

mod engine;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod io;
pub mod static_config;
mod topology;
pub mod tun;
pub mod udp;

pub use engine::DataPlane;
pub use topology::{DEFAULT_KEEPALIVE_SECS, reconcile, select_peers};

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

/// A WireGuard peer as the data plane is told to configure it.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// "zone/node".
    pub name: String,
    /// The peer's zone.
    pub zone: String,
    /// The peer's WireGuard (X25519) public key.
    pub public_key: [u8; 32],
    /// Where to send the first handshake; learnt from the peer's packets otherwise.
    pub endpoint: Option<SocketAddr>,
    /// Overlay addresses routed to this peer and accepted from it.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

impl std::fmt::Debug for PeerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSpec")
            .field("name", &self.name)
            .field("zone", &self.zone)
            .field("public_key", &key_b64(&self.public_key))
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish()
    }
}

/// One change to the configured peer set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// Configure a new peer.
    Add(PeerSpec),
    /// Change endpoint, allowed IPs, keepalive or labels of a peer (same public key).
    Update(PeerSpec),
    /// Drop the peer and its sessions.
    Remove {
        /// Key of the peer to drop.
        public_key: [u8; 32],
        /// Its name, for logs.
        name: String,
    },
}

impl PeerChange {
    /// Name of the peer the change is about.
    pub fn name(&self) -> &str {
        match self {
            PeerChange::Add(p) | PeerChange::Update(p) => &p.name,
            PeerChange::Remove { name, .. } => name,
        }
    }
}

/// A node of the mesh as the controller describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshMember {
    /// "zone/node".
    pub name: String,
    /// Zone the node belongs to.
    pub zone: String,
    /// WireGuard public key bound in the node's certificate.
    pub public_key: [u8; 32],
    /// UDP endpoints the node announced, preferred first.
    pub endpoints: Vec<SocketAddr>,
    /// The node's overlay address.
    pub overlay_ip: IpAddr,
}

/// Settings of the data plane itself.
#[derive(Clone)]
pub struct DataPlaneConfig {
    /// This node's WireGuard private key. Never logged.
    pub private_key: [u8; 32],
    /// UDP port to listen on (0 = any).
    pub listen_port: u16,
    /// TUN interface name.
    pub interface: String,
    /// This node's overlay address and prefix.
    pub address: IpNet,
    /// Extra routes through the tunnel (for example the other zones' overlay ranges).
    pub routes: Vec<IpNet>,
    /// TUN MTU.
    pub mtu: u16,
}

impl std::fmt::Debug for DataPlaneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlaneConfig")
            .field("private_key", &"<redacted>")
            .field("listen_port", &self.listen_port)
            .field("interface", &self.interface)
            .field("address", &self.address)
            .field("routes", &self.routes)
            .field("mtu", &self.mtu)
            .finish()
    }
}

/// Live state of one peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerStatus {
    /// "zone/node".
    pub name: String,
    /// The peer's zone.
    pub zone: String,
    /// Base64 public key.
    pub public_key: String,
    /// Current endpoint (configured or learnt by roaming).
    pub endpoint: Option<SocketAddr>,
    /// When the last handshake completed.
    pub last_handshake: Option<SystemTime>,
    /// Payload bytes received from the peer.
    pub rx_bytes: u64,
    /// Payload bytes sent to the peer.
    pub tx_bytes: u64,
}

/// Packets moved and dropped since the data plane started ([`DataPlane::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DataPlaneStats {
    /// IP packets read from the TUN device (to be sent through a tunnel).
    pub tun_packets: u64,
    /// Of those, dropped: no peer routes the destination (or not an IP packet).
    pub dropped_no_route: u64,
    /// Datagrams received on the UDP socket.
    pub udp_datagrams: u64,
    /// Decrypted packets written to the TUN device.
    pub delivered_packets: u64,
    /// Received datagrams dropped: not WireGuard, truncated or too large.
    pub dropped_malformed: u64,
    /// Received datagrams for a session index no peer holds.
    pub dropped_unknown_session: u64,
    /// Data packets the peer's session refused (replay, bad tag, expired keys).
    pub dropped_rejected: u64,
    /// Decrypted packets whose inner source the sending peer may not use.
    pub dropped_spoofed: u64,
}

/// What one inbound batch saw, added to the shared counters once per batch.
#[derive(Debug, Default)]
struct InboundCounts {
    datagrams: u64,
    delivered: u64,
    malformed: u64,
    unknown_session: u64,
    rejected: u64,
    spoofed: u64,
}

/// The data plane's counters: relaxed atomics, each added to once per batch by the one
/// task that owns that direction, so the packet path neither locks nor bounces a cache
/// line per packet.
#[derive(Debug, Default)]
struct DataPlaneCounters {
    outbound: OutboundAtomics,
    inbound: InboundAtomics,
}

/// Written by the outbound task only (its own cache line).
#[derive(Debug, Default)]
#[repr(align(64))]
struct OutboundAtomics {
    tun_packets: std::sync::atomic::AtomicU64,
    no_route: std::sync::atomic::AtomicU64,
}

/// Written by the inbound task only (its own cache line).
#[derive(Debug, Default)]
#[repr(align(64))]
struct InboundAtomics {
    datagrams: std::sync::atomic::AtomicU64,
    delivered: std::sync::atomic::AtomicU64,
    malformed: std::sync::atomic::AtomicU64,
    unknown_session: std::sync::atomic::AtomicU64,
    rejected: std::sync::atomic::AtomicU64,
    spoofed: std::sync::atomic::AtomicU64,
}

impl DataPlaneCounters {
    fn add_outbound(&self, packets: u64, no_route: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.outbound.tun_packets.fetch_add(packets, Relaxed);
        if no_route > 0 {
            self.outbound.no_route.fetch_add(no_route, Relaxed);
        }
    }

    fn add_inbound(&self, c: &InboundCounts) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = &self.inbound;
        for (a, v) in [
            (&i.datagrams, c.datagrams),
            (&i.delivered, c.delivered),
            (&i.malformed, c.malformed),
            (&i.unknown_session, c.unknown_session),
            (&i.rejected, c.rejected),
            (&i.spoofed, c.spoofed),
        ] {
            if v > 0 {
                a.fetch_add(v, Relaxed);
            }
        }
    }

    fn snapshot(&self) -> DataPlaneStats {
        use std::sync::atomic::Ordering::Relaxed;
        let (o, i) = (&self.outbound, &self.inbound);
        DataPlaneStats {
            tun_packets: o.tun_packets.load(Relaxed),
            dropped_no_route: o.no_route.load(Relaxed),
            udp_datagrams: i.datagrams.load(Relaxed),
            delivered_packets: i.delivered.load(Relaxed),
            dropped_malformed: i.malformed.load(Relaxed),
            dropped_unknown_session: i.unknown_session.load(Relaxed),
            dropped_rejected: i.rejected.load(Relaxed),
            dropped_spoofed: i.spoofed.load(Relaxed),
        }
    }
}

/// Something on the wire that a security monitor should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecurityEvent {
    /// A valid handshake initiation from a key that is not a configured peer.
    UnknownPeerKey {
        /// The key that tried to connect.
        public_key: [u8; 32],
        /// Where it came from.
        source: SocketAddr,
    },
    /// A handshake message that failed authentication (bad MAC or decryption).
    InvalidHandshake {
        /// Where it came from.
        source: SocketAddr,
    },
    /// An authenticated packet whose inner source address the peer may not use.
    SpoofedSource {
        /// The peer that sent it.
        peer: String,
        /// The inner source address.
        inner_source: IpAddr,
    },
}

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// The configuration is unusable.
    #[error("invalid data plane config: {0}")]
    Config(String),
    /// Creating or configuring the TUN device failed.
    #[error("TUN device {interface}: {source}")]
    Tun {
        /// Interface name.
        interface: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Binding or configuring the UDP socket failed.
    #[error("UDP socket on port {port}: {source}")]
    Udp {
        /// Port.
        port: u16,
        /// Cause.
        source: std::io::Error,
    },
    /// The data plane's own runtime could not be started.
    #[error("data plane runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Adding a route failed.
    #[error("route {route} via {interface}: {reason}")]
    Route {
        /// Route.
        route: IpNet,
        /// Interface.
        interface: String,
        /// Cause.
        reason: String,
    },
}

/// Base64 (standard, padded) form of a key, as `wg` prints it.
pub fn key_b64(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Parses a base64 WireGuard key.
pub fn parse_key_b64(s: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()?
        .try_into()
        .ok()
}

/// The public key of a private key.
pub fn public_key(private_key: &[u8; 32]) -> [u8; 32] {
    let secret = x25519_dalek::StaticSecret::from(*private_key);
    x25519_dalek::PublicKey::from(&secret).to_bytes()
}

#[cfg(test)]
mod tests;
