//! The user store: accounts in the sled tree `auth_users`, keyed by normalised e-mail.
//!
//! A record holds the Argon2id hash (no secret), the TOTP secret sealed with a key derived
//! from the pepper (so it is never in the database in the clear), the last accepted TOTP
//! step, and the hashes of unused recovery codes.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::password::{
    PasswordHash, PasswordHasher, Pepper, Verified, check_new_password, normalize_email,
};
use super::{AuthError, Role, WebConfig, totp};
use crate::durable::Flusher;

/// Name of the sled tree holding users.
pub const USERS_TREE: &str = "auth_users";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TotpState {
    /// The secret, sealed (AES-256-GCM) with the pepper-derived key, base64.
    sealed: String,
    pepper_version: u32,
    confirmed: bool,
    /// The last accepted step; a code for this step or an earlier one is refused.
    last_step: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct UserRecord {
    email: String,
    role: Role,
    password: PasswordHash,
    disabled: bool,
    created_ms: u64,
    totp: Option<TotpState>,
    /// Salted SHA-256 hashes of the unused recovery codes (`totp::hash_recovery_code`;
    /// records from before salts hold unsalted hex, still accepted).
    recovery: Vec<String>,
    /// Set by a TOTP reset: the next sign-in enrolls a new authenticator before any
    /// session, whatever the role; cleared by the confirmed enrollment.
    #[serde(default)]
    enroll_required: bool,
}

/// What `add_user` hands back to the operator.
pub struct UserAdded {
    pub email: String,
    pub role: Role,
    /// For admins: the `otpauth://` URI to enroll an authenticator (contains the secret:
    /// show it to the operator once, never log it).
    pub otpauth_uri: Option<Zeroizing<String>>,
    /// For admins: the same URI as a QR code for a terminal.
    pub qr_terminal: Option<String>,
}

impl fmt::Debug for UserAdded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserAdded")
            .field("email", &self.email)
            .field("role", &self.role)
            .field("otpauth_uri", &"<redacted>")
            .finish()
    }
}

/// A user as `user list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSummary {
    pub email: String,
    pub role: Role,
    pub disabled: bool,
    /// TOTP enrolled and confirmed with a first code.
    pub totp_confirmed: bool,
    pub recovery_codes_left: usize,
    pub created_unix_ms: u64,
}

/// What the second step of a sign-in must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondFactor {
    /// No second factor enrolled (portal owners only).
    None,
    /// A TOTP or recovery code.
    Totp,
    /// An admin without a confirmed TOTP: enrollment first, no session before it.
    EnrollRequired,
}

/// The result of a password check. Callers must answer `Unknown`, `Mismatch` and
/// `Disabled` identically; the distinction is for the audit log only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordCheck {
    Unknown,
    Mismatch,
    Disabled,
    Ok {
        role: Role,
        second_factor: SecondFactor,
    },
}

/// A TOTP enrollment in progress, for the enrollment page.
pub struct TotpEnrollment {
    pub otpauth_uri: Zeroizing<String>,
    pub secret_base32: Zeroizing<String>,
    pub qr_svg: String,
}

impl fmt::Debug for TotpEnrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TotpEnrollment(<redacted>)")
    }
}

fn now_ms(t: SystemTime) -> u64 {
    zonemesh_ca::unix_millis(t)
}

fn unix_secs(t: SystemTime) -> u64 {
    zonemesh_ca::unix_secs(t)
}

/// Check an e-mail address well enough to be an account name and an otpauth label.
fn validate_email(email: &str) -> Result<String, AuthError> {
    let e = normalize_email(email);
    let bad = || AuthError::InvalidEmail(email.chars().take(80).collect());
    let (local, domain) = e.split_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.is_empty()
        || domain.contains('@')
        || e.len() > 254
        || e.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ':')
    {
        return Err(bad());
    }
    Ok(e)
}

/// Users over sled.
pub struct UserStore {
    tree: crate::core::kv::Tree,
    flusher: Flusher,
    hasher: Arc<PasswordHasher>,
    pepper: Pepper,
    previous: Vec<Pepper>,
    issuer: String,
}

