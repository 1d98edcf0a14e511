//! The portable configuration document of `GET /v1/config/export` and `PUT /v1/config`:
//! objects refer to each other by name instead of id, and private keys are never exported.
//!
//! [`resolve`] turns a document into a [`Config`] against what is stored (so unchanged objects
//! keep their ids and servers their health identity), reporting every problem at once with its
//! JSON path. It is pure: no database, no clock.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sluice_shared::certs;
use sluice_shared::validate::ObjectKind;
use sluice_shared::{
    Backend, BackendTls, Balance, Certificate, Config, HealthCheck, Host, Hostname, Mode, Protocol,
    ProxyProtocol, RequestHeaders,
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::convert::{lower_rules, servers, ServerSpec};
use crate::error::FieldError;

/// A certificate in a document. `key_pem` is never exported; on import it is required for a
/// new certificate or a changed chain, and may be left out when the stored certificate of that
/// name has the same fingerprint (its key is kept).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocCertificate {
    pub name: String,
    pub cert_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
    /// Shown on export; ignored on import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint_sha256: Option<String>,
}

/// A server in a document.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocServer {
    pub address: String,
    #[serde(default = "one")]
    pub weight: u16,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn one() -> u16 {
    1
}

fn yes() -> bool {
    true
}

/// A backend in a document.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocBackend {
    pub name: String,
    pub protocol: Protocol,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub servers: Vec<DocServer>,
    #[serde(default)]
    pub health_check: HealthCheck,
    #[serde(default)]
    pub tls: Option<BackendTls>,
}

/// A host in a document, naming its backend and certificate.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocHost {
    pub hostname: String,
    pub mode: Mode,
    /// Name of the backend.
    pub backend: String,
    /// Name of the certificate (terminate hosts; omit to use the best covering one).
    #[serde(default)]
    pub certificate: Option<String>,
    #[serde(default)]
    pub request_headers: RequestHeaders,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
}

/// The whole configuration, portable between installations.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigDocument {
    #[serde(default)]
    pub certificates: Vec<DocCertificate>,
    #[serde(default)]
    pub backends: Vec<DocBackend>,
    #[serde(default)]
    pub hosts: Vec<DocHost>,
}

/// Export a configuration (sorted by name, no keys).
pub fn export(config: &Config) -> ConfigDocument {
    let cert_names: HashMap<Uuid, &str> = config
        .certificates
        .iter()
        .map(|c| (c.id, c.name.as_str()))
        .collect();
    let backend_names: HashMap<Uuid, &str> = config
        .backends
        .iter()
        .map(|b| (b.id, b.name.as_str()))
        .collect();
    let mut doc = ConfigDocument {
        certificates: config
            .certificates
            .iter()
            .map(|c| DocCertificate {
                name: c.name.clone(),
                cert_pem: c.cert_pem.clone(),
                key_pem: None,
                fingerprint_sha256: certs::inspect_chain(&c.cert_pem)
                    .ok()
                    .map(|f| f.fingerprint_sha256),
            })
            .collect(),
        backends: config
            .backends
            .iter()
            .map(|b| DocBackend {
                name: b.name.clone(),
                protocol: b.protocol,
                balance: b.balance,
                servers: b
                    .servers
                    .iter()
                    .map(|s| DocServer {
                        address: s.address.to_string(),
                        weight: s.weight,
                        enabled: s.enabled,
                    })
                    .collect(),
                health_check: b.health_check.clone(),
                tls: b.tls.clone(),
            })
            .collect(),
        hosts: config
            .hosts
            .iter()
            .map(|h| DocHost {
                hostname: h.hostname.to_string(),
                mode: h.mode,
                backend: backend_names
                    .get(&h.backend_id)
                    .copied()
                    .unwrap_or_default()
                    .to_owned(),
                certificate: h
                    .certificate_id
                    .and_then(|c| cert_names.get(&c).map(|n| (*n).to_owned())),
                request_headers: h.request_headers.clone(),
                proxy_protocol: h.proxy_protocol,
            })
            .collect(),
    };
    doc.certificates.sort_by(|a, b| a.name.cmp(&b.name));
    doc.backends.sort_by(|a, b| a.name.cmp(&b.name));
    doc.hosts.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    doc
}

/// A private key the document brings, to be stored.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub sha256: String,
    pub pem: String,
}

/// A resolved document: the configuration, the keys to store, and each object's JSON path.
#[derive(Debug)]
pub struct Resolved {
    pub config: Config,
    pub keys: Vec<NewKey>,
    pub paths: HashMap<(ObjectKind, Uuid), String>,
}

/// Find duplicate names; report each repeat with its path.
fn duplicates<'a>(
    kind: &str,
    field: &str,
    names: impl Iterator<Item = &'a str>,
    errors: &mut Vec<FieldError>,
) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, name) in names.enumerate() {
        if let Some(first) = seen.insert(name, i) {
            errors.push(FieldError::new(
                format!("{kind}[{i}].{field}"),
                format!("`{name}` is also {kind}[{first}]"),
            ));
            seen.insert(name, first);
        }
    }
}

