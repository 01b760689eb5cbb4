//! The machine-facing APIs over the core: gRPC for agents ([`grpc`]), the admin socket
//! for the CLI ([`admin`]), and OCSP and CRL over plain HTTP ([`pki_http`]).

pub mod admin;
pub mod grpc;
pub mod pki_http;
