//! The SSH CA's durable state: its two keys (sealed with the KEK), the grants, and every
//! certificate it issued with its revocation. Nothing outside this file touches these
//! trees.

use crate::store::{Store, StoreResult, decode, encode};
use serde::{Deserialize, Serialize};

/// Which key the CA signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaKeyType {
    Ed25519,
    Rsa4096,
}

impl CaKeyType {
    /// The CLI spelling (`--ssh-ca-key`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::Rsa4096 => "rsa4096",
        }
    }

    /// Parse the CLI spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ed25519" => Some(Self::Ed25519),
            "rsa4096" | "rsa-4096" | "rsa" => Some(Self::Rsa4096),
            _ => None,
        }
    }
}

/// A grant: `email` may log in as `principal` on the servers of `zone`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub email: String,
    pub zone: String,
    pub principal: String,
    pub max_ttl_secs: u64,
    /// Extensions beyond `permit-pty`, OpenSSH names.
    pub extensions: Vec<String>,
    pub created_unix: u64,
}

impl GrantRecord {
    pub fn key(&self) -> String {
        grant_key(&self.email, &self.zone, &self.principal)
    }
}

/// Key of a grant in its tree (none of the parts may hold a newline).
pub fn grant_key(email: &str, zone: &str, principal: &str) -> String {
    format!("{email}\n{zone}\n{principal}")
}

/// User or host certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SshCertKind {
    User,
    Host,
}

/// A certificate the SSH CA issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshCertRecord {
    pub serial: u64,
    pub kind: SshCertKind,
    /// The key ID: the user's e-mail, or `zone/node` for a host.
    pub key_id: String,
    /// SHA-256 fingerprint of the subject key (`SHA256:...`).
    pub key_fingerprint: String,
    pub principals: Vec<String>,
    pub valid_after_unix: u64,
    pub valid_before_unix: u64,
    pub issued_unix: u64,
    pub revoked_unix: Option<u64>,
    /// A host certificate's subject key (OpenSSH, no comment), for the `@revoked` line
    /// once the node is revoked; empty for user certificates and older records.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
}

/// The SSH CA's trees.
#[derive(Clone)]
pub struct SshStore {
    store: Store,
    keys: crate::core::kv::Tree,
    grants: crate::core::kv::Tree,
    certs: crate::core::kv::Tree,
}

pub const USER_KEY: &str = "user_key_sealed";
pub const HOST_KEY: &str = "host_key_sealed";
pub const KEY_TYPE: &str = "key_type";
/// Digest of the SSH state last put on the Watch stream.
pub const PUBLISHED: &str = "published_digest";
const SERIAL_COUNTER: &str = "ssh_serial";
const KRL_COUNTER: &str = "ssh_krl_version";

impl SshStore {
    pub fn open(store: &Store) -> StoreResult<Self> {
        let db = store.kv();
        Ok(Self {
            store: store.clone(),
            keys: db.open_tree("ssh_ca")?,
            grants: db.open_tree("ssh_grants")?,
            certs: db.open_tree("ssh_certs")?,
        })
    }

    /// Make every write durable (blocking).
    pub fn flush(&self) -> StoreResult<()> {
        self.store.flush()
    }

    pub fn has_keys(&self) -> StoreResult<bool> {
        Ok(self.keys.contains_key(USER_KEY)?)
    }

    pub fn key(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.keys.get(name)?.map(|v| v.to_vec()))
    }

    /// Store both sealed keys at once; refuses when keys exist (`Ok(false)`).
    pub fn put_keys(&self, kind: CaKeyType, user: Vec<u8>, host: Vec<u8>) -> StoreResult<bool> {
        let tree = self.keys.name();
        let mut t = crate::core::kv::Txn::new();
        t.expect(tree, USER_KEY, None)
            .put(tree, KEY_TYPE, kind.as_str().as_bytes())
            .put(tree, HOST_KEY, host)
            .put(tree, USER_KEY, user);
        Ok(self.keys.kv().commit(&t)?)
    }

    /// Remember what was last published (flushed with the change log's own flush).
    pub fn put_published(&self, digest: &[u8]) -> StoreResult<()> {
        self.keys.insert(PUBLISHED, digest)?;
        Ok(())
    }

    pub fn next_serial(&self) -> StoreResult<u64> {
        self.store.next_counter(SERIAL_COUNTER)
    }

    pub fn next_krl_version(&self) -> StoreResult<u64> {
        self.store.next_counter(KRL_COUNTER)
    }

    pub fn grants(&self) -> StoreResult<Vec<GrantRecord>> {
        Store::all(&self.grants, "ssh_grants")
    }

    pub fn grant_count(&self) -> StoreResult<usize> {
        Ok(self.grants.len()?)
    }

    pub fn grants_of(&self, email: &str) -> StoreResult<Vec<GrantRecord>> {
        self.grants
            .scan_prefix(format!("{email}\n"))
            .values()
            .map(|v| decode("ssh_grants", &v?))
            .collect()
    }

    pub fn grant(&self, key: &str) -> StoreResult<Option<GrantRecord>> {
        Store::get(&self.grants, "ssh_grants", key)
    }

    pub fn put_grant(&self, g: &GrantRecord) -> StoreResult<()> {
        self.grants.insert(g.key(), encode(g))?;
        Ok(())
    }

    pub fn remove_grant(&self, key: &str) -> StoreResult<bool> {
        Ok(self.grants.remove(key)?.is_some())
    }

    pub fn put_cert(&self, c: &SshCertRecord) -> StoreResult<()> {
        self.certs.insert(c.serial.to_be_bytes(), encode(c))?;
        Ok(())
    }

    /// Write several certificate records, as many per transaction as the store takes.
    pub fn put_certs(&self, certs: &[SshCertRecord]) -> StoreResult<()> {
        let tree = self.certs.name();
        for chunk in certs.chunks(crate::core::kv::MAX_TXN_OPS) {
            let mut t = crate::core::kv::Txn::new();
            for c in chunk {
                t.put(tree, c.serial.to_be_bytes(), encode(c));
            }
            self.certs.kv().commit(&t)?;
        }
        Ok(())
    }

    pub fn cert(&self, serial: u64) -> StoreResult<Option<SshCertRecord>> {
        Store::get(&self.certs, "ssh_certs", serial.to_be_bytes())
    }

    pub fn certs(&self) -> StoreResult<Vec<SshCertRecord>> {
        Store::all(&self.certs, "ssh_certs")
    }

    /// Forget certificates that expired before `before_unix` (a KRL needs only the
    /// certificates that could still be used).
    pub fn prune_expired(&self, before_unix: u64) -> StoreResult<usize> {
        let mut n = 0;
        for item in self.certs.iter() {
            let (k, v) = item?;
            let c: SshCertRecord = decode("ssh_certs", &v)?;
            if c.valid_before_unix < before_unix {
                self.certs.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }
}
