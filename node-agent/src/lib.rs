//! zonemesh agent library: the WireGuard data plane and (later) enrollment, identity and
//! the controller watch loop. The binary in `main.rs` is a thin CLI over this crate.

pub mod dataplane;
