//! The controller's core: the authority, the mesh state machine, the store and the audit
//! log. Nothing here knows which API or page a request came from.

pub mod audit;
pub mod authority;
pub mod backup;
pub mod blocklist;
pub mod durable;
pub mod kv;
pub mod leader;
pub mod limits;
pub mod mesh;
pub mod rotation;
pub mod store;
