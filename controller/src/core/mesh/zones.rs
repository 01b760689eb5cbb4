//! Zones and enrollment tokens, created by the operator.

use super::{Mesh, hash_token, store_err};
use crate::error::{ControllerError, Result};
use crate::store::{TokenRecord, ZoneRecord, encode, unix};
use base64::Engine;
use std::time::{Duration, SystemTime};
use zonemesh_ca::validate_label;
use zonemesh_proto as pb;

/// A created token, shown to the operator once.
#[derive(Debug, serde::Serialize)]
pub struct CreatedToken {
    pub token: String,
    pub zone: String,
    pub expires_unix: u64,
    pub uses: u32,
}

impl Mesh {
    pub fn add_zone(
        &self,
        name: &str,
        cidr: &str,
        intra_zone_tunnels: bool,
        now: SystemTime,
    ) -> Result<ZoneRecord> {
        validate_label("zone", name, false)?;
        let cidr: ipnet::IpNet = cidr.parse().map_err(|e| {
            ControllerError::BadRequest(format!("{cidr:?} is not a CIDR (e.g. 100.64.1.0/24): {e}"))
        })?;
        if cidr.trunc() != cidr {
            return Err(ControllerError::BadRequest(format!(
                "{cidr} has host bits set; did you mean {}?",
                cidr.trunc()
            )));
        }
        if cidr.hosts().take(2).count() < 2 {
            return Err(ControllerError::BadRequest(format!(
                "{cidr} is too small for a zone"
            )));
        }
        if self.store.zone(name)?.is_some() {
            return Err(ControllerError::AlreadyExists(format!(
                "zone {name} already exists"
            )));
        }
        if let Some(other) = self
            .store
            .zones()?
            .into_iter()
            .find(|z| z.cidr.contains(&cidr.network()) || cidr.contains(&z.cidr.network()))
        {
            return Err(ControllerError::BadRequest(format!(
                "{cidr} overlaps zone {} ({})",
                other.name, other.cidr
            )));
        }
        let rec = ZoneRecord {
            name: name.into(),
            cidr,
            intra_zone_tunnels,
            created_unix: unix(now),
        };
        self.store
            .zones
            .insert(name, encode(&rec))
            .map_err(store_err)?;
        self.commit(pb::Delta {
            zones: vec![Self::zone_msg(&rec)],
            ..Default::default()
        })?;
        Ok(rec)
    }

    pub fn create_token(
        &self,
        zone: &str,
        ttl: Duration,
        uses: u32,
        now: SystemTime,
    ) -> Result<CreatedToken> {
        if self.store.zone(zone)?.is_none() {
            return Err(ControllerError::NotFound(format!(
                "zone {zone} does not exist (zone add {zone} --cidr ...)"
            )));
        }
        if uses == 0 || uses > 10_000 {
            return Err(ControllerError::BadRequest(
                "uses must be between 1 and 10000".into(),
            ));
        }
        if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(30 * 86_400) {
            return Err(ControllerError::BadRequest(
                "ttl must be between 1m and 30d".into(),
            ));
        }
        let mut raw = [0u8; 32];
        rand::fill(&mut raw);
        let token = format!(
            "zmt_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let rec = TokenRecord {
            zone: zone.into(),
            expires_unix: unix(now + ttl),
            uses_left: uses,
            created_unix: unix(now),
        };
        self.store
            .tokens
            .insert(hash_token(&token), encode(&rec))
            .map_err(store_err)?;
        self.store.flush()?;
        Ok(CreatedToken {
            token,
            zone: zone.into(),
            expires_unix: rec.expires_unix,
            uses,
        })
    }
}
