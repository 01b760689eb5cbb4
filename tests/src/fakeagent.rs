//! The real agent run loop in the test process, without root: an in-memory data plane,
//! recording host effects and a clock the test may move (as `agent_runloop.rs` does, shared
//! here for the several-controller tests). Stopped when the guard is dropped.

use anyhow::Result;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use zonemesh_agent::control::clock::ManualClock;
use zonemesh_agent::control::effects::recording::RecordingEffects;
use zonemesh_agent::control::run::{AgentStatus, RunDeps, RunOptions, query_status, run_with};
use zonemesh_agent::control::state::StateDir;
use zonemesh_agent::dataplane::DataPlane;
use zonemesh_agent::dataplane::fake::{FakeNet, FakeTunHandle};

/// A running agent on fakes.
pub struct FakeAgent {
    pub state: StateDir,
    pub effects: Arc<RecordingEffects>,
    pub clock: Arc<ManualClock>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
    _tun: FakeTunHandle,
    _net: Arc<FakeNet>,
}

impl FakeAgent {
    /// Run the enrolled `state` with its data plane bound (in memory) to `endpoint`.
    pub async fn start(state: StateDir, endpoint: &str) -> Self {
        let net = FakeNet::new();
        let effects = Arc::new(RecordingEffects::default());
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let (tun_tx, tun_rx) = std::sync::mpsc::channel();
        let udp = net.bind(endpoint.parse().expect("endpoint is IP:PORT"));
        let deps = RunDeps {
            start_dataplane: Box::new(move |config| {
                Box::pin(async move {
                    let (tun, handle) = zonemesh_agent::dataplane::fake::FakeTun::new();
                    let _ = tun_tx.send(handle);
                    Ok(DataPlane::start_with(config, tun, udp)?)
                })
            }),
            effects: effects.clone(),
            clock: clock.clone(),
            icmp_probes: false,
        };
        let opts = RunOptions {
            sshd: None,
            state: state.clone(),
            interface: "zmt0".into(),
            listen_port: 51820,
            mtu: 1420,
            edge: None,
            metrics_listen: None,
            rotate_key_every: 0,
            watch_log: Vec::new(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_with(opts, deps, stop.clone()));
        let tun = tokio::task::spawn_blocking(move || tun_rx.recv_timeout(Duration::from_secs(30)))
            .await
            .expect("joined")
            .expect("the agent started its data plane");
        Self {
            state,
            effects,
            clock,
            stop,
            task: Some(task),
            _tun: tun,
            _net: net,
        }
    }

    /// The agent's status once `ok` holds (panics with the last status after `within`).
    pub async fn status_until(
        &self,
        what: &str,
        within: Duration,
        mut ok: impl FnMut(&AgentStatus) -> bool,
    ) -> AgentStatus {
        let start = Instant::now();
        let mut last = None;
        loop {
            if let Ok(s) = query_status(&self.state).await {
                if ok(&s) {
                    return s;
                }
                last = Some(s);
            }
            assert!(
                start.elapsed() < within,
                "{what}: not within {within:?}; last status {last:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status now.
    pub async fn status(&self) -> AgentStatus {
        query_status(&self.state).await.expect("agent status")
    }

    /// Stop the agent and wait for it.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("agent task").expect("agent ran");
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// True when `s` has `name` (`zone/node`) among its data-plane peers.
pub fn has_peer(s: &AgentStatus, name: &str) -> bool {
    s.peers.iter().any(|p| p.name == name)
}
