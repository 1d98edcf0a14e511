//! Tests of the ClientHello peek: real hellos from rustls clients with varied settings, split
//! every way, and a bounded property test of mutated and random inputs checked against rustls.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rustls::pki_types::ServerName;

use super::*;

/// A ClientHello as a rustls client sends it.
fn hello(sni: Option<&str>, alpn: &[&[u8]], tls12_only: bool) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = if tls12_only {
        builder
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
    } else {
        builder.with_safe_default_protocol_versions().unwrap()
    };
    let mut config = builder
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_sni = sni.is_some();
    let name = ServerName::try_from(sni.unwrap_or("no-sni.invalid").to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Re-split a single-record hello into records of at most `size` payload bytes.
fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
    let payload = &hello[5..];
    let mut out = Vec::new();
    for chunk in payload.chunks(size) {
        out.extend_from_slice(&[
            0x16,
            0x03,
            0x01,
            (chunk.len() >> 8) as u8,
            chunk.len() as u8,
        ]);
        out.extend_from_slice(chunk);
    }
    out
}

/// What rustls's server-side acceptor makes of the bytes: Some(sni) when it accepts a hello.
fn rustls_view(bytes: &[u8]) -> Option<Option<String>> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = bytes;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(accepted.client_hello().server_name().map(str::to_owned)),
        _ => None,
    }
}

fn many_alpn() -> Vec<Vec<u8>> {
    (0..300)
        .map(|i| format!("proto-{i:04}").into_bytes())
        .collect()
}

#[test]
fn hellos_from_rustls_are_read() {
    let big = many_alpn();
    let big_refs: Vec<&[u8]> = big.iter().map(Vec::as_slice).collect();
    for (sni, alpn, tls12) in [
        (Some("redmine.beerme"), vec![&b"h2"[..], b"http/1.1"], false),
        (Some("ODOO.beerme"), vec![], true),
        (
            Some("a.very.long.name.example.com"),
            big_refs.clone(),
            false,
        ),
        (None, vec![&b"h2"[..]], false),
    ] {
        let h = hello(sni, &alpn, tls12);
        let want = match sni {
            Some(s) => Peek::Sni(s.to_ascii_lowercase()),
            None => Peek::NoSni,
        };
        // rustls lower-cases the name it sends.
        let got = match peek(&h) {
            Peek::Sni(s) => Peek::Sni(s.to_ascii_lowercase()),
            other => other,
        };
        assert_eq!(got, want, "sni {sni:?}");
        // Every prefix is NeedMore: nothing is decided early.
        for cut in [0, 1, 4, 5, 6, 40, h.len() - 1] {
            assert_eq!(
                peek(&h[..cut]),
                Peek::NeedMore,
                "prefix {cut} of {}",
                h.len()
            );
        }
    }
    let large = hello(Some("big.example"), &big_refs, false);
    assert!(large.len() > 1500, "large hello is {} bytes", large.len());
}

#[test]
fn hellos_split_over_many_records_are_read() {
    let h = hello(Some("redmine.beerme"), &[b"h2"], false);
    for size in [1, 7, 100, 512] {
        let split = refragment(&h, size);
        assert_eq!(
            peek(&split),
            Peek::Sni("redmine.beerme".into()),
            "records of {size}"
        );
        assert_eq!(rustls_view(&split), Some(Some("redmine.beerme".into())));
        assert_eq!(peek(&split[..split.len() - 1]), Peek::NeedMore);
    }
}

