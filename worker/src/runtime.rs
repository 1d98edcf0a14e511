//! The worker's runtime state: everything built from one snapshot, ready to serve, behind one
//! atomically switched pointer.
//!
//! [`build`] does all the work up front (hash check, the shared validation, loading every
//! certificate and key into rustls) and either returns a complete [`Runtime`] or an error; a
//! half-built state is never visible. [`Current`] holds the one in force; readers take a cheap
//! snapshot of the pointer per connection, so a switch never mixes two versions.

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use sluice_shared::certs;
use sluice_shared::hash::config_hash;
use sluice_shared::validate::{validate_with, Invalid};
use sluice_shared::{Backend, Config, ConfigVersion, Host, Snapshot};
use uuid::Uuid;

use crate::balance::Balancer;
use crate::pool::PoolKey;

/// Why a snapshot cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("hash mismatch: the snapshot says {claimed}, its content hashes to {actual}")]
    HashMismatch { claimed: String, actual: String },
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("certificate `{name}` arrived without its private key")]
    MissingKey { name: String },
    #[error("certificate `{name}` cannot be loaded into rustls: {reason}")]
    Tls { name: String, reason: String },
    #[error("backend `{name}`: TLS settings cannot be used: {reason}")]
    UpstreamTls { name: String, reason: String },
}

/// Where the state in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Pushed by the API on the channel.
    Api,
    /// Loaded from the state directory at start-up.
    StateDir,
}

/// The PEM private keys of a runtime's certificates, by certificate id: kept so the next delta
/// can be applied to the full configuration (and a compacted snapshot written). Never shown.
#[derive(Default)]
pub struct KeyPems(HashMap<Uuid, String>);

impl std::fmt::Debug for KeyPems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPems(<{} redacted>)", self.0.len())
    }
}

/// Everything built from one snapshot.
#[derive(Debug)]
pub struct Runtime {
    pub version: ConfigVersion,
    pub hash: String,
    pub source: Source,
    /// When it was switched in (RFC 3339).
    pub applied_at: String,
    /// The configuration, without private keys (those live only in `certified`).
    pub config: Config,
    /// Loaded certificate chains and signing keys, by certificate id.
    pub certified: HashMap<Uuid, Arc<CertifiedKey>>,
    /// The keys in PEM form (see [`KeyPems`]).
    key_pems: KeyPems,
    /// Host index by exact hostname and by wildcard suffix (`beerme` for `*.beerme`).
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
    /// Each host's metrics label and series, by the same index.
    host_metrics: Vec<crate::metrics::HostMetrics>,
    /// The certificate each terminate host uses, by host id.
    pub host_certificates: HashMap<Uuid, Uuid>,
    /// Facts of every certificate (SANs, validity), by id.
    pub cert_facts: HashMap<Uuid, sluice_shared::certs::CertFacts>,
    /// Balancing state per backend.
    balancers: HashMap<Uuid, (Backend, Arc<Balancer>)>,
    /// rustls server configuration per certificate (for terminate hosts).
    pub server_configs: HashMap<Uuid, Arc<rustls::ServerConfig>>,
    /// rustls client configuration per `https` backend.
    pub upstream_tls: HashMap<Uuid, crate::upstream_tls::Upstream>,
    /// Connection pool key of every server, by backend id and server index.
    pool_keys: HashMap<Uuid, Vec<PoolKey>>,
}

impl Runtime {
    /// The configuration as the API sent it, private keys included (for applying a delta).
    pub fn config_with_keys(&self) -> Config {
        let mut config = self.config.clone();
        for c in &mut config.certificates {
            c.key_pem = self.key_pems.0.get(&c.id).cloned();
        }
        config
    }

    /// Whether `previous` held a private key this runtime does not (a certificate deleted or
    /// given a new key): the state directory should then stop holding it.
    pub fn drops_a_key_of(&self, previous: &Runtime) -> bool {
        let kept: foldhash::HashSet<&str> = self
            .config
            .certificates
            .iter()
            .map(|c| c.key_sha256.as_str())
            .collect();
        previous
            .config
            .certificates
            .iter()
            .any(|old| !kept.contains(old.key_sha256.as_str()))
    }

    /// A backend by id (an index lookup: this is on every request's path).
    pub fn backend(&self, id: Uuid) -> Option<&Backend> {
        self.balancers.get(&id).map(|(b, _)| b)
    }

