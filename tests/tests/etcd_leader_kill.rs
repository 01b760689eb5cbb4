//! Killing the etcd leader during a run of enrollments (three members of Debian's `etcd` on
//! loopback; the controller's store on them, in process, its client starting on the
//! leader): enrollments go on through the kill, every enrollment that was acknowledged is
//! in the store afterwards with the certificate it returned, and no token yields two
//! certificates, even though clients retry every failed enrollment with the same token as
//! an agent would. A second client reads the store every 20 ms meanwhile, to show how long
//! store calls failed (or waited) around the kill.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use zonemesh_controller::authority::Authority;
use zonemesh_controller::mesh::Mesh;
use zonemesh_controller::secrets::KekSource;
use zonemesh_controller::store::{CertKind, CertRecord, decode};
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{cert_serial, wg_key};
use zonemesh_tests::etcd::{self, Etcd};
use zonemesh_tests::inproc::Plane;

const ENROLLMENTS: usize = 24;
/// Clients enrolling at the same time, so some store call is in flight at the kill.
const WORKERS: usize = 3;

/// What happened to one enrollment.
#[derive(Debug, Default)]
struct Outcome {
    /// The serial of the certificate the client received.
    acked: Option<String>,
    /// The token was found used by an attempt whose answer the client never got.
    unanswered: bool,
    failed_attempts: usize,
    /// When it was acknowledged, from the start of the run.
    done_at: Option<Duration>,
    /// From the first attempt to the answer.
    took: Duration,
}

/// One read of the probe: when it started (from the start of the run), how long it took,
/// and whether it failed.
type Probe = (Duration, Duration, bool);

