//! Server access with SSH certificates: an SSH CA beside the X.509 one, with separate
//! user and host keys (sealed with the KEK like the other CA keys), grants of login
//! principals per zone, short-lived user certificates for signed-in users, host
//! certificates for the agents' sshd, and a KRL of revoked user certificates.
//!
//! - [`policy`]: which keys, principals, extensions and lifetimes are accepted.
//! - [`krl`]: the OpenSSH KRL format.
//! - [`store`]: the durable records.
//!
//! What every managed sshd needs (the user CA key, the (zone, principal) pairs granted and
//! the KRL) is one [`pb::SshState`] that rides the mesh's Watch stream: each change is
//! published as a whole state, so a revocation reaches every server with the next
//! delta. Signing runs wherever the caller runs it: the admin socket and gRPC handlers
//! call in from the blocking pool, the web page through `crate::blocking::run`.

pub mod krl;
pub mod policy;
pub mod store;

use crate::audit::{AuditEvent, AuditLog};
use crate::clock::{Clock, SystemClock};
use crate::error::{ControllerError, Result};
use crate::limits::{KeyedBuckets, Rate};
use crate::mesh::Mesh;
use crate::store::{NodeRecord, Store, unix};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use ssh_key::certificate::{Builder, CertType};
use ssh_key::{HashAlg, PrivateKey};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
pub use store::CaKeyType;
use store::{GrantRecord, SshCertKind, SshCertRecord, SshStore, grant_key};
use zonemesh_ca::{Kek, open_sealed, seal};
use zonemesh_proto as pb;

/// Errors of this module are the controller's (policy refusals are `BadRequest`).
pub use crate::error::ControllerError as SshError;

const USER_KEY_LABEL: &str = "zonemesh ssh user ca key v1";
const HOST_KEY_LABEL: &str = "zonemesh ssh host ca key v1";
/// Most grants kept.
pub const MAX_GRANTS: usize = 65_536;
/// Host certificates a node may ask for: burst, and refill per hour.
pub const HOST_CERT_RATE: Rate = Rate::new(10, Duration::from_secs(3600));
const HOST_LIMITED_NODES: usize = 65_536;
/// Certificate records are kept this long after they expire.
const KEEP_EXPIRED: Duration = Duration::from_secs(86_400);

/// The two CA keys.
pub struct CaKeys {
    pub kind: CaKeyType,
    pub user: PrivateKey,
    pub host: PrivateKey,
}

/// Generate one CA key of `kind` (RSA-4096 takes seconds: blocking).
pub fn generate_key(kind: CaKeyType, comment: &str) -> Result<PrivateKey> {
    let mut rng = ssh_key::rand_core::OsRng;
    let mut key = match kind {
        CaKeyType::Ed25519 => PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519)?,
        CaKeyType::Rsa4096 => {
            // aws-lc generates RSA-4096 several times faster than a pure-Rust prime search.
            use rsa::pkcs8::DecodePrivateKey;
            let pkcs8 = zeroize::Zeroizing::new(zonemesh_ca::generate_rsa_4096()?.serialize_der());
            let key = rsa::RsaPrivateKey::from_pkcs8_der(&pkcs8).map_err(|e| {
                ControllerError::BadRequest(format!("generated RSA key does not parse: {e}"))
            })?;
            PrivateKey::new(
                ssh_key::private::KeypairData::Rsa(ssh_key::private::RsaKeypair::try_from(key)?),
                comment,
            )?
        }
    };
    key.set_comment(comment);
    Ok(key)
}

/// RSA CA signatures (rsa-sha2-512) over a private key rebuilt from all its parts:
/// ssh-key 0.6.7's own RSA signing rebuilds it from the first prime twice and fails.
struct RsaCaSigner {
    key: rsa::pkcs1v15::SigningKey<sha2::Sha512>,
    public: ssh_key::public::KeyData,
}

impl RsaCaSigner {
    fn new(kp: &ssh_key::private::RsaKeypair) -> Result<Self> {
        let big = |m: &ssh_key::Mpint| {
            rsa::BigUint::from_bytes_be(m.as_positive_bytes().unwrap_or_default())
        };
        let key = rsa::RsaPrivateKey::from_components(
            big(&kp.public.n),
            big(&kp.public.e),
            big(&kp.private.d),
            vec![big(&kp.private.p), big(&kp.private.q)],
        )
        .map_err(|e| ControllerError::BadRequest(format!("the RSA CA key is unusable: {e}")))?;
        Ok(Self {
            key: rsa::pkcs1v15::SigningKey::new(key),
            public: ssh_key::public::KeyData::Rsa(kp.public.clone()),
        })
    }
}

