//! Browser sessions: random tokens handed out in a cookie, stored only as their SHA-256 in
//! the sled tree `auth_sessions`, with idle and absolute timeouts.
//!
//! A session is either complete, or a short-lived pending one that only opens the
//! second-factor or enrollment page. CSRF tokens are derived from the session token, so
//! the database alone cannot forge them either.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{AuthError, Role};
use crate::durable::Flusher;

/// Name of the sled tree holding sessions.
pub const SESSIONS_TREE: &str = "auth_sessions";
/// How long a pending (password checked, second factor outstanding) session lives.
pub const PENDING_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// What a session allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionKind {
    /// Signed in.
    Full,
    /// Password checked; a TOTP or recovery code is still needed.
    PendingSecondFactor,
    /// Password checked; the admin must enroll TOTP before anything else.
    PendingEnrollment,
}

/// A stored session (no token in it, only the token's hash is the key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub email: String,
    pub role: Role,
    pub kind: SessionKind,
    pub created_ms: u64,
    pub last_seen_ms: u64,
}

fn ms(t: SystemTime) -> u64 {
    zonemesh_ca::unix_millis(t)
}

fn token_key(token: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"zonemesh/session/v1\0");
    h.update(token.as_bytes());
    h.finalize().into()
}

/// The CSRF token that goes with a session (or pre-session) token.
pub fn csrf_for(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"zonemesh/csrf/v1\0");
    h.update(token.as_bytes());
    B64URL.encode(h.finalize())
}

/// Constant-time check of a submitted CSRF token.
pub fn csrf_matches(token: &str, submitted: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(
        csrf_for(token).as_bytes(),
        submitted.as_bytes(),
    )
    .is_ok()
}

/// A fresh random token (256 bits, URL-safe base64).
pub fn random_token() -> Zeroizing<String> {
    let mut b = [0u8; 32];
    rand::fill(&mut b);
    Zeroizing::new(B64URL.encode(b))
}

/// Sessions over sled.
pub struct SessionStore {
    tree: crate::core::kv::Tree,
    flusher: Flusher,
    idle: Duration,
    absolute: Duration,
}

impl SessionStore {
    /// Open the session tree with the given timeouts.
    pub fn open(
        db: &crate::core::kv::Kv,
        idle: Duration,
        absolute: Duration,
    ) -> Result<Self, AuthError> {
        Self::open_with(db.flusher(), idle, absolute)
    }

    /// Open the session tree of the flusher's database; writes are made durable through
    /// `flusher`, shared with the other writers of that database.
    pub fn open_with(
        flusher: &Flusher,
        idle: Duration,
        absolute: Duration,
    ) -> Result<Self, AuthError> {
        Ok(Self {
            tree: flusher.kv().open_tree(SESSIONS_TREE)?,
            flusher: flusher.clone(),
            idle,
            absolute,
        })
    }

    /// Create a session and wait, without holding an async worker, until it is on disk;
    /// returns the token for the cookie.
    pub async fn create_durable(
        &self,
        email: &str,
        role: Role,
        kind: SessionKind,
        now: SystemTime,
    ) -> Result<Zeroizing<String>, AuthError> {
        // The write goes to the blocking pool (a store call may wait on the disk or the
        // network); the flush is awaited without holding a worker.
        let s = Session {
            email: email.to_string(),
            role,
            kind,
            created_ms: ms(now),
            last_seen_ms: ms(now),
        };
        let tree = self.tree.clone();
        let token = crate::blocking::run(move || insert_in(&tree, &s)).await?;
        self.flusher.flush().await?;
        Ok(token)
    }

    /// End the session for `token` and wait, without holding an async worker, until that
    /// is on disk.
    pub async fn remove_durable(&self, token: &str) -> Result<(), AuthError> {
        let (tree, key) = (self.tree.clone(), token_key(token));
        crate::blocking::run(move || tree.remove(key).map_err(AuthError::from)).await?;
        self.flusher.flush().await?;
        Ok(())
    }

    /// Create a session (blocking contexts); returns the token for the cookie.
    pub fn create(
        &self,
        email: &str,
        role: Role,
        kind: SessionKind,
        now: SystemTime,
    ) -> Result<Zeroizing<String>, AuthError> {
        let token = self.insert(email, role, kind, now)?;
        self.flusher.flush_blocking()?;
        Ok(token)
    }

    fn insert(
        &self,
        email: &str,
        role: Role,
        kind: SessionKind,
        now: SystemTime,
    ) -> Result<Zeroizing<String>, AuthError> {
        let s = Session {
            email: email.to_string(),
            role,
            kind,
            created_ms: ms(now),
            last_seen_ms: ms(now),
        };
        insert_in(&self.tree, &s)
    }

    fn expired(&self, s: &Session, now: SystemTime) -> bool {
        let now = ms(now);
        let (idle, absolute) = match s.kind {
            SessionKind::Full => (self.idle, self.absolute),
            _ => (PENDING_LIFETIME, PENDING_LIFETIME),
        };
        now.saturating_sub(s.last_seen_ms) >= idle.as_millis() as u64
            || now.saturating_sub(s.created_ms) >= absolute.as_millis() as u64
    }

