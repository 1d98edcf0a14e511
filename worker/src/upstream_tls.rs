//! TLS to `https` backends: a rustls client configuration per backend, built with the
//! snapshot (so a bad CA bundle is refused before the switch), and the name to send as SNI.
//!
//! `verify: true` checks the server's chain against `ca_pem`, or against the system bundle when
//! no CA is given; `verify: false` accepts any certificate (still encrypted, not authenticated),
//! as HAProxy's `ssl verify none`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sluice_shared::{certs, BackendTls, Server};

/// Where Debian, Fedora, Alpine and friends keep the system CA bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Accepts any server certificate (for `verify: false`), still checking handshake signatures.
#[derive(Debug)]
struct AcceptAny(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn roots(tls: &BackendTls) -> Result<RootCertStore, String> {
    let pem = match &tls.ca_pem {
        Some(pem) => pem.clone(),
        None => SYSTEM_BUNDLES
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .ok_or_else(|| {
                "verify is on, no ca_pem is given and no system CA bundle was found".to_owned()
            })?,
    };
    let mut store = RootCertStore::empty();
    let chain = certs::parse_chain(&pem).map_err(|e| format!("ca_pem {e}"))?;
    let (_, ignored) = store.add_parsable_certificates(chain);
    if store.is_empty() {
        return Err(format!(
            "no usable CA certificate in the bundle ({ignored} ignored)"
        ));
    }
    Ok(store)
}

/// What a worker keeps per `https` backend: the client configuration and the CA bundle's hash,
/// which goes into the pool key (computed once per snapshot, not per request).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// ALPN `http/1.1` only (health checks and protocol upgrades).
    pub config: Arc<ClientConfig>,
    /// ALPN `h2, http/1.1`: requests use HTTP/2 when the server picks it.
    pub config_h2: Arc<ClientConfig>,
    pub ca_sha256: String,
}

impl Upstream {
    pub fn new(tls: &BackendTls) -> Result<Upstream, String> {
        let config = client_config(tls)?;
        let mut h2 = (*config).clone();
        h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Upstream {
            config,
            config_h2: Arc::new(h2),
            ca_sha256: tls
                .ca_pem
                .as_deref()
                .map(|c| certs::sha256_hex(c.as_bytes()))
                .unwrap_or_default(),
        })
    }
}

/// The client configuration for a backend's TLS settings (ALPN `http/1.1`).
pub fn client_config(tls: &BackendTls) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if tls.verify {
        builder
            .with_root_certificates(roots(tls)?)
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The SNI (and name verified) for a server: the backend's `server_name`, else the server's host.
pub fn server_name(tls: &BackendTls, server: &Server) -> Result<ServerName<'static>, String> {
    let name = match &tls.server_name {
        Some(n) => n.to_string(),
        None => server.address.host_str(),
    };
    ServerName::try_from(name.clone())
        .map_err(|e| format!("`{name}` cannot be a TLS server name: {e}"))
}

/// A client configuration that accepts any certificate (signatures still checked), for `tls`
/// health checks of passthrough servers: the check reports what the certificate says instead
/// of refusing it.
pub fn inspecting_config() -> Arc<ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny(
                    provider.signature_verification_algorithms,
                )))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}
