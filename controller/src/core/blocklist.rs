//! When a source address may go on the blocklist that every agent enforces.
//!
//! Three rules, each in one place and free of I/O (time is passed in):
//! - [`NeverBlock`]: addresses no path may block (the controller, enrolled nodes, loopback,
//!   multicast, ...), whoever asks: agent events, sign-in failures or `block add`.
//! - [`classify`]: which agent-reported events say anything trustworthy about their source.
//!   A UDP datagram's source address is whatever the sender wrote, so data-plane events
//!   (invalid handshakes, unknown keys) are recorded but never count toward a block.
//! - [`Evidence`]: failures per source in a sliding window, per reporting node; a block
//!   needs several distinct nodes (the controller's own sign-in failures count as one), and
//!   one node can get only a bounded number of addresses blocked.
//! - [`BlockTiming`]: the first block, doubled with each repeat offence up to a maximum.

use crate::error::{ControllerError, Result};
use crate::limits::{BoundedKeys, WhenFull, Windowed};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

/// Events of one `ReportEvents` call that are looked at; the rest are dropped.
pub const MAX_EVENTS_PER_REPORT: usize = 256;
/// Longest event kind kept.
pub const MAX_KIND: usize = 64;
/// Longest event source kept (`[v6]:port` fits).
pub const MAX_SOURCE: usize = 64;
/// Longest event detail kept.
pub const MAX_DETAIL: usize = 256;

/// Event kinds whose source completed a round trip with the reporting node (a TCP
/// handshake before the failed authentication), so the address is not a forgery of a
/// single datagram. Everything else, including kinds this controller does not know,
/// is recorded only.
///
/// `sip.auth_failure` is a registration whose digest answer was wrong or that the
/// registrar refused after reading it: a wrong answer needs the challenge's nonce, which
/// only reached the real source address. `log.auth_failure` is an operator's own pattern,
/// trusted as the operator configured it.
pub const SOURCE_VERIFIED_KINDS: &[&str] = &[
    "ssh.auth_failure",
    "tls.auth_failure",
    "http.auth_failure",
    "sip.auth_failure",
    "log.auth_failure",
    "http.signin_failure",
];

/// The reporter name of the controller's own evidence (its sign-in failures). Node keys
/// are `zone/node`, so no node can report under it.
pub const OWN_REPORTER: &str = "controller";

/// How far an event can be trusted about its source address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventTrust {
    /// The source answered the node; the event may count toward a block.
    SourceVerified,
    /// The source may be forged (UDP, a handshake that failed before any round trip) or
    /// the kind is unknown: logged, never counted.
    Unverified,
}

/// The trust of an event kind as an agent reports it.
pub fn classify(kind: &str) -> EventTrust {
    if SOURCE_VERIFIED_KINDS.contains(&kind) {
        EventTrust::SourceVerified
    } else {
        EventTrust::Unverified
    }
}

/// The address in an event source (`IP` or `IP:PORT`), IPv4-mapped IPv6 as IPv4.
pub fn parse_source(source: &str) -> Option<IpAddr> {
    source
        .parse::<SocketAddr>()
        .map(|s| s.ip())
        .or_else(|_| source.parse::<IpAddr>())
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Why an address can never be blocked by its kind alone, if it cannot.
fn special_address(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() || v4.octets()[0] == 0 {
                Some("an unspecified address")
            } else if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_multicast() {
                Some("a multicast address")
            } else if v4.is_link_local() {
                Some("a link-local address")
            } else if v4 == Ipv4Addr::BROADCAST {
                Some("the broadcast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unspecified() {
                Some("an unspecified address")
            } else if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else if v6.is_unicast_link_local() {
                Some("a link-local address")
            } else {
                None
            }
        }
    }
}

/// The addresses no block may ever name: the special ranges, the controller's own
/// addresses, every enrolled node's endpoints and overlay address, and the zones' overlay
/// ranges (traffic there is authenticated by WireGuard, never by address).
#[derive(Clone, Debug, Default)]
pub struct NeverBlock {
    named: HashMap<IpAddr, String>,
    ranges: Vec<(ipnet::IpNet, String)>,
}

