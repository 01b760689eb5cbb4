//! What the agent changes on its host besides the data plane: routes to the other zones
//! through the tunnel device, and the firewall set of blocked sources (nftables table
//! `inet zonemesh`). Behind [`HostEffects`] so the run loop can be driven without root.
//! Every call may block (the real one runs `ip` and `nft`), so the run loop makes them on
//! the blocking pool, never on an async worker and never while holding a lock.

use super::meshview::MeshView;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// One source the firewall drops, for `timeout_secs` more seconds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockedEntry {
    pub address: IpAddr,
    pub timeout_secs: u64,
}

/// Routes and firewall of the host.
pub trait HostEffects: Send + Sync + 'static {
    /// Route `cidr` through the device `dev`, replacing any route for it. True on success.
    fn route_replace(&self, cidr: &str, dev: &str) -> bool;
    /// Remove the route for `cidr` through `dev`. True on success.
    fn route_delete(&self, cidr: &str, dev: &str) -> bool;
    /// Drop packets from exactly `entries` (each expiring by itself). True on success.
    fn set_blocklist(&self, entries: &[BlockedEntry]) -> bool;
    /// Remove the firewall table (agent shutdown).
    fn clear_blocklist(&self);
}

/// The host's own tools: `ip route` and `nft`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemEffects;

impl HostEffects for SystemEffects {
    fn route_replace(&self, cidr: &str, dev: &str) -> bool {
        ip_route("replace", cidr, dev)
    }
    fn route_delete(&self, cidr: &str, dev: &str) -> bool {
        ip_route("del", cidr, dev)
    }
    fn set_blocklist(&self, entries: &[BlockedEntry]) -> bool {
        nft(&blocklist_script(entries))
    }
    fn clear_blocklist(&self) {
        nft("delete table inet zonemesh\n");
    }
}

/// The nft script that replaces the blocked sets with `entries`. `flush table` empties the
/// chains only, so the sets are flushed by name (an unblocked source leaves at once). The
/// rule drops everything from a blocked source but ICMP, so diagnosis keeps working.
pub fn blocklist_script(entries: &[BlockedEntry]) -> String {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for e in entries {
        let item = format!("{} timeout {}s", e.address, e.timeout_secs.max(1));
        match e.address {
            IpAddr::V4(_) => v4.push(item),
            IpAddr::V6(_) => v6.push(item),
        }
    }
    let mut script = String::from(
        "table inet zonemesh {}\nflush table inet zonemesh\ntable inet zonemesh {\n\
         set blocked4 { type ipv4_addr; flags timeout; }\n\
         set blocked6 { type ipv6_addr; flags timeout; }\n\
         chain input { type filter hook input priority -10; policy accept; ip saddr @blocked4 meta l4proto != icmp drop; ip6 saddr @blocked6 meta l4proto != ipv6-icmp drop; }\n}\n\
         flush set inet zonemesh blocked4\nflush set inet zonemesh blocked6\n",
    );
    if !v4.is_empty() {
        script.push_str(&format!(
            "add element inet zonemesh blocked4 {{ {} }}\n",
            v4.join(", ")
        ));
    }
    if !v6.is_empty() {
        script.push_str(&format!(
            "add element inet zonemesh blocked6 {{ {} }}\n",
            v6.join(", ")
        ));
    }
    script
}

fn nft(script: &str) -> bool {
    use std::io::Write;
    let child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        tracing::warn!("nft not available: the blocklist cannot be enforced on this host");
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    match child.wait_with_output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            tracing::warn!(error = %String::from_utf8_lossy(&o.stderr).trim(), "nft refused the blocklist");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "nft failed");
            false
        }
    }
}

fn ip_route(op: &str, cidr: &str, dev: &str) -> bool {
    match std::process::Command::new("ip")
        .args(["route", op, cidr, "dev", dev])
        .status()
    {
        Ok(s) if s.success() => true,
        Ok(_) | Err(_) => {
            tracing::warn!(cidr, dev, op, "ip route failed");
            false
        }
    }
}

