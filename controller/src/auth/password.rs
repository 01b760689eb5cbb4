//! Password rules (NIST SP 800-63B) and Argon2id hashing with salt, per-user seasoning and
//! an off-database pepper.
//!
//! The stored hash records its Argon2 cost and the pepper version it was made with, so the
//! cost can be raised and the pepper rotated: a successful verification against an older
//! pepper or a lower cost asks the caller to re-hash.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use argon2::{Algorithm, Argon2, AssociatedData, ParamsBuilder, Version};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::AuthError;

/// Shortest password a person may choose (NIST SP 800-63B 5.1.1.2).
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted. Far above NIST's 64; nothing is ever truncated below it.
pub const MAX_PASSWORD_CHARS: usize = 1024;
/// Environment variable that carries the pepper (`<version>:<base64>`).
pub const PEPPER_ENV: &str = "ZONEMESH_PEPPER";

const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;
const COMMON_PASSWORDS: &str = include_str!("../../assets/common-passwords.txt");

/// The secret mixed into every password hash; it lives outside the database (the
/// controller's secrets file or `ZONEMESH_PEPPER`). Its bytes never appear in `Debug`.
#[derive(Clone)]
pub struct Pepper {
    /// Recorded in every hash made with this pepper, so peppers can be rotated.
    pub version: u32,
    /// At least 32 bytes of secret.
    pub bytes: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pepper")
            .field("version", &self.version)
            .field("bytes", &"<redacted>")
            .finish()
    }
}

impl Pepper {
    /// A pepper of `version` from raw bytes (at least 32).
    pub fn new(version: u32, bytes: Vec<u8>) -> Result<Self, AuthError> {
        if bytes.len() < 32 {
            return Err(AuthError::Config(
                "the pepper must be at least 32 bytes".into(),
            ));
        }
        Ok(Self {
            version,
            bytes: Zeroizing::new(bytes),
        })
    }

    /// A fresh random 32-byte pepper.
    pub fn generate(version: u32) -> Self {
        let mut b = vec![0u8; 32];
        rand::fill(&mut b[..]);
        Self {
            version,
            bytes: Zeroizing::new(b),
        }
    }

    /// Parse `<version>:<base64 bytes>` (the form used in the env var and secrets file).
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let s = s.trim();
        let (v, b) = s
            .split_once(':')
            .ok_or_else(|| AuthError::Config("pepper must look like <version>:<base64>".into()))?;
        let version = v
            .trim()
            .parse::<u32>()
            .map_err(|e| AuthError::Config(format!("pepper version: {e}")))?;
        let bytes = B64
            .decode(b.trim())
            .map_err(|e| AuthError::Config(format!("pepper is not base64: {e}")))?;
        Self::new(version, bytes)
    }

    /// The `<version>:<base64>` encoding accepted by [`Pepper::parse`].
    pub fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{}:{}", self.version, B64.encode(&self.bytes[..])))
    }

    /// `ZONEMESH_PEPPER` if set, else the first line starting with `pepper=` in the
    /// secrets file at `path` (or, when no such line exists, the whole file).
    pub fn from_env_or_file(path: Option<&Path>) -> Result<Self, AuthError> {
        if let Ok(v) = std::env::var(PEPPER_ENV) {
            return Self::parse(&v);
        }
        let path = path.ok_or_else(|| {
            AuthError::Config(format!(
                "no pepper: set {PEPPER_ENV} or give a secrets file"
            ))
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| AuthError::Config(format!("pepper file {}: {e}", path.display())))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(AuthError::Config(format!(
                    "pepper file {} must not be readable by group or others (chmod 600)",
                    path.display()
                )));
            }
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| AuthError::Config(format!("reading {}: {e}", path.display())))?,
        );
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("pepper="))
            .unwrap_or(text.trim());
        Self::parse(line)
    }

    /// A key derived from the pepper for sealing TOTP secrets at rest.
    pub(crate) fn sealing_key(&self) -> zonemesh_ca::Kek {
        let mut h = Sha256::new();
        h.update(b"zonemesh/totp-seal/v1\0");
        h.update(&self.bytes[..]);
        let k = Zeroizing::new(h.finalize().to_vec());
        // 32 bytes from SHA-256 always make a valid key.
        zonemesh_ca::Kek::from_bytes(&k).expect("32-byte key")
    }
}

/// Argon2id cost. OWASP's minimum (m=19 MiB, t=2, p=1) is the default and the floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Cost {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes over memory.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for Argon2Cost {
    fn default() -> Self {
        Self {
            m_kib: 19_456,
            t: 2,
            p: 1,
        }
    }
}

