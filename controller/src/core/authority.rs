//! The CA as the controller runs it: the `zonemesh-ca` library plus the store that records
//! every serial it issues and every revocation, and the current CRL.

use crate::error::{ControllerError, Result};
use crate::store::{
    CertKind, CertRecord, NodeSerial, RevocationRecord, Store, encode, from_unix, unix,
};
use arc_swap::ArcSwap;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use zonemesh_ca::{
    Ca, CaMaterial, CertStatus, IssuedCert, Kek, NodePolicy, NodeRequest, RevocationReason,
    RevokedEntry, TlsNames, TlsPolicy, open_sealed, seal,
};

/// How long each CRL is valid; a fresh one is signed well before (see `CRL_REFRESH`).
pub const CRL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);
/// How often the serve loop re-signs the CRL even without revocations.
pub const CRL_REFRESH: Duration = Duration::from_secs(86_400);

const ROOT_KEY_LABEL: &str = "zonemesh root key v1";
const INT_KEY_LABEL: &str = "zonemesh intermediate key v1";

/// One CA certificate as `ca show` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct CaCertInfo {
    pub role: &'static str,
    pub subject: String,
    pub sha256: String,
    pub not_after: String,
    pub key_bits: usize,
}

/// The operating authority.
pub struct Authority {
    store: Store,
    ca: Ca,
    pub node_policy: NodePolicy,
    pub tls_policy: TlsPolicy,
    crl: ArcSwap<Vec<u8>>,
    ocsp: OcspCache,
    /// Counts issued and revoked certificates; shared with the rest of the controller.
    metrics: crate::metrics::Metrics,
}

/// Most OCSP responses kept. Only serials this CA issued are cached (up to four CertID
/// encodings each), so this is reached only by a very large fleet; then entries are
/// dropped and signed again on demand.
const OCSP_CACHE_MAX: usize = 16_384;
/// A cached response is re-signed once it is this old (half its validity), so relying
/// parties always get one well before its `nextUpdate`.
const OCSP_REFRESH: Duration =
    Duration::from_secs(zonemesh_ca::OCSP_RESPONSE_VALIDITY.as_secs() / 2);

struct CachedOcsp {
    serial_hex: String,
    status: CertStatus,
    produced: SystemTime,
    der: Arc<Vec<u8>>,
}

/// Pre-signed OCSP responses, one per CertID asked about, re-signed when the serial's
/// status changes or the response ages.
#[derive(Default)]
struct OcspCache {
    responses: parking_lot::Mutex<HashMap<Vec<u8>, CachedOcsp>>,
    /// One signature at a time: a burst for one serial signs once, and OCSP never takes
    /// more than one core.
    signing: parking_lot::Mutex<()>,
    signatures: AtomicU64,
}

impl OcspCache {
    fn get(&self, key: &[u8], status: CertStatus, now: SystemTime) -> Option<Arc<Vec<u8>>> {
        let map = self.responses.lock();
        let c = map.get(key)?;
        let fresh = now
            .duration_since(c.produced)
            .is_ok_and(|age| age < OCSP_REFRESH);
        (fresh && c.status == status).then(|| c.der.clone())
    }

    fn put(&self, key: &[u8], entry: CachedOcsp) {
        let mut map = self.responses.lock();
        if map.len() >= OCSP_CACHE_MAX && !map.contains_key(key) {
            let now = entry.produced;
            map.retain(|_, c| {
                now.duration_since(c.produced)
                    .is_ok_and(|a| a < OCSP_REFRESH)
            });
            if map.len() >= OCSP_CACHE_MAX
                && let Some(k) = map.keys().next().cloned()
            {
                map.remove(&k);
            }
        }
        map.insert(key.to_vec(), entry);
    }

