//! The agent's view of the mesh, built from the controller's snapshot and deltas, and the
//! check every peer passes before it gets a tunnel: a chain that verifies against the CA and
//! the current CRL, naming the node it claims to be, with the WireGuard key it announces
//! bound in its certificate.

use crate::dataplane::MeshMember;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
#[cfg(test)]
use std::time::Duration;
use std::time::SystemTime;
use zonemesh_ca::{TrustStore, WireGuardKey};
use zonemesh_proto as pb;

/// The mesh as last received (and persisted).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshView {
    pub version: u64,
    pub peers: BTreeMap<String, pb::Peer>,
    pub zones: BTreeMap<String, pb::Zone>,
    pub crl_der: Vec<u8>,
    pub blocklist: BTreeMap<String, pb::BlockedSource>,
}

/// A peer that failed verification, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rejection {
    pub peer: String,
    pub reason: String,
}

fn key(zone: &str, node: &str) -> String {
    format!("{zone}/{node}")
}

impl MeshView {
    /// Apply one update from the Watch stream.
    pub fn apply(&mut self, update: &pb::MeshUpdate) {
        match &update.kind {
            Some(pb::mesh_update::Kind::Snapshot(s)) => {
                self.peers = s
                    .peers
                    .iter()
                    .map(|p| (key(&p.zone, &p.node), p.clone()))
                    .collect();
                self.zones = s
                    .zones
                    .iter()
                    .map(|z| (z.name.clone(), z.clone()))
                    .collect();
                self.crl_der = s.crl_der.clone();
                self.blocklist = s
                    .blocklist
                    .iter()
                    .map(|b| (b.address.clone(), b.clone()))
                    .collect();
            }
            Some(pb::mesh_update::Kind::Delta(d)) => {
                for p in &d.upserted {
                    self.peers.insert(key(&p.zone, &p.node), p.clone());
                }
                for r in &d.removed {
                    self.peers.remove(&key(&r.zone, &r.node));
                }
                for z in &d.zones {
                    self.zones.insert(z.name.clone(), z.clone());
                }
                if !d.crl_der.is_empty() {
                    self.crl_der = d.crl_der.clone();
                }
                for b in &d.blocked {
                    self.blocklist.insert(b.address.clone(), b.clone());
                }
                for a in &d.unblocked {
                    self.blocklist.remove(a);
                }
            }
            None => {}
        }
        self.version = update.version;
    }

    /// The view as a snapshot message (how it is persisted).
    pub fn to_update(&self) -> pb::MeshUpdate {
        pb::MeshUpdate {
            version: self.version,
            kind: Some(pb::mesh_update::Kind::Snapshot(pb::Snapshot {
                peers: self.peers.values().cloned().collect(),
                zones: self.zones.values().cloned().collect(),
                crl_der: self.crl_der.clone(),
                blocklist: self.blocklist.values().cloned().collect(),
            })),
        }
    }

    /// Whether nodes of `zone` tunnel to each other.
    pub fn intra_zone(&self, zone: &str) -> bool {
        self.zones.get(zone).is_some_and(|z| z.intra_zone_tunnels)
    }

    /// Every peer whose certificate verifies and vouches for its WireGuard key; the rest
    /// are returned as rejections.
    pub fn verified_members(
        &self,
        trust: &TrustStore,
        now: SystemTime,
    ) -> (Vec<MeshMember>, Vec<Rejection>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for (name, p) in &self.peers {
            match verify_peer(p, trust, &self.crl_der, now) {
                Ok(m) => ok.push(m),
                Err(reason) => bad.push(Rejection {
                    peer: name.clone(),
                    reason,
                }),
            }
        }
        (ok, bad)
    }
}

