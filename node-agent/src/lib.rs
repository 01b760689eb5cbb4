//! zonemesh node agent: enrollment, identity, and the WireGuard data plane.

pub mod control;
