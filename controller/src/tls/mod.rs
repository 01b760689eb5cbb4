//! TLS plumbing shared by the controller's listeners: the offered suites, the
//! controller's own renewing certificate, and the CRL-checking client verifier of the gRPC
//! listener. The gRPC and web sides both import from here, never from each other.

mod certs;
mod verifier;

use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::cipher_suite as cs;
use std::sync::Arc;

pub use certs::{CertSource, IssuedTls, TlsError, ca_issuer, issue_own};
pub use verifier::{CrlClientVerifier, TlsSetupError, grpc_server_config};

/// The cipher suites offered: TLS 1.3's AEAD suites and, for TLS 1.2, ECDHE with AES-GCM
/// or ChaCha20-Poly1305 only. No static RSA key exchange, no CBC, nothing without
/// forward secrecy.
pub fn cipher_suites() -> Vec<rustls::SupportedCipherSuite> {
    vec![
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

/// aws-lc-rs restricted to [`cipher_suites`]: the provider of every controller listener.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = cipher_suites();
    Arc::new(p)
}