    /// The live session for `token`, refreshing its idle timer; expired ones are removed.
    pub fn get(&self, token: &str, now: SystemTime) -> Result<Option<Session>, AuthError> {
        let key = token_key(token);
        let Some(v) = self.tree.get(key)? else {
            return Ok(None);
        };
        let mut s: Session = serde_json::from_slice(&v)?;
        if self.expired(&s, now) {
            self.tree.remove(key)?;
            return Ok(None);
        }
        // Refresh at most once a second; losing a refresh in a crash only shortens a session.
        if ms(now).saturating_sub(s.last_seen_ms) >= 1000 {
            s.last_seen_ms = ms(now);
            self.tree.insert(key, serde_json::to_vec(&s)?)?;
        }
        Ok(Some(s))
    }

    /// Drop the session for `token` without waiting for the disk (for sessions that are
    /// refused whether or not the removal survives a crash).
    pub fn forget(&self, token: &str) -> Result<(), AuthError> {
        self.tree.remove(token_key(token))?;
        Ok(())
    }

    /// End the session for `token` (blocking contexts).
    pub fn remove(&self, token: &str) -> Result<(), AuthError> {
        self.tree.remove(token_key(token))?;
        self.flusher.flush_blocking()?;
        Ok(())
    }

    /// End every session of `email` (used when a user is disabled).
    pub fn remove_for_user(&self, email: &str) -> Result<usize, AuthError> {
        let mut n = 0;
        for item in self.tree.iter() {
            let (k, v) = item?;
            if serde_json::from_slice::<Session>(&v).is_ok_and(|s| s.email == email) {
                self.tree.remove(k)?;
                n += 1;
            }
        }
        self.flusher.flush_blocking()?;
        Ok(n)
    }

    /// End every session of `email` but the one for `keep` (after a password change).
    pub fn remove_for_user_except(&self, email: &str, keep: &str) -> Result<usize, AuthError> {
        let keep = token_key(keep);
        let mut n = 0;
        for item in self.tree.iter() {
            let (k, v) = item?;
            if k.as_slice() != keep.as_slice()
                && serde_json::from_slice::<Session>(&v).is_ok_and(|s| s.email == email)
            {
                self.tree.remove(k)?;
                n += 1;
            }
        }
        self.flusher.flush_blocking()?;
        Ok(n)
    }

    /// Drop expired sessions; returns how many.
    pub fn purge_expired(&self, now: SystemTime) -> Result<usize, AuthError> {
        let mut n = 0;
        for item in self.tree.iter() {
            let (k, v) = item?;
            match serde_json::from_slice::<Session>(&v) {
                Ok(s) if !self.expired(&s, now) => {}
                _ => {
                    self.tree.remove(k)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Number of stored sessions.
    pub fn len(&self) -> Result<usize, AuthError> {
        Ok(self.tree.len()?)
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> Result<bool, AuthError> {
        Ok(self.tree.is_empty()?)
    }
}

/// Store `s` under a fresh token; returns the token for the cookie.
fn insert_in(tree: &crate::core::kv::Tree, s: &Session) -> Result<Zeroizing<String>, AuthError> {
    let token = random_token();
    tree.insert(token_key(&token), serde_json::to_vec(s)?)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_and_hashing() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::core::kv::Kv::sled(dir.path()).unwrap();
        let store =
            SessionStore::open(&db, Duration::from_secs(60), Duration::from_secs(300)).unwrap();
        let t0 = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let tok = store
            .create("a@example.com", Role::Admin, SessionKind::Full, t0)
            .unwrap();
        // Only the hash is stored.
        for item in db.open_tree(SESSIONS_TREE).unwrap().iter() {
            let (k, v) = item.unwrap();
            assert!(!k.windows(tok.len()).any(|w| w == tok.as_bytes()));
            assert!(!v.windows(tok.len()).any(|w| w == tok.as_bytes()));
        }
        // Idle refreshes keep it alive up to the absolute limit.
        let mut t = t0;
        for _ in 0..4 {
            t += Duration::from_secs(59);
            assert!(store.get(&tok, t).unwrap().is_some());
        }
        assert!(
            store
                .get(&tok, t0 + Duration::from_secs(300))
                .unwrap()
                .is_none()
        );
        let tok2 = store
            .create("a@example.com", Role::Admin, SessionKind::Full, t0)
            .unwrap();
        assert!(
            store
                .get(&tok2, t0 + Duration::from_secs(60))
                .unwrap()
                .is_none(),
            "idle timeout"
        );
        let p = store
            .create(
                "a@example.com",
                Role::Admin,
                SessionKind::PendingSecondFactor,
                t0,
            )
            .unwrap();
        assert!(store.get(&p, t0 + PENDING_LIFETIME).unwrap().is_none());
        assert!(csrf_matches(&tok, &csrf_for(&tok)));
        assert!(!csrf_matches(&tok, &csrf_for(&tok2)));
        assert!(!csrf_matches(&tok, ""));
    }
}
