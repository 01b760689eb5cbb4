//! The CA commands: `ca show/export/sign-csr/issue-tls/revoke/crl`.

use super::AdminHandler;
use super::proto::*;
use crate::error::ControllerError;
use std::time::{Duration, SystemTime};
use zonemesh_ca::{NodeRequest, RevocationReason, TlsNames, WireGuardKey};

impl AdminHandler {
    /// `ca show`
    pub(super) fn ca_show(&self) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::CaShow(CaShow {
            certificates: self.auth.ca_certificates(),
            trust_domain: self.auth.trust_domain().to_string(),
        }))
    }

    /// `ca rotate-intermediate`: a new intermediate issuing from now on, published to every
    /// watcher (with a running controller) so nodes renew onto it within the spread.
    pub(super) fn ca_rotate_intermediate(
        &self,
        spread_secs: Option<u64>,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let spread = spread_secs
            .map(Duration::from_secs)
            .unwrap_or(crate::core::rotation::DEFAULT_SPREAD);
        let r = self.auth.rotate_intermediate(spread, now)?;
        if let Some(mesh) = &self.mesh {
            mesh.publish_ca()?;
        }
        self.note(
            "ca.rotated_intermediate",
            &r.added.first().map(|c| c.id.clone()).unwrap_or_default(),
            format!("spread {} s", spread.as_secs()),
        );
        Ok(AdminReply::CaRotated(CaRotated {
            added: r.added,
            retiring: r.retiring,
        }))
    }

    /// `ca rotate-root`: a new root cross-signed by the old one and an intermediate under
    /// it; the old root retires after the grace period.
    pub(super) fn ca_rotate_root(
        &self,
        grace_secs: Option<u64>,
        spread_secs: Option<u64>,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let spread = spread_secs
            .map(Duration::from_secs)
            .unwrap_or(crate::core::rotation::DEFAULT_SPREAD);
        let grace = grace_secs
            .map(Duration::from_secs)
            .unwrap_or(crate::core::rotation::DEFAULT_GRACE);
        let r = self.auth.rotate_root(grace, spread, now)?;
        if let Some(mesh) = &self.mesh {
            mesh.publish_ca()?;
        }
        self.note(
            "ca.rotated_root",
            &r.added.first().map(|c| c.id.clone()).unwrap_or_default(),
            format!("grace {} s, spread {} s", grace.as_secs(), spread.as_secs()),
        );
        Ok(AdminReply::CaRotated(CaRotated {
            added: r.added,
            retiring: r.retiring,
        }))
    }

    /// `ca export`
    pub(super) fn ca_export(
        &self,
        intermediate: bool,
        id: Option<String>,
    ) -> Result<AdminReply, ControllerError> {
        if let Some(id) = id {
            let der = self.auth.ca_certificate_der(&id).ok_or_else(|| {
                ControllerError::NotFound(format!("no CA certificate {id:?} (see `ca show`)"))
            })?;
            return Ok(AdminReply::Pem(Pem {
                pem: zonemesh_ca::to_pem("CERTIFICATE", &der),
            }));
        }
        let ca = self.auth.ca();
        let der = if intermediate {
            ca.intermediate_der()
        } else {
            ca.root_der()
        };
        Ok(AdminReply::Pem(Pem {
            pem: zonemesh_ca::to_pem("CERTIFICATE", der),
        }))
    }

    /// `ca sign-csr`: a node certificate for a CSR made elsewhere
    pub(super) fn ca_sign_csr(
        &self,
        csr_der: Vec<u8>,
        zone: String,
        node: String,
        wg_key: String,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let wg = WireGuardKey::from_base64(&wg_key)?;
        let cert = self.auth.issue_node(
            &NodeRequest {
                csr_der: &csr_der,
                zone: &zone,
                node: &node,
                wg_public_key: wg,
            },
            now,
        )?;
        self.auth.store().flush()?;
        Ok(AdminReply::CaSigned(CaSigned {
            pem: pem_chain(&cert.der, &self.auth.chain()),
            serial: cert.serial_hex,
        }))
    }

    /// `ca issue-tls`: a fresh RSA-2048 key and its TLS server certificate
    pub(super) fn ca_issue_tls(
        &self,
        dns: Vec<String>,
        ips: Vec<String>,
        lifetime_secs: Option<u64>,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let ips = ips
            .iter()
            .map(|i| {
                i.parse().map_err(|e| {
                    ControllerError::BadRequest(format!("{i:?} is not an IP address: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = zonemesh_ca::generate_rsa_2048()?;
        let cert = self.auth.issue_tls_key(
            &key,
            &TlsNames { dns, ips },
            lifetime_secs.map(Duration::from_secs),
            now,
        )?;
        Ok(AdminReply::CaTlsIssued(CaTlsIssued {
            chain_pem: pem_chain(&cert.der, &self.auth.chain()),
            key_pem: Redacted(zonemesh_ca::to_pem("PRIVATE KEY", &key.serialize_der())),
            serial: cert.serial_hex,
        }))
    }

    /// `ca revoke`: through the mesh when the serial is a live node's, so its peers drop it
    pub(super) fn ca_revoke(
        &self,
        serial: String,
        reason: String,
        now: SystemTime,
    ) -> Result<AdminReply, ControllerError> {
        let reason: RevocationReason = reason.parse()?;
        let serial_norm = serial.trim().to_ascii_lowercase().replace(':', "");
        let node = self
            .auth
            .store()
            .nodes()?
            .into_iter()
            .find(|n| n.serial_hex == serial_norm && !n.revoked);
        match (&self.mesh, node) {
            (Some(mesh), Some(n)) => {
                mesh.revoke_node(&n.key(), reason, now)?;
            }
            (Some(mesh), None) => {
                mesh.revoke_serial(&serial, reason, now)?;
            }
            (None, node) => {
                // No mesh (the store without a running controller): the node marked
                // revoked in the revocation's own transaction.
                let store = self.auth.store().clone();
                self.auth.revoke_with(&serial, reason, now, |txn| {
                    if let Some(n) = &node {
                        let key = n.key();
                        let old = store
                            .nodes
                            .get(&key)
                            .map_err(crate::store::StoreError::from)?;
                        let mut n = n.clone();
                        n.revoked = true;
                        txn.expect("nodes", &key, old.as_deref()).put(
                            "nodes",
                            &key,
                            crate::store::encode(&n),
                        );
                    }
                    Ok(())
                })?;
            }
        }
        self.note(
            "certificate.revoked",
            &serial_norm,
            format!("reason {}", reason.as_str()),
        );
        Ok(AdminReply::CaRevoked(CaRevoked {
            revoked: serial_norm,
        }))
    }

    /// `ca crl`
    pub(super) fn ca_crl(&self) -> Result<AdminReply, ControllerError> {
        Ok(AdminReply::Pem(Pem {
            pem: zonemesh_ca::to_pem("X509 CRL", &self.auth.crl_der()),
        }))
    }
}

fn pem_chain(leaf: &[u8], chain: &[Vec<u8>]) -> String {
    let mut s = zonemesh_ca::to_pem("CERTIFICATE", leaf);
    for c in chain {
        s.push_str(&zonemesh_ca::to_pem("CERTIFICATE", c));
    }
    s
}