impl NeverBlock {
    /// Protect `ip` because it is `what` (e.g. "the controller's gRPC address").
    pub fn add(&mut self, ip: IpAddr, what: impl Into<String>) {
        self.named
            .entry(ip.to_canonical())
            .or_insert_with(|| what.into());
    }

    /// Protect a whole range.
    pub fn add_range(&mut self, net: ipnet::IpNet, what: impl Into<String>) {
        self.ranges.push((net, what.into()));
    }

    /// Why `ip` is never blocked, or `None` when it may be.
    pub fn reason(&self, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        if let Some(s) = special_address(ip) {
            return Some(s.to_string());
        }
        if let Some(what) = self.named.get(&ip) {
            return Some(what.clone());
        }
        self.ranges
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, what)| what.clone())
    }

    /// `Ok` when `ip` may be blocked; otherwise the one-line refusal every path returns.
    pub fn check(&self, ip: IpAddr) -> Result<()> {
        match self.reason(ip) {
            None => Ok(()),
            Some(why) => Err(ControllerError::PermissionDenied(format!(
                "{} is never blocked: it is {why}",
                ip.to_canonical()
            ))),
        }
    }
}

/// Events in a sliding window: the times of the last [`SLIDING_KEPT`] events, so the count
/// at any moment is of those within the window before it (bounded under a flood).
#[derive(Clone, Debug)]
pub struct Sliding {
    times: VecDeque<SystemTime>,
}

/// Event times one [`Sliding`] keeps; counts above it read as this many.
pub const SLIDING_KEPT: usize = 64;

impl Sliding {
    pub fn new() -> Self {
        Self {
            times: VecDeque::new(),
        }
    }

    /// Count one event at `now`; returns the count within `window`.
    pub fn note(&mut self, window: Duration, now: SystemTime) -> u32 {
        self.expire(window, now);
        if self.times.len() == SLIDING_KEPT {
            self.times.pop_front();
        }
        self.times.push_back(now);
        self.times.len() as u32
    }

    fn expire(&mut self, window: Duration, now: SystemTime) {
        while self.times.front().is_some_and(|t| age(now, *t) >= window) {
            self.times.pop_front();
        }
    }

    /// Events within `window` before `now`.
    pub fn count(&self, window: Duration, now: SystemTime) -> u32 {
        self.times.iter().filter(|t| age(now, **t) < window).count() as u32
    }

    /// When the last event was counted.
    pub fn last(&self) -> SystemTime {
        self.times.back().copied().unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

impl Default for Sliding {
    fn default() -> Self {
        Self::new()
    }
}

/// How long automatic blocks last: `first`, doubled with each repeat offence of the same
/// address, never more than `max`. An address whose last block started more than `memory`
/// ago starts over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockTiming {
    pub first: Duration,
    pub max: Duration,
    pub memory: Duration,
}

impl Default for BlockTiming {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(3600),
            max: Duration::from_secs(7 * 86_400),
            memory: Duration::from_secs(30 * 86_400),
        }
    }
}

impl BlockTiming {
    /// The length of a block after `prior` earlier offences.
    pub fn length(&self, prior: u32) -> Duration {
        let factor = 1u32.checked_shl(prior.min(31)).unwrap_or(u32::MAX);
        self.first
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// Offences that count as prior at `now`, from the stored count and the last block.
    pub fn prior(&self, offences: u32, last: SystemTime, now: SystemTime) -> u32 {
        if age(now, last) < self.memory {
            offences
        } else {
            0
        }
    }
}

/// The whole decision policy (`serve --block-*`).
#[derive(Clone, Debug, Default)]
pub struct PolicyConfig {
    pub evidence: EvidenceConfig,
    pub timing: BlockTiming,
}

impl PolicyConfig {
    /// One-line reason when the settings cannot work.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let e = &self.evidence;
        let t = &self.timing;
        if e.window.is_zero() {
            return Err("--block-window must be more than 0".into());
        }
        if e.reporters_needed == 0 {
            return Err("--block-nodes must be at least 1".into());
        }
        if e.events_per_reporter == 0 || e.events_per_reporter as usize > SLIDING_KEPT {
            return Err(format!(
                "--block-threshold must be between 1 and {SLIDING_KEPT}"
            ));
        }
        if t.first.is_zero() || t.first > t.max {
            return Err("--block-first must be more than 0 and at most --block-max".into());
        }
        Ok(())
    }
}

