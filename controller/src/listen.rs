//! The controller's listeners: the file-descriptor budget split between gRPC, HTTPS and
//! PKI, their deadlines, and serving an axum router on one guarded connection. Admission,
//! backoff and the deadline-checking socket are shared with every zonemesh listener
//! ([`zonemesh_deploy::listen`], re-exported here).

pub use zonemesh_deploy::listen::{
    AcceptBackoff, Activity, Admission, Admitted, ConnLimits, DRAIN_TIMEOUT, FIRST_REQUEST_TIMEOUT,
    GuardedIo, GuardedListener, HEADER_READ_TIMEOUT, HttpOptions, RequestGuard, Timeouts,
    TrackedBody, drain, source_key,
};

use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// File descriptors kept back from the listeners: the admin socket, the store, logs, the
/// runtime's own descriptors.
pub const RESERVED_FDS: u64 = 128;
/// Never size limits above this, whatever the hard limit says.
const MAX_FD_BUDGET: u64 = 1 << 20;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let want = hard.min(MAX_FD_BUDGET).max(soft);
            if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
                want
            } else {
                soft
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file-descriptor limit; assuming 1024");
            1024
        }
    }
}

/// The connection limits of every listener, split from `(fd limit - reserve)`.
#[derive(Clone, Copy, Debug)]
pub struct ListenerBudget {
    pub grpc: ConnLimits,
    pub https: ConnLimits,
    pub pki: ConnLimits,
}

impl ListenerBudget {
    /// Split `fd_limit` minus [`RESERVED_FDS`] between the gRPC, HTTPS and (if served) PKI
    /// listeners. gRPC holds one connection per agent, so it gets the larger share (3/5
    /// with PKI, 3/4 without: 10,000 agents fit under a 20,000 limit). Nodes behind one
    /// NAT share an address on gRPC, so a source may hold a quarter of it; browsers and
    /// relying parties an eighth of theirs.
    pub fn from_fd_limit(fd_limit: u64, with_pki: bool) -> Self {
        let budget = fd_limit
            .min(MAX_FD_BUDGET)
            .saturating_sub(RESERVED_FDS)
            .max(64);
        if with_pki {
            Self {
                grpc: ConnLimits::share(budget, 3, 5, 4),
                https: ConnLimits::share(budget, 1, 5, 8),
                pki: ConnLimits::share(budget, 1, 5, 8),
            }
        } else {
            Self {
                grpc: ConnLimits::share(budget, 3, 4, 4),
                https: ConnLimits::share(budget, 1, 4, 8),
                pki: ConnLimits::share(budget, 0, 1, 8),
            }
        }
    }
}

/// Deadlines of the HTTPS listener (browsers keep idle connections for reuse).
pub const HTTPS_TIMEOUTS: Timeouts = Timeouts {
    first_request: FIRST_REQUEST_TIMEOUT,
    idle: Duration::from_secs(30),
};
/// Deadlines of the gRPC listener (an agent's Watch keeps its connection busy).
pub const GRPC_TIMEOUTS: Timeouts = Timeouts {
    first_request: FIRST_REQUEST_TIMEOUT,
    idle: Duration::from_secs(120),
};
/// Deadlines of the plain-HTTP PKI listener (one CRL or OCSP fetch per connection).
pub const PKI_TIMEOUTS: Timeouts = Timeouts {
    first_request: FIRST_REQUEST_TIMEOUT,
    idle: Duration::from_secs(15),
};

/// Serve `app` on one connection until it ends or `stop` (then drain up to 10 s). Every
/// request carries `ext` in its extensions and is reported to `activity`.
pub async fn serve_connection<I, X>(
    io: I,
    app: axum::Router,
    ext: X,
    activity: Activity,
    opts: HttpOptions,
    stop: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    X: Clone + Send + Sync + 'static,
{
    let svc = tower::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let guard = activity.begin();
        req.extensions_mut().insert(ext.clone());
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(axum::body::Body::new)).await?;
            Ok::<_, std::convert::Infallible>(
                resp.map(|inner| axum::body::Body::new(TrackedBody::new(inner, guard))),
            )
        }
    });
    zonemesh_deploy::listen::serve_connection(io, TowerToHyperService::new(svc), opts, stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_splits_the_fd_limit_and_keeps_a_reserve() {
        let b = ListenerBudget::from_fd_limit(1024, true);
        let total = b.grpc.max_conns + b.https.max_conns + b.pki.max_conns;
        assert!(total as u64 <= 1024 - RESERVED_FDS, "{b:?}");
        assert!(b.pki.max_per_source < b.pki.max_conns / 2, "{b:?}");
        assert!(b.grpc.max_per_source >= 4);
        let agents = ListenerBudget::from_fd_limit(20_000, true);
        assert!(agents.grpc.max_conns > 10_000, "{agents:?}");
        let big = ListenerBudget::from_fd_limit(u64::MAX, false);
        assert!(big.grpc.max_conns as u64 <= MAX_FD_BUDGET);
    }
}
