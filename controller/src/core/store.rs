//! The controller's durable state, on the storage interface ([`crate::core::kv`]): the
//! embedded sled store by default, or etcd.
//!
//! Every write that must survive a crash (issued serials, revocations, token use, address
//! allocations, mesh changes) is flushed before the caller replies.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::SystemTime;
use thiserror::Error;

pub use crate::core::kv::{Kv, KvError, Tree, Txn};

/// Store failures.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] crate::core::kv::KvError),
    #[error(
        "database is in use by another process (is a controller already running on this data directory?)"
    )]
    Locked,
    #[error("corrupt record in {tree}: {err}")]
    Corrupt {
        tree: &'static str,
        #[source]
        err: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("transaction conflict, retry")]
    Conflict,
    #[error(transparent)]
    Flush(#[from] crate::durable::FlushError),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A zone: a set of nodes sharing an overlay range.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ZoneRecord {
    pub name: String,
    pub cidr: ipnet::IpNet,
    #[serde(default)]
    pub intra_zone_tunnels: bool,
    pub created_unix: u64,
}

/// An enrolled node and its current certificate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub zone: String,
    pub node: String,
    pub serial_hex: String,
    pub cert_der: Vec<u8>,
    pub wg_public_key: [u8; 32],
    pub endpoints: Vec<SocketAddr>,
    pub overlay_ip: IpAddr,
    pub enrolled_unix: u64,
    pub not_after_unix: u64,
    pub revoked: bool,
}

impl NodeRecord {
    /// `zone/node`, the key of the nodes tree.
    pub fn key(&self) -> String {
        node_key(&self.zone, &self.node)
    }
}

/// Prefix in `meta` of the markers of [`Store::pending_host_revocations`].
const HOST_REVOKE_PREFIX: &str = "ssh_host_revoke/";

/// Key in `meta` of node `nkey`'s host revocation marker (value: unix seconds, big-endian).
pub fn host_revoke_key(nkey: &str) -> String {
    format!("{HOST_REVOKE_PREFIX}{nkey}")
}

/// Key of a node in the nodes tree.
pub fn node_key(zone: &str, node: &str) -> String {
    format!("{zone}/{node}")
}

/// Key in `meta` of node `nkey`'s serial generation: moved on by every transaction that
/// records a certificate for the node without rewriting its node record (TLS certificates,
/// `ca sign-csr`), so a revocation of the node that read its serials before such a write
/// fails its check on it and reads them again. Deleted with the node's revocation.
pub fn serials_gen_key(nkey: &str) -> String {
    format!("serials_gen/{nkey}")
}

/// Every certificate the CA has issued, by serial.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRecord {
    pub kind: CertKind,
    pub subject: String,
    pub not_after_unix: u64,
    pub issued_unix: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CertKind {
    Node,
    Tls,
}

/// A revocation as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevocationRecord {
    pub revoked_unix: u64,
    pub reason_code: u8,
}

/// An enrollment token; stored under the SHA-256 of the token, never the token itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub zone: String,
    pub expires_unix: u64,
    pub uses_left: u32,
    pub created_unix: u64,
    /// When its last use was taken (0: not used up, or used up before this was kept).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spent_unix: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl TokenRecord {
    /// When the token stopped being usable (its last use, else its expiry), if it has.
    pub fn ended_unix(&self, now_unix: u64) -> Option<u64> {
        if self.uses_left == 0 {
            Some(match self.spent_unix {
                0 => self.expires_unix.min(now_unix),
                t => t,
            })
        } else if self.expires_unix <= now_unix {
            Some(self.expires_unix)
        } else {
            None
        }
    }
}

/// An auto-blocked source address.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockRecord {
    pub address: IpAddr,
    pub until_unix: u64,
    pub reason: String,
    /// When the block started (0 for blocks stored before this was kept).
    #[serde(default)]
    pub since_unix: u64,
    /// Which offence of this address the block answers (1 = first; 0 = placed by hand).
    #[serde(default)]
    pub offence: u32,
}

/// The past automatic blocks of an address, so a repeat offence gets a longer block (also
/// across restarts).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OffenceRecord {
    pub offences: u32,
    pub last_unix: u64,
}

/// An operator allow-list entry (`block allow CIDR`): never blocked.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AllowRecord {
    pub net: ipnet::IpNet,
    pub added_unix: u64,
    pub note: String,
}