    fn forget(&self, serial_hex: &str) {
        self.responses
            .lock()
            .retain(|_, c| c.serial_hex != serial_hex);
    }
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.ca.trust_domain())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// True once `init` has stored a CA.
    pub fn exists(store: &Store) -> Result<bool> {
        Ok(store
            .ca
            .contains_key("root_cert")
            .map_err(crate::store::StoreError::from)?)
    }

    /// Store freshly generated CA material, keys sealed under the KEK. Refuses to overwrite.
    pub fn install(store: &Store, kek: &Kek, m: &CaMaterial) -> Result<()> {
        if Self::exists(store)? {
            return Err(ControllerError::AlreadyExists(
                "a CA already exists in this data directory; refusing to overwrite it".into(),
            ));
        }
        let tree = &store.ca;
        let put = |k: &str, v: Vec<u8>| {
            tree.insert(k, v)
                .map(|_| ())
                .map_err(crate::store::StoreError::from)
        };
        put("trust_domain", m.trust_domain.as_bytes().to_vec())?;
        put("int_cert", m.intermediate_cert_der.clone())?;
        put(
            "root_key_sealed",
            seal(kek, ROOT_KEY_LABEL, &m.root_key_pkcs8)?,
        )?;
        put(
            "int_key_sealed",
            seal(kek, INT_KEY_LABEL, &m.intermediate_key_pkcs8)?,
        )?;
        // Written last: its presence marks a complete CA.
        put("root_cert", m.root_cert_der.clone())?;
        store.flush()?;
        Ok(())
    }

    /// Load the CA from the store, unsealing the intermediate key with the KEK.
    pub fn load(store: Store, kek: &Kek, now: SystemTime) -> Result<Self> {
        let get = |k: &str| -> Result<Vec<u8>> {
            store
                .ca
                .get(k)
                .map_err(crate::store::StoreError::from)?
                .map(|v| v.to_vec())
                .ok_or_else(|| {
                    ControllerError::NotFound(
                        "no CA in this data directory; run `zonemesh-controller init` first".into(),
                    )
                })
        };
        let root = get("root_cert")?;
        let trust_domain = String::from_utf8(get("trust_domain")?).map_err(|e| {
            crate::store::StoreError::Corrupt {
                tree: "meta",
                err: Box::new(e),
            }
        })?;
        let int_cert = get("int_cert")?;
        let int_key =
            open_sealed(kek, INT_KEY_LABEL, &get("int_key_sealed")?).map_err(|e| match e {
                zonemesh_ca::Error::Unseal => ControllerError::PermissionDenied(
                    "cannot unseal the CA key: wrong key-encryption key".into(),
                ),
                other => ControllerError::Ca(other),
            })?;
        let ca = Ca::load(&trust_domain, &root, &int_cert, &int_key)?;
        let auth = Self {
            store,
            ca,
            node_policy: NodePolicy::default(),
            tls_policy: TlsPolicy::default(),
            crl: ArcSwap::from_pointee(Vec::new()),
            ocsp: OcspCache::default(),
            metrics: crate::metrics::Metrics::new(),
        };
        auth.refresh_crl(now)?;
        Ok(auth)
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The controller's metrics (the authority counts certificates in them).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// The chain presented after a leaf: the intermediate.
    pub fn chain(&self) -> Vec<Vec<u8>> {
        vec![self.ca.intermediate_der().to_vec()]
    }

    /// The current signed CRL (DER).
    pub fn crl_der(&self) -> Arc<Vec<u8>> {
        self.crl.load_full()
    }

    /// Subjects, fingerprints and expiry of the root and intermediate.
    pub fn info(&self) -> Vec<CaCertInfo> {
        [
            ("root", self.ca.root_der()),
            ("intermediate", self.ca.intermediate_der()),
        ]
        .into_iter()
        .map(|(role, der)| {
            let (_, c) = X509Certificate::from_der(der).expect("stored CA certificates parse");
            let key_bits = c.public_key().parsed().map(|k| k.key_size()).unwrap_or(0);
            CaCertInfo {
                role,
                subject: c.subject().to_string(),
                sha256: zonemesh_ca::fingerprint_sha256(der),
                not_after: c.validity().not_after.to_string(),
                key_bits,
            }
        })
        .collect()
    }

    fn record(
        &self,
        cert: &IssuedCert,
        kind: CertKind,
        subject: String,
        now: SystemTime,
    ) -> Result<()> {
        let rec = CertRecord {
            kind,
            subject,
            not_after_unix: unix(cert.not_after),
            issued_unix: unix(now),
        };
        self.store
            .certs
            .insert(&cert.serial_hex, encode(&rec))
            .map_err(crate::store::StoreError::from)?;
        Ok(())
    }

    /// Remember which node a serial was issued to, so revoking the node revokes it.
    fn record_owner(&self, owner: &str, cert: &IssuedCert, kind: CertKind) -> Result<()> {
        self.store.add_node_serial(
            owner,
            &NodeSerial {
                serial_hex: cert.serial_hex.clone(),
                kind,
                not_after_unix: unix(cert.not_after),
            },
        )?;
        Ok(())
    }

    /// Issue a node certificate and record its serial, also under its node (the caller
    /// flushes with its other writes).
    pub fn issue_node(&self, req: &NodeRequest<'_>, now: SystemTime) -> Result<IssuedCert> {
        let cert = self.sign_node(req, now)?;
        self.record_node(req.zone, req.node, &cert, now)?;
        Ok(cert)
    }

    /// Sign a node certificate without recording it (the RSA signature, taken outside any
    /// lock); a certificate that is handed out must first go through [`Self::record_node`].
    pub fn sign_node(&self, req: &NodeRequest<'_>, now: SystemTime) -> Result<IssuedCert> {
        Ok(self.ca.sign_node_csr(&self.node_policy, req, now)?)
    }

    /// Record a node certificate from [`Self::sign_node`] by serial and under its node
    /// (the caller flushes with its other writes).
    pub fn record_node(
        &self,
        zone: &str,
        node: &str,
        cert: &IssuedCert,
        now: SystemTime,
    ) -> Result<()> {
        let nkey = crate::store::node_key(zone, node);
        self.record(cert, CertKind::Node, nkey.clone(), now)?;
        self.record_owner(&nkey, cert, CertKind::Node)?;
        self.metrics
            .certificate_issued(crate::metrics::CertKind::Node);
        Ok(())
    }

    /// Issue a TLS certificate for a CSR and record it durably; with `owner` (a node key)
    /// it is also recorded as that node's, so revoking the node revokes it.
    pub fn issue_tls_csr(
        &self,
        csr: &[u8],
        names: &TlsNames,
        lifetime: Option<Duration>,
        owner: Option<&str>,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let cert = self
            .ca
            .sign_tls_csr(&self.tls_policy, csr, names, lifetime, now)?;
        if let Some(owner) = owner {
            self.record_owner(owner, &cert, CertKind::Tls)?;
        }
        self.record_tls(cert, names, now)
    }

    /// Issue a TLS certificate for a key the caller holds and record it durably.
    pub fn issue_tls_key(
        &self,
        key: &zonemesh_ca::KeyPair,
        names: &TlsNames,
        lifetime: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        let cert = self
            .ca
            .issue_tls(&self.tls_policy, key, names, lifetime, now)?;
        self.record_tls(cert, names, now)
    }

    /// Record a portal certificate the internal issuer made (flushed before it returns).
    pub fn record_portal(&self, cert: &IssuedCert, domain: &str, now: SystemTime) -> Result<()> {
        self.record(cert, CertKind::Tls, format!("portal {domain}"), now)?;
        self.store.flush()?;
        self.metrics
            .certificate_issued(crate::metrics::CertKind::Portal);
        Ok(())
    }

    fn record_tls(
        &self,
        cert: IssuedCert,
        names: &TlsNames,
        now: SystemTime,
    ) -> Result<IssuedCert> {
        self.record(&cert, CertKind::Tls, format!("{names:?}"), now)?;
        self.store.flush()?;
        self.metrics
            .certificate_issued(crate::metrics::CertKind::Tls);
        Ok(cert)
    }

    /// Revoke a serial this CA issued: recorded, flushed, and a new CRL signed.
    pub fn revoke(
        &self,
        serial_hex: &str,
        reason: RevocationReason,
        now: SystemTime,
    ) -> Result<()> {
        let serial = serial_hex
            .trim()
            .trim_start_matches("0x")
            .replace(':', "")
            .to_ascii_lowercase();
        let serial = zonemesh_ca::serial_hex(&hex::decode(&serial).map_err(|e| {
            ControllerError::BadRequest(format!("serial {serial_hex:?} is not hex: {e}"))
        })?);
        if self.store.cert(&serial)?.is_none() {
            return Err(ControllerError::NotFound(format!(
                "no certificate with serial {serial} was issued by this CA"
            )));
        }
        if self.store.revocation(&serial)?.is_some() {
            return Err(ControllerError::AlreadyExists(format!(
                "serial {serial} is already revoked"
            )));
        }
        let rec = RevocationRecord {
            revoked_unix: unix(now),
            reason_code: reason.code(),
        };
        self.store
            .revoked
            .insert(serial.as_bytes(), encode(&rec))
            .map_err(crate::store::StoreError::from)?;
        self.ocsp.forget(&serial);
        self.refresh_crl(now)?;
        self.store.flush()?;
        self.metrics.certificates_revoked(1);
        Ok(())
    }

    /// Revoke several serials this CA issued with one CRL signature and one flush; serials
    /// already revoked are left as they are. Returns how many were newly revoked.
    pub fn revoke_all(
        &self,
        serials: &[String],
        reason: RevocationReason,
        now: SystemTime,
    ) -> Result<usize> {
        let rec = encode(&RevocationRecord {
            revoked_unix: unix(now),
            reason_code: reason.code(),
        });
        let mut newly = 0;
        for serial in serials {
            if self.store.cert(serial)?.is_none() || self.store.revocation(serial)?.is_some() {
                continue;
            }
            self.store
                .revoked
                .insert(serial.as_bytes(), rec.clone())
                .map_err(crate::store::StoreError::from)?;
            newly += 1;
        }
        if newly > 0 {
            self.refresh_crl(now)?;
            self.store.flush()?;
            self.metrics.certificates_revoked(newly as u64);
        }
        Ok(newly)
    }

    /// Serve `der`, a CRL another controller of the same store signed (followed from the
    /// shared change log), from now on.
    pub fn adopt_crl(&self, der: Vec<u8>) {
        self.crl.store(Arc::new(der));
    }

    /// Re-sign the CRL from the revocations in the store.
    pub fn refresh_crl(&self, now: SystemTime) -> Result<Arc<Vec<u8>>> {
        let mut entries = Vec::new();
        for item in self.store.revoked.iter() {
            let (k, v) = item.map_err(crate::store::StoreError::from)?;
            let rec: RevocationRecord = crate::store::decode("revoked", &v)?;
            entries.push(RevokedEntry {
                serial_hex: String::from_utf8_lossy(&k).into_owned(),
                revoked_at: from_unix(rec.revoked_unix),
                reason: RevocationReason::from_code(rec.reason_code)
                    .unwrap_or(RevocationReason::Unspecified),
            });
        }
        let number = self.store.next_counter("crl_number")?;
        let der = Arc::new(self.ca.crl(&entries, number, now, CRL_VALIDITY)?);
        self.crl.store(der.clone());
        Ok(der)
    }

    /// Status of a serial for OCSP.
    pub fn status(&self, serial_hex: &str) -> CertStatus {
        match (
            self.store.cert(serial_hex),
            self.store.revocation(serial_hex),
        ) {
            (_, Ok(Some(r))) => CertStatus::Revoked {
                at: from_unix(r.revoked_unix),
                reason: RevocationReason::from_code(r.reason_code)
                    .unwrap_or(RevocationReason::Unspecified),
            },
            (Ok(Some(_)), Ok(None)) => CertStatus::Good,
            _ => CertStatus::Unknown,
        }
    }

    /// Answer an OCSP request (RFC 5019 profile: one certificate per request). Requests
    /// naming another issuer, or a serial this CA never issued, get an unsigned
    /// `unauthorized`; the others a response signed once per CertID and status and served
    /// from the cache until it is half-way to its `nextUpdate`. Nonces are not echoed (a
    /// pre-signed response cannot carry them). Blocking: signs with the CA key.
    pub fn ocsp(&self, request_der: &[u8], now: SystemTime) -> Vec<u8> {
        let q = match self.ca.ocsp_query(request_der) {
            Ok(q) => q,
            Err(refusal) => return refusal,
        };
        if !q.our_issuer {
            return zonemesh_ca::ocsp_unauthorized();
        }
        let status = self.status(&q.serial_hex);
        if status == CertStatus::Unknown {
            return zonemesh_ca::ocsp_unauthorized();
        }
        if let Some(der) = self.ocsp.get(q.cert_id(), status, now) {
            return der.to_vec();
        }
        let _one_at_a_time = self.ocsp.signing.lock();
        // Another request may have signed it while this one waited.
        if let Some(der) = self.ocsp.get(q.cert_id(), status, now) {
            return der.to_vec();
        }
        let der = match self.ca.ocsp_sign(&q, status, now) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                tracing::error!(error = %e, "OCSP signing failed");
                return zonemesh_ca::ocsp_internal_error();
            }
        };
        self.ocsp.signatures.fetch_add(1, Ordering::Relaxed);
        self.ocsp.put(
            q.cert_id(),
            CachedOcsp {
                serial_hex: q.serial_hex.clone(),
                status,
                produced: now,
                der: der.clone(),
            },
        );
        der.to_vec()
    }

    /// OCSP responses signed since start (the rest were served from the cache).
    pub fn ocsp_signatures(&self) -> u64 {
        self.ocsp.signatures.load(Ordering::Relaxed)
    }

    /// Whether a serial is revoked (checked on every Mesh call, beside the handshake CRL check).
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        !matches!(self.store.revocation(serial_hex), Ok(None))
    }
}
