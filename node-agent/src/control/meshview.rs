//! The agent's view of the mesh, built from the controller's snapshot and deltas, and the
//! check every peer passes before it gets a tunnel: a chain that verifies against the CA and
//! the current CRL, naming the node it claims to be, with the WireGuard key it announces
//! bound in its certificate. The intermediate comes once per stream (`ca_chain_der`) for
//! peers that carry no chain; a peer that still carries its own (an older controller) is
//! checked with that.

use crate::dataplane::MeshMember;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};
use zonemesh_ca::{TrustStore, VerifiedNode, WireGuardKey};
use zonemesh_proto as pb;

/// How long a failed chain check is trusted before it is tried again (a certificate that
/// was not yet valid may have become valid).
const RECHECK_FAILURE: Duration = Duration::from_secs(60);

/// The mesh as last received (and persisted).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshView {
    pub version: u64,
    pub peers: BTreeMap<String, pb::Peer>,
    pub zones: BTreeMap<String, pb::Zone>,
    pub crl_der: Vec<u8>,
    pub blocklist: BTreeMap<String, pb::BlockedSource>,
    /// The CA chain the controller sends once per stream, for peers without their own.
    pub ca_chain_der: Vec<Vec<u8>>,
    /// The SSH state for a managed sshd (replaced whole by each update that has one).
    pub ssh: Option<pb::SshState>,
    /// The CA certificates in force (replaced whole by each update that has them).
    pub ca: Option<pb::CaBundle>,
    /// The CRLs of the trusted intermediates other than the issuing one.
    pub issuer_crls_der: Vec<Vec<u8>>,
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
                self.issuer_crls_der = s.issuer_crls_der.clone();
                self.blocklist = s
                    .blocklist
                    .iter()
                    .map(|b| (b.address.clone(), b.clone()))
                    .collect();
                // A controller that puts the chain in every peer sends none here.
                if !s.ca_chain_der.is_empty() {
                    self.ca_chain_der = s.ca_chain_der.clone();
                }
                self.ssh = s.ssh.clone();
                // A controller without CA rotation sends none: keep what was held.
                if s.ca.is_some() {
                    self.ca = s.ca.clone();
                }
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
                    self.issuer_crls_der = d.issuer_crls_der.clone();
                }
                for b in &d.blocked {
                    self.blocklist.insert(b.address.clone(), b.clone());
                }
                for a in &d.unblocked {
                    self.blocklist.remove(a);
                }
                if !d.ca_chain_der.is_empty() {
                    self.ca_chain_der = d.ca_chain_der.clone();
                }
                if let Some(ssh) = &d.ssh {
                    self.ssh = Some(ssh.clone());
                }
                if let Some(ca) = &d.ca {
                    self.ca = Some(ca.clone());
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
                ca_chain_der: self.ca_chain_der.clone(),
                ssh: self.ssh.clone(),
                ca: self.ca.clone(),
                issuer_crls_der: self.issuer_crls_der.clone(),
            })),
        }
    }

    /// The chain that goes with `p`'s certificate: its own, or the stream's.
    fn chain_of<'a>(&'a self, p: &'a pb::Peer) -> &'a [Vec<u8>] {
        if p.chain_der.is_empty() {
            &self.ca_chain_der
        } else {
            &p.chain_der
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
        self.verified_members_cached(trust, now, &mut VerifyCache::default())
    }

    /// [`MeshView::verified_members`], checking only chains (or CRLs) that changed since
    /// the results in `cache`. The cache keeps only the peers of this view.
    pub fn verified_members_cached(
        &self,
        trust: &TrustStore,
        now: SystemTime,
        cache: &mut VerifyCache,
    ) -> (Vec<MeshMember>, Vec<Rejection>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        // The verdicts depend on every CRL and on the trusted roots.
        let crl_hash: [u8; 32] = {
            let mut h = Sha256::new();
            let roots = trust.roots().iter().map(|r| r.as_ref());
            for c in std::iter::once(self.crl_der.as_slice())
                .chain(self.issuer_crls_der.iter().map(|c| c.as_slice()))
                .chain(roots)
            {
                h.update((c.len() as u64).to_be_bytes());
                h.update(c);
            }
            h.finalize().into()
        };
        let crls: Vec<Vec<u8>> = std::iter::once(&self.crl_der)
            .chain(&self.issuer_crls_der)
            .filter(|c| !c.is_empty())
            .cloned()
            .collect();
        let mut seen = Vec::with_capacity(self.peers.len());
        for (name, p) in &self.peers {
            let chain_der = self.chain_of(p);
            let key = ChainKey::of(p, chain_der, crl_hash);
            seen.push(key);
            let chain =
                cache.chain_verdict(key, now, || verify_chain(p, chain_der, trust, &crls, now));
            match chain.and_then(|v| check_peer(p, &v)) {
                Ok(m) => ok.push(m),
                Err(reason) => bad.push(Rejection {
                    peer: name.clone(),
                    reason,
                }),
            }
        }
        cache.retain(&seen);
        (ok, bad)
    }
}

