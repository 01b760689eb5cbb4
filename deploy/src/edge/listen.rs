//! The edge's listener settings on the listener module every zonemesh listener shares
//! ([`crate::listen`]): a connection cap per listener and per source, backoff after failed
//! accepts, and per-connection deadlines kept in the socket wrapper under TLS.

use std::time::Duration;
use tokio::net::TcpListener;

use crate::listen::{ConnLimits, Timeouts};
pub(crate) use crate::listen::{
    GuardedListener, RequestGuard as InFlight, TrackedBody as Tracked, drain,
};

/// Connection limits and deadlines of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections open at once.
    pub max_conns: usize,
    /// Connections open at once from one source (IPv6 counted per /64).
    pub max_per_source: usize,
    /// From accept to the start of the first request, TLS handshake included.
    pub first_request: Duration,
    /// With no request in flight, after the last one ended.
    pub idle: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_conns: 4096,
            max_per_source: 256,
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    }
}

/// A guarded listener for the edge, named `what` in its log lines.
pub(crate) fn guarded(
    l: TcpListener,
    what: &'static str,
    limits: ListenerLimits,
) -> GuardedListener {
    GuardedListener::new(
        l,
        what,
        ConnLimits {
            max_conns: limits.max_conns,
            max_per_source: limits.max_per_source,
        },
        Timeouts {
            first_request: limits.first_request,
            idle: limits.idle,
        },
    )
}
