//! Users, passwords, second factors, sessions and failed-sign-in throttling for the
//! controller's HTTPS admin side.

pub mod cli;
pub mod password;
pub mod session;
pub mod throttle;
pub mod totp;
mod users;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use password::{
    Argon2Cost, PasswordHash, PasswordHasher, PasswordRejected, Pepper, Verified,
    check_new_password, normalize_email,
};
pub use session::{Session, SessionKind, SessionStore};
pub use throttle::{
    AttemptGuard, ClearTarget, FailureOutcome, Gate, SharedThrottle, Throttle, ThrottleConfig,
    ThrottleList, ThrottleRow,
};
pub use users::{PasswordCheck, SecondFactor, TotpEnrollment, UserAdded, UserStore, UserSummary};

/// Errors of the auth layer. `Display` never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("store: {0}")]
    Store(#[from] crate::core::kv::KvError),
    #[error("record encoding: {0}")]
    Encoding(#[from] serde_json::Error),
    #[error("password hashing: {0}")]
    Hash(#[source] argon2::Error),
    #[error("unsupported password hash {alg} v{version}")]
    UnsupportedHash { alg: String, version: u32 },
    #[error("stored {what} is not valid base64: {source}")]
    StoredEncoding {
        what: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("TOTP: {0}")]
    Totp(#[source] totp_rs::TotpError),
    #[error("QR code: {0}")]
    QrCode(#[source] qrcode::types::QrError),
    #[error("TOTP is already enrolled")]
    TotpAlreadyEnrolled,
    #[error("sealing: {0}")]
    Seal(#[from] zonemesh_ca::Error),
    #[error("password refused: {0}")]
    WeakPassword(#[from] PasswordRejected),
    #[error("not a usable e-mail address: {0:?}")]
    InvalidEmail(String),
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("no user {0}")]
    NoSuchUser(String),
    #[error("too many sign-ins in progress, try again shortly")]
    Busy,
    #[error("flush: {0}")]
    Flush(#[from] crate::durable::FlushError),
    #[error(transparent)]
    Blocking(#[from] crate::blocking::BlockingError),
}

/// What a user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Runs the mesh and the CA; TOTP is mandatory.
    Admin,
    /// Deploys certificates for their portals; TOTP is available.
    PortalOwner,
}

impl Role {
    /// The CLI / config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::PortalOwner => "portal-owner",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "portal-owner" | "portal_owner" | "owner" => Ok(Role::PortalOwner),
            other => Err(format!("unknown role {other:?} (admin or portal-owner)")),
        }
    }
}

/// Called when a source address is blocked automatically; the mesh service puts the block
/// on the blocklist that the Watch stream carries to every agent.
pub trait SecuritySink: Send + Sync {
    /// `ip` is blocked until `until` because of `reason`.
    fn source_blocked(&self, ip: IpAddr, until: SystemTime, reason: &str);
    /// `ip` failed a sign-in: evidence for the fleet-wide block policy.
    fn sign_in_failed(&self, _ip: IpAddr) {}
}

/// A sink that drops blocks, for tools that run without the mesh service.
#[derive(Debug, Default)]
pub struct NoSecuritySink;

impl SecuritySink for NoSecuritySink {
    fn source_blocked(&self, _ip: IpAddr, _until: SystemTime, _reason: &str) {}
}

/// Configuration of the admin side's authentication. Validate before binding anything.
#[derive(Clone, Debug)]
pub struct WebConfig {
    /// Argon2id cost (default and floor m=19456 KiB, t=2, p=1).
    pub argon2: Argon2Cost,
    /// Password hashes running at once; bounds memory to about this × m.
    pub max_concurrent_hashes: usize,
    /// How long a sign-in waits for a hashing slot before "busy".
    pub hash_queue_timeout: Duration,
    /// A session ends after this long without a request.
    pub session_idle_timeout: Duration,
    /// A session ends this long after sign-in, whatever happens.
    pub session_absolute_timeout: Duration,
    /// Delays and blocks for failed sign-ins.
    pub throttle: ThrottleConfig,
    /// The current pepper.
    pub pepper: Pepper,
    /// Older peppers, still accepted for verification (hashes are upgraded on sign-in).
    pub previous_peppers: Vec<Pepper>,
    /// Issuer shown in authenticator apps.
    pub totp_issuer: String,
}

impl WebConfig {
    /// Defaults with the given pepper.
    pub fn new(pepper: Pepper) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Self {
            argon2: Argon2Cost::default(),
            // Leave a core to the async workers so the server stays responsive during a flood.
            max_concurrent_hashes: cores.saturating_sub(1).max(1),
            hash_queue_timeout: Duration::from_secs(10),
            session_idle_timeout: Duration::from_secs(30 * 60),
            session_absolute_timeout: Duration::from_secs(12 * 3600),
            throttle: ThrottleConfig::default(),
            pepper,
            previous_peppers: Vec::new(),
            totp_issuer: "zonemesh".into(),
        }
    }

    /// Check every value; the error is a one-line reason.
    pub fn validate(&self) -> Result<(), AuthError> {
        self.argon2.validate()?;
        if self.max_concurrent_hashes == 0 || self.max_concurrent_hashes > 256 {
            return Err(AuthError::Config(
                "max_concurrent_hashes must be between 1 and 256".into(),
            ));
        }
        if self.session_idle_timeout.is_zero()
            || self.session_absolute_timeout < self.session_idle_timeout
        {
            return Err(AuthError::Config(
                "session timeouts: idle must be > 0 and <= absolute".into(),
            ));
        }
        self.throttle.validate().map_err(AuthError::Config)?;
        if self.pepper.bytes.len() < 32 {
            return Err(AuthError::Config(
                "the pepper must be at least 32 bytes".into(),
            ));
        }
        if self
            .previous_peppers
            .iter()
            .any(|p| p.version == self.pepper.version)
        {
            return Err(AuthError::Config(
                "an old pepper has the current pepper's version".into(),
            ));
        }
        if self.totp_issuer.is_empty() || self.totp_issuer.contains(':') {
            return Err(AuthError::Config(
                "totp_issuer must be non-empty and without ':'".into(),
            ));
        }
        Ok(())
    }
}

/// Counters of the sign-in path, for the controller's metrics endpoint.
#[derive(Debug, Default)]
pub struct AuthMetrics {
    pub signin_success: AtomicU64,
    pub signin_failure: AtomicU64,
    pub second_factor_failure: AtomicU64,
    pub throttled: AtomicU64,
    pub blocked_requests: AtomicU64,
    pub sources_blocked: AtomicU64,
    pub csrf_rejected: AtomicU64,
    pub busy: AtomicU64,
}

impl AuthMetrics {
    /// Add one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition of the counters.
    pub fn render_prometheus(&self) -> String {
        let rows = [
            (
                "zonemesh_signin_success_total",
                "Successful sign-ins.",
                &self.signin_success,
            ),
            (
                "zonemesh_signin_failure_total",
                "Failed password checks (unknown accounts included).",
                &self.signin_failure,
            ),
            (
                "zonemesh_signin_second_factor_failure_total",
                "Refused TOTP or recovery codes.",
                &self.second_factor_failure,
            ),
            (
                "zonemesh_signin_throttled_total",
                "Attempts refused because of a pending delay.",
                &self.throttled,
            ),
            (
                "zonemesh_signin_blocked_requests_total",
                "Requests refused from blocked sources.",
                &self.blocked_requests,
            ),
            (
                "zonemesh_sources_blocked_total",
                "Sources blocked automatically.",
                &self.sources_blocked,
            ),
            (
                "zonemesh_csrf_rejected_total",
                "State-changing requests refused for CSRF.",
                &self.csrf_rejected,
            ),
            (
                "zonemesh_signin_busy_total",
                "Sign-ins refused because all hashing slots were busy.",
                &self.busy,
            ),
        ];
        let mut s = String::new();
        for (name, help, v) in rows {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        s
    }
}
