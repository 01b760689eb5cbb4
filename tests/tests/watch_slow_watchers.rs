//! Slow and stuck watchers, through the real Watch stream (real Mesh and store, mTLS on a
//! loopback port): a watcher that stops reading holds no backlog on the controller, the
//! others are not delayed by it, and when it reads again it gets what it missed as one
//! delta (or, past the backlog, the shared snapshot) and ends with the same mesh.

use std::time::{Duration, Instant, SystemTime};
use zonemesh_agent::control::meshview::MeshView;
use zonemesh_controller::mesh::{BACKLOG, CHUNK};
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{Dial, mesh_channel, mesh_channel_dial, next_update, wg_key};
use zonemesh_tests::inproc::Plane;

const WAIT: Duration = Duration::from_secs(20);
/// The stuck watcher's HTTP/2 windows: the controller stops sending to it after this much.
const WINDOW: u32 = 16 * 1024;

async fn open(ch: tonic::transport::Channel) -> tonic::Streaming<pb::MeshUpdate> {
    pb::mesh_client::MeshClient::new(ch)
        .watch(pb::WatchRequest {
            chain_once: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Read `stream` until it reaches `version`; returns how many messages that took and
/// the kind of the last one.
async fn read_to(
    stream: &mut tonic::Streaming<pb::MeshUpdate>,
    view: &mut MeshView,
    version: u64,
) -> (usize, bool) {
    let mut n = 0;
    let mut last_snapshot = false;
    while view.version < version {
        let u = next_update(stream, WAIT)
            .await
            .unwrap()
            .expect("stream open");
        last_snapshot = matches!(u.kind, Some(pb::mesh_update::Kind::Snapshot(_)));
        view.apply(&u);
        n += 1;
    }
    (n, last_snapshot)
}

/// `n` block changes (each its own version), made on the blocking pool.
async fn changes(plane: &Plane, from: u32, n: u32) {
    let mesh = plane.mesh.clone();
    tokio::task::spawn_blocking(move || {
        let until = SystemTime::now() + Duration::from_secs(3600);
        for i in from..from + n {
            let ip = std::net::Ipv4Addr::from(0xc612_0000 + i);
            mesh.block_source(ip.into(), until, &"x".repeat(400))
                .unwrap();
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_watcher_holds_no_backlog_delays_nobody_and_converges() {
    let plane = Plane::new().unwrap();
    let served = plane.serve().await.unwrap();
    let stuck = plane.enroll("eu", "stuck", 33, wg_key(1)).unwrap();
    let fast = plane.enroll("eu", "fast", 34, wg_key(2)).unwrap();
    let mut stuck_watch = open(
        mesh_channel_dial(
            &served.addr(),
            &stuck.creds,
            Dial {
                window: Some(WINDOW),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    )
    .await;
    let mut stuck_view = MeshView::default();
    let start = plane.mesh.version();
    read_to(&mut stuck_watch, &mut stuck_view, start).await;
    let mut fast_watch = open(mesh_channel(&served.addr(), &fast.creds).await.unwrap()).await;
    let mut fast_view = MeshView::default();
    read_to(&mut fast_watch, &mut fast_view, start).await;

    // Within a chunk (one delta), within the backlog (a delta per chunk of versions),
    // then beyond it (the snapshot).
    let beyond = u32::try_from(BACKLOG).unwrap() + 200;
    for (round, count) in [(0u32, 100u32), (1, 1000), (2, beyond)] {
        // The fast watcher reads along while the stuck one reads nothing.
        let target = plane.mesh.version() + u64::from(count);
        let reader = tokio::spawn(async move {
            let mut seen = 0;
            while fast_view.version < target {
                let u = next_update(&mut fast_watch, WAIT).await.unwrap().unwrap();
                fast_view.apply(&u);
                seen += 1;
            }
            (fast_watch, fast_view, seen, Instant::now())
        });
        changes(&plane, round * 10_000, count).await;
        let done = Instant::now();
        let (w, v, seen, reached) = reader.await.unwrap();
        (fast_watch, fast_view) = (w, v);
        assert!(
            reached.saturating_duration_since(done) < Duration::from_secs(2),
            "round {round}: the fast watcher was held up {:?} after the last change",
            reached.saturating_duration_since(done)
        );
        assert!(seen >= 1);

        // What the stuck watcher holds: what fit in its window, then what takes it to the
        // head: one delta within a chunk, one per chunk of versions within the backlog,
        // the snapshot beyond it.
        let (n, last_snapshot) = read_to(&mut stuck_watch, &mut stuck_view, target).await;
        // Each change is over 400 bytes on the wire.
        let in_window = (WINDOW as usize) / 400 + 4;
        let count_ = count as usize;
        let catch_up = if u64::from(count) > BACKLOG || count_ <= CHUNK {
            1
        } else {
            count_.div_ceil(CHUNK) + 1
        };
        assert!(
            n <= in_window + catch_up,
            "round {round}: {n} messages for {count} changes: a backlog was held"
        );
        assert_eq!(
            last_snapshot,
            u64::from(count) > BACKLOG,
            "round {round}: {count} changes behind"
        );
        assert_eq!(stuck_view.version, target);
        assert_eq!(stuck_view.blocklist, fast_view.blocklist, "round {round}");
        assert_eq!(stuck_view.peers, fast_view.peers, "round {round}");
    }
    // Both streams are still open and live.
    changes(&plane, 50_000, 1).await;
    let head = plane.mesh.version();
    read_to(&mut stuck_watch, &mut stuck_view, head).await;
    read_to(&mut fast_watch, &mut fast_view, head).await;
    served.stop().await;
}

/// A burst of changes while a watcher is busy reaches it as one delta that every watcher
/// at the same place shares; an agent that does not take the chain once per stream gets
/// every peer with its own chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_coalesced_and_shared_and_old_agents_get_chains_per_peer() {
    let plane = Plane::new().unwrap();
    let a = plane.enroll("eu", "a", 33, wg_key(1)).unwrap();
    let start = plane.mesh.version();
    changes(&plane, 0, 20).await;
    let one = plane.mesh.next_frame(start).unwrap().unwrap();
    let two = plane.mesh.next_frame(start).unwrap().unwrap();
    assert_eq!(one.version(), plane.mesh.version());
    assert!(one.same_bytes(&two), "the coalesced delta is encoded once");
    let Some(pb::mesh_update::Kind::Delta(d)) = one.decode().unwrap().kind else {
        panic!("not a delta")
    };
    assert_eq!(d.blocked.len(), 20);
    let latest = plane
        .mesh
        .next_frame(plane.mesh.version() - 1)
        .unwrap()
        .unwrap();
    let again = plane
        .mesh
        .next_frame(plane.mesh.version() - 1)
        .unwrap()
        .unwrap();
    assert!(
        latest.same_bytes(&again),
        "one change: the published frame itself"
    );
    assert!(
        plane
            .mesh
            .next_frame(plane.mesh.version())
            .unwrap()
            .is_none()
    );

    // The snapshot is shared; its peers carry no chain, the snapshot carries it once.
    let served = plane.serve().await.unwrap();
    let snap = plane.mesh.snapshot().unwrap();
    assert!(snap.same_bytes(&plane.mesh.snapshot().unwrap()));
    let ch = mesh_channel(&served.addr(), &a.creds).await.unwrap();
    let mut new_agent = open(ch.clone()).await;
    let u = next_update(&mut new_agent, WAIT).await.unwrap().unwrap();
    let Some(pb::mesh_update::Kind::Snapshot(s)) = u.kind else {
        panic!("not a snapshot")
    };
    assert!(s.peers.iter().all(|p| p.chain_der.is_empty()));
    assert_eq!(s.ca_chain_der, plane.auth.chain());
    let mut old_agent = pb::mesh_client::MeshClient::new(ch)
        .watch(pb::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let u = next_update(&mut old_agent, WAIT).await.unwrap().unwrap();
    let Some(pb::mesh_update::Kind::Snapshot(s)) = u.kind else {
        panic!("not a snapshot")
    };
    assert!(!s.peers.is_empty());
    assert!(s.peers.iter().all(|p| p.chain_der == plane.auth.chain()));
    served.stop().await;
}