fn verify_peer(
    p: &pb::Peer,
    trust: &TrustStore,
    crl: &[u8],
    now: SystemTime,
) -> Result<MeshMember, String> {
    let mut chain = vec![p.certificate_der.clone()];
    chain.extend(p.chain_der.iter().cloned());
    let crls = if crl.is_empty() {
        vec![]
    } else {
        vec![crl.to_vec()]
    };
    let v = trust
        .verify_node_chain(&chain, &crls, now)
        .map_err(|e| e.to_string())?;
    if v.id.zone != p.zone || v.id.node != p.node {
        return Err(format!(
            "certificate is for {}/{}, not {}/{}",
            v.id.zone, v.id.node, p.zone, p.node
        ));
    }
    let announced = WireGuardKey::from_slice(&p.wg_public_key).map_err(|e| e.to_string())?;
    v.check_wireguard_key(&announced)
        .map_err(|e| e.to_string())?;
    let overlay_ip: IpAddr = p
        .overlay_ip
        .parse()
        .map_err(|_| format!("bad overlay address {:?}", p.overlay_ip))?;
    Ok(MeshMember {
        name: key(&p.zone, &p.node),
        zone: p.zone.clone(),
        public_key: announced.0,
        endpoints: p
            .endpoints
            .iter()
            .filter_map(|e| e.parse::<SocketAddr>().ok())
            .collect(),
        overlay_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zonemesh_ca::{Ca, CaMaterial, NodePolicy, NodeRequest};

    fn peer(
        ca: &Ca,
        zone: &str,
        node: &str,
        bound: [u8; 32],
        announced: [u8; 32],
        key: &rcgen::KeyPair,
    ) -> pb::Peer {
        let csr = crate::control::enroll::csr_for(key, node).unwrap();
        let cert = ca
            .sign_node_csr(
                &NodePolicy::default(),
                &NodeRequest {
                    csr_der: &csr,
                    zone,
                    node,
                    wg_public_key: WireGuardKey(bound),
                },
                SystemTime::now(),
            )
            .unwrap();
        pb::Peer {
            zone: zone.into(),
            node: node.into(),
            certificate_der: cert.der,
            chain_der: vec![ca.intermediate_der().to_vec()],
            wg_public_key: announced.to_vec(),
            endpoints: vec!["198.18.0.2:51820".into()],
            overlay_ip: "100.64.2.1".into(),
        }
    }

    #[test]
    fn only_peers_whose_certificate_vouches_for_their_key_and_name_are_accepted() {
        let now = SystemTime::now();
        let m = CaMaterial::generate("corp.test", now, |_| {}).unwrap();
        let ca = Ca::from_material(&m).unwrap();
        let trust = ca.trust_store();
        let key = zonemesh_ca::generate_rsa_4096().unwrap();
        let mut view = MeshView {
            crl_der: ca.crl(&[], 1, now, Duration::from_secs(3600)).unwrap(),
            ..Default::default()
        };
        let honest = peer(&ca, "b", "b1", [1; 32], [1; 32], &key);
        // A valid certificate, but announcing another WireGuard key: a forged peer.
        let forged = peer(&ca, "b", "b2", [2; 32], [3; 32], &key);
        // A valid certificate for b3 presented under the name b4.
        let mut renamed = peer(&ca, "b", "b3", [4; 32], [4; 32], &key);
        renamed.node = "b4".into();
        view.apply(&pb::MeshUpdate {
            version: 1,
            kind: Some(pb::mesh_update::Kind::Delta(pb::Delta {
                upserted: vec![honest, forged, renamed],
                ..Default::default()
            })),
        });
        let (ok, bad) = view.verified_members(&trust, now);
        assert_eq!(
            ok.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            vec!["b/b1"]
        );
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad.iter()
                .any(|r| r.peer == "b/b2" && r.reason.contains("WireGuard key")),
            "{bad:?}"
        );
        assert!(
            bad.iter()
                .any(|r| r.peer == "b/b4" && r.reason.contains("b/b3")),
            "{bad:?}"
        );

        // Without a CRL nothing is trusted; with the honest peer revoked it is dropped.
        let mut no_crl = view.clone();
        no_crl.crl_der.clear();
        assert!(no_crl.verified_members(&trust, now).0.is_empty());
        let serial = zonemesh_ca::serial_hex(
            x509_parser::parse_x509_certificate(&view.peers["b/b1"].certificate_der)
                .unwrap()
                .1
                .raw_serial(),
        );
        let crl = ca
            .crl(
                &[zonemesh_ca::RevokedEntry {
                    serial_hex: serial,
                    revoked_at: now,
                    reason: zonemesh_ca::RevocationReason::KeyCompromise,
                }],
                2,
                now,
                Duration::from_secs(3600),
            )
            .unwrap();
        view.apply(&pb::MeshUpdate {
            version: 2,
            kind: Some(pb::mesh_update::Kind::Delta(pb::Delta {
                crl_der: crl,
                ..Default::default()
            })),
        });
        assert!(view.verified_members(&trust, now).0.is_empty());
        // The view survives its own persistence format.
        let mut again = MeshView::default();
        again.apply(&view.to_update());
        assert_eq!(again, view);
    }
}
