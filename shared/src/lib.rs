//! `sluice-shared`: the contract between `sluice-api` and `sluice-worker`.
//!
//! It holds the snapshot model ([`model`]), the typed values that cannot hold invalid data
//! ([`types`]), certificate inspection ([`certs`]), the one validation function both sides run
//! ([`validate`]), the change summary between two configurations ([`diff`]) and the content hash
//! ([`hash`]), and deltas between configurations ([`delta`]). It does no I/O and knows nothing of tokio or SQLite.

pub mod certs;
pub mod channel;
pub mod delta;
pub mod diff;
pub mod hash;
pub mod model;
pub mod types;
pub mod validate;

pub use model::{
    Backend, BackendTls, Balance, Certificate, Config, HealthCheck, HealthCheckKind, Host, Mode,
    Protocol, ProxyProtocol, RequestHeaders, Server, Snapshot,
};
pub use types::{ConfigVersion, Hostname, ServerAddr};
