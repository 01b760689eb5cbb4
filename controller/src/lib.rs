//! The zonemesh controller as a library: the binary in `main.rs` wires these modules.

pub mod audit;
pub mod auth;
pub mod web;
