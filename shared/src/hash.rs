//! The content hash of a configuration: sha256 over its canonical JSON encoding.
//!
//! Canonical means: collections sorted by id ([`Config::normalize`]), struct fields in declaration
//! order, maps as `BTreeMap`, and private keys represented only by their `key_sha256`. Two
//! configurations with the same hash serve the same traffic with the same keys.

use std::io;

use sha2::{Digest, Sha256};

use crate::model::Config;

struct HashWriter(Sha256);

impl io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Lower-case hex sha256 of the canonical encoding of `config` (which must be normalized).
pub fn config_hash(config: &Config) -> String {
    let mut w = HashWriter(Sha256::new());
    let result = if config.certificates.iter().any(|c| c.key_pem.is_some()) {
        serde_json::to_writer(&mut w, &config.redacted())
    } else {
        serde_json::to_writer(&mut w, config)
    };
    // Serializing plain structs, strings and BTreeMaps into a hasher cannot fail.
    debug_assert!(result.is_ok());
    hex::encode(w.0.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Certificate;
    use uuid::Uuid;

    #[test]
    fn hash_ignores_key_text_but_not_key_identity() {
        let cert = |key_pem: Option<&str>, sha: &str| Certificate {
            id: Uuid::nil(),
            name: "c".into(),
            cert_pem: "pem".into(),
            key_sha256: sha.into(),
            key_pem: key_pem.map(str::to_owned),
        };
        let with_key = Config {
            certificates: vec![cert(Some("k"), "aa")],
            ..Config::default()
        };
        let without = Config {
            certificates: vec![cert(None, "aa")],
            ..Config::default()
        };
        let other_key = Config {
            certificates: vec![cert(None, "bb")],
            ..Config::default()
        };
        assert_eq!(config_hash(&with_key), config_hash(&without));
        assert_ne!(config_hash(&without), config_hash(&other_key));
        assert_eq!(config_hash(&Config::default()).len(), 64);
    }
}
