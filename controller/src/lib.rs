//! zonemesh controller: the internal CA, the control plane and the admin side.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod authority;
pub mod blocking;
pub mod blocklist;
pub mod cli;
pub mod clock;
pub mod domains;
pub mod durable;
pub mod error;
pub mod grpc;
pub mod limits;
pub mod listen;
pub mod mesh;
pub mod pki_http;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod text;
pub mod tls;
pub mod web;
