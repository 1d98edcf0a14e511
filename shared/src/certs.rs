//! Certificate inspection: PEM parsing, the facts the API shows, key/leaf matching, chain order,
//! and which certificate covers which hostname. Pure functions; the clock is passed in.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

use crate::types::Hostname;

/// Why a certificate chain or key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("contains no PEM `CERTIFICATE` block")]
    NoCertificate,
    #[error("is not valid PEM: {reason}")]
    BadPem { reason: String },
    #[error("certificate {index} of the chain is not valid X.509: {reason}")]
    BadDer { index: usize, reason: String },
    #[error(
        "chain is out of order: certificate {next} is not the issuer of certificate {index} \
         (the leaf comes first, then each issuer)"
    )]
    ChainOrder { index: usize, next: usize },
    #[error("contains no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey,
    #[error("private key cannot be used: {reason}")]
    BadKey { reason: String },
    #[error("private key does not match the leaf certificate's public key")]
    KeyMismatch,
    #[error("expired at {not_after}")]
    Expired { not_after: String },
}

/// What the API shows about a certificate chain (from its leaf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    pub subject: String,
    /// DNS subject alternative names, lower case.
    pub sans: Vec<String>,
    pub issuer: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// sha256 of the leaf's DER, lower-case hex.
    pub fingerprint_sha256: String,
    /// Number of certificates in the chain.
    pub chain_len: usize,
}

/// Lower-case hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Parse a PEM chain (leaf first) into DER blocks.
pub fn parse_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(chain)
}

fn parse_der<'a>(index: usize, der: &'a [u8]) -> Result<X509Certificate<'a>, CertError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CertError::BadDer {
        index: index + 1,
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(CertError::BadDer {
            index: index + 1,
            reason: "trailing bytes".into(),
        });
    }
    Ok(cert)
}

/// Parse a PEM chain and read the facts of its leaf; checks that each certificate is issued by
/// the next one (by name).
pub fn inspect_chain(pem: &str) -> Result<CertFacts, CertError> {
    let chain = parse_chain(pem)?;
    let parsed = chain
        .iter()
        .enumerate()
        .map(|(i, der)| parse_der(i, der))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0].issuer().as_raw() != pair[1].subject().as_raw() {
            return Err(CertError::ChainOrder {
                index: i + 1,
                next: i + 2,
            });
        }
    }
    Ok(facts_of(&parsed[0], &chain[0], chain.len()))
}

/// The facts of one DER certificate, as a peer presented it (a health check's handshake).
pub fn inspect_der(der: &[u8]) -> Result<CertFacts, CertError> {
    Ok(facts_of(&parse_der(0, der)?, der, 1))
}

fn facts_of(leaf: &X509Certificate<'_>, der: &[u8], chain_len: usize) -> CertFacts {
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = leaf.subject_alternative_name() {
        for name in &ext.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                sans.push(dns.to_ascii_lowercase());
            }
        }
    }
    let validity = leaf.validity();
    CertFacts {
        subject: leaf.subject().to_string(),
        sans,
        issuer: leaf.issuer().to_string(),
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        fingerprint_sha256: sha256_hex(der),
        chain_len,
    }
}

/// Parse a PEM private key.
pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey,
        other => CertError::BadKey {
            reason: other.to_string(),
        },
    })
}

/// Check that `key_pem` is a usable private key whose public half is the leaf's.
pub fn check_key_matches(cert_pem: &str, key_pem: &str) -> Result<(), CertError> {
    let chain = parse_chain(cert_pem)?;
    let key = parse_key(key_pem)?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| CertError::BadKey {
            reason: e.to_string(),
        })?;
    let spki = signing.public_key().ok_or_else(|| CertError::BadKey {
        reason: "its public key cannot be derived".into(),
    })?;
    let leaf = parse_der(0, &chain[0])?;
    if leaf.public_key().raw != spki.as_ref() {
        return Err(CertError::KeyMismatch);
    }
    Ok(())
}

/// Warnings about a usable certificate, for the API's `warnings` list.
pub fn warnings(facts: &CertFacts, now: OffsetDateTime) -> Vec<String> {
    let mut out = Vec::new();
    for san in &facts.sans {
        if let Some(rest) = san.strip_prefix("*.") {
            if !rest.contains('.') {
                out.push(format!(
                    "SAN `{san}` is a wildcard over a single-label domain: OpenSSL-based clients \
                     such as curl refuse it; also list the exact hostnames it serves"
                ));
            }
        }
    }
    if facts.not_before > now {
        out.push(format!(
            "certificate is not valid before {}",
            rfc3339(facts.not_before)
        ));
    }
    out
}

/// The certificate is within its validity window at `now`?
pub fn check_not_expired(facts: &CertFacts, now: OffsetDateTime) -> Result<(), CertError> {
    if facts.not_after < now {
        return Err(CertError::Expired {
            not_after: rfc3339(facts.not_after),
        });
    }
    Ok(())
}

/// RFC 3339 text of a timestamp.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Does one SAN cover a concrete name? `*.beerme` covers exactly one extra label.
fn san_covers_name(san: &str, name: &str) -> bool {
    match san.strip_prefix("*.") {
        None => san.eq_ignore_ascii_case(name),
        Some(suffix) => match name.split_once('.') {
            Some((first, rest)) => !first.is_empty() && rest.eq_ignore_ascii_case(suffix),
            None => false,
        },
    }
}

/// How well a certificate covers a host: `Exact` (a SAN names it), `Wildcard`, or `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Coverage {
    None,
    Wildcard,
    Exact,
}

/// How the SANs cover a hostname. A wildcard host (`*.beerme`) is covered only by the same
/// wildcard SAN, since it must serve every name it matches.
pub fn coverage(sans: &[String], host: &Hostname) -> Coverage {
    let name = host.as_str();
    if sans.iter().any(|s| s == name) {
        return Coverage::Exact;
    }
    if !host.is_wildcard()
        && sans
            .iter()
            .any(|s| s.starts_with("*.") && san_covers_name(s, name))
    {
        return Coverage::Wildcard;
    }
    Coverage::None
}

/// The certificate to use for a host when none is named: exact SAN before wildcard, then the
/// one that stays valid longest, then the smallest id (so every side picks the same).
pub fn best_certificate<'a, I>(host: &Hostname, candidates: I) -> Option<Uuid>
where
    I: IntoIterator<Item = (Uuid, &'a CertFacts)>,
{
    candidates
        .into_iter()
        .map(|(id, facts)| (coverage(&facts.sans, host), facts.not_after, id))
        .filter(|(cov, _, _)| *cov != Coverage::None)
        .max_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)))
        .map(|(_, _, id)| id)
}

#[cfg(test)]
mod tests;
