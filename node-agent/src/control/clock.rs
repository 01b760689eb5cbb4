//! The agent's clock, injected so certificate checks and renewal can be driven in tests.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

/// A future the clock resolves.
pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Wall-clock time and waiting for it.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
    /// Resolves once `now()` has reached `at`.
    fn sleep_until(&self, at: SystemTime) -> Sleep<'_>;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

/// Longest single timer: the wall clock may jump (suspend, NTP), so it is read again.
const RECHECK: Duration = Duration::from_secs(60);

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
    fn sleep_until(&self, at: SystemTime) -> Sleep<'_> {
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
#[cfg(any(test, feature = "testing"))]
#[derive(Debug)]
pub struct ManualClock {
    now: tokio::sync::watch::Sender<SystemTime>,
}

#[cfg(any(test, feature = "testing"))]
impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            now: tokio::sync::watch::Sender::new(start),
        }
    }
    /// Move the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now.send_modify(|t| *t += by);
    }
}

#[cfg(any(test, feature = "testing"))]
impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.borrow()
    }
    fn sleep_until(&self, at: SystemTime) -> Sleep<'_> {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|t| *t >= at).await;
        })
    }
}
