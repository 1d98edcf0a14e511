//! Tests for building runtime state from snapshots.

use super::*;
use sluice_shared::model::*;

fn seed(key_ok: bool) -> Snapshot {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["*.beerme".to_string(), "redmine.beerme".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
    let key_pem = if key_ok {
        key.serialize_pem()
    } else {
        rcgen::KeyPair::generate().unwrap().serialize_pem()
    };
    let mut config = Config {
        certificates: vec![Certificate {
            id: Uuid::from_u128(1),
            name: "beerme".into(),
            cert_pem: cert.pem(),
            key_sha256: certs::sha256_hex(key_pem.as_bytes()),
            key_pem: Some(key_pem),
        }],
        backends: vec![Backend {
            id: Uuid::from_u128(2),
            name: "redmine".into(),
            protocol: Protocol::Http,
            balance: Balance::RoundRobin,
            servers: vec![],
            health_check: HealthCheck::default(),
            tls: None,
        }],
        hosts: ["redmine.beerme", "*.beerme"]
            .iter()
            .enumerate()
            .map(|(i, name)| Host {
                id: Uuid::from_u128(10 + i as u128),
                hostname: name.parse().unwrap(),
                mode: Mode::Terminate,
                backend_id: Uuid::from_u128(2),
                certificate_id: None,
                request_headers: RequestHeaders::default(),
                proxy_protocol: ProxyProtocol::None,
            })
            .collect(),
    };
    config.normalize();
    let hash = config_hash(&config);
    Snapshot {
        version: ConfigVersion::try_from(3).unwrap(),
        hash,
        config,
    }
}

#[test]
fn builds_routes_and_keys() {
    let rt = build(seed(true), Source::Api, "now".into(), None).unwrap();
    assert_eq!(rt.certified.len(), 1);
    assert!(
        rt.config.certificates[0].key_pem.is_none(),
        "keys are not kept in the config"
    );
    assert_eq!(rt.host("REDMINE.beerme.").unwrap().id, Uuid::from_u128(10));
    assert_eq!(rt.host("odoo.beerme").unwrap().id, Uuid::from_u128(11));
    assert!(rt.host("a.b.beerme").is_none());
    assert!(rt.host("beerme").is_none());
    assert_eq!(rt.host_certificates.len(), 2);
}

#[test]
fn refuses_mismatched_keys_hashes_and_missing_keys() {
    assert!(matches!(
        build(seed(false), Source::Api, "now".into(), None),
        Err(BuildError::Tls { .. })
    ));
    let mut s = seed(true);
    s.hash = "00".repeat(32);
    assert!(matches!(
        build(s, Source::Api, "now".into(), None),
        Err(BuildError::HashMismatch { .. })
    ));
    let mut s = seed(true);
    s.config.certificates[0].key_pem = None;
    assert!(matches!(
        build(s, Source::Api, "now".into(), None),
        Err(BuildError::MissingKey { .. })
    ));
    let mut s = seed(true);
    s.config.certificates[0].key_pem = Some("tampered".into());
    assert!(matches!(
        build(s, Source::Api, "now".into(), None),
        Err(BuildError::Invalid(_))
    ));
}

#[test]
fn a_runtime_drops_a_key_when_a_certificate_is_rekeyed_or_gone() {
    let first = seed(true);
    let rt = build(first.clone(), Source::Api, "now".into(), None).unwrap();
    let same = build(first.clone(), Source::Api, "now".into(), Some(&rt)).unwrap();
    assert!(!same.drops_a_key_of(&rt), "the same keys");
    // The same certificate with a new key pair.
    let rekeyed = build(seed(true), Source::Api, "now".into(), Some(&rt)).unwrap();
    assert!(rekeyed.drops_a_key_of(&rt));
    // Going to a configuration without certificates drops every key; coming from one, none.
    let mut bare = first;
    bare.config.hosts.clear();
    bare.config.certificates.clear();
    bare.hash = config_hash(&bare.config);
    let bare = build(bare, Source::Api, "now".into(), Some(&rt)).unwrap();
    assert!(bare.drops_a_key_of(&rt));
    assert!(!rt.drops_a_key_of(&bare));
}
