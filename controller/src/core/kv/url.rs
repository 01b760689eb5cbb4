//! `--store` values:
//!
//! - `sled` — the embedded store in `<data-dir>/db` (the default);
//! - `sled:DIR` — an embedded store in DIR;
//! - `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` — an etcd cluster over plain gRPC, keys
//!   under `/PREFIX/` (default `/zonemesh/`);
//! - `etcds://HOST:PORT[,...][/PREFIX]?ca=FILE[&cert=FILE&key=FILE]` — the same over TLS,
//!   checking the members against the CA in FILE, with a client certificate (mutual TLS)
//!   when `cert` and `key` are given.
//!
//! The URL names files, never holds secrets; `init` saves it in `<data-dir>/store.url`
//! so `serve` and the local admin commands given `--data-dir` find the same store.

use super::etcd::{CALL_TIMEOUT, EtcdBackend, EtcdConfig, EtcdTls};
use super::{Kv, KvError, KvResult};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File in the data directory naming the store.
pub const STORE_URL_FILE: &str = "store.url";

/// A parsed `--store` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `None`: `<data-dir>/db`.
    Sled(Option<PathBuf>),
    Etcd(EtcdConfig),
}

impl std::str::FromStr for StoreUrl {
    type Err = KvError;

    fn from_str(s: &str) -> KvResult<Self> {
        let bad = |why: &str| KvError::BadUrl {
            url: s.to_string(),
            why: why.to_string(),
        };
        let s_trim = s.trim();
        if s_trim == "sled" {
            return Ok(Self::Sled(None));
        }
        if let Some(dir) = s_trim.strip_prefix("sled:") {
            if dir.is_empty() {
                return Err(bad("sled: needs a directory"));
            }
            return Ok(Self::Sled(Some(PathBuf::from(dir))));
        }
        let (tls, rest) = if let Some(r) = s_trim.strip_prefix("etcd://") {
            (false, r)
        } else if let Some(r) = s_trim.strip_prefix("etcds://") {
            (true, r)
        } else {
            return Err(bad(
                "expected sled, sled:DIR, etcd://HOST:PORT[,...] or etcds://...",
            ));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (hosts, path) = match rest.split_once('/') {
            Some((h, p)) => (h, p.trim_matches('/')),
            None => (rest, ""),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty() {
            return Err(bad("no HOST:PORT given"));
        }
        for e in &endpoints {
            let ok = e
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(bad(&format!("{e:?} is not HOST:PORT")));
            }
        }
        let prefix = if path.is_empty() {
            "/zonemesh/".to_string()
        } else {
            format!("/{path}/")
        };
        let (mut ca, mut cert, mut key) = (None, None, None);
        for kv in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match kv.split_once('=') {
                Some(("ca", v)) => ca = Some(PathBuf::from(v)),
                Some(("cert", v)) => cert = Some(PathBuf::from(v)),
                Some(("key", v)) => key = Some(PathBuf::from(v)),
                _ => return Err(bad(&format!("unknown option {kv:?} (ca, cert, key)"))),
            }
        }
        if !tls && (ca.is_some() || cert.is_some() || key.is_some()) {
            return Err(bad("ca/cert/key need etcds://"));
        }
        if cert.is_some() != key.is_some() {
            return Err(bad("cert and key go together"));
        }
        let tls = if tls {
            Some(EtcdTls {
                ca: ca.ok_or_else(|| bad("etcds:// needs ?ca=FILE"))?,
                cert,
                key,
            })
        } else {
            None
        };
        Ok(Self::Etcd(EtcdConfig {
            endpoints,
            prefix,
            tls,
            timeout: CALL_TIMEOUT,
        }))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sled(None) => f.write_str("sled"),
            Self::Sled(Some(d)) => write!(f, "sled:{}", d.display()),
            Self::Etcd(c) => {
                let scheme = if c.tls.is_some() { "etcds" } else { "etcd" };
                write!(f, "{scheme}://{}", c.endpoints.join(","))?;
                let p = c.prefix.trim_matches('/');
                if p != "zonemesh" {
                    write!(f, "/{p}")?;
                }
                if let Some(t) = &c.tls {
                    write!(f, "?ca={}", t.ca.display())?;
                    if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                        write!(f, "&cert={}&key={}", cert.display(), key.display())?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl StoreUrl {
    pub fn is_sled(&self) -> bool {
        matches!(self, Self::Sled(_))
    }

    /// The sled directory for a data directory.
    pub fn sled_dir(&self, data_dir: &Path) -> Option<PathBuf> {
        match self {
            Self::Sled(None) => Some(data_dir.join("db")),
            Self::Sled(Some(d)) => Some(d.clone()),
            Self::Etcd(_) => None,
        }
    }

    /// The store named in `<data-dir>/store.url`, or the embedded default.
    pub fn saved(data_dir: &Path) -> KvResult<Self> {
        match std::fs::read_to_string(data_dir.join(STORE_URL_FILE)) {
            Ok(s) => s.parse(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::Sled(None)),
            Err(e) => Err(KvError::BadUrl {
                url: data_dir.join(STORE_URL_FILE).display().to_string(),
                why: e.to_string(),
            }),
        }
    }

    /// Remember this store for the data directory (owner-only file).
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = data_dir.join(STORE_URL_FILE);
        std::fs::write(&path, format!("{self}\n"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
    }

    /// `given` when set, else the saved store of `data_dir`.
    pub fn resolve(given: Option<&str>, data_dir: &Path) -> KvResult<Self> {
        match given {
            Some(s) => s.parse(),
            None => Self::saved(data_dir),
        }
    }

    /// Open the store (sled directories relative to `data_dir`).
    pub fn open(&self, data_dir: &Path) -> KvResult<Kv> {
        match self {
            Self::Sled(_) => Kv::sled(&self.sled_dir(data_dir).expect("sled")),
            Self::Etcd(c) => Ok(Kv::new(Arc::new(EtcdBackend::open(c.clone())?))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_round_trip() {
        for s in [
            "sled",
            "sled:/var/lib/x",
            "etcd://127.0.0.1:2379",
            "etcd://a:1,b:2,c:3/team/one",
            "etcds://a:1?ca=/ca.pem",
            "etcds://a:1,b:2?ca=/ca.pem&cert=/c.pem&key=/k.pem",
        ] {
            let u: StoreUrl = s.parse().unwrap();
            assert_eq!(u.to_string(), s);
        }
        for bad in [
            "etcd://",
            "etcd://host",
            "etcd://a:1?ca=/x",
            "etcds://a:1",
            "etcds://a:1?ca=/x&cert=/c",
            "postgres://x",
            "sled:",
        ] {
            assert!(bad.parse::<StoreUrl>().is_err(), "{bad}");
        }
    }
}