impl UserStore {
    /// Open the user tree of `db` with `cfg` (validated here).
    pub fn open(db: &crate::core::kv::Kv, cfg: &WebConfig) -> Result<Self, AuthError> {
        Self::open_with(db.flusher(), cfg)
    }

    /// Open the user tree of the flusher's database with `cfg` (validated here); writes
    /// are made durable through `flusher`, shared with the other writers of that database.
    pub fn open_with(flusher: &Flusher, cfg: &WebConfig) -> Result<Self, AuthError> {
        cfg.validate()?;
        let hasher = Arc::new(PasswordHasher::new(
            cfg.argon2,
            cfg.pepper.clone(),
            cfg.previous_peppers.clone(),
            cfg.max_concurrent_hashes,
            cfg.hash_queue_timeout,
        ));
        Ok(Self {
            tree: flusher.kv().open_tree(USERS_TREE)?,
            flusher: flusher.clone(),
            hasher,
            pepper: cfg.pepper.clone(),
            previous: cfg.previous_peppers.clone(),
            issuer: cfg.totp_issuer.clone(),
        })
    }

    /// The password hasher (shared with the sign-in path).
    pub fn hasher(&self) -> &Arc<PasswordHasher> {
        &self.hasher
    }

    fn load(&self, email: &str) -> Result<Option<UserRecord>, AuthError> {
        load_in(&self.tree, email)
    }

    /// Read-modify-write of one record with compare-and-swap, flushed before returning.
    /// `f` returns `None` to leave the record unchanged.
    fn modify<T>(
        &self,
        email: &str,
        f: impl FnMut(&mut UserRecord) -> Result<Option<T>, AuthError>,
    ) -> Result<Option<T>, AuthError> {
        modify_in(&self.tree, &self.flusher, email, f)
    }

    fn seal_label(email: &str) -> String {
        format!("zonemesh/totp/{email}")
    }

    fn seal_secret(&self, email: &str, secret: &[u8]) -> Result<TotpState, AuthError> {
        let sealed =
            zonemesh_ca::seal(&self.pepper.sealing_key(), &Self::seal_label(email), secret)?;
        Ok(TotpState {
            sealed: B64.encode(sealed),
            pepper_version: self.pepper.version,
            confirmed: false,
            last_step: None,
        })
    }

    /// After a pepper rotation, move a secret sealed under an older pepper to the current one.
    fn reseal_if_old(
        &self,
        email: &str,
        st: &mut TotpState,
        secret: &[u8],
    ) -> Result<(), AuthError> {
        if st.pepper_version != self.pepper.version {
            let fresh = self.seal_secret(email, secret)?;
            st.sealed = fresh.sealed;
            st.pepper_version = fresh.pepper_version;
        }
        Ok(())
    }

    fn open_secret(&self, email: &str, st: &TotpState) -> Result<Zeroizing<Vec<u8>>, AuthError> {
        let pepper = std::iter::once(&self.pepper)
            .chain(self.previous.iter())
            .find(|p| p.version == st.pepper_version)
            .ok_or_else(|| {
                AuthError::Config(format!(
                    "TOTP secret sealed with unknown pepper version {}",
                    st.pepper_version
                ))
            })?;
        let sealed = B64
            .decode(&st.sealed)
            .map_err(|source| AuthError::StoredEncoding {
                what: "TOTP secret",
                source,
            })?;
        Ok(zonemesh_ca::open_sealed(
            &pepper.sealing_key(),
            &Self::seal_label(email),
            &sealed,
        )?)
    }

    fn enrollment_for(&self, email: &str, secret: &[u8]) -> Result<TotpEnrollment, AuthError> {
        let uri = totp::otpauth_uri(secret, &self.issuer, email)?;
        Ok(TotpEnrollment {
            qr_svg: totp::qr_svg(&uri)?,
            secret_base32: totp::secret_base32(secret),
            otpauth_uri: uri,
        })
    }

    /// Add a user (blocking: runs one Argon2id). Admins get a TOTP secret at once; it must
    /// still be confirmed with a first code on the enrollment page before they can sign in.
    pub fn add_user(
        &self,
        email: &str,
        role: Role,
        password: &str,
    ) -> Result<UserAdded, AuthError> {
        self.add_user_at(email, role, password, SystemTime::now())
    }

