//! The domains' durable state: domains with their current certificate (key sealed with the
//! KEK) and job, the edges known per zone, the edges' deployment reports, and the sealed
//! ACME account. Nothing outside this file touches these trees.

use crate::store::{Store, StoreError, StoreResult, decode, encode};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;
use zonemesh_ca::{Kek, open_sealed, seal};

const KEY_LABEL: &str = "zonemesh portal key v1";
const ACME_LABEL: &str = "zonemesh acme account v1";
const ACME_ACCOUNT: &str = "acme_account";
const JOB_SEQ: &str = "domain_job_seq";

/// Who issues a domain's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IssuerKind {
    Acme,
    Internal,
}

impl IssuerKind {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Acme => "acme",
            Self::Internal => "internal",
        }
    }

    /// Parse the CLI spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "acme" => Some(Self::Acme),
            "internal" => Some(Self::Internal),
            _ => None,
        }
    }
}

/// Where a domain (and its job) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainState {
    Pending,
    Validating,
    Issued,
    Deploying,
    Deployed,
    Failed,
}

impl DomainState {
    /// A job in this state has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Deployed | Self::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Validating => "validating",
            Self::Issued => "issued",
            Self::Deploying => "deploying",
            Self::Deployed => "deployed",
            Self::Failed => "failed",
        }
    }
}

/// A domain's certificate as stored: the key only sealed.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredCert {
    pub chain_der: Vec<Vec<u8>>,
    pub key_sealed: Vec<u8>,
    pub serial_hex: String,
    pub not_before_unix: u64,
    pub not_after_unix: u64,
}

impl std::fmt::Debug for StoredCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCert")
            .field("serial_hex", &self.serial_hex)
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

/// Why a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobCause {
    /// Deploy Certificate (button or `domain deploy`).
    Deploy,
    /// Automatic renewal at 2/3 of the lifetime.
    Renewal,
}

/// A domain's latest job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub cause: JobCause,
    pub actor: String,
    pub state: DomainState,
    pub detail: String,
    /// Attempts made so far.
    pub attempt: u32,
    /// Set once this job's certificate is issued (a retry or a resumed job only deploys).
    pub issued_serial: Option<String>,
    pub started_unix: u64,
    pub finished_unix: Option<u64>,
}

/// A domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRecord {
    pub name: String,
    pub issuer: IssuerKind,
    pub owner: String,
    pub edge_zones: Vec<String>,
    pub created_unix: u64,
    pub state: DomainState,
    pub error: Option<String>,
    /// The certificate in service.
    pub cert: Option<StoredCert>,
    pub job: Option<JobRecord>,
    /// The ACME order of the running job, so a restarted controller resumes it.
    pub order_url: Option<String>,
    /// No automatic renewal before this time (after a failed one).
    pub retry_not_before_unix: Option<u64>,
}

impl DomainRecord {
    /// The running job, if any.
    pub fn active_job(&self) -> Option<&JobRecord> {
        self.job.as_ref().filter(|j| !j.state.is_final())
    }
}

/// A node that opened WatchEdge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeRecord {
    pub zone: String,
    pub node: String,
    pub https: bool,
    pub files: bool,
    pub first_seen_unix: u64,
}

/// An edge's last report for a domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRecord {
    pub serial_hex: String,
    /// `serving` or `failed`.
    pub state: String,
    pub detail: String,
    pub staple: String,
    pub at_unix: u64,
}

/// The domain trees.
#[derive(Clone)]
pub struct DomainStore {
    store: Store,
    domains: crate::core::kv::Tree,
    edges: crate::core::kv::Tree,
    reports: crate::core::kv::Tree,
    meta: crate::core::kv::Tree,
}

impl std::fmt::Debug for DomainStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DomainStore")
    }
}

fn report_key(domain: &str, edge: &str) -> String {
    format!("{domain}\0{edge}")
}

impl DomainStore {
    /// Open the domain trees of `store`.
    pub fn open(store: &Store) -> StoreResult<Self> {
        let db = store.kv();
        Ok(Self {
            store: store.clone(),
            domains: db.open_tree("domains")?,
            edges: db.open_tree("domain_edges")?,
            reports: db.open_tree("domain_reports")?,
            meta: db.open_tree("domain_meta")?,
        })
    }

    /// The main store (nodes, flushes).
    pub fn main(&self) -> &Store {
        &self.store
    }

