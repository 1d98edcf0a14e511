//! Tests for whole-configuration validation: one case per rule, each naming the field.

use super::*;
use crate::model::*;
use crate::types::Hostname;

fn cert_pem(sans: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem()
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn backend(n: u128, name: &str, protocol: Protocol) -> Backend {
    Backend {
        id: id(n),
        name: name.into(),
        protocol,
        balance: Balance::RoundRobin,
        servers: vec![Server {
            id: id(1000 + n),
            address: "127.0.0.1:8080".parse().unwrap(),
            weight: 1,
            enabled: true,
        }],
        health_check: HealthCheck::default(),
        tls: None,
    }
}

fn host(n: u128, name: &str, mode: Mode, backend: u128, cert: Option<u128>) -> Host {
    Host {
        id: id(n),
        hostname: name.parse::<Hostname>().unwrap(),
        mode,
        backend_id: id(backend),
        certificate_id: cert.map(id),
        request_headers: RequestHeaders::default(),
        proxy_protocol: ProxyProtocol::None,
    }
}

/// The seed scenario of DESIGN.md.
fn seed() -> Config {
    let mut c = Config {
        certificates: vec![Certificate {
            id: id(1),
            name: "beerme".into(),
            cert_pem: cert_pem(&["*.beerme", "redmine.beerme"]),
            key_sha256: "00".repeat(32),
            key_pem: None,
        }],
        backends: vec![
            backend(10, "redmine", Protocol::Http),
            backend(11, "odoo", Protocol::Tcp),
        ],
        hosts: vec![
            host(20, "redmine.beerme", Mode::Terminate, 10, Some(1)),
            host(21, "odoo.beerme", Mode::Passthrough, 11, None),
        ],
    };
    c.normalize();
    c
}

/// Validate and return `(kind, object, field)` of every problem.
fn problems(c: &Config) -> Vec<(ProblemKind, ObjectKind, String)> {
    match validate(c) {
        Ok(_) => vec![],
        Err(Invalid(ps)) => ps
            .into_iter()
            .map(|p| (p.kind, p.object, p.field))
            .collect(),
    }
}

fn check(mutate: impl FnOnce(&mut Config), want: &[(ProblemKind, ObjectKind, &str)]) {
    let mut c = seed();
    mutate(&mut c);
    let got = problems(&c);
    let want: Vec<_> = want
        .iter()
        .map(|(k, o, f)| (*k, *o, f.to_string()))
        .collect();
    assert_eq!(got, want);
}

use ObjectKind::{Backend as B, Certificate as C, Host as H};
use ProblemKind::{Conflict, Invalid as Bad};

#[test]
fn seed_scenario_is_valid_and_resolves_certificates() {
    let v = validate(&seed()).unwrap();
    assert_eq!(v.host_certificates.get(&id(20)), Some(&id(1)));
    assert_eq!(v.host_certificates.get(&id(21)), None);
    assert!(v.certificates[&id(1)]
        .sans
        .contains(&"*.beerme".to_string()));
}

#[test]
fn empty_config_is_valid() {
    assert!(validate(&Config::default()).is_ok());
}

#[test]
fn duplicates_are_conflicts() {
    check(
        |c| c.hosts[1].hostname = "redmine.beerme".parse().unwrap(),
        &[(Conflict, H, "hostname")],
    );
    check(
        |c| c.backends[1].name = "redmine".into(),
        &[(Conflict, B, "name")],
    );
}

#[test]
fn terminate_host_needs_http_backend_and_passthrough_needs_tcp() {
    check(
        |c| c.hosts[0].backend_id = id(11),
        &[(Bad, H, "backend_id")],
    );
    check(
        |c| c.hosts[1].backend_id = id(10),
        &[(Bad, H, "backend_id")],
    );
    check(
        |c| c.hosts[0].backend_id = id(99),
        &[(Bad, H, "backend_id")],
    );
}

#[test]
fn certificate_must_cover_terminate_host() {
    check(
        |c| c.hosts[0].hostname = "redmine.example".parse().unwrap(),
        &[(Bad, H, "certificate_id")],
    );
    let mut c = seed();
    c.hosts[0].hostname = "redmine.example".parse().unwrap();
    let msg = validate(&c).unwrap_err().0[0].message.clone();
    assert!(
        msg.contains("*.beerme, redmine.beerme"),
        "SANs named: {msg}"
    );
    check(
        |c| c.hosts[0].certificate_id = Some(id(77)),
        &[(Bad, H, "certificate_id")],
    );
    // Omitted certificate: the covering one is chosen; none covering is an error.
    check(|c| c.hosts[0].certificate_id = None, &[]);
    check(
        |c| {
            c.hosts[0].certificate_id = None;
            c.hosts[0].hostname = "x.example".parse().unwrap();
        },
        &[(Bad, H, "certificate_id")],
    );
}

#[test]
fn passthrough_takes_no_certificate_headers_and_terminate_no_proxy_protocol() {
    check(
        |c| c.hosts[1].certificate_id = Some(id(1)),
        &[(Bad, H, "certificate_id")],
    );
    check(
        |c| c.hosts[1].request_headers.remove.push("x-a".into()),
        &[(Bad, H, "request_headers")],
    );
    check(
        |c| c.hosts[0].proxy_protocol = ProxyProtocol::V2,
        &[(Bad, H, "proxy_protocol")],
    );
    check(|c| c.hosts[1].proxy_protocol = ProxyProtocol::V1, &[]);
}

#[test]
fn header_rules() {
    check(
        |c| {
            c.hosts[0]
                .request_headers
                .set
                .insert("Bad Name".into(), "v".into());
        },
        &[(Bad, H, "request_headers.set.Bad Name")],
    );
    check(
        |c| {
            c.hosts[0]
                .request_headers
                .set
                .insert("x-a".into(), "a\r\nb".into());
        },
        &[(Bad, H, "request_headers.set.x-a")],
    );
    check(
        |c| {
            c.hosts[0]
                .request_headers
                .remove
                .push("transfer-encoding".into())
        },
        &[(Bad, H, "request_headers.remove.transfer-encoding")],
    );
    check(
        |c| {
            c.hosts[0]
                .request_headers
                .set
                .insert("x-env".into(), "prod".into());
        },
        &[],
    );
}

#[test]
fn health_check_ranges() {
    check(
        |c| c.backends[0].health_check.timeout_ms = 2000,
        &[(Bad, B, "health_check.timeout_ms")],
    );
    check(
        |c| c.backends[0].health_check.rise = 0,
        &[(Bad, B, "health_check.rise")],
    );
    check(
        |c| c.backends[0].health_check.fall = 11,
        &[(Bad, B, "health_check.fall")],
    );
    check(
        |c| {
            c.backends[0].health_check.interval_ms = 50;
            c.backends[0].health_check.timeout_ms = 10;
        },
        &[(Bad, B, "health_check.interval_ms")],
    );
    check(
        |c| c.backends[0].health_check.path = "x".into(),
        &[(Bad, B, "health_check.path")],
    );
    check(
        |c| c.backends[0].health_check.expect_status = "200-99".into(),
        &[(Bad, B, "health_check.expect_status")],
    );
    check(
        |c| c.backends[1].health_check.kind = HealthCheckKind::Http,
        &[(Bad, B, "health_check.kind")],
    );
}

#[test]
fn servers_and_tls() {
    check(
        |c| c.backends[0].servers[0].weight = 0,
        &[(Bad, B, "servers[0].weight")],
    );
    check(
        |c| {
            let s = c.backends[0].servers[0].clone();
            c.backends[0].servers.push(s);
        },
        &[(Bad, B, "servers[1].id")],
    );
    check(
        |c| c.backends[0].tls = Some(BackendTls::default()),
        &[(Bad, B, "tls")],
    );
    check(
        |c| {
            c.backends[0].protocol = Protocol::Https;
            c.backends[0].tls = Some(BackendTls {
                ca_pem: Some("junk".into()),
                ..BackendTls::default()
            });
        },
        &[(Bad, B, "tls.ca_pem")],
    );
}

#[test]
fn certificates_must_parse_and_keys_match_their_sha() {
    check(
        |c| c.certificates[0].cert_pem = "junk".into(),
        &[(Bad, C, "cert_pem"), (Bad, H, "certificate_id")],
    );
    check(
        |c| c.certificates[0].key_pem = Some("k".into()),
        &[(Bad, C, "key_pem")],
    );
}

#[test]
fn status_ranges() {
    assert_eq!(parse_status_ranges("200"), Ok(vec![(200, 200)]));
    assert_eq!(
        parse_status_ranges("200-399, 404"),
        Ok(vec![(200, 399), (404, 404)])
    );
    assert!(parse_status_ranges("600").is_err());
    assert!(parse_status_ranges("").is_err());
}
