//! Addresses the agent never drops, whatever blocklist the controller sends. The agent refuses to drop
//! traffic from addresses it needs whatever the controller says (its controller, loopback,
//! multicast, link-local): a wrong block must never cut a node off from the one service
//! that can lift it.

use std::net::{IpAddr, SocketAddr};

/// Why the agent never drops `ip`, if it never does. `controllers` is the controller
/// address, or several separated by commas.
pub fn never_dropped(ip: IpAddr, controllers: &str) -> Option<&'static str> {
    let ip = ip.to_canonical();
    let is_controller = controllers.split(',').any(|c| {
        c.trim()
            .parse::<SocketAddr>()
            .is_ok_and(|s| s.ip().to_canonical() == ip)
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_never_drops_what_it_needs() {
        let ctl = "198.18.100.1:7443";
        for a in [
            "198.18.100.1",
            "::ffff:198.18.100.1",
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.0.1",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(never_dropped(a.parse().unwrap(), ctl).is_some(), "{a}");
        }
        for a in ["198.18.0.99", "2001:db8::9"] {
            assert_eq!(never_dropped(a.parse().unwrap(), ctl), None, "{a}");
        }
        // Every controller of a cluster is protected.
        let both = "198.18.100.1:7443,198.18.100.2:7443";
        assert!(never_dropped("198.18.100.2".parse().unwrap(), both).is_some());
        assert_eq!(never_dropped("198.18.100.3".parse().unwrap(), both), None);
        // A controller named by host name protects no address by itself.
        assert_eq!(
            never_dropped("198.18.100.1".parse().unwrap(), "ctl.corp.test:7443"),
            None
        );
    }
}