    pub fn domain(&self, name: &str) -> StoreResult<Option<DomainRecord>> {
        Store::get(&self.domains, "domains", name)
    }

    pub fn domains(&self) -> StoreResult<Vec<DomainRecord>> {
        Store::all(&self.domains, "domains")
    }

    /// Write a domain (the caller flushes when it must survive a crash).
    pub fn put_domain(&self, d: &DomainRecord) -> StoreResult<()> {
        self.domains.insert(d.name.as_bytes(), encode(d))?;
        Ok(())
    }

    /// Remove a domain and its reports.
    pub fn remove_domain(&self, name: &str) -> StoreResult<bool> {
        let had = self.domains.remove(name)?.is_some();
        for k in self.reports.scan_prefix(format!("{name}\0")).keys() {
            self.reports.remove(k?)?;
        }
        Ok(had)
    }

    pub fn next_job_id(&self) -> StoreResult<u64> {
        self.store.next_counter(JOB_SEQ)
    }

    pub fn edge(&self, key: &str) -> StoreResult<Option<EdgeRecord>> {
        Store::get(&self.edges, "domain_edges", key)
    }

    pub fn put_edge(&self, e: &EdgeRecord) -> StoreResult<()> {
        self.edges
            .insert(crate::store::node_key(&e.zone, &e.node), encode(e))?;
        Ok(())
    }

    /// Edges of `zones` whose node is enrolled and not revoked.
    pub fn edges_in(&self, zones: &[String]) -> StoreResult<Vec<EdgeRecord>> {
        let mut out = Vec::new();
        for v in self.edges.iter().values() {
            let e: EdgeRecord = decode("domain_edges", &v?)?;
            if !zones.contains(&e.zone) {
                continue;
            }
            let live = self
                .store
                .node(&crate::store::node_key(&e.zone, &e.node))?
                .is_some_and(|n| !n.revoked);
            if live {
                out.push(e);
            }
        }
        Ok(out)
    }

    pub fn put_report(&self, domain: &str, edge: &str, r: &ReportRecord) -> StoreResult<()> {
        self.reports.insert(report_key(domain, edge), encode(r))?;
        Ok(())
    }

    /// Forget the failures edges reported for `serial` of `domain`.
    pub fn clear_failed_reports(&self, domain: &str, serial: &str) -> StoreResult<()> {
        for kv in self.reports.scan_prefix(format!("{domain}\0")) {
            let (k, v) = kv?;
            let r: ReportRecord = decode("domain_reports", &v)?;
            if r.serial_hex == serial && r.state == "failed" {
                self.reports.remove(k)?;
            }
        }
        Ok(())
    }

    pub fn report(&self, domain: &str, edge: &str) -> StoreResult<Option<ReportRecord>> {
        Store::get(&self.reports, "domain_reports", report_key(domain, edge))
    }

    /// The sealed ACME account credentials, unsealed.
    pub fn acme_account(&self, kek: &Kek) -> Result<Option<Zeroizing<Vec<u8>>>, DomainStoreError> {
        match self.meta.get(ACME_ACCOUNT).map_err(StoreError::from)? {
            Some(sealed) => Ok(Some(open_sealed(kek, ACME_LABEL, &sealed)?)),
            None => Ok(None),
        }
    }

    /// Store the ACME account credentials sealed (flushed by the caller).
    pub fn put_acme_account(&self, kek: &Kek, creds: &[u8]) -> Result<(), DomainStoreError> {
        let sealed = seal(kek, ACME_LABEL, creds)?;
        self.meta
            .insert(ACME_ACCOUNT, sealed)
            .map_err(StoreError::from)?;
        Ok(())
    }
}

/// Store or sealing failures.
#[derive(Debug, thiserror::Error)]
pub enum DomainStoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sealed key: {0}")]
    Seal(#[from] zonemesh_ca::Error),
}

/// Seal a domain's key for storage.
pub fn seal_key(kek: &Kek, domain: &str, key: &[u8]) -> Result<Vec<u8>, zonemesh_ca::Error> {
    seal(kek, &format!("{KEY_LABEL} {domain}"), key)
}

/// Unseal a domain's key.
pub fn open_key(
    kek: &Kek,
    domain: &str,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, zonemesh_ca::Error> {
    open_sealed(kek, &format!("{KEY_LABEL} {domain}"), sealed)
}