    /// The connection pool keys of a backend's servers, by index.
    pub fn pool_keys(&self, backend: Uuid) -> &[PoolKey] {
        self.pool_keys.get(&backend).map_or(&[], Vec::as_slice)
    }

    /// The balancer of a backend.
    pub fn balancer(&self, backend: Uuid) -> Option<&Balancer> {
        self.balancers.get(&backend).map(|(_, b)| b.as_ref())
    }

    /// The host serving `name` (an SNI or Host value): exact match first, then wildcard.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.index(name).map(|i| &self.config.hosts[i])
    }

    /// [`Runtime::host`], with the host's metrics (labelled with its configured name, never
    /// the client's spelling).
    pub fn host_labelled(&self, name: &str) -> Option<(&Host, &crate::metrics::HostMetrics)> {
        self.index(name)
            .map(|i| (&self.config.hosts[i], &self.host_metrics[i]))
    }

    fn index(&self, name: &str) -> Option<usize> {
        // Called per connection and per request: copy only when the name is not lower case yet.
        let name = name.trim_end_matches('.');
        let name: std::borrow::Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            name.to_ascii_lowercase().into()
        } else {
            name.into()
        };
        if let Some(&i) = self.exact.get(name.as_ref()) {
            return Some(i);
        }
        let (_, suffix) = name.split_once('.')?;
        self.wildcard.get(suffix).copied()
    }
}

