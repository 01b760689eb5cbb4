//! Zones and enrollment tokens, created by the operator.

use super::{Mesh, hash_token, store_err};
use crate::error::{ControllerError, Result};
use crate::store::{TokenRecord, Txn, ZoneRecord, decode, encode, unix};
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
            spent_unix: 0,
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

    /// Remove tokens that were used up or expired more than [`TOKEN_PURGE_GRACE`] ago
    /// (until then `token list --all` still shows them). Leader-only work; each removal
    /// is checked against the record read, so a token used meanwhile is left alone.
    /// Returns how many were removed. Blocking (the store).
    pub fn purge_tokens(&self, now: SystemTime) -> Result<usize> {
        let cutoff = unix(now).saturating_sub(TOKEN_PURGE_GRACE.as_secs());
        let mut purged = 0;
        let mut txn = Txn::new();
        let flush = |txn: &mut Txn, purged: &mut usize| -> Result<()> {
            if txn.is_empty() {
                return Ok(());
            }
            let n = txn.ops.len();
            if self.store.kv().commit(txn).map_err(store_err)? {
                *purged += n;
            }
            *txn = Txn::new();
            Ok(())
        };
        for item in self.store.tokens.iter() {
            let (k, v) = item.map_err(store_err)?;
            let rec: TokenRecord = decode("tokens", &v)?;
            if rec.ended_unix(unix(now)).is_some_and(|end| end <= cutoff) {
                txn.expect("tokens", &k, Some(&v)).delete("tokens", &k);
                if txn.ops.len() >= TOKENS_PURGED_PER_TXN {
                    flush(&mut txn, &mut purged)?;
                }
            }
        }
        flush(&mut txn, &mut purged)?;
        if purged > 0 {
            self.store.flush()?;
            tracing::info!(
                tokens = purged,
                "purged used-up and expired enrollment tokens"
            );
        }
        Ok(purged)
    }
}

/// How long a used-up or expired token stays in the store (and in `token list --all`).
pub const TOKEN_PURGE_GRACE: Duration = Duration::from_secs(7 * 86_400);
/// Tokens removed per transaction (a check and a delete each).
const TOKENS_PURGED_PER_TXN: usize = 60;
