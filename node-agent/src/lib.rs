//! zonemesh node agent: enrollment and identity (`control`), the WireGuard data plane
//! (`dataplane`) and the controller-driven run loop. The binary is a thin CLI over it.

pub mod control;
pub mod dataplane;
