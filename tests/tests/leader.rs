//! The leader lease on a real three-member etcd cluster (Debian `etcd-server`, loopback):
//! exactly one of two campaigning controllers leads, a leader that dies without a word is
//! replaced within 5 s, a clean stop hands over at once, and killing the etcd leader
//! never makes two controllers lead at the same time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use zonemesh_controller::leader::{self, Leadership, LeaseConfig};
use zonemesh_tests::etcd::{self, Etcd};

const KEY: &[u8] = b"/zonemesh-test/leader";

struct Candidate {
    lead: Leadership,
    stop: CancellationToken,
}

async fn candidate(
    set: &mut tokio::task::JoinSet<()>,
    endpoints: &[String],
    id: &str,
) -> Candidate {
    let client = leader::connect(endpoints, None).await.expect("etcd client");
    let lead = Leadership::elected(id);
    let stop = CancellationToken::new();
    set.spawn(leader::campaign(
        client,
        KEY.to_vec(),
        lead.clone(),
        LeaseConfig::default(),
        stop.clone(),
    ));
    Candidate { lead, stop }
}

async fn until(what: &str, within: Duration, f: impl Fn() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_a_dead_leader_is_replaced_within_five_seconds() {
    if !etcd::available() {
        println!("skipped: etcd not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Etcd::start(dir.path(), 3).unwrap();
    let eps = cluster.endpoints();
    // Each candidate's campaign runs in its own set, so one can die alone.
    let mut set_a = tokio::task::JoinSet::new();
    let mut set_b = tokio::task::JoinSet::new();
    let a = candidate(&mut set_a, &eps, "ctl-a").await;
    let b = candidate(&mut set_b, &eps, "ctl-b").await;
    until("someone leads", Duration::from_secs(5), || {
        a.lead.is_leader() || b.lead.is_leader()
    })
    .await;

    // Watch for two leaders at once for the rest of the test.
    let both = Arc::new(AtomicBool::new(false));
    let watching = CancellationToken::new();
    let watcher = {
        let (a, b, both, stop) = (
            a.lead.clone(),
            b.lead.clone(),
            both.clone(),
            watching.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if a.is_leader() && b.is_leader() {
                    both.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let (first, mut first_set, second, mut second_set) = if a.lead.is_leader() {
        (a, set_a, b, set_b)
    } else {
        (b, set_b, a, set_a)
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(first.lead.is_leader(), "the leader keeps its lease");
    assert!(!second.lead.is_leader());
    until(
        "the follower sees who leads",
        Duration::from_secs(2),
        || second.lead.holder().as_deref() == Some(first.lead.id()),
    )
    .await;

    // The leader dies without a word (its task is aborted: no revoke, no keepalive).
    first_set.abort_all();
    while first_set.join_next().await.is_some() {}
    let took = until("the follower takes over", Duration::from_secs(5), || {
        second.lead.is_leader()
    })
    .await;
    println!("takeover after the leader died: {took:?}");
    // The dead one's own view lapses by time as well.
    until(
        "the dead leader's view lapses",
        Duration::from_secs(3),
        || !first.lead.is_leader(),
    )
    .await;

    // Kill the etcd member that leads raft: the controller leader keeps (or regains) the
    // lease, and never shares it.
    let raft = cluster.leader().unwrap();
    cluster.kill9(raft);
    cluster.wait_healthy(Duration::from_secs(15)).unwrap();
    until(
        "a controller leads after the etcd leader died",
        Duration::from_secs(5),
        || second.lead.is_leader(),
    )
    .await;
    cluster.restart(raft).unwrap();
    cluster.wait_healthy(Duration::from_secs(15)).unwrap();

    // A new candidate joins; a clean stop of the leader hands over well inside the TTL.
    let mut set_c = tokio::task::JoinSet::new();
    let c = candidate(&mut set_c, &eps, "ctl-c").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(second.lead.is_leader() && !c.lead.is_leader());
    second.stop.cancel();
    while second_set.join_next().await.is_some() {}
    let took = until("a clean stop hands over", Duration::from_secs(2), || {
        c.lead.is_leader()
    })
    .await;
    println!("takeover after a clean stop: {took:?}");

    watching.cancel();
    watcher.await.unwrap();
    assert!(
        !both.load(Ordering::SeqCst),
        "two controllers led at the same time"
    );
    c.stop.cancel();
    first.stop.cancel();
    while set_c.join_next().await.is_some() {}
}