/// The store with zonemesh's trees.
#[derive(Clone)]
pub struct Store {
    kv: Kv,
    pub meta: Tree,
    pub ca: Tree,
    pub certs: Tree,
    pub revoked: Tree,
    pub zones: Tree,
    pub nodes: Tree,
    pub alloc: Tree,
    pub tokens: Tree,
    pub changes: Tree,
    pub blocks: Tree,
    /// WireGuard public key → `zone/node`, so enrollment checks key reuse without a scan.
    pub wgkeys: Tree,
    /// `zone/node/serial` → [`NodeSerial`]: every certificate issued to a node since it
    /// enrolled, so revoking the node revokes all of them.
    pub node_serials: Tree,
    /// Address → [`OffenceRecord`].
    pub block_offences: Tree,
    /// CIDR → [`AllowRecord`].
    pub block_allow: Tree,
}

/// A certificate issued to a node (its node certificates and its TLS certificates).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeSerial {
    pub serial_hex: String,
    pub kind: CertKind,
    pub not_after_unix: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Seconds since the Unix epoch (0 before it): the controller's one Unix-time helper.
pub fn unix(t: SystemTime) -> u64 {
    zonemesh_ca::unix_secs(t)
}

pub fn from_unix(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s)
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records always serialize")
}

pub fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        err: Box::new(e),
    })
}

