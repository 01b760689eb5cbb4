//! Pure functions that decide which peers a node should have: topology selection from the
//! mesh membership, and the diff between the desired and the configured peer set.

use super::{MeshMember, PeerChange, PeerSpec};
use ipnet::IpNet;
use std::collections::{BTreeMap, HashSet};

/// Keepalive used for mesh peers so that stateful firewalls between zones keep the
/// UDP flow open even when the tunnel is idle.
pub const DEFAULT_KEEPALIVE_SECS: u16 = 25;

/// The peers `me` should tunnel to: members of other zones, plus members of its own zone
/// when `intra_zone(zone)` says that zone tunnels internally. Never `me` itself.
/// Output is sorted by name so that callers get a stable order.
pub fn select_peers(
    me: &MeshMember,
    members: &[MeshMember],
    intra_zone: &dyn Fn(&str) -> bool,
) -> Vec<PeerSpec> {
    let mut seen = HashSet::new();
    let mut out: Vec<PeerSpec> = members
        .iter()
        .filter(|m| m.public_key != me.public_key && m.name != me.name)
        .filter(|m| m.zone != me.zone || intra_zone(&me.zone))
        // One tunnel per key: a duplicated announcement must not create two peers.
        .filter(|m| seen.insert(m.public_key))
        .map(|m| PeerSpec {
            name: m.name.clone(),
            zone: m.zone.clone(),
            public_key: m.public_key,
            endpoint: m.endpoints.first().copied(),
            allowed_ips: vec![IpNet::from(m.overlay_ip)],
            persistent_keepalive: Some(DEFAULT_KEEPALIVE_SECS),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The changes that turn the `actual` peer set into the `desired` one. Peers are
/// identified by public key: a node that changed its key is removed and added again.
/// Order: removals first (so a re-keyed node frees its allowed IPs), then updates, then
/// additions, each sorted by name.
pub fn reconcile(desired: &[PeerSpec], actual: &[PeerSpec]) -> Vec<PeerChange> {
    let want: BTreeMap<[u8; 32], &PeerSpec> =
        desired.iter().rev().map(|p| (p.public_key, p)).collect();
    let have: BTreeMap<[u8; 32], &PeerSpec> = actual.iter().map(|p| (p.public_key, p)).collect();

    let mut removes: Vec<PeerChange> = have
        .iter()
        .filter(|(k, _)| !want.contains_key(*k))
        .map(|(k, p)| PeerChange::Remove {
            public_key: *k,
            name: p.name.clone(),
        })
        .collect();
    let mut updates = Vec::new();
    let mut adds = Vec::new();
    for (k, p) in &want {
        match have.get(k) {
            None => adds.push(PeerChange::Add((*p).clone())),
            Some(old) if !same_config(old, p) => updates.push(PeerChange::Update((*p).clone())),
            Some(_) => {}
        }
    }
    removes.sort_by(|a, b| a.name().cmp(b.name()));
    updates.sort_by(|a, b| a.name().cmp(b.name()));
    adds.sort_by(|a, b| a.name().cmp(b.name()));
    removes.into_iter().chain(updates).chain(adds).collect()
}

fn same_config(a: &PeerSpec, b: &PeerSpec) -> bool {
    let mut ai = a.allowed_ips.clone();
    let mut bi = b.allowed_ips.clone();
    ai.sort();
    bi.sort();
    a.name == b.name
        && a.zone == b.zone
        && a.endpoint == b.endpoint
        && a.persistent_keepalive == b.persistent_keepalive
        && ai == bi
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, SocketAddr};

    fn member(name: &str, zone: &str, key: u8, ip: &str) -> MeshMember {
        MeshMember {
            name: format!("{zone}/{name}"),
            zone: zone.into(),
            public_key: [key; 32],
            endpoints: vec![SocketAddr::new(
                "198.18.0.1".parse().unwrap(),
                51820 + key as u16,
            )],
            overlay_ip: ip.parse::<IpAddr>().unwrap(),
        }
    }

    fn spec(name: &str, key: u8) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            zone: "z".into(),
            public_key: [key; 32],
            endpoint: None,
            allowed_ips: vec!["100.64.0.1/32".parse().unwrap()],
            persistent_keepalive: None,
        }
    }

    fn names(v: &[PeerSpec]) -> Vec<&str> {
        v.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn select_peers_table() {
        let members = vec![
            member("a1", "a", 1, "100.64.1.1"),
            member("a2", "a", 2, "100.64.1.2"),
            member("b1", "b", 3, "100.64.2.1"),
            member("b2", "b", 4, "100.64.2.2"),
            member("c1", "c", 5, "100.64.3.1"),
        ];
        let never = |_: &str| false;
        let zone_a = |z: &str| z == "a";
        let zone_b = |z: &str| z == "b";
        struct Case<'a> {
            me: usize,
            intra: &'a dyn Fn(&str) -> bool,
            want: Vec<&'a str>,
        }
        let cases = [
            Case {
                me: 0,
                intra: &never,
                want: vec!["b/b1", "b/b2", "c/c1"],
            },
            Case {
                me: 0,
                intra: &zone_a,
                want: vec!["a/a2", "b/b1", "b/b2", "c/c1"],
            },
            // Intra-zone tunnelling of zone b does not give a's node a tunnel to a2.
            Case {
                me: 0,
                intra: &zone_b,
                want: vec!["b/b1", "b/b2", "c/c1"],
            },
            Case {
                me: 2,
                intra: &zone_b,
                want: vec!["a/a1", "a/a2", "b/b2", "c/c1"],
            },
            Case {
                me: 4,
                intra: &never,
                want: vec!["a/a1", "a/a2", "b/b1", "b/b2"],
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let got = select_peers(&members[c.me], &members, c.intra);
            assert_eq!(names(&got), c.want, "case {i}");
        }
    }

    #[test]
    fn select_peers_fields_and_edge_cases() {
        let me = member("a1", "a", 1, "100.64.1.1");
        // Alone in the mesh, or only same-zone members: no peers.
        assert!(select_peers(&me, std::slice::from_ref(&me), &|_| false).is_empty());
        assert!(
            select_peers(
                &me,
                &[me.clone(), member("a2", "a", 2, "100.64.1.2")],
                &|_| false
            )
            .is_empty()
        );
        // A member that re-uses my key (stale record under another name) is never a peer.
        let mut clone_of_me = member("x", "b", 1, "100.64.9.9");
        clone_of_me.public_key = me.public_key;
        assert!(select_peers(&me, &[clone_of_me], &|_| false).is_empty());
        // Fields: first endpoint, overlay host route, keepalive; no endpoint is allowed.
        let mut b = member("b1", "b", 3, "100.64.2.1");
        b.endpoints.push("198.18.0.9:1".parse().unwrap());
        let mut c = member("c1", "c", 5, "fd00::5");
        c.endpoints.clear();
        let got = select_peers(&me, &[b.clone(), c, b.clone()], &|_| false);
        assert_eq!(got.len(), 2, "duplicate key announced twice gives one peer");
        assert_eq!(got[0].endpoint, Some(b.endpoints[0]));
        assert_eq!(
            got[0].allowed_ips,
            vec!["100.64.2.1/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(got[0].persistent_keepalive, Some(DEFAULT_KEEPALIVE_SECS));
        assert_eq!(got[1].endpoint, None);
        assert_eq!(
            got[1].allowed_ips,
            vec!["fd00::5/128".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn reconcile_table() {
        let a = spec("a", 1);
        let b = spec("b", 2);
        let c = spec("c", 3);
        let mut b_moved = b.clone();
        b_moved.endpoint = Some("198.18.0.7:51820".parse().unwrap());
        let mut b_ips = b.clone();
        b_ips.allowed_ips = vec![
            "100.64.0.9/32".parse().unwrap(),
            "100.64.0.1/32".parse().unwrap(),
        ];
        let mut b_ips_reordered = b_ips.clone();
        b_ips_reordered.allowed_ips.reverse();
        let mut b_rekeyed = b.clone();
        b_rekeyed.public_key = [9; 32];
        let mut c_keepalive = c.clone();
        c_keepalive.persistent_keepalive = Some(25);

        let add = |p: &PeerSpec| format!("add {}", p.name);
        let upd = |p: &PeerSpec| format!("update {}", p.name);
        let rm = |p: &PeerSpec| format!("remove {}", p.name);
        type Case<'a> = (&'a str, Vec<PeerSpec>, Vec<PeerSpec>, Vec<String>);
        let cases: Vec<Case> = vec![
            ("empty", vec![], vec![], vec![]),
            (
                "all new",
                vec![b.clone(), a.clone()],
                vec![],
                vec![add(&a), add(&b)],
            ),
            (
                "all gone",
                vec![],
                vec![c.clone(), a.clone()],
                vec![rm(&a), rm(&c)],
            ),
            (
                "unchanged",
                vec![a.clone(), b.clone()],
                vec![b.clone(), a.clone()],
                vec![],
            ),
            (
                "endpoint moved",
                vec![a.clone(), b_moved.clone()],
                vec![a.clone(), b.clone()],
                vec![upd(&b)],
            ),
            (
                "allowed ips changed",
                vec![b_ips.clone()],
                vec![b.clone()],
                vec![upd(&b)],
            ),
            (
                "allowed ips order only",
                vec![b_ips_reordered.clone()],
                vec![b_ips.clone()],
                vec![],
            ),
            (
                "keepalive changed",
                vec![c_keepalive.clone()],
                vec![c.clone()],
                vec![upd(&c)],
            ),
            (
                "re-keyed node",
                vec![b_rekeyed.clone()],
                vec![b.clone()],
                vec![rm(&b), add(&b)],
            ),
            (
                "mixed",
                vec![b_moved.clone(), c.clone()],
                vec![a.clone(), b.clone()],
                vec![rm(&a), upd(&b), add(&c)],
            ),
        ];
        for (name, desired, actual, want) in cases {
            let got: Vec<String> = reconcile(&desired, &actual)
                .iter()
                .map(|ch| match ch {
                    PeerChange::Add(p) => format!("add {}", p.name),
                    PeerChange::Update(p) => format!("update {}", p.name),
                    PeerChange::Remove { name, .. } => format!("remove {name}"),
                })
                .collect();
            assert_eq!(got, want, "case {name}");
        }
    }

    #[test]
    fn reconcile_carries_the_new_spec_and_the_removed_key() {
        let a = spec("a", 1);
        let mut a2 = a.clone();
        a2.endpoint = Some("198.18.0.3:1".parse().unwrap());
        match reconcile(std::slice::from_ref(&a2), std::slice::from_ref(&a)).as_slice() {
            [PeerChange::Update(p)] => assert_eq!(p, &a2),
            other => panic!("unexpected {other:?}"),
        }
        match reconcile(&[], std::slice::from_ref(&a)).as_slice() {
            [PeerChange::Remove { public_key, name }] => {
                assert_eq!(public_key, &[1; 32]);
                assert_eq!(name, "a");
            }
            other => panic!("unexpected {other:?}"),
        }
        // Applying the changes to `actual` reaches `desired` (fixed point: no more changes).
        let desired = vec![spec("x", 7), a2.clone()];
        let mut actual = vec![a.clone(), spec("y", 8)];
        for ch in reconcile(&desired, &actual) {
            match ch {
                PeerChange::Add(p) => actual.push(p),
                PeerChange::Update(p) => {
                    let slot = actual
                        .iter_mut()
                        .find(|q| q.public_key == p.public_key)
                        .unwrap();
                    *slot = p;
                }
                PeerChange::Remove { public_key, .. } => {
                    actual.retain(|q| q.public_key != public_key)
                }
            }
        }
        assert!(reconcile(&desired, &actual).is_empty());
    }
}
