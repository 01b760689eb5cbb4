//! The storage interface's one test suite (`zonemesh_controller::kv::suite`) against both
//! implementations: the embedded sled store and a real etcd (Debian `etcd-server`) started
//! on loopback ports; and what an unreachable etcd answers.

use std::sync::Arc;
use std::time::{Duration, Instant};
use zonemesh_controller::kv::etcd::{ATTEMPT_TIMEOUT, CALL_TIMEOUT, EtcdBackend, EtcdConfig};
use zonemesh_controller::kv::{self, Kv, KvError, Tree, Txn, url::StoreUrl};
use zonemesh_tests::etcd::{self, Etcd};

/// Deadline of the short-deadline clients below.
const SHORT: Duration = Duration::from_secs(1);

/// A client on `endpoints` whose calls give up after [`SHORT`].
fn short_deadline(endpoints: &[String], prefix: &str) -> Kv {
    let cfg = EtcdConfig {
        endpoints: endpoints.to_vec(),
        prefix: format!("/{prefix}/"),
        tls: None,
        timeout: SHORT,
    };
    Kv::new(Arc::new(EtcdBackend::open(cfg).unwrap()))
}

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
    let t0 = Instant::now();
    let kv = open(&url);
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "open waits for nothing"
    );
    let tree = kv.open_tree("nodes").unwrap();
    let err = tree.insert("eu/n1", b"x").unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, KvError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(took < CALL_TIMEOUT + Duration::from_secs(3), "{took:?}");
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
    // A second client with a short deadline, connected before the store goes away.
    let short = short_deadline(&e.endpoints(), "stop");
    assert!(
        short
            .open_tree("t")
            .unwrap()
            .get("before")
            .unwrap()
            .is_some()
    );
    e.kill9(0);
    kv::suite::unreachable(&short, &e.endpoints(), SHORT + Duration::from_secs(1));
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

/// A call in flight to a member that stops answering (`SIGSTOP`: the request is sent, no
/// answer comes): reads go on on the next member; a transaction whose checks make a replay
/// harmless is replayed there and applies once; a write without such checks is not
/// replayed, and its error says it may or may not have been applied.
#[test]
fn a_write_whose_answer_is_lost_is_replayed_only_when_its_checks_make_that_harmless() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let mut e = Etcd::start_temp(3).unwrap();
    let leader = e.leader().unwrap();
    let frozen = (leader + 1) % 3;
    // Three clients, each starting on the member that will freeze (a follower, so the
    // others keep a quorum), each connected to it before.
    let url = format!("{}/lost", e.store_url_from(frozen));
    let [reader, guarded, blind]: [Tree; 3] = std::array::from_fn(|_| {
        let t = open(&url).open_tree("t").unwrap();
        assert_eq!(t.get("warm-up").unwrap(), None);
        t
    });
    e.pause(frozen).unwrap();

    // All three at once, right after the freeze (well before the connections' keep-alive
    // pings could notice it).
    let timed = |f: &(dyn Fn() -> bool + Sync)| {
        let t0 = Instant::now();
        let ok = f();
        (ok, t0.elapsed())
    };
    let (read, replayed, (refused, err)) = std::thread::scope(|s| {
        let read = s.spawn(|| timed(&|| reader.get("warm-up").unwrap().is_none()));
        // Absent, then put: a replay after an applied attempt would find the key present.
        let replayed = s.spawn(|| {
            let mut txn = Txn::new();
            txn.check("t", "once", kv::Cond::Absent)
                .put("t", "once", b"1".to_vec());
            timed(&|| guarded.kv().commit(&txn).unwrap())
        });
        let refused = s.spawn(|| {
            let t0 = Instant::now();
            let err = blind.insert("blind", b"1").unwrap_err();
            (t0.elapsed(), err)
        });
        (
            read.join().unwrap(),
            replayed.join().unwrap(),
            refused.join().unwrap(),
        )
    });
    assert!(read.0, "the read answered from another member");
    assert!(replayed.0, "the guarded write applied on the next member");
    let (read, replayed) = (read.1, replayed.1);
    let msg = err.to_string();
    println!(
        "member {frozen} frozen: read answered in {read:?}, guarded write in {replayed:?}, \
         unguarded write refused in {refused:?}: {msg}"
    );
    assert!(matches!(err, KvError::Unreachable { .. }), "{msg}");
    assert!(msg.contains("may or may not have been applied"), "{msg}");
    assert!(msg.contains(&e.endpoints()[frozen]), "{msg}");
    // Each waited one attempt on the frozen member, not the whole call deadline.
    for took in [read, replayed, refused] {
        assert!(took >= ATTEMPT_TIMEOUT, "{took:?}");
        assert!(took < ATTEMPT_TIMEOUT + Duration::from_secs(2), "{took:?}");
    }

    // The frozen member goes on and gets the requests it held: the guarded one finds its
    // check failing, so the key was written once.
    e.resume(frozen).unwrap();
    e.wait_healthy(Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let fresh = open(&e.url("lost")).open_tree("t").unwrap();
    assert_eq!(fresh.get("once").unwrap().as_deref(), Some(&b"1"[..]));
    let revisions = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &e.endpoint_list(),
            "get",
            "/lost/t/once",
            "-w",
            "json",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&revisions.stdout).unwrap();
    assert_eq!(v["kvs"][0]["version"], 1, "written once: {v}");
}

/// Two controllers on one etcd cluster each keep an audit log over the shared `audit`
/// tree: when one takes a sequence number first, the other takes the next free one and
/// loses no record (before, every record of the second failed as a duplicate).
#[test]
fn two_controllers_audit_into_one_etcd_store_without_losing_records() {
    use zonemesh_controller::audit::{AuditEvent, AuditLog};
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let e = Etcd::start_temp(1).unwrap();
    let (kv_a, kv_b) = (open(&e.url("fleet")), open(&e.url("fleet")));
    let (a, b) = (
        AuditLog::open(&kv_a).unwrap(),
        AuditLog::open(&kv_b).unwrap(),
    );
    let order = [&a, &b, &b, &a, &b, &a, &a];
    for (i, log) in order.into_iter().enumerate() {
        log.record(AuditEvent::new("source.blocked", "blocked").detail(i.to_string()))
            .unwrap_or_else(|err| panic!("record {i}: {err}"));
    }
    let all = b.list(None).unwrap();
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<u64>>()
    );
    assert_eq!(
        all.iter()
            .filter_map(|r| r.event.detail.clone())
            .collect::<Vec<_>>(),
        (0..7).map(|i| i.to_string()).collect::<Vec<_>>()
    );
}