/// What a chain check depends on: the peer's certificate and chain, and the CRL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ChainKey([u8; 32]);

impl ChainKey {
    fn of(p: &pb::Peer, chain_der: &[Vec<u8>], crl_hash: [u8; 32]) -> Self {
        let mut h = Sha256::new();
        for der in std::iter::once(&p.certificate_der).chain(chain_der) {
            h.update((der.len() as u64).to_be_bytes());
            h.update(der);
        }
        h.update(crl_hash);
        Self(h.finalize().into())
    }
}

#[derive(Clone, Debug)]
struct Verdict {
    result: Result<VerifiedNode, String>,
    checked_at: SystemTime,
}

/// Results of peer chain checks, keyed by certificate, chain and CRL, so that a change to
/// one peer (or its endpoints) does not check every chain again. Holds at most one entry
/// per peer of the last view checked.
#[derive(Debug, Default)]
pub struct VerifyCache {
    verdicts: HashMap<ChainKey, Verdict>,
    /// Chain checks actually run (not answered from the cache).
    pub checks: u64,
}

impl VerifyCache {
    fn chain_verdict(
        &mut self,
        key: ChainKey,
        now: SystemTime,
        check: impl FnOnce() -> Result<VerifiedNode, String>,
    ) -> Result<VerifiedNode, String> {
        if let Some(v) = self.verdicts.get(&key) {
            let fresh = now >= v.checked_at
                && match &v.result {
                    Ok(node) => now < node.not_after,
                    Err(_) => now < v.checked_at + RECHECK_FAILURE,
                };
            if fresh {
                return v.result.clone();
            }
        }
        self.checks += 1;
        let result = check();
        self.verdicts.insert(
            key,
            Verdict {
                result: result.clone(),
                checked_at: now,
            },
        );
        result
    }

    fn retain(&mut self, keys: &[ChainKey]) {
        if self.verdicts.len() > keys.len() {
            let keep: std::collections::HashSet<&ChainKey> = keys.iter().collect();
            self.verdicts.retain(|k, _| keep.contains(k));
        }
    }

    /// Number of cached results.
    pub fn len(&self) -> usize {
        self.verdicts.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.verdicts.is_empty()
    }
}

fn verify_chain(
    p: &pb::Peer,
    chain_der: &[Vec<u8>],
    trust: &TrustStore,
    crls: &[Vec<u8>],
    now: SystemTime,
) -> Result<VerifiedNode, String> {
    let mut chain = vec![p.certificate_der.clone()];
    chain.extend(chain_der.iter().cloned());
    trust
        .verify_node_chain(&chain, crls, now)
        .map_err(|e| e.to_string())
}