/// Turn a document into a configuration, keeping the ids of stored objects with the same name.
/// New or changed certificates must not have expired at `now`.
pub fn resolve(
    doc: ConfigDocument,
    current: &Config,
    now: time::OffsetDateTime,
) -> Result<Resolved, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut paths = HashMap::new();
    let mut keys = Vec::new();
    duplicates(
        "certificates",
        "name",
        doc.certificates.iter().map(|c| c.name.as_str()),
        &mut errors,
    );
    duplicates(
        "backends",
        "name",
        doc.backends.iter().map(|b| b.name.as_str()),
        &mut errors,
    );
    duplicates(
        "hosts",
        "hostname",
        doc.hosts.iter().map(|h| h.hostname.as_str()),
        &mut errors,
    );

    let stored_certs: HashMap<&str, &Certificate> = current
        .certificates
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    let mut certificates = Vec::with_capacity(doc.certificates.len());
    let mut cert_ids: HashMap<String, Uuid> = HashMap::new();
    for (i, c) in doc.certificates.into_iter().enumerate() {
        let path = format!("certificates[{i}]");
        let stored = stored_certs.get(c.name.as_str());
        let facts = match certs::inspect_chain(&c.cert_pem) {
            Ok(f) => f,
            Err(e) => {
                errors.push(FieldError::new(format!("{path}.cert_pem"), e.to_string()));
                continue;
            }
        };
        let unchanged = stored.is_some_and(|s| {
            certs::inspect_chain(&s.cert_pem)
                .is_ok_and(|f| f.fingerprint_sha256 == facts.fingerprint_sha256)
        });
        if !unchanged {
            if let Err(e) = certs::check_not_expired(&facts, now) {
                errors.push(FieldError::new(format!("{path}.cert_pem"), e.to_string()));
                continue;
            }
        }
        let key_sha256 = match (&c.key_pem, stored) {
            (Some(key), _) => match certs::check_key_matches(&c.cert_pem, key) {
                Ok(()) => {
                    let sha = certs::sha256_hex(key.as_bytes());
                    keys.push(NewKey {
                        sha256: sha.clone(),
                        pem: key.clone(),
                    });
                    sha
                }
                Err(e) => {
                    errors.push(FieldError::new(format!("{path}.key_pem"), e.to_string()));
                    continue;
                }
            },
            (None, Some(s)) if unchanged => s.key_sha256.clone(),
            (None, _) => {
                errors.push(FieldError::new(
                    format!("{path}.key_pem"),
                    "is required: no stored certificate of this name has this fingerprint",
                ));
                continue;
            }
        };
        let id = stored.map_or_else(Uuid::new_v4, |s| s.id);
        cert_ids.insert(c.name.clone(), id);
        paths.insert((ObjectKind::Certificate, id), path);
        certificates.push(Certificate {
            id,
            name: c.name,
            cert_pem: c.cert_pem,
            key_sha256,
            key_pem: None,
        });
    }

    let stored_backends: HashMap<&str, &Backend> = current
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b))
        .collect();
    let mut backends = Vec::with_capacity(doc.backends.len());
    let mut backend_ids: HashMap<String, Uuid> = HashMap::new();
    for (i, b) in doc.backends.into_iter().enumerate() {
        let path = format!("backends[{i}]");
        let stored = stored_backends.get(b.name.as_str());
        let specs = b
            .servers
            .into_iter()
            .map(|s| ServerSpec {
                id: None,
                address: s.address,
                weight: s.weight,
                enabled: s.enabled,
            })
            .collect();
        let servers = servers(specs, stored.copied(), &format!("{path}."), &mut errors);
        let id = stored.map_or_else(Uuid::new_v4, |s| s.id);
        backend_ids.insert(b.name.clone(), id);
        paths.insert((ObjectKind::Backend, id), path);
        backends.push(Backend {
            id,
            name: b.name,
            protocol: b.protocol,
            balance: b.balance,
            servers,
            health_check: b.health_check,
            tls: b.tls,
        });
    }

    let stored_hosts: HashMap<&str, Uuid> = current
        .hosts
        .iter()
        .map(|h| (h.hostname.as_str(), h.id))
        .collect();
    let mut hosts = Vec::with_capacity(doc.hosts.len());
    for (i, h) in doc.hosts.into_iter().enumerate() {
        let path = format!("hosts[{i}]");
        let hostname = match h.hostname.parse::<Hostname>() {
            Ok(n) => Some(n),
            Err(e) => {
                errors.push(FieldError::new(
                    format!("{path}.hostname"),
                    format!("`{}` {e}", h.hostname),
                ));
                None
            }
        };
        let backend_id = backend_ids.get(&h.backend).copied();
        if backend_id.is_none() {
            errors.push(FieldError::new(
                format!("{path}.backend"),
                format!("no backend named `{}` in the document", h.backend),
            ));
        }
        let certificate_id = match &h.certificate {
            None => Some(None),
            Some(name) => match cert_ids.get(name) {
                Some(id) => Some(Some(*id)),
                None => {
                    errors.push(FieldError::new(
                        format!("{path}.certificate"),
                        format!("no certificate named `{name}` in the document"),
                    ));
                    None
                }
            },
        };
        let (Some(hostname), Some(backend_id), Some(certificate_id)) =
            (hostname, backend_id, certificate_id)
        else {
            continue;
        };
        let id = stored_hosts
            .get(hostname.as_str())
            .copied()
            .unwrap_or_else(Uuid::new_v4);
        paths.insert((ObjectKind::Host, id), path);
        let request_headers = lower_rules(h.request_headers);
        hosts.push(Host {
            id,
            hostname,
            mode: h.mode,
            backend_id,
            certificate_id,
            request_headers,
            proxy_protocol: h.proxy_protocol,
        });
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    let mut config = Config {
        certificates,
        backends,
        hosts,
    };
    config.normalize();
    Ok(Resolved {
        config,
        keys,
        paths,
    })
}
