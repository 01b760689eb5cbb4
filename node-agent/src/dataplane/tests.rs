//! The packet path end to end over fake TUN devices and a fake UDP network.

use super::fake::{FakeNet, FakeTun, FakeTunHandle, ipv4_packet};
use super::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

// Generous: a handshake under a loaded 2-core CI box can take seconds; success returns at once.
const WAIT: Duration = Duration::from_secs(15);

struct Node {
    dp: DataPlane,
    tun: FakeTunHandle,
    key: [u8; 32],
    addr: SocketAddr,
    ip: [u8; 4],
}

fn node(net: &Arc<FakeNet>, n: u8, private_key: Option<[u8; 32]>, ul: u8) -> Node {
    let key = private_key.unwrap_or_else(rand::random);
    let addr: SocketAddr = SocketAddr::from(([198, 18, 0, ul], 51820));
    let ip = [100, 64, 0, n];
    let (tun, handle) = FakeTun::new();
    let udp = net.bind(addr);
    let dp = DataPlane::start_with(
        DataPlaneConfig {
            private_key: key,
            listen_port: 51820,
            interface: format!("zmt{n}"),
            address: IpNet::from(IpAddr::from(ip)),
            routes: vec![],
            mtu: 1420,
        },
        tun,
        udp,
    )
    .expect("start data plane");
    Node {
        dp,
        tun: handle,
        key,
        addr,
        ip,
    }
}

fn spec_of(n: &Node, with_endpoint: bool) -> PeerSpec {
    PeerSpec {
        name: format!("z{}/n{}", n.ip[3], n.ip[3]),
        zone: format!("z{}", n.ip[3]),
        public_key: public_key(&n.key),
        endpoint: with_endpoint.then_some(n.addr),
        allowed_ips: vec![IpNet::from(IpAddr::from(n.ip))],
        persistent_keepalive: None,
    }
}

async fn next_packet(h: &mut FakeTunHandle) -> Option<Vec<u8>> {
    tokio::time::timeout(WAIT, h.delivered.recv())
        .await
        .ok()
        .flatten()
}

fn ping(from: &Node, to: &Node, payload: &[u8]) -> Vec<u8> {
    ipv4_packet(from.ip, to.ip, payload)
}