/// What the agent has applied to the host. Owned by the one task that changes the host,
/// so no lock is held while an effect runs.
#[derive(Debug, Default)]
pub struct HostState {
    pub routes: BTreeSet<String>,
    /// Blocked addresses and their expiry (unix seconds) as last applied.
    pub blocklist: Vec<(IpAddr, u64)>,
    pub blocklist_installed: bool,
}

/// Route the other zones' ranges (and our own when nodes of our zone tunnel to each other)
/// through `dev`; remove routes for zones that went away.
pub fn sync_routes(
    fx: &dyn HostEffects,
    host: &mut HostState,
    view: &MeshView,
    own_zone: &str,
    dev: &str,
) {
    let wanted: BTreeSet<String> = view
        .zones
        .values()
        .filter(|z| z.name != own_zone || z.intra_zone_tunnels)
        .map(|z| z.cidr.clone())
        .collect();
    for cidr in wanted.difference(&host.routes.clone()) {
        if fx.route_replace(cidr, dev) {
            host.routes.insert(cidr.clone());
        }
    }
    for cidr in host.routes.clone().difference(&wanted) {
        fx.route_delete(cidr, dev);
        host.routes.remove(cidr);
    }
}

/// Enforce the controller's blocklist: drop every packet from a blocked source, except the
/// addresses this node needs whatever the controller says (see `blocklist::never_dropped`).
/// The set is replaced whole, only when it changed (entries expire in the firewall by
/// themselves), so a lifted block leaves it at once.
pub fn sync_blocklist(
    fx: &dyn HostEffects,
    host: &mut HostState,
    view: &MeshView,
    now: u64,
    controller: &str,
) {
    let mut wanted: Vec<(IpAddr, u64)> = view
        .blocklist
        .values()
        .filter(|b| b.until_unix > now)
        .filter_map(|b| Some((b.address.parse::<IpAddr>().ok()?.to_canonical(), b.until_unix)))
        .filter(|(ip, _)| match super::blocklist::never_dropped(*ip, controller) {
            Some(why) => {
                tracing::debug!(source = %ip, why, "ignoring a block of an address this node needs");
                false
            }
            None => true,
        })
        .collect();
    wanted.sort();
    if wanted == host.blocklist && (host.blocklist_installed || wanted.is_empty()) {
        return;
    }
    let entries: Vec<BlockedEntry> = wanted
        .iter()
        .map(|(address, until)| BlockedEntry {
            address: *address,
            timeout_secs: until - now,
        })
        .collect();
    if fx.set_blocklist(&entries) {
        tracing::info!(sources = entries.len(), "blocklist applied");
        host.blocklist = wanted;
        host.blocklist_installed = true;
    }
}

/// Undo what the agent applied (shutdown).
pub fn clear_host(fx: &dyn HostEffects, host: &mut HostState, dev: &str) {
    for cidr in std::mem::take(&mut host.routes) {
        fx.route_delete(&cidr, dev);
    }
    if std::mem::take(&mut host.blocklist_installed) {
        fx.clear_blocklist();
    }
    host.blocklist.clear();
}

/// A [`HostEffects`] that records every call and can be made slow, for tests.
#[cfg(any(test, feature = "testing"))]
pub mod recording {
    use super::{BlockedEntry, HostEffects};
    use parking_lot::Mutex;
    use std::collections::BTreeSet;
    use std::time::Duration;