impl Argon2Cost {
    /// Refuse anything below OWASP's minimum.
    pub fn validate(&self) -> Result<(), AuthError> {
        let min = Self::default();
        if self.m_kib < min.m_kib || self.t < min.t || self.p < min.p {
            return Err(AuthError::Config(format!(
                "argon2 cost m={} KiB t={} p={} is below the minimum m={} t={} p={}",
                self.m_kib, self.t, self.p, min.m_kib, min.t, min.p
            )));
        }
        if self.p > 64 || self.m_kib > 4 * 1024 * 1024 {
            return Err(AuthError::Config(
                "argon2 cost is unreasonably high (p <= 64, m <= 4 GiB)".into(),
            ));
        }
        Ok(())
    }

    fn weaker_than(&self, other: &Argon2Cost) -> bool {
        self.m_kib < other.m_kib || self.t < other.t || self.p < other.p
    }
}

/// A stored password hash. Contains no secret: the pepper is only referenced by version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash {
    /// Always `argon2id`.
    pub alg: String,
    /// Argon2 version (0x13).
    pub v: u32,
    pub m: u32,
    pub t: u32,
    pub p: u32,
    /// Which pepper was mixed in.
    pub pepper_version: u32,
    /// Random per-password salt, base64.
    pub salt: String,
    /// The 32-byte Argon2id output, base64.
    pub hash: String,
}

impl PasswordHash {
    fn cost(&self) -> Argon2Cost {
        Argon2Cost {
            m_kib: self.m,
            t: self.t,
            p: self.p,
        }
    }
}

/// What a verification found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// Wrong password (or a pepper that is no longer known).
    Mismatch,
    /// Right password, hash is current.
    Ok,
    /// Right password, but made with an older pepper or a lower cost: store a new hash.
    OkRehash,
}

/// Why a new password is refused, in words a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PasswordRejected {
    #[error("the password is too short: at least {MIN_PASSWORD_CHARS} characters are needed")]
    TooShort,
    #[error("the password is too long: at most {MAX_PASSWORD_CHARS} characters are accepted")]
    TooLong,
    #[error(
        "the password contains control characters; any printable character, space or Unicode letter is fine"
    )]
    ControlCharacter,
    #[error("the password is in a list of commonly used or breached passwords; choose another")]
    Common,
    #[error("the password must not be your e-mail address or its user part")]
    Contextual,
}

fn common_passwords() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        COMMON_PASSWORDS
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    })
}

/// Check a password a person chooses against NIST SP 800-63B: length counted in Unicode
/// characters, no composition rules, no truncation, refused when common or contextual.
pub fn check_new_password(email: &str, password: &str) -> Result<(), PasswordRejected> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(PasswordRejected::TooShort);
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(PasswordRejected::TooLong);
    }
    if password.chars().any(char::is_control) {
        return Err(PasswordRejected::ControlCharacter);
    }
    let lower = password.to_lowercase();
    if common_passwords().contains(lower.as_str()) {
        return Err(PasswordRejected::Common);
    }
    let email = normalize_email(email);
    let local = email.split('@').next().unwrap_or("");
    if lower == email || (!local.is_empty() && lower == local) {
        return Err(PasswordRejected::Contextual);
    }
    Ok(())
}

/// E-mail addresses compare case-insensitively and without surrounding space.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// The per-user seasoning: a hash of the e-mail address, bound into Argon2 as associated data.
fn seasoning(email: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"zonemesh/password-seasoning/v1\0");
    h.update(normalize_email(email).as_bytes());
    h.finalize().into()
}

/// Hashes and verifies passwords; bounds how many hashes run at once.
pub struct PasswordHasher {
    cost: Argon2Cost,
    pepper: Pepper,
    previous: Vec<Pepper>,
    permits: Arc<tokio::sync::Semaphore>,
    queue_timeout: Duration,
    dummy: OnceLock<PasswordHash>,
    /// Password verifications run through the bounded API.
    verifications: AtomicU64,
}

impl PasswordHasher {
    /// A hasher with `cost`, the current `pepper`, older peppers still accepted for
    /// verification, and at most `max_concurrent` hashes in flight through the async API.
    pub fn new(
        cost: Argon2Cost,
        pepper: Pepper,
        previous: Vec<Pepper>,
        max_concurrent: usize,
        queue_timeout: Duration,
    ) -> Self {
        Self {
            cost,
            pepper,
            previous,
            permits: Arc::new(tokio::sync::Semaphore::new(max_concurrent.max(1))),
            queue_timeout,
            dummy: OnceLock::new(),
            verifications: AtomicU64::new(0),
        }
    }

    /// The configured cost.
    pub fn cost(&self) -> Argon2Cost {
        self.cost
    }

    fn pepper_for(&self, version: u32) -> Option<&Pepper> {
        std::iter::once(&self.pepper)
            .chain(self.previous.iter())
            .find(|p| p.version == version)
    }

