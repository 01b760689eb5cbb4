//! The CA as the controller runs it: the `zonemesh-ca` library plus the store that records
//! every serial it issues and every revocation, and the current CRL.

use crate::core::rotation::{CaCertKind, CaCertRecord, CaCertState, CaCertView};
use crate::error::{ControllerError, Result};
use crate::store::{
    CertKind, CertRecord, NodeSerial, RevocationRecord, Store, StoreError, Txn, decode, encode,
    from_unix, unix,
};
use arc_swap::ArcSwap;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use zonemesh_ca::{
    Ca, CaMaterial, CertStatus, IssuedCert, Kek, NodePolicy, NodeRequest, RevocationReason,
    RevokedEntry, TlsNames, TlsPolicy, TrustStore, open_sealed, seal,
};
use zonemesh_proto as pb;

/// How long each CRL is valid; a fresh one is signed well before (see `CRL_REFRESH`).
pub const CRL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);
/// How often the serve loop re-signs the CRL even without revocations.
pub const CRL_REFRESH: Duration = Duration::from_secs(86_400);

/// Times a CRL change is signed again because another writer of the store moved the CRL
/// number first (or the change's own checks failed) before it gives up with a conflict.
pub const MAX_CRL_RACES: u32 = 8;
/// Key in `meta` of the last CRL number taken.
const CRL_NUMBER: &str = "crl_number";

/// Proof that the caller holds the authority's CRL lock (see [`Authority::crl_lock`]).
pub struct CrlLock<'a>(#[allow(dead_code)] parking_lot::MutexGuard<'a, ()>);

/// CRLs signed for a change that is not committed yet: the stored revocations plus the
/// serials it revokes, numbered one past the CRL number read before signing. Its writes
/// ([`PendingCrl::add_to`]) are the revocation records and the new number, checked
/// against the number read, so it applies only if no other CRL was taken meanwhile.
pub struct PendingCrl {
    number_before: Option<Vec<u8>>,
    number: u64,
    crls: Vec<Arc<Vec<u8>>>,
    newly: Vec<String>,
    record: Vec<u8>,
}

impl PendingCrl {
    /// Writes (and conditions) this CRL change adds to a transaction.
    pub const OPS: usize = 2;

    /// Add the CRL number check, the new number and the revocation records to `txn`.
    pub fn add_to(&self, txn: &mut Txn) {
        txn.expect("meta", CRL_NUMBER, self.number_before.as_deref())
            .put("meta", CRL_NUMBER, self.number.to_be_bytes());
        for s in &self.newly {
            txn.put("revoked", s.as_bytes(), self.record.clone());
        }
    }

    /// How many checks and writes [`Self::add_to`] adds.
    pub fn ops(&self) -> usize {
        Self::OPS + self.newly.len()
    }

    /// The serials this change revokes (issued here, not revoked before).
    pub fn newly(&self) -> &[String] {
        &self.newly
    }

    /// The CRL number it takes.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The issuing intermediate's CRL.
    pub fn crl_der(&self) -> Vec<u8> {
        self.crls.first().map(|c| c.to_vec()).unwrap_or_default()
    }

    /// The other trusted intermediates' CRLs.
    pub fn issuer_crls_der(&self) -> Vec<Vec<u8>> {
        self.crls.iter().skip(1).map(|c| c.to_vec()).collect()
    }

    /// Every CRL, the issuing intermediate's first.
    pub fn crls_der(&self) -> Vec<Vec<u8>> {
        self.crls.iter().map(|c| c.to_vec()).collect()
    }
}

