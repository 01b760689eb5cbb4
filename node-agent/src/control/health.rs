//! End-to-end loss and latency to every peer, measured with ICMP echo through the tunnels
//! (the same path user traffic takes) and reported to the controller's health matrix.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Probes kept per peer for the loss figure.
const WINDOW: usize = 20;
/// A reply later than this counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Loss and latency of one peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerHealth {
    /// Share of the last probes that got no reply, 0.0–1.0.
    pub loss: f32,
    /// Round trip of the last reply, microseconds.
    pub rtt_micros: Option<u32>,
    pub probes: usize,
}

#[derive(Default)]
struct PeerProbes {
    outstanding: HashMap<u16, Instant>,
    results: VecDeque<bool>,
    last_rtt: Option<Duration>,
}

/// Probe bookkeeping, free of I/O so it can be tested directly.
#[derive(Default)]
pub struct HealthTable {
    peers: Mutex<HashMap<IpAddr, PeerProbes>>,
}

impl HealthTable {
    /// Record that probe `seq` went to `ip` at `at`; expire probes that timed out.
    pub fn sent(&self, ip: IpAddr, seq: u16, at: Instant) {
        let mut peers = self.peers.lock();
        let p = peers.entry(ip).or_default();
        let expired: Vec<u16> = p
            .outstanding
            .iter()
            .filter(|(_, t)| at.duration_since(**t) > PROBE_TIMEOUT)
            .map(|(s, _)| *s)
            .collect();
        for s in expired {
            p.outstanding.remove(&s);
            push(&mut p.results, false);
        }
        p.outstanding.insert(seq, at);
    }

    /// Record a reply from `ip` for probe `seq`.
    pub fn received(&self, ip: IpAddr, seq: u16, at: Instant) {
        let mut peers = self.peers.lock();
        if let Some(p) = peers.get_mut(&ip)
            && let Some(sent) = p.outstanding.remove(&seq)
        {
            p.last_rtt = Some(at.duration_since(sent));
            push(&mut p.results, true);
        }
    }

    /// Forget peers that are no longer configured.
    pub fn retain(&self, ips: &[IpAddr]) {
        self.peers.lock().retain(|ip, _| ips.contains(ip));
    }

    /// Current figures for one peer.
    pub fn get(&self, ip: &IpAddr) -> Option<PeerHealth> {
        let peers = self.peers.lock();
        let p = peers.get(ip)?;
        let n = p.results.len();
        let lost = p.results.iter().filter(|ok| !**ok).count();
        Some(PeerHealth {
            loss: if n == 0 { 0.0 } else { lost as f32 / n as f32 },
            rtt_micros: p
                .last_rtt
                .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
            probes: n,
        })
    }
}

fn push(q: &mut VecDeque<bool>, v: bool) {
    if q.len() == WINDOW {
        q.pop_front();
    }
    q.push_back(v);
}

/// An ICMP echo socket: a "ping" datagram socket where the host allows it, else a raw
/// socket (the agent runs as root to own its TUN device).
pub struct Pinger {
    sock: tokio::net::UdpSocket,
    raw: bool,
    id: u16,
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Pinger {
    pub fn new() -> std::io::Result<Self> {
        use socket2::{Domain, Protocol, Socket, Type};
        let (s, raw) = match Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4)) {
            Ok(s) => (s, false),
            Err(_) => (
                Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?,
                true,
            ),
        };
        s.set_nonblocking(true)?;
        let std_sock: std::net::UdpSocket = s.into();
        Ok(Self {
            sock: tokio::net::UdpSocket::from_std(std_sock)?,
            raw,
            id: (std::process::id() & 0xffff) as u16,
        })
    }

    /// Send echo request `seq` to `ip`.
    pub async fn send(&self, ip: Ipv4Addr, seq: u16) -> std::io::Result<()> {
        // type 8 (echo), code 0, checksum, id, seq, payload.
        let mut pkt = [8u8, 0, 0, 0, 0, 0, 0, 0, b'z', b'm', b'h', b'c'];
        pkt[4..6].copy_from_slice(&self.id.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        self.sock
            .send_to(&pkt, SocketAddr::new(IpAddr::V4(ip), 0))
            .await
            .map(|_| ())
    }

    /// Wait for the next echo reply to one of our probes: (source, seq).
    pub async fn recv(&self) -> std::io::Result<(IpAddr, u16)> {
        let mut buf = [0u8; 1500];
        loop {
            let (n, from) = self.sock.recv_from(&mut buf).await?;
            // A raw socket hands over the IP header too.
            let off = if self.raw {
                usize::from(buf[0] & 0x0f) * 4
            } else {
                0
            };
            if n < off + 8 || buf[off] != 0 {
                continue;
            }
            let icmp = &buf[off..n];
            if self.raw && u16::from_be_bytes([icmp[4], icmp[5]]) != self.id {
                continue;
            }
            return Ok((from.ip(), u16::from_be_bytes([icmp[6], icmp[7]])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_rtt_from_probes() {
        let t = HealthTable::default();
        let ip: IpAddr = "100.64.2.1".parse().unwrap();
        let t0 = Instant::now();
        t.sent(ip, 1, t0);
        t.received(ip, 1, t0 + Duration::from_millis(3));
        t.sent(ip, 2, t0 + Duration::from_secs(1));
        // No reply to 2; the next send after the timeout counts it lost.
        t.sent(ip, 3, t0 + Duration::from_secs(4));
        t.received(
            ip,
            3,
            t0 + Duration::from_secs(4) + Duration::from_millis(5),
        );
        t.received(ip, 99, t0 + Duration::from_secs(5)); // unknown probe: ignored
        let h = t.get(&ip).unwrap();
        assert_eq!(h.probes, 3);
        assert!((h.loss - 1.0 / 3.0).abs() < 1e-6, "{h:?}");
        assert_eq!(h.rtt_micros, Some(5000));
        t.retain(&[]);
        assert!(t.get(&ip).is_none());
    }
}
