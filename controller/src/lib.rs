//! zonemesh controller: the internal CA, the control plane and the admin side.
//!
//! Layers, each importing only from the ones above it:
//! - [`core`]: the authority (CA and its records), the mesh state machine, the store and
//!   the audit log, with the limits and blocklist policy they enforce.
//! - [`domains`]: portal domains and their certificate jobs, over the core's store and
//!   authority.
//! - [`tls`]: the listeners' TLS plumbing (suites, the controller's renewing certificate,
//!   the CRL-checking client verifier).
//! - [`api`]: the machine-facing entry points over the core: gRPC for agents, the admin
//!   socket for the CLI, OCSP and CRL over HTTP.
//! - [`auth`] and [`web`]: users, passwords, TOTP, sessions and the sign-in throttle, and
//!   the HTTPS pages built on them.
//! - [`ssh`]: the SSH CA, grants, user and host certificates and the KRL.
//! - [`serve`] and [`cli`]: wiring a running controller together, and the command line.
//!
//! Shared by every layer: [`error`], [`blocking`], [`clock`], [`listen`], [`metrics`],
//! [`secrets`], [`text`]. The old flat paths (`crate::mesh`, `crate::grpc`, ...) stay available as
//! re-exports.

pub mod agent_rt;
pub mod api;
pub mod auth;
pub mod blocking;
pub mod cli;
pub mod clock;
pub mod core;
pub mod domains;
pub mod error;
pub mod listen;
pub mod metrics;
pub mod secrets;
pub mod serve;
pub mod ssh;
pub mod text;
pub mod tls;
pub mod web;

pub use crate::api::{admin, grpc, pki_http};
pub use crate::core::{audit, authority, blocklist, durable, kv, leader, limits, mesh, store};