/// The checks that depend on what the peer claims besides its chain: its name, its
/// WireGuard key and its overlay address.
fn check_peer(p: &pb::Peer, v: &VerifiedNode) -> Result<MeshMember, String> {
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

        // With a cache: each chain is checked once; an endpoint change checks nothing, a
        // new CRL checks every chain again, and peers that left are forgotten.
        let mut cache = VerifyCache::default();
        let first = view.verified_members_cached(&trust, now, &mut cache);
        assert_eq!(cache.checks, 3);
        let mut moved = view.peers["b/b2"].clone();
        moved.endpoints = vec!["198.18.0.9:1".into()];
        view.apply(&pb::MeshUpdate {
            version: 3,
            kind: Some(pb::mesh_update::Kind::Delta(pb::Delta {
                upserted: vec![moved],
                ..Default::default()
            })),
        });
        assert_eq!(view.verified_members_cached(&trust, now, &mut cache), first);
        assert_eq!(cache.checks, 3, "an endpoint change checks no chain");
        let mut fresh_crl = view.clone();
        fresh_crl.crl_der = ca.crl(&[], 3, now, Duration::from_secs(3600)).unwrap();
        let (ok, _) = fresh_crl.verified_members_cached(&trust, now, &mut cache);
        assert_eq!(cache.checks, 6, "a new CRL checks every chain again");
        assert_eq!(
            ok.len(),
            1,
            "the honest peer is back with a CRL that does not list it"
        );
        assert_eq!(cache.len(), 3);
        fresh_crl.peers.remove("b/b1");
        fresh_crl.verified_members_cached(&trust, now, &mut cache);
        assert_eq!(cache.len(), 2, "bounded by the peers of the view");
        // An accepted chain is checked again once its certificate has expired.
        let later = now + Duration::from_secs(400 * 24 * 3600);
        let (ok, bad) = fresh_crl.verified_members_cached(&trust, later, &mut cache);
        assert!(ok.is_empty() && bad.len() == 2, "{bad:?}");
        assert_eq!(cache.checks, 8);

        // The view survives its own persistence format.
        let mut again = MeshView::default();
        again.apply(&view.to_update());
        assert_eq!(again, view);
    }

    #[test]
    fn peers_without_a_chain_are_checked_with_the_streams_chain() {
        let now = SystemTime::now();
        let m = CaMaterial::generate("corp.test", now, |_| {}).unwrap();
        let ca = Ca::from_material(&m).unwrap();
        let trust = ca.trust_store();
        let key = zonemesh_ca::generate_rsa_4096().unwrap();
        // From an older controller: the peer carries its chain.
        let own = peer(&ca, "b", "b1", [1; 32], [1; 32], &key);
        let mut bare = peer(&ca, "b", "b2", [2; 32], [2; 32], &key);
        bare.chain_der.clear();
        let mut view = MeshView {
            crl_der: ca.crl(&[], 1, now, Duration::from_secs(3600)).unwrap(),
            ..Default::default()
        };
        view.apply(&pb::MeshUpdate {
            version: 1,
            kind: Some(pb::mesh_update::Kind::Delta(pb::Delta {
                upserted: vec![own, bare],
                ..Default::default()
            })),
        });
        let mut cache = VerifyCache::default();
        let checks = cache.checks;
        view.verified_members_cached(&trust, now, &mut cache);
        assert_eq!(cache.checks - checks, 2);
        // The chain the stream sends once (a resumed stream: at the version it has).
        view.apply(&pb::MeshUpdate {
            version: 1,
            kind: Some(pb::mesh_update::Kind::Delta(pb::Delta {
                ca_chain_der: vec![ca.intermediate_der().to_vec()],
                ..Default::default()
            })),
        });
        let (ok, bad) = view.verified_members_cached(&trust, now, &mut cache);
        assert_eq!(ok.len(), 2, "{bad:?}");
        assert_eq!(
            cache.checks, 3,
            "the chainless peer is checked again with the chain"
        );
        assert_eq!(view.version, 1);
        // The chain survives persistence.
        let mut again = MeshView::default();
        again.apply(&view.to_update());
        assert_eq!(again, view);
        assert_eq!(again.verified_members(&trust, now).0.len(), 2);
    }
}