/// Two planes; `a` knows `b`'s endpoint, `b` learns `a`'s from the handshake.
fn pair(net: &Arc<FakeNet>) -> (Node, Node) {
    let a = node(net, 1, None, 1);
    let b = node(net, 2, None, 2);
    a.dp.apply(vec![PeerChange::Add(spec_of(&b, true))]);
    b.dp.apply(vec![PeerChange::Add(spec_of(&a, false))]);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_both_ways_after_handshake() {
    let net = FakeNet::new();
    let (mut a, mut b) = pair(&net);

    let p = ping(&a, &b, b"hello b");
    a.tun.inject.send(p.clone()).unwrap();
    assert_eq!(
        next_packet(&mut b.tun).await.as_deref(),
        Some(&p[..]),
        "a -> b"
    );

    let r = ping(&b, &a, b"hello a");
    b.tun.inject.send(r.clone()).unwrap();
    assert_eq!(
        next_packet(&mut a.tun).await.as_deref(),
        Some(&r[..]),
        "b -> a"
    );

    let sa = a.dp.status();
    assert_eq!(sa.len(), 1);
    assert!(sa[0].last_handshake.is_some());
    assert_eq!(sa[0].tx_bytes, p.len() as u64);
    assert_eq!(sa[0].rx_bytes, r.len() as u64);
    let sb = b.dp.status();
    assert_eq!(
        sb[0].endpoint,
        Some(a.addr),
        "b learnt a's endpoint from its packets"
    );
    assert_eq!(
        b.dp.peers(),
        vec![spec_of(&a, false)],
        "configured spec is unchanged by roaming"
    );

    a.dp.shutdown().await;
    b.dp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_packets_arrive_in_order() {
    let net = FakeNet::new();
    let (a, mut b) = pair(&net);
    let first = ping(&a, &b, b"warm-up");
    a.tun.inject.send(first).unwrap();
    next_packet(&mut b.tun).await.expect("handshake");
    let sent: Vec<Vec<u8>> = (0..2000u32)
        .map(|i| ping(&a, &b, &[&i.to_be_bytes()[..], &[7u8; 1000]].concat()))
        .collect();
    for p in &sent {
        a.tun.inject.send(p.clone()).unwrap();
    }
    for (i, p) in sent.iter().enumerate() {
        assert_eq!(
            next_packet(&mut b.tun).await.as_deref(),
            Some(&p[..]),
            "packet {i}"
        );
    }
    a.dp.shutdown().await;
    b.dp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_peer_stops_working() {
    let net = FakeNet::new();
    let (mut a, mut b) = pair(&net);
    a.tun.inject.send(ping(&a, &b, b"1")).unwrap();
    next_packet(&mut b.tun).await.expect("works before removal");

    b.dp.apply(reconcile(&[], &b.dp.peers()));
    assert!(b.dp.peers().is_empty());
    a.tun.inject.send(ping(&a, &b, b"2")).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(700), b.tun.delivered.recv())
            .await
            .is_err(),
        "b must drop packets from a removed peer"
    );
    // b cannot reach a either: no route.
    b.tun.inject.send(ping(&b, &a, b"3")).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), a.tun.delivered.recv())
            .await
            .is_err()
    );
    a.dp.shutdown().await;
    b.dp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_dropped_and_reported() {
    let net = FakeNet::new();
    let (_a, mut b) = pair(&net);
    let mut events = b.dp.take_events().unwrap();
    // c knows b, but b does not know c.
    let c = node(&net, 3, None, 3);
    c.dp.apply(vec![PeerChange::Add(spec_of(&b, true))]);
    c.tun.inject.send(ping(&c, &b, b"let me in")).unwrap();
    let ev = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("event")
        .unwrap();
    assert_eq!(
        ev,
        SecurityEvent::UnknownPeerKey {
            public_key: public_key(&c.key),
            source: c.addr
        }
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.tun.delivered.recv())
            .await
            .is_err()
    );
    assert!(
        c.dp.status()[0].last_handshake.is_none(),
        "no handshake completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_inner_source_is_dropped_and_reported() {
    let net = FakeNet::new();
    let (mut a, mut b) = pair(&net);
    let mut events = b.dp.take_events().unwrap();
    a.tun.inject.send(ping(&a, &b, b"ok")).unwrap();
    next_packet(&mut b.tun).await.expect("handshake");
    let spoofed = ipv4_packet([100, 64, 0, 99], b.ip, b"spoof");
    a.tun.inject.send(spoofed).unwrap();
    let ev = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("event")
        .unwrap();
    assert!(
        matches!(ev, SecurityEvent::SpoofedSource { inner_source, .. } if inner_source == IpAddr::from([100, 64, 0, 99]))
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.tun.delivered.recv())
            .await
            .is_err()
    );
    let _ = &mut a;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_roams_to_a_new_address() {
    let net = FakeNet::new();
    let (a, mut b) = pair(&net);
    a.tun.inject.send(ping(&a, &b, b"before")).unwrap();
    next_packet(&mut b.tun).await.expect("first path");
    let key = a.key;
    a.dp.shutdown().await;
    // Same node, same key, new underlay address.
    let mut a2 = node(&net, 1, Some(key), 9);
    a2.dp.apply(vec![PeerChange::Add(spec_of(&b, true))]);
    a2.tun.inject.send(ping(&a2, &b, b"after")).unwrap();
    assert_eq!(
        next_packet(&mut b.tun).await.as_deref(),
        Some(&ping(&a2, &b, b"after")[..])
    );
    assert_eq!(b.dp.status()[0].endpoint, Some(a2.addr));
    b.tun.inject.send(ping(&b, &a2, b"reply")).unwrap();
    assert_eq!(
        next_packet(&mut a2.tun).await.as_deref(),
        Some(&ping(&b, &a2, b"reply")[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_keeps_the_session_and_routes_new_ranges() {
    let net = FakeNet::new();
    let (a, mut b) = pair(&net);
    a.tun.inject.send(ping(&a, &b, b"x")).unwrap();
    next_packet(&mut b.tun).await.unwrap();
    let hs = a.dp.status()[0].last_handshake.unwrap();
    // Both sides add a subnet behind the other.
    let mut sb = spec_of(&b, true);
    sb.allowed_ips.push("100.64.5.0/24".parse().unwrap());
    a.dp.apply(reconcile(&[sb], &a.dp.peers()));
    let mut sa = spec_of(&a, false);
    sa.allowed_ips.push("100.64.6.0/24".parse().unwrap());
    b.dp.apply(reconcile(&[sa], &b.dp.peers()));
    let again = a.dp.status()[0].last_handshake.unwrap();
    let drift = again.duration_since(hs).unwrap_or_default();
    assert!(
        drift < Duration::from_millis(500),
        "the session was kept (no new handshake)"
    );

    let to_subnet = ipv4_packet([100, 64, 6, 1], [100, 64, 5, 1], b"subnet to subnet");
    a.tun.inject.send(to_subnet.clone()).unwrap();
    assert_eq!(
        next_packet(&mut b.tun).await.as_deref(),
        Some(&to_subnet[..])
    );
    // A source the peer may not use is still refused after the update.
    let outside = ipv4_packet([100, 64, 7, 1], [100, 64, 5, 1], b"outside");
    a.tun.inject.send(outside).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), b.tun.delivered.recv())
            .await
            .is_err()
    );
    a.dp.shutdown().await;
    b.dp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_first_handshake_is_retried() {
    let net = FakeNet::new();
    let a = node(&net, 1, None, 1);
    // b's key is known, but nothing listens at its address yet: the first initiation is lost.
    let b_key: [u8; 32] = rand::random();
    let b_addr = SocketAddr::from(([198, 18, 0, 2], 51820));
    let b_spec = PeerSpec {
        name: "z2/n2".into(),
        zone: "z2".into(),
        public_key: public_key(&b_key),
        endpoint: Some(b_addr),
        allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
        persistent_keepalive: None,
    };
    a.dp.apply(vec![PeerChange::Add(b_spec)]);
    a.tun
        .inject
        .send(ipv4_packet(a.ip, [100, 64, 0, 2], b"queued"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut b = node(&net, 2, Some(b_key), 2);
    b.dp.apply(vec![PeerChange::Add(spec_of(&a, false))]);
    // boringtun retries after its 5 s rekey timeout; the queued packet then arrives.
    let got = tokio::time::timeout(Duration::from_secs(9), b.tun.delivered.recv()).await;
    assert_eq!(
        got.ok().flatten().as_deref(),
        Some(&ipv4_packet(a.ip, [100, 64, 0, 2], b"queued")[..])
    );
    assert!(a.dp.status()[0].last_handshake.is_some());
}