impl Store {
    /// Names of the trees this type holds.
    pub const TREES: &'static [&'static str] = &[
        "meta",
        "ca",
        "certs",
        "revoked",
        "zones",
        "nodes",
        "alloc",
        "tokens",
        "changes",
        "blocks",
        "wgkeys",
        "node_serials",
        "block_offences",
        "block_allow",
    ];

    /// Open (or create) the embedded sled database in `dir`.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let kv = Kv::sled(dir).map_err(|e| match e {
            KvError::Sled(ref s) if crate::core::kv::sled::is_locked(s) => StoreError::Locked,
            other => StoreError::Db(other),
        })?;
        Self::on(kv)
    }

    /// The store of a data directory: `given` (a `--store` URL) or the one saved in
    /// `<data-dir>/store.url`, else the embedded sled store in `<data-dir>/db`.
    pub fn open_url(data_dir: &Path, given: Option<&str>) -> StoreResult<Self> {
        let url = crate::core::kv::url::StoreUrl::resolve(given, data_dir)?;
        match url.sled_dir(data_dir) {
            Some(dir) => Self::open(&dir),
            None => Self::on(url.open(data_dir)?),
        }
    }

    /// The store over an opened backend.
    pub fn on(kv: Kv) -> StoreResult<Self> {
        let t = |n: &str| kv.open_tree(n);
        Ok(Self {
            meta: t("meta")?,
            ca: t("ca")?,
            certs: t("certs")?,
            revoked: t("revoked")?,
            zones: t("zones")?,
            nodes: t("nodes")?,
            alloc: t("alloc")?,
            tokens: t("tokens")?,
            changes: t("changes")?,
            blocks: t("blocks")?,
            wgkeys: t("wgkeys")?,
            node_serials: t("node_serials")?,
            block_offences: t("block_offences")?,
            block_allow: t("block_allow")?,
            kv,
        })
    }

    /// The storage handle, for modules that keep their own trees (audit, users).
    pub fn kv(&self) -> &Kv {
        &self.kv
    }

    /// The store's durable writer, shared by every module that writes to it.
    pub fn flusher(&self) -> &crate::durable::Flusher {
        self.kv.flusher()
    }

    /// Make every write so far durable (blocking contexts; one flush shared with every
    /// caller waiting at the same time).
    pub fn flush(&self) -> StoreResult<()> {
        self.kv.flusher().flush_blocking()?;
        Ok(())
    }

    pub fn get<T: DeserializeOwned>(
        tree: &Tree,
        name: &'static str,
        key: impl AsRef<[u8]>,
    ) -> StoreResult<Option<T>> {
        tree.get(key)?.map(|v| decode(name, &v)).transpose()
    }

    pub fn all<T: DeserializeOwned>(tree: &Tree, name: &'static str) -> StoreResult<Vec<T>> {
        tree.iter().values().map(|v| decode(name, &v?)).collect()
    }

    pub fn meta_u64(&self, key: &str) -> StoreResult<u64> {
        Ok(self
            .meta
            .get(key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Atomically increment a counter in `meta` and return the new value.
    pub fn next_counter(&self, key: &str) -> StoreResult<u64> {
        let v = self.meta.update_and_fetch(key, |old| {
            let n = old
                .and_then(|o| <[u8; 8]>::try_from(o).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1))
    }

    pub fn zones(&self) -> StoreResult<Vec<ZoneRecord>> {
        Self::all(&self.zones, "zones")
    }

    pub fn zone(&self, name: &str) -> StoreResult<Option<ZoneRecord>> {
        Self::get(&self.zones, "zones", name)
    }

    pub fn nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        Self::all(&self.nodes, "nodes")
    }

    pub fn node(&self, key: &str) -> StoreResult<Option<NodeRecord>> {
        Self::get(&self.nodes, "nodes", key)
    }

    pub fn put_node(&self, n: &NodeRecord) -> StoreResult<()> {
        self.nodes.insert(n.key(), encode(n))?;
        Ok(())
    }

    /// Remember that `serial` was issued to node `nkey` (flushed by the caller).
    pub fn add_node_serial(&self, nkey: &str, serial: &NodeSerial) -> StoreResult<()> {
        self.node_serials
            .insert(format!("{nkey}/{}", serial.serial_hex), encode(serial))?;
        Ok(())
    }

    /// Every serial recorded for node `nkey` (node names contain no `/`).
    pub fn node_serials(&self, nkey: &str) -> StoreResult<Vec<NodeSerial>> {
        self.node_serials
            .scan_prefix(format!("{nkey}/"))
            .values()
            .map(|v| decode("node_serials", &v?))
            .collect()
    }

    /// Nodes revoked whose SSH host certificates may not all be revoked yet, with the
    /// time of the node's revocation (unix seconds). The marker is written in the node's
    /// revocation transaction and cleared once its host certificates are revoked, so a
    /// controller that stops in between finishes the work when it starts again.
    pub fn pending_host_revocations(&self) -> StoreResult<Vec<(String, u64)>> {
        self.meta
            .scan_prefix(HOST_REVOKE_PREFIX)
            .map(|item| {
                let (k, v) = item?;
                let nkey = String::from_utf8_lossy(&k[HOST_REVOKE_PREFIX.len()..]).into_owned();
                let at = <[u8; 8]>::try_from(v.as_slice()).map_err(|_| StoreError::Corrupt {
                    tree: "meta",
                    err: format!("bad host revocation marker for {nkey}").into(),
                })?;
                Ok((nkey, u64::from_be_bytes(at)))
            })
            .collect()
    }

    /// Clear `nkey`'s host revocation marker if it still says `at` (a later revocation
    /// of a node enrolled again under the same name keeps its own).
    pub fn clear_host_revocation(&self, nkey: &str, at: u64) -> StoreResult<()> {
        let key = host_revoke_key(nkey);
        // Lost the race: the newer marker stays for its own pass.
        let _ = self
            .meta
            .compare_and_swap(&key, Some(&at.to_be_bytes()[..]), None::<Vec<u8>>)?;
        Ok(())
    }

    /// Forget one recorded serial of node `nkey`.
    pub fn remove_node_serial(&self, nkey: &str, serial_hex: &str) -> StoreResult<()> {
        self.node_serials.remove(format!("{nkey}/{serial_hex}"))?;
        Ok(())
    }

    /// Every enrollment token record, by a short id (the first 12 hex digits of the
    /// token's hash): the token itself is never stored.
    pub fn tokens(&self) -> StoreResult<Vec<(String, TokenRecord)>> {
        self.tokens
            .iter()
            .map(|item| {
                let (k, v) = item?;
                let id = String::from_utf8_lossy(&k[..k.len().min(12)]).into_owned();
                Ok((id, decode("tokens", &v)?))
            })
            .collect()
    }

    pub fn revocation(&self, serial_hex: &str) -> StoreResult<Option<RevocationRecord>> {
        Self::get(&self.revoked, "revoked", serial_hex)
    }

    pub fn cert(&self, serial_hex: &str) -> StoreResult<Option<CertRecord>> {
        Self::get(&self.certs, "certs", serial_hex)
    }
}
