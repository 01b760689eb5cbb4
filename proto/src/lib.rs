//! zonemesh gRPC definitions: generated code only.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("zonemesh.v1");

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The one-time token is a secret: never print it.
        f.debug_struct("EnrollRequest")
            .field("token", &"<redacted>")
            .field("node_name", &self.node_name)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DomainCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The domain's private key is a secret: never print it.
        f.debug_struct("DomainCertificate")
            .field("domain", &self.domain)
            .field("serial_hex", &self.serial_hex)
            .field("not_after_unix", &self.not_after_unix)
            .field("chain_len", &self.chain_der.len())
            .finish_non_exhaustive()
    }
}
