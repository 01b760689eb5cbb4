//! What the agent's `/metrics` reads on each scrape: the same figures `status` shows, plus
//! the data plane's packet counters and the log followers' counters.

use super::super::logwatch::LogwatchStats;
use super::super::metrics::{AgentSample, LogwatchSample, PeerSample};
use super::{Agent, unix};

impl Agent {
    /// The agent's state now; per-peer entries are the data plane's current peers only.
    pub(super) fn metrics_sample(&self) -> AgentSample {
        let st = self.status();
        // The data plane dates handshakes by the system clock; measure their age by it too.
        let now = unix(std::time::SystemTime::now());
        AgentSample {
            watch_connected: st.controller_connected,
            mesh_version: st.mesh_version,
            blocked_sources: st.blocked_sources.len() as u64,
            mesh_updates: st.sync.updates,
            syncs: st.sync.syncs,
            cert_not_after_unix: st.cert_not_after_unix,
            dataplane: self.dp.counters(),
            logwatch: logwatch_sample(&self.logwatch_stats),
            peers: st
                .peers
                .into_iter()
                .map(|p| PeerSample {
                    handshake_age_secs: p.last_handshake_unix.map(|t| now.saturating_sub(t) as f64),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    loss: p.loss.map(f64::from),
                    rtt_seconds: p.rtt_micros.map(|us| f64::from(us) / 1e6),
                    name: p.name,
                })
                .collect(),
        }
    }
}

/// The log followers' counters as they stand.
fn logwatch_sample(s: &LogwatchStats) -> LogwatchSample {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    LogwatchSample {
        lines: get(&s.lines),
        overlong: get(&s.overlong),
        matched: get(&s.matched),
        dropped: get(&s.dropped),
    }
}