    /// [`UserStore::add_user`] with the time given.
    fn add_user_at(
        &self,
        email: &str,
        role: Role,
        password: &str,
        now: SystemTime,
    ) -> Result<UserAdded, AuthError> {
        let email = validate_email(email)?;
        check_new_password(&email, password)?;
        if self.tree.contains_key(email.as_bytes())? {
            return Err(AuthError::UserExists(email));
        }
        let hash = self.hasher.hash(&email, password)?;
        let (totp_state, uri, qr) = if role == Role::Admin {
            let secret = totp::generate_secret();
            let uri = totp::otpauth_uri(&secret, &self.issuer, &email)?;
            let qr = totp::qr_terminal(&uri)?;
            (
                Some(self.seal_secret(&email, &secret)?),
                Some(uri),
                Some(qr),
            )
        } else {
            (None, None, None)
        };
        let rec = UserRecord {
            email: email.clone(),
            role,
            password: hash,
            disabled: false,
            created_ms: now_ms(now),
            totp: totp_state,
            recovery: vec![],
            enroll_required: false,
        };
        let swapped = self.tree.compare_and_swap(
            email.as_bytes(),
            None as Option<&[u8]>,
            Some(serde_json::to_vec(&rec)?),
        )?;
        if swapped.is_err() {
            return Err(AuthError::UserExists(email));
        }
        self.flusher.flush_blocking()?;
        Ok(UserAdded {
            email,
            role,
            otpauth_uri: uri,
            qr_terminal: qr,
        })
    }

