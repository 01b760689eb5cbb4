//! An agent with several controller addresses, without root (the run loop on an in-memory
//! data plane): enrollment skips an address that does not answer and saves the whole
//! list; `run` fails over from the dead address to the live one, keeps its peers while no
//! controller answers, and comes back and resumes when the controller returns.

use std::time::Duration;
use tempfile::TempDir;
use zonemesh_tests::cluster::{Controller, free_port};
use zonemesh_tests::fakeagent::{FakeAgent, has_peer};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_fails_over_between_its_controllers_and_resumes() {
    let tmp = TempDir::new().unwrap();
    let mut ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();
    // Nothing listens here.
    let dead = format!("127.0.0.1:{}", free_port());
    let list = format!("{dead},{}", ctl.grpc_addr());

    let (state, id) = ctl
        .enroll_agent_via(
            &tmp.path().join("a"),
            "eu",
            "a",
            0,
            "198.18.0.1:51820",
            &list,
        )
        .await;
    assert_eq!(
        id.controller,
        ctl.grpc_addr(),
        "enrolled through the live one"
    );
    assert_eq!(id.controllers, vec![dead.clone(), ctl.grpc_addr()]);
    let saved = state.identity().unwrap();
    assert_eq!(
        saved.controller_addrs(),
        vec![dead.clone(), ctl.grpc_addr()]
    );

    let (_, b) = ctl
        .enroll_agent(&tmp.path().join("b"), "us", "b", 1, "198.18.0.2:51820")
        .await;
    assert!(b.controllers.is_empty(), "one address is saved as before");

    // The first address is dead: the agent moves to the second and watches there.
    let agent = FakeAgent::start(state.clone(), "198.18.0.1:51820").await;
    let s = agent
        .status_until("connected through the second address", WAIT, |s| {
            s.controller_connected && has_peer(s, "us/b")
        })
        .await;
    assert_eq!(s.controller, ctl.grpc_addr());
    assert_eq!(s.controllers, vec![dead.clone(), ctl.grpc_addr()]);
    let version = s.mesh_version;

    // No controller at all: the agent keeps forwarding on the last mesh.
    ctl.kill9();
    agent
        .status_until("sees the controller gone", WAIT, |s| {
            !s.controller_connected
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let away = agent.status().await;
    assert!(!away.controller_connected);
    assert!(
        has_peer(&away, "us/b"),
        "peers stay while no controller answers"
    );

    // The controller comes back: the agent finds it again (bounded backoff) and resumes.
    ctl.start().unwrap();
    let back = agent
        .status_until("reconnected", WAIT, |s| s.controller_connected)
        .await;
    assert_eq!(back.controller, ctl.grpc_addr());
    assert!(back.mesh_version >= version);
    ctl.admin_ok(&["node", "revoke", "us/b"]).unwrap();
    agent
        .status_until("the revocation arrives after the failover", WAIT, |s| {
            !has_peer(s, "us/b")
        })
        .await;
    agent.stop().await;
}