impl signature::Signer<ssh_key::Signature> for RsaCaSigner {
    fn try_sign(&self, msg: &[u8]) -> signature::Result<ssh_key::Signature> {
        use signature::SignatureEncoding;
        let sig = self.key.try_sign(msg)?;
        ssh_key::Signature::new(
            ssh_key::Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            sig.to_vec(),
        )
        .map_err(|_| signature::Error::new())
    }
}

impl From<&RsaCaSigner> for ssh_key::public::KeyData {
    fn from(s: &RsaCaSigner) -> Self {
        s.public.clone()
    }
}

/// `node revoke`: revoke node `nkey` on `mesh` (its certificates, address and key, in one
/// transaction that also marks its SSH host certificates for revocation), then, with
/// `ssh`, those host certificates. Should the second step fail or the controller stop
/// before it, the marker has it finished at the next start or leader sweep.
pub fn revoke_node(
    mesh: &Mesh,
    ssh: Option<&Ssh>,
    nkey: &str,
    reason: zonemesh_ca::RevocationReason,
    now: SystemTime,
    actor: &str,
) -> Result<NodeRecord> {
    let n = mesh.revoke_node(nkey, reason, now)?;
    if let Some(ssh) = ssh
        && let Err(e) = ssh.finish_host_revocations(actor)
    {
        tracing::warn!(node = %n.key(), error = %e,
            "the node is revoked; its SSH host certificates will be on the next sweep");
    }
    Ok(n)
}

/// Sign a certificate with a CA key of either type.
fn sign_cert(b: Builder, ca: &PrivateKey) -> Result<ssh_key::Certificate> {
    Ok(match ca.key_data() {
        ssh_key::private::KeypairData::Rsa(kp) => b.sign(&RsaCaSigner::new(kp)?)?,
        _ => b.sign(ca)?,
    })
}

impl CaKeys {
    /// Fresh user and host CA keys of `kind`.
    pub fn generate(kind: CaKeyType, trust_domain: &str) -> Result<Self> {
        Ok(Self {
            kind,
            user: generate_key(kind, &format!("zonemesh user CA {trust_domain}"))?,
            host: generate_key(kind, &format!("zonemesh host CA {trust_domain}"))?,
        })
    }

    /// Seal both keys and store them; refuses when the store holds SSH CA keys already.
    pub fn install(&self, store: &Store, kek: &Kek) -> Result<()> {
        let s = SshStore::open(store)?;
        let user = seal(kek, USER_KEY_LABEL, &self.user.to_bytes()?)?;
        let host = seal(kek, HOST_KEY_LABEL, &self.host.to_bytes()?)?;
        if !s.put_keys(self.kind, user, host)? {
            return Err(ControllerError::AlreadyExists(
                "this installation already has an SSH CA; refusing to replace it".into(),
            ));
        }
        s.flush()?;
        Ok(())
    }

    fn load(s: &SshStore, kek: &Kek) -> Result<Option<Self>> {
        let (Some(user), Some(host)) = (s.key(store::USER_KEY)?, s.key(store::HOST_KEY)?) else {
            return Ok(None);
        };
        let kind = s
            .key(store::KEY_TYPE)?
            .and_then(|k| CaKeyType::parse(&String::from_utf8_lossy(&k)))
            .unwrap_or(CaKeyType::Ed25519);
        let open = |label, sealed: &[u8]| -> Result<PrivateKey> {
            let bytes = open_sealed(kek, label, sealed).map_err(|e| match e {
                zonemesh_ca::Error::Unseal => ControllerError::PermissionDenied(
                    "cannot unseal the SSH CA key: wrong key-encryption key".into(),
                ),
                other => ControllerError::Ca(other),
            })?;
            Ok(PrivateKey::from_bytes(&bytes)?)
        };
        Ok(Some(Self {
            kind,
            user: open(USER_KEY_LABEL, &user)?,
            host: open(HOST_KEY_LABEL, &host)?,
        }))
    }
}

/// The SSH CA's public keys (`ssh ca`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshCaView {
    pub key_type: CaKeyType,
    pub user_ca: String,
    pub host_ca: String,
    pub user_ca_fingerprint: String,
    pub host_ca_fingerprint: String,
}

