//! The one notion of time every zonemesh component reads (the controller's mesh and jobs,
//! the agent's run loop, the edge's certificate and OCSP checks), injected so expiry and
//! renewal can be tested without waiting for a certificate to age.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

/// A future that resolves when a clock reaches a point in time.
pub type Alarm = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Wall-clock time and waiting for it.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
    /// Resolves once `now()` has reached `at` (callers that act on the time re-read
    /// `now()`, since wall clocks can be set back).
    fn alarm(&self, at: SystemTime) -> Alarm;
}

/// The system's wall clock, with tokio timers.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

/// Longest single timer: the wall clock may jump (suspend, NTP), so it is read again.
const RECHECK: Duration = Duration::from_secs(60);

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn alarm(&self, at: SystemTime) -> Alarm {
        Box::pin(async move {
            while let Ok(left) = at.duration_since(SystemTime::now()) {
                if left.is_zero() {
                    break;
                }
                tokio::time::sleep(left.min(RECHECK)).await;
            }
        })
    }
}

/// A clock that moves only when told to, for tests.
#[cfg(feature = "testing")]
#[derive(Debug)]
pub struct ManualClock {
    now: tokio::sync::watch::Sender<SystemTime>,
}

#[cfg(feature = "testing")]
impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: tokio::sync::watch::Sender::new(start),
        }
    }

    /// Move the clock forward by `by`; alarms that are due resolve.
    pub fn advance(&self, by: Duration) {
        self.now.send_modify(|t| *t += by);
    }

    /// Set the clock to `to` (also backwards).
    pub fn set(&self, to: SystemTime) {
        self.now.send_replace(to);
    }
}

#[cfg(feature = "testing")]
impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.borrow()
    }

    fn alarm(&self, at: SystemTime) -> Alarm {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|t| *t >= at).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn system_alarm_resolves_at_its_time() {
        let at = SystemTime::now() + Duration::from_millis(50);
        SystemClock.alarm(at).await;
        assert!(SystemTime::now() >= at);
    }
}
