//! Tests for certificate inspection with rcgen-made chains.

use super::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

fn self_signed(sans: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

fn host(s: &str) -> Hostname {
    s.parse().unwrap()
}

#[test]
fn facts_of_a_leaf() {
    let (cert, _) = self_signed(&["*.beerme", "Redmine.beerme"]);
    let facts = inspect_chain(&cert).unwrap();
    assert_eq!(facts.sans, vec!["*.beerme", "redmine.beerme"]);
    assert_eq!(facts.fingerprint_sha256.len(), 64);
    assert_eq!(facts.chain_len, 1);
    assert!(facts.not_after > facts.not_before);
}

#[test]
fn garbage_and_empty_pem_are_refused() {
    assert_eq!(inspect_chain("hello"), Err(CertError::NoCertificate));
    let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    assert!(matches!(
        inspect_chain(bad),
        Err(CertError::BadDer { index: 1, .. })
    ));
}

#[test]
fn key_must_match_leaf() {
    let (cert, key) = self_signed(&["a.example"]);
    let (_, other_key) = self_signed(&["a.example"]);
    assert_eq!(check_key_matches(&cert, &key), Ok(()));
    assert_eq!(
        check_key_matches(&cert, &other_key),
        Err(CertError::KeyMismatch)
    );
    assert_eq!(check_key_matches(&cert, "nothing"), Err(CertError::NoKey));
}

#[test]
fn chain_order_is_checked() {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["a.example".to_string()]).unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "a.example");
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();

    let good = format!("{}{}", leaf.pem(), ca.pem());
    let facts = inspect_chain(&good).unwrap();
    assert_eq!(facts.chain_len, 2);
    assert!(facts.issuer.contains("Test CA"), "{}", facts.issuer);

    let reversed = format!("{}{}", ca.pem(), leaf.pem());
    assert_eq!(
        inspect_chain(&reversed),
        Err(CertError::ChainOrder { index: 1, next: 2 })
    );
}

#[test]
fn expiry_and_warnings() {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["*.beerme".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let facts = inspect_chain(&params.self_signed(&key).unwrap().pem()).unwrap();
    let now = OffsetDateTime::now_utc();
    assert!(matches!(
        check_not_expired(&facts, now),
        Err(CertError::Expired { .. })
    ));
    let w = warnings(&facts, now);
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("single-label"), "{w:?}");
}

#[test]
fn coverage_rules() {
    let sans: Vec<String> = vec!["*.beerme".into(), "odoo.beerme".into()];
    assert_eq!(coverage(&sans, &host("odoo.beerme")), Coverage::Exact);
    assert_eq!(coverage(&sans, &host("redmine.beerme")), Coverage::Wildcard);
    assert_eq!(coverage(&sans, &host("*.beerme")), Coverage::Exact);
    assert_eq!(coverage(&sans, &host("a.b.beerme")), Coverage::None);
    assert_eq!(coverage(&sans, &host("beerme")), Coverage::None);
    let exact_only: Vec<String> = vec!["a.beerme".into()];
    assert_eq!(coverage(&exact_only, &host("*.beerme")), Coverage::None);
}

#[test]
fn best_certificate_prefers_exact_then_longest_lived() {
    let (w, _) = self_signed(&["*.beerme"]);
    let (e, _) = self_signed(&["redmine.beerme"]);
    let wf = inspect_chain(&w).unwrap();
    let ef = inspect_chain(&e).unwrap();
    let (wid, eid) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let pick = |h: &str| best_certificate(&host(h), [(wid, &wf), (eid, &ef)]);
    assert_eq!(pick("redmine.beerme"), Some(eid));
    assert_eq!(pick("odoo.beerme"), Some(wid));
    assert_eq!(pick("other.example"), None);

    let mut longer = wf.clone();
    longer.not_after += time::Duration::days(30);
    let lid = Uuid::from_u128(3);
    assert_eq!(
        best_certificate(&host("x.beerme"), [(wid, &wf), (lid, &longer)]),
        Some(lid)
    );
}