/// A grant as `ssh grants` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    pub email: String,
    pub zone: String,
    pub principal: String,
    /// What the certificate carries for it.
    pub certificate_principal: String,
    pub max_ttl_secs: u64,
    pub extensions: Vec<String>,
}

/// A certificate as `ssh certs` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshCertView {
    pub serial: u64,
    pub kind: String,
    pub key_id: String,
    pub key_fingerprint: String,
    pub principals: Vec<String>,
    pub valid_before_unix: u64,
    pub revoked: bool,
}

/// A revoked host certificate as `ssh revoked-hosts` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedHostView {
    pub serial: u64,
    /// `zone/node`.
    pub node: String,
    pub key_fingerprint: String,
    pub valid_before_unix: u64,
    /// `@revoked * <host key>`, or empty when an earlier row already names this key.
    pub line: String,
}

/// An issued user certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedUserCert {
    pub serial: u64,
    pub key_id: String,
    pub key_fingerprint: String,
    pub principals: Vec<String>,
    pub extensions: Vec<String>,
    pub valid_after_unix: u64,
    pub valid_before_unix: u64,
    /// One OpenSSH line (`id_ed25519-cert.pub`).
    pub certificate: String,
}

/// The SSH CA service.
pub struct Ssh {
    store: SshStore,
    main: Store,
    trust_domain: String,
    kek: Kek,
    keys: parking_lot::RwLock<Option<Arc<CaKeys>>>,
    mesh: std::sync::OnceLock<Arc<Mesh>>,
    audit: Option<Arc<AuditLog>>,
    clock: Arc<dyn Clock>,
    /// Serialises changes and their publication, so agents see states in order.
    lock: parking_lot::Mutex<()>,
    host_limit: KeyedBuckets<String>,
}

impl std::fmt::Debug for Ssh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ssh").finish_non_exhaustive()
    }
}

fn fingerprint(k: &ssh_key::public::KeyData) -> String {
    k.fingerprint(HashAlg::Sha256).to_string()
}

fn no_ca() -> ControllerError {
    ControllerError::NotFound(
        "this installation has no SSH CA yet; create one with `zonemesh-controller ssh init`"
            .into(),
    )
}

impl Ssh {
    /// The service over `store`, with the keys unsealed when an SSH CA exists.
    pub fn open(
        store: &Store,
        kek: &Kek,
        trust_domain: &str,
        audit: Option<Arc<AuditLog>>,
    ) -> Result<Arc<Self>> {
        Self::with_clock(store, kek, trust_domain, audit, Arc::new(SystemClock))
    }

