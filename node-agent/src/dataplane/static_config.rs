//! The static JSON configuration of `zonemesh-agent tunnel`: a data plane with a fixed
//! peer list, for benchmarks and interop tests without a controller.

use super::{DataPlaneConfig, PeerSpec, parse_key_b64};
use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;

/// File format (keys in base64 as `wg genkey` / `wg pubkey` print them).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    /// Base64 private key.
    pub private_key: String,
    /// UDP listen port.
    #[serde(default = "default_port")]
    pub listen_port: u16,
    /// TUN interface name.
    pub interface: String,
    /// Overlay address with prefix, e.g. `100.64.0.1/32`.
    pub address: IpNet,
    /// TUN MTU.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Extra routes; every peer's allowed IPs are routed as well.
    #[serde(default)]
    pub routes: Vec<IpNet>,
    /// The peers.
    #[serde(default)]
    pub peers: Vec<StaticPeer>,
}

/// One peer of a [`StaticConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPeer {
    /// Label, "zone/node" by convention.
    #[serde(default)]
    pub name: String,
    /// Zone label.
    #[serde(default)]
    pub zone: String,
    /// Base64 public key.
    pub public_key: String,
    /// Endpoint `ip:port`.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive seconds.
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
}

fn default_port() -> u16 {
    51820
}

fn default_mtu() -> u16 {
    1420
}

impl StaticConfig {
    /// Parses and validates the JSON text; the error is one line for the operator.
    pub fn parse(text: &str) -> Result<(DataPlaneConfig, Vec<PeerSpec>), String> {
        let c: StaticConfig = serde_json::from_str(text).map_err(|e| format!("config: {e}"))?;
        let private_key =
            parse_key_b64(&c.private_key).ok_or("private_key: not a base64 32-byte key")?;
        let mut peers = Vec::new();
        let mut routes = c.routes.clone();
        for (i, p) in c.peers.into_iter().enumerate() {
            let public_key = parse_key_b64(&p.public_key)
                .ok_or_else(|| format!("peers[{i}].public_key: not a base64 32-byte key"))?;
            if p.allowed_ips.is_empty() {
                return Err(format!("peers[{i}].allowed_ips: empty"));
            }
            for net in &p.allowed_ips {
                let net = net.trunc();
                if !routes.contains(&net) && net != c.address.trunc() {
                    routes.push(net);
                }
            }
            peers.push(PeerSpec {
                name: if p.name.is_empty() {
                    format!("peer{i}")
                } else {
                    p.name
                },
                zone: p.zone,
                public_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips,
                persistent_keepalive: p.persistent_keepalive,
            });
        }
        Ok((
            DataPlaneConfig {
                private_key,
                listen_port: c.listen_port,
                interface: c.interface,
                address: c.address,
                routes,
                mtu: c.mtu,
            },
            peers,
        ))
    }
}
