//! Enrollment with a one-time token: every check first, the RSA signature outside the
//! change lock, then the token use, address, serial and node made durable together.

use super::csr::check_csr_names;
use super::{Mesh, hash_token, parse_endpoints, store_err};
use crate::error::{ControllerError, Result};
use crate::store::{NodeRecord, Store, TokenRecord, ZoneRecord, decode, encode, node_key, unix};
use crate::text::Escaped;
use std::net::IpAddr;
use std::time::SystemTime;
use zonemesh_ca::{NodeRequest, WireGuardKey, validate_label};
use zonemesh_proto as pb;

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
        let result = self.enroll_inner(req, now);
        if let Err(e) = &result {
            self.enroll_failures.note_failure(&limit_key, now);
            // The error may quote what the client sent (a zone name, say).
            tracing::warn!(%source, error = %Escaped(&e.to_string()), "enrollment refused");
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

        let _guard = self.change_lock.lock();
        if self.store.node(&nkey)?.is_some_and(|n| !n.revoked) {
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
        if self.store.zone(&zone.name)?.is_none() {
            return Err(ControllerError::NotFound(
                "the token's zone no longer exists".into(),
            ));
        }
        let overlay_ip = self.allocate_ip(&zone, &nkey)?;
        // Consume one use atomically; a concurrent enrollment with the last use loses here.
        let consumed = self
            .store
            .tokens
            .fetch_and_update(&key, |old| {
                let mut rec: TokenRecord = decode("tokens", old?).ok()?;
                if rec.uses_left == 0 || rec.expires_unix <= unix(now) {
                    return None;
                }
                rec.uses_left -= 1;
                Some(encode(&rec))
            })
            .map_err(store_err)?
            .and_then(|old| decode::<TokenRecord>("tokens", &old).ok())
            .is_some_and(|old| old.uses_left > 0 && old.expires_unix > unix(now));
        if !consumed {
            self.store
                .alloc
                .remove(overlay_ip.to_string())
                .map_err(store_err)?;
            return Err(ControllerError::Unauthenticated(
                "enrollment token has already been used".into(),
            ));
        }
        self.auth
            .record_node(&zone.name, &req.node_name, &cert, now)?;
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
        self.store.put_node(&node)?;
        self.store
            .wgkeys
            .insert(node.wg_public_key, node.key().as_bytes())
            .map_err(store_err)?;
        let peer = self.peer_of(&node);
        drop(_guard);
        // commit() flushes the token use, serial, allocation and node together.
        self.commit(pb::Delta {
            upserted: vec![peer],
            ..Default::default()
        })?;
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
    /// enrollment rather than one per node already enrolled.
    fn allocate_ip(&self, zone: &ZoneRecord, nkey: &str) -> Result<IpAddr> {
        let hint = self.alloc_hint.lock().get(&zone.name).copied();
        let before = move |ip: &IpAddr| hint.is_some_and(|h| *ip < h);
        let from_hint = zone.cidr.hosts().skip_while(before);
        let wrapped = zone.cidr.hosts().take_while(before);
        for ip in from_hint.chain(wrapped) {
            let k = ip.to_string();
            let won = self
                .store
                .alloc
                .compare_and_swap(&k, None as Option<&[u8]>, Some(nkey.as_bytes()))
                .map_err(store_err)?
                .is_ok();
            if won {
                self.alloc_hint.lock().insert(zone.name.clone(), ip);
                return Ok(ip);
            }
        }
        Err(ControllerError::BadRequest(format!(
            "zone {} has no free overlay addresses",
            zone.name
        )))
    }
}
