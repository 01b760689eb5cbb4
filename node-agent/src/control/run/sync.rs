//! The Watch stream and what follows from it: every update lands in the view at once; the
//! data plane and the host are brought in line by one sync task, so that updates arriving
//! while a sync runs are folded into the next one, and the view is saved at most once per
//! [`SAVE_INTERVAL`] (and at shutdown). Chain checks, `ip`/`nft` calls and the fsync run on
//! the blocking pool.

use super::super::client::status_message;
use super::super::effects::{self, HostState};
use super::super::meshview::VerifyCache;
use super::super::state::write_file;
use super::{Agent, RPC_DEADLINE, unix};
use crate::dataplane::{PeerChange, reconcile, select_peers};
use anyhow::Result;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use zonemesh_proto as pb;

/// Most one saved-mesh write per this interval.
pub(super) const SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// A sync without an update, so expiring certificates and blocks take effect.
const RESYNC: Duration = Duration::from_secs(60);
/// Least time from the start of one sync to the start of the next: a burst of updates
/// costs a few passes over the mesh, not one per update.
const SYNC_SPACING: Duration = Duration::from_millis(100);

impl Agent {
    /// Take one update from the controller: into the view, then wake the sync and save
    /// tasks (which fold whatever arrived meanwhile into one pass).
    pub(super) fn receive(&self, update: &pb::MeshUpdate) {
        let crl = match &update.kind {
            Some(pb::mesh_update::Kind::Snapshot(s)) => Some(&s.crl_der),
            Some(pb::mesh_update::Kind::Delta(d)) if !d.crl_der.is_empty() => Some(&d.crl_der),
            _ => None,
        };
        let crl_changed = {
            let mut view = self.view.lock();
            let changed = crl.is_some_and(|c| *c != view.crl_der);
            view.apply(update);
            changed
        };
        if crl_changed {
            self.crl_changes.send_modify(|g| *g += 1);
        }
        let ssh = match &update.kind {
            Some(pb::mesh_update::Kind::Snapshot(s)) => s.ssh.is_some(),
            Some(pb::mesh_update::Kind::Delta(d)) => d.ssh.is_some(),
            None => false,
        };
        if ssh {
            self.ssh_changes.send_modify(|g| *g += 1);
        }
        self.counters.updates.fetch_add(1, Ordering::Relaxed);
        self.unsaved.store(true, Ordering::Release);
        self.sync_wanted.notify_one();
        self.save_wanted.notify_one();
    }

    /// Bring the data plane, routes and firewall in line with the view. Blocking: runs on
    /// the blocking pool, and holds no lock while it verifies or changes the host.
    fn sync_blocking(&self, host: &mut HostState, cache: &mut VerifyCache) {
        let now = self.clock.now();
        let view = self.view.lock().clone();
        let trust = self.refresh_trust(&view, now);
        let before = cache.checks;
        let (members, rejected) = view.verified_members_cached(&trust, now, cache);
        self.counters
            .chain_checks
            .fetch_add(cache.checks - before, Ordering::Relaxed);
        let current: HashSet<_> = rejected.iter().cloned().collect();
        let new: Vec<_> = {
            let mut reported = self.reported.lock();
            let new = rejected
                .into_iter()
                .filter(|r| !reported.contains(r))
                .collect();
            *reported = current;
            new
        };
        for r in new {
            tracing::warn!(peer = %r.peer, reason = %r.reason, "peer refused");
            let _ = self.events.try_send(pb::SecurityEvent {
                kind: "peer.refused".into(),
                source: String::new(),
                detail: format!("{}: {}", r.peer, r.reason),
                at_unix: unix(now),
            });
        }
        let desired = select_peers(&self.me, &members, &|z| view.intra_zone(z));
        let changes = reconcile(&desired, &self.dp.peers());
        for c in &changes {
            let kind = match c {
                PeerChange::Add(_) => "add",
                PeerChange::Update(_) => "update",
                PeerChange::Remove { .. } => "remove",
            };
            tracing::info!(peer = %c.name(), change = kind, "peer change");
        }
        self.dp.apply(changes);
        effects::sync_routes(
            &*self.effects,
            host,
            &view,
            &self.id.zone,
            &self.opts.interface,
        );
        effects::sync_blocklist(
            &*self.effects,
            host,
            &view,
            unix(now),
            &self.link.controllers().join(","),
        );
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(version = view.version, "mesh applied");
    }

