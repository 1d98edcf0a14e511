//! The snapshot model: everything a worker needs to serve traffic, as one immutable value.
//!
//! [`Config`] is the configuration proper (certificates, backends, hosts); [`Snapshot`] is a
//! committed, numbered and hashed `Config`. The REST resources of the API carry the same fields.
//! Collections are kept sorted by id so that the encoding, and so the hash, is canonical.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::types::{ConfigVersion, Hostname, ServerAddr};

/// A whole configuration. Certificates, backends and hosts are sorted by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub certificates: Vec<Certificate>,
    pub backends: Vec<Backend>,
    pub hosts: Vec<Host>,
}

impl Config {
    /// Sort every collection by id, the canonical order.
    pub fn normalize(&mut self) {
        self.certificates.sort_by_key(|c| c.id);
        self.backends.sort_by_key(|b| b.id);
        self.hosts.sort_by_key(|h| h.id);
    }

    pub fn certificate(&self, id: Uuid) -> Option<&Certificate> {
        self.certificates.iter().find(|c| c.id == id)
    }

    pub fn backend(&self, id: Uuid) -> Option<&Backend> {
        self.backends.iter().find(|b| b.id == id)
    }

    /// A copy with every private key removed (the form kept in history and shown over REST).
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        for cert in &mut c.certificates {
            cert.key_pem = None;
        }
        c
    }
}

/// A committed configuration: its version, content hash and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: ConfigVersion,
    /// sha256 (hex) of the canonical encoding of `config`, see [`crate::hash`].
    pub hash: String,
    pub config: Config,
}

/// A certificate chain and its private key.
///
/// `key_sha256` names the key (sha256 of its PEM text) and is what the hash covers; `key_pem`
/// itself travels only inside snapshots on the authenticated worker channel and is `None`
/// everywhere else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub id: Uuid,
    pub name: String,
    /// PEM chain, leaf first.
    pub cert_pem: String,
    pub key_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub key_pem: Option<String>,
}

/// How a backend's servers are spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 in cleartext, keep-alive pool.
    Http,
    /// HTTP/2 in cleartext with prior knowledge.
    H2c,
    /// TLS to the server, ALPN `h2,http/1.1`.
    Https,
    /// Raw bytes, for passthrough hosts.
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::H2c => "h2c",
            Protocol::Https => "https",
            Protocol::Tcp => "tcp",
        }
    }

    /// Can a terminated host send HTTP requests to it?
    pub fn speaks_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

/// How requests are spread over a backend's servers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// The server with the fewest requests in flight.
    LeastRequests,
}

/// One upstream server of a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub id: Uuid,
    pub address: ServerAddr,
    /// Relative share of new requests, 1-256.
    pub weight: u16,
    /// A disabled server gets no new requests or connections.
    pub enabled: bool,
}

/// What a health check does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// A TCP connect.
    #[default]
    Tcp,
    /// `GET path`, status within `expect_status`.
    Http,
    /// A TLS handshake with the host's SNI.
    Tls,
}

/// Active health checking, with HAProxy's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    /// Path for `http` checks.
    pub path: String,
    /// Accepted statuses for `http` checks: `200`, `200-399`, or a comma list of those.
    pub expect_status: String,
    pub interval_ms: u32,
    /// Must be below `interval_ms`.
    pub timeout_ms: u32,
    /// Consecutive successes that mark a server up, 1-10.
    pub rise: u8,
    /// Consecutive failures that mark a server down, 1-10.
    pub fall: u8,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: HealthCheckKind::Tcp,
            path: "/".into(),
            expect_status: "200-399".into(),
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
        }
    }
}

/// TLS settings for `https` backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTls {
    /// Verify the server's certificate (against `ca_pem`, or the system roots when absent).
    pub verify: bool,
    /// PEM bundle of trusted CA certificates.
    pub ca_pem: Option<String>,
    /// SNI and name to verify; defaults to the server address's host.
    pub server_name: Option<Hostname>,
}

impl Default for BackendTls {
    fn default() -> Self {
        BackendTls {
            verify: true,
            ca_pem: None,
            server_name: None,
        }
    }
}

/// A pool of servers and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub id: Uuid,
    pub name: String,
    pub protocol: Protocol,
    pub balance: Balance,
    pub servers: Vec<Server>,
    pub health_check: HealthCheck,
    /// Only for `https` backends.
    pub tls: Option<BackendTls>,
}

/// Does a host end TLS at the proxy or pass it through?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Terminate,
    Passthrough,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Terminate => "terminate",
            Mode::Passthrough => "passthrough",
        }
    }
}

/// PROXY protocol header sent to passthrough backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

/// Header rules applied to requests after the forwarded headers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RequestHeaders {
    /// Headers to set (replacing any value), by lower-case name.
    pub set: BTreeMap<String, String>,
    /// Headers to remove, lower-case names.
    pub remove: Vec<String>,
}

impl RequestHeaders {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// A hostname served by the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub id: Uuid,
    pub hostname: Hostname,
    pub mode: Mode,
    pub backend_id: Uuid,
    /// For `terminate` hosts; when absent the best covering certificate is chosen.
    pub certificate_id: Option<Uuid>,
    pub request_headers: RequestHeaders,
    pub proxy_protocol: ProxyProtocol,
}
