//! The agents' runtime. Connections that present a node certificate (Watch streams, edge
//! streams, renewals, health reports) are served on a tokio runtime of their own whose
//! threads run at a lower CPU priority (nice [`AGENT_NICE`]) than the main runtime, which
//! keeps enrollment, the HTTPS console, the PKI endpoints and the controller's own work
//! (leader lease, CRL refresh, store follow). When the CPU is short the kernel gives it to
//! the main runtime first: a large fleet's fan-out falls behind instead of slowing
//! enrollment down, and what its watchers miss meanwhile reaches them coalesced into fewer
//! messages (see `core::mesh::watch`).

use std::time::Duration;
use thread_priority::{ThreadPriority, ThreadPriorityValue, set_current_thread_priority};

/// The niceness of the agents' threads (the main runtime keeps the process's, normally 0).
/// Under contention a nice-10 thread gets about a tenth of the CPU a nice-0 one gets; with
/// nothing else to run it gets all of it.
pub const AGENT_NICE: i32 = 10;
/// `thread-priority`'s cross-platform value that maps to [`AGENT_NICE`] under Linux's
/// normal scheduling policy (checked by the tests below).
const AGENT_PRIORITY: u8 = 21;
/// How long shutting down waits for blocking work still running on the agents' pool.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// The agents' threads, as `ps -L` and `/proc/<pid>/task/*/comm` show them.
pub const THREAD_NAME: &str = "zm-agents";

/// The runtime connected agents are served on. Shut it down with
/// [`AgentRuntime::shutdown`] once every connection on it has ended.
pub struct AgentRuntime {
    rt: Option<tokio::runtime::Runtime>,
}

impl AgentRuntime {
    /// Start the runtime: as many workers as CPUs, each (and each blocking-pool thread)
    /// lowered to [`AGENT_NICE`]. A thread whose priority cannot be lowered still runs (at
    /// the process's priority) and says so once in the log.
    pub fn start() -> std::io::Result<Self> {
        let warned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name(THREAD_NAME)
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = lower_priority()
                    && !warned.swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(error = ?e, "agents' threads keep the process's CPU priority");
                }
            })
            .build()?;
        Ok(Self { rt: Some(rt) })
    }

    /// Where agents' connections are spawned.
    pub fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.rt.as_ref().map(|rt| rt.handle().clone())
    }

    /// Stop the runtime, waiting (off the async workers) up to 10 s for blocking work that
    /// is still running on it.
    pub async fn shutdown(mut self) {
        if let Some(rt) = self.rt.take()
            && let Err(e) =
                crate::blocking::run_infallible(move || rt.shutdown_timeout(SHUTDOWN_WAIT)).await
        {
            tracing::warn!(error = %e, "agents' runtime did not shut down cleanly");
        }
    }
}

impl Drop for AgentRuntime {
    fn drop(&mut self) {
        // Not shut down through `shutdown` (an error path): stop without waiting, which is
        // allowed from async code.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Lower the calling thread to [`AGENT_NICE`] (Linux niceness is per thread).
pub fn lower_priority() -> Result<(), thread_priority::Error> {
    let value = ThreadPriorityValue::try_from(AGENT_PRIORITY)
        .map_err(|_| thread_priority::Error::Priority("priority value out of range"))?;
    set_current_thread_priority(ThreadPriority::Crossplatform(value))
}

/// The calling thread's niceness, read from `/proc/thread-self/stat` (field 19).
pub fn current_nice() -> std::io::Result<i32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    nice_of_stat(&stat)
}

/// The niceness in one `/proc/.../stat` line (the name may hold spaces and parentheses,
/// so fields are counted after the last `)`).
pub fn nice_of_stat(stat: &str) -> std::io::Result<i32> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected stat line");
    let rest = stat.rsplit_once(')').ok_or_else(bad)?.1;
    // After the name: state (3), ppid (4), ... nice is field 19, the 17th after the name.
    rest.split_whitespace()
        .nth(16)
        .and_then(|f| f.parse().ok())
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_their_niceness() {
        let line = "123 (zm agents) x) S 1 123 123 0 -1 4194368 10 0 0 0 5 6 0 0 30 10 4 0 99 1 2";
        assert_eq!(nice_of_stat(line).unwrap(), 10);
        assert!(nice_of_stat("garbage").is_err());
    }

    #[test]
    fn workers_and_blocking_threads_run_at_the_agents_niceness() {
        let before = current_nice().unwrap();
        let rt = AgentRuntime::start().unwrap();
        let h = rt.handle().unwrap();
        let (worker, blocking) = h.block_on(async {
            let worker = tokio::spawn(async { current_nice().unwrap() })
                .await
                .unwrap();
            let blocking = tokio::task::spawn_blocking(|| current_nice().unwrap())
                .await
                .unwrap();
            (worker, blocking)
        });
        assert_eq!(worker, AGENT_NICE, "worker thread");
        assert_eq!(blocking, AGENT_NICE, "blocking-pool thread");
        // The thread that started it is untouched.
        assert_eq!(current_nice().unwrap(), before);
        drop(rt);
    }
}