/// Thresholds of [`Evidence`].
#[derive(Clone, Debug)]
pub struct EvidenceConfig {
    /// Sliding window over which reports are counted.
    pub window: Duration,
    /// Distinct reporting nodes needed for a block.
    pub reporters_needed: usize,
    /// Events one node must report about an address within the sliding window before it
    /// counts (once) toward a block.
    pub events_per_reporter: u32,
    /// Distinct addresses one node can help block within the window.
    pub blocks_per_reporter: usize,
    /// Distinct addresses one node can have under count at a time.
    pub addresses_per_reporter: usize,
    /// Addresses under count in total; the least recently reported is evicted beyond.
    pub max_addresses: usize,
}

impl Default for EvidenceConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(600),
            reporters_needed: 2,
            events_per_reporter: 3,
            blocks_per_reporter: 5,
            addresses_per_reporter: 64,
            max_addresses: 4096,
        }
    }
}

/// Kinds remembered per reporter and address, for the audit record.
const KINDS_KEPT: usize = 4;

#[derive(Clone, Debug)]
struct Tally {
    events: Sliding,
    kinds: BTreeSet<String>,
}

#[derive(Clone, Debug)]
struct AddressEvidence {
    by: BTreeMap<String, Tally>,
    last: SystemTime,
}

impl Windowed for AddressEvidence {
    type Policy = Duration;
    fn is_live(&self, window: &Duration, now: SystemTime) -> bool {
        age(now, self.last) < *window
    }
    fn touched(&self) -> SystemTime {
        self.last
    }
}

#[derive(Clone, Debug, Default)]
struct ReporterState {
    /// Addresses this node has a tally for.
    named: HashSet<IpAddr>,
    /// Blocks this node helped cause, oldest first.
    blocked: VecDeque<(IpAddr, SystemTime)>,
}

/// One node's part in a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    /// `zone/node` of the reporter.
    pub node: String,
    /// Events it reported within the window.
    pub events: u32,
    /// Event kinds it reported.
    pub kinds: Vec<String>,
}

/// Enough evidence to block `address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corroborated {
    pub address: IpAddr,
    pub witnesses: Vec<Witness>,
}

impl Corroborated {
    /// The evidence in one line, for the block's reason and the audit log.
    pub fn describe(&self) -> String {
        let mut s = format!("reported by {} nodes:", self.witnesses.len());
        for (i, w) in self.witnesses.iter().enumerate() {
            let _ = write!(
                s,
                "{} {} ({} events: {})",
                if i == 0 { "" } else { ";" },
                w.node,
                w.events,
                w.kinds.join(", ")
            );
        }
        s
    }
}

/// What became of one reported event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Noted {
    /// Counted; not (yet) enough for a block.
    Counted,
    /// Not counted, and why.
    Ignored(&'static str),
    /// Enough evidence: block this address.
    Block(Corroborated),
}

/// Reports about source addresses from enrolled nodes, bounded in memory.
#[derive(Debug)]
pub struct Evidence {
    cfg: EvidenceConfig,
    /// At most `max_addresses`; the least recently reported goes first.
    addresses: BoundedKeys<IpAddr, AddressEvidence>,
    /// Keyed by enrolled node (authenticated callers only), each bounded by
    /// `addresses_per_reporter` and `blocks_per_reporter`.
    reporters: HashMap<String, ReporterState>,
}

