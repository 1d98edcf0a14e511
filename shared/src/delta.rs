//! The difference between two configurations as the objects to upsert and the ids to remove,
//! and its application: what the API sends a worker already on the previous version instead of
//! the whole snapshot. Both sides compare the result by content hash, so a delta applied to the
//! wrong base is detected, never served.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Backend, Certificate, Config, Host};

/// Objects added or changed (certificates with their keys) and ids removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDelta {
    #[serde(default)]
    pub certificates: Vec<Certificate>,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub hosts: Vec<Host>,
    /// Ids of removed objects of any kind.
    #[serde(default)]
    pub removed: Vec<Uuid>,
}

impl ConfigDelta {
    /// Objects upserted plus ids removed.
    pub fn len(&self) -> usize {
        self.certificates.len() + self.backends.len() + self.hosts.len() + self.removed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn changed<T: Clone + PartialEq>(
    old: &[T],
    new: &[T],
    id: impl Fn(&T) -> Uuid,
    removed: &mut Vec<Uuid>,
) -> Vec<T> {
    let before: HashMap<Uuid, &T> = old.iter().map(|o| (id(o), o)).collect();
    let after: HashSet<Uuid> = new.iter().map(&id).collect();
    removed.extend(before.keys().filter(|k| !after.contains(k)));
    new.iter()
        .filter(|n| before.get(&id(n)) != Some(n))
        .cloned()
        .collect()
}

/// What turns `old` into `new` (pure).
pub fn between(old: &Config, new: &Config) -> ConfigDelta {
    let mut removed = Vec::new();
    let certificates = changed(&old.certificates, &new.certificates, |c| c.id, &mut removed);
    let backends = changed(&old.backends, &new.backends, |b| b.id, &mut removed);
    let hosts = changed(&old.hosts, &new.hosts, |h| h.id, &mut removed);
    removed.sort();
    ConfigDelta {
        certificates,
        backends,
        hosts,
        removed,
    }
}

fn merge<T: Clone>(
    base: &[T],
    upserts: &[T],
    removed: &HashSet<Uuid>,
    id: impl Fn(&T) -> Uuid,
) -> Vec<T> {
    let replaced: HashMap<Uuid, &T> = upserts.iter().map(|u| (id(u), u)).collect();
    let mut out: Vec<T> = base
        .iter()
        .filter(|b| !removed.contains(&id(b)) && !replaced.contains_key(&id(b)))
        .cloned()
        .collect();
    out.extend(upserts.iter().cloned());
    out
}

/// `base` with `delta` applied, normalized (pure).
pub fn apply(base: &Config, delta: &ConfigDelta) -> Config {
    let removed: HashSet<Uuid> = delta.removed.iter().copied().collect();
    let mut config = Config {
        certificates: merge(&base.certificates, &delta.certificates, &removed, |c| c.id),
        backends: merge(&base.backends, &delta.backends, &removed, |b| b.id),
        hosts: merge(&base.hosts, &delta.hosts, &removed, |h| h.id),
    };
    config.normalize();
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, ProxyProtocol, RequestHeaders};

    fn host(name: &str, backend: Uuid) -> Host {
        Host {
            id: Uuid::new_v4(),
            hostname: name.parse().unwrap(),
            mode: Mode::Terminate,
            backend_id: backend,
            certificate_id: None,
            request_headers: RequestHeaders::default(),
            proxy_protocol: ProxyProtocol::default(),
        }
    }

    fn backend(name: &str) -> Backend {
        serde_json::from_value(serde_json::json!({"id": Uuid::new_v4(), "name": name,
            "protocol": "http", "balance": "round_robin", "servers": [], "health_check": {}, "tls": null}))
        .unwrap()
    }

    #[test]
    fn applying_the_delta_between_two_configs_gives_the_second() {
        let (b1, b2) = (backend("a"), backend("b"));
        let mut old = Config {
            certificates: vec![],
            backends: vec![b1.clone(), b2.clone()],
            hosts: (0..50)
                .map(|i| host(&format!("h{i}.example"), b1.id))
                .collect(),
        };
        old.normalize();
        let mut new = old.clone();
        new.hosts.remove(7);
        new.hosts[3].backend_id = b2.id;
        new.hosts.push(host("added.example", b2.id));
        new.backends.retain(|b| b.id != b1.id);
        new.backends.push(backend("c"));
        new.normalize();
        let d = between(&old, &new);
        assert_eq!((d.hosts.len(), d.backends.len()), (2, 1), "{d:?}");
        assert_eq!(d.removed.len(), 2, "a host and a backend");
        assert_eq!(apply(&old, &d), new);
        assert!(between(&new, &new).is_empty());
        assert_eq!(apply(&new, &ConfigDelta::default()), new);
    }
}
