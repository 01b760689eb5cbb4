//! The agent's clock: the one clock of every zonemesh component, injected so certificate
//! checks and renewal can be driven in tests.

#[cfg(any(test, feature = "testing"))]
pub use zonemesh_deploy::clock::ManualClock;
pub use zonemesh_deploy::clock::{Clock, SystemClock};
