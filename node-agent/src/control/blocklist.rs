//! The controller's blocklist as this host's nftables elements. The agent refuses to drop
//! traffic from addresses it needs whatever the controller says (its controller, loopback,
//! multicast, link-local): a wrong block must never cut a node off from the one service
//! that can lift it.

use std::net::{IpAddr, SocketAddr};
use zonemesh_proto as pb;

/// Why the agent never drops `ip`, if it never does.
pub fn never_dropped(ip: IpAddr, controller: &str) -> Option<&'static str> {
    let ip = ip.to_canonical();
    let is_controller = controller
        .parse::<SocketAddr>()
        .map(|s| s.ip().to_canonical() == ip)
        .unwrap_or(false);
    if is_controller {
        return Some("the controller");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() || v4.is_unspecified() || v4.octets()[0] == 0 => {
            Some("local")
        }
        IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V6(v6) if v6.is_loopback() || v6.is_unspecified() => Some("local"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("multicast"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        _ => None,
    }
}

/// The `blocked4` and `blocked6` set elements (`ADDR timeout Ns`) for the blocks still in
/// force at `now_unix`, without the addresses the agent never drops.
pub fn nft_elements<'a>(
    blocks: impl IntoIterator<Item = &'a pb::BlockedSource>,
    now_unix: u64,
    controller: &str,
) -> (Vec<String>, Vec<String>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for b in blocks.into_iter().filter(|b| b.until_unix > now_unix) {
        let Ok(ip) = b.address.parse::<IpAddr>() else {
            continue;
        };
        if let Some(why) = never_dropped(ip, controller) {
            tracing::debug!(source = %ip, why, "ignoring a block of an address this node needs");
            continue;
        }
        let timeout = b.until_unix - now_unix;
        match ip.to_canonical() {
            IpAddr::V4(ip) => v4.push(format!("{ip} timeout {timeout}s")),
            IpAddr::V6(ip) => v6.push(format!("{ip} timeout {timeout}s")),
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(address: &str, until_unix: u64) -> pb::BlockedSource {
        pb::BlockedSource {
            address: address.into(),
            until_unix,
            reason: String::new(),
        }
    }

    #[test]
    fn elements_skip_what_the_node_needs_and_what_has_expired() {
        let blocks = [
            block("198.18.0.99", 1060),
            block("2001:db8::9", 1100),
            block("198.18.0.98", 900),
            block("198.18.100.1", 2000),
            block("::ffff:198.18.100.1", 2000),
            block("127.0.0.1", 2000),
            block("::1", 2000),
            block("0.0.0.0", 2000),
            block("224.0.0.1", 2000),
            block("169.254.0.1", 2000),
            block("fe80::1", 2000),
            block("not an address", 2000),
        ];
        let (v4, v6) = nft_elements(&blocks, 1000, "198.18.100.1:7443");
        assert_eq!(v4, vec!["198.18.0.99 timeout 60s"]);
        assert_eq!(v6, vec!["2001:db8::9 timeout 100s"]);
        // A controller named by host name protects no address by itself.
        assert_eq!(
            never_dropped("198.18.100.1".parse().unwrap(), "ctl.corp.test:7443"),
            None
        );
    }
}
