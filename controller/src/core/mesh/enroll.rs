//! Enrollment with a one-time token: every check first, the RSA signature outside the
//! change lock, then the token use, address, serial and node made durable together.

use super::csr::check_csr_names;
use super::{Mesh, hash_token, parse_endpoints, store_err};
use crate::error::{ControllerError, Result};
use crate::store::{
    CertKind, CertRecord, NodeRecord, NodeSerial, Store, TokenRecord, Txn, ZoneRecord, decode,
    encode, node_key, unix,
};
use crate::text::Escaped;
use std::net::IpAddr;
use std::ops::Not;
use std::time::SystemTime;
use zonemesh_ca::{NodeRequest, WireGuardKey, validate_label};
use zonemesh_proto as pb;

/// Whether an enrollment error is the client's doing (a bad token, CSR, name or key) and
/// counts against its failure budget; the store, the blocking pool or the TLS layer
/// failing is not.
fn client_fault(e: &ControllerError) -> bool {
    !matches!(
        e,
        ControllerError::Store(_)
            | ControllerError::Blocking(_)
            | ControllerError::Unavailable(_)
            | ControllerError::CrlUpdate(_)
            | ControllerError::Audit(_)
    )
}

impl Mesh {
    /// Enroll a node with a one-time token. Nothing is issued unless every check passes;
    /// the token use, the serial and the node are durable before this returns.
    pub fn enroll(
        &self,
        req: &pb::EnrollRequest,
        source: IpAddr,
        now: SystemTime,
    ) -> Result<pb::EnrollResponse> {
        // Keyed by source and token, so one source guessing tokens (say, behind a NAT
        // shared with real nodes) does not lock out a valid token from the same address.
        let token_hash = hash_token(&req.token);
        let known = self
            .store
            .tokens
            .contains_key(&token_hash)
            .map_err(store_err)?;
        let limit_key = (source, known.then_some(token_hash));
        if self.enroll_failures.is_limited(&limit_key, now) {
            return Err(ControllerError::RateLimited(
                "too many failed enrollments from this address; try again later".into(),
            ));
        }
        let hold = self.hold_announcements();
        let result = self.enroll_inner(req, now);
        drop(hold);
        match &result {
            Err(e) if client_fault(e) => {
                self.enroll_failures.note_failure(&limit_key, now);
                // The error may quote what the client sent (a zone name, say).
                tracing::warn!(%source, error = %Escaped(&e.to_string()), "enrollment refused");
            }
            // The controller's own trouble (the store cannot be reached, say): the agent
            // retries, and its retries are not held against it.
            Err(e) => {
                tracing::warn!(%source, error = %e, "enrollment failed on the controller's side")
            }
            Ok(_) => {}
        }
        result
    }