    /// All users, sorted by e-mail.
    pub fn list_users(&self) -> Result<Vec<UserSummary>, AuthError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (_, v) = item?;
            let r: UserRecord = serde_json::from_slice(&v)?;
            out.push(UserSummary {
                email: r.email,
                role: r.role,
                disabled: r.disabled,
                totp_confirmed: r.totp.as_ref().is_some_and(|t| t.confirmed),
                recovery_codes_left: r.recovery.len(),
                created_unix_ms: r.created_ms,
            });
        }
        Ok(out)
    }

    /// Disable a user: every later sign-in fails exactly like a wrong password. The caller
    /// also ends the user's sessions (`SessionStore::remove_for_user`); sessions of a
    /// disabled user are refused on every request anyway.
    pub fn disable_user(&self, email: &str) -> Result<(), AuthError> {
        let email = normalize_email(email);
        self.modify(&email, |r| {
            r.disabled = true;
            Ok(Some(()))
        })?;
        Ok(())
    }

    /// Forget the user's authenticator (TOTP secret) and recovery codes: the next sign-in
    /// sets up a new one before any session, for a portal owner too. The caller also ends
    /// the user's sessions.
    pub fn reset_totp(&self, email: &str) -> Result<(), AuthError> {
        let email = normalize_email(email);
        self.modify(&email, |r| {
            r.totp = None;
            r.recovery.clear();
            r.enroll_required = true;
            Ok(Some(()))
        })?;
        Ok(())
    }

    /// Set a new password (blocking), after the same checks as at creation.
    pub fn set_password(&self, email: &str, password: &str) -> Result<(), AuthError> {
        let email = normalize_email(email);
        check_new_password(&email, password)?;
        let hash = self.hasher.hash(&email, password)?;
        self.modify(&email, |r| {
            r.password = hash.clone();
            Ok(Some(()))
        })?;
        Ok(())
    }

    /// [`UserStore::set_password`] with the hash on the bounded hashing pool and the write
    /// on the blocking pool.
    pub async fn set_password_bounded(
        self: &Arc<Self>,
        email: &str,
        password: Zeroizing<String>,
    ) -> Result<(), AuthError> {
        let email = normalize_email(email);
        check_new_password(&email, &password)?;
        let hash = self.hasher.hash_bounded(email.clone(), password).await?;
        let me = Arc::clone(self);
        crate::blocking::run(move || {
            me.modify(&email, |r| {
                r.password = hash.clone();
                Ok(Some(()))
            })
            .map(|_| ())
        })
        .await
    }

    /// Whether `email` is an enabled user, and with which role.
    pub fn active_role(&self, email: &str) -> Result<Option<Role>, AuthError> {
        Ok(self
            .load(&normalize_email(email))?
            .filter(|r| !r.disabled)
            .map(|r| r.role))
    }

    /// Check a password with bounded concurrency. Unknown accounts cost one Argon2id run
    /// against a dummy hash, like a real check.
    pub async fn check_password(
        &self,
        email: &str,
        password: Zeroizing<String>,
    ) -> Result<PasswordCheck, AuthError> {
        let email = normalize_email(email);
        // The record is read (and a rehash written) on the blocking pool: a store call
        // may wait on the disk or the network.
        let rec = {
            let (tree, email) = (self.tree.clone(), email.clone());
            crate::blocking::run(move || load_in(&tree, &email)).await?
        };
        let Some(rec) = rec else {
            let dummy = self.hasher.dummy().clone();
            self.hasher.verify_bounded(email, password, dummy).await?;
            return Ok(PasswordCheck::Unknown);
        };
        let verified = self
            .hasher
            .verify_bounded(email.clone(), password.clone(), rec.password.clone())
            .await?;
        if verified == Verified::Mismatch {
            return Ok(PasswordCheck::Mismatch);
        }
        if rec.disabled {
            return Ok(PasswordCheck::Disabled);
        }
        if verified == Verified::OkRehash {
            // Upgrade to the current pepper and cost while we hold the password.
            let new = self.hasher.hash_bounded(email.clone(), password).await?;
            let (tree, flusher, email) = (self.tree.clone(), self.flusher.clone(), email.clone());
            crate::blocking::run(move || {
                modify_in(&tree, &flusher, &email, |r| {
                    r.password = new.clone();
                    Ok(Some(()))
                })
            })
            .await?;
        }
        let confirmed = rec.totp.as_ref().is_some_and(|t| t.confirmed);
        let second_factor = match (rec.role, confirmed) {
            (_, true) => SecondFactor::Totp,
            (Role::Admin, false) => SecondFactor::EnrollRequired,
            (Role::PortalOwner, false) if rec.enroll_required => SecondFactor::EnrollRequired,
            (Role::PortalOwner, false) => SecondFactor::None,
        };
        Ok(PasswordCheck::Ok {
            role: rec.role,
            second_factor,
        })
    }

    /// The pending TOTP enrollment of `email`, created when there is none. Refused once a
    /// TOTP is confirmed (re-enrollment is an operator action).
    pub fn totp_enrollment(&self, email: &str) -> Result<TotpEnrollment, AuthError> {
        let email = normalize_email(email);
        let rec = self
            .load(&email)?
            .ok_or_else(|| AuthError::NoSuchUser(email.clone()))?;
        match &rec.totp {
            Some(t) if t.confirmed => Err(AuthError::TotpAlreadyEnrolled),
            Some(t) => self.enrollment_for(&email, &self.open_secret(&email, t)?),
            None => {
                let secret = totp::generate_secret();
                let st = self.seal_secret(&email, &secret)?;
                self.modify(&email, |r| {
                    if r.totp.is_none() {
                        r.totp = Some(st.clone());
                        Ok(Some(()))
                    } else {
                        Ok(None)
                    }
                })?;
                // Another request may have won the race: show what is stored.
                self.totp_enrollment(&email)
            }
        }
    }

    /// Confirm the pending enrollment with a first code. On success returns fresh recovery
    /// codes (shown once; only their hashes are kept).
    pub fn confirm_totp(
        &self,
        email: &str,
        code: &str,
        now: SystemTime,
    ) -> Result<Option<Vec<Zeroizing<String>>>, AuthError> {
        let email = normalize_email(email);
        let codes = totp::generate_recovery_codes();
        let hashes: Vec<String> = codes
            .iter()
            .map(|c| totp::hash_recovery_code(&email, c))
            .collect();
        let ok = self.modify(&email, |r| {
            let Some(st) = r.totp.as_mut() else {
                return Ok(None);
            };
            if st.confirmed {
                return Ok(None);
            }
            let secret = self.open_secret(&email, st)?;
            let Some(step) = totp::check_code(&secret, code, unix_secs(now), st.last_step) else {
                return Ok(None);
            };
            st.confirmed = true;
            st.last_step = Some(step);
            self.reseal_if_old(&email, st, &secret)?;
            r.recovery = hashes.clone();
            r.enroll_required = false;
            Ok(Some(()))
        })?;
        Ok(ok.map(|_| codes))
    }

    /// Check a TOTP code (each accepted once) or consume a recovery code.
    pub fn verify_second_factor(
        &self,
        email: &str,
        code: &str,
        now: SystemTime,
    ) -> Result<bool, AuthError> {
        let email = normalize_email(email);
        let code = code.trim();
        let is_totp = code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit());
        let ok = self.modify(&email, |r| {
            if r.disabled {
                return Ok(None);
            }
            if is_totp {
                let Some(st) = r.totp.as_mut().filter(|t| t.confirmed) else {
                    return Ok(None);
                };
                let secret = self.open_secret(&email, st)?;
                let Some(step) = totp::check_code(&secret, code, unix_secs(now), st.last_step)
                else {
                    return Ok(None);
                };
                st.last_step = Some(step);
                self.reseal_if_old(&email, st, &secret)?;
                Ok(Some(()))
            } else {
                // Every stored code is checked, so the time does not tell which one matched.
                let matched: Vec<bool> = r
                    .recovery
                    .iter()
                    .map(|x| totp::recovery_code_matches(&email, code, x))
                    .collect();
                let Some(i) = matched.iter().position(|m| *m) else {
                    return Ok(None);
                };
                r.recovery.remove(i);
                Ok(Some(()))
            }
        });
        match ok {
            Ok(v) => Ok(v.is_some()),
            Err(AuthError::NoSuchUser(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// How long until `until`, for messages.
    pub fn remaining(until: SystemTime, now: SystemTime) -> Duration {
        until.duration_since(now).unwrap_or_default()
    }
}

/// One user record as stored.
fn load_in(tree: &crate::core::kv::Tree, email: &str) -> Result<Option<UserRecord>, AuthError> {
    match tree.get(email.as_bytes())? {
        Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
        None => Ok(None),
    }
}

/// [`UserStore::modify`] over the tree and its flusher (for the blocking pool).
fn modify_in<T>(
    tree: &crate::core::kv::Tree,
    flusher: &Flusher,
    email: &str,
    mut f: impl FnMut(&mut UserRecord) -> Result<Option<T>, AuthError>,
) -> Result<Option<T>, AuthError> {
    loop {
        let Some(old) = tree.get(email.as_bytes())? else {
            return Err(AuthError::NoSuchUser(email.to_string()));
        };
        let mut rec: UserRecord = serde_json::from_slice(&old)?;
        let Some(out) = f(&mut rec)? else {
            return Ok(None);
        };
        let new = serde_json::to_vec(&rec)?;
        if tree
            .compare_and_swap(email.as_bytes(), Some(&old), Some(new))?
            .is_ok()
        {
            flusher.flush_blocking()?;
            return Ok(Some(out));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path, pepper: Pepper) -> UserStore {
        let db = crate::core::kv::Kv::sled(dir).unwrap();
        let mut cfg = WebConfig::new(pepper);
        cfg.max_concurrent_hashes = 2;
        UserStore::open(&db, &cfg).unwrap()
    }

    #[tokio::test]
    async fn admin_flow_and_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Pepper::generate(1));
        let added = s
            .add_user("Root@Example.com", Role::Admin, "a long enough passphrase")
            .unwrap();
        assert_eq!(added.email, "root@example.com");
        let uri = added.otpauth_uri.unwrap();
        assert!(uri.starts_with("otpauth://totp/"));
        assert!(matches!(
            s.add_user("root@example.com", Role::Admin, "another passphrase 2"),
            Err(AuthError::UserExists(_))
        ));
        assert!(matches!(
            s.add_user("x@example.com", Role::Admin, "short"),
            Err(AuthError::WeakPassword(_))
        ));

        let pw = |p: &str| Zeroizing::new(p.to_string());
        assert_eq!(
            s.check_password("root@example.com", pw("a long enough passphrase"))
                .await
                .unwrap(),
            PasswordCheck::Ok {
                role: Role::Admin,
                second_factor: SecondFactor::EnrollRequired
            }
        );
        assert_eq!(
            s.check_password("root@example.com", pw("a long enough passphrasE"))
                .await
                .unwrap(),
            PasswordCheck::Mismatch
        );
        assert_eq!(
            s.check_password("nobody@example.com", pw("a long enough passphrase"))
                .await
                .unwrap(),
            PasswordCheck::Unknown
        );

        let enr = s.totp_enrollment("root@example.com").unwrap();
        assert_eq!(
            &*enr.otpauth_uri, &*uri,
            "the enrollment page shows the secret the CLI printed"
        );
        let secret = totp_rs::Secret::try_from_base32(&*enr.secret_base32).unwrap();
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let code = totp::code_at(&secret, 1_700_000_000);
        let stale = totp::code_at(&secret, 1_700_000_000 - 90);
        assert!(
            stale == code
                || s.confirm_totp("root@example.com", &stale, now)
                    .unwrap()
                    .is_none()
        );
        let recovery = s
            .confirm_totp("root@example.com", &code, now)
            .unwrap()
            .expect("confirmed");
        assert_eq!(recovery.len(), totp::RECOVERY_CODES);
        // The confirming code was used: it does not sign in again.
        assert!(
            !s.verify_second_factor("root@example.com", &code, now)
                .unwrap()
        );
        let next = totp::code_at(&secret, 1_700_000_030);
        assert!(
            s.verify_second_factor("root@example.com", &next, now + Duration::from_secs(30))
                .unwrap()
        );
        assert!(
            s.verify_second_factor("root@example.com", &recovery[0], now)
                .unwrap()
        );
        assert!(
            !s.verify_second_factor("root@example.com", &recovery[0], now)
                .unwrap(),
            "recovery codes are single use"
        );
        assert_eq!(
            s.list_users().unwrap()[0].recovery_codes_left,
            totp::RECOVERY_CODES - 1
        );

        s.disable_user("root@example.com").unwrap();
        assert_eq!(
            s.check_password("root@example.com", pw("a long enough passphrase"))
                .await
                .unwrap(),
            PasswordCheck::Disabled
        );
        assert!(s.list_users().unwrap()[0].disabled);
    }

    #[tokio::test]
    async fn a_totp_reset_forces_a_new_enrollment_at_the_next_sign_in() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Pepper::generate(1));
        let pass = "a long enough passphrase";
        s.add_user("owner@example.com", Role::PortalOwner, pass)
            .unwrap();
        let enr = s.totp_enrollment("owner@example.com").unwrap();
        let old = totp_rs::Secret::try_from_base32(&*enr.secret_base32).unwrap();
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        s.confirm_totp(
            "owner@example.com",
            &totp::code_at(&old, 1_700_000_000),
            now,
        )
        .unwrap()
        .expect("confirmed");
        async fn second(s: &UserStore, pass: &str) -> SecondFactor {
            let pw = Zeroizing::new(pass.to_string());
            match s.check_password("owner@example.com", pw).await.unwrap() {
                PasswordCheck::Ok { second_factor, .. } => second_factor,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(second(&s, pass).await, SecondFactor::Totp);

        s.reset_totp("Owner@Example.com").unwrap();
        let u = &s.list_users().unwrap()[0];
        assert!(!u.totp_confirmed && u.recovery_codes_left == 0);
        // A portal owner may go without a second factor, but not after a reset.
        assert_eq!(second(&s, pass).await, SecondFactor::EnrollRequired);
        let later = now + Duration::from_secs(60);
        assert!(
            !s.verify_second_factor(
                "owner@example.com",
                &totp::code_at(&old, 1_700_000_060),
                later
            )
            .unwrap(),
            "the old authenticator no longer works"
        );
        let enr = s.totp_enrollment("owner@example.com").unwrap();
        let new = totp_rs::Secret::try_from_base32(&*enr.secret_base32).unwrap();
        assert_ne!(new, old, "a new secret");
        s.confirm_totp(
            "owner@example.com",
            &totp::code_at(&new, 1_700_000_060),
            later,
        )
        .unwrap()
        .expect("confirmed");
        assert_eq!(second(&s, pass).await, SecondFactor::Totp);
        assert!(matches!(
            s.reset_totp("nobody@example.com"),
            Err(AuthError::NoSuchUser(_))
        ));
    }
}
