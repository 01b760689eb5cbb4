//! The storage test suite: one set of checks every [`Backend`] must pass, run against sled
//! (unit tests here) and against a real etcd (`tests/tests/store_suite.rs`). Each check
//! panics with what went wrong.

use super::{Cond, Kv, KvError, MAX_VALUE, Txn};
use crate::store::{NodeRecord, Store, TokenRecord, decode, encode};

/// Every check, in order, on an empty store.
pub fn run_all(kv: &Kv) {
    crud(kv);
    prefix_and_range(kv);
    transactions(kv);
    multi_key_atomic(kv);
    counter_monotonic(kv);
    large_values(kv);
}

pub fn crud(kv: &Kv) {
    let t = kv.open_tree("suite_crud").unwrap();
    assert_eq!(t.get("a").unwrap(), None);
    t.insert("a", b"1").unwrap();
    t.insert([0u8, 255, 7], [0u8, 1, 2]).unwrap();
    assert_eq!(t.get("a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(
        t.get([0u8, 255, 7]).unwrap().as_deref(),
        Some(&[0u8, 1, 2][..])
    );
    t.insert("a", b"2").unwrap();
    assert_eq!(t.get("a").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(t.len().unwrap(), 2);
    assert_eq!(t.remove("a").unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(t.remove("a").unwrap(), None);
    assert!(!t.contains_key("a").unwrap());
    // Trees do not see each other's keys.
    let other = kv.open_tree("suite_crud2").unwrap();
    assert_eq!(other.get([0u8, 255, 7]).unwrap(), None);
    assert_eq!(other.len().unwrap(), 0);
    assert!(kv.tree_names().unwrap().iter().any(|n| n == "suite_crud"));
}

pub fn prefix_and_range(kv: &Kv) {
    let t = kv.open_tree("suite_scan").unwrap();
    for z in ["eu", "eu2", "us"] {
        for n in 0..300u32 {
            t.insert(format!("{z}/{n:04}"), n.to_be_bytes()).unwrap();
        }
    }
    // More than one page.
    let eu: Vec<_> = t.scan_prefix("eu/").keys().map(Result::unwrap).collect();
    assert_eq!(eu.len(), 300);
    assert!(eu.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(eu[0], b"eu/0000");
    assert_eq!(t.iter().count(), 900);
    let rev: Vec<_> = t.iter().rev().keys().map(Result::unwrap).collect();
    assert_eq!(rev.len(), 900);
    assert_eq!(rev[0], b"us/0299");
    assert!(rev.windows(2).all(|w| w[0] > w[1]));
    let r: Vec<_> = t
        .range("us/0010".as_bytes()..="us/0012".as_bytes())
        .keys()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        r,
        vec![
            b"us/0010".to_vec(),
            b"us/0011".to_vec(),
            b"us/0012".to_vec()
        ]
    );
    let below: Vec<_> = t
        .range(..b"eu/0002".to_vec())
        .keys()
        .map(Result::unwrap)
        .collect();
    assert_eq!(below, vec![b"eu/0000".to_vec(), b"eu/0001".to_vec()]);
    assert_eq!(t.first().unwrap().unwrap().0, b"eu/0000");
    assert_eq!(t.last().unwrap().unwrap().0, b"us/0299");
    // A prefix ending in 0xff.
    t.insert([0xffu8, 0xff, 1], b"x").unwrap();
    assert_eq!(t.scan_prefix([0xffu8, 0xff]).count(), 1);
}

pub fn transactions(kv: &Kv) {
    let t = kv.open_tree("suite_txn").unwrap();
    // Absent: the first writer wins, the second changes nothing.
    assert!(
        t.compare_and_swap("k", None, Some(b"one".to_vec()))
            .unwrap()
            .is_ok()
    );
    let lost = t
        .compare_and_swap("k", None, Some(b"two".to_vec()))
        .unwrap();
    assert_eq!(lost.unwrap_err().current.as_deref(), Some(&b"one"[..]));
    assert_eq!(t.get("k").unwrap().as_deref(), Some(&b"one"[..]));
    // Value equal.
    assert!(
        t.compare_and_swap("k", Some(b"one"), Some(b"three".to_vec()))
            .unwrap()
            .is_ok()
    );
    // A failed check anywhere applies nothing anywhere.
    let mut txn = Txn::new();
    txn.check("suite_txn", "k", Cond::Equals(b"three".to_vec()))
        .check("suite_txn2", "missing", Cond::Present)
        .put("suite_txn", "k", b"four".to_vec())
        .put("suite_txn2", "new", b"x".to_vec());
    assert!(!kv.commit(&txn).unwrap());
    assert_eq!(t.get("k").unwrap().as_deref(), Some(&b"three"[..]));
    assert_eq!(
        kv.open_tree("suite_txn2").unwrap().get("new").unwrap(),
        None
    );
    // Concurrent increments through fetch_and_update lose nothing.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let t = t.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    t.fetch_and_update("n", |old| {
                        let n = old
                            .map(|o| u64::from_be_bytes(o.try_into().unwrap()))
                            .unwrap_or(0);
                        Some((n + 1).to_be_bytes().to_vec())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let n = u64::from_be_bytes(t.get("n").unwrap().unwrap().try_into().unwrap());
    assert_eq!(n, 100);
}

/// The enrollment's writes (token use, address, node, key, change-log entry and version)
/// apply together or not at all; a revocation's likewise.
pub fn multi_key_atomic(kv: &Kv) {
    let store = Store::on(kv.clone()).unwrap();
    let token = TokenRecord {
        zone: "eu".into(),
        expires_unix: u64::MAX,
        uses_left: 1,
        created_unix: 0,
    };
    store.tokens.insert("tok", encode(&token)).unwrap();
    let node = NodeRecord {
        zone: "eu".into(),
        node: "n1".into(),
        serial_hex: "01".into(),
        cert_der: vec![1; 1500],
        wg_public_key: [7; 32],
        endpoints: vec![],
        overlay_ip: "100.64.0.1".parse().unwrap(),
        enrolled_unix: 0,
        not_after_unix: 0,
        revoked: false,
    };
    let enroll = |version: u64, addr_taken_by: Option<&str>| {
        if let Some(other) = addr_taken_by {
            store.alloc.insert("100.64.0.1", other).unwrap();
        }
        let old = store.tokens.get("tok").unwrap();
        let mut used = token.clone();
        used.uses_left = 0;
        let prev = (version - 1).to_be_bytes();
        let mut txn = Txn::new();
        txn.expect("tokens", "tok", old.as_deref())
            .put("tokens", "tok", encode(&used))
            .expect("alloc", "100.64.0.1", None)
            .put("alloc", "100.64.0.1", "eu/n1")
            .expect("nodes", "eu/n1", None)
            .put("nodes", "eu/n1", encode(&node))
            .put("wgkeys", [7u8; 32], "eu/n1")
            .put("changes", version.to_be_bytes(), vec![9; 64])
            .expect("meta", "mesh_version", (version > 1).then_some(&prev[..]))
            .put("meta", "mesh_version", version.to_be_bytes());
        kv.commit(&txn).unwrap()
    };
    // The address went to someone else meanwhile: nothing of the enrollment is written.
    assert!(!enroll(1, Some("eu/other")));
    let t: TokenRecord = decode("tokens", &store.tokens.get("tok").unwrap().unwrap()).unwrap();
    assert_eq!(t.uses_left, 1);
    assert!(store.node("eu/n1").unwrap().is_none());
    assert!(store.wgkeys.get([7u8; 32]).unwrap().is_none());
    assert!(store.changes.is_empty().unwrap());
    assert_eq!(store.meta_u64("mesh_version").unwrap(), 0);
    store.alloc.remove("100.64.0.1").unwrap();
    // Free again: everything at once.
    assert!(enroll(1, None));
    kv.flush().unwrap();
    assert_eq!(store.node("eu/n1").unwrap().unwrap(), node);
    assert_eq!(store.meta_u64("mesh_version").unwrap(), 1);
    assert_eq!(store.changes.len().unwrap(), 1);
    // The same token again: refused whole (the token changed under it).
    assert!(!enroll(2, None));

    // Revocation: node, revocation record and change entry together, conditional on the
    // node as read; a stale read applies nothing.
    let before = store.nodes.get("eu/n1").unwrap().unwrap();
    let mut revoked = node.clone();
    revoked.revoked = true;
    let revoke = |expect: &[u8], version: u64| {
        let prev = (version - 1).to_be_bytes();
        let mut txn = Txn::new();
        txn.expect("nodes", "eu/n1", Some(expect))
            .put("nodes", "eu/n1", encode(&revoked))
            .put("revoked", "01", b"{}".to_vec())
            .delete("wgkeys", [7u8; 32])
            .delete("alloc", "100.64.0.1")
            .put("changes", version.to_be_bytes(), vec![8; 64])
            .expect("meta", "mesh_version", Some(&prev[..]))
            .put("meta", "mesh_version", version.to_be_bytes());
        kv.commit(&txn).unwrap()
    };
    assert!(!revoke(b"stale", 2));
    assert!(store.revocation("01").unwrap().is_none());
    assert!(store.wgkeys.get([7u8; 32]).unwrap().is_some());
    assert!(revoke(&before, 2));
    assert!(store.node("eu/n1").unwrap().unwrap().revoked);
    assert!(store.alloc.get("100.64.0.1").unwrap().is_none());
    assert_eq!(store.meta_u64("mesh_version").unwrap(), 2);
}

pub fn counter_monotonic(kv: &Kv) {
    let store = Store::on(kv.clone()).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let s = store.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|_| s.next_counter("suite_counter").unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = Vec::new();
    for th in threads {
        let mine = th.join().unwrap();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        all.extend(mine);
    }
    all.sort();
    assert_eq!(all, (1..=100).collect::<Vec<_>>());
}

pub fn large_values(kv: &Kv) {
    let t = kv.open_tree("suite_large").unwrap();
    // A CRL of about 20,000 entries fits.
    let big = vec![0xabu8; 900 * 1024];
    t.insert("crl", &big).unwrap();
    assert_eq!(t.get("crl").unwrap().unwrap(), big);
    // Larger than the limit: refused by both backends, with nothing written.
    let err = t.insert("huge", vec![0u8; MAX_VALUE + 1]).unwrap_err();
    assert!(matches!(err, KvError::TooLarge { .. }), "{err}");
    assert!(t.get("huge").unwrap().is_none());
}

/// A store that cannot be reached (nothing listens, or it went away after serving): every
/// kind of call is [`KvError::Unreachable`] naming each of `endpoints`, each within
/// `within` (the backend's call deadline plus a margin), and nothing hangs. A write that was
/// refused is not half-applied: that is for the caller to check once the store is back.
pub fn unreachable(kv: &Kv, endpoints: &[String], within: std::time::Duration) {
    let t = kv.open_tree("suite_down").unwrap();
    let check = |what: &str, call: &dyn Fn() -> Result<(), KvError>| {
        let t0 = std::time::Instant::now();
        let err = call().expect_err(what);
        let took = t0.elapsed();
        let msg = err.to_string();
        assert!(matches!(err, KvError::Unreachable { .. }), "{what}: {msg}");
        for ep in endpoints {
            assert!(msg.contains(ep.as_str()), "{what} names {ep}: {msg}");
        }
        assert!(took < within, "{what} took {took:?}: {msg}");
    };
    check("get", &|| t.get("a").map(drop));
    check("range", &|| t.first().map(drop));
    check("count", &|| t.len().map(drop));
    check("iter", &|| t.iter().next().expect("an error").map(drop));
    check("insert", &|| t.insert("a", b"1"));
    check("compare_and_swap", &|| {
        t.compare_and_swap("a", None, Some(b"1".to_vec())).map(drop)
    });
    check("commit", &|| {
        let mut txn = Txn::new();
        txn.check("suite_down", "a", Cond::Absent)
            .put("suite_down", "a", b"1".to_vec())
            .put("suite_down", "b", b"2".to_vec());
        kv.commit(&txn).map(drop)
    });
    check("tree_names", &|| kv.tree_names().map(drop));
}

#[cfg(test)]
mod tests {
    #[test]
    fn sled_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let kv = super::Kv::sled(dir.path()).unwrap();
        super::run_all(&kv);
    }
}