    /// Write the view if it changed since the last write (blocking).
    fn save_blocking(&self) {
        if !self.unsaved.swap(false, Ordering::AcqRel) {
            return;
        }
        let bytes = prost::Message::encode_to_vec(&self.view.lock().to_update());
        match write_file(&self.opts.state.mesh_file(), &bytes, 0o600) {
            Ok(()) => {
                self.counters.saves.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.unsaved.store(true, Ordering::Release);
                tracing::warn!(error = %e, "could not save mesh state");
            }
        }
    }
}

/// Apply the view whenever it changed; undo the host changes at shutdown.
pub(super) async fn sync_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    let mut state = Some((HostState::default(), VerifyCache::default()));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = agent.sync_wanted.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        let next = tokio::time::Instant::now() + SYNC_SPACING;
        let (mut host, mut cache) = state.take().unwrap_or_default();
        let a = agent.clone();
        // A sync that has begun finishes, so the host state it returns stays accurate.
        match tokio::task::spawn_blocking(move || {
            a.sync_blocking(&mut host, &mut cache);
            (host, cache)
        })
        .await
        {
            Ok(s) => state = Some(s),
            Err(e) => tracing::error!(error = %e, "mesh sync failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
    if let Some((mut host, _)) = state {
        let a = agent.clone();
        let undo = tokio::task::spawn_blocking(move || {
            effects::clear_host(&*a.effects, &mut host, &a.opts.interface)
        });
        if let Err(e) = undo.await {
            tracing::error!(error = %e, "removing routes and firewall failed");
        }
    }
}

/// Save the view at most once per [`SAVE_INTERVAL`], and a last time at shutdown.
pub(super) async fn save_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = agent.save_wanted.notified() => {}
        }
        save(&agent).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(SAVE_INTERVAL) => {}
        }
    }
    save(&agent).await;
}

async fn save(agent: &Arc<Agent>) {
    let a = agent.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || a.save_blocking()).await {
        tracing::error!(error = %e, "saving the mesh failed");
    }
}

/// Why a Watch session ended without an error.
enum Ended {
    Shutdown,
    /// The certificate was renewed: watch again on the new connection.
    Renewed,
}

async fn watch_once(agent: &Agent, shutdown: &CancellationToken) -> Result<Ended> {
    let mut renewed = agent.link.generation();
    let resume = agent.view.lock().version;
    let mut rpc = agent.link.mesh();
    let open = async {
        rpc.watch(pb::WatchRequest {
            resume_from_version: resume,
            chain_once: true,
        })
        .await
        .map_err(|s| anyhow::anyhow!("watch refused: {}", status_message(&s)))
    };
    let mut stream = match agent.rpc(shutdown, RPC_DEADLINE, open).await {
        Ok(s) => s.into_inner(),
        Err(_) if shutdown.is_cancelled() => return Ok(Ended::Shutdown),
        Err(e) => return Err(e),
    };
    agent.connected.store(true, Ordering::Relaxed);
    tracing::info!(from = resume, "watching the mesh");
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
            _ = renewed.changed() => return Ok(Ended::Renewed),
            m = stream.message() => m,
        };
        match msg {
            Ok(Some(update)) => agent.receive(&update),
            Ok(None) => anyhow::bail!("controller ended the watch stream"),
            Err(s) => anyhow::bail!("watch stream: {}", status_message(&s)),
        }
    }
}

pub(super) async fn watch_loop(agent: Arc<Agent>, shutdown: CancellationToken) {
    // Failed attempts in a row; a session that lasted resets it.
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        let r = watch_once(&agent, &shutdown).await;
        agent.connected.store(false, Ordering::Relaxed);
        match r {
            Ok(Ended::Shutdown) => return,
            Ok(Ended::Renewed) => {
                tracing::info!(controller = %agent.link.controller(), "watching again on the new channel");
                failures = 0;
                continue;
            }
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    failures = 0;
                }
                failures = failures.saturating_add(1);
                let from = agent.link.controller();
                let retry_in = agent.link.retry_delay(failures);
                match agent.link.fail_over() {
                    Ok(to) if to != from => {
                        tracing::warn!(error = %e, controller = %from, next = %to, ?retry_in, "controller lost; failing over, forwarding on the last known mesh");
                    }
                    Ok(_) => {
                        tracing::warn!(error = %e, controller = %from, ?retry_in, "controller unreachable; forwarding on the last known mesh");
                    }
                    Err(fe) => {
                        tracing::error!(error = %fe, "cannot open a channel to the next controller")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry_in) => {}
                }
            }
        }
    }
}