    /// One recorded call.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Effect {
        RouteReplace(String),
        RouteDelete(String),
        Blocklist(Vec<BlockedEntry>),
        ClearBlocklist,
    }

    /// Records calls; each call blocks its thread for `per_call`, plus `per_element` for
    /// every blocklist entry (a slow `ip`/`nft`).
    #[derive(Debug, Default)]
    pub struct RecordingEffects {
        pub per_call: Duration,
        pub per_element: Duration,
        calls: Mutex<Vec<Effect>>,
    }

    impl RecordingEffects {
        /// Effects that take `per_call` each and `per_element` per blocklist entry.
        pub fn slow(per_call: Duration, per_element: Duration) -> Self {
            Self {
                per_call,
                per_element,
                calls: Mutex::new(Vec::new()),
            }
        }
        /// Every call so far.
        pub fn calls(&self) -> Vec<Effect> {
            self.calls.lock().clone()
        }
        /// Routes currently in place according to the calls.
        pub fn routes(&self) -> BTreeSet<String> {
            let mut r = BTreeSet::new();
            for c in self.calls.lock().iter() {
                match c {
                    Effect::RouteReplace(c) => {
                        r.insert(c.clone());
                    }
                    Effect::RouteDelete(c) => {
                        r.remove(c);
                    }
                    _ => {}
                }
            }
            r
        }
        fn record(&self, e: Effect, elements: usize) {
            let cost =
                self.per_call + self.per_element * u32::try_from(elements).unwrap_or(u32::MAX);
            if !cost.is_zero() {
                std::thread::sleep(cost);
            }
            self.calls.lock().push(e);
        }
    }

    impl HostEffects for RecordingEffects {
        fn route_replace(&self, cidr: &str, _dev: &str) -> bool {
            self.record(Effect::RouteReplace(cidr.into()), 0);
            true
        }
        fn route_delete(&self, cidr: &str, _dev: &str) -> bool {
            self.record(Effect::RouteDelete(cidr.into()), 0);
            true
        }
        fn set_blocklist(&self, entries: &[BlockedEntry]) -> bool {
            self.record(Effect::Blocklist(entries.to_vec()), entries.len());
            true
        }
        fn clear_blocklist(&self) {
            self.record(Effect::ClearBlocklist, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::recording::{Effect, RecordingEffects};
    use super::*;
    use zonemesh_proto as pb;

    fn view(blocked: &[(&str, u64)], zones: &[(&str, &str)]) -> MeshView {
        let mut v = MeshView::default();
        for (a, until) in blocked {
            v.blocklist.insert(
                a.to_string(),
                pb::BlockedSource {
                    address: a.to_string(),
                    until_unix: *until,
                    reason: String::new(),
                },
            );
        }
        for (name, cidr) in zones {
            v.zones.insert(
                name.to_string(),
                pb::Zone {
                    name: name.to_string(),
                    cidr: cidr.to_string(),
                    intra_zone_tunnels: false,
                },
            );
        }
        v
    }

    #[test]
    fn host_is_changed_only_when_the_view_changed() {
        let fx = RecordingEffects::default();
        let mut host = HostState::default();
        let zones = [("a", "100.64.1.0/24"), ("b", "100.64.2.0/24")];
        let v = view(&[("198.51.100.7", 1_100), ("198.51.100.8", 900)], &zones);
        sync_routes(&fx, &mut host, &v, "a", "zm0");
        sync_blocklist(&fx, &mut host, &v, 1_000, "198.18.100.1:7443");
        // The same view a second later: nothing to do (entries expire by themselves).
        sync_routes(&fx, &mut host, &v, "a", "zm0");
        sync_blocklist(&fx, &mut host, &v, 1_001, "198.18.100.1:7443");
        assert_eq!(
            fx.calls(),
            vec![
                Effect::RouteReplace("100.64.2.0/24".into()),
                Effect::Blocklist(vec![BlockedEntry {
                    address: "198.51.100.7".parse().unwrap(),
                    timeout_secs: 100,
                }]),
            ]
        );
        // A zone goes, a block is removed: one route delete, one firewall replacement.
        let v = view(&[], &zones[..1]);
        sync_routes(&fx, &mut host, &v, "a", "zm0");
        sync_blocklist(&fx, &mut host, &v, 1_002, "198.18.100.1:7443");
        assert_eq!(
            fx.calls()[2..],
            [
                Effect::RouteDelete("100.64.2.0/24".into()),
                Effect::Blocklist(vec![])
            ]
        );
        clear_host(&fx, &mut host, "zm0");
        assert_eq!(fx.calls().last(), Some(&Effect::ClearBlocklist));
        assert!(blocklist_script(&[]).contains("flush table inet zonemesh"));
    }
}
