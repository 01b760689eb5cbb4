//! The agent's side of the control plane: its state directory, the TLS/gRPC client to the
//! controller (pinned at enrollment, mutual TLS afterwards), enrollment and renewal.

pub mod blocklist;
pub mod client;
pub mod enroll;
pub mod health;
pub mod meshview;
pub mod run;
pub mod state;