    fn enroll_inner(&self, req: &pb::EnrollRequest, now: SystemTime) -> Result<pb::EnrollResponse> {
        let key = hash_token(&req.token);
        let token: TokenRecord =
            Store::get(&self.store.tokens, "tokens", &key)?.ok_or_else(|| {
                ControllerError::Unauthenticated("enrollment token is not valid".into())
            })?;
        if token.expires_unix <= unix(now) {
            return Err(ControllerError::Unauthenticated(
                "enrollment token has expired".into(),
            ));
        }
        if token.uses_left == 0 {
            return Err(ControllerError::Unauthenticated(
                "enrollment token has already been used".into(),
            ));
        }
        if !req.zone.is_empty() && req.zone != token.zone {
            return Err(ControllerError::PermissionDenied(format!(
                "enrollment token is for zone {}, not {}",
                token.zone, req.zone
            )));
        }
        let zone = self
            .store
            .zone(&token.zone)?
            .ok_or_else(|| ControllerError::NotFound("the token's zone no longer exists".into()))?;
        validate_label("node name", &req.node_name, false)?;
        let wg = WireGuardKey::from_slice(&req.wg_public_key)?;
        let endpoints = parse_endpoints(&req.endpoints)?;
        check_csr_names(
            &req.csr_der,
            self.auth.trust_domain(),
            &zone.name,
            &req.node_name,
        )?;
        let nkey = node_key(&zone.name, &req.node_name);

        // The RSA signature is the slow part: take it before the change lock, then check
        // again under the lock everything that must hold atomically with the writes.
        let node_req = NodeRequest {
            csr_der: &req.csr_der,
            zone: &zone.name,
            node: &req.node_name,
            wg_public_key: wg,
        };
        if let Some(hook) = &self.sign_hook {
            hook();
        }
        let cert = self.auth.sign_node(&node_req, now)?;

        let guard = self.change_lock.lock();
        let old_node = self.store.nodes.get(&nkey).map_err(store_err)?;
        if let Some(n) = &old_node
            && decode::<NodeRecord>("nodes", n)?.revoked.not()
        {
            return Err(ControllerError::AlreadyExists(format!(
                "node {nkey} is already enrolled"
            )));
        }
        if let Some(owner) = self.store.wgkeys.get(wg.0).map_err(store_err)?
            && self
                .store
                .node(&String::from_utf8_lossy(&owner))?
                .is_some_and(|n| !n.revoked)
        {
            return Err(ControllerError::AlreadyExists(
                "this WireGuard key belongs to another node".into(),
            ));
        }
        let zone_bytes = self.store.zones.get(&zone.name).map_err(store_err)?;
        if zone_bytes.is_none() {
            return Err(ControllerError::NotFound(
                "the token's zone no longer exists".into(),
            ));
        }
        let token_bytes = self.store.tokens.get(&key).map_err(store_err)?;
        let current: Option<TokenRecord> = token_bytes
            .as_deref()
            .map(|b| decode("tokens", b))
            .transpose()?;
        let Some(mut token) = current.filter(|t| t.uses_left > 0 && t.expires_unix > unix(now))
        else {
            return Err(ControllerError::Unauthenticated(
                "enrollment token has already been used".into(),
            ));
        };
        token.uses_left -= 1;
        if token.uses_left == 0 {
            token.spent_unix = unix(now);
        }
        let overlay_ip = self.allocate_ip(&zone)?;
        let node = NodeRecord {
            zone: zone.name.clone(),
            node: req.node_name.clone(),
            serial_hex: cert.serial_hex.clone(),
            cert_der: cert.der.clone(),
            wg_public_key: wg.0,
            endpoints,
            overlay_ip,
            enrolled_unix: unix(now),
            not_after_unix: unix(cert.not_after),
            revoked: false,
        };
        // One transaction: the token use, the address, the certificate and its owner, the
        // node, its key and (in commit_with) the change-log entry, each checked against
        // what was read above; a concurrent writer makes it apply not at all.
        let mut txn = Txn::new();
        txn.expect("tokens", &key, token_bytes.as_deref())
            .put("tokens", &key, encode(&token))
            .expect("zones", &zone.name, zone_bytes.as_deref())
            .expect("alloc", overlay_ip.to_string(), None)
            .put("alloc", overlay_ip.to_string(), nkey.as_bytes())
            .put(
                "certs",
                &cert.serial_hex,
                encode(&CertRecord {
                    kind: CertKind::Node,
                    subject: nkey.clone(),
                    not_after_unix: unix(cert.not_after),
                    issued_unix: unix(now),
                }),
            )
            .put(
                "node_serials",
                format!("{nkey}/{}", cert.serial_hex),
                encode(&NodeSerial {
                    serial_hex: cert.serial_hex.clone(),
                    kind: CertKind::Node,
                    not_after_unix: unix(cert.not_after),
                }),
            )
            .expect("nodes", &nkey, old_node.as_deref())
            .put("nodes", &nkey, encode(&node))
            .put("wgkeys", node.wg_public_key, nkey.as_bytes());
        let peer = self.peer_of(&node);
        // commit_with applies it with the change-log entry and flushes before replying.
        self.commit_with(
            guard,
            pb::Delta {
                upserted: vec![peer],
                ..Default::default()
            },
            txn,
        )?;
        self.alloc_hint.lock().insert(zone.name.clone(), overlay_ip);
        self.metrics()
            .certificate_issued(crate::metrics::CertKind::Node);
        tracing::info!(node = %nkey, serial = %cert.serial_hex, "node enrolled");
        Ok(pb::EnrollResponse {
            certificate_der: cert.der,
            chain_der: self.auth.chain(),
            root_der: self.auth.ca().root_der().to_vec(),
            trust_domain: self.auth.trust_domain().to_string(),
            zone: zone.name.clone(),
            node: req.node_name.clone(),
            spiffe_id: zonemesh_ca::SpiffeId::new(
                self.auth.trust_domain(),
                &zone.name,
                &req.node_name,
            )?
            .uri(),
            overlay_ip: overlay_ip.to_string(),
            zone_cidr: zone.cidr.to_string(),
        })
    }

    /// The first free address of the zone, searched from where the last allocation in the
    /// zone ended (then from the start, for addresses freed since): one store lookup per
    /// enrollment rather than one per node already enrolled. Called under the change lock;
    /// the enrollment's transaction claims the address (on condition it is still free).
    fn allocate_ip(&self, zone: &ZoneRecord) -> Result<IpAddr> {
        let hint = self.alloc_hint.lock().get(&zone.name).copied();
        let before = move |ip: &IpAddr| hint.is_some_and(|h| *ip < h);
        let from_hint = zone.cidr.hosts().skip_while(before);
        let wrapped = zone.cidr.hosts().take_while(before);
        for ip in from_hint.chain(wrapped) {
            if !self
                .store
                .alloc
                .contains_key(ip.to_string())
                .map_err(store_err)?
            {
                return Ok(ip);
            }
        }
        Err(ControllerError::BadRequest(format!(
            "zone {} has no free overlay addresses",
            zone.name
        )))
    }
}
