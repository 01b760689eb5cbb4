//! Every CA certificate the controller has made, with its state, and the rotations that
//! add new ones. The authority keeps the records in the `ca` tree (`cert/<id>`), the keys
//! sealed with the KEK as before.
//!
//! - **active**: trusted; an active intermediate issues every new certificate (there is
//!   exactly one), an active root is the one new intermediates are made under.
//! - **retiring**: still trusted (chains through it verify, its CRL is signed and sent,
//!   its OCSP answered) but issues nothing. A retiring intermediate becomes retired once the
//!   last certificate issued before it stopped issuing has expired; a retiring root (and
//!   everything under it) once its grace period has passed.
//! - **retired**: no longer trusted anywhere.

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What a CA certificate is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaCertKind {
    Root,
    Intermediate,
    /// A newer root's subject and key, issued by an older root.
    CrossSigned,
}

impl CaCertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Intermediate => "intermediate",
            Self::CrossSigned => "cross-signed",
        }
    }
}

/// Where a CA certificate is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaCertState {
    Active,
    Retiring,
    Retired,
}

impl CaCertState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Retiring => "retiring",
            Self::Retired => "retired",
        }
    }

    /// Trusted by verifiers (active or retiring).
    pub fn trusted(self) -> bool {
        !matches!(self, Self::Retired)
    }
}

/// One stored CA certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaCertRecord {
    /// `root-N`, `int-N` or `cross-N` (N: the generation).
    pub id: String,
    pub kind: CaCertKind,
    pub generation: u32,
    pub der: Vec<u8>,
    /// The private key sealed with the KEK (roots and intermediates; empty for a
    /// cross-signature).
    #[serde(default)]
    pub key_sealed: Vec<u8>,
    /// The root above it: an intermediate's issuer, or the older root that cross-signed.
    #[serde(default)]
    pub issuer_id: String,
    pub state: CaCertState,
    /// When it entered its state.
    pub since_unix: u64,
    /// Retiring: when it becomes retired.
    #[serde(default)]
    pub retire_at_unix: u64,
    /// An active intermediate made by a rotation: nodes still on older intermediates renew
    /// onto it, each at its own point within this many seconds after `since_unix`.
    #[serde(default)]
    pub spread_secs: u64,
}

impl CaCertRecord {
    pub fn key(&self) -> String {
        format!("cert/{}", self.id)
    }
}

/// A CA certificate as `ca show` and the console list it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaCertView {
    pub id: String,
    pub kind: String,
    pub state: String,
    pub subject: String,
    pub issuer: String,
    pub sha256: String,
    pub not_before: String,
    pub not_after: String,
    pub key_bits: usize,
    /// Retiring: when it becomes retired (RFC 3339), else empty.
    pub retire_at: String,
}

impl CaCertView {
    pub fn of(r: &CaCertRecord) -> Self {
        let parsed = X509Certificate::from_der(&r.der).ok().map(|(_, c)| c);
        let (subject, issuer, not_before, not_after, key_bits) = match &parsed {
            Some(c) => (
                c.subject().to_string(),
                c.issuer().to_string(),
                rfc3339(c.validity().not_before.timestamp()),
                rfc3339(c.validity().not_after.timestamp()),
                c.public_key().parsed().map(|k| k.key_size()).unwrap_or(0),
            ),
            None => Default::default(),
        };
        Self {
            id: r.id.clone(),
            kind: r.kind.as_str().into(),
            state: r.state.as_str().into(),
            subject,
            issuer,
            sha256: zonemesh_ca::fingerprint_sha256(&r.der),
            not_before,
            not_after,
            key_bits,
            retire_at: if r.state == CaCertState::Retiring && r.retire_at_unix > 0 {
                rfc3339(r.retire_at_unix as i64)
            } else {
                String::new()
            },
        }
    }
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Default `--spread` of `ca rotate-intermediate`: nodes move onto the new intermediate
/// over 15 minutes. At 10,000 nodes that is about 11 renewals a second (one RSA-4096
/// signature each, a small part of one core); the old intermediate stays trusted for as
/// long as its certificates live anyway, so a longer window buys nothing but a slower
/// move.
pub const DEFAULT_SPREAD: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Default `--grace` of `ca rotate-root`: the old root stays trusted for 31 days, longer
/// than a node certificate lives (30 days), so even a node that was offline through the
/// whole spread renews before its old chain stops verifying.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(31 * 86_400);

/// Where in a spread of `spread_secs` the node `spiffe_id` renews (the agent's rule,
/// [`zonemesh_ca::spread_offset`]).
pub use zonemesh_ca::spread_offset;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_points_are_fixed_per_node_and_cover_the_window() {
        assert_eq!(spread_offset("spiffe://a/z/n", 0), 0);
        let a = spread_offset("spiffe://a/z/n1", 900);
        assert_eq!(a, spread_offset("spiffe://a/z/n1", 900));
        let points: Vec<u64> = (0..1000)
            .map(|i| spread_offset(&format!("spiffe://a/z/n{i}"), 900))
            .collect();
        assert!(points.iter().all(|p| *p < 900));
        // Roughly even: every tenth of the window gets between 5% and 15% of the nodes.
        for slot in 0..10 {
            let n = points.iter().filter(|p| **p / 90 == slot).count();
            assert!((50..150).contains(&n), "slot {slot}: {n}");
        }
    }

    #[test]
    fn records_round_trip_and_states_say_what_is_trusted() {
        let r = CaCertRecord {
            id: "int-2".into(),
            kind: CaCertKind::Intermediate,
            generation: 2,
            der: vec![1, 2],
            key_sealed: vec![3],
            issuer_id: "root-1".into(),
            state: CaCertState::Retiring,
            since_unix: 5,
            retire_at_unix: 9,
            spread_secs: 900,
        };
        let back: CaCertRecord = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back.id, "int-2");
        assert_eq!(back.kind, CaCertKind::Intermediate);
        assert_eq!(back.state, CaCertState::Retiring);
        assert_eq!(r.key(), "cert/int-2");
        assert!(CaCertState::Active.trusted() && CaCertState::Retiring.trusted());
        assert!(!CaCertState::Retired.trusted());
    }
}