/// The writes that record `cert` as issued to node `owner`: its certificate record, the
/// node's serial, and the node's serial generation moved on from `gen_before` (checked).
pub fn owned_cert_ops(
    txn: &mut Txn,
    owner: &str,
    cert: &IssuedCert,
    kind: CertKind,
    subject: String,
    gen_before: Option<&[u8]>,
    now: SystemTime,
) {
    let gen_key = crate::store::serials_gen_key(owner);
    let next = gen_before
        .and_then(|v| <[u8; 8]>::try_from(v).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
        + 1;
    txn.put(
        "certs",
        &cert.serial_hex,
        encode(&CertRecord {
            kind,
            subject,
            not_after_unix: unix(cert.not_after),
            issued_unix: unix(now),
        }),
    )
    .put(
        "node_serials",
        format!("{owner}/{}", cert.serial_hex),
        encode(&NodeSerial {
            serial_hex: cert.serial_hex.clone(),
            kind,
            not_after_unix: unix(cert.not_after),
        }),
    )
    .expect("meta", &gen_key, gen_before)
    .put("meta", &gen_key, next.to_be_bytes());
}

const ROOT_KEY_LABEL: &str = "zonemesh root key v1";
const INT_KEY_LABEL: &str = "zonemesh intermediate key v1";

/// The CA certificates in force: the issuing intermediate, every trusted intermediate as a
/// signer of its own CRL and OCSP answers, and what verifiers trust.
struct CaSet {
    records: Vec<CaCertRecord>,
    /// The active intermediate: every new certificate comes from it.
    issuing: Arc<Ca>,
    /// Every trusted intermediate, the issuing one first (CRLs and OCSP).
    issuers: Vec<Arc<Ca>>,
    /// Their record ids, in the same order.
    issuer_ids: Vec<String>,
    /// Trusted roots, the issuing intermediate's root first.
    roots: Vec<Vec<u8>>,
    /// Trusted intermediates (issuing first), then trusted cross-signatures: what a verifier
    /// needs between a leaf and a trusted root.
    chain_pool: Vec<Vec<u8>>,
    /// Trusted cross-signatures alone.
    cross: Vec<Vec<u8>>,
    /// When the issuing intermediate took over, and the spread nodes renew onto it in.
    rotated_unix: u64,
    spread_secs: u64,
}

/// The operating authority.
pub struct Authority {
    store: Store,
    trust_domain: String,
    set: ArcSwap<CaSet>,
    /// Serialises rotations, retirements and CRL signing.
    ca_lock: parking_lot::Mutex<()>,
    /// For unsealing a root key when rotating; wiped on drop.
    kek: Kek,
    /// Bumped whenever the CA certificates change (rotation, retirement).
    ca_changes: tokio::sync::watch::Sender<u64>,
    pub node_policy: NodePolicy,
    pub tls_policy: TlsPolicy,
    /// One CRL per trusted intermediate, in the order of `CaSet::issuers`.
    crls: ArcSwap<Vec<Arc<Vec<u8>>>>,
    ocsp: OcspCache,
    /// Counts issued and revoked certificates; shared with the rest of the controller.
    metrics: crate::metrics::Metrics,
    /// CRL changes signed again after a conflict (see [`Authority::crl_races`]).
    crl_races: AtomicU64,
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
            .field("trust_domain", &self.set.load().issuing.trust_domain())
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

    /// Load the CA from the store, unsealing the trusted intermediates' keys with the KEK.
    /// A data directory from before rotation existed gets its root and intermediate
    /// recorded as `root-1` and `int-1`, both active.
    pub fn load(store: Store, kek: &Kek, now: SystemTime) -> Result<Self> {
        if !Self::exists(&store)? {
            return Err(ControllerError::NotFound(
                "no CA in this data directory; run `zonemesh-controller init` first".into(),
            ));
        }
        let records = load_records(&store, now)?;
        let trust_domain = trust_domain_of(&store)?;
        let set = build_set(&trust_domain, records, kek)?;
        let auth = Self {
            store,
            trust_domain,
            set: ArcSwap::from_pointee(set),
            ca_lock: parking_lot::Mutex::new(()),
            kek: Kek::from_bytes(kek.as_bytes())?,
            ca_changes: tokio::sync::watch::Sender::new(0),
            node_policy: NodePolicy::default(),
            tls_policy: TlsPolicy::default(),
            crls: ArcSwap::from_pointee(Vec::new()),
            ocsp: OcspCache::default(),
            metrics: crate::metrics::Metrics::new(),
            crl_races: AtomicU64::new(0),
        };
        auth.refresh_crl(now)?;
        Ok(auth)
    }

    /// The issuing CA (the active intermediate and its root).
    pub fn ca(&self) -> Arc<Ca> {
        self.set.load().issuing.clone()
    }

    /// The controller's metrics (the authority counts certificates in them).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The chain presented after a leaf: the issuing intermediate.
    pub fn chain(&self) -> Vec<Vec<u8>> {
        vec![self.set.load().issuing.intermediate_der().to_vec()]
    }

    /// Everything a verifier may need between a leaf and a trusted root: every trusted
    /// intermediate (the issuing one first) and every trusted cross-signature. This is the
    /// chain the Watch stream gives peers without their own.
    pub fn chain_pool(&self) -> Vec<Vec<u8>> {
        self.set.load().chain_pool.clone()
    }

    /// The trusted roots (DER), the issuing intermediate's root first.
    pub fn trusted_roots(&self) -> Vec<Vec<u8>> {
        self.set.load().roots.clone()
    }

    /// The trusted cross-signatures (DER).
    pub fn cross_signatures(&self) -> Vec<Vec<u8>> {
        self.set.load().cross.clone()
    }

    /// A trust store with every trusted root, intermediate and cross-signature.
    pub fn trust_store(&self) -> TrustStore {
        let set = self.set.load();
        TrustStore::new(
            set.issuing.trust_domain(),
            set.roots.clone(),
            set.chain_pool.clone(),
        )
    }

    /// The issuing intermediate's current signed CRL (DER).
    pub fn crl_der(&self) -> Arc<Vec<u8>> {
        self.crls.load().first().cloned().unwrap_or_default()
    }

    /// The current CRL of the trusted intermediate `id` (`int-N`), if it is trusted.
    pub fn crl_of(&self, id: &str) -> Option<Arc<Vec<u8>>> {
        let i = self.set.load().issuer_ids.iter().position(|x| x == id)?;
        self.crls.load().get(i).cloned()
    }

    /// The CRLs of every trusted intermediate, the issuing one's first.
    pub fn crls_der(&self) -> Vec<Vec<u8>> {
        self.crls.load().iter().map(|c| c.to_vec()).collect()
    }

    /// The CRLs of the trusted intermediates other than the issuing one.
    pub fn issuer_crls_der(&self) -> Vec<Vec<u8>> {
        self.crls
            .load()
            .iter()
            .skip(1)
            .map(|c| c.to_vec())
            .collect()
    }

    /// Changes whenever the CA certificates do (a rotation or a retirement).
    pub fn ca_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ca_changes.subscribe()
    }

    /// Every CA certificate with its state, newest generation first within each kind:
    /// what `ca show` and the console's CA page list.
    pub fn ca_certificates(&self) -> Vec<CaCertView> {
        let set = self.set.load();
        let mut v: Vec<&CaCertRecord> = set.records.iter().collect();
        v.sort_by_key(|r| (r.kind as u8, std::cmp::Reverse(r.generation)));
        v.into_iter().map(CaCertView::of).collect()
    }

    /// One CA certificate (DER) by its id, whatever its state.
    pub fn ca_certificate_der(&self, id: &str) -> Option<Vec<u8>> {
        self.set
            .load()
            .records
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.der.clone())
    }

    /// The CA bundle for the Watch stream and renew replies.
    pub fn ca_bundle(&self) -> pb::CaBundle {
        let set = self.set.load();
        let trusted = |k: CaCertKind| {
            set.records
                .iter()
                .filter(move |r| r.kind == k && r.state.trusted())
        };
        pb::CaBundle {
            roots: set.roots.clone(),
            intermediates: set
                .issuers
                .iter()
                .map(|c| c.intermediate_der().to_vec())
                .collect(),
            cross_signatures: trusted(CaCertKind::CrossSigned)
                .map(|r| r.der.clone())
                .collect(),
            rotated_unix: set.rotated_unix,
            spread_secs: set.spread_secs,
        }
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

    /// Remember which node a serial was issued to, so revoking the node revokes it: the
    /// certificate record, the node's serial and a bump of the node's serial generation in
    /// one transaction (a revocation of the node that read its serials before fails its
    /// check on the generation and reads them again).
    fn record_owner(
        &self,
        owner: &str,
        cert: &IssuedCert,
        kind: CertKind,
        subject: String,
        now: SystemTime,
    ) -> Result<()> {
        for _ in 0..MAX_CRL_RACES {
            let gen_key = crate::store::serials_gen_key(owner);
            let before = self
                .store
                .meta
                .get(&gen_key)
                .map_err(crate::store::StoreError::from)?;
            let mut txn = Txn::new();
            owned_cert_ops(
                &mut txn,
                owner,
                cert,
                kind,
                subject.clone(),
                before.as_deref(),
                now,
            );
            if self
                .store
                .kv()
                .commit(&txn)
                .map_err(crate::store::StoreError::from)?
            {
                return Ok(());
            }
        }
        Err(crate::store::StoreError::Conflict.into())
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
        Ok(self.ca().sign_node_csr(&self.node_policy, req, now)?)
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
        self.record_owner(&nkey, cert, CertKind::Node, nkey.clone(), now)?;
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
            .ca()
            .sign_tls_csr(&self.tls_policy, csr, names, lifetime, now)?;
        match owner {
            Some(owner) => {
                self.record_owner(owner, &cert, CertKind::Tls, format!("{names:?}"), now)?;
                self.store.flush()?;
                self.metrics
                    .certificate_issued(crate::metrics::CertKind::Tls);
                Ok(cert)
            }
            None => self.record_tls(cert, names, now),
        }
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
            .ca()
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

    /// Revoke a serial this CA issued: the revocation record, the CRL number and the new
    /// CRLs listing it in one transaction, flushed (no change-log entry: without a running
    /// mesh, `ca revoke` on the store; [`crate::mesh::Mesh::revoke_serial`] otherwise).
    pub fn revoke(
        &self,
        serial_hex: &str,
        reason: RevocationReason,
        now: SystemTime,
    ) -> Result<()> {
        self.revoke_with(serial_hex, reason, now, |_| Ok(()))
    }

    /// [`Self::revoke`] with further writes of the caller's in the same transaction
    /// (`extra` is called again for every try).
    pub fn revoke_with(
        &self,
        serial_hex: &str,
        reason: RevocationReason,
        now: SystemTime,
        mut extra: impl FnMut(&mut Txn) -> Result<()>,
    ) -> Result<()> {
        let serial = self.known_serial(serial_hex)?;
        let lock = self.crl_lock();
        for _ in 0..MAX_CRL_RACES {
            let pending = self.sign_pending(&lock, std::slice::from_ref(&serial), reason, now)?;
            if pending.newly().is_empty() {
                return Err(ControllerError::AlreadyExists(format!(
                    "serial {serial} is already revoked"
                )));
            }
            let mut txn = Txn::new();
            extra(&mut txn)?;
            pending.add_to(&mut txn);
            if self
                .store
                .kv()
                .commit(&txn)
                .map_err(crate::store::StoreError::from)?
            {
                self.install_pending(&lock, pending);
                self.store.flush()?;
                return Ok(());
            }
            self.crl_races.fetch_add(1, Ordering::Relaxed);
        }
        Err(crate::store::StoreError::Conflict.into())
    }

    /// The canonical form of a serial given by an operator, which this CA must have issued.
    pub fn known_serial(&self, serial_hex: &str) -> Result<String> {
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
        Ok(serial)
    }

    /// One CRL change at a time on this controller: held from signing a [`PendingCrl`]
    /// until it is committed and installed (rotations and retirements take it too).
    pub fn crl_lock(&self) -> CrlLock<'_> {
        CrlLock(self.ca_lock.lock())
    }

    /// Sign the CRL of every trusted intermediate from the stored revocations plus
    /// `serials` (those this CA issued and that are not revoked yet), numbered one past
    /// the stored CRL number; nothing is written. The caller commits
    /// [`PendingCrl::add_to`] with its own writes, then [`Self::install_pending`]; when the
    /// CRL number moved meanwhile (another writer of the store), the commit's check fails
    /// and the caller signs again. Blocking (RSA signatures).
    pub fn sign_pending(
        &self,
        _lock: &CrlLock<'_>,
        serials: &[String],
        reason: RevocationReason,
        now: SystemTime,
    ) -> Result<PendingCrl> {
        // The number first: a revocation writes its records and the number together, so
        // records read after this number include every revocation it counts.
        let number_before = self
            .store
            .meta
            .get(CRL_NUMBER)
            .map_err(crate::store::StoreError::from)?;
        let number = number_before
            .as_deref()
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
            + 1;
        let mut entries = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for item in self.store.revoked.iter() {
            let (k, v) = item.map_err(crate::store::StoreError::from)?;
            let rec: RevocationRecord = crate::store::decode("revoked", &v)?;
            let serial_hex = String::from_utf8_lossy(&k).into_owned();
            seen.insert(serial_hex.clone());
            entries.push(RevokedEntry {
                serial_hex,
                revoked_at: from_unix(rec.revoked_unix),
                reason: RevocationReason::from_code(rec.reason_code)
                    .unwrap_or(RevocationReason::Unspecified),
            });
        }
        let mut newly = Vec::new();
        for s in serials {
            if seen.contains(s) || self.store.cert(s)?.is_none() {
                continue;
            }
            seen.insert(s.clone());
            newly.push(s.clone());
            entries.push(RevokedEntry {
                serial_hex: s.clone(),
                revoked_at: from_unix(unix(now)),
                reason,
            });
        }
        // Every CRL lists every revocation: serials are random 128-bit numbers, so a serial
        // of one intermediate never names a certificate of another.
        let set = self.set.load_full();
        let crls = set
            .issuers
            .iter()
            .map(|ca| Ok(Arc::new(ca.crl(&entries, number, now, CRL_VALIDITY)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(PendingCrl {
            number_before,
            number,
            crls,
            newly,
            record: encode(&RevocationRecord {
                revoked_unix: unix(now),
                reason_code: reason.code(),
            }),
        })
    }

    /// Serve the CRLs of a committed [`PendingCrl`] from now on.
    pub fn install_pending(&self, _lock: &CrlLock<'_>, pending: PendingCrl) {
        for s in &pending.newly {
            self.ocsp.forget(s);
        }
        if !pending.newly.is_empty() {
            self.metrics
                .certificates_revoked(pending.newly.len() as u64);
        }
        self.crls.store(Arc::new(pending.crls));
    }

    /// Times a CRL change was signed again because another writer moved the CRL number.
    pub fn crl_races(&self) -> u64 {
        self.crl_races.load(Ordering::Relaxed)
    }

    /// Count one CRL change signed again (see [`Self::crl_races`]).
    pub fn note_crl_race(&self) {
        self.crl_races.fetch_add(1, Ordering::Relaxed);
    }

    /// Serve the CRLs another controller of the same store signed (followed from the
    /// shared change log) from now on: the issuing intermediate's, then the others'. After
    /// a rotation or retirement made through another controller, call
    /// [`Authority::reload_ca`] first, so the CRLs line up with the trusted intermediates.
    pub fn adopt_crls(&self, issuing: Vec<u8>, others: Vec<Vec<u8>>) {
        let mut v = vec![Arc::new(issuing)];
        v.extend(others.into_iter().map(Arc::new));
        self.crls.store(Arc::new(v));
    }

    /// Re-sign the CRL of every trusted intermediate from the revocations in the store
    /// and take the next CRL number (checked, so it never numbers a CRL that misses a
    /// revocation committed meanwhile); returns the issuing intermediate's. Served here
    /// only: [`crate::mesh::Mesh::publish_crl`] signs and publishes in one transaction.
    pub fn refresh_crl(&self, now: SystemTime) -> Result<Arc<Vec<u8>>> {
        let lock = self.crl_lock();
        self.refresh_crl_locked(&lock, now)
    }

    fn refresh_crl_locked(&self, lock: &CrlLock<'_>, now: SystemTime) -> Result<Arc<Vec<u8>>> {
        for _ in 0..MAX_CRL_RACES {
            let pending = self.sign_pending(lock, &[], RevocationReason::Unspecified, now)?;
            let mut txn = Txn::new();
            pending.add_to(&mut txn);
            if self
                .store
                .kv()
                .commit(&txn)
                .map_err(crate::store::StoreError::from)?
            {
                let first = pending.crls.first().cloned().unwrap_or_default();
                self.install_pending(lock, pending);
                return Ok(first);
            }
            self.crl_races.fetch_add(1, Ordering::Relaxed);
        }
        Err(crate::store::StoreError::Conflict.into())
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
        // Answered by whichever trusted intermediate the request names.
        let set = self.set.load_full();
        let mut found = None;
        for ca in &set.issuers {
            match ca.ocsp_query(request_der) {
                Ok(q) if q.our_issuer => {
                    found = Some((ca.clone(), q));
                    break;
                }
                Ok(_) => {}
                Err(refusal) => return refusal,
            }
        }
        let Some((ca, q)) = found else {
            return zonemesh_ca::ocsp_unauthorized();
        };
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
        let der = match ca.ocsp_sign(&q, status, now) {
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

/// What a rotation made.
#[derive(Clone, Debug, Serialize)]
pub struct Rotated {
    /// The certificates it added (the new intermediate; with a new root also the root and
    /// its cross-signature).
    pub added: Vec<CaCertView>,
    /// The certificates it moved to retiring.
    pub retiring: Vec<CaCertView>,
}

impl Authority {
    /// `ca rotate-intermediate`: a new RSA-4096 intermediate under the active root, issuing
    /// from now on. The previous one is retiring until the last certificate issued before
    /// now has expired. Nodes on older intermediates renew onto it within `spread`.
    /// Blocking (an RSA-4096 key).
    pub fn rotate_intermediate(&self, spread: Duration, now: SystemTime) -> Result<Rotated> {
        let lock = self.crl_lock();
        let mut records = self.set.load().records.clone();
        let root = records
            .iter()
            .find(|r| r.kind == CaCertKind::Root && r.state == CaCertState::Active)
            .cloned()
            .ok_or_else(|| ControllerError::CaRecords("no active root".into()))?;
        let root_key = self.unseal(&root)?;
        let generation = next_generation(&records, CaCertKind::Intermediate);
        let new = zonemesh_ca::generate_intermediate(
            &self.trust_domain,
            &root.der,
            &root_key,
            generation,
            now,
        )?;
        let last_expiry = self.last_expiry(now)?;
        let mut retiring = Vec::new();
        for r in records.iter_mut() {
            if r.kind == CaCertKind::Intermediate && r.state == CaCertState::Active {
                r.state = CaCertState::Retiring;
                r.since_unix = unix(now);
                r.retire_at_unix = last_expiry.max(unix(now));
                retiring.push(r.clone());
            }
        }
        let id = format!("int-{generation}");
        let rec = CaCertRecord {
            key_sealed: seal(
                &self.kek,
                &key_label(CaCertKind::Intermediate, &id),
                &new.key_pkcs8,
            )?,
            id,
            kind: CaCertKind::Intermediate,
            generation,
            der: new.cert_der,
            issuer_id: root.id.clone(),
            state: CaCertState::Active,
            since_unix: unix(now),
            retire_at_unix: 0,
            spread_secs: spread.as_secs(),
        };
        records.push(rec.clone());
        self.install_records(&lock, records, &[&rec], &retiring, now)?;
        Ok(Rotated {
            added: vec![CaCertView::of(&rec)],
            retiring: retiring.iter().map(CaCertView::of).collect(),
        })
    }

    /// `ca rotate-root`: a new RSA-4096 root, cross-signed by the active root, and a new
    /// intermediate under it, issuing from now on. The old root, its cross-signatures and
    /// every intermediate under it are retiring and retired after `grace` (sooner for an
    /// intermediate whose certificates have all expired). `grace` must cover `spread`, so
    /// every node renews while its old chain still verifies. Blocking (two RSA-4096 keys).
    pub fn rotate_root(
        &self,
        grace: Duration,
        spread: Duration,
        now: SystemTime,
    ) -> Result<Rotated> {
        if grace < spread {
            return Err(ControllerError::BadRequest(format!(
                "--grace ({} s) must be at least the renewal spread ({} s)",
                grace.as_secs(),
                spread.as_secs()
            )));
        }
        let lock = self.crl_lock();
        let mut records = self.set.load().records.clone();
        let old = records
            .iter()
            .find(|r| r.kind == CaCertKind::Root && r.state == CaCertState::Active)
            .cloned()
            .ok_or_else(|| ControllerError::CaRecords("no active root".into()))?;
        let old_key = self.unseal(&old)?;
        let root_gen = next_generation(&records, CaCertKind::Root);
        let int_gen = next_generation(&records, CaCertKind::Intermediate);
        let new = zonemesh_ca::generate_root(
            &self.trust_domain,
            &old.der,
            &old_key,
            root_gen,
            int_gen,
            now,
        )?;
        let grace_end = unix(now + grace);
        let last_expiry = self.last_expiry(now)?.max(unix(now));
        let mut retiring = Vec::new();
        for r in records.iter_mut() {
            if !r.state.trusted() {
                continue;
            }
            let under_old = r.id == old.id
                || (r.kind == CaCertKind::Intermediate && r.issuer_id == old.id)
                || r.kind == CaCertKind::CrossSigned;
            if !under_old {
                continue;
            }
            let end = match r.kind {
                CaCertKind::Intermediate if r.state == CaCertState::Retiring => {
                    r.retire_at_unix.min(grace_end)
                }
                CaCertKind::Intermediate => last_expiry.min(grace_end),
                _ => grace_end,
            };
            if r.state == CaCertState::Active {
                r.since_unix = unix(now);
            }
            r.state = CaCertState::Retiring;
            r.retire_at_unix = end;
            retiring.push(r.clone());
        }
        let root_id = format!("root-{root_gen}");
        let int_id = format!("int-{int_gen}");
        let root_rec = CaCertRecord {
            key_sealed: seal(
                &self.kek,
                &key_label(CaCertKind::Root, &root_id),
                &new.root.key_pkcs8,
            )?,
            id: root_id.clone(),
            kind: CaCertKind::Root,
            generation: root_gen,
            der: new.root.cert_der,
            issuer_id: String::new(),
            state: CaCertState::Active,
            since_unix: unix(now),
            retire_at_unix: 0,
            spread_secs: 0,
        };
        // The cross-signature is only of use while the old root is trusted.
        let cross_rec = CaCertRecord {
            id: format!("cross-{root_gen}"),
            kind: CaCertKind::CrossSigned,
            generation: root_gen,
            der: new.cross_der,
            key_sealed: Vec::new(),
            issuer_id: old.id.clone(),
            state: CaCertState::Retiring,
            since_unix: unix(now),
            retire_at_unix: grace_end,
            spread_secs: 0,
        };
        let int_rec = CaCertRecord {
            key_sealed: seal(
                &self.kek,
                &key_label(CaCertKind::Intermediate, &int_id),
                &new.intermediate.key_pkcs8,
            )?,
            id: int_id,
            kind: CaCertKind::Intermediate,
            generation: int_gen,
            der: new.intermediate.cert_der,
            issuer_id: root_id,
            state: CaCertState::Active,
            since_unix: unix(now),
            retire_at_unix: 0,
            spread_secs: spread.as_secs(),
        };
        records.extend([root_rec.clone(), cross_rec.clone(), int_rec.clone()]);
        self.install_records(
            &lock,
            records,
            &[&root_rec, &cross_rec, &int_rec],
            &retiring,
            now,
        )?;
        Ok(Rotated {
            added: [&root_rec, &cross_rec, &int_rec]
                .into_iter()
                .map(CaCertView::of)
                .collect(),
            retiring: retiring.iter().map(CaCertView::of).collect(),
        })
    }

    /// Retire every retiring certificate whose time has come (a root takes everything
    /// under it along). Returns the ones retired; when there are any the CA changed.
    pub fn retire_due(&self, now: SystemTime) -> Result<Vec<CaCertView>> {
        let set = self.set.load_full();
        let t = unix(now);
        let due = |r: &CaCertRecord| r.state == CaCertState::Retiring && r.retire_at_unix <= t;
        if !set.records.iter().any(due) {
            return Ok(Vec::new());
        }
        let lock = self.crl_lock();
        let mut records = self.set.load().records.clone();
        let retired_roots: Vec<String> = records
            .iter()
            .filter(|r| r.kind == CaCertKind::Root && due(r))
            .map(|r| r.id.clone())
            .collect();
        let mut changed = Vec::new();
        for r in records.iter_mut() {
            let with_root = r.state.trusted()
                && r.kind != CaCertKind::Root
                && retired_roots.contains(&r.issuer_id);
            if due(r) || with_root {
                r.state = CaCertState::Retired;
                r.since_unix = t;
                changed.push(r.clone());
            }
        }
        self.install_records(&lock, records, &[], &changed, now)?;
        Ok(changed.iter().map(CaCertView::of).collect())
    }

    /// Read the CA records from the store again and put them in force when they differ
    /// from the ones held: a rotation or retirement another controller of the same store
    /// made. The trusted intermediates' keys are unsealed with this controller's KEK; the
    /// CRLs stay as they are (the caller adopts those the change carried). Watchers of
    /// [`Authority::ca_changes`] are told, so this controller's own TLS certificate moves
    /// to the new intermediate. Returns whether anything changed. Blocking (store reads,
    /// unsealing and parsing RSA keys).
    pub fn reload_ca(&self, now: SystemTime) -> Result<bool> {
        let _one = self.ca_lock.lock();
        let records = load_records(&self.store, now)?;
        let same = {
            let held = &self.set.load().records;
            let key = |v: &[CaCertRecord]| {
                let mut k: Vec<Vec<u8>> = v.iter().map(encode).collect();
                k.sort();
                k
            };
            key(held) == key(&records)
        };
        if same {
            return Ok(false);
        }
        let set = build_set(&self.trust_domain, records, &self.kek)?;
        let ids = (set.issuer_ids.first().cloned(), set.roots.len());
        self.set.store(Arc::new(set));
        self.ca_changes.send_modify(|g| *g += 1);
        tracing::info!(
            issuing = ids.0.as_deref().unwrap_or(""),
            trusted_roots = ids.1,
            "CA certificates reloaded from the store (changed through another controller)"
        );
        Ok(true)
    }

    /// The earliest time a retiring certificate is due to be retired.
    pub fn next_retirement(&self) -> Option<SystemTime> {
        self.set
            .load()
            .records
            .iter()
            .filter(|r| r.state == CaCertState::Retiring)
            .map(|r| from_unix(r.retire_at_unix))
            .min()
    }

    /// The latest expiry of an unrevoked certificate issued up to `now` (0 when none).
    fn last_expiry(&self, now: SystemTime) -> Result<u64> {
        let now = unix(now);
        let mut last = 0;
        for item in self.store.certs.iter() {
            let (k, v) = item.map_err(crate::store::StoreError::from)?;
            let rec: CertRecord = decode("certs", &v)?;
            if rec.issued_unix <= now && rec.not_after_unix > last {
                let serial = String::from_utf8_lossy(&k);
                if self.store.revocation(&serial)?.is_none() {
                    last = rec.not_after_unix;
                }
            }
        }
        Ok(last)
    }

    fn unseal(&self, r: &CaCertRecord) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        open_key(&self.kek, r)
    }

    /// Write the `added` and `changed` records (one transaction, see
    /// [`Self::commit_records`]), flush, and put the new set in force: new CRLs, then the
    /// change announced (the caller publishes it to watchers).
    fn install_records(
        &self,
        lock: &CrlLock<'_>,
        records: Vec<CaCertRecord>,
        added: &[&CaCertRecord],
        changed: &[CaCertRecord],
        now: SystemTime,
    ) -> Result<()> {
        let set = build_set(&self.trust_domain, records, &self.kek)?;
        self.commit_records(added, changed)?;
        self.store.flush()?;
        self.set.store(Arc::new(set));
        self.refresh_crl_locked(lock, now)?;
        self.store.flush()?;
        self.ca_changes.send_modify(|g| *g += 1);
        Ok(())
    }
}

impl Authority {
    /// Write a rotation's or retirement's records in one transaction, applied only if the
    /// stored records are still those it was planned from (the ones held): the new ones
    /// absent, the changed ones as held. Another controller's rotation in between, or a
    /// store that fails, leaves the CA as it was, with a clear error.
    fn commit_records(&self, added: &[&CaCertRecord], changed: &[CaCertRecord]) -> Result<()> {
        let conflict = || {
            ControllerError::BadRequest(
                "the CA was changed by another controller meanwhile; nothing was changed \
                 (run the command again)"
                    .into(),
            )
        };
        let tree = self.store.ca.name();
        let held = self.set.load();
        let mut txn = Txn::new();
        for r in added {
            txn.expect(tree, r.key(), None)
                .put(tree, r.key(), encode(*r));
        }
        for r in changed {
            let stored = self.store.ca.get(r.key()).map_err(StoreError::from)?;
            let as_stored = match &stored {
                Some(b) => Some(encode(&decode::<CaCertRecord>("ca", b)?)),
                None => None,
            };
            let as_held = held.records.iter().find(|h| h.id == r.id).map(encode);
            if as_stored.is_none() || as_stored != as_held {
                return Err(conflict());
            }
            txn.expect(tree, r.key(), stored.as_deref())
                .put(tree, r.key(), encode(r));
        }
        if !self.store.kv().commit(&txn).map_err(StoreError::from)? {
            return Err(conflict());
        }
        Ok(())
    }
}

const CA_RECORD_PREFIX: &str = "cert/";

fn key_label(kind: CaCertKind, id: &str) -> String {
    match (kind, id) {
        (CaCertKind::Root, "root-1") => ROOT_KEY_LABEL.into(),
        (CaCertKind::Intermediate, "int-1") => INT_KEY_LABEL.into(),
        _ => format!("zonemesh {} key {id}", kind.as_str()),
    }
}

fn open_key(kek: &Kek, r: &CaCertRecord) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    open_sealed(kek, &key_label(r.kind, &r.id), &r.key_sealed).map_err(|e| match e {
        zonemesh_ca::Error::Unseal => ControllerError::PermissionDenied(
            "cannot unseal the CA key: wrong key-encryption key".into(),
        ),
        other => ControllerError::Ca(other),
    })
}

fn next_generation(records: &[CaCertRecord], kind: CaCertKind) -> u32 {
    records
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.generation)
        .max()
        .unwrap_or(0)
        + 1
}

fn trust_domain_of(store: &Store) -> Result<String> {
    let v = store
        .ca
        .get("trust_domain")
        .map_err(crate::store::StoreError::from)?
        .ok_or_else(|| {
            ControllerError::NotFound("no trust domain in this data directory".into())
        })?;
    String::from_utf8(v.to_vec()).map_err(|e| {
        crate::store::StoreError::Corrupt {
            tree: "ca",
            err: Box::new(e),
        }
        .into()
    })
}

/// The stored CA records; the root and intermediate `init` wrote before rotation existed
/// become `root-1` and `int-1` the first time.
fn load_records(store: &Store, now: SystemTime) -> Result<Vec<CaCertRecord>> {
    let mut records = Vec::new();
    for v in store.ca.scan_prefix(CA_RECORD_PREFIX).values() {
        let v = v.map_err(crate::store::StoreError::from)?;
        records.push(decode::<CaCertRecord>("ca", &v)?);
    }
    if !records.is_empty() {
        return Ok(records);
    }
    let get = |k: &str| -> Result<Vec<u8>> {
        store
            .ca
            .get(k)
            .map_err(crate::store::StoreError::from)?
            .map(|v| v.to_vec())
            .ok_or_else(|| ControllerError::NotFound(format!("the CA record {k:?} is missing")))
    };
    let root = CaCertRecord {
        id: "root-1".into(),
        kind: CaCertKind::Root,
        generation: 1,
        der: get("root_cert")?,
        key_sealed: get("root_key_sealed")?,
        issuer_id: String::new(),
        state: CaCertState::Active,
        since_unix: unix(now),
        retire_at_unix: 0,
        spread_secs: 0,
    };
    let int = CaCertRecord {
        id: "int-1".into(),
        kind: CaCertKind::Intermediate,
        generation: 1,
        der: get("int_cert")?,
        key_sealed: get("int_key_sealed")?,
        issuer_id: "root-1".into(),
        state: CaCertState::Active,
        since_unix: unix(now),
        retire_at_unix: 0,
        spread_secs: 0,
    };
    // Once: a controller starting beside this one on the same store may write them first,
    // and then its records are the ones in force.
    let tree = store.ca.name();
    let mut txn = Txn::new();
    for r in [&root, &int] {
        txn.expect(tree, r.key(), None)
            .put(tree, r.key(), encode(r));
    }
    if !store.kv().commit(&txn).map_err(StoreError::from)? {
        return load_records(store, now);
    }
    store.flush()?;
    Ok(vec![root, int])
}

/// The CA set the records describe: the active intermediate's key and every trusted
/// intermediate's key unsealed.
fn build_set(trust_domain: &str, records: Vec<CaCertRecord>, kek: &Kek) -> Result<CaSet> {
    let by_id = |id: &str| records.iter().find(|r| r.id == id);
    let mut ints: Vec<&CaCertRecord> = records
        .iter()
        .filter(|r| r.kind == CaCertKind::Intermediate && r.state.trusted())
        .collect();
    // The active one first, then the newest.
    ints.sort_by_key(|r| {
        (
            r.state != CaCertState::Active,
            std::cmp::Reverse(r.generation),
        )
    });
    let active = ints
        .first()
        .filter(|r| r.state == CaCertState::Active)
        .copied()
        .ok_or_else(|| ControllerError::CaRecords("no active intermediate".into()))?;
    let mut issuers = Vec::new();
    for r in &ints {
        let root = by_id(&r.issuer_id)
            .ok_or_else(|| ControllerError::CaRecords(format!("{} has no root", r.id)))?;
        let key = open_key(kek, r)?;
        issuers.push(Arc::new(Ca::load(trust_domain, &root.der, &r.der, &key)?));
    }
    let issuing_root = active.issuer_id.clone();
    let mut roots: Vec<&CaCertRecord> = records
        .iter()
        .filter(|r| r.kind == CaCertKind::Root && r.state.trusted())
        .collect();
    roots.sort_by_key(|r| (r.id != issuing_root, std::cmp::Reverse(r.generation)));
    let cross: Vec<Vec<u8>> = records
        .iter()
        .filter(|r| r.kind == CaCertKind::CrossSigned && r.state.trusted())
        .map(|r| r.der.clone())
        .collect();
    let mut chain_pool: Vec<Vec<u8>> = ints.iter().map(|r| r.der.clone()).collect();
    chain_pool.extend(cross.iter().cloned());
    Ok(CaSet {
        issuer_ids: ints.iter().map(|r| r.id.clone()).collect(),
        rotated_unix: active.since_unix,
        spread_secs: active.spread_secs,
        issuing: issuers[0].clone(),
        issuers,
        roots: roots.into_iter().map(|r| r.der.clone()).collect(),
        chain_pool,
        cross,
        records,
    })
}

#[cfg(test)]
mod rotation_tests {
    use super::*;
    use zonemesh_ca::WireGuardKey;

    fn states(auth: &Authority) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = auth
            .ca_certificates()
            .into_iter()
            .map(|c| (c.id, c.state))
            .collect();
        v.sort();
        v
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = v
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rotations_keep_old_chains_trusted_and_revocable_until_they_retire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let kek = Kek::generate();
        let now = SystemTime::now();
        let m = CaMaterial::generate("rot.test", now, |_| {}).unwrap();
        Authority::install(&store, &kek, &m).unwrap();
        let auth = Authority::load(store.clone(), &kek, now).unwrap();
        let key = zonemesh_ca::generate_rsa_4096().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec();
        let req = |node: &'static str| NodeRequest {
            csr_der: &csr,
            zone: "z",
            node,
            wg_public_key: WireGuardKey([7; 32]),
        };
        let old = auth.issue_node(&req("n1"), now).unwrap();
        let old_chain = vec![old.der.clone(), auth.chain()[0].clone()];
        let spare = auth.issue_node(&req("n2"), now).unwrap();
        let spare_chain = vec![spare.der.clone(), auth.chain()[0].clone()];

        let r = auth
            .rotate_intermediate(Duration::from_secs(60), now)
            .unwrap();
        assert_eq!(r.added[0].id, "int-2");
        assert_eq!(r.retiring[0].id, "int-1");
        assert_eq!(
            states(&auth),
            pairs(&[
                ("root-1", "active"),
                ("int-1", "retiring"),
                ("int-2", "active")
            ])
        );
        // New certificates come from the new intermediate; both chains verify, each with
        // its own intermediate's CRL.
        let new = auth.issue_node(&req("n3"), now).unwrap();
        let new_chain = vec![new.der.clone(), auth.chain()[0].clone()];
        assert_ne!(new_chain[1], old_chain[1]);
        assert_eq!(auth.crls_der().len(), 2);
        let trust = auth.trust_store();
        trust
            .verify_node_chain(&old_chain, &auth.crls_der(), now)
            .unwrap();
        trust
            .verify_node_chain(&new_chain, &auth.crls_der(), now)
            .unwrap();
        // A revoked certificate of the retiring intermediate is refused.
        auth.revoke(&old.serial_hex, RevocationReason::KeyCompromise, now)
            .unwrap();
        assert!(matches!(
            auth.trust_store()
                .verify_node_chain(&old_chain, &auth.crls_der(), now),
            Err(zonemesh_ca::Error::Revoked)
        ));
        assert!(matches!(
            auth.status(&old.serial_hex),
            CertStatus::Revoked { .. }
        ));

        // The states survive a restart.
        drop(auth);
        let auth = Authority::load(store.clone(), &kek, now).unwrap();
        assert_eq!(
            states(&auth),
            pairs(&[
                ("root-1", "active"),
                ("int-1", "retiring"),
                ("int-2", "active")
            ])
        );

        // A new root: cross-signed, both roots trusted; a new leaf verifies under the new
        // root, and through the cross-signature for a verifier that knows only the old one.
        let grace = Duration::from_secs(3600);
        assert!(
            auth.rotate_root(Duration::from_secs(10), Duration::from_secs(60), now)
                .is_err(),
            "a grace shorter than the spread is refused"
        );
        auth.rotate_root(grace, Duration::from_secs(60), now)
            .unwrap();
        assert_eq!(
            states(&auth),
            pairs(&[
                ("root-1", "retiring"),
                ("int-1", "retiring"),
                ("int-2", "retiring"),
                ("cross-2", "retiring"),
                ("root-2", "active"),
                ("int-3", "active"),
            ])
        );
        assert_eq!(auth.trusted_roots().len(), 2);
        let leaf = auth.issue_node(&req("n4"), now).unwrap();
        let chain = vec![leaf.der.clone(), auth.chain()[0].clone()];
        auth.trust_store()
            .verify_node_chain(&chain, &auth.crls_der(), now)
            .unwrap();
        let old_root_only =
            TrustStore::new("rot.test", vec![m.root_cert_der.clone()], auth.chain_pool());
        old_root_only
            .verify_node_chain(&chain, &auth.crls_der(), now)
            .unwrap();
        auth.trust_store()
            .verify_node_chain(&spare_chain, &auth.crls_der(), now)
            .unwrap();

        // After the grace the old root and everything under it is retired: its chains stop
        // verifying, the new ones go on.
        assert!(auth.retire_due(now).unwrap().is_empty());
        let retired = auth.retire_due(now + grace).unwrap();
        assert_eq!(retired.len(), 4, "{retired:?}");
        assert_eq!(
            states(&auth),
            pairs(&[
                ("root-1", "retired"),
                ("int-1", "retired"),
                ("int-2", "retired"),
                ("cross-2", "retired"),
                ("root-2", "active"),
                ("int-3", "active"),
            ])
        );
        assert_eq!(auth.trusted_roots().len(), 1);
        assert_eq!(auth.crls_der().len(), 1);
        assert!(
            auth.trust_store()
                .verify_node_chain(&spare_chain, &auth.crls_der(), now)
                .is_err()
        );
        auth.trust_store()
            .verify_node_chain(&chain, &auth.crls_der(), now)
            .unwrap();
    }
}