fn age(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

impl Evidence {
    /// An empty record with thresholds `cfg`.
    pub fn new(cfg: EvidenceConfig) -> Self {
        Self {
            addresses: BoundedKeys::new(cfg.window, cfg.max_addresses, WhenFull::EvictOldest),
            cfg,
            reporters: HashMap::new(),
        }
    }

    /// Addresses under count.
    pub fn tracked(&self) -> usize {
        self.addresses.len()
    }

    /// Count one source-verified event of `kind` about `ip` from node `reporter`.
    pub fn note(&mut self, reporter: &str, ip: IpAddr, kind: &str, now: SystemTime) -> Noted {
        let window = self.cfg.window;
        let own = reporter == OWN_REPORTER;
        self.expire_reporter(reporter, now);
        let known = self
            .addresses
            .get(&ip)
            .and_then(|a| a.by.get(reporter))
            .is_some_and(|t| age(now, t.events.last()) < window);
        // The controller's own evidence is bounded by the total only.
        if !known && !own {
            let named = self.reporters.get(reporter).map_or(0, |r| r.named.len());
            if named >= self.cfg.addresses_per_reporter {
                return Noted::Ignored("this node already reports too many addresses");
            }
        }
        // An evicting map always makes room.
        if let Ok(dropped) = self.addresses.make_room(&ip, now) {
            for (gone, a) in dropped {
                self.unname(gone, &a);
            }
        }
        let Ok(entry) = self.addresses.entry(ip, now, || AddressEvidence {
            by: BTreeMap::new(),
            last: now,
        }) else {
            return Noted::Ignored("too many addresses under count");
        };
        entry.last = now;
        let tally = entry
            .by
            .entry(reporter.to_string())
            .or_insert_with(|| Tally {
                events: Sliding::new(),
                kinds: BTreeSet::new(),
            });
        if tally.events.count(window, now) == 0 {
            // Nothing left in the window: the kinds start over too.
            tally.kinds.clear();
        }
        tally.events.note(window, now);
        if tally.kinds.len() < KINDS_KEPT {
            tally.kinds.insert(kind.to_string());
        }
        self.reporters
            .entry(reporter.to_string())
            .or_default()
            .named
            .insert(ip);

        let budget = self.cfg.blocks_per_reporter;
        let witnesses: Vec<Witness> = entry
            .by
            .iter()
            .filter(|(node, t)| {
                t.events.count(window, now) >= self.cfg.events_per_reporter
                    && (node.as_str() == OWN_REPORTER
                        || self
                            .reporters
                            .get(*node)
                            .is_none_or(|r| r.blocked.len() < budget))
            })
            .map(|(node, t)| Witness {
                node: node.clone(),
                events: t.events.count(window, now),
                kinds: t.kinds.iter().cloned().collect(),
            })
            .collect();
        if witnesses.len() < self.cfg.reporters_needed {
            return Noted::Counted;
        }
        for w in &witnesses {
            self.reporters
                .entry(w.node.clone())
                .or_default()
                .blocked
                .push_back((ip, now));
        }
        // A block starts a fresh count: after it ends, new evidence is needed.
        self.forget(ip);
        Noted::Block(Corroborated {
            address: ip,
            witnesses,
        })
    }

    /// Drop everything known about `ip` (it was blocked, or an administrator unblocked it).
    pub fn forget(&mut self, ip: IpAddr) {
        if let Some(a) = self.addresses.remove(&ip) {
            self.unname(ip, &a);
        }
    }

    /// Take `ip` off the sets of the nodes that reported it (its evidence is gone).
    fn unname(&mut self, ip: IpAddr, a: &AddressEvidence) {
        for node in a.by.keys() {
            if let Some(r) = self.reporters.get_mut(node) {
                r.named.remove(&ip);
            }
        }
    }

    /// Forget what has left the window for `reporter`.
    fn expire_reporter(&mut self, reporter: &str, now: SystemTime) {
        let window = self.cfg.window;
        let Some(r) = self.reporters.get_mut(reporter) else {
            return;
        };
        while r
            .blocked
            .front()
            .is_some_and(|(_, t)| age(now, *t) >= window)
        {
            r.blocked.pop_front();
        }
        let addresses = &mut self.addresses;
        r.named.retain(|ip| {
            let Some(a) = addresses.get_mut(ip) else {
                return false;
            };
            let live =
                a.by.get(reporter)
                    .is_some_and(|t| age(now, t.events.last()) < window);
            if !live {
                a.by.remove(reporter);
                if a.by.is_empty() {
                    addresses.remove(ip);
                }
            }
            live
        });
        if r.named.is_empty() && r.blocked.is_empty() {
            self.reporters.remove(reporter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_and_named_addresses_are_never_blocked() {
        let mut nb = NeverBlock::default();
        nb.add(ip("198.18.0.1"), "the controller's gRPC address");
        nb.add(ip("198.18.0.11"), "an endpoint of zone-a/a1");
        nb.add_range("100.64.1.0/24".parse().unwrap(), "in the overlay of zone a");
        for (addr, why) in [
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("239.1.1.1", "multicast"),
            ("ff02::1", "multicast"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("255.255.255.255", "broadcast"),
            ("198.18.0.1", "controller"),
            ("::ffff:198.18.0.1", "controller"),
            ("198.18.0.11", "zone-a/a1"),
            ("100.64.1.77", "overlay"),
        ] {
            let reason = nb.reason(ip(addr));
            assert!(
                reason.as_deref().is_some_and(|r| r.contains(why)),
                "{addr}: {reason:?}"
            );
            let err = nb.check(ip(addr)).unwrap_err().to_string();
            assert!(
                err.contains("never blocked") && !err.contains('\n'),
                "{err}"
            );
        }
        for addr in ["198.18.0.99", "10.1.2.3", "2001:db8::1", "100.64.2.1"] {
            assert_eq!(nb.reason(ip(addr)), None, "{addr}");
            nb.check(ip(addr)).unwrap();
        }
    }

    #[test]
    fn only_source_verified_kinds_count() {
        for k in [
            "wireguard.invalid_handshake",
            "wireguard.unknown_key",
            "wireguard.spoofed_source",
            "peer.refused",
            "SSH.AUTH_FAILURE",
            "",
            "made.up",
        ] {
            assert_eq!(classify(k), EventTrust::Unverified, "{k}");
        }
        assert_eq!(classify("ssh.auth_failure"), EventTrust::SourceVerified);
        assert_eq!(parse_source("198.18.0.5:51820"), Some(ip("198.18.0.5")));
        assert_eq!(
            parse_source("[::ffff:198.18.0.5]:1"),
            Some(ip("198.18.0.5"))
        );
        assert_eq!(parse_source("2001:db8::5"), Some(ip("2001:db8::5")));
        assert_eq!(parse_source("nonsense"), None);
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn one_node_alone_never_blocks() {
        let mut ev = Evidence::new(EvidenceConfig::default());
        for i in 0..500 {
            assert_eq!(
                ev.note("a/a1", ip("198.18.0.99"), "ssh.auth_failure", at(i)),
                Noted::Counted
            );
        }
    }

    #[test]
    fn two_nodes_within_the_window_block_once_with_their_evidence() {
        let mut ev = Evidence::new(EvidenceConfig::default());
        let target = ip("198.18.0.99");
        for i in 0..3 {
            assert_eq!(
                ev.note("a/a1", target, "ssh.auth_failure", at(i)),
                Noted::Counted
            );
        }
        // The second node's first two reports are below its own threshold.
        assert_eq!(
            ev.note("b/b1", target, "tls.auth_failure", at(10)),
            Noted::Counted
        );
        assert_eq!(
            ev.note("b/b1", target, "tls.auth_failure", at(11)),
            Noted::Counted
        );
        let Noted::Block(c) = ev.note("b/b1", target, "tls.auth_failure", at(12)) else {
            panic!("no block");
        };
        assert_eq!(c.address, target);
        assert_eq!(
            c.witnesses,
            vec![
                Witness {
                    node: "a/a1".into(),
                    events: 3,
                    kinds: vec!["ssh.auth_failure".into()]
                },
                Witness {
                    node: "b/b1".into(),
                    events: 3,
                    kinds: vec!["tls.auth_failure".into()]
                },
            ]
        );
        let text = c.describe();
        assert!(
            text.contains("2 nodes") && text.contains("a/a1") && text.contains("b/b1"),
            "{text}"
        );
        // Evidence is spent: the next report starts over.
        assert_eq!(ev.tracked(), 0);
        assert_eq!(
            ev.note("a/a1", target, "ssh.auth_failure", at(13)),
            Noted::Counted
        );
    }

    #[test]
    fn reports_outside_the_window_do_not_corroborate() {
        let mut ev = Evidence::new(EvidenceConfig::default());
        let target = ip("198.18.0.98");
        for i in 0..3 {
            ev.note("a/a1", target, "ssh.auth_failure", at(i));
        }
        // Eleven minutes later a1's reports have left the window.
        for i in 0..10 {
            assert_eq!(
                ev.note("b/b1", target, "ssh.auth_failure", at(660 + i)),
                Noted::Counted
            );
        }
        // a1's old count does not carry over into its new window either.
        ev.note("a/a1", target, "ssh.auth_failure", at(700));
        ev.note("a/a1", target, "ssh.auth_failure", at(701));
        assert!(matches!(
            ev.note("a/a1", target, "ssh.auth_failure", at(702)),
            Noted::Block(_)
        ));
    }

    #[test]
    fn a_pair_of_nodes_can_block_only_a_bounded_number_of_addresses() {
        let cfg = EvidenceConfig::default();
        let mut ev = Evidence::new(cfg.clone());
        let mut blocked = 0;
        for n in 0..40u8 {
            let target = IpAddr::from([198, 18, 1, n]);
            for i in 0..3 {
                for node in ["a/a1", "b/b1"] {
                    if let Noted::Block(_) =
                        ev.note(node, target, "ssh.auth_failure", at(u64::from(n) + i))
                    {
                        blocked += 1;
                    }
                }
            }
        }
        assert_eq!(blocked, cfg.blocks_per_reporter);
        // A third node corroborating with one of them is still refused its vote...
        let target = ip("198.18.2.1");
        for i in 0..3 {
            ev.note("a/a1", target, "ssh.auth_failure", at(100 + i));
            assert!(!matches!(
                ev.note("c/c1", target, "ssh.auth_failure", at(100 + i)),
                Noted::Block(_)
            ));
        }
        // ...and once the window has passed the budget is back.
        for i in 0..3 {
            ev.note("a/a1", target, "ssh.auth_failure", at(700 + i));
        }
        for i in 0..2 {
            ev.note("b/b1", target, "ssh.auth_failure", at(700 + i));
        }
        assert!(matches!(
            ev.note("b/b1", target, "ssh.auth_failure", at(702)),
            Noted::Block(_)
        ));
    }

    #[test]
    fn memory_is_bounded_per_node_and_in_total() {
        let cfg = EvidenceConfig {
            max_addresses: 100,
            ..EvidenceConfig::default()
        };
        let mut ev = Evidence::new(cfg.clone());
        // One node naming thousands of addresses gets only its share tracked.
        let mut ignored = 0;
        for n in 0..5000u32 {
            let target = IpAddr::from(Ipv4Addr::from(0xc612_0000 + n));
            if let Noted::Ignored(_) = ev.note("a/a1", target, "ssh.auth_failure", at(1)) {
                ignored += 1;
            }
        }
        assert_eq!(ev.tracked(), cfg.addresses_per_reporter);
        assert_eq!(ignored, 5000 - cfg.addresses_per_reporter);
        // Many nodes together stay within the total bound, evicting the oldest.
        for node in 0..20u32 {
            for n in 0..30u32 {
                let target = IpAddr::from(Ipv4Addr::from(0xc613_0000 + node * 100 + n));
                ev.note(
                    &format!("z/n{node}"),
                    target,
                    "ssh.auth_failure",
                    at(2 + u64::from(node)),
                );
            }
        }
        assert!(ev.tracked() <= cfg.max_addresses, "{}", ev.tracked());
        // Per-node sets shrink with the evictions, so the bound holds for them too.
        assert!(ev.reporters.values().map(|r| r.named.len()).sum::<usize>() <= cfg.max_addresses);
        // After the window everything a node named expires on its next report.
        ev.note("a/a1", ip("198.18.9.9"), "ssh.auth_failure", at(2000));
        assert_eq!(ev.reporters["a/a1"].named.len(), 1);
    }

    #[test]
    fn the_window_slides() {
        let mut ev = Evidence::new(EvidenceConfig::default());
        let target = ip("198.18.0.97");
        // a1: one event at 0, two more at 599 and 601: at 601 the one at 0 has left the
        // window, so a1 has 2 and does not count yet; its third at 602 makes 3 in the 600 s
        // before it.
        ev.note("a/a1", target, "ssh.auth_failure", at(0));
        for i in 0..3 {
            ev.note("b/b1", target, "sip.auth_failure", at(590 + i));
        }
        ev.note("a/a1", target, "ssh.auth_failure", at(599));
        assert_eq!(
            ev.note("a/a1", target, "ssh.auth_failure", at(601)),
            Noted::Counted
        );
        assert!(matches!(
            ev.note("a/a1", target, "ssh.auth_failure", at(602)),
            Noted::Block(_)
        ));
        let mut w = Sliding::new();
        for i in 0..1000 {
            w.note(Duration::from_secs(600), at(i));
        }
        assert_eq!(
            w.count(Duration::from_secs(600), at(1000)),
            SLIDING_KEPT as u32
        );
    }

    #[test]
    fn the_controller_is_one_witness_and_one_node_with_it_is_enough() {
        let mut ev = Evidence::new(EvidenceConfig::default());
        let target = ip("198.18.0.96");
        for i in 0..10 {
            assert_eq!(
                ev.note(OWN_REPORTER, target, "http.signin_failure", at(i)),
                Noted::Counted
            );
        }
        for i in 0..2 {
            ev.note("a/a1", target, "ssh.auth_failure", at(20 + i));
        }
        let Noted::Block(c) = ev.note("a/a1", target, "ssh.auth_failure", at(22)) else {
            panic!("no block");
        };
        let nodes: Vec<&str> = c.witnesses.iter().map(|w| w.node.as_str()).collect();
        assert_eq!(nodes, ["a/a1", OWN_REPORTER]);
        // With one witness configured, one node alone blocks.
        let mut one = Evidence::new(EvidenceConfig {
            reporters_needed: 1,
            ..EvidenceConfig::default()
        });
        for i in 0..2 {
            assert_eq!(
                one.note("a/a1", target, "ssh.auth_failure", at(i)),
                Noted::Counted
            );
        }
        assert!(matches!(
            one.note("a/a1", target, "ssh.auth_failure", at(2)),
            Noted::Block(_)
        ));
    }

    #[test]
    fn blocks_double_with_each_offence_up_to_the_maximum() {
        let t = BlockTiming {
            first: Duration::from_secs(60),
            max: Duration::from_secs(600),
            memory: Duration::from_secs(86_400),
        };
        let secs: Vec<u64> = (0..8).map(|p| t.length(p).as_secs()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 600, 600, 600, 600]);
        assert_eq!(t.length(u32::MAX).as_secs(), 600);
        assert_eq!(t.prior(3, at(0), at(100)), 3);
        assert_eq!(t.prior(3, at(0), at(86_400)), 0);
        let mut p = PolicyConfig::default();
        p.validate().unwrap();
        p.timing.first = Duration::from_secs(10 * 86_400);
        assert!(p.validate().unwrap_err().contains("--block-first"));
        let mut p = PolicyConfig::default();
        p.evidence.reporters_needed = 0;
        assert!(p.validate().unwrap_err().contains("--block-nodes"));
    }
}