fn enroll_until_answered(
    mesh: &Mesh,
    req: &pb::EnrollRequest,
    source: IpAddr,
    t0: Instant,
) -> Outcome {
    let mut out = Outcome::default();
    let first = Instant::now();
    // Retried with the same token, as an agent retries a failed enrollment.
    for attempt in 0..60 {
        match mesh.enroll(req, source, SystemTime::now()) {
            Ok(resp) => {
                out.acked = Some(cert_serial(&resp.certificate_der).unwrap());
                out.done_at = Some(t0.elapsed());
                break;
            }
            Err(e) => {
                out.failed_attempts += 1;
                let msg = e.to_string();
                println!("{} attempt {attempt}: {msg}", req.node_name);
                if msg.contains("already been used") {
                    // An earlier attempt applied but its answer was lost.
                    out.unanswered = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    out.took = first.elapsed();
    out
}

#[test]
fn killing_the_etcd_leader_loses_no_acknowledged_enrollment_and_issues_no_token_twice() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let plane = Plane::new().unwrap();
    plane
        .mesh
        .add_zone("eu", "100.64.1.0/24", false, SystemTime::now())
        .unwrap();
    let data_dir = plane.dir.path().join("ctl");
    let mut cluster = Etcd::start(plane.dir.path(), 3).unwrap();
    // The controller's client starts on the member that will be killed.
    let leader = cluster.leader().unwrap();
    let url = cluster.store_url_from(leader);
    let store = etcd::open_store(&url, &data_dir);
    etcd::copy_store(&plane.store, &store);

    let kek = KekSource::new(&data_dir, None).load().unwrap();
    let auth = Arc::new(Authority::load(store.clone(), &kek, SystemTime::now()).unwrap());
    let mesh = Mesh::new(auth).unwrap();
    let now = SystemTime::now();
    let reqs: Vec<pb::EnrollRequest> = (0..ENROLLMENTS)
        .map(|i| pb::EnrollRequest {
            token: mesh
                .create_token("eu", Duration::from_secs(3600), 1, now)
                .unwrap()
                .token,
            csr_der: zonemesh_agent::control::enroll::csr_for(
                &zonemesh_tests::rsa4096(i),
                &format!("n{i}"),
            )
            .unwrap(),
            wg_public_key: wg_key(1000 + i as u64).to_vec(),
            endpoints: vec![],
            node_name: format!("n{i}"),
            zone: String::new(),
        })
        .collect();

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let probes: Arc<Mutex<Vec<Probe>>> = Arc::default();
    let outcomes: Arc<Mutex<BTreeMap<usize, Outcome>>> = Arc::default();
    let killed_at = std::thread::scope(|s| {
        {
            // Another client on the same URL, reading as a follower controller does.
            let (stop, probes, url, dir) =
                (stop.clone(), probes.clone(), url.clone(), data_dir.clone());
            s.spawn(move || {
                let other = etcd::open_store(&url, &dir);
                while !stop.load(Ordering::SeqCst) {
                    let at = t0.elapsed();
                    let started = Instant::now();
                    let failed = other.meta.get("mesh_version").is_err();
                    probes.lock().unwrap().push((at, started.elapsed(), failed));
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        for w in 0..WORKERS {
            let (mesh, reqs, outcomes) = (&mesh, &reqs, outcomes.clone());
            s.spawn(move || {
                let source: IpAddr = format!("127.0.0.{}", w + 1).parse().unwrap();
                for i in (w..ENROLLMENTS).step_by(WORKERS) {
                    let o = enroll_until_answered(mesh, &reqs[i], source, t0);
                    outcomes.lock().unwrap().insert(i, o);
                    // Spread the run over the kill and the election after it.
                    std::thread::sleep(Duration::from_millis(150));
                }
            });
        }
        // Kill the leader a third of the way through.
        while outcomes
            .lock()
            .unwrap()
            .values()
            .filter(|o| o.acked.is_some())
            .count()
            < ENROLLMENTS / 3
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        cluster.kill9(leader);
        let killed_at = t0.elapsed();
        println!("killed etcd leader m{leader} at {killed_at:?}");
        // Let the workers finish, then the probe.
        while outcomes.lock().unwrap().len() < ENROLLMENTS {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
        killed_at
    });
    let outcomes = Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap();
    let probes = Arc::try_unwrap(probes).unwrap().into_inner().unwrap();

    // Figures: how long store calls failed or waited around the kill.
    let acked: BTreeMap<String, String> = outcomes
        .iter()
        .filter_map(|(i, o)| o.acked.clone().map(|s| (format!("eu/n{i}"), s)))
        .collect();
    let failed_attempts: usize = outcomes.values().map(|o| o.failed_attempts).sum();
    let after_kill = outcomes
        .values()
        .filter(|o| o.done_at.is_some_and(|d| d > killed_at))
        .count();
    let slowest = outcomes.values().map(|o| o.took).max().unwrap();
    let failed_reads: Vec<&Probe> = probes.iter().filter(|p| p.2).collect();
    let around: Vec<&Probe> = probes.iter().filter(|p| p.0 + p.1 >= killed_at).collect();
    let slowest_read = around.iter().map(|p| p.1).max().unwrap_or_default();
    // The anchor: how long a read took before the kill (median).
    let mut before: Vec<Duration> = probes
        .iter()
        .filter(|p| p.0 + p.1 < killed_at)
        .map(|p| p.1)
        .collect();
    before.sort();
    let median_before = before.get(before.len() / 2).copied().unwrap_or_default();
    let failing = match (failed_reads.first(), failed_reads.last()) {
        (Some(a), Some(b)) => format!(
            "{} of {} probe reads failed, from {:?} to {:?} after the kill",
            failed_reads.len(),
            probes.len(),
            a.0.saturating_sub(killed_at),
            (b.0 + b.1).saturating_sub(killed_at)
        ),
        _ => format!("none of {} probe reads failed", probes.len()),
    };
    println!(
        "{} of {ENROLLMENTS} enrollments acknowledged ({after_kill} after the kill), \
         {} answered only by `already used`, {failed_attempts} failed attempts, slowest \
         enrollment {slowest:?}, run {:?}",
        acked.len(),
        outcomes.values().filter(|o| o.unanswered).count(),
        t0.elapsed()
    );
    println!(
        "store calls around the kill: {failing}; slowest read after the kill \
         {slowest_read:?} (median read before the kill {median_before:?})"
    );

    cluster.restart(leader).unwrap();
    cluster.wait_healthy(Duration::from_secs(20)).unwrap();

    // Read back through a fresh client, as another controller would.
    let fresh = etcd::open_store(&url, &data_dir);
    let mut certs_per_node: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for item in fresh.certs.iter() {
        let (serial, v) = item.unwrap();
        let rec: CertRecord = decode("certs", &v).unwrap();
        if rec.kind == CertKind::Node {
            certs_per_node
                .entry(rec.subject)
                .or_default()
                .insert(String::from_utf8_lossy(&serial).into_owned());
        }
    }
    for (node, serial) in &acked {
        let rec = fresh
            .node(node)
            .unwrap()
            .unwrap_or_else(|| panic!("{node} was acknowledged and is lost"));
        assert_eq!(
            rec.serial_hex.trim_start_matches('0'),
            serial.trim_start_matches('0'),
            "{node} holds the acknowledged certificate"
        );
    }
    // Token i was only ever sent for node n{i}: certificates per node are per token.
    for (node, serials) in &certs_per_node {
        assert_eq!(serials.len(), 1, "the token of {node} yielded {serials:?}");
    }
    // Every enrollment was answered: acknowledged, or its token found used by an attempt
    // whose answer was lost (that node is stored, with its one certificate).
    for (i, o) in &outcomes {
        assert!(
            o.acked.is_some() || o.unanswered,
            "n{i} never answered: {o:?}"
        );
        if o.unanswered {
            assert!(
                certs_per_node.contains_key(&format!("eu/n{i}")),
                "n{i}'s token is used but no certificate was recorded for it"
            );
        }
    }
    let nodes = fresh.nodes().unwrap();
    assert_eq!(nodes.len(), certs_per_node.len());
    assert_eq!(nodes.len(), ENROLLMENTS);
    assert!(after_kill > 0, "no enrollment went through after the kill");
}
