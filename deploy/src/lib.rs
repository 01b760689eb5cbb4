//! zonemesh portal certificate deployment.
//!
//! Used by the controller (issuing, through ACME or the internal CA) and by the agent (the
//! edge that serves what was issued, or the files a local nginx/HAProxy reads). It uses
//! `zonemesh-ca` and `zonemesh-proto` and never the controller or the agent.
//!
//! - [`bundle`]: a domain's certificate chain and key, as issued and as sent to the edges.
//! - [`atomic`]: the one atomic file writer every zonemesh binary uses.
//! - [`clock`]: the one clock every zonemesh component reads, injected in tests.
//! - [`listen`]: admission, backoff and deadlines shared by every zonemesh TCP listener.
//! - [`acme`]: the RFC 8555 issuer (controller side).
//! - [`internal`]: the internal-CA issuer (controller side).
//! - [`edge`]: the TLS edge: SNI, hot swap, HTTP-01, HSTS, reverse proxy (agent side).
//! - [`ocsp`]: OCSP staples for the edge: request, fetch, parse.
//! - [`files`]: `fullchain.pem` / `privkey.pem` / `ocsp.der` for nginx or HAProxy (agent side).

pub mod acme;
pub mod atomic;
pub mod bundle;
pub mod clock;
pub mod edge;
pub mod exposition;
pub mod files;
pub mod internal;
pub mod listen;
pub mod ocsp;
#[cfg(feature = "testing")]
pub mod testing;

pub use atomic::write_atomic;
pub use bundle::CertBundle;