    fn raw(
        cost: Argon2Cost,
        pepper: &Pepper,
        email: &str,
        password: &[u8],
        salt: &[u8],
        out: &mut [u8],
    ) -> Result<(), AuthError> {
        let season = seasoning(email);
        let params = ParamsBuilder::new()
            .m_cost(cost.m_kib)
            .t_cost(cost.t)
            .p_cost(cost.p)
            .output_len(HASH_LEN)
            .data(AssociatedData::new(&season).map_err(AuthError::Hash)?)
            .build()
            .map_err(AuthError::Hash)?;
        let a2 =
            Argon2::new_with_secret(&pepper.bytes, Algorithm::Argon2id, Version::V0x13, params)
                .map_err(AuthError::Hash)?;
        a2.hash_password_into(password, salt, out)
            .map_err(AuthError::Hash)
    }

    /// Hash `password` for `email` with a fresh salt (blocking; runs one Argon2id).
    pub fn hash(&self, email: &str, password: &str) -> Result<PasswordHash, AuthError> {
        let mut salt = [0u8; SALT_LEN];
        rand::fill(&mut salt);
        let mut out = Zeroizing::new([0u8; HASH_LEN]);
        Self::raw(
            self.cost,
            &self.pepper,
            email,
            password.as_bytes(),
            &salt,
            &mut out[..],
        )?;
        Ok(PasswordHash {
            alg: "argon2id".into(),
            v: 0x13,
            m: self.cost.m_kib,
            t: self.cost.t,
            p: self.cost.p,
            pepper_version: self.pepper.version,
            salt: B64.encode(salt),
            hash: B64.encode(&out[..]),
        })
    }

    /// Verify `password` for `email` against `stored` (blocking; runs one Argon2id).
    pub fn verify(
        &self,
        email: &str,
        password: &str,
        stored: &PasswordHash,
    ) -> Result<Verified, AuthError> {
        let Some(pepper) = self.pepper_for(stored.pepper_version) else {
            // Spend the same work so an unknown pepper version is not a timing signal.
            let _ = self.verify(email, password, self.dummy());
            return Ok(Verified::Mismatch);
        };
        if stored.alg != "argon2id" || stored.v != 0x13 {
            return Err(AuthError::UnsupportedHash {
                alg: stored.alg.clone(),
                version: stored.v,
            });
        }
        let salt = B64
            .decode(&stored.salt)
            .map_err(|source| AuthError::StoredEncoding {
                what: "password salt",
                source,
            })?;
        let expected = B64
            .decode(&stored.hash)
            .map_err(|source| AuthError::StoredEncoding {
                what: "password hash",
                source,
            })?;
        let mut out = Zeroizing::new(vec![0u8; expected.len().max(4)]);
        Self::raw(
            stored.cost(),
            pepper,
            email,
            password.as_bytes(),
            &salt,
            &mut out[..],
        )?;
        if aws_lc_rs::constant_time::verify_slices_are_equal(&out, &expected).is_err() {
            return Ok(Verified::Mismatch);
        }
        if stored.pepper_version != self.pepper.version || stored.cost().weaker_than(&self.cost) {
            return Ok(Verified::OkRehash);
        }
        Ok(Verified::Ok)
    }

    /// A hash of a random password at the current cost: verifying against it costs exactly
    /// what a real verification costs, which hides whether an account exists.
    pub fn dummy(&self) -> &PasswordHash {
        self.dummy.get_or_init(|| {
            let mut pw = [0u8; 24];
            rand::fill(&mut pw);
            let pw = B64.encode(pw);
            self.hash("nobody@zonemesh.invalid", &pw)
                .expect("hashing a dummy password")
        })
    }