    /// [`Self::open`] with an injected clock.
    pub fn with_clock(
        store: &Store,
        kek: &Kek,
        trust_domain: &str,
        audit: Option<Arc<AuditLog>>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>> {
        let s = SshStore::open(store)?;
        let keys = CaKeys::load(&s, kek)?.map(Arc::new);
        Ok(Arc::new(Self {
            store: s,
            main: store.clone(),
            trust_domain: trust_domain.to_string(),
            kek: Kek::from_bytes(kek.as_bytes())?,
            keys: parking_lot::RwLock::new(keys),
            mesh: std::sync::OnceLock::new(),
            audit,
            clock,
            lock: parking_lot::Mutex::new(()),
            host_limit: KeyedBuckets::new(HOST_CERT_RATE, HOST_LIMITED_NODES),
        }))
    }

    /// Publish every change on `mesh`'s Watch stream from now on; the current state goes
    /// into its snapshots at once.
    /// A change made while no controller ran (`user disable` on the store) is published
    /// now, so watchers resuming from the change log see it too.
    pub fn attach_mesh(&self, mesh: Arc<Mesh>) -> Result<()> {
        let _g = self.lock.lock();
        if let Some(state) = self.state()? {
            let digest = state_digest(&state);
            if self.store.key(store::PUBLISHED)?.as_deref() == Some(digest.as_slice()) {
                mesh.set_ssh_state(state);
            } else {
                mesh.publish_ssh(state)?;
                self.store.put_published(&digest)?;
            }
        }
        let _ = self.mesh.set(mesh);
        Ok(())
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    fn keys(&self) -> Result<Arc<CaKeys>> {
        self.keys.read().clone().ok_or_else(no_ca)
    }

    fn audit(&self, event: AuditEvent) {
        if let Some(a) = &self.audit
            && let Err(e) = a.record_at(event, self.now())
        {
            tracing::error!(error = %e, "audit record failed");
        }
    }

    /// Create the SSH CA on an installation that has none (`ssh init`). Blocking.
    pub fn init(&self, kind: CaKeyType, actor: &str) -> Result<SshCaView> {
        let _g = self.lock.lock();
        if self.keys.read().is_some() || self.store.has_keys()? {
            return Err(ControllerError::AlreadyExists(
                "this installation already has an SSH CA; refusing to replace it".into(),
            ));
        }
        let keys = CaKeys::generate(kind, &self.trust_domain)?;
        keys.install(&self.main, &self.kek)?;
        *self.keys.write() = Some(Arc::new(keys));
        self.audit(
            AuditEvent::new("ssh.ca_created", "ok")
                .actor(actor)
                .detail(format!("key type {}", kind.as_str())),
        );
        self.publish_locked()?;
        self.ca()
    }

    /// Both public keys.
    pub fn ca(&self) -> Result<SshCaView> {
        let k = self.keys()?;
        Ok(SshCaView {
            key_type: k.kind,
            user_ca: k.user.public_key().to_openssh()?,
            host_ca: k.host.public_key().to_openssh()?,
            user_ca_fingerprint: fingerprint(k.user.public_key().key_data()),
            host_ca_fingerprint: fingerprint(k.host.public_key().key_data()),
        })
    }

    /// The `known_hosts` line with which clients trust every host certificate we issue.
    pub fn known_hosts_line(&self) -> Result<String> {
        Ok(format!("@cert-authority * {}", self.ca()?.host_ca))
    }

    /// Grant `email` the login `principal` on the servers of `zone` (replacing an earlier
    /// grant of the same three). The caller has checked that the user exists.
    pub fn grant(
        &self,
        email: &str,
        zone: &str,
        principal: &str,
        max_ttl: Option<Duration>,
        extensions: &[String],
        actor: &str,
    ) -> Result<GrantView> {
        let email = crate::auth::normalize_email(email);
        policy::check_principal(principal)?;
        if self.main.zone(zone)?.is_none() {
            return Err(ControllerError::NotFound(format!(
                "no zone {}",
                crate::text::Escaped(zone)
            )));
        }
        let max = max_ttl.unwrap_or(policy::DEFAULT_MAX_TTL);
        if max > policy::HARD_MAX_TTL || max < policy::MIN_TTL {
            return Err(ControllerError::BadRequest(format!(
                "--max-ttl {} is outside {} to {}",
                humantime::format_duration(max),
                humantime::format_duration(policy::MIN_TTL),
                humantime::format_duration(policy::HARD_MAX_TTL)
            )));
        }
        let mut ext = BTreeSet::new();
        for e in extensions.iter().filter(|e| !e.trim().is_empty()) {
            ext.insert(policy::extension_name(e)?.to_string());
        }
        let _g = self.lock.lock();
        self.keys()?;
        let rec = GrantRecord {
            email: email.clone(),
            zone: zone.to_string(),
            principal: principal.to_string(),
            max_ttl_secs: max.as_secs(),
            extensions: ext.into_iter().collect(),
            created_unix: unix(self.now()),
        };
        if self.store.grant(&rec.key())?.is_none() && self.store.grant_count()? >= MAX_GRANTS {
            return Err(ControllerError::RateLimited(format!(
                "at most {MAX_GRANTS} SSH grants"
            )));
        }
        self.store.put_grant(&rec)?;
        self.store.flush()?;
        self.audit(
            AuditEvent::new("ssh.grant_added", "ok")
                .actor(actor)
                .subject(&email)
                .detail(format!(
                    "zone {zone}, principal {principal}, max TTL {}s, extensions [{}]",
                    rec.max_ttl_secs,
                    rec.extensions.join(" ")
                )),
        );
        self.publish_locked()?;
        Ok(view(&rec))
    }

    /// Take a grant away; certificates already issued keep their principals until they
    /// expire or are revoked, but the zone's servers stop listing it.
    pub fn revoke_grant(
        &self,
        email: &str,
        zone: &str,
        principal: &str,
        actor: &str,
    ) -> Result<GrantView> {
        let email = crate::auth::normalize_email(email);
        let _g = self.lock.lock();
        let key = grant_key(&email, zone, principal);
        let rec = self.store.grant(&key)?.ok_or_else(|| {
            ControllerError::NotFound(format!(
                "no grant of principal {} in zone {} to {}",
                crate::text::Escaped(principal),
                crate::text::Escaped(zone),
                crate::text::Escaped(&email)
            ))
        })?;
        self.store.remove_grant(&key)?;
        self.store.flush()?;
        self.audit(
            AuditEvent::new("ssh.grant_revoked", "ok")
                .actor(actor)
                .subject(&email)
                .detail(format!("zone {zone}, principal {principal}")),
        );
        self.publish_locked()?;
        Ok(view(&rec))
    }

    /// Every grant, by e-mail, zone and principal.
    pub fn grants(&self) -> Result<Vec<GrantView>> {
        Ok(self.store.grants()?.iter().map(view).collect())
    }

    /// Sign a user certificate for `email` (an enabled user, checked by the caller) over
    /// `public_key` (one OpenSSH line). Refusals are audited and issue nothing. Blocking.
    pub fn sign_user(
        &self,
        email: &str,
        public_key: &str,
        ttl: Option<Duration>,
        actor: &str,
    ) -> Result<IssuedUserCert> {
        let email = crate::auth::normalize_email(email);
        let r = self.sign_user_inner(&email, public_key, ttl);
        match &r {
            Ok(c) => self.audit(
                AuditEvent::new("ssh.user_cert_issued", "ok")
                    .actor(actor)
                    .subject(&email)
                    .detail(format!(
                        "serial {}, key {}, principals [{}], extensions [{}], valid until {}",
                        c.serial,
                        c.key_fingerprint,
                        c.principals.join(" "),
                        c.extensions.join(" "),
                        humantime::format_rfc3339_seconds(crate::store::from_unix(
                            c.valid_before_unix
                        ))
                    )),
            ),
            Err(e) => self.audit(
                AuditEvent::new("ssh.user_cert_refused", "denied")
                    .actor(actor)
                    .subject(&email)
                    .detail(e.to_string()),
            ),
        }
        r
    }

    fn sign_user_inner(
        &self,
        email: &str,
        public_key: &str,
        ttl: Option<Duration>,
    ) -> Result<IssuedUserCert> {
        let keys = self.keys()?;
        let key = policy::parse_subject_key(public_key)?;
        let grants = self.store.grants_of(email)?;
        if grants.is_empty() {
            return Err(ControllerError::PermissionDenied(format!(
                "{} has no SSH grants",
                crate::text::Escaped(email)
            )));
        }
        let max = grants
            .iter()
            .map(|g| Duration::from_secs(g.max_ttl_secs))
            .min()
            .unwrap_or(policy::DEFAULT_MAX_TTL);
        let ttl = policy::user_ttl(ttl, max)?;
        let principals: BTreeSet<String> = grants
            .iter()
            .map(|g| policy::certificate_principal(&g.zone, &g.principal))
            .collect();
        let mut extensions: BTreeSet<String> = grants
            .iter()
            .flat_map(|g| g.extensions.iter().cloned())
            .collect();
        extensions.insert(policy::PERMIT_PTY.to_string());
        let now = self.now();
        let valid_after = unix(now).saturating_sub(policy::BACKDATE.as_secs());
        let valid_before = unix(now) + ttl.as_secs();
        let serial = self.store.next_serial()?;
        let mut nonce = [0u8; 32];
        rand::rng().fill_bytes(&mut nonce);
        let mut b = Builder::new(nonce, key.key_data().clone(), valid_after, valid_before)?;
        b.serial(serial)?
            .key_id(email)?
            .cert_type(CertType::User)?
            .comment(email)?;
        for p in &principals {
            b.valid_principal(p.clone())?;
        }
        for e in &extensions {
            b.extension(e.clone(), "")?;
        }
        let cert = sign_cert(b, &keys.user)?;
        let rec = SshCertRecord {
            serial,
            kind: SshCertKind::User,
            key_id: email.to_string(),
            key_fingerprint: fingerprint(key.key_data()),
            principals: principals.iter().cloned().collect(),
            valid_after_unix: valid_after,
            valid_before_unix: valid_before,
            issued_unix: unix(now),
            revoked_unix: None,
            public_key: String::new(),
        };
        self.store.put_cert(&rec)?;
        self.store.flush()?;
        Ok(IssuedUserCert {
            serial,
            key_id: rec.key_id,
            key_fingerprint: rec.key_fingerprint,
            principals: rec.principals,
            extensions: extensions.into_iter().collect(),
            valid_after_unix: valid_after,
            valid_before_unix: valid_before,
            certificate: cert.to_openssh()?,
        })
    }

    /// Sign a host certificate for `node`'s sshd key: principals are the node name, its
    /// overlay address and its underlay addresses. Rate-limited per node. Blocking.
    pub fn sign_host(
        &self,
        node: &NodeRecord,
        host_public_key: &str,
    ) -> Result<pb::SshHostCertificateResponse> {
        let now = self.now();
        if !self.host_limit.allow(&node.key(), now) {
            return Err(ControllerError::RateLimited(
                "too many SSH host certificate requests; try again later".into(),
            ));
        }
        let keys = self.keys()?;
        let key = policy::parse_subject_key(host_public_key)?;
        let mut principals = vec![node.node.clone(), node.overlay_ip.to_string()];
        for e in &node.endpoints {
            let ip = e.ip().to_string();
            if !principals.contains(&ip) {
                principals.push(ip);
            }
        }
        let valid_after = unix(now).saturating_sub(policy::BACKDATE.as_secs());
        let valid_before = unix(now) + policy::HOST_CERT_TTL.as_secs();
        let serial = self.store.next_serial()?;
        let mut nonce = [0u8; 32];
        rand::rng().fill_bytes(&mut nonce);
        let mut b = Builder::new(nonce, key.key_data().clone(), valid_after, valid_before)?;
        b.serial(serial)?
            .key_id(node.key())?
            .cert_type(CertType::Host)?;
        for p in &principals {
            b.valid_principal(p.clone())?;
        }
        let cert = sign_cert(b, &keys.host)?;
        let rec = SshCertRecord {
            serial,
            kind: SshCertKind::Host,
            key_id: node.key(),
            key_fingerprint: fingerprint(key.key_data()),
            principals: principals.clone(),
            valid_after_unix: valid_after,
            valid_before_unix: valid_before,
            issued_unix: unix(now),
            revoked_unix: None,
            public_key: key.to_openssh().map(|k| plain_key(&k))?,
        };
        {
            // Recorded under the lock host revocations take, and only while the node is
            // still enrolled: a revocation that commits before this check refuses the
            // certificate here, and one that commits after it finds the record.
            let _g = self.lock.lock();
            let live = self
                .main
                .node(&node.key())?
                .is_some_and(|n| !n.revoked && n.enrolled_unix == node.enrolled_unix);
            if !live {
                return Err(ControllerError::PermissionDenied(format!(
                    "node {} is revoked",
                    node.key()
                )));
            }
            self.store.put_cert(&rec)?;
            self.store.flush()?;
        }
        self.audit(
            AuditEvent::new("ssh.host_cert_issued", "ok")
                .actor("node")
                .subject(node.key())
                .detail(format!(
                    "serial {serial}, key {}, principals [{}]",
                    rec.key_fingerprint,
                    principals.join(" ")
                )),
        );
        Ok(pb::SshHostCertificateResponse {
            certificate: cert.to_openssh()?,
            valid_before_unix: valid_before,
            host_ca_public_key: keys.host.public_key().to_openssh()?,
        })
    }

    /// Revoke one user certificate by serial: on the KRL of every server with the next
    /// Watch delta.
    pub fn revoke_serial(&self, serial: u64, actor: &str) -> Result<SshCertView> {
        let _g = self.lock.lock();
        let mut rec = self.store.cert(serial)?.ok_or_else(|| {
            ControllerError::NotFound(format!("no SSH certificate with serial {serial}"))
        })?;
        if rec.kind != SshCertKind::User {
            return Err(ControllerError::BadRequest(format!(
                "serial {serial} is a host certificate; revoke the node instead"
            )));
        }
        if rec.revoked_unix.is_some() {
            return Err(ControllerError::AlreadyExists(format!(
                "SSH certificate {serial} is already revoked"
            )));
        }
        rec.revoked_unix = Some(unix(self.now()));
        self.store.put_cert(&rec)?;
        self.store.flush()?;
        self.audit(
            AuditEvent::new("ssh.user_cert_revoked", "ok")
                .actor(actor)
                .subject(&rec.key_id)
                .detail(format!("serial {serial}")),
        );
        self.publish_locked()?;
        Ok(cert_view(&rec))
    }

    /// Revoke every unexpired user certificate of `email` (also what `user disable` does).
    /// Returns the serials newly revoked; publishes once.
    pub fn revoke_email(&self, email: &str, actor: &str) -> Result<Vec<u64>> {
        let email = crate::auth::normalize_email(email);
        let _g = self.lock.lock();
        let serials = self.revoke_unexpired_locked(
            SshCertKind::User,
            &email,
            u64::MAX,
            "ssh.user_certs_revoked",
            actor,
        )?;
        if !serials.is_empty() {
            self.publish_locked()?;
        }
        Ok(serials)
    }

    /// Revoke the host certificates of every node revoked since its certificates were
    /// last swept (the markers of [`Store::pending_host_revocations`]): each certificate
    /// issued to the node (to the node before it, when the name was enrolled again: those
    /// issued up to the revocation) goes on the KRL of every server and into
    /// `ssh known-hosts` as an `@revoked` line. Run after each `node revoke`, at start-up
    /// and on the leader's sweep, so a controller stopped between the node's revocation
    /// and this step still finishes it. Returns the serials newly revoked; publishes once.
    pub fn finish_host_revocations(&self, actor: &str) -> Result<Vec<u64>> {
        let _g = self.lock.lock();
        let pending = self.main.pending_host_revocations()?;
        let mut serials = Vec::new();
        for (nkey, at) in &pending {
            // Every one of the node's host certificates, unless the name was enrolled
            // again: then those issued up to the revocation.
            let enrolled_again = self.main.node(nkey)?.is_some_and(|n| !n.revoked);
            let until = if enrolled_again { *at } else { u64::MAX };
            serials.extend(self.revoke_unexpired_locked(
                SshCertKind::Host,
                nkey,
                until,
                "ssh.host_certs_revoked",
                actor,
            )?);
        }
        if !serials.is_empty() {
            self.publish_locked()?;
        }
        // Only once revoked, flushed and published.
        for (nkey, at) in &pending {
            self.main.clear_host_revocation(nkey, *at)?;
        }
        Ok(serials)
    }

    /// Revoke every unrevoked, unexpired certificate of `kind` with key ID `key_id` issued
    /// at or before `issued_until` (unix seconds); one flush, one audit record of kind
    /// `audit_kind` naming the serials. The caller holds `self.lock` and publishes.
    fn revoke_unexpired_locked(
        &self,
        kind: SshCertKind,
        key_id: &str,
        issued_until: u64,
        audit_kind: &'static str,
        actor: &str,
    ) -> Result<Vec<u64>> {
        let now = unix(self.now());
        let mut revoked = Vec::new();
        for mut rec in self.store.certs()? {
            if rec.kind == kind
                && rec.key_id == key_id
                && rec.revoked_unix.is_none()
                && rec.valid_before_unix > now
                && rec.issued_unix <= issued_until
            {
                rec.revoked_unix = Some(now);
                revoked.push(rec);
            }
        }
        let serials: Vec<u64> = revoked.iter().map(|r| r.serial).collect();
        if serials.is_empty() {
            return Ok(serials);
        }
        // Every record in one transaction (in pieces only past the store's limit per
        // transaction), then one flush.
        self.store.put_certs(&revoked)?;
        self.store.flush()?;
        self.audit(
            AuditEvent::new(audit_kind, "ok")
                .actor(actor)
                .subject(key_id)
                .detail(format!(
                    "serials [{}]",
                    serials
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                )),
        );
        Ok(serials)
    }

    /// Revoked, unexpired host certificates and their `@revoked` lines for clients'
    /// `known_hosts` (one per distinct host key; older records without a key give none).
    pub fn revoked_hosts(&self) -> Result<Vec<RevokedHostView>> {
        let now = unix(self.now());
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for c in self.store.certs()? {
            if c.kind != SshCertKind::Host || c.revoked_unix.is_none() || c.valid_before_unix < now
            {
                continue;
            }
            let line = if c.public_key.is_empty() || !seen.insert(c.public_key.clone()) {
                String::new()
            } else {
                format!("@revoked * {}", c.public_key)
            };
            out.push(RevokedHostView {
                serial: c.serial,
                node: c.key_id.clone(),
                key_fingerprint: c.key_fingerprint.clone(),
                valid_before_unix: c.valid_before_unix,
                line,
            });
        }
        Ok(out)
    }

    /// Issued certificates (newest last), optionally of one key ID.
    pub fn certs(&self, key_id: Option<&str>) -> Result<Vec<SshCertView>> {
        let want = key_id.map(crate::auth::normalize_email);
        Ok(self
            .store
            .certs()?
            .iter()
            .filter(|c| want.as_ref().is_none_or(|w| &c.key_id == w))
            .map(cert_view)
            .collect())
    }

    /// The KRL of revoked, unexpired user certificates (also pruning records long
    /// expired).
    pub fn krl(&self) -> Result<Vec<u8>> {
        self.krl_at(self.store.next_krl_version()?)
    }

    fn krl_at(&self, version: u64) -> Result<Vec<u8>> {
        let keys = self.keys()?;
        let now = self.now();
        self.store
            .prune_expired(unix(now).saturating_sub(KEEP_EXPIRED.as_secs()))?;
        let (mut user, mut host) = (Vec::new(), Vec::new());
        for c in self.store.certs()? {
            if c.revoked_unix.is_some() && c.valid_before_unix >= unix(now) {
                match c.kind {
                    SshCertKind::User => user.push(c.serial),
                    SshCertKind::Host => host.push(c.serial),
                }
            }
        }
        let user_blob = keys.user.public_key().to_bytes()?;
        let host_blob = keys.host.public_key().to_bytes()?;
        Ok(krl::build_sections(
            &[(&user_blob, &user), (&host_blob, &host)],
            version,
            unix(now),
        ))
    }

    /// What every managed sshd needs; `None` without an SSH CA.
    pub fn state(&self) -> Result<Option<pb::SshState>> {
        let Some(keys) = self.keys.read().clone() else {
            return Ok(None);
        };
        let pairs: BTreeSet<(String, String)> = self
            .store
            .grants()?
            .into_iter()
            .map(|g| (g.zone, g.principal))
            .collect();
        let generation = self.store.next_krl_version()?;
        let krl = self.krl_at(generation)?;
        Ok(Some(pb::SshState {
            user_ca_public_key: keys.user.public_key().to_openssh()?,
            grants: pairs
                .into_iter()
                .map(|(zone, principal)| pb::SshGrant {
                    certificate_principal: policy::certificate_principal(&zone, &principal),
                    zone,
                    principal,
                })
                .collect(),
            generation,
            krl,
        }))
    }

    /// Publish the current state on the Watch stream (the caller holds `lock`).
    fn publish_locked(&self) -> Result<()> {
        let Some(mesh) = self.mesh.get() else {
            return Ok(());
        };
        if let Some(state) = self.state()? {
            let digest = state_digest(&state);
            mesh.publish_ssh(state)?;
            self.store.put_published(&digest)?;
        }
        Ok(())
    }
}

/// What identifies an SSH state apart from its generation and the KRL's timestamps.
fn state_digest(s: &pb::SshState) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(s.user_ca_public_key.as_bytes());
    for g in &s.grants {
        h.update(b"\0");
        h.update(g.zone.as_bytes());
        h.update(b"\0");
        h.update(g.principal.as_bytes());
    }
    for serial in krl::serials(&s.krl).unwrap_or_default() {
        h.update(serial.to_be_bytes());
    }
    h.finalize().to_vec()
}

fn view(g: &GrantRecord) -> GrantView {
    GrantView {
        email: g.email.clone(),
        zone: g.zone.clone(),
        principal: g.principal.clone(),
        certificate_principal: policy::certificate_principal(&g.zone, &g.principal),
        max_ttl_secs: g.max_ttl_secs,
        extensions: g.extensions.clone(),
    }
}

/// `type base64` of an OpenSSH public key line, without its comment.
fn plain_key(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cert_view(c: &SshCertRecord) -> SshCertView {
    SshCertView {
        serial: c.serial,
        kind: match c.kind {
            SshCertKind::User => "user".into(),
            SshCertKind::Host => "host".into(),
        },
        key_id: c.key_id.clone(),
        key_fingerprint: c.key_fingerprint.clone(),
        principals: c.principals.clone(),
        valid_before_unix: c.valid_before_unix,
        revoked: c.revoked_unix.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign_with(ca: &PrivateKey) -> Result<ssh_key::Certificate> {
        let subject = generate_key(CaKeyType::Ed25519, "subject").unwrap();
        let mut b = Builder::new([7u8; 16], subject.public_key().key_data().clone(), 1, 2)?;
        b.serial(1)?.key_id("k")?.valid_principal("p")?;
        sign_cert(b, ca)
    }

    #[test]
    fn both_ca_key_types_sign_certificates_that_verify() {
        for kind in [CaKeyType::Ed25519, CaKeyType::Rsa4096] {
            let ca = generate_key(kind, "ca").unwrap();
            let again = PrivateKey::from_bytes(&ca.to_bytes().unwrap()).unwrap();
            for key in [&ca, &again] {
                let cert = sign_with(key).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
                cert.verify_signature().unwrap();
            }
        }
    }
}
