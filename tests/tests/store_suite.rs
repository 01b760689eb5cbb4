//! The storage interface's one test suite (`zonemesh_controller::kv::suite`) against both
//! implementations: the embedded sled store and a real etcd (Debian `etcd-server`) started
//! on loopback ports; and what an unreachable etcd answers.

use std::time::{Duration, Instant};
use zonemesh_controller::kv::{self, Kv, KvError, url::StoreUrl};
use zonemesh_tests::etcd::{self, Etcd};

fn open(url: &str) -> Kv {
    let dir = tempfile::tempdir().unwrap();
    url.parse::<StoreUrl>().unwrap().open(dir.path()).unwrap()
}

#[test]
fn sled_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    kv::suite::run_all(&Kv::sled(&dir.path().join("db")).unwrap());
}

#[test]
fn etcd_passes_the_store_suite() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let e = Etcd::start_temp(1).unwrap();
    let kv = open(&e.url("suite"));
    kv::suite::run_all(&kv);
    // Keys live under the URL's prefix, trees as path segments.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &e.endpoint_list(),
            "get",
            "--prefix",
            "--keys-only",
        ])
        .arg("/suite/suite_crud/")
        .output()
        .unwrap();
    let keys = String::from_utf8_lossy(&out.stdout);
    assert!(keys.contains("/suite/suite_crud/"), "{keys}");
    // A second prefix on the same cluster is a separate store.
    let other = open(&e.url("other"));
    assert!(other.tree_names().unwrap().is_empty());
}

#[test]
fn an_unreachable_etcd_is_a_clear_error_within_the_deadline() {
    // A port nothing listens on.
    let port = zonemesh_tests::cluster::free_port();
    let url = format!("etcd://127.0.0.1:{port}");
    let kv = open(&url);
    let t0 = Instant::now();
    let tree = kv.open_tree("nodes").unwrap();
    let err = tree.insert("eu/n1", b"x").unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, KvError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(
        took < kv::etcd::CALL_TIMEOUT + Duration::from_secs(3),
        "{took:?}"
    );
    assert!(tree.get("eu/n1").is_err());
}

#[test]
fn etcd_stopped_mid_run_refuses_writes_and_keeps_what_was_acknowledged() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let mut e = Etcd::start_temp(1).unwrap();
    let kv = open(&e.url("stop"));
    let t = kv.open_tree("t").unwrap();
    t.insert("before", b"1").unwrap();
    e.kill9(0);
    let mut txn = kv::Txn::new();
    txn.put("t", "a", b"1".to_vec())
        .put("t", "b", b"2".to_vec());
    let err = kv.commit(&txn).unwrap_err();
    assert!(matches!(err, KvError::Unreachable { .. }), "{err}");
    e.restart(0).unwrap();
    e.wait_healthy(Duration::from_secs(20)).unwrap();
    // Wait out the client's reconnection.
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        match t.get("before") {
            Ok(v) => break v,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(before.as_deref(), Some(&b"1"[..]));
    // Neither half of the refused transaction is there.
    assert_eq!(t.get("a").unwrap(), None);
    assert_eq!(t.get("b").unwrap(), None);
}