    async fn bounded<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let permit = tokio::time::timeout(self.queue_timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| AuthError::Busy)?
            .map_err(|_| AuthError::Busy)?;
        let me = Arc::clone(self);
        let r = crate::blocking::run_infallible(move || {
            let _permit = permit;
            f(&me)
        })
        .await?;
        Ok(r)
    }

    /// [`PasswordHasher::verify`] on the blocking pool, at most `max_concurrent` at a time.
    pub async fn verify_bounded(
        self: &Arc<Self>,
        email: String,
        password: Zeroizing<String>,
        stored: PasswordHash,
    ) -> Result<Verified, AuthError> {
        self.bounded(move |h| {
            h.verifications.fetch_add(1, Ordering::Relaxed);
            h.verify(&email, &password, &stored)
        })
        .await?
    }

    /// [`PasswordHasher::hash`] on the blocking pool, at most `max_concurrent` at a time.
    pub async fn hash_bounded(
        self: &Arc<Self>,
        email: String,
        password: Zeroizing<String>,
    ) -> Result<PasswordHash, AuthError> {
        self.bounded(move |h| h.hash(&email, &password)).await?
    }

    /// Password verifications run so far through [`PasswordHasher::verify_bounded`].
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// Hash permits currently free (for metrics).
    pub fn free_permits(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher(pepper: Pepper) -> PasswordHasher {
        PasswordHasher::new(
            Argon2Cost::default(),
            pepper,
            vec![],
            2,
            Duration::from_secs(5),
        )
    }

    #[test]
    fn rules() {
        assert_eq!(
            check_new_password("a@b.example", "1234567"),
            Err(PasswordRejected::TooShort)
        );
        assert_eq!(
            check_new_password("a@b.example", "password"),
            Err(PasswordRejected::Common)
        );
        assert_eq!(
            check_new_password("a@b.example", "Password1"),
            Err(PasswordRejected::Common)
        );
        assert_eq!(
            check_new_password("alice@b.example", "Alice@B.example"),
            Err(PasswordRejected::Contextual)
        );
        assert_eq!(
            check_new_password("a@b.example", "abc\u{7}defgh"),
            Err(PasswordRejected::ControlCharacter)
        );
        assert!(check_new_password("a@b.example", "correct horse battery staple").is_ok());
        // Eight Unicode characters are eight characters, whatever their UTF-8 length.
        assert!(check_new_password("a@b.example", "ñøß€漢字かな").is_ok());
        assert!(check_new_password("a@b.example", &"x y ".repeat(256)).is_ok());
        assert_eq!(
            check_new_password("a@b.example", &"x".repeat(1025)),
            Err(PasswordRejected::TooLong)
        );
        assert!(common_passwords().len() >= 10_000);
    }

    #[test]
    fn hash_verify_pepper_and_seasoning() {
        let pepper = Pepper::generate(1);
        let h = hasher(pepper.clone());
        let rec = h
            .hash("Alice@Example.com", "correct horse battery staple")
            .unwrap();
        assert_eq!((rec.m, rec.t, rec.p, rec.pepper_version), (19_456, 2, 1, 1));
        assert_eq!(
            h.verify("alice@example.com", "correct horse battery staple", &rec)
                .unwrap(),
            Verified::Ok
        );
        assert_eq!(
            h.verify("alice@example.com", "correct horse battery stapl", &rec)
                .unwrap(),
            Verified::Mismatch
        );
        // The seasoning binds the hash to the account.
        assert_eq!(
            h.verify("bob@example.com", "correct horse battery staple", &rec)
                .unwrap(),
            Verified::Mismatch
        );
        // Another pepper with the same version verifies nothing.
        let other = hasher(Pepper::new(1, vec![7u8; 32]).unwrap());
        assert_eq!(
            other
                .verify("alice@example.com", "correct horse battery staple", &rec)
                .unwrap(),
            Verified::Mismatch
        );
        // Rotation: the old pepper still verifies and asks for a re-hash.
        let rotated = PasswordHasher::new(
            Argon2Cost::default(),
            Pepper::generate(2),
            vec![pepper],
            1,
            Duration::from_secs(5),
        );
        assert_eq!(
            rotated
                .verify("alice@example.com", "correct horse battery staple", &rec)
                .unwrap(),
            Verified::OkRehash
        );
    }

    #[test]
    fn pepper_from_secrets_file() {
        if std::env::var_os(PEPPER_ENV).is_some() {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pepper");
        let p = Pepper::generate(4);
        std::fs::write(&f, format!("# zonemesh secrets\npepper={}\n", &*p.encode())).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            Pepper::from_env_or_file(Some(&f)).is_err(),
            "world-readable pepper refused"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let back = Pepper::from_env_or_file(Some(&f)).unwrap();
        assert_eq!((back.version, &back.bytes[..]), (4, &p.bytes[..]));
        std::fs::write(&f, &*p.encode()).unwrap();
        assert_eq!(Pepper::from_env_or_file(Some(&f)).unwrap().version, 4);
        assert!(Pepper::from_env_or_file(None).is_err());
    }

    #[test]
    fn cost_floor_and_pepper_parsing() {
        assert!(
            Argon2Cost {
                m_kib: 19_455,
                t: 2,
                p: 1
            }
            .validate()
            .is_err()
        );
        assert!(
            Argon2Cost {
                m_kib: 19_456,
                t: 1,
                p: 1
            }
            .validate()
            .is_err()
        );
        assert!(
            Argon2Cost {
                m_kib: 65_536,
                t: 3,
                p: 2
            }
            .validate()
            .is_ok()
        );
        let p = Pepper::generate(3);
        let back = Pepper::parse(&p.encode()).unwrap();
        assert_eq!(back.version, 3);
        assert_eq!(&back.bytes[..], &p.bytes[..]);
        assert!(Pepper::parse("1:c2hvcnQ=").is_err());
        assert!(!format!("{p:?}").contains(&B64.encode(&p.bytes[..])));
    }
}