/// Load a certificate chain and key into rustls, checking that they belong together.
fn certified_key(name: &str, cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, BuildError> {
    let tls = |reason: String| BuildError::Tls {
        name: name.to_owned(),
        reason,
    };
    let chain = certs::parse_chain(cert_pem).map_err(|e| tls(e.to_string()))?;
    let key = certs::parse_key(key_pem).map_err(|e| tls(e.to_string()))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| tls(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| tls(e.to_string()))?;
    Ok(ck)
}

/// Build the complete runtime state from a snapshot, or say why it cannot serve.
///
/// Balancing state of backends that did not change is carried over from `previous`.
pub fn build(
    snapshot: Snapshot,
    source: Source,
    applied_at: String,
    previous: Option<&Runtime>,
) -> Result<Runtime, BuildError> {
    let Snapshot {
        version,
        hash,
        mut config,
    } = snapshot;
    config.normalize();
    // Keys leave the configuration first, so hashing needs no redacted copy of it.
    let mut keys: HashMap<Uuid, String> = config
        .certificates
        .iter_mut()
        .filter_map(|c| c.key_pem.take().map(|k| (c.id, k)))
        .collect();
    let actual = config_hash(&config);
    if actual != hash {
        return Err(BuildError::HashMismatch {
            claimed: hash,
            actual,
        });
    }
    // Back in for validation, which checks each key against its `key_sha256`.
    for c in &mut config.certificates {
        c.key_pem = keys.remove(&c.id);
    }
    let previous_certs: HashMap<Uuid, &sluice_shared::Certificate> = previous
        .map(|p| p.config.certificates.iter().map(|c| (c.id, c)).collect())
        .unwrap_or_default();
    // Unchanged chains are not parsed again.
    let known = |c: &sluice_shared::Certificate| {
        let prev = previous?;
        previous_certs
            .get(&c.id)
            .filter(|old| old.cert_pem == c.cert_pem)?;
        prev.cert_facts.get(&c.id).cloned()
    };
    let validated = validate_with(&config, &known)?;
    let mut certified = HashMap::with_capacity(config.certificates.len());
    let mut key_pems = HashMap::with_capacity(config.certificates.len());
    let mut server_configs = HashMap::with_capacity(config.certificates.len());
    // Certificates whose chain and key did not change keep their loaded form: loading a key is
    // the costly part of a switch, and most switches change something else.
    let reusable = |cert: &sluice_shared::Certificate| {
        let prev = previous?;
        let old = previous_certs.get(&cert.id)?;
        if old.cert_pem != cert.cert_pem || old.key_sha256 != cert.key_sha256 {
            return None;
        }
        Some((
            prev.certified.get(&cert.id)?.clone(),
            prev.server_configs.get(&cert.id)?.clone(),
        ))
    };
    for cert in &mut config.certificates {
        let key = cert.key_pem.take().ok_or_else(|| BuildError::MissingKey {
            name: cert.name.clone(),
        })?;
        let (ck, sc) = match reusable(cert) {
            Some(loaded) => loaded,
            None => {
                let ck = Arc::new(certified_key(&cert.name, &cert.cert_pem, &key)?);
                let sc =
                    crate::terminate::server_config(ck.clone()).map_err(|e| BuildError::Tls {
                        name: cert.name.clone(),
                        reason: e.to_string(),
                    })?;
                (ck, sc)
            }
        };
        certified.insert(cert.id, ck);
        key_pems.insert(cert.id, key);
        server_configs.insert(cert.id, sc);
    }
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let host_metrics = config
        .hosts
        .iter()
        .map(|h| crate::metrics::HostMetrics::new(h.hostname.as_str()))
        .collect();
    for (i, h) in config.hosts.iter().enumerate() {
        match h.hostname.wildcard_suffix() {
            Some(suffix) => wildcard.insert(suffix.to_owned(), i),
            None => exact.insert(h.hostname.as_str().to_owned(), i),
        };
    }
    let balancers = config
        .backends
        .iter()
        .map(|b| {
            let kept = previous
                .and_then(|p| p.balancers.get(&b.id))
                .filter(|(old, _)| old == b)
                .map(|(_, bal)| bal.clone());
            (
                b.id,
                (
                    b.clone(),
                    kept.unwrap_or_else(|| Arc::new(Balancer::new(b))),
                ),
            )
        })
        .collect();
    let mut upstream_tls = HashMap::new();
    for b in config
        .backends
        .iter()
        .filter(|b| b.protocol == sluice_shared::Protocol::Https)
    {
        // Unchanged TLS settings keep their client configuration (loading a CA bundle is
        // costly, and its session cache is worth keeping).
        let kept = previous.and_then(|p| {
            let (old, _) = p.balancers.get(&b.id)?;
            (old.protocol == b.protocol && old.tls == b.tls)
                .then(|| p.upstream_tls.get(&b.id).cloned())
                .flatten()
        });
        let client = match kept {
            Some(c) => c,
            None => {
                let settings = b.tls.clone().unwrap_or_default();
                crate::upstream_tls::Upstream::new(&settings).map_err(|reason| {
                    BuildError::UpstreamTls {
                        name: b.name.clone(),
                        reason,
                    }
                })?
            }
        };
        upstream_tls.insert(b.id, client);
    }
    let pool_keys = config
        .backends
        .iter()
        .map(|b| {
            let keys = b
                .servers
                .iter()
                .map(|server| pool_key(b, server, upstream_tls.get(&b.id)))
                .collect();
            (b.id, keys)
        })
        .collect();
    Ok(Runtime {
        pool_keys,
        upstream_tls,
        server_configs,
        balancers,
        version,
        hash,
        source,
        applied_at,
        config,
        certified,
        key_pems: KeyPems(key_pems),
        exact,
        wildcard,
        host_metrics,
        host_certificates: validated.host_certificates.into_iter().collect(),
        cert_facts: validated.certificates.into_iter().collect(),
    })
}

/// The runtime state in force (none until the first snapshot is applied).
#[derive(Debug, Default)]
pub struct Current(ArcSwapOption<Runtime>);

impl Current {
    pub fn load(&self) -> Option<Arc<Runtime>> {
        self.0.load_full()
    }

    pub fn store(&self, runtime: Arc<Runtime>) {
        self.0.store(Some(runtime));
    }

    /// `(version, hash)` in force.
    pub fn applied(&self) -> Option<(ConfigVersion, String)> {
        self.0.load().as_ref().map(|r| (r.version, r.hash.clone()))
    }
}

#[cfg(test)]
mod tests;

/// What makes connections to `server` of `backend` interchangeable: its address and, for TLS,
/// the name sent and verified, whether it is verified, and against which CA bundle.
fn pool_key(
    backend: &sluice_shared::Backend,
    server: &sluice_shared::Server,
    tls: Option<&crate::upstream_tls::Upstream>,
) -> PoolKey {
    PoolKey {
        address: Arc::from(server.address.to_string()),
        tls: tls.map(|upstream| {
            let settings = backend.tls.clone().unwrap_or_default();
            let sni = settings
                .server_name
                .as_ref()
                .map_or_else(|| server.address.host_str(), |n| n.to_string());
            Arc::new((sni, settings.verify, upstream.ca_sha256.clone()))
        }),
    }
}
