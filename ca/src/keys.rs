use crate::error::{Error, Result};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rcgen::{KeyPair, PKCS_RSA_SHA256, RsaKeySize};
use zeroize::{Zeroize, Zeroizing};

/// Generate an RSA-4096 key for SHA-256 signatures (CA and node keys).
pub fn generate_rsa_4096() -> Result<KeyPair> {
    Ok(KeyPair::generate_rsa_for(
        &PKCS_RSA_SHA256,
        RsaKeySize::_4096,
    )?)
}

/// Generate an RSA-2048 key for SHA-256 signatures (short-lived TLS leaves).
pub fn generate_rsa_2048() -> Result<KeyPair> {
    Ok(KeyPair::generate_rsa_for(
        &PKCS_RSA_SHA256,
        RsaKeySize::_2048,
    )?)
}

/// The key-encryption key that protects CA private keys at rest. It lives outside the
/// database (a secrets file or an environment variable) and is wiped from memory on drop.
pub struct Kek([u8; 32]);

impl Kek {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::fill(&mut k);
        Self(k)
    }

    /// Wrap exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::BadInput(format!(
                "key-encryption key must be 32 bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(Self(arr))
    }

    /// The raw bytes, for writing the secrets file.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for Kek {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

const SEAL_VERSION: u8 = 1;

/// Encrypt `plaintext` with AES-256-GCM under the KEK. `label` is authenticated, so a
/// sealed root key cannot be swapped in where the intermediate key is expected.
pub fn seal(kek: &Kek, label: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek.0)?);
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(label.as_bytes()),
        &mut buf,
    )?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
    out.push(SEAL_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    buf.zeroize();
    Ok(out)
}

/// Decrypt what [`seal`] produced with the same KEK and label.
pub fn open_sealed(kek: &Kek, label: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != SEAL_VERSION {
        return Err(Error::Unseal);
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek.0)?);
    let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN]
        .try_into()
        .map_err(|_| Error::Unseal)?;
    let mut buf = Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(label.as_bytes()),
            &mut buf,
        )
        .map_err(|_| Error::Unseal)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper() {
        let kek = Kek::generate();
        let sealed = seal(&kek, "root", b"secret key bytes").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            &*open_sealed(&kek, "root", &sealed).unwrap(),
            b"secret key bytes"
        );
        assert!(matches!(
            open_sealed(&kek, "intermediate", &sealed),
            Err(Error::Unseal)
        ));
        assert!(matches!(
            open_sealed(&Kek::generate(), "root", &sealed),
            Err(Error::Unseal)
        ));
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            open_sealed(&kek, "root", &bad),
            Err(Error::Unseal)
        ));
    }
}