#[test]
fn non_tls_and_broken_input() {
    assert_eq!(peek(b"GET / HTTP/1.1\r\n"), Peek::NotTls);
    assert_eq!(peek(b"SSH-2.0-OpenSSH"), Peek::NotTls);
    assert_eq!(peek(&[0x80, 0x2e, 0x01]), Peek::NotTls); // SSLv2-style hello
    assert_eq!(peek(&[0x16, 0x02]), Peek::NotTls);
    // A handshake record that is not a ClientHello.
    assert_eq!(
        peek(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]),
        Peek::Malformed
    );
    // An empty record, an oversized record.
    assert_eq!(peek(&[0x16, 0x03, 0x01, 0x00, 0x00]), Peek::Malformed);
    assert_eq!(peek(&[0x16, 0x03, 0x01, 0x48, 0x01]), Peek::Malformed);
    // A hello announcing more than 64 KiB.
    assert_eq!(
        peek(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x00, 0x01]),
        Peek::Malformed
    );
    // An alert record in the middle of the hello.
    let h = refragment(&hello(Some("a.example"), &[], false), 50);
    let mut bad = h[..55].to_vec();
    bad.extend_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
    assert_eq!(peek(&bad), Peek::Malformed);
}

#[test]
fn mutated_and_random_input_never_panics_and_agrees_with_rustls() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5e1ce);
    let big = many_alpn();
    let big_refs: Vec<&[u8]> = big.iter().map(Vec::as_slice).collect();
    let seeds = [
        hello(Some("redmine.beerme"), &[b"h2", b"http/1.1"], false),
        hello(Some("odoo.beerme"), &[], true),
        hello(None, &[b"h2"], false),
        refragment(&hello(Some("x.example"), &big_refs, false), 300),
    ];
    let mut agreed = 0;
    for round in 0..4000 {
        let mut bytes = seeds[round % seeds.len()].clone();
        match rng.gen_range(0..5) {
            0 => {
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] ^= 1 << rng.gen_range(0..8);
                }
            }
            1 => bytes.truncate(rng.gen_range(0..bytes.len())),
            2 => {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
            }
            3 => {
                let i = rng.gen_range(0..bytes.len());
                let n = rng.gen_range(1..20);
                bytes.splice(i..i, (0..n).map(|_| rng.gen::<u8>()));
            }
            _ => {
                let n = rng.gen_range(0..600);
                bytes = (0..n).map(|_| rng.gen()).collect();
                if rng.gen_bool(0.5) && !bytes.is_empty() {
                    bytes[0] = 0x16;
                }
            }
        }
        let ours = peek(&bytes);
        if let Some(theirs) = rustls_view(&bytes) {
            // Compared as routing sees names: lower case, without a trailing dot (rustls drops
            // it when it reports the name; the host lookup drops it from ours).
            let routed = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
            let ours_sni = match &ours {
                Peek::Sni(s) => Some(routed(s)),
                Peek::NoSni => None,
                other => panic!("rustls accepted a hello we call {other:?}: {bytes:02x?}"),
            };
            assert_eq!(ours_sni, theirs.map(|s| routed(&s)), "{bytes:02x?}");
            agreed += 1;
        }
    }
    assert!(agreed > 100, "only {agreed} valid hellos compared");
}

/// A ClientHello made by hand: the SNI extension for `name`, then empty extensions of the
/// given types, in one record.
fn hand_made_hello(name: &str, extra: &[u16]) -> Vec<u8> {
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0); // host_name
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    let mut exts = vec![0, 0];
    exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    exts.extend_from_slice(&sni);
    for kind in extra {
        exts.extend_from_slice(&kind.to_be_bytes());
        exts.extend_from_slice(&[0, 0]);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[test]
fn many_extensions_are_read_and_a_duplicate_is_refused_wherever_it_is() {
    // More distinct extensions than the duplicate check keeps without allocating.
    let many: Vec<u16> = (100..160).collect();
    let h = hand_made_hello("a.example", &many);
    assert_eq!(peek(&h), Peek::Sni("a.example".into()));
    // A repeat among the first few, and one far past them.
    for repeat in [101, 150] {
        let mut kinds = many.clone();
        kinds.push(repeat);
        let h = hand_made_hello("a.example", &kinds);
        assert_eq!(peek(&h), Peek::Malformed, "repeat of {repeat}");
    }
}
