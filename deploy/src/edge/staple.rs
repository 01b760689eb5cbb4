//! The stapler: one task that fetches each domain's OCSP response when it is due (halfway
//! through the last one's validity, after a failure with backoff, at once on
//! [`super::Edge::refresh_staples`]), staples what checks out, and drops a staple that
//! expired without a replacement. Fetches run concurrently, one at most per domain.

use super::{Shared, StapleState};
use crate::ocsp::{CertStatus, OcspTarget, Staple};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// First retry after a failed fetch; doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// Longest sleep of the stapler with nothing due.
const IDLE: Duration = Duration::from_secs(3600);

/// Wait after the `failures`-th failure in a row.
pub(super) fn backoff(failures: u32) -> Duration {
    BACKOFF_START
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(BACKOFF_MAX)
}

/// Fetch and check one response; an `unknown` status is not stapled.
pub(super) async fn fetch_checked(shared: &Shared, t: &OcspTarget) -> Result<Staple, String> {
    let der = shared.ocsp.fetch(t).await.map_err(|e| e.to_string())?;
    let staple = t
        .check_response(&der, shared.clock.now())
        .map_err(|e| e.to_string())?;
    if staple.status == CertStatus::Unknown {
        return Err("the responder does not know this certificate".into());
    }
    Ok(staple)
}

pub(super) fn state_of(s: &Staple) -> StapleState {
    match s.status {
        CertStatus::Revoked { .. } => StapleState::Revoked,
        _ => StapleState::Stapled {
            next_update_unix: zonemesh_ca::unix_secs(s.next_update),
        },
    }
}

struct Due {
    domain: String,
    generation: u64,
    target: OcspTarget,
}

/// Mark what is due at `now` as being fetched, drop expired staples; returns the fetches
/// to start, the domains whose staple file must go, and how long to sleep at most.
fn scan(shared: &Shared, now: SystemTime) -> (Vec<Due>, Vec<String>, Duration) {
    let mut guard = shared.domains.lock();
    let mut due = Vec::new();
    let mut expired = Vec::new();
    let mut sleep = IDLE;
    let mut changed = false;
    for (domain, e) in guard.0.iter_mut() {
        if let Some(s) = &e.staple {
            if s.next_update <= now {
                tracing::warn!(domain = %domain, "OCSP staple expired without a replacement");
                e.staple = None;
                e.staple_state = StapleState::Unavailable(format!(
                    "the last staple expired; {}",
                    e.last_error.as_deref().unwrap_or("no newer response")
                ));
                e.rebuild();
                expired.push(domain.clone());
                changed = true;
            } else {
                sleep = sleep.min(s.next_update.duration_since(now).unwrap_or_default());
            }
        }
        let Ok(Some(target)) = &e.target else {
            continue;
        };
        if e.fetching {
            continue;
        }
        match e.next_fetch {
            Some(at) if at <= now => {
                e.fetching = true;
                due.push(Due {
                    domain: domain.clone(),
                    generation: e.generation,
                    target: target.clone(),
                });
            }
            Some(at) => sleep = sleep.min(at.duration_since(now).unwrap_or_default()),
            None => {}
        }
    }
    if changed {
        shared.publish(&guard.0);
    }
    (due, expired, sleep.max(Duration::from_millis(10)))
}

/// Take a fetch's result for the certificate it was started for; returns the new staple
/// bytes when they changed (for the files).
fn apply(
    shared: &Shared,
    d: &Due,
    result: Result<Staple, String>,
    now: SystemTime,
) -> Option<Vec<u8>> {
    let mut guard = shared.domains.lock();
    let e = guard.0.get_mut(&d.domain)?;
    if e.generation != d.generation {
        // Replaced or removed meanwhile: this answer is for a certificate not served.
        return None;
    }
    e.fetching = false;
    let mut changed = None;
    match result {
        Ok(s) => {
            e.failures = 0;
            e.last_error = None;
            e.next_fetch = Some(now + s.refresh_in(now));
            e.staple_state = state_of(&s);
            if e.staple.as_ref().map(|old| &old.der) != Some(&s.der) {
                changed = Some(s.der.clone());
                e.staple = Some(s);
                e.rebuild();
            }
            tracing::debug!(domain = %d.domain, staple = %e.staple_state, "OCSP staple refreshed");
        }
        Err(why) => {
            e.failures = e.failures.saturating_add(1);
            e.next_fetch = Some(now + backoff(e.failures));
            tracing::warn!(domain = %d.domain, error = %why, retry_in = ?backoff(e.failures), "OCSP fetch failed");
            // The last good staple stays until it expires.
            if e.staple.is_none() {
                e.staple_state = StapleState::Unavailable(why.clone());
            }
            e.last_error = Some(why);
        }
    }
    if e.again {
        e.again = false;
        e.next_fetch = Some(now);
    }
    shared.publish(&guard.0);
    changed
}

async fn fetch_one(shared: Arc<Shared>, d: Due) {
    let result = fetch_checked(&shared, &d.target).await;
    let changed = apply(&shared, &d, result, shared.clock.now());
    shared.staple_wake.notify_one();
    if let Some(der) = changed {
        shared.write_staple_file(&d.domain, Some(der)).await;
    }
}

pub(super) async fn staple_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut work = JoinSet::new();
    loop {
        let (due, expired, sleep) = scan(&shared, shared.clock.now());
        for d in due {
            work.spawn(fetch_one(shared.clone(), d));
        }
        for domain in expired {
            let s = shared.clone();
            work.spawn(async move { s.write_staple_file(&domain, None).await });
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.staple_wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            Some(r) = work.join_next(), if !work.is_empty() => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "OCSP staple task failed");
                }
            }
        }
    }
    work.abort_all();
    while work.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_five_seconds_to_ten_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(5), Duration::from_secs(80));
        assert_eq!(backoff(30), BACKOFF_MAX);
    }
}
