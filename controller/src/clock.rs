//! The controller's notion of time: the one clock of every zonemesh component, injected so
//! certificate expiry on long-lived connections can be tested without waiting for a
//! certificate to age.

pub use zonemesh_deploy::clock::{Alarm, Clock, SystemClock};
