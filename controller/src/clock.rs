//! The controller's notion of time, injected so certificate expiry on long-lived
//! connections can be tested without waiting for a certificate to age.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

/// A future that resolves when a clock reaches a point in time.
pub type Alarm = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Wall-clock time as the Mesh service sees it.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
    /// Resolves no earlier than the moment `now()` reaches `at` (callers re-check `now()`,
    /// since wall clocks can be set back).
    fn alarm(&self, at: SystemTime) -> Alarm;
}

/// The system's wall clock, with tokio timers.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

/// Longest single timer: a wall clock set forward is noticed at least this often.
const MAX_TIMER: Duration = Duration::from_secs(3600);

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn alarm(&self, at: SystemTime) -> Alarm {
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_TIMER);
        Box::pin(tokio::time::sleep(wait))
    }
}
