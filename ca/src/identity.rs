use crate::error::{Error, Result};
use base64::Engine;
use std::fmt;

/// Check a zone, node or trust-domain label: 1–63 of `a-z 0-9 -` (dots too for trust
/// domains), not starting or ending with `-` or `.`.
pub fn validate_label(kind: &str, s: &str, allow_dots: bool) -> Result<()> {
    let ok_char = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (allow_dots && c == '.')
    };
    let max = if allow_dots { 253 } else { 63 };
    if s.is_empty() || s.len() > max {
        return Err(Error::Name(format!(
            "{kind} must be 1 to {max} characters, got {}",
            s.len()
        )));
    }
    if !s.chars().all(ok_char) {
        return Err(Error::Name(format!(
            "{kind} {s:?} may only contain lowercase letters, digits{}and '-'",
            if allow_dots { ", '.' " } else { " " }
        )));
    }
    let edge = |c: char| c == '-' || c == '.';
    if s.starts_with(edge) || s.ends_with(edge) || s.contains("..") {
        return Err(Error::Name(format!(
            "{kind} {s:?} must not start or end with '-' or '.'"
        )));
    }
    Ok(())
}

/// A node's identity: `spiffe://<trust-domain>/zone/<zone>/node/<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub zone: String,
    pub node: String,
}

impl SpiffeId {
    /// Build an identity from validated labels.
    pub fn new(trust_domain: &str, zone: &str, node: &str) -> Result<Self> {
        validate_label("trust domain", trust_domain, true)?;
        validate_label("zone", zone, false)?;
        validate_label("node", node, false)?;
        Ok(Self {
            trust_domain: trust_domain.into(),
            zone: zone.into(),
            node: node.into(),
        })
    }

    /// Parse the URI form; anything but the exact zonemesh shape is refused.
    pub fn parse(uri: &str) -> Result<Self> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| Error::Name(format!("{uri:?} is not a spiffe:// URI")))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "zone", zone, "node", node] => Self::new(td, zone, node),
            _ => Err(Error::Name(format!(
                "{uri:?} is not spiffe://<trust-domain>/zone/<zone>/node/<node>"
            ))),
        }
    }

    /// The URI form placed in the certificate's SAN.
    pub fn uri(&self) -> String {
        format!(
            "spiffe://{}/zone/{}/node/{}",
            self.trust_domain, self.zone, self.node
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// A WireGuard (Curve25519) public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WireGuardKey(pub [u8; 32]);

impl WireGuardKey {
    /// Parse the standard base64 form used by `wg`.
    pub fn from_base64(s: &str) -> Result<Self> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| Error::WireGuardKey(format!("not base64: {e}")))?;
        Self::from_slice(&bytes)
    }

    /// Take exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::WireGuardKey(format!("must be 32 bytes, got {}", bytes.len())))?;
        if arr == [0u8; 32] {
            return Err(Error::WireGuardKey("all-zero key".into()));
        }
        Ok(Self(arr))
    }

    /// The standard base64 form.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl fmt::Debug for WireGuardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireGuardKey({})", self.to_base64())
    }
}

impl fmt::Display for WireGuardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_round_trip_and_rejections() {
        let id = SpiffeId::new("corp.example", "eu-1", "web-3").unwrap();
        assert_eq!(id.uri(), "spiffe://corp.example/zone/eu-1/node/web-3");
        assert_eq!(SpiffeId::parse(&id.uri()).unwrap(), id);
        for bad in [
            "https://corp.example/zone/a/node/b",
            "spiffe://corp.example/zone/a/node/b/extra",
            "spiffe://corp.example/zone/A/node/b",
            "spiffe://corp.example/zone/a/node/-b",
            "spiffe:///zone/a/node/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn wireguard_key_parsing() {
        let k = WireGuardKey([7u8; 32]);
        assert_eq!(WireGuardKey::from_base64(&k.to_base64()).unwrap(), k);
        assert!(WireGuardKey::from_base64("AAAA").is_err());
        assert!(WireGuardKey::from_base64("not base64!").is_err());
        assert!(WireGuardKey::from_slice(&[0u8; 32]).is_err());
    }
}
