//! Demo certificates: a throwaway CA ("Sluice Demo CA"), the edge certificate for `*.beerme`
//! (with the demo names listed too, since TLS clients do not let a wildcard stand for a name
//! only one label below it), and the certificate the odoo-like backends hold themselves. Files
//! in a directory, so the demo and the compose stack reuse them across runs and clients can
//! trust `ca.pem`.

use std::path::Path;

/// Names the demo serves.
pub const REDMINE: &str = "redmine.beerme";
pub const ODOO: &str = "odoo.beerme";
pub const GRPC: &str = "grpc.beerme";

/// The demo's certificates, PEM.
#[derive(Debug, Clone)]
pub struct DemoCerts {
    pub ca_pem: String,
    /// Edge certificate chain (leaf then CA) and key, for terminated hosts.
    pub edge_chain: String,
    pub edge_key: String,
    /// The odoo backends' own certificate chain and key (passthrough: clients see this one).
    pub odoo_chain: String,
    pub odoo_key: String,
}

const FILES: [&str; 5] = ["ca.pem", "edge.pem", "edge.key", "odoo.pem", "odoo.key"];

fn leaf(
    names: &[&str],
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    let cert = params.signed_by(&key, ca, ca_key)?;
    Ok((format!("{}{}", cert.pem(), ca.pem()), key.serialize_pem()))
}

impl DemoCerts {
    /// New certificates.
    pub fn generate() -> anyhow::Result<DemoCerts> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Sluice Demo CA");
        let ca = params.self_signed(&ca_key)?;
        let (edge_chain, edge_key) = leaf(&["*.beerme", REDMINE, GRPC], &ca, &ca_key)?;
        let (odoo_chain, odoo_key) = leaf(&[ODOO], &ca, &ca_key)?;
        Ok(DemoCerts {
            ca_pem: ca.pem(),
            edge_chain,
            edge_key,
            odoo_chain,
            odoo_key,
        })
    }

    /// Read the certificates from `dir`, or generate and write them (keys 0600) when any
    /// file is missing.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<DemoCerts> {
        if FILES.iter().all(|f| dir.join(f).is_file()) {
            let read = |f: &str| std::fs::read_to_string(dir.join(f));
            return Ok(DemoCerts {
                ca_pem: read("ca.pem")?,
                edge_chain: read("edge.pem")?,
                edge_key: read("edge.key")?,
                odoo_chain: read("odoo.pem")?,
                odoo_key: read("odoo.key")?,
            });
        }
        let certs = DemoCerts::generate()?;
        certs.write(dir)?;
        Ok(certs)
    }

    /// Write the files to `dir` (created if missing); keys are readable by the owner only.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        let contents = [
            &self.ca_pem,
            &self.edge_chain,
            &self.edge_key,
            &self.odoo_chain,
            &self.odoo_key,
        ];
        for (file, text) in FILES.iter().zip(contents) {
            let mode = if file.ends_with(".key") { 0o600 } else { 0o644 };
            let path = dir.join(file);
            let _ = std::fs::remove_file(&path);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)?
                .write_all(text.as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_certificates_are_read_back_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile_dir();
        let made = DemoCerts::load_or_create(&dir).unwrap();
        let again = DemoCerts::load_or_create(&dir).unwrap();
        assert_eq!(made.edge_chain, again.edge_chain, "reused, not regenerated");
        assert!(
            made.edge_chain.ends_with(&made.ca_pem),
            "chain ends with the CA"
        );
        let mode = std::fs::metadata(dir.join("edge.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-demo-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
