//! Tests for the typed values: every rule of hostname and address syntax.

use super::*;

fn host(s: &str) -> Result<Hostname, NameError> {
    s.parse()
}

#[test]
fn hostnames_that_parse() {
    for (input, stored) in [
        ("redmine.beerme", "redmine.beerme"),
        ("Redmine.BeerMe", "redmine.beerme"),
        ("*.beerme", "*.beerme"),
        ("localhost", "localhost"),
        ("a-b.c1.example", "a-b.c1.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ] {
        assert_eq!(host(input).unwrap().as_str(), stored, "{input}");
    }
}

#[test]
fn hostnames_that_fail_name_the_rule() {
    let long_label = "a".repeat(64);
    let long_name = format!("{}.com", ["abcdefgh"; 28].join("."));
    let cases: Vec<(&str, NameError)> = vec![
        ("", NameError::Empty),
        ("a..b", NameError::EmptyLabel),
        (".a", NameError::EmptyLabel),
        ("a.", NameError::EmptyLabel),
        (
            &long_label,
            NameError::LabelTooLong {
                label: long_label.clone(),
            },
        ),
        (
            "a_b.c",
            NameError::BadCharacter {
                label: "a_b".into(),
            },
        ),
        ("-a.c", NameError::BadHyphen { label: "-a".into() }),
        ("a.*.c", NameError::MisplacedWildcard),
        ("a*.c", NameError::MisplacedWildcard),
        ("*", NameError::BareWildcard),
        (
            &long_name,
            NameError::TooLong {
                len: long_name.len(),
            },
        ),
    ];
    for (input, want) in cases {
        assert_eq!(host(input), Err(want), "{input:?}");
    }
}

#[test]
fn wildcard_matches_exactly_one_label() {
    let w = host("*.beerme").unwrap();
    assert!(w.matches("redmine.beerme"));
    assert!(w.matches("ODOO.beerme"));
    assert!(!w.matches("beerme"));
    assert!(!w.matches("a.b.beerme"));
    assert!(!w.matches(".beerme"));
    let e = host("redmine.beerme").unwrap();
    assert!(e.matches("REDMINE.beerme"));
    assert!(!e.matches("odoo.beerme"));
}

#[test]
fn server_addresses() {
    let ok = [
        ("10.4.1.11:30080", "10.4.1.11:30080"),
        ("[::1]:8080", "[::1]:8080"),
        ("backend.internal:443", "backend.internal:443"),
        ("Backend:1", "backend:1"),
    ];
    for (input, shown) in ok {
        assert_eq!(input.parse::<ServerAddr>().unwrap().to_string(), shown);
    }
    // An IP host is a socket address as it stands; a name must go through the resolver.
    let socket = |s: &str| s.parse::<ServerAddr>().unwrap().socket_addr();
    assert_eq!(
        socket("10.4.1.11:30080"),
        Some("10.4.1.11:30080".parse().unwrap())
    );
    assert_eq!(socket("[::1]:8080"), Some("[::1]:8080".parse().unwrap()));
    assert_eq!(socket("backend.internal:443"), None);
    let bad = [
        ("10.4.1.11", NameError::MissingPort),
        ("10.4.1.11:0", NameError::BadPort { port: "0".into() }),
        (
            "10.4.1.11:65536",
            NameError::BadPort {
                port: "65536".into(),
            },
        ),
        ("10.4.1.11:+80", NameError::BadPort { port: "+80".into() }),
        (
            "h:http",
            NameError::BadPort {
                port: "http".into(),
            },
        ),
        ("::1:80", NameError::BadIpv6 { host: "::1".into() }),
        ("[zz]:80", NameError::BadIpv6 { host: "zz".into() }),
        ("*.x:80", NameError::MisplacedWildcard),
        (":80", NameError::Empty),
    ];
    for (input, want) in bad {
        assert_eq!(input.parse::<ServerAddr>(), Err(want), "{input:?}");
    }
}

#[test]
fn config_version_rejects_zero() {
    assert!(ConfigVersion::try_from(0).is_err());
    assert_eq!(ConfigVersion::try_from(3).unwrap().next().get(), 4);
}
